//! Named durability modes and the poison flag every writer shares.

use std::sync::Mutex;

use crate::error::{Result, StorageError};

/// When an append counts as done, and therefore what it survives.
///
/// | mode | an acknowledged append survives |
/// |---|---|
/// | [`PersistMode::Fsync`] | process crash, kernel panic, power loss |
/// | [`PersistMode::Buffered`] | process crash (`SIGKILL`) only: the OS page cache holds it |
///
/// Runnel's default is `Fsync`. With replication on top, `Buffered` still survives any minority of
/// nodes losing power at once, but not all of them; it exists for benchmarks and for users who
/// accept that trade knowingly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PersistMode {
    /// fdatasync (or msync) before an append is acknowledged.
    #[default]
    Fsync,
    /// Acknowledge once the bytes are in the page cache; flush later.
    Buffered,
}

/// Fail-stop latch set by the first failed fsync.
///
/// After fsync fails the kernel may have dropped the dirty pages and cleared the error, so a
/// retry that "succeeds" proves nothing (the PostgreSQL fsync-gate lesson). The only safe reaction
/// is to refuse every later write until the process restarts and recovers from disk.
#[derive(Debug, Default)]
pub struct Poison(Mutex<Option<String>>);

impl Poison {
    /// Fails with [`StorageError::Poisoned`] once poisoned.
    pub fn check(&self) -> Result<()> {
        match &*self.0.lock().expect("poison lock") {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Poisons with `why`, keeping the first reason.
    pub fn set(&self, why: String) {
        let mut g = self.0.lock().expect("poison lock");
        if g.is_none() {
            tracing::error!(reason = %why, "fsync failed: log poisoned, refusing further writes");
            *g = Some(why);
        }
    }

    /// Refuses every later write with `why`, without an fsync having failed: for a handle
    /// retired on purpose (its files are about to be reopened by a new one).
    pub fn retire(&self, why: String) {
        let mut g = self.0.lock().expect("poison lock");
        if g.is_none() {
            *g = Some(why);
        }
    }

    /// True once poisoned.
    pub fn is_poisoned(&self) -> bool {
        self.0.lock().expect("poison lock").is_some()
    }
}
