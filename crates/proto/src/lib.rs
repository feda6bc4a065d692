//! Runnel's protobuf types and gRPC services, generated from `proto/` at build time, plus the
//! two rules of the wire contract every client and server must share: which topic names are
//! valid, and how a key picks a partition.
//!
//! Conversions to domain types live with the crate that owns the domain type (e.g.
//! `runnel-raft`'s codec).

/// `proto/raft.proto`: the Raft transport, log entries, state-machine commands and the
/// metadata log's records.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod raft {
    tonic::include_proto!("runnel.raft.v1");
}

/// `proto/runnel.proto`: the client API (Broker and Admin services).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("runnel.v1");

    /// Encoded file descriptors of every `proto/` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}

pub mod partitioner;
pub mod topic;
pub mod wire;
