//! Raising the open-files limit of the test process, which the binaries it spawns inherit:
//! hundreds of concurrent tunnel connections need a few sockets each in every process.

use std::io;

/// Makes the soft `RLIMIT_NOFILE` at least `wanted` (raising the hard limit too when allowed,
/// e.g. as root; otherwise capped at it) and returns the soft limit in force afterwards.
/// Never lowers it.
#[cfg(unix)]
// `rlim_t` is u64 on Linux but not on every Unix, hence the casts.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit(wanted: u64) -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let current = limit.rlim_cur as u64;
    if current >= wanted {
        return Ok(current);
    }
    // Root may raise the hard limit too (the bench's 10,000 idle connections need it).
    let raised = libc::rlimit {
        rlim_cur: wanted as libc::rlim_t,
        rlim_max: (limit.rlim_max as u64).max(wanted) as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    let target = wanted.min(limit.rlim_max as u64);
    limit.rlim_cur = target as libc::rlim_t;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_lowers_and_reports_the_limit() {
        let now = raise_nofile_limit(0).unwrap();
        assert!(now > 0);
        assert_eq!(raise_nofile_limit(1).unwrap(), now);
    }
}
