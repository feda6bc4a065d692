//! Keeps a pipelining idempotent producer's batches in sequence order on their way into the
//! Raft log.
//!
//! A producer may have several batches of one partition in flight (Kafka's
//! `max.in.flight.requests.per.connection`). Each request runs as its own task here, and tasks
//! do not start in arrival order (tokio runs the newest spawned task first), so batch k+1
//! would often reach the log before batch k, be refused `OUT_OF_ORDER_SEQUENCE` by the state
//! machine, and cost a whole replication round. The gate below holds a batch whose
//! predecessor has not been proposed on this node yet, for at most [`ORDER_WAIT`], and lets it
//! go the moment the predecessor is queued. The state machine's sequence check stays the
//! authority: the gate only makes the common case arrive in order.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest a batch waits for its predecessor before it is proposed anyway.
pub const ORDER_WAIT: Duration = Duration::from_millis(100);
/// A producer's position older than this is forgotten (it belongs to an earlier leadership or
/// an idle producer), so a batch after it never waits.
const STALE_AFTER: Duration = Duration::from_secs(1);
/// Positions kept before stale ones are swept.
const SWEEP_AT: usize = 65_536;

/// Identifies one producer's sequence on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderKey {
    /// The partition's id.
    pub partition_id: u64,
    /// The producer id.
    pub producer_id: i64,
}

#[derive(Debug, Clone, Copy)]
struct Next {
    epoch: i32,
    seq: i32,
    at: Instant,
}

/// The per-node gate: the next sequence each producer's next batch should carry.
#[derive(Debug, Default)]
pub struct ProduceOrder {
    next: Mutex<HashMap<OrderKey, Next>>,
    changed: Notify,
}

/// True when `seq` lies ahead of `next` (sequences wrap at `i32::MAX` back to 0).
fn ahead(seq: i32, next: i32) -> bool {
    let d = (i64::from(seq) - i64::from(next)).rem_euclid(i64::from(i32::MAX) + 1);
    d > 0 && d < (1 << 30)
}

impl ProduceOrder {
    /// Waits (at most [`ORDER_WAIT`]) until the batch starting at `seq` of `key` in `epoch` is
    /// next, i.e. its predecessor was proposed here or is unknown.
    pub async fn wait_turn(&self, key: OrderKey, epoch: i32, seq: i32) {
        let deadline = tokio::time::Instant::now() + ORDER_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = {
                let m = self.next.lock().expect("order lock");
                m.get(&key).is_some_and(|n| {
                    n.epoch == epoch && n.at.elapsed() < STALE_AFTER && ahead(seq, n.seq)
                })
            };
            if !wait {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Records that the batch `[seq, seq + count)` was queued in the log, and wakes batches
    /// waiting for it. A retry of an older batch never moves the position back.
    pub fn proposed(&self, key: OrderKey, epoch: i32, seq: i32, count: i32) {
        let after = ((i64::from(seq) + i64::from(count)) % (i64::from(i32::MAX) + 1)) as i32;
        {
            let mut m = self.next.lock().expect("order lock");
            if m.len() >= SWEEP_AT {
                m.retain(|_, n| n.at.elapsed() < STALE_AFTER);
            }
            let keep_old = m
                .get(&key)
                .is_some_and(|n| n.epoch == epoch && ahead(n.seq, after));
            if !keep_old {
                m.insert(
                    key,
                    Next {
                        epoch,
                        seq: after,
                        at: Instant::now(),
                    },
                );
            }
        }
        self.changed.notify_waiters();
    }

    /// Wakes every waiter to look again (a proposal failed: its successors should not wait on
    /// it longer than they must).
    pub fn wake(&self) {
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const K: OrderKey = OrderKey {
        partition_id: 7,
        producer_id: 42,
    };

    #[test]
    fn ahead_wraps() {
        assert!(ahead(5, 3));
        assert!(!ahead(3, 3));
        assert!(!ahead(2, 3));
        assert!(ahead(1, i32::MAX - 1));
    }

    #[tokio::test]
    async fn an_unknown_producer_and_the_next_batch_pass_at_once() {
        let o = ProduceOrder::default();
        // Unknown: no wait (the state machine decides).
        tokio::time::timeout(Duration::from_millis(50), o.wait_turn(K, 0, 10))
            .await
            .expect("no wait for an unknown producer");
        o.proposed(K, 0, 0, 5);
        tokio::time::timeout(Duration::from_millis(50), o.wait_turn(K, 0, 5))
            .await
            .expect("the next batch passes");
        // A retry of an older batch passes too, and does not move the position back.
        tokio::time::timeout(Duration::from_millis(50), o.wait_turn(K, 0, 0))
            .await
            .expect("a retry passes");
        o.proposed(K, 0, 0, 5);
        o.proposed(K, 0, 5, 5);
        o.proposed(K, 0, 0, 5);
        assert_eq!(o.next.lock().unwrap()[&K].seq, 10);
    }

    #[tokio::test]
    async fn a_batch_that_overtook_waits_for_its_predecessor() {
        let o = Arc::new(ProduceOrder::default());
        o.proposed(K, 0, 0, 5);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let o = Arc::clone(&o);
            tokio::spawn(async move {
                o.wait_turn(K, 0, 10).await;
                tx.send(()).unwrap();
            })
        };
        // Still waiting while its predecessor [5, 10) is not proposed.
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        o.proposed(K, 0, 5, 5);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released once the predecessor is proposed")
            .unwrap();
    }

    #[tokio::test]
    async fn a_lost_predecessor_holds_a_batch_at_most_order_wait() {
        let o = ProduceOrder::default();
        o.proposed(K, 0, 0, 5);
        let t = Instant::now();
        o.wait_turn(K, 0, 10).await;
        assert!(t.elapsed() >= ORDER_WAIT);
        // Another epoch is a fresh sequence: no wait.
        tokio::time::timeout(Duration::from_millis(50), o.wait_turn(K, 1, 10))
            .await
            .expect("a new epoch passes at once");
    }
}
