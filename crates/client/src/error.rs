//! The client's error type.

use runnel_proto::api::{self, ErrorCode};

/// A failed client call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server answered with an in-band error code.
    #[error("{code:?}: {message}")]
    Server {
        /// The code (docs/API.md).
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The call failed at the gRPC level (connection, malformed request, limit).
    #[error("gRPC {code:?}: {message}")]
    Transport {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// Retries ran out of time; for a produce the outcome is unknown.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The caller asked for something invalid.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The producer was closed before the record was sent.
    #[error("producer closed")]
    Closed,
}

impl Error {
    /// From an in-band error.
    pub fn from_api(e: &api::Error) -> Self {
        Error::Server {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::UnknownServerError),
            message: e.message.clone(),
        }
    }

    /// The in-band code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying the same call (idempotently) may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Server { code, .. } => retriable_code(*code),
            Error::Transport { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::Aborted
                    | tonic::Code::Internal
            ),
            Error::Timeout(_) => true,
            Error::Invalid(_) | Error::Closed => false,
        }
    }
}

/// Codes a client retries (after a backoff, or at once at a `NOT_LEADER` hint).
pub fn retriable_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NotLeader
            | ErrorCode::LeaderNotAvailable
            | ErrorCode::NotReady
            | ErrorCode::RequestTimedOut
            | ErrorCode::UnknownServerError
            | ErrorCode::StorageError
    )
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Transport {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}
