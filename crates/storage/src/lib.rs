//! Runnel's storage engine: everything that touches a partition's or a Raft group's bytes on
//! disk, and nothing else.
//!
//! It owns memory-mapped segment files with sparse
//! offset and time indexes ([`PartitionLog`]), the per-group write-ahead log with group commit
//! ([`wal::Wal`]) and checkpoint manifests ([`manifest`]). It is synchronous (no Tokio) and knows
//! nothing of Raft, gRPC or the network: the `raft` crate drives it.
//!
//! Durability is explicit ([`PersistMode`]); an fsync failure poisons the writer (fail-stop);
//! recovery cuts a torn tail (bytes past the durable point) and reports everything below it
//! that fails its checks as [`StorageError::Corruption`]. All `unsafe` code lives in `mmap.rs`.
//! On-disk formats are documented beside their code and in `docs/FORMAT.md`.

mod error;
pub mod fsutil;
pub mod fuzzing;
mod index;
mod log;
pub mod manifest;
mod mmap;
mod persist;
pub mod scan;
mod segment;
pub mod wal;

pub use error::{Result, StorageError};
pub use log::{
    AppendInfo, LogConfig, PartitionLog, RECOVERY_POINT_FILE, Recovery, RecoveryReport,
    RetentionReason, RetentionReport, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, SegmentFile, SyncHook,
};
pub use mmap::{
    DEFAULT_RESIDENT_BUDGET, PREALLOC_MAX_STEP, PREALLOC_MIN, set_resident_budget, trims,
};
pub use persist::PersistMode;
pub use segment::{INDEX_EXT, LOG_EXT, ReadSlice, TIME_INDEX_EXT};
