//! File descriptors: the node raises its own soft limit and splits what it has between the log
//! and connections, so that connections can never take the descriptors the log needs.
//!
//! A partition holds one descriptor (its active segment; sealed segments are mapped and their
//! files closed). A group holds a few (its WAL file and metadata), and a node needs some for
//! short-lived work (checkpoints, index files, snapshot transfers, the runtime). Connections get
//! at most half of the rest; partitions get what remains. A topic creation that would take the
//! node past its partition budget is refused (`INVALID_PARTITIONS`).

use std::io;

use crate::config::Config;

/// Descriptors a node keeps for short-lived work: checkpoints, index writes, snapshot files,
/// the runtime's own (epoll, eventfds, stdio).
pub const RESERVED_FDS: u64 = 256;
/// Descriptors each Raft group holds: its WAL segment file, `wal.meta`, and transient ones
/// while it rolls or checkpoints.
pub const FDS_PER_GROUP: u64 = 8;
/// Descriptors each hosted partition holds: its active segment file.
pub const FDS_PER_PARTITION: u64 = 1;

/// The process's descriptor limit and how this node splits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft limit before the node raised it.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// Client connections allowed at once (the configured maximum, or less if descriptors are
    /// short).
    pub client_connections: usize,
    /// Peer connections allowed at once.
    pub peer_connections: usize,
    /// Partitions this node can host.
    pub partitions: u64,
}

impl Descriptors {
    /// One line for the log and `runneld --check`.
    pub fn describe(&self) -> String {
        format!(
            "open files: soft limit {} (was {}, hard {}); this node hosts up to {} partitions with {} client and {} peer connections",
            self.soft,
            self.was,
            self.hard,
            self.partitions,
            self.client_connections,
            self.peer_connections
        )
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (before, now, hard).
pub fn raise_nofile() -> io::Result<(u64, u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let before = cur.current.unwrap_or(u64::MAX);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    if before >= hard {
        return Ok((before, before, hard));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: cur.maximum,
            maximum: cur.maximum,
        },
    )?;
    Ok((before, hard, hard))
}

/// How a node with `cfg` splits a soft limit of `soft` descriptors, sharing the process with
/// `nodes_in_process - 1` other nodes.
pub fn plan(cfg: &Config, was: u64, soft: u64, hard: u64) -> Descriptors {
    let share = u64::from(cfg.nodes_in_process.max(1));
    let mine = soft / share;
    let groups = u64::from(cfg.cluster.data_groups) + 1;
    let avail = mine.saturating_sub(RESERVED_FDS + groups * FDS_PER_GROUP);
    let (want_client, want_peer) = (
        cfg.connections.max_client as u64,
        cfg.connections.max_peer as u64,
    );
    let conn_cap = avail / 2;
    let (client, peer) = if want_client + want_peer <= conn_cap {
        (want_client, want_peer)
    } else {
        // Scale both down to fit, keeping their ratio; each keeps at least a few.
        let client = (conn_cap * want_client / (want_client + want_peer).max(1)).max(4);
        let peer = conn_cap.saturating_sub(client).max(4);
        (client.min(want_client), peer.min(want_peer))
    };
    Descriptors {
        was,
        soft,
        hard,
        client_connections: client as usize,
        peer_connections: peer as usize,
        partitions: avail.saturating_sub(client + peer) / FDS_PER_PARTITION,
    }
}

/// Raises the limit and plans this node's share; logs what it found.
pub fn prepare(cfg: &Config) -> Descriptors {
    let (was, soft, hard) = match raise_nofile() {
        Ok(v) => v,
        Err(e) => {
            let cur = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            let soft = cur.current.unwrap_or(u64::MAX);
            tracing::warn!(error = %e, soft, "cannot raise the open-files limit");
            (soft, soft, cur.maximum.unwrap_or(u64::MAX))
        }
    };
    plan(cfg, was, soft, hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_never_take_more_than_half_of_what_the_log_could_use() {
        let cfg = Config::default(); // 4096 client + 1024 peer, 3 data groups
        let d = plan(&cfg, 1024, 1024, 1024);
        let avail = 1024 - RESERVED_FDS - 4 * FDS_PER_GROUP;
        assert!(
            (d.client_connections + d.peer_connections) as u64 <= avail / 2 + 4,
            "{d:?}"
        );
        assert!(d.partitions >= avail / 2 - 4, "{d:?}");
        let roomy = plan(&cfg, 1024, 1 << 20, 1 << 20);
        assert_eq!(roomy.client_connections, 4096);
        assert_eq!(roomy.peer_connections, 1024);
        assert_eq!(
            roomy.partitions,
            (1 << 20) - RESERVED_FDS - 4 * FDS_PER_GROUP - 5120
        );
    }

    #[test]
    fn nodes_sharing_a_process_share_its_limit() {
        let cfg = Config {
            nodes_in_process: 3,
            ..Config::default()
        };
        let alone = plan(&Config::default(), 30_000, 30_000, 30_000);
        let shared = plan(&cfg, 30_000, 30_000, 30_000);
        assert!(
            shared.partitions * 3 <= alone.partitions,
            "{shared:?} {alone:?}"
        );
    }
}
