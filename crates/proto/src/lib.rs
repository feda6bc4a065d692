//! Runnel's protobuf types and gRPC services, plus the two rules of the wire contract every
//! client and server must share: which topic names are valid, and how a key picks a partition.
//!
//! The types are generated from `proto/` into `src/generated/` and checked in, so that no crate
//! that depends on this one builds a protobuf compiler; `tests/generated.rs` fails when they
//! differ from what `proto/` compiles to, and rewrites them on request.
//!
//! Conversions to domain types live with the crate that owns the domain type (e.g.
//! `runnel-raft`'s codec).

/// `proto/raft.proto`: the Raft transport, log entries, state-machine commands and the
/// metadata log's records.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod raft {
    include!("generated/runnel.raft.v1.rs");
}

/// `proto/runnel.proto`: the client API (Broker and Admin services).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    include!("generated/runnel.v1.rs");

    /// Encoded file descriptors of every `proto/` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/descriptors.bin");
}

pub mod partitioner;
pub mod topic;
pub mod wire;
