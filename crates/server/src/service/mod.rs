//! The client API: `runnel.v1.Broker` and `runnel.v1.Admin` over this node's groups.
//!
//! Every domain outcome is an in-band [`api::Error`] (absent on success); only a request that
//! is malformed as a whole gets a gRPC status (`INVALID_ARGUMENT`). Every size, count and wait
//! from the wire is checked against a named limit in [`crate::config::Limits`] first.
//!
//! One file per call family (`produce`, `fetch`, `offsets`, `producer_ids`, `metadata`,
//! `topic_admin`, `cluster_admin`), the shared parts beside them (`shared`, `resolve`,
//! `forward`, `errors`), and the two gRPC traits as tables of calls (`broker`, `admin`). A new
//! call goes into the family file it belongs to, or a new one, plus one line in its table.

mod admin;
mod broker;
mod cluster_admin;
mod errors;
mod fetch;
mod forward;
mod metadata;
mod offsets;
mod produce;
mod producer_ids;
mod resolve;
mod shared;
mod topic_admin;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use runnel_proto::api::{self, ErrorCode};

pub use shared::Shared;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An in-band error.
pub fn error(code: ErrorCode, message: impl Into<String>) -> api::Error {
    api::Error {
        code: code as i32,
        message: message.into(),
        leader: None,
    }
}

/// The Broker and Admin services of one node.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// Services over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Api { shared }
    }
}
