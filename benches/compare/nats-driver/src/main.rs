//! `nats-driver`: the workloads of `runnel bench` against a NATS JetStream stream, with the
//! same JSON summary, so `benches/compare/compare.py` can put the two side by side.
//!
//! - `produce`: P publishers, each with at most `--window` publishes awaiting their
//!   acknowledgement (1: wait for each); latency from publish to ack.
//! - `consume`: one pull consumer (no acks, as Runnel's consumer) reading the stream from its
//!   first message to the last one at start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Produce,
    Consume,
}

#[derive(Debug, Clone, Parser)]
#[command(about = "JetStream load with the workloads of `runnel bench`")]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// Server URLs, comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    servers: String,
    /// Stream (created with file storage and `--replicas` when missing; subject = name).
    #[arg(long, default_value = "bench")]
    stream: String,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    window: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many acknowledged publishes (produce).
    #[arg(long)]
    records: Option<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")
}

/// CPU time (user + system) of this process, from /proc.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let a = Args::parse();
    let servers = a
        .servers
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(servers).await?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: a.stream.clone(),
            subjects: vec![a.stream.clone()],
            storage: stream::StorageType::File,
            num_replicas: a.replicas,
            ..Default::default()
        })
        .await?;
    let records = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(histogram()));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + a.duration;
    match a.mode {
        Mode::Produce => {
            let mut tasks = Vec::new();
            for i in 0..a.producers {
                let (js, a) = (js.clone(), a.clone());
                let (records, errors, hist) = (records.clone(), errors.clone(), hist.clone());
                let quota = a.records.map(|r| r / a.producers as u64 + u64::from((i as u64) < r % a.producers as u64));
                tasks.push(tokio::spawn(async move {
                    let window = Arc::new(Semaphore::new(a.window));
                    let mut acks = FuturesUnordered::new();
                    let value = Bytes::from(vec![b'x'; a.record_size]);
                    let mut sent = 0u64;
                    let mut local = histogram();
                    while Instant::now() < deadline && quota.is_none_or(|q| sent < q) {
                        let permit = loop {
                            tokio::select! {
                                biased;
                                Some(r) = acks.next(), if !acks.is_empty() => {
                                    if let Some(us) = r { local.saturating_record(us); }
                                }
                                p = window.clone().acquire_owned() => break p.expect("semaphore"),
                            }
                        };
                        let t = Instant::now();
                        sent += 1;
                        match js.publish(a.stream.clone(), value.clone()).await {
                            Ok(f) => {
                                let (records, errors) = (records.clone(), errors.clone());
                                acks.push(async move {
                                    let r = f.await;
                                    drop(permit);
                                    match r {
                                        Ok(_) => {
                                            records.fetch_add(1, Ordering::Relaxed);
                                            Some((t.elapsed().as_micros() as u64).max(1))
                                        }
                                        Err(_) => {
                                            errors.fetch_add(1, Ordering::Relaxed);
                                            None
                                        }
                                    }
                                });
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    while let Some(r) = acks.next().await {
                        if let Some(us) = r {
                            local.saturating_record(us);
                        }
                    }
                    hist.lock().expect("lock").add(&local).expect("bounds");
                }));
            }
            for t in tasks {
                t.await?;
            }
        }
        Mode::Consume => {
            let mut info = stream.clone();
            let last = info.info().await?.state.last_sequence;
            let c = stream
                .create_consumer(consumer::pull::Config {
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await?;
            let mut msgs = c.stream().max_messages_per_batch(1000).messages().await?;
            while Instant::now() < deadline {
                match msgs.next().await {
                    Some(Ok(m)) => {
                        let n = records.fetch_add(1, Ordering::Relaxed) + 1;
                        let _ = m.message.payload.len();
                        if n >= last {
                            break;
                        }
                    }
                    Some(Err(_)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu = match (cpu0, cpu_time()) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x).as_secs_f64() / elapsed.as_secs_f64()),
        _ => None,
    };
    let n = records.load(Ordering::Relaxed);
    let h = hist.lock().expect("lock");
    let ms = |us: u64| us as f64 / 1000.0;
    let latency = (!h.is_empty()).then(|| {
        serde_json::json!({
            "p50": ms(h.value_at_quantile(0.5)), "p90": ms(h.value_at_quantile(0.9)),
            "p99": ms(h.value_at_quantile(0.99)), "p99_9": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()), "mean": h.mean() / 1000.0,
        })
    });
    let s = elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "mode": match a.mode { Mode::Produce => "produce", Mode::Consume => "consume" },
            "records": n,
            "bytes": n * a.record_size as u64,
            "errors": errors.load(Ordering::Relaxed),
            "elapsed_s": s,
            "records_per_s": n as f64 / s,
            "mb_per_s": (n * a.record_size as u64) as f64 / s / 1e6,
            "latency_ms": latency,
            "client_cpu_cores": cpu,
        })
    );
    Ok(())
}
