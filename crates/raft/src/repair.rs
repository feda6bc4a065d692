//! A replica that lost durable data catching up before it may vote again.
//!
//! Raft counts a follower's acknowledgement as a promise that the entry survives on its disk.
//! When a disk breaks that promise (a cut or corrupt WAL, a damaged checkpoint), the replica
//! opens with what is left, but until it has the lost entries back its vote could elect a
//! leader without them. So it neither campaigns nor grants votes until its log is committed up
//! to the higher of
//! - the committed index it had saved before the damage (the *floor*, kept durably in the WAL
//!   directory so a second crash mid-repair does not forget it), and
//! - the commit point reported by the first leader it accepts replication from (covering
//!   entries a quorum counted with this replica's lost acknowledgement).
//!
//! A leadership transfer to it stays allowed: openraft starts that election only once the
//! replica holds the leader's whole log, every committed entry included.
//!
//! A leader that once saw this replica hold entries it no longer has would take the shorter
//! log for a bug and stop. So before the replica answers a leader's replication it tells that
//! leader it went back (`Reverted`), and the leader restarts replication to it from scratch;
//! until then the leader's requests are answered `UNAVAILABLE` and retried.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use runnel_proto::raft as pb;
use tokio::sync::Notify;
use tonic::Status;

use crate::log_store::LogStore;
use crate::network::Router;
use crate::state_machine::Raft;

/// A leader by (term, node id).
type LeaderKey = (u64, u64);

#[derive(Debug, Default)]
struct Inner {
    active: AtomicBool,
    /// Leaders that were told this replica went back, and the one asking to be told.
    told: Mutex<Vec<LeaderKey>>,
    asking: Mutex<Option<LeaderKey>>,
    wake: Notify,
}

/// Whether a group on this node is catching up after a repair (shared with the transport).
#[derive(Debug, Clone, Default)]
pub(crate) struct CatchUp(Arc<Inner>);

impl CatchUp {
    /// True while the replica must not vote or campaign.
    pub(crate) fn active(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }

    /// Lets replication from the leader holding `vote` through once that leader knows this
    /// replica went back; until then asks for the announcement and answers `UNAVAILABLE`.
    pub(crate) fn check_announced(&self, vote: Option<&pb::Vote>) -> Result<(), Status> {
        if !self.active() {
            return Ok(());
        }
        let Some(l) = vote.and_then(|v| v.leader_id.as_ref()) else {
            return Ok(()); // malformed: the normal decoding refuses it
        };
        let key = (l.term, l.node_id);
        if self.0.told.lock().expect("catch-up lock").contains(&key) {
            return Ok(());
        }
        *self.0.asking.lock().expect("catch-up lock") = Some(key);
        self.0.wake.notify_one();
        Err(Status::unavailable(format!(
            "repaired replica: telling leader {} (term {}) that its log went back first",
            l.node_id, l.term
        )))
    }
}

/// Starts catch-up for a group whose WAL holds a floor: elections off, votes refused, until
/// the log is committed past the floor and the leader's commit point; then clears the floor.
pub(crate) fn start(
    group_id: u64,
    raft: Raft,
    log: LogStore,
    router: Router,
    floor: u64,
) -> CatchUp {
    let gate = CatchUp::default();
    gate.0.active.store(true, Ordering::Release);
    raft.runtime_config().elect(false);
    let me = raft.metrics().borrow_watched().id;
    tracing::warn!(
        group = group_id,
        floor,
        "replica repaired: not voting until caught up"
    );
    tokio::spawn(announce(group_id, me, raft.clone(), router, gate.clone()));
    let g = gate.clone();
    tokio::spawn(async move {
        let mut rx = raft.metrics();
        let mut target: Option<u64> = None;
        loop {
            {
                let m = rx.borrow_watched();
                if target.is_none()
                    && m.current_leader.is_some_and(|l| l != me)
                    && let Some(c) = &m.cluster_committed
                {
                    let t = c.index.max(floor);
                    target = Some(t);
                    tracing::info!(
                        group = group_id,
                        target = t,
                        "repaired replica follows a leader"
                    );
                }
                let local = m.local_committed.as_ref().map(|l| l.index);
                if let Some(t) = target
                    && local.is_some_and(|l| l >= t)
                {
                    break;
                }
            }
            if rx.changed().await.is_err() {
                return; // the group shut down; the floor stays for the next start
            }
        }
        match tokio::task::spawn_blocking(move || log.wal().set_catch_up_floor(None)).await {
            Ok(Ok(())) => {
                g.0.active.store(false, Ordering::Release);
                g.0.wake.notify_one();
                raft.runtime_config().elect(true);
                tracing::info!(group = group_id, "repaired replica caught up: voting again");
            }
            Ok(Err(e)) => {
                tracing::error!(group = group_id, error = %e, "cannot clear the catch-up floor")
            }
            Err(e) => tracing::error!(group = group_id, error = %e, "catch-up task failed"),
        }
    });
    gate
}

/// Tells each leader that asks (by sending replication) that this replica went back.
async fn announce(group_id: u64, me: u64, raft: Raft, router: Router, gate: CatchUp) {
    let mut rx = raft.metrics();
    while gate.active() {
        let asking = *gate.0.asking.lock().expect("catch-up lock");
        let told = gate.0.told.lock().expect("catch-up lock").clone();
        match asking {
            Some(key @ (_, leader)) if !told.contains(&key) => {
                let addr = rx
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_node(&leader)
                    .map(|n| n.addr.clone());
                if let Some(addr) = addr {
                    router.set_peer(leader, &addr); // configured addresses still win
                }
                match router.announce_reverted(leader, group_id, me).await {
                    Ok(()) => {
                        tracing::info!(
                            group = group_id,
                            leader,
                            "leader knows this replica went back"
                        );
                        gate.0.told.lock().expect("catch-up lock").push(key);
                    }
                    Err(e) => {
                        tracing::debug!(group = group_id, leader, error = %e, "announcement refused");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            _ => {
                tokio::select! {
                    _ = gate.0.wake.notified() => {}
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        }
    }
}
