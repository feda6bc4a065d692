//! What Subscribe streams may buffer: a per-node memory budget, and an end for subscribers
//! that stop reading.
//!
//! Every message a Subscribe stream buffers holds its encoded size from the node's budget
//! (`limits.subscribe_memory_bytes`) until HTTP/2 has taken it and asked for the next one. A
//! stream that cannot get budget, or whose client leaves its buffer full, for
//! `limits.subscribe_stall_ms` is ended with `RESOURCE_EXHAUSTED`; what it buffered is released
//! at once (the one message already handed to HTTP/2 is released when the client reads it or
//! the connection closes). So the messages buffered on a node never take more than the budget.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prost::Message;
use runnel_proto::api;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::Status;

/// The node's Subscribe memory budget.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes not taken now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<(api::FetchResponse, OwnedSemaphorePermit)>,
    end: Option<Status>,
    ended: bool,
    reader_gone: bool,
    reader: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    space: Notify,
}

/// The producer side of one Subscribe stream.
pub struct Sender {
    shared: Arc<Shared>,
    budget: Budget,
    capacity: usize,
    stall: Duration,
}

/// The response stream of one Subscribe call.
pub struct Receiver {
    shared: Arc<Shared>,
    /// The budget of the message HTTP/2 took last; released when it asks for the next.
    in_flight: Option<OwnedSemaphorePermit>,
}

/// Why a message could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The client went away.
    Gone,
    /// The stream was ended with `RESOURCE_EXHAUSTED`.
    Stalled,
}

/// A stream that buffers at most `capacity` messages and waits at most `stall` for budget or
/// for its reader.
pub fn channel(budget: &Budget, capacity: usize, stall: Duration) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        space: Notify::new(),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
            budget: budget.clone(),
            capacity: capacity.max(1),
            stall,
        },
        Receiver {
            shared,
            in_flight: None,
        },
    )
}

impl Sender {
    /// Whether the client went away.
    pub fn is_closed(&self) -> bool {
        self.shared
            .state
            .lock()
            .expect("subscribe state")
            .reader_gone
    }

    /// Queues `resp`, waiting for budget and for room; ends the stream if either takes longer
    /// than the stall limit.
    pub async fn send(&self, resp: api::FetchResponse) -> Result<(), SendError> {
        let deadline = tokio::time::Instant::now() + self.stall;
        let size = resp.encoded_len().clamp(1, self.budget.total);
        let permit = match tokio::time::timeout_at(
            deadline,
            Arc::clone(&self.budget.bytes).acquire_many_owned(size as u32),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(SendError::Gone),
            Err(_) => {
                self.end(Status::resource_exhausted(format!(
                    "the node's subscribe memory budget ({} bytes) stayed full for {} ms: resubscribe at next_offset",
                    self.budget.total,
                    self.stall.as_millis()
                )));
                return Err(SendError::Stalled);
            }
        };
        let mut item = Some((resp, permit));
        loop {
            let notified = self.shared.space.notified();
            {
                let mut st = self.shared.state.lock().expect("subscribe state");
                if st.reader_gone || st.ended {
                    return Err(SendError::Gone);
                }
                if st.queue.len() < self.capacity {
                    st.queue.push_back(item.take().expect("one item"));
                    if let Some(w) = st.reader.take() {
                        w.wake();
                    }
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.end(Status::resource_exhausted(format!(
                    "the subscriber read nothing for {} ms with {} messages buffered: resubscribe at next_offset",
                    self.stall.as_millis(),
                    self.capacity
                )));
                return Err(SendError::Stalled);
            }
        }
    }

    /// Ends the stream with `status`, releasing everything buffered.
    pub fn end(&self, status: Status) {
        let mut st = self.shared.state.lock().expect("subscribe state");
        st.queue.clear();
        st.end = Some(status);
        if let Some(w) = st.reader.take() {
            w.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().expect("subscribe state");
        if st.end.is_none() {
            st.ended = true; // a clean end after what is queued
        }
        if let Some(w) = st.reader.take() {
            w.wake();
        }
    }
}

impl Stream for Receiver {
    type Item = Result<api::FetchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Asked for the next message: the last one left our hands.
        self.in_flight = None;
        let shared = Arc::clone(&self.shared);
        let mut st = shared.state.lock().expect("subscribe state");
        if let Some(status) = st.end.take() {
            st.ended = true;
            return Poll::Ready(Some(Err(status)));
        }
        if let Some((resp, permit)) = st.queue.pop_front() {
            drop(st);
            self.in_flight = Some(permit);
            shared.space.notify_one();
            return Poll::Ready(Some(Ok(resp)));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().expect("subscribe state");
        st.reader_gone = true;
        st.queue.clear();
        drop(st);
        self.shared.space.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn msg(n: usize) -> api::FetchResponse {
        api::FetchResponse {
            raw_batches: vec![7u8; n].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_reader_gets_every_message_then_the_end() {
        let budget = Budget::new(1 << 20);
        let (tx, mut rx) = channel(&budget, 2, Duration::from_secs(5));
        let producer = tokio::spawn(async move {
            for i in 1..=5 {
                tx.send(msg(i * 100)).await.unwrap();
            }
        });
        let mut sizes = vec![];
        while let Some(m) = rx.next().await {
            sizes.push(m.unwrap().raw_batches.len());
        }
        producer.await.unwrap();
        assert_eq!(sizes, vec![100, 200, 300, 400, 500]);
        drop(rx);
        assert_eq!(budget.available(), 1 << 20, "every byte returned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_reader_is_ended_and_its_buffer_released() {
        let budget = Budget::new(1 << 20);
        let (tx, mut rx) = channel(&budget, 2, Duration::from_secs(30));
        tx.send(msg(1000)).await.unwrap();
        tx.send(msg(1000)).await.unwrap();
        // The reader does not read: the third waits for room, then the stream ends.
        assert_eq!(tx.send(msg(1000)).await, Err(SendError::Stalled));
        assert_eq!(
            budget.available(),
            1 << 20,
            "buffered messages released at once"
        );
        let e = rx.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        drop(tx);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn streams_together_never_take_more_than_the_budget() {
        let budget = Budget::new(10_000);
        let (a, _ra) = channel(&budget, 100, Duration::from_secs(30));
        let (b, mut rb) = channel(&budget, 100, Duration::from_secs(30));
        for _ in 0..3 {
            a.send(msg(3000)).await.unwrap();
        }
        assert!(budget.available() < 1000);
        // b cannot get budget while a's reader stalls: b is ended, not the budget exceeded.
        assert_eq!(b.send(msg(3000)).await, Err(SendError::Stalled));
        assert_eq!(
            rb.next().await.unwrap().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }
}
