//! The producer: one worker task per partition batches records (linger / max size), stamps
//! producer id and sequence, and sends batches to the partition's leader, retrying each batch
//! (same sequence) until it is acknowledged. The server's idempotence table turns a retry of a
//! batch it already has into its original offsets, so retries never duplicate.
//!
//! An idempotent worker keeps up to `max_in_flight_per_partition` batches in flight (Kafka's
//! 5), so batching, replication and fsync of consecutive batches overlap. Order holds because
//! the server appends a producer's batches only in sequence order: a batch that overtook its
//! predecessor is refused `OUT_OF_ORDER_SEQUENCE`, waits for the predecessor's outcome, and is
//! sent again once that one is in. A non-idempotent worker sends one batch at a time, since
//! nothing could put overtaken batches back in order.
//!
//! A batch whose outcome stays unknown past `delivery_timeout` fails to the caller, and so does
//! every batch in flight behind it; the worker then takes a fresh producer id so later batches
//! never depend on it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use runnel_proto::api::{self, ErrorCode};
use runnel_proto::partitioner;
use runnel_record::{BatchBuilder, BatchOptions};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};

use crate::connection::{Client, backoff};
use crate::error::{Error, retriable_code};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Idempotent delivery (producer id + sequence): retries never duplicate. Default on.
    pub idempotent: bool,
    /// How long a partition waits for more records before sending a batch. Default 5 ms.
    pub linger: Duration,
    /// Largest batch, in encoded bytes. Default 1 MiB.
    pub batch_max_bytes: usize,
    /// Most records in one batch. Default 10 000.
    pub batch_max_records: usize,
    /// Requests in flight across all partitions. Default 64.
    pub max_in_flight: usize,
    /// Batches in flight per partition for an idempotent producer (a non-idempotent one sends
    /// one at a time, to keep order). Default 5, as Kafka's.
    pub max_in_flight_per_partition: usize,
    /// Records queued per partition before `send` waits. Default 100 000.
    pub queue_records: usize,
    /// How long a record may take, retries included, before it fails. Default 120 s.
    pub delivery_timeout: Duration,
    /// First retry backoff (doubles up to 1 s). Default 20 ms.
    pub retry_backoff: Duration,
    /// Timeout the server applies to each produce request. Default 10 s.
    pub request_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            idempotent: true,
            linger: Duration::from_millis(5),
            batch_max_bytes: 1 << 20,
            batch_max_records: 10_000,
            max_in_flight: 64,
            max_in_flight_per_partition: 5,
            queue_records: 100_000,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(20),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// Key (`None`: null). Chooses the partition when `partition` is unset.
    pub key: Option<Bytes>,
    /// Value (`None`: null, a tombstone).
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Explicit partition.
    pub partition: Option<u32>,
    /// Timestamp in ms; `None`: now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record with this value.
    pub fn new(value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            value: Some(value.into()),
            ..Default::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the partition.
    pub fn partition(mut self, p: u32) -> Self {
        self.partition = Some(p);
        self
    }

    /// Sets the timestamp.
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp_ms = Some(ms);
        self
    }
}

/// Where an acknowledged record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// The batch was a retry the server already had (the offset is the original one).
    pub duplicate: bool,
}

/// Resolves when the record is acknowledged (durable on a majority) or has failed.
#[derive(Debug)]
pub struct DeliveryFuture(oneshot::Receiver<Result<Delivery, Error>>);

impl Future for DeliveryFuture {
    type Output = Result<Delivery, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

struct Pending {
    rec: ProducerRecord,
    ack: oneshot::Sender<Result<Delivery, Error>>,
}

struct Shared {
    client: Client,
    cfg: ProducerConfig,
    in_flight: Semaphore,
    outstanding: AtomicUsize,
    idle: Notify,
    sticky: AtomicU64,
}

/// A batching, retrying, by default idempotent producer. Cheap to share by reference; close it
/// with [`Producer::close`] to flush.
pub struct Producer {
    shared: Arc<Shared>,
    workers: Mutex<HashMap<(String, u32), mpsc::Sender<Pending>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Producer {
    pub(crate) fn new(client: Client, cfg: ProducerConfig) -> Self {
        Producer {
            shared: Arc::new(Shared {
                client,
                in_flight: Semaphore::new(cfg.max_in_flight.max(1)),
                cfg,
                outstanding: AtomicUsize::new(0),
                idle: Notify::new(),
                sticky: AtomicU64::new(0),
            }),
            workers: Mutex::default(),
            tasks: Mutex::default(),
        }
    }

    /// Queues `rec` for `topic`; waits only while the partition's queue is full. The returned
    /// future resolves with the record's offset once acknowledged.
    pub async fn send(&self, topic: &str, rec: ProducerRecord) -> Result<DeliveryFuture, Error> {
        let n = self.shared.client.partition_count(topic).await?;
        if n == 0 {
            return Err(Error::Server {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic {topic:?} has no partitions"),
            });
        }
        let partition = match (rec.partition, &rec.key) {
            (Some(p), _) if p < n => p,
            (Some(p), _) => {
                return Err(Error::Server {
                    code: ErrorCode::UnknownTopicOrPartition,
                    message: format!("topic {topic:?} has {n} partitions; {p} does not exist"),
                });
            }
            (None, Some(k)) => partitioner::partition_for_key(k, n),
            // Unkeyed: stick to one partition for a batch's worth of records, then move on
            // (Kafka's sticky partitioner), so batches fill up.
            (None, None) => {
                let c = self.shared.sticky.fetch_add(1, Ordering::Relaxed);
                ((c / self.shared.cfg.batch_max_records.clamp(1, 1000) as u64) % u64::from(n))
                    as u32
            }
        };
        let tx = self.worker(topic, partition);
        let (ack, rx) = oneshot::channel();
        self.shared.outstanding.fetch_add(1, Ordering::SeqCst);
        if tx.send(Pending { rec, ack }).await.is_err() {
            self.done(1);
            return Err(Error::Closed);
        }
        Ok(DeliveryFuture(rx))
    }

    fn done(&self, n: usize) {
        done(&self.shared, n);
    }

    fn worker(&self, topic: &str, partition: u32) -> mpsc::Sender<Pending> {
        let mut w = self.workers.lock().expect("workers");
        if let Some(tx) = w.get(&(topic.to_string(), partition)) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.shared.cfg.queue_records.max(1));
        let task = tokio::spawn(run_partition(
            Arc::clone(&self.shared),
            topic.to_string(),
            partition,
            rx,
        ));
        self.tasks.lock().expect("tasks").push(task);
        w.insert((topic.to_string(), partition), tx.clone());
        tx
    }

    /// Waits until every record queued so far is acknowledged or failed.
    pub async fn flush(&self) {
        loop {
            let idle = self.shared.idle.notified();
            if self.shared.outstanding.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Flushes and stops the workers.
    pub async fn close(self) {
        self.flush().await;
        self.workers.lock().expect("workers").clear();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks"));
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn done(shared: &Shared, n: usize) {
    if shared.outstanding.fetch_sub(n, Ordering::SeqCst) == n {
        shared.idle.notify_waiters();
    }
}

/// Idempotence state of one partition worker.
struct Sequencer {
    producer_id: i64,
    epoch: i16,
    next_seq: i32,
}

async fn init_producer_id(shared: &Shared) -> Result<(i64, i16), Error> {
    let deadline = tokio::time::Instant::now() + shared.cfg.delivery_timeout;
    let mut attempt = 0;
    loop {
        let nodes = shared.client.nodes();
        let addr = &nodes[attempt as usize % nodes.len()];
        let r = tokio::time::timeout(shared.cfg.request_timeout, async {
            let mut b = shared.client.broker(addr)?;
            let r = b
                .init_producer_id(api::InitProducerIdRequest {})
                .await?
                .into_inner();
            match r.error {
                Some(e) => Err(Error::from_api(&e)),
                None => Ok((r.producer_id, r.producer_epoch as i16)),
            }
        })
        .await
        .unwrap_or_else(|_| Err(Error::Timeout(format!("InitProducerId at {addr}"))));
        match r {
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff(
                    attempt,
                    shared.cfg.retry_backoff,
                    Duration::from_secs(1),
                ))
                .await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn run_partition(
    shared: Arc<Shared>,
    topic: String,
    partition: u32,
    mut rx: mpsc::Receiver<Pending>,
) {
    let cfg = shared.cfg.clone();
    let limit = if cfg.idempotent {
        cfg.max_in_flight_per_partition.max(1)
    } else {
        1
    };
    let mut seq: Option<Sequencer> = None;
    // Batches in flight, completing in send order; each carries its records' acks.
    let mut in_flight = FuturesOrdered::new();
    // The outcome of the newest batch sent, which the next batch waits on if it overtakes it.
    let mut last_outcome: Option<watch::Receiver<Outcome>> = None;
    // A batch failed: send nothing more until every batch behind it has finished, then start
    // over with a fresh producer id.
    let mut broken = false;
    let mut open = true;
    while open || !in_flight.is_empty() {
        if broken && in_flight.is_empty() {
            seq = None;
            last_outcome = None;
            broken = false;
        }
        let can_send = open && !broken && in_flight.len() < limit;
        tokio::select! {
            biased;
            Some((batch, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let (batch, result): (Vec<Pending>, Result<(i64, bool), Error>) = (batch, result);
                let n = batch.len();
                match result {
                    Ok((base, duplicate)) => {
                        for (i, p) in batch.into_iter().enumerate() {
                            let _ = p.ack.send(Ok(Delivery {
                                partition,
                                offset: base + i as i64,
                                duplicate,
                            }));
                        }
                    }
                    Err(e) => {
                        for p in batch {
                            let _ = p.ack.send(Err(e.clone()));
                        }
                        // The batch's sequence numbers may or may not be in the log: never
                        // reuse them under this producer id.
                        broken = true;
                    }
                }
                done(&shared, n);
            }
            first = rx.recv(), if can_send => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let batch = collect_batch(&cfg, first, &mut rx).await;
                let opts = match next_batch_options(&shared, &mut seq, batch.len()).await {
                    Ok(o) => o,
                    Err(e) => {
                        let n = batch.len();
                        for p in batch {
                            let _ = p.ack.send(Err(e.clone()));
                        }
                        done(&shared, n);
                        continue;
                    }
                };
                let (tx, rx_outcome) = watch::channel(Outcome::Pending);
                let prev = last_outcome.replace(rx_outcome);
                let shared = Arc::clone(&shared);
                let topic = topic.clone();
                in_flight.push_back(async move {
                    let r = send_batch(&shared, &topic, partition, opts, prev, &batch).await;
                    let _ = tx.send(match &r {
                        Ok(_) => Outcome::Done,
                        Err(e) => Outcome::Failed(e.clone()),
                    });
                    (batch, r)
                });
            }
        }
    }
}

/// What became of a batch, as the batch behind it sees it.
#[derive(Debug, Clone)]
enum Outcome {
    Pending,
    Done,
    Failed(Error),
}

/// Takes `first` and what else is queued for the partition, within the batch limits, waiting
/// up to `linger` for more.
async fn collect_batch(
    cfg: &ProducerConfig,
    first: Pending,
    rx: &mut mpsc::Receiver<Pending>,
) -> Vec<Pending> {
    let mut batch = vec![first];
    let mut size = approx_size(&batch[0].rec);
    let full = |size: usize, n: usize| size >= cfg.batch_max_bytes || n >= cfg.batch_max_records;
    if cfg.linger.is_zero() {
        // No linger: take what is already queued, without arming a timer (tokio's timer rounds
        // up to the next millisecond, which would add ~1 ms to every batch).
        while !full(size, batch.len()) {
            match rx.try_recv() {
                Ok(p) => {
                    size += approx_size(&p.rec);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        return batch;
    }
    let linger = tokio::time::sleep(cfg.linger);
    tokio::pin!(linger);
    while !full(size, batch.len()) {
        tokio::select! {
            biased;
            p = rx.recv() => match p {
                Some(p) => {
                    size += approx_size(&p.rec);
                    batch.push(p);
                }
                None => break,
            },
            _ = &mut linger => break,
        }
    }
    batch
}

/// The producer fields of the next batch of `n` records; takes a producer id when needed and
/// advances the sequence past the batch.
async fn next_batch_options(
    shared: &Shared,
    seq: &mut Option<Sequencer>,
    n: usize,
) -> Result<BatchOptions, Error> {
    if !shared.cfg.idempotent {
        return Ok(BatchOptions::default());
    }
    if seq.is_none() {
        let (producer_id, epoch) = init_producer_id(shared).await?;
        *seq = Some(Sequencer {
            producer_id,
            epoch,
            next_seq: 0,
        });
    }
    let s = seq.as_mut().expect("set above");
    let opts = BatchOptions {
        producer_id: s.producer_id,
        producer_epoch: s.epoch,
        base_sequence: s.next_seq,
        ..BatchOptions::default()
    };
    // Sequences wrap at i32::MAX back to 0, as in Kafka.
    s.next_seq = ((i64::from(s.next_seq) + n as i64) % (i64::from(i32::MAX) + 1)) as i32;
    Ok(opts)
}

fn approx_size(r: &ProducerRecord) -> usize {
    24 + r.key.as_ref().map_or(0, |k| k.len())
        + r.value.as_ref().map_or(0, |v| v.len())
        + r.headers
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
}

/// Sends one batch until it is acknowledged, fails for good, or runs out of time.
async fn send_batch(
    shared: &Shared,
    topic: &str,
    partition: u32,
    opts: BatchOptions,
    mut prev: Option<watch::Receiver<Outcome>>,
    batch: &[Pending],
) -> Result<(i64, bool), Error> {
    let cfg = &shared.cfg;
    let deadline = tokio::time::Instant::now() + cfg.delivery_timeout;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut b = BatchBuilder::with_capacity(opts, batch.iter().map(|p| approx_size(&p.rec)).sum());
    for p in batch {
        let headers: Vec<(&[u8], Option<&[u8]>)> = p
            .rec
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), Some(&v[..])))
            .collect();
        b.append(
            p.rec.timestamp_ms.unwrap_or(now),
            p.rec.key.as_deref(),
            p.rec.value.as_deref(),
            &headers,
        );
    }
    let bytes = b.build();
    let req = api::ProduceRequest {
        topic: topic.to_string(),
        partition: Some(partition),
        batch: bytes,
        timeout_ms: cfg.request_timeout.as_millis() as u32,
        ..Default::default()
    };
    let mut attempt = 0u32;
    let _permit = shared
        .in_flight
        .acquire()
        .await
        .map_err(|_| Error::Closed)?;
    loop {
        let r = async {
            let addr = shared.client.leader_addr(topic, partition).await?;
            let mut b = shared.client.broker(&addr)?;
            let call = b.produce(req.clone());
            match tokio::time::timeout(cfg.request_timeout + Duration::from_secs(5), call).await {
                Ok(r) => Ok(r?.into_inner()),
                Err(_) => Err(Error::Timeout(format!("produce to {addr}"))),
            }
        }
        .await;
        let wait = match r {
            Ok(resp) => match resp.error {
                None => return Ok((resp.base_offset, resp.duplicate)),
                Some(e) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::UnknownServerError);
                    if code == ErrorCode::OutOfOrderSequence
                        && let Some(mut p) = prev.take()
                    {
                        // This batch overtook the one before it. Once that one is in, send
                        // again (at once, and only once more: a second refusal is real); if it
                        // failed, this one fails with it.
                        let outcome = p
                            .wait_for(|o| !matches!(o, Outcome::Pending))
                            .await
                            .map(|o| o.clone())
                            .unwrap_or(Outcome::Failed(Error::Closed));
                        match outcome {
                            Outcome::Failed(e) => return Err(e),
                            _ => continue,
                        }
                    }
                    if !retriable_code(code) {
                        return Err(Error::from_api(&e));
                    }
                    tracing::debug!(topic, partition, ?code, msg = %e.message, "produce retry");
                    shared.client.on_partition_error(
                        topic,
                        partition,
                        &e,
                        backoff(attempt, cfg.retry_backoff, Duration::from_secs(1)),
                    )
                }
            },
            Err(e) if e.is_retriable() => {
                tracing::debug!(topic, partition, error = %e, "produce retry");
                shared.client.forget(topic);
                backoff(attempt, cfg.retry_backoff, Duration::from_secs(1))
            }
            Err(e) => return Err(e),
        };
        attempt += 1;
        if tokio::time::Instant::now() + wait >= deadline {
            return Err(Error::Timeout(format!(
                "batch for {topic}/{partition} not acknowledged within {:?}; outcome unknown",
                cfg.delivery_timeout
            )));
        }
        tokio::time::sleep(wait).await;
    }
}

impl Client {
    /// A producer.
    pub fn producer(&self, cfg: ProducerConfig) -> Producer {
        Producer::new(self.clone(), cfg)
    }
}
