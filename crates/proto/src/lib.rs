//! Runnel's protobuf types and gRPC services, generated from `proto/` at build time.
//!
//! This crate holds generated code only: no logic, no conversions (those live with the crate
//! that owns the domain type, e.g. `runnel-raft`'s codec).

/// `proto/raft.proto`: the Raft transport, log entries and state-machine commands.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod raft {
    tonic::include_proto!("runnel.raft.v1");
}
