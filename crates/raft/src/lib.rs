//! Runnel's replication: one openraft group per partition group.
//!
//! It owns every openraft type (none leaves this crate's public API except through the host
//! API's own types): the type configuration, the protobuf codec for entries, votes and RPCs,
//! the log store over the storage crate's WAL, the state machine over a group's partitions,
//! checkpoint snapshots, and the gRPC transport. It must not know about the client-facing API.

mod codec;
pub mod host;
pub mod listener;
pub mod log_store;
pub mod network;
mod repair;
pub mod state_machine;
mod transport;
pub mod types;

pub use host::{GroupMetrics, HostConfig, HostError, Proposal, RaftHost, WriteError, Written};
pub use log_store::LogStore;
pub use state_machine::{Checkpoint, DamageSignal, GroupStore, ReadError, StateMachine};
pub use types::{ApplyError, ApplyResult, Cmd, NodeAddr, TypeConfig};
