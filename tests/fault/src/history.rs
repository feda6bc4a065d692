//! Everything a run did, with times: sends, polls, commits, consumer restarts, faults and the
//! final reads. Saved as JSON next to the node logs when a run fails.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// How a send or commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused before anything was written (the server guarantees it is not in the log).
    Fail,
    /// Timed out or lost: it may or may not be in the log.
    Unknown,
}

/// One produced value.
#[derive(Debug, Clone, Serialize)]
pub struct Send {
    /// Producer index.
    pub producer: u32,
    /// The unique value (also the key).
    pub value: String,
    /// Ms since the run began, when the send was invoked.
    pub invoke: f64,
    /// Ms since the run began, when it completed.
    pub complete: f64,
    /// How it ended.
    pub outcome: Outcome,
    /// Partition and offset the acknowledgement named.
    pub acked_at: Option<(u32, i64)>,
    /// The error, when not acknowledged.
    pub error: Option<String>,
}

/// One poll of one partition by one consumer incarnation.
#[derive(Debug, Clone, Serialize)]
pub struct Poll {
    /// Consumer index.
    pub consumer: u32,
    /// Which start of that consumer (0, then 1 after its first crash, …).
    pub incarnation: u32,
    /// Partition.
    pub partition: u32,
    /// The consumer's position before the poll.
    pub from: i64,
    /// Offsets and values returned, in order.
    pub records: Vec<(i64, String)>,
    /// Ms since the run began.
    pub time: f64,
}

/// One offset commit.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    /// Consumer (and group) index.
    pub consumer: u32,
    /// Partition.
    pub partition: u32,
    /// The committed next offset to consume.
    pub offset: i64,
    /// Ms since the run began, at invoke.
    pub invoke: f64,
    /// Ms since the run began, at completion.
    pub complete: f64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A consumer restarting: where its group's committed offset told it to resume.
#[derive(Debug, Clone, Serialize)]
pub struct Resume {
    /// Consumer index.
    pub consumer: u32,
    /// The new incarnation.
    pub incarnation: u32,
    /// Partition.
    pub partition: u32,
    /// The committed offset read (-1: none).
    pub committed: i64,
    /// Ms since the run began.
    pub time: f64,
}

/// A fault injected or healed.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// Ms since the run began.
    pub time: f64,
    /// What: `kill`, `restart`, `term`, `pause`, `resume`, `cut`, `heal`, `flaky`, `surgery`,
    /// `consumer-kill`.
    pub kind: String,
    /// On what (node ids, links, files).
    pub target: String,
    /// The number of nodes faulty right after this event.
    pub faulty_nodes: u32,
    /// Whether this takes a leader away (kill, pause, isolation): failover times start here.
    pub leader_kill: bool,
    /// The partitions that leader led (failover ends at the next acknowledged write to one).
    pub partitions: Vec<u32>,
}

/// What one source (the leader, or one node's own replica) holds for a partition at the end.
#[derive(Debug, Clone, Serialize)]
pub struct FinalRead {
    /// `leader` or `node-N`.
    pub source: String,
    /// Partition.
    pub partition: u32,
    /// Log start offset.
    pub log_start: i64,
    /// High watermark (this source's).
    pub high_watermark: i64,
    /// Offsets and values, in order.
    pub records: Vec<(i64, String)>,
}

/// A run's whole history.
#[derive(Debug, Default, Clone, Serialize)]
pub struct History {
    /// Sends.
    pub sends: Vec<Send>,
    /// Polls.
    pub polls: Vec<Poll>,
    /// Commits.
    pub commits: Vec<Commit>,
    /// Consumer restarts.
    pub resumes: Vec<Resume>,
    /// Faults.
    pub faults: Vec<Fault>,
    /// Final reads.
    pub finals: Vec<FinalRead>,
    /// Each consumer group's committed offsets at the end: (consumer, partition, offset).
    pub final_commits: Vec<(u32, u32, i64)>,
}

/// A history being recorded by many tasks.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    inner: Arc<Mutex<History>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            start: Instant::now(),
            inner: Arc::default(),
        }
    }
}

impl Recorder {
    /// Ms since the run began.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    /// Appends to the history.
    pub fn with<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.inner.lock().expect("history lock"))
    }

    /// A copy of the history so far.
    pub fn snapshot(&self) -> History {
        self.inner.lock().expect("history lock").clone()
    }
}
