//! Listen ports for test nodes that no concurrently running test can take.
//!
//! Ports come from below the kernel's ephemeral range (32768 and up), so the outgoing
//! connections of other tests can never take one between this check and the node's bind; a
//! lock file, created exclusively, keeps other test processes off it until it is dropped.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

/// A reserved port; the reservation ends when this is dropped.
#[derive(Debug)]
pub struct PortLock {
    /// The port.
    pub port: u16,
    path: PathBuf,
}

impl Drop for PortLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reserves a port on 127.0.0.1 that is free now and stays off-limits to other tests.
pub fn free_port() -> PortLock {
    let dir = std::env::temp_dir().join("runnel-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock dir");
    for _ in 0..10_000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let path = dir.join(port.to_string());
        // A lock older than an hour belongs to a test that died without cleaning up.
        if let Ok(m) = std::fs::metadata(&path) {
            let stale = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            if stale {
                let _ = std::fs::remove_file(&path);
            }
        }
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_err()
        {
            continue;
        }
        let lock = PortLock { port, path };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return lock;
        }
    }
    panic!("no free port in 20000..32000");
}
