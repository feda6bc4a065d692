//! `runneld`, a Runnel node: the client API (`runnel.v1.Broker`, `runnel.v1.Admin`, gRPC health
//! and reflection) over this node's Raft groups, the metadata group that assigns partitions to
//! data groups, and the background schedulers.
//!
//! ```text
//!  client ──gRPC──▶ Api (service/) ──write──▶ RaftHost group g ──quorum──▶ apply ▶ segments
//!                     │  reads ◀── GroupStore (high watermark, long-poll)
//!                     └─ MetaImage ◀── metadata::follow ◀── group 0, partition 0 (the metadata log)
//! ```

pub mod config;
pub mod fdlimit;
mod late;
pub mod metadata;
pub mod node;
pub mod order;
pub mod placement;
mod schedulers;
pub mod service;
pub mod storage_health;
pub mod subscribe;

pub use config::Config;
pub use node::{Node, StartError};
