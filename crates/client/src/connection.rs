//! [`Client`]: connections to the cluster and the metadata cache (partition → leader) that the
//! producer, consumer and admin share. It imports none of them: each adds its own constructor
//! (`Client::producer`, `Client::consumer`, `Client::admin`) in its own module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Timeout of one RPC (long-poll fetches add their wait to it).
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// Largest response accepted.
    pub max_message_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            max_message_bytes: 64 << 20,
        }
    }
}

/// A partition's leader as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leader {
    pub node_id: u64,
    pub address: String,
}

#[derive(Debug, Clone)]
pub(crate) struct TopicInfo {
    pub leaders: Vec<Option<Leader>>,
}

/// What the cache keeps of a topic's metadata.
fn info_of(t: &api::TopicMetadata) -> TopicInfo {
    let leaders = t
        .partitions
        .iter()
        .map(|p| {
            (p.leader_id != 0 && !p.leader_address.is_empty()).then(|| Leader {
                node_id: p.leader_id,
                address: p.leader_address.clone(),
            })
        })
        .collect();
    TopicInfo { leaders }
}

pub(crate) struct Inner {
    pub cfg: ClientConfig,
    bootstrap: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    topics: Mutex<HashMap<String, TopicInfo>>,
    nodes: Mutex<Vec<String>>,
}

/// A handle on a Runnel cluster; cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bootstrap", &self.inner.bootstrap)
            .finish()
    }
}

impl Client {
    /// Connects to the cluster through any of `bootstrap` (`host:port` client addresses) and
    /// loads its metadata.
    pub async fn connect<I, S>(bootstrap: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(bootstrap, ClientConfig::default()).await
    }

    /// As [`Client::connect`], with settings.
    pub async fn connect_with<I, S>(bootstrap: I, cfg: ClientConfig) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let bootstrap: Vec<String> = bootstrap.into_iter().map(Into::into).collect();
        if bootstrap.is_empty() {
            return Err(Error::Invalid("no bootstrap address".into()));
        }
        let c = Client {
            inner: Arc::new(Inner {
                cfg,
                bootstrap: bootstrap.clone(),
                channels: Mutex::default(),
                topics: Mutex::default(),
                nodes: Mutex::new(bootstrap),
            }),
        };
        c.metadata(&[]).await?;
        Ok(c)
    }

    /// How long one call may take before it counts as failed (and retriable).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.inner.cfg.request_timeout
    }

    /// A lazily connected channel to `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut ch = self.inner.channels.lock().expect("channels");
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Invalid(format!("address {addr:?}: {e}")))?
            .connect_timeout(self.inner.cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        ch.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A Broker client for `addr`.
    pub fn broker(&self, addr: &str) -> Result<api::broker_client::BrokerClient<Channel>, Error> {
        Ok(api::broker_client::BrokerClient::new(self.channel(addr)?)
            .max_decoding_message_size(self.inner.cfg.max_message_bytes)
            .max_encoding_message_size(self.inner.cfg.max_message_bytes))
    }

    /// An Admin client for `addr`.
    pub fn admin_at(&self, addr: &str) -> Result<api::admin_client::AdminClient<Channel>, Error> {
        Ok(api::admin_client::AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(self.inner.cfg.max_message_bytes))
    }

    /// Every known node's client address (bootstrap first, then what metadata reported).
    pub fn nodes(&self) -> Vec<String> {
        self.inner.nodes.lock().expect("nodes").clone()
    }

    /// Asks nodes in turn for metadata of `topics` (all when empty) and caches the leaders.
    pub async fn metadata(&self, topics: &[String]) -> Result<api::MetadataResponse, Error> {
        let mut last = Error::Invalid("no node reachable".into());
        for addr in self.nodes() {
            let mut b = self.broker(&addr)?;
            let req = api::MetadataRequest {
                topics: topics.to_vec(),
            };
            match tokio::time::timeout(self.inner.cfg.request_timeout, b.metadata(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    self.absorb(&r);
                    return Ok(r);
                }
                Ok(Err(s)) => last = s.into(),
                Err(_) => last = Error::Timeout(format!("metadata from {addr}")),
            }
        }
        Err(last)
    }

    fn absorb(&self, r: &api::MetadataResponse) {
        {
            let mut nodes = self.inner.nodes.lock().expect("nodes");
            for n in &r.nodes {
                if !n.address.is_empty() && !nodes.contains(&n.address) {
                    nodes.push(n.address.clone());
                }
            }
        }
        let mut topics = self.inner.topics.lock().expect("topics");
        for t in &r.topics {
            if t.error.is_some() {
                topics.remove(&t.name);
                continue;
            }
            topics.insert(t.name.clone(), info_of(t));
        }
    }

    /// The number of partitions of `topic` (from the cache, else from the cluster).
    pub async fn partition_count(&self, topic: &str) -> Result<u32, Error> {
        Ok(self.topic_info(topic).await?.leaders.len() as u32)
    }

    pub(crate) async fn topic_info(&self, topic: &str) -> Result<TopicInfo, Error> {
        if let Some(t) = self.inner.topics.lock().expect("topics").get(topic) {
            return Ok(t.clone());
        }
        let r = self.metadata(&[topic.to_string()]).await?;
        match r.topics.iter().find(|t| t.name == topic) {
            // From the answer itself: the cache may have been invalidated meanwhile (a
            // concurrent NOT_LEADER), which must not read as "no partitions".
            Some(t) if t.error.is_none() => Ok(info_of(t)),
            Some(t) => Err(Error::from_api(t.error.as_ref().expect("error"))),
            None => Err(Error::Server {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("unknown topic {topic:?}"),
            }),
        }
    }

    /// The address to send `topic`/`partition` requests to: its cached leader, or any node.
    pub(crate) async fn leader_addr(&self, topic: &str, partition: u32) -> Result<String, Error> {
        let info = self.topic_info(topic).await?;
        match info.leaders.get(partition as usize) {
            Some(Some(l)) => Ok(l.address.clone()),
            Some(None) => Ok(self.nodes()[0].clone()),
            None => Err(Error::Server {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic {topic:?} has no partition {partition}"),
            }),
        }
    }

    /// Records a leader learned from a `NOT_LEADER` hint.
    pub(crate) fn set_leader(&self, topic: &str, partition: u32, hint: &api::LeaderHint) {
        if hint.address.is_empty() {
            return;
        }
        let mut topics = self.inner.topics.lock().expect("topics");
        if let Some(t) = topics.get_mut(topic)
            && let Some(slot) = t.leaders.get_mut(partition as usize)
        {
            *slot = Some(Leader {
                node_id: hint.node_id,
                address: hint.address.clone(),
            });
        }
    }

    /// Forgets what is cached about `topic`, so the next call asks the cluster.
    pub(crate) fn forget(&self, topic: &str) {
        self.inner.topics.lock().expect("topics").remove(topic);
    }

    /// Handles a failed partition call: follows a leader hint or drops the cache. Returns how
    /// long to back off before retrying (zero after a hint).
    pub(crate) fn on_partition_error(
        &self,
        topic: &str,
        partition: u32,
        e: &api::Error,
        backoff: Duration,
    ) -> Duration {
        match (ErrorCode::try_from(e.code), &e.leader) {
            (Ok(ErrorCode::NotLeader), Some(h)) if !h.address.is_empty() => {
                self.set_leader(topic, partition, h);
                Duration::ZERO
            }
            _ => {
                self.forget(topic);
                backoff
            }
        }
    }
}

/// Exponential backoff: `base * 2^attempt`, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(max)
}
