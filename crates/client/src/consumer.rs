//! The consumer: a set of assigned partitions, each with a position (the next offset to
//! read). `poll` fetches from each partition's leader, follows `NOT_LEADER` hints and retries
//! without moving the position, so a leader change neither skips nor repeats a record.
//! `commit` stores the positions for the consumer group (at-least-once: commit after
//! processing).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use runnel_proto::api::{self, ErrorCode};
use runnel_record::RecordBatch;

use crate::connection::{Client, backoff};
use crate::error::{Error, retriable_code};

/// Where an assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The group's committed offset, or earliest when none is committed.
    Committed,
    /// The log start.
    Earliest,
    /// The high watermark (only new records).
    Latest,
    /// This offset.
    Offset(i64),
    /// The first record with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Consumer group for committed offsets (`None`: no commits).
    pub group: Option<String>,
    /// Bytes per fetch.
    pub max_bytes: u32,
    /// Long-poll wait when nothing is available.
    pub max_wait: Duration,
    /// Read from whichever replica is reached instead of the leader.
    pub allow_follower: bool,
    /// How long one call keeps retrying retriable errors.
    pub retry_deadline: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: None,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(500),
            allow_follower: false,
            retry_deadline: Duration::from_secs(30),
        }
    }
}

impl ConsumerConfig {
    /// Defaults with a consumer group.
    pub fn group(name: impl Into<String>) -> Self {
        ConsumerConfig {
            group: Some(name.into()),
            ..Default::default()
        }
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Timestamp (ms).
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
}

/// Reads assigned partitions and commits positions.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    cfg: ConsumerConfig,
    positions: BTreeMap<(String, u32), i64>,
}

impl Consumer {
    pub(crate) fn new(client: Client, cfg: ConsumerConfig) -> Self {
        Consumer {
            client,
            cfg,
            positions: BTreeMap::new(),
        }
    }

    /// Assigns `partitions` of `topic` (all when `None`), each starting at `from`.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<Vec<u32>>,
        from: StartFrom,
    ) -> Result<(), Error> {
        let n = self.client.partition_count(topic).await?;
        let parts = partitions.unwrap_or_else(|| (0..n).collect());
        let committed = match (from, &self.cfg.group) {
            (StartFrom::Committed, Some(_)) => self.committed(topic, &parts).await?,
            (StartFrom::Committed, None) => {
                return Err(Error::Invalid(
                    "starting from committed offsets needs a consumer group".into(),
                ));
            }
            _ => BTreeMap::new(),
        };
        for p in parts {
            if p >= n {
                return Err(Error::Server {
                    code: ErrorCode::UnknownTopicOrPartition,
                    message: format!("topic {topic:?} has {n} partitions; {p} does not exist"),
                });
            }
            let pos = match from {
                StartFrom::Offset(o) => o,
                StartFrom::Earliest => self.list_offset(topic, p, -2).await?,
                StartFrom::Latest => self.list_offset(topic, p, -1).await?,
                StartFrom::Timestamp(ts) => self.list_offset(topic, p, ts.max(0)).await?,
                StartFrom::Committed => match committed.get(&p) {
                    Some(&o) if o >= 0 => o,
                    _ => self.list_offset(topic, p, -2).await?,
                },
            };
            self.positions.insert((topic.to_string(), p), pos);
        }
        Ok(())
    }

    /// Moves a partition's position.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: i64) {
        self.positions
            .insert((topic.to_string(), partition), offset);
    }

    /// The next offset to read of a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.positions.get(&(topic.to_string(), partition)).copied()
    }

    /// Every assigned partition with its position.
    pub fn positions(&self) -> &BTreeMap<(String, u32), i64> {
        &self.positions
    }

    /// `ListOffsets` for one partition (-2 earliest, -1 latest, >= 0 by timestamp).
    pub async fn list_offset(&self, topic: &str, partition: u32, ts: i64) -> Result<i64, Error> {
        let req = api::ListOffsetsRequest {
            topic: topic.to_string(),
            partition,
            timestamp_ms: ts,
            allow_follower: self.cfg.allow_follower,
        };
        self.with_leader(topic, partition, |mut b| {
            let req = req.clone();
            async move {
                let r = b.list_offsets(req).await?.into_inner();
                Ok((r.error.clone(), r.offset))
            }
        })
        .await
    }

    async fn with_leader<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(api::broker_client::BrokerClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(Option<api::Error>, T), Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.cfg.retry_deadline;
        let mut attempt = 0;
        loop {
            // A node that vanished behind a proxy or NAT may never answer: bound every call
            // (a fetch may legitimately wait up to max_wait on the server).
            let limit = self.client.request_timeout() + self.cfg.max_wait;
            let r = tokio::time::timeout(limit, async {
                let addr = self.client.leader_addr(topic, partition).await?;
                call(self.client.broker(&addr)?).await
            })
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout(format!(
                    "{topic}/{partition}: no answer within {limit:?}"
                )))
            });
            let wait = match r {
                Ok((None, v)) => return Ok(v),
                Ok((Some(e), _)) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::UnknownServerError);
                    if !retriable_code(code) {
                        return Err(Error::from_api(&e));
                    }
                    self.client.on_partition_error(
                        topic,
                        partition,
                        &e,
                        backoff(attempt, Duration::from_millis(20), Duration::from_secs(1)),
                    )
                }
                Err(e) if e.is_retriable() => {
                    self.client.forget(topic);
                    backoff(attempt, Duration::from_millis(20), Duration::from_secs(1))
                }
                Err(e) => return Err(e),
            };
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(Error::Timeout(format!(
                    "{topic}/{partition}: no leader answered within {:?}",
                    self.cfg.retry_deadline
                )));
            }
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    async fn fetch_one(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        wait: Duration,
    ) -> Result<(Vec<ConsumerRecord>, i64), Error> {
        let req = api::FetchRequest {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes: self.cfg.max_bytes,
            max_wait_ms: wait.as_millis() as u32,
            raw: true,
            allow_follower: self.cfg.allow_follower,
        };
        let resp = self
            .with_leader(topic, partition, |mut b| {
                let req = req.clone();
                async move {
                    let r = b.fetch(req).await?.into_inner();
                    Ok((r.error.clone(), r))
                }
            })
            .await?;
        let mut out = Vec::new();
        let mut next = offset;
        if !resp.raw_batches.is_empty() {
            let batches = RecordBatch::split_all(&resp.raw_batches)
                .map_err(|e| Error::Invalid(format!("corrupt fetch response: {e}")))?;
            for b in batches {
                for r in b
                    .records()
                    .map_err(|e| Error::Invalid(format!("corrupt batch: {e}")))?
                {
                    let r = r.map_err(|e| Error::Invalid(format!("corrupt record: {e}")))?;
                    let off = r.offset as i64;
                    if off < offset {
                        continue;
                    }
                    next = off + 1;
                    out.push(ConsumerRecord {
                        topic: topic.to_string(),
                        partition,
                        offset: off,
                        timestamp_ms: r.timestamp,
                        key: r.key,
                        value: r.value,
                        headers: r
                            .headers
                            .into_iter()
                            .map(|h| {
                                (
                                    String::from_utf8_lossy(&h.key).into_owned(),
                                    h.value.unwrap_or_default(),
                                )
                            })
                            .collect(),
                    });
                }
            }
        }
        Ok((out, next.max(offset)))
    }

    /// Fetches what is available from every assigned partition; when nothing is, waits up to
    /// `max_wait` for the first partition to get data. Advances positions past what it returns.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, Error> {
        let got = self.poll_round(Duration::ZERO).await?;
        if !got.is_empty() {
            return Ok(got);
        }
        self.poll_round(self.cfg.max_wait).await
    }

    async fn poll_round(&mut self, wait: Duration) -> Result<Vec<ConsumerRecord>, Error> {
        let me = &*self;
        let mut futs: FuturesUnordered<_> = me
            .positions
            .iter()
            .map(|((t, p), o)| {
                let (t, p, o) = (t.clone(), *p, *o);
                async move {
                    let r = me.fetch_one(&t, p, o, wait).await;
                    (t, p, r)
                }
            })
            .collect();
        let mut out = Vec::new();
        let mut advanced = Vec::new();
        while let Some((t, p, r)) = futs.next().await {
            let (recs, next) = r?;
            let has = !recs.is_empty();
            out.extend(recs);
            advanced.push((t, p, next));
            if has && !wait.is_zero() {
                break; // long-polling: the first partition with data ends the wait
            }
        }
        drop(futs);
        for (t, p, next) in advanced {
            self.positions.insert((t, p), next);
        }
        Ok(out)
    }

    /// Commits every assigned partition's position for the group.
    pub async fn commit(&self) -> Result<(), Error> {
        let mut by_topic: BTreeMap<&str, Vec<(u32, i64)>> = BTreeMap::new();
        for ((t, p), o) in &self.positions {
            by_topic.entry(t).or_default().push((*p, *o));
        }
        for (t, offs) in by_topic {
            self.commit_offsets(t, &offs).await?;
        }
        Ok(())
    }

    /// Commits `offsets` (partition, next offset to consume) of `topic` for the group.
    pub async fn commit_offsets(&self, topic: &str, offsets: &[(u32, i64)]) -> Result<(), Error> {
        let group = self
            .cfg
            .group
            .clone()
            .ok_or_else(|| Error::Invalid("committing needs a consumer group".into()))?;
        for &(p, o) in offsets {
            let req = api::CommitOffsetsRequest {
                group: group.clone(),
                topic: topic.to_string(),
                offsets: vec![api::PartitionOffset {
                    partition: p,
                    offset: o,
                    expected_previous: None,
                }],
            };
            self.with_leader(topic, p, |mut b| {
                let req = req.clone();
                async move {
                    let r = b.commit_offsets(req).await?.into_inner();
                    Ok((r.results.first().and_then(|x| x.error.clone()), ()))
                }
            })
            .await?;
        }
        Ok(())
    }

    /// The group's committed offsets of `partitions` (-1: none).
    pub async fn committed(
        &self,
        topic: &str,
        partitions: &[u32],
    ) -> Result<BTreeMap<u32, i64>, Error> {
        let group = self
            .cfg
            .group
            .clone()
            .ok_or_else(|| Error::Invalid("committed offsets need a consumer group".into()))?;
        let mut out = BTreeMap::new();
        for &p in partitions {
            let req = api::FetchOffsetsRequest {
                group: group.clone(),
                topic: topic.to_string(),
                partitions: vec![p],
            };
            let o = self
                .with_leader(topic, p, |mut b| {
                    let req = req.clone();
                    async move {
                        let r = b.fetch_offsets(req).await?.into_inner();
                        let first = r.offsets.first().cloned().unwrap_or_default();
                        Ok((first.error, first.offset))
                    }
                })
                .await?;
            out.insert(p, o);
        }
        Ok(out)
    }
}

impl Client {
    /// A consumer.
    pub fn consumer(&self, cfg: ConsumerConfig) -> Consumer {
        Consumer::new(self.clone(), cfg)
    }
}
