//! A per-test temporary directory for secrets and logs, kept when the test fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Set to any value to keep every test directory (logs included) even when tests pass.
pub const KEEP_ENV: &str = "TUNNEL_TEST_KEEP_LOGS";

/// A fresh directory under the system temp dir. Removed on drop, unless the thread is
/// panicking (a failing test keeps its logs for inspection) or `$TUNNEL_TEST_KEEP_LOGS` is set.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/tunnel-tests-<label>-<pid>-<n>-<nanos>`.
    pub fn new(label: &str) -> std::io::Result<TestDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tunnel-tests-{label}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("[tunnel-tests] kept test directory {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
