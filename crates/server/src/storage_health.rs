//! The node's storage watch: free space against a floor, Raft groups stopped by a storage
//! failure, and damaged data found while serving.
//!
//! A node whose storage cannot serve says so (gRPC health `NOT_SERVING`, `ClusterStatus`, the
//! log), gives up its leaderships, and heals by itself when it can:
//!
//! | what | seen as | done |
//! |---|---|---|
//! | free space below `storage.min_free_bytes` | statvfs | writes refused (`STORAGE_ERROR`), leaderships handed away, `NOT_SERVING` until space returns |
//! | a group stopped by `ENOSPC`/`EDQUOT`/`EMFILE`/`ENFILE` | the group's Raft core stopped | `NOT_SERVING`; once space is back above the floor (or, for descriptors, at once with backoff) the group is reopened from disk and catches up |
//! | a group stopped on damaged durable data (`corruption in …`) | the same | reopened to verify its checkpoint and repair from a replica |
//! | a group stopped by anything else (an fsync failed, a bug) | the same | fatal: the node stops so that systemd, Compose or Kubernetes restarts it and recovery runs from disk |
//! | damage found by a read or a checkpoint | [`GroupStore::damage_found`] | leadership handed to a healthy replica, then the group is reopened to verify its checkpoint and rebuild what is damaged from a replica |
//!
//! [`GroupStore::damage_found`]: runnel_raft::GroupStore::damage_found

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use runnel_raft::RaftHost;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a group's Raft core stopped, as far as healing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The file system is full (`ENOSPC`, `EDQUOT`): reopen once space is back.
    NoSpace,
    /// Out of file descriptors (`EMFILE`, `ENFILE`): reopen after a backoff.
    NoDescriptors,
    /// Durable data failed its checks (a damaged checkpoint or segment met by Raft itself):
    /// reopen to repair from a replica.
    Damaged,
    /// Anything else: not safe to continue in this process.
    Fatal,
}

/// Classifies the error a group stopped with by the OS error it carries.
pub fn classify(error: &str) -> StopCause {
    const NO_SPACE: [&str; 2] = ["(os error 28)", "(os error 122)"];
    const NO_FDS: [&str; 2] = ["(os error 24)", "(os error 23)"];
    if NO_SPACE.iter().any(|e| error.contains(e)) {
        StopCause::NoSpace
    } else if NO_FDS.iter().any(|e| error.contains(e)) {
        StopCause::NoDescriptors
    } else if error.contains("corruption in ") {
        StopCause::Damaged
    } else {
        StopCause::Fatal
    }
}

/// What the storage watch last saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Why this node cannot serve right now; empty when it can.
    pub problems: Vec<String>,
    /// Free bytes on the data directory's file system at the last check.
    pub free_bytes: u64,
    /// Free space is below the floor: writes are refused.
    pub low_space: bool,
    /// Reads or checkpoints that found damaged data since start (all groups).
    pub damaged_reads: u64,
    /// Groups reopened after a transient failure or to repair them, since start.
    pub group_restarts: u64,
    /// Set when a storage failure is fatal: the node must stop.
    pub fatal: Option<String>,
}

/// The node's storage state, shared with the API (write refusals, cluster status, health).
#[derive(Debug)]
pub struct StorageHealth {
    status: watch::Sender<Status>,
    /// Damage counted from stores that were since reopened.
    damaged_before: AtomicU64,
    restarts: AtomicU64,
}

impl Default for StorageHealth {
    fn default() -> Self {
        StorageHealth {
            status: watch::channel(Status::default()).0,
            damaged_before: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        }
    }
}

impl StorageHealth {
    /// The last status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Watches the status.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// `Some(why)` while new writes must be refused (free space below the floor).
    pub fn refuse_writes(&self) -> Option<String> {
        let s = self.status.borrow();
        s.low_space.then(|| {
            s.problems
                .first()
                .cloned()
                .unwrap_or_else(|| "disk below its free-space floor".into())
        })
    }
}

/// Per-group bookkeeping of the watch.
#[derive(Default)]
struct GroupWatch {
    /// Earliest next restart attempt, and the backoff after it.
    next_try: Option<(Instant, Duration)>,
    /// Last leadership hand-off attempt (low space).
    last_handoff: Option<Instant>,
    /// Last failure to reopen.
    open_error: Option<String>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const HANDOFF_EVERY: Duration = Duration::from_secs(5);
const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// What the storage watch looks at, and how often.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Every group this node hosts (0..=data groups).
    pub groups: Vec<u64>,
    /// The data directory (its file system's free space is checked).
    pub data_dir: std::path::PathBuf,
    /// `storage.min_free_bytes`.
    pub min_free_bytes: u64,
    /// `storage.check_ms`.
    pub every: Duration,
}

/// Watches storage until `stop`, updating `health` and calling `on_serving(bool)` when the
/// node's serving state changes.
pub async fn watch_loop(
    host: Arc<RaftHost>,
    cfg: WatchConfig,
    health: Arc<StorageHealth>,
    on_serving: impl Fn(bool) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let WatchConfig {
        groups,
        data_dir,
        min_free_bytes,
        every,
    } = cfg;
    let me = host.node_id();
    let mut w: HashMap<u64, GroupWatch> = HashMap::new();
    let mut serving = true;
    loop {
        let mut problems = Vec::new();
        let free = {
            let d = data_dir.clone();
            tokio::task::spawn_blocking(move || runnel_storage::fsutil::free_bytes(&d))
                .await
                .ok()
                .and_then(Result::ok)
        };
        let low = free.is_some_and(|f| f < min_free_bytes);
        if low {
            problems.push(format!(
                "free space on {} is {} bytes, below the floor of {min_free_bytes} \
                 (storage.min_free_bytes): new writes are refused",
                data_dir.display(),
                free.unwrap_or(0)
            ));
        }
        let mut fatal = None;
        // Set when the failure may hit every group here (a full disk, a stopped group).
        let mut give_up = low;
        let mut damaged = health.damaged_before.load(Ordering::Relaxed);
        for &g in &groups {
            let gw = w.entry(g).or_default();
            let m = host.metrics(g);
            if let Some(store) = host.store(g) {
                damaged += store.damage_count();
            }
            let (cause, why) = match &m {
                None => (
                    Some(StopCause::NoSpace),
                    format!(
                        "group {g} is closed after a storage failure: {}",
                        gw.open_error.as_deref().unwrap_or("reopening")
                    ),
                ),
                Some(m) => match &m.stopped {
                    Some(e) => (
                        Some(classify(e)),
                        format!("group {g} stopped on a storage failure: {e}"),
                    ),
                    None => (None, String::new()),
                },
            };
            match cause {
                Some(StopCause::Fatal) => {
                    give_up = true;
                    fatal = Some(why.clone());
                    problems.push(why);
                    continue;
                }
                Some(c) => {
                    give_up |= c != StopCause::Damaged;
                    problems.push(why.clone());
                    let space_back = c != StopCause::NoSpace || !low;
                    let due = gw.next_try.is_none_or(|(t, _)| Instant::now() >= t);
                    if space_back && due {
                        let backoff = gw
                            .next_try
                            .map_or(BACKOFF_MIN, |(_, b)| (b * 2).min(BACKOFF_MAX));
                        gw.next_try = Some((Instant::now() + backoff, backoff));
                        if let Some(store) = host.store(g) {
                            health
                                .damaged_before
                                .fetch_add(store.damage_count(), Ordering::Relaxed);
                        }
                        let verify = c == StopCause::Damaged;
                        match host.restart_group(g, verify, &why).await {
                            Ok(()) => {
                                health.restarts.fetch_add(1, Ordering::Relaxed);
                                gw.next_try = None;
                                gw.open_error = None;
                                tracing::warn!(group = g, "group reopened after a storage failure");
                            }
                            Err(e) => {
                                tracing::error!(group = g, error = %e, "cannot reopen group yet");
                                gw.open_error = Some(e.to_string());
                            }
                        }
                    }
                    continue;
                }
                None => {}
            }
            let Some(m) = m else { continue };
            let store = host.store(g);
            let damage = store
                .as_ref()
                .and_then(|s| s.damage_found().borrow().clone());
            if let Some(reason) = damage {
                problems.push(format!(
                    "group {g}: damaged data found, repairing: {reason}"
                ));
                if m.leader == Some(me) {
                    hand_off(&host, g, HANDOFF_WAIT).await;
                }
                if let Some(s) = &store {
                    health
                        .damaged_before
                        .fetch_add(s.damage_count(), Ordering::Relaxed);
                }
                let why = format!("damaged data found while serving: {reason}");
                match host.restart_group(g, true, &why).await {
                    Ok(()) => {
                        health.restarts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(group = g, "group reopened to repair damaged data");
                    }
                    Err(e) => {
                        tracing::error!(group = g, error = %e, "cannot reopen damaged group yet");
                        gw.open_error = Some(e.to_string());
                        gw.next_try = Some((Instant::now() + BACKOFF_MIN, BACKOFF_MIN));
                    }
                }
                continue;
            }
        }
        // A node whose storage cannot serve leads nothing: hand every group it still leads to
        // another replica (a full disk, or a group stopped on a failure that may hit the others).
        if give_up {
            for &g in &groups {
                let gw = w.entry(g).or_default();
                let leads = host
                    .metrics(g)
                    .is_some_and(|m| m.leader == Some(me) && m.stopped.is_none());
                if leads && gw.last_handoff.is_none_or(|t| t.elapsed() >= HANDOFF_EVERY) {
                    gw.last_handoff = Some(Instant::now());
                    hand_off(&host, g, Duration::ZERO).await;
                }
            }
        }
        let status = Status {
            problems,
            free_bytes: free.unwrap_or(0),
            low_space: low,
            damaged_reads: damaged,
            group_restarts: health.restarts.load(Ordering::Relaxed),
            fatal,
        };
        let now_serving = status.problems.is_empty();
        if now_serving != serving {
            serving = now_serving;
            if serving {
                tracing::info!(node = me, "storage healthy again: serving");
            } else {
                tracing::error!(node = me, problems = ?status.problems, "storage cannot serve: NOT_SERVING");
            }
            on_serving(serving);
        }
        health.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Hands the leadership of `g` to the follower that holds the most of its log, then waits up
/// to `wait` for it to go.
async fn hand_off(host: &RaftHost, g: u64, wait: Duration) {
    let me = host.node_id();
    let Some(m) = host.metrics(g) else { return };
    let best = m
        .replication
        .iter()
        .filter(|(id, _)| **id != me && m.voters.contains(id))
        .max_by_key(|(_, matched)| **matched)
        .map(|(id, _)| *id);
    let Some(to) = best else { return };
    tracing::warn!(
        group = g,
        to,
        "handing leadership away: this node's storage cannot serve"
    );
    if let Err(e) = host.transfer_leader(g, to).await {
        tracing::debug!(group = g, error = %e, "leader hand-off");
        return;
    }
    if !wait.is_zero() {
        let _ = host
            .wait_until(g, wait, "leadership to move", |m| m.leader != Some(me))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_causes_are_told_apart_by_os_error() {
        let enospc = std::io::Error::from_raw_os_error(28).to_string();
        let emfile = std::io::Error::from_raw_os_error(24).to_string();
        let eio = std::io::Error::from_raw_os_error(5).to_string();
        assert_eq!(
            classify(&format!("when Write Log: write wal: {enospc}")),
            StopCause::NoSpace
        );
        assert_eq!(
            classify(&format!("open: {emfile}")),
            StopCause::NoDescriptors
        );
        assert_eq!(
            classify(&format!("fdatasync of x: {eio}")),
            StopCause::Fatal
        );
        assert_eq!(classify("panicked"), StopCause::Fatal);
        assert_eq!(
            classify("read manifest: corruption in /d/MANIFEST at byte 0: bad CRC"),
            StopCause::Damaged
        );
    }
}
