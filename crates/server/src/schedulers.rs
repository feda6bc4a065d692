//! The background schedulers of a node: the partition reconciler, the leader balancer,
//! retention and checkpoints. Each runs on the groups this node leads (or hosts) and stops when
//! the node does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runnel_proto::raft as pb;
use runnel_raft::RaftHost;
use tokio::sync::watch;

use crate::metadata::{META_GROUP, META_PARTITION};
use crate::placement::preferred_leader;
use crate::service::{Shared, now_ms};

async fn tick(every: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(every) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// On each group this node leads: create the partitions the metadata assigns to it and delete
/// the ones of deleted topics. Group 0's leader creates the metadata partition itself.
pub(crate) async fn reconcile_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let host = Arc::clone(&shared.host);
    let mut meta = shared.meta.clone();
    loop {
        for g in host.groups() {
            if !host.metrics(g).is_some_and(|m| m.ready) {
                continue;
            }
            let Some(store) = host.store(g) else { continue };
            let mut cmds = Vec::new();
            if g == META_GROUP {
                if store.offsets(META_PARTITION).is_none() {
                    cmds.push(create(META_PARTITION, -1, -1, 4 << 20));
                }
            } else {
                let img = Arc::clone(&meta.borrow());
                let want = img.partitions_of_group(g);
                let have = store.partitions();
                for (pid, s) in &want {
                    if !have.contains(pid) {
                        cmds.push(create(
                            *pid,
                            s.retention_ms,
                            s.retention_bytes,
                            s.segment_bytes,
                        ));
                    }
                }
                for pid in have {
                    // Ids below the counter were assigned once; absent now means deleted. An
                    // id at or above it belongs to a topic this node has not replayed yet.
                    if !want.contains_key(&pid) && pid < img.next_partition_id {
                        cmds.push(pb::Command {
                            kind: Some(pb::command::Kind::DeletePartition(pb::DeletePartition {
                                partition_id: pid,
                            })),
                        });
                    }
                }
            }
            for c in cmds {
                if let Err(e) = host.write(g, c).await {
                    tracing::debug!(group = g, error = %e, "reconcile write");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = meta.changed() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn create(partition_id: u64, retention_ms: i64, retention_bytes: i64, segment: u64) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::CreatePartition(pb::CreatePartition {
            spec: Some(pb::PartitionSpec {
                partition_id,
                segment_bytes: segment,
                retention_ms,
                retention_bytes,
            }),
        })),
    }
}

/// Hysteresis for the leader balancer: a group's preferred replica must have been caught up at
/// every check for a whole interval before it is handed the group. A replica that has just come
/// back may be flapping, and a transfer to a node that dies meanwhile costs the group an election.
#[derive(Default)]
struct Settled(HashMap<u64, (u64, Instant)>);

impl Settled {
    /// Records one check of group `g`; true once `pref` has been caught up since `every` ago.
    fn observe(
        &mut self,
        g: u64,
        pref: u64,
        caught_up: bool,
        now: Instant,
        every: Duration,
    ) -> bool {
        if !caught_up {
            self.0.remove(&g);
            return false;
        }
        let since = self.0.entry(g).or_insert((pref, now));
        if since.0 != pref {
            *since = (pref, now);
        }
        now.duration_since(since.1) >= every
    }

    /// Forgets group `g` (this node no longer balances it).
    fn forget(&mut self, g: u64) {
        self.0.remove(&g);
    }
}

/// Hands each group this node leads to its preferred leader once that node has stayed caught up
/// for an interval, so leadership spreads evenly again after failures.
pub(crate) async fn balance_loop(
    shared: Arc<Shared>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let host = Arc::clone(&shared.host);
    let me = host.node_id();
    let mut last_try: HashMap<u64, Instant> = HashMap::new();
    let mut settled = Settled::default();
    while tick(every, &mut stop).await {
        for g in host.groups() {
            let Some(m) = host.metrics(g) else {
                settled.forget(g);
                continue;
            };
            if m.leader != Some(me) || !m.ready {
                settled.forget(g);
                continue;
            }
            let voters: Vec<u64> = m.voters.iter().copied().collect();
            let Some(pref) = preferred_leader(g, &voters) else {
                continue;
            };
            if pref == me {
                settled.forget(g);
                continue;
            }
            let caught_up = matches!(
                (m.replication.get(&pref), m.last_log),
                (Some(Some(matched)), Some(last)) if *matched + 16 >= last
            );
            if !settled.observe(g, pref, caught_up, Instant::now(), every)
                || last_try.get(&g).is_some_and(|t| t.elapsed() < every * 3)
            {
                continue;
            }
            last_try.insert(g, Instant::now());
            tracing::info!(
                group = g,
                to = pref,
                "handing leadership to the preferred leader"
            );
            if let Err(e) = host.transfer_leader(g, pref).await {
                tracing::debug!(group = g, error = %e, "leader transfer");
            }
        }
    }
}

/// The clock time-based retention is judged against: the earlier of the wall clock and the
/// wall clock at start plus the monotonic time since, so a forward step of this node's clock
/// never ages data (a backward one only delays retention). A step larger than `jump_max` is
/// logged.
struct RetentionClock {
    wall_at_start: i64,
    started: Instant,
    jump_max: Duration,
    warned: bool,
}

impl RetentionClock {
    fn new(jump_max: Duration) -> Self {
        RetentionClock {
            wall_at_start: now_ms(),
            started: Instant::now(),
            jump_max,
            warned: false,
        }
    }

    /// The time to judge retention by, given the wall clock `wall` and the monotonic `mono`.
    fn judge(&mut self, wall: i64, mono: Instant) -> i64 {
        let elapsed = mono.duration_since(self.started).as_millis() as i64;
        let guarded = self.wall_at_start.saturating_add(elapsed);
        let step = wall.saturating_sub(guarded);
        if step.unsigned_abs() > self.jump_max.as_millis() as u64 {
            if !self.warned {
                tracing::warn!(
                    step_ms = step,
                    wall,
                    guarded,
                    "the wall clock stepped against the monotonic clock: time-based retention \
                     follows the monotonic clock, not the step, until the node restarts"
                );
                self.warned = true;
            }
        } else {
            self.warned = false;
        }
        wall.min(guarded)
    }
}

/// The time a quorum of clocks agrees has at least passed: the lower median of this node's
/// (guarded) clock and the peers' that answered, and never later than this node's own; `None`
/// when fewer than a majority of the `cluster` nodes answered. One clock stepped forward, even
/// one that was wrong when its node started, cannot make data look old.
pub fn quorum_clock(own: i64, peers: &[i64], cluster: usize) -> Option<i64> {
    let mut all: Vec<i64> = std::iter::once(own).chain(peers.iter().copied()).collect();
    if all.len() < cluster / 2 + 1 {
        return None;
    }
    all.sort_unstable();
    Some(all[(all.len() - 1) / 2].min(own))
}

/// On each group this node leads and can serve: asks each partition's log what retention is
/// due and proposes it (`TrimLog`), so every replica deletes the same records. Age is judged
/// by [`quorum_clock`]; without a quorum of clocks only size-based retention runs.
pub(crate) async fn retention_loop(
    shared: Arc<Shared>,
    every: Duration,
    jump_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let host = Arc::clone(&shared.host);
    let mut clock = RetentionClock::new(jump_max);
    while tick(every, &mut stop).await {
        let own = clock.judge(now_ms(), Instant::now());
        let leads = host
            .groups()
            .into_iter()
            .any(|g| host.metrics(g).is_some_and(|m| m.ready));
        if !leads {
            continue;
        }
        let peers = shared.peer_clocks(Duration::from_secs(2)).await;
        let cluster = shared.cfg.cluster.nodes.len().max(peers.len() + 1);
        let now = quorum_clock(own, &peers, cluster).unwrap_or_else(|| {
            tracing::warn!(
                answered = peers.len(),
                cluster,
                "no quorum of clocks: time-based retention waits, size-based retention runs"
            );
            i64::MIN // nothing is old against the beginning of time
        });
        for g in host.groups() {
            if !host.metrics(g).is_some_and(|m| m.ready) {
                continue;
            }
            let Some(store) = host.store(g) else { continue };
            for t in store.retention_proposals(now) {
                let (p, start) = (t.partition_id, t.log_start);
                let cmd = pb::Command {
                    kind: Some(pb::command::Kind::TrimLog(t)),
                };
                match host.write(g, cmd).await {
                    Ok(_) => tracing::info!(
                        group = g,
                        partition = p,
                        log_start = start,
                        "retention moved the log start on every replica"
                    ),
                    Err(e) => {
                        tracing::debug!(group = g, partition = p, error = %e, "retention write");
                        break;
                    }
                }
            }
        }
    }
}

pub(crate) async fn checkpoint_loop(
    host: Arc<RaftHost>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while tick(every, &mut stop).await {
        for g in host.groups() {
            let Some(m) = host.metrics(g) else { continue };
            if m.applied > m.snapshot
                && let Err(e) = host.checkpoint(g).await
            {
                tracing::warn!(group = g, error = %e, "scheduled checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancer_waits_until_the_preferred_replica_stayed_caught_up_an_interval() {
        let every = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Settled::default();
        assert!(!s.observe(1, 3, true, at(0), every), "just caught up");
        assert!(!s.observe(1, 3, true, at(4), every));
        assert!(
            s.observe(1, 3, true, at(5), every),
            "caught up a whole interval"
        );
        // Falling behind once starts the wait over.
        assert!(!s.observe(1, 3, false, at(6), every));
        assert!(!s.observe(1, 3, true, at(7), every));
        assert!(s.observe(1, 3, true, at(12), every));
        // Another preferred replica (membership changed) starts over too, per group.
        assert!(!s.observe(1, 2, true, at(13), every));
        assert!(!s.observe(2, 3, true, at(13), every));
        assert!(s.observe(1, 2, true, at(18), every));
        s.forget(1);
        assert!(!s.observe(1, 2, true, at(19), every));
    }

    #[test]
    fn one_clock_ahead_cannot_age_data_and_no_quorum_means_no_time() {
        const DAY: i64 = 24 * 3600 * 1000;
        let t = 1_700_000_000_000;
        // This node 8 days ahead (even from its start): the peers win.
        assert_eq!(quorum_clock(t + 8 * DAY, &[t, t + 5], 3), Some(t + 5));
        assert_eq!(quorum_clock(t + 8 * DAY, &[t], 3), Some(t), "one peer down");
        // A peer ahead: never later than our own clock.
        assert_eq!(quorum_clock(t, &[t + 8 * DAY, t + 1], 3), Some(t));
        // Behind only delays.
        assert_eq!(quorum_clock(t, &[t - DAY, t - DAY], 3), Some(t - DAY));
        // No majority of clocks: no time-based judgement.
        assert_eq!(quorum_clock(t, &[], 3), None);
        assert_eq!(quorum_clock(t, &[t], 5), None);
        assert_eq!(quorum_clock(t, &[], 1), Some(t));
    }
}
