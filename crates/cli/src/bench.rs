//! `runnel bench`: produce, consume and end-to-end load against any cluster, with a live
//! progress line and an HDR-histogram summary (text or `--json`).
//!
//! Latency is measured per record: produce mode from the moment the record was due (its
//! scheduled time under `--rate`, else the call to `send`) to its acknowledgement;
//! end-to-end mode from the publisher's wall clock (stamped in the value) to the moment a
//! consumer sees it. The client's own cost is reported separately (CPU time of this process
//! and time spent inside `send`), so a saturated client is not mistaken for a slow server.
//!
//! One file (over 600 lines): the load generator's modes share its pacing, measurement and
//! report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use runnel_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, StartFrom, TopicSpec};
use tokio::sync::Semaphore;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Producers only: acknowledged records per second and produce-ack latency.
    Produce,
    /// Consumers only, reading what is there (from `--from`) up to the end at start.
    Consume,
    /// Producers and consumers together: publish→consume latency.
    EndToEnd,
}

/// How records are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Keys {
    /// No key: the producer fills one partition's batch, then moves on (sticky).
    None,
    /// A key drawn uniformly from `--key-space` distinct keys.
    Random,
    /// Keys 0, 1, 2, … modulo `--key-space` (round robin over partitions).
    Sequential,
}

/// Where consumers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum From {
    /// The log start.
    Earliest,
    /// The end (only new records).
    Latest,
}

/// `runnel bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// produce, consume or end-to-end.
    #[arg(value_enum)]
    pub mode: Mode,
    /// Topic to use; created with `--partitions` when missing.
    #[arg(long, default_value = "runnel-bench")]
    pub topic: String,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Key distribution.
    #[arg(long, value_enum, default_value_t = Keys::None)]
    pub keys: Keys,
    /// Distinct keys for `--keys random|sequential`.
    #[arg(long, default_value_t = 1_000_000)]
    pub key_space: u64,
    /// Concurrent producers (each its own producer, session and sequence numbers).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Concurrent consumers (partitions are split among them).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Records each producer may have sent and not yet acknowledged; 1 waits for every ack.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Most records per batch.
    #[arg(long, default_value_t = 10_000)]
    pub batch_records: usize,
    /// Most bytes per batch.
    #[arg(long, default_value_t = 1 << 20)]
    pub batch_bytes: usize,
    /// How long a partition waits for more records before sending a batch, in ms.
    #[arg(long, default_value_t = 0)]
    pub linger_ms: u64,
    /// Produce requests in flight per producer.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Batches in flight per partition (idempotent producers; otherwise 1, to keep order).
    #[arg(long, default_value_t = 5)]
    pub max_in_flight_per_partition: usize,
    /// Target records per second over all producers (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Run this long (e.g. 10s, 1m) ...
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// ... or until this many records were acknowledged (produce) or read (consume).
    #[arg(long)]
    pub records: Option<u64>,
    /// Idempotent producers (producer id + sequence).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub idempotent: bool,
    /// Where consumers start (consume mode).
    #[arg(long, value_enum, default_value_t = From::Earliest)]
    pub from: From,
    /// Most bytes per fetch.
    #[arg(long, default_value_t = 8 << 20)]
    pub fetch_bytes: u32,
    /// Print the summary as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Latencies are recorded in microseconds, 1 µs to 1 h, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// Counters and histograms every task records into.
struct Stats {
    /// Records acknowledged to producers (in end-to-end mode `records` counts reads).
    acked: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// (whole run, since the last progress line)
    latency: std::sync::Mutex<(Histogram<u64>, Histogram<u64>)>,
    /// Time spent inside `Producer::send` (queueing included), µs.
    send_time: std::sync::Mutex<Histogram<u64>>,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            acked: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::sync::Mutex::new((histogram(), histogram())),
            send_time: std::sync::Mutex::new(histogram()),
            first_error: std::sync::Mutex::new(None),
        }
    }

    fn record(&self, n: u64, bytes: u64, latency: Option<Duration>) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(l) = latency {
            let us = (l.as_micros() as u64).clamp(1, 3_600_000_000);
            let mut h = self.latency.lock().expect("stats lock");
            h.0.saturating_record(us);
            h.1.saturating_record(us);
        }
    }

    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().expect("stats lock");
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

/// Microseconds since the Unix epoch, stamped into end-to-end values.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI Rust supports.
    Some(Duration::from_millis(ticks * 10))
}

/// A small deterministic generator (xorshift) for keys; no need for a crate here.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the benchmark and prints the summary.
pub async fn run(client: &Client, args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let partitions = ensure_topic(client, &args).await?;
    let stats = Arc::new(Stats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let produce = args.mode != Mode::Consume;
    let consume = args.mode != Mode::Produce;
    if consume {
        let from = if args.mode == Mode::EndToEnd {
            From::Latest
        } else {
            args.from
        };
        for c in 0..args.consumers.max(1) {
            let parts: Vec<u32> = (0..partitions)
                .filter(|p| *p as usize % args.consumers.max(1) == c)
                .collect();
            if parts.is_empty() {
                continue;
            }
            let mut consumer = client.consumer(ConsumerConfig {
                max_bytes: args.fetch_bytes,
                max_wait: Duration::from_millis(100),
                ..Default::default()
            });
            consumer
                .assign(
                    &args.topic,
                    Some(parts.clone()),
                    match from {
                        From::Earliest => StartFrom::Earliest,
                        From::Latest => StartFrom::Latest,
                    },
                )
                .await?;
            // In consume mode the run ends at the end of the log as it was at start.
            let mut ends = Vec::new();
            for p in &parts {
                ends.push((*p, consumer.list_offset(&args.topic, *p, -1).await?));
            }
            let (stats, stop, args) = (Arc::clone(&stats), Arc::clone(&stop), args.clone());
            tasks.spawn(async move {
                consume_loop(consumer, ends, &args, &stats, &stop, deadline).await;
            });
        }
    }
    if produce {
        let per_producer_rate = args.rate as f64 / args.producers.max(1) as f64;
        for i in 0..args.producers.max(1) {
            let producer = client.producer(ProducerConfig {
                idempotent: args.idempotent,
                linger: Duration::from_millis(args.linger_ms),
                batch_max_bytes: args.batch_bytes,
                batch_max_records: args.batch_records,
                max_in_flight: args.max_in_flight,
                max_in_flight_per_partition: args.max_in_flight_per_partition,
                ..Default::default()
            });
            let (stats, stop, args) = (Arc::clone(&stats), Arc::clone(&stop), args.clone());
            tasks.spawn(async move {
                produce_loop(
                    producer,
                    i,
                    per_producer_rate,
                    &args,
                    &stats,
                    &stop,
                    deadline,
                )
                .await;
            });
        }
    }
    let progress = if args.quiet {
        None
    } else {
        let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
        Some(tokio::spawn(progress_loop(stats, stop, start)))
    };
    let consumer_tasks = if consume {
        tasks.len() - args.producers.max(1)
    } else {
        0
    };
    while let Some(r) = tasks.join_next().await {
        r.context("benchmark task failed")?;
        // End-to-end: once the producers are done, let the consumers read what was
        // acknowledged (at most 10 s more), then stop them.
        if args.mode == Mode::EndToEnd
            && tasks.len() == consumer_tasks
            && !stop.load(Ordering::Relaxed)
        {
            let drain = Instant::now() + Duration::from_secs(10);
            while stats.records.load(Ordering::Relaxed) < stats.acked.load(Ordering::Relaxed)
                && Instant::now() < drain
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.store(true, Ordering::Relaxed);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let cpu = match (cpu0, cpu_time()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let summary = Summary::new(&args, &stats, elapsed, cpu);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.json())?);
    } else {
        print!("{}", summary.text());
    }
    if summary.records == 0 {
        bail!(
            "no record was {} ({} errors; first: {})",
            if produce { "acknowledged" } else { "read" },
            summary.errors,
            summary.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

fn validate(a: &BenchArgs) -> anyhow::Result<()> {
    if a.mode == Mode::EndToEnd && a.record_size < 8 {
        bail!("end-to-end mode stamps 8 bytes into each value: --record-size must be ≥ 8");
    }
    if a.window == 0 || a.producers == 0 || a.consumers == 0 {
        bail!("--window, --producers and --consumers must be at least 1");
    }
    if a.partitions == 0 {
        bail!("--partitions must be at least 1");
    }
    if a.key_space == 0 && a.keys != Keys::None {
        bail!("--key-space must be at least 1");
    }
    Ok(())
}

/// Creates the topic when missing; returns its partition count.
async fn ensure_topic(client: &Client, args: &BenchArgs) -> anyhow::Result<u32> {
    if let Ok(n) = client.partition_count(&args.topic).await
        && n > 0
    {
        return Ok(n);
    }
    match client
        .admin()
        .create_topic(&args.topic, TopicSpec::partitions(args.partitions))
        .await
    {
        Ok(_) => {}
        // Created meanwhile by someone else: fine, it is read back below.
        Err(e) if e.code() == Some(runnel_client::ErrorCode::TopicAlreadyExists) => {}
        Err(e) => return Err(e).context("cannot create the benchmark topic"),
    }
    let n = client.partition_count(&args.topic).await?;
    if n == 0 {
        bail!("topic {:?} has no partitions", args.topic);
    }
    Ok(n)
}

async fn produce_loop(
    producer: runnel_client::Producer,
    index: usize,
    rate: f64,
    args: &BenchArgs,
    stats: &Stats,
    stop: &AtomicBool,
    deadline: Instant,
) {
    let window = Arc::new(Semaphore::new(args.window));
    let mut acks = FuturesUnordered::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1));
    let mut value = vec![0u8; args.record_size];
    for (j, v) in value.iter_mut().enumerate() {
        *v = (j as u8).wrapping_mul(31).wrapping_add(index as u8);
    }
    let quota = args.records.map(|r| {
        let p = args.producers as u64;
        r / p + u64::from((index as u64) < r % p)
    });
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut send_time = histogram();
    let e2e = args.mode == Mode::EndToEnd;
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if quota.is_some_and(|q| sent >= q) {
            break;
        }
        // Under a target rate the record is due on the schedule, and its latency counts from
        // there, so a stalled client or server cannot hide queueing (open loop).
        let scheduled = (rate > 0.0).then(|| start + Duration::from_secs_f64(sent as f64 / rate));
        if let Some(due) = scheduled
            && due > Instant::now()
        {
            tokio::time::sleep_until(due.into()).await;
        }
        // Wait for a window slot while collecting acknowledgements as they come.
        let permit = loop {
            tokio::select! {
                biased;
                Some(()) = acks.next(), if !acks.is_empty() => {}
                p = Arc::clone(&window).acquire_owned() => break p.expect("window semaphore"),
            }
        };
        // Without a target rate (closed loop) a record is due once the window lets it go: the
        // wait for the previous acknowledgements is not this record's latency.
        let due = scheduled.unwrap_or_else(Instant::now);
        if e2e {
            value[..8].copy_from_slice(&wall_us().to_be_bytes());
        }
        let mut rec = ProducerRecord::new(Bytes::copy_from_slice(&value));
        match args.keys {
            Keys::None => {}
            Keys::Random => rec = rec.key((rng.next() % args.key_space).to_be_bytes().to_vec()),
            Keys::Sequential => rec = rec.key((sent % args.key_space).to_be_bytes().to_vec()),
        }
        let t = Instant::now();
        let fut = producer.send(&args.topic, rec).await;
        send_time.saturating_record((t.elapsed().as_micros() as u64).max(1));
        sent += 1;
        let bytes = args.record_size as u64;
        match fut {
            Ok(f) => acks.push(async move {
                let r = f.await;
                drop(permit);
                match r {
                    Ok(_) => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        if !e2e {
                            stats.record(1, bytes, Some(due.elapsed()));
                        }
                    }
                    Err(e) => stats.error(e),
                }
            }),
            Err(e) => {
                stats.error(e);
                drop(permit);
            }
        }
    }
    while acks.next().await.is_some() {}
    producer.close().await;
    stats
        .send_time
        .lock()
        .expect("stats lock")
        .add(&send_time)
        .expect("same bounds");
}

async fn consume_loop(
    mut consumer: runnel_client::Consumer,
    ends: Vec<(u32, i64)>,
    args: &BenchArgs,
    stats: &Stats,
    stop: &AtomicBool,
    deadline: Instant,
) {
    let e2e = args.mode == Mode::EndToEnd;
    let mut read: u64 = 0;
    let quota = args.records.map(|r| {
        if e2e {
            u64::MAX
        } else {
            r / args.consumers as u64
        }
    });
    loop {
        if stop.load(Ordering::Relaxed) || (!e2e && Instant::now() >= deadline) {
            break;
        }
        if quota.is_some_and(|q| read >= q) {
            break;
        }
        // Consume mode ends at the end of the log as it was at start.
        if !e2e
            && ends.iter().all(|(p, end)| {
                consumer
                    .position(&args.topic, *p)
                    .is_some_and(|pos| pos >= *end)
            })
        {
            break;
        }
        match consumer.poll().await {
            Ok(recs) => {
                let now = wall_us();
                let mut bytes = 0u64;
                for r in &recs {
                    let v = r.value.as_deref().unwrap_or_default();
                    bytes += v.len() as u64;
                    if e2e && v.len() >= 8 {
                        let sent = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                        stats.record(0, 0, Some(Duration::from_micros(now.saturating_sub(sent))));
                    }
                }
                read += recs.len() as u64;
                stats.record(recs.len() as u64, bytes, None);
            }
            Err(e) => {
                stats.error(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn progress_loop(stats: Arc<Stats>, stop: Arc<AtomicBool>, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_records, mut last_bytes, mut last) = (0u64, 0u64, start);
    loop {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            return; // the summary follows
        }
        let (r, b) = (
            stats.records.load(Ordering::Relaxed),
            stats.bytes.load(Ordering::Relaxed),
        );
        let dt = last.elapsed().as_secs_f64().max(1e-9);
        let p99 = {
            let mut h = stats.latency.lock().expect("stats lock");
            let v = (!h.1.is_empty()).then(|| h.1.value_at_quantile(0.99));
            h.1.reset();
            v
        };
        eprintln!(
            "{:>6.1}s {:>10.0} rec/s {:>8.1} MB/s  p99 {}  errors {}",
            start.elapsed().as_secs_f64(),
            (r - last_records) as f64 / dt,
            (b - last_bytes) as f64 / dt / 1e6,
            p99.map_or("-".to_string(), |us| format!(
                "{:.2} ms",
                us as f64 / 1000.0
            )),
            stats.errors.load(Ordering::Relaxed),
        );
        (last_records, last_bytes, last) = (r, b, Instant::now());
    }
}

/// The end-of-run figures.
struct Summary {
    mode: Mode,
    records: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency: Option<[f64; 6]>,
    send_time: Option<[f64; 3]>,
    cpu: Option<Duration>,
}

impl Summary {
    fn new(args: &BenchArgs, stats: &Stats, elapsed: Duration, cpu: Option<Duration>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &stats.latency.lock().expect("stats lock").0;
        let latency = (!h.is_empty()).then(|| {
            [0.5, 0.9, 0.99, 0.999]
                .map(|q| ms(h.value_at_quantile(q)))
                .into_iter()
                .chain([ms(h.max()), h.mean() / 1000.0])
                .collect::<Vec<_>>()
                .try_into()
                .expect("six figures")
        });
        let s = stats.send_time.lock().expect("stats lock");
        let send_time = (!s.is_empty()).then(|| {
            [
                ms(s.value_at_quantile(0.5)),
                ms(s.value_at_quantile(0.99)),
                ms(s.max()),
            ]
        });
        Summary {
            mode: args.mode,
            records: stats.records.load(Ordering::Relaxed),
            bytes: stats.bytes.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            first_error: stats.first_error.lock().expect("stats lock").clone(),
            elapsed,
            latency,
            send_time,
            cpu,
        }
    }

    fn rate(&self) -> (f64, f64) {
        let s = self.elapsed.as_secs_f64().max(1e-9);
        (self.records as f64 / s, self.bytes as f64 / s / 1e6)
    }

    fn latency_name(&self) -> &'static str {
        match self.mode {
            Mode::Produce => "produce-ack latency",
            Mode::EndToEnd => "publish→consume latency",
            Mode::Consume => "latency",
        }
    }

    fn text(&self) -> String {
        let (rps, mbps) = self.rate();
        let mut s = format!(
            "{} records in {:.2} s: {rps:.0} records/s, {mbps:.1} MB/s, {} errors\n",
            self.records,
            self.elapsed.as_secs_f64(),
            self.errors
        );
        if let Some([p50, p90, p99, p999, max, mean]) = self.latency {
            s += &format!(
                "{}: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms, mean {mean:.2} ms\n",
                self.latency_name()
            );
        }
        if let Some(cpu) = self.cpu {
            s += &format!(
                "client: {:.2} CPU cores used by this process",
                cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
            );
            if let Some([p50, p99, max]) = self.send_time {
                s += &format!("; time in send() p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.2} ms");
            }
            s += "\n";
        }
        if let Some(e) = &self.first_error {
            s += &format!("first error: {e}\n");
        }
        s
    }

    fn json(&self) -> serde_json::Value {
        let (rps, mbps) = self.rate();
        let lat = self.latency.map(|[p50, p90, p99, p999, max, mean]| {
            serde_json::json!({"p50": p50, "p90": p90, "p99": p99, "p99_9": p999, "max": max, "mean": mean})
        });
        serde_json::json!({
            "mode": match self.mode {
                Mode::Produce => "produce",
                Mode::Consume => "consume",
                Mode::EndToEnd => "end-to-end",
            },
            "records": self.records,
            "bytes": self.bytes,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "records_per_s": rps,
            "mb_per_s": mbps,
            "latency_ms": lat,
            "latency_kind": self.latency_name(),
            "client_cpu_cores": self.cpu.map(|c| c.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)),
            "send_time_ms": self.send_time.map(|[p50, p99, max]| serde_json::json!({"p50": p50, "p99": p99, "max": max})),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_spreads_over_the_key_space() {
        let mut r = Rng(42);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            seen.insert(r.next() % 16);
        }
        assert_eq!(seen.len(), 16);
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        let a = cpu_time().expect("/proc/self/stat");
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_time().unwrap() >= a);
    }
}
