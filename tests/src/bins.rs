//! Locating the workspace's binaries from inside a test executable.

use std::path::PathBuf;

/// Environment variable naming the directory that holds the binaries; overrides every other
/// rule (useful for release builds or binaries built elsewhere).
pub const BIN_DIR_ENV: &str = "TUNNEL_BIN_DIR";

/// The directory the workspace's binaries are built into.
///
/// In order: `$TUNNEL_BIN_DIR`; the profile directory the running test executable lives in
/// (`…/target/debug/deps/x` → `…/target/debug`, which also gets the profile right); then
/// `$CARGO_TARGET_DIR/debug`; then `./target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        // Test executables live in <profile>/deps; plain binaries in <profile>.
        let mut dir = exe.parent().map(PathBuf::from);
        if dir.as_deref().and_then(|d| d.file_name()) == Some("deps".as_ref()) {
            dir = dir.and_then(|d| d.parent().map(PathBuf::from));
        }
        if let Some(dir) = dir {
            return dir;
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("debug");
    }
    PathBuf::from("target").join("debug")
}

/// Path of the workspace binary `name` (e.g. `"tunnel-servlet"`).
///
/// # Panics
/// When the file does not exist, with a message that says how to build it: the harness never
/// builds binaries itself (a build inside a test would blow every test's timeout).
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}: run `cargo build --workspace --bins` first \
             (or set {BIN_DIR_ENV} to the directory holding it)",
            path.display()
        );
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_panics_with_build_hint() {
        let err = std::panic::catch_unwind(|| bin_path("no-such-binary-xyz")).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("binary no-such-binary-xyz not found at"),
            "{msg}"
        );
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }

    #[test]
    fn bin_dir_is_the_profile_dir_of_the_test_executable() {
        if std::env::var_os(BIN_DIR_ENV).is_some() {
            return; // overridden on purpose by whoever runs the tests
        }
        let dir = bin_dir();
        assert_ne!(dir.file_name(), Some("deps".as_ref()), "{}", dir.display());
        assert!(dir.join("deps").is_dir(), "{}", dir.display());
    }
}
