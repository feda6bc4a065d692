//! The storage error type.

use std::io;
use std::path::PathBuf;

use runnel_record::BatchError;

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything a storage operation can fail with.
///
/// [`StorageError::Corruption`] and [`StorageError::Poisoned`] are the fatal tier: the first means
/// durable data failed its checks (repair from a replica, never cut), the second that an fsync
/// failed and the log refuses every further write.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "fdatasync", …).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Data below the durable point failed its CRC or structural checks.
    #[error("corruption in {path} at byte {position}: {reason}")]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte position of the first bad record.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// An earlier fsync failed; the log accepts no more writes until reopened.
    #[error("log poisoned by an earlier fsync failure ({0}); restart the node")]
    Poisoned(String),
    /// A batch handed to append is not a valid v2 batch.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// A read asked for an offset outside `[log_start, log_end]`.
    #[error("offset {offset} out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// First readable offset.
        log_start: u64,
        /// Offset after the last record.
        log_end: u64,
    },
    /// A size, count or index broke a documented limit or ordering.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl StorageError {
    /// Wraps an `io::Error` with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True for [`StorageError::Corruption`].
    pub fn is_corruption(&self) -> bool {
        matches!(self, StorageError::Corruption { .. })
    }
}

/// Attaches an operation name and path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| StorageError::io(op, path, e))
    }
}
