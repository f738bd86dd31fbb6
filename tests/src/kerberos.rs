//! A throw-away MIT Kerberos realm for the proxy authentication tests: its own `krb5.conf`
//! and KDC profile in the test's temp dir (pointed at by `KRB5_CONFIG` and
//! `KRB5_KDC_PROFILE`), a database made with `kdb5_util`, principals and keytabs made with
//! `kadmin.local`, a `krb5kdc` on a free loopback port, and `kinit` credential caches.
//! Programs come from the Debian packages krb5-kdc, krb5-admin-server and krb5-user; a
//! missing one is an error naming its package.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::free_port;
use crate::process::{find_program, ChildProcess};
use crate::services::SERVICE_START_TIMEOUT;

/// Deadline of one admin command (kdb5_util, kadmin.local, kinit).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A running realm.
#[derive(Debug)]
pub struct KerberosRealm {
    realm: String,
    dir: PathBuf,
    krb5_conf: PathBuf,
    kdc_profile: PathBuf,
    kdc: ChildProcess,
}

impl KerberosRealm {
    /// Makes realm `realm` in `<parent>/krb5` and starts its KDC.
    pub async fn start(parent: &Path, realm: &str) -> io::Result<KerberosRealm> {
        let krb5kdc = find_program("krb5kdc", "krb5-kdc")?;
        let kdb5_util = find_program("kdb5_util", "krb5-kdc")?;
        let dir = parent.join("krb5");
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let d = dir.display();
        // No DNS anywhere: the service host name is used as given ("localhost"). Requests
        // of any size go over TCP (udp_preference_limit 1), the port checked free.
        let krb5_conf = dir.join("krb5.conf");
        std::fs::write(
            &krb5_conf,
            format!(
                "[libdefaults]\n\
                 \tdefault_realm = {realm}\n\
                 \tdns_lookup_kdc = false\n\
                 \tdns_lookup_realm = false\n\
                 \tdns_canonicalize_hostname = false\n\
                 \trdns = false\n\
                 \tudp_preference_limit = 1\n\
                 \tdefault_ccache_name = FILE:{d}/ccache-default\n\
                 [realms]\n\
                 \t{realm} = {{\n\t\tkdc = 127.0.0.1:{port}\n\t}}\n\
                 [domain_realm]\n\
                 \tlocalhost = {realm}\n"
            ),
        )?;
        let kdc_profile = dir.join("kdc.conf");
        std::fs::write(
            &kdc_profile,
            format!(
                "[kdcdefaults]\n\
                 \tkdc_ports = {port}\n\
                 \tkdc_tcp_ports = {port}\n\
                 [realms]\n\
                 \t{realm} = {{\n\
                 \t\tdatabase_name = {d}/principal\n\
                 \t\tkey_stash_file = {d}/stash\n\
                 \t\tacl_file = {d}/kadm5.acl\n\
                 \t\tmax_life = 1h\n\
                 \t}}\n\
                 [logging]\n\
                 \tkdc = FILE:{d}/kdc.log\n"
            ),
        )?;
        std::fs::write(dir.join("kadm5.acl"), "")?;
        let env = realm_env(&krb5_conf, &kdc_profile);
        let master = "master password of the test realm";
        let create = ["create", "-s", "-r", realm, "-P", master];
        run_command("kdb5_util", &kdb5_util, &create, &env, &dir).await?;
        let mut kdc = ChildProcess::spawn("krb5kdc", &krb5kdc, ["-n", "-r", realm], &env, &dir)?;
        let kdc_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        kdc.wait_listening(kdc_addr, SERVICE_START_TIMEOUT).await?;
        Ok(KerberosRealm {
            realm: realm.to_string(),
            dir,
            krb5_conf,
            kdc_profile,
            kdc,
        })
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// `KRB5_CONFIG` and `KRB5_KDC_PROFILE` for every program of this realm (and for the
    /// client under test).
    pub fn env(&self) -> Vec<(String, String)> {
        realm_env(&self.krb5_conf, &self.kdc_profile)
    }

    /// Adds `principal` (without realm) with a random key and writes its keys to a new
    /// keytab, world-readable (squid's helper runs as squid's user); returns the keytab.
    pub async fn keytab_for(&self, principal: &str, file_name: &str) -> io::Result<PathBuf> {
        let keytab = self.dir.join(file_name);
        self.kadmin(&format!("addprinc -randkey {principal}"))
            .await?;
        self.kadmin(&format!("ktadd -k {} {principal}", keytab.display()))
            .await?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keytab, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(keytab)
    }

    /// `kinit` for `principal` from its keytab into the credential cache `ccache` (a path):
    /// what `KRB5CCNAME=FILE:<ccache>` then names.
    pub async fn kinit(&self, principal: &str, keytab: &Path, ccache: &Path) -> io::Result<()> {
        let kinit = find_program("kinit", "krb5-user")?;
        let mut env = self.env();
        env.push(("KRB5CCNAME".into(), format!("FILE:{}", ccache.display())));
        let keytab = keytab.display().to_string();
        let args = ["-k", "-t", &keytab, principal];
        run_command("kinit", &kinit, &args, &env, &self.dir).await
    }

    /// Runs one `kadmin.local` query on the realm's database.
    async fn kadmin(&self, query: &str) -> io::Result<()> {
        let kadmin = find_program("kadmin.local", "krb5-admin-server")?;
        let args = ["-r", &self.realm, "-q", query];
        run_command("kadmin.local", &kadmin, &args, &self.env(), &self.dir).await
    }

    /// The KDC's log (each ticket it issued).
    pub fn kdc_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kdc.log")).unwrap_or_default()
    }

    pub fn kdc(&mut self) -> &mut ChildProcess {
        &mut self.kdc
    }
}

fn realm_env(krb5_conf: &Path, kdc_profile: &Path) -> Vec<(String, String)> {
    vec![
        ("KRB5_CONFIG".into(), krb5_conf.display().to_string()),
        ("KRB5_KDC_PROFILE".into(), kdc_profile.display().to_string()),
    ]
}

/// Runs an admin command to its end; an error with the tail of its output if it fails.
async fn run_command(
    label: &str,
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    dir: &Path,
) -> io::Result<()> {
    let mut child = ChildProcess::spawn(label, program, args.iter().copied(), env, dir)?;
    let status = child.wait_exit(COMMAND_TIMEOUT).await?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "{} {args:?} failed ({status}):\n{}",
            program.display(),
            child.log_tail(20)
        )));
    }
    Ok(())
}
