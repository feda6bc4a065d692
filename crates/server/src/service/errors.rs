//! Mapping Raft and storage outcomes to the API's in-band error codes.

use runnel_proto::api::{self, ErrorCode};
use runnel_raft::{ApplyError, ReadError};
use runnel_storage::StorageError;

use super::error;

pub(super) fn refused(e: ApplyError, m: String) -> api::Error {
    let code = match e {
        ApplyError::UnknownPartition => ErrorCode::LeaderNotAvailable,
        ApplyError::PartitionExists => ErrorCode::InvalidRequest,
        ApplyError::OutOfOrderSequence => ErrorCode::OutOfOrderSequence,
        ApplyError::FencedProducer => ErrorCode::FencedProducer,
        ApplyError::OffsetOutOfRange => ErrorCode::OffsetOutOfRange,
        ApplyError::OffsetConflict => ErrorCode::OffsetConflict,
        ApplyError::CorruptBatch => ErrorCode::CorruptBatch,
        ApplyError::InvalidRequest => ErrorCode::InvalidRequest,
    };
    error(code, m)
}

pub(super) fn read_error(e: ReadError) -> api::Error {
    match e {
        ReadError::UnknownPartition(p) => error(
            ErrorCode::LeaderNotAvailable,
            format!("partition {p} is not (yet) in this replica"),
        ),
        ReadError::Storage(StorageError::OffsetOutOfRange {
            offset,
            log_start,
            log_end,
        }) => error(
            ErrorCode::OffsetOutOfRange,
            format!("offset {offset} outside [{log_start}, {log_end}]"),
        ),
        ReadError::Storage(e) => error(ErrorCode::StorageError, e.to_string()),
    }
}
