//! The recorded workload: idempotent producers writing unique values, and consumers that track
//! their own positions, commit after every poll, and can be killed between fetching and
//! committing.

use std::collections::BTreeMap;
use std::time::Duration;

use runnel_client::api::ErrorCode;
use runnel_client::{Client, ConsumerConfig, Error, ProducerConfig, ProducerRecord, StartFrom};
use tokio::sync::watch;

use crate::history::{Commit, Outcome, Poll, Recorder, Resume, Send};

/// The topic every run writes.
pub const TOPIC: &str = "faults";

/// How a send ended, from the client's error.
fn classify(e: &Error) -> Outcome {
    match e {
        // Refused by validation before anything could be written, on every attempt alike.
        Error::Server {
            code:
                ErrorCode::InvalidTopic
                | ErrorCode::InvalidRequest
                | ErrorCode::BatchTooLarge
                | ErrorCode::CorruptBatch,
            ..
        } => Outcome::Fail,
        Error::Invalid(_) | Error::Closed => Outcome::Fail,
        _ => Outcome::Unknown,
    }
}

/// Producer `index`: sends `p<index>-<seq>` (also the key) one at a time until `stop`; each
/// record carries `pad` bytes in a header (volume for segment rolls, not recorded).
pub async fn produce(
    client: Client,
    index: u32,
    pad: usize,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let padding = bytes::Bytes::from(vec![b'.'; pad]);
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        request_timeout: Duration::from_secs(2),
        delivery_timeout: Duration::from_secs(10),
        ..Default::default()
    });
    let mut seq = 0u64;
    while !*stop.borrow() {
        let value = format!("p{index}-{seq:07}");
        seq += 1;
        // Recorded at invoke as unknown, so a send cut short still appears in the history.
        let invoke = rec.now();
        let at = rec.with(|h| {
            h.sends.push(Send {
                producer: index,
                value: value.clone(),
                invoke,
                complete: invoke,
                outcome: Outcome::Unknown,
                acked_at: None,
                error: Some("in flight".into()),
            });
            h.sends.len() - 1
        });
        let r = match producer
            .send(TOPIC, {
                let r = ProducerRecord::new(value.clone()).key(value.clone());
                if pad > 0 {
                    r.header("pad", padding.clone())
                } else {
                    r
                }
            })
            .await
        {
            Ok(fut) => tokio::select! {
                r = fut => r,
                // Stopping: whatever is in flight has an unknown outcome.
                _ = stop.wait_for(|s| *s) => Err(Error::Timeout("run ended".into())),
            },
            Err(e) => Err(e),
        };
        let complete = rec.now();
        let send = match r {
            Ok(d) => Send {
                producer: index,
                value,
                invoke,
                complete,
                outcome: Outcome::Ok,
                acked_at: Some((d.partition, d.offset)),
                error: None,
            },
            Err(e) => Send {
                producer: index,
                value,
                invoke,
                complete,
                outcome: classify(&e),
                acked_at: None,
                error: Some(e.to_string()),
            },
        };
        let failed = send.outcome != Outcome::Ok;
        rec.with(|h| h.sends[at] = send);
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    producer.close().await;
}

/// Consumer `index` (its own group), incarnation `incarnation`: resumes at the group's
/// committed offsets, polls every partition, records what it saw, and commits after each
/// poll, until `stop`.
pub async fn consume(
    client: Client,
    index: u32,
    incarnation: u32,
    partitions: u32,
    rec: Recorder,
    stop: watch::Receiver<bool>,
) {
    let group = format!("consumer-{index}");
    let mut c = client.consumer(ConsumerConfig {
        max_wait: Duration::from_millis(300),
        retry_deadline: Duration::from_secs(5),
        ..ConsumerConfig::group(&group)
    });
    // Resume: what the group committed (retried until a leader answers).
    let parts: Vec<u32> = (0..partitions).collect();
    let committed = loop {
        if *stop.borrow() {
            return;
        }
        match c.committed(TOPIC, &parts).await {
            Ok(v) => break v,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut positions: BTreeMap<u32, i64> = BTreeMap::new();
    for (p, off) in committed {
        rec.with(|h| {
            h.resumes.push(Resume {
                consumer: index,
                incarnation,
                partition: p,
                committed: off,
                time: rec.now(),
            })
        });
        positions.insert(p, off.max(0));
    }
    loop {
        if *stop.borrow() {
            return;
        }
        // Assign at our own positions (a fresh assignment after an error re-seeks).
        if c.assign(TOPIC, Some(parts.clone()), StartFrom::Earliest)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for (p, o) in &positions {
            c.seek(TOPIC, *p, *o);
        }
        loop {
            if *stop.borrow() {
                return;
            }
            let before = positions.clone();
            let recs = match c.poll().await {
                Ok(r) => r,
                Err(_) => break, // re-assign and carry on from our positions
            };
            let time = rec.now();
            let mut by_part: BTreeMap<u32, Vec<(i64, String)>> = BTreeMap::new();
            for r in recs {
                let v =
                    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                by_part.entry(r.partition).or_default().push((r.offset, v));
            }
            for (p, records) in by_part {
                if let Some((last, _)) = records.last() {
                    positions.insert(p, last + 1);
                }
                rec.with(|h| {
                    h.polls.push(Poll {
                        consumer: index,
                        incarnation,
                        partition: p,
                        from: before[&p],
                        records,
                        time,
                    })
                });
            }
            // Commit what was processed (each changed partition).
            for (p, o) in positions.clone() {
                if before.get(&p) == Some(&o) {
                    continue;
                }
                // Recorded at invoke as unknown: a consumer killed mid-commit leaves it so.
                let invoke = rec.now();
                let at = rec.with(|h| {
                    h.commits.push(Commit {
                        consumer: index,
                        partition: p,
                        offset: o,
                        invoke,
                        complete: invoke,
                        outcome: Outcome::Unknown,
                    });
                    h.commits.len() - 1
                });
                let r = c.commit_offsets(TOPIC, &[(p, o)]).await;
                let outcome = match &r {
                    Ok(()) => Outcome::Ok,
                    Err(e) if e.code() == Some(ErrorCode::OffsetConflict) => Outcome::Fail,
                    Err(_) => Outcome::Unknown,
                };
                let complete = rec.now();
                rec.with(|h| {
                    h.commits[at].complete = complete;
                    h.commits[at].outcome = outcome;
                });
            }
        }
    }
}
