//! Topic administration and cluster status.

use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};

use crate::connection::{Client, backoff};
use crate::error::Error;

/// Settings of a new topic; zeros take the cluster's defaults, -1 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicSpec {
    /// Partition count (0: the cluster's default).
    pub partitions: u32,
    /// Retention by age in ms.
    pub retention_ms: i64,
    /// Retention by size per partition.
    pub retention_bytes: i64,
    /// Segment file size.
    pub segment_bytes: u64,
}

impl TopicSpec {
    /// `n` partitions, other settings from the cluster's defaults.
    pub fn partitions(n: u32) -> Self {
        TopicSpec {
            partitions: n,
            ..Default::default()
        }
    }
}

/// How long one `ReplaceNode` call may run (the new replica catches up meanwhile).
pub const REPLACE_NODE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Admin operations; any node answers (writes are forwarded to the metadata leader).
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
    deadline: Duration,
    call_timeout: Duration,
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        let call_timeout = client.request_timeout();
        Admin {
            client,
            deadline: Duration::from_secs(30),
            call_timeout,
        }
    }

    /// Runs `call` against nodes in turn, retrying retriable outcomes until the deadline.
    async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(api::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut attempt = 0u32;
        loop {
            let nodes = self.client.nodes();
            let addr = &nodes[attempt as usize % nodes.len()];
            // A node that vanished behind a proxy or NAT may never answer: bound every call.
            let limit = self.call_timeout;
            let r = match self.client.admin_at(addr) {
                Ok(a) => tokio::time::timeout(limit, call(a))
                    .await
                    .unwrap_or_else(|_| Err(Error::Timeout(format!("{what} at {addr}")))),
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%e, what, "admin retry");
                    tokio::time::sleep(backoff(
                        attempt,
                        Duration::from_millis(50),
                        Duration::from_secs(1),
                    ))
                    .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Creates a topic; `TOPIC_ALREADY_EXISTS` if it exists.
    pub async fn create_topic(
        &self,
        name: &str,
        spec: TopicSpec,
    ) -> Result<api::TopicMetadata, Error> {
        let r = self
            .retry("create topic", |mut a| async move {
                let r = a
                    .create_topic(api::CreateTopicRequest {
                        name: name.to_string(),
                        partitions: spec.partitions,
                        retention_ms: spec.retention_ms,
                        retention_bytes: spec.retention_bytes,
                        segment_bytes: spec.segment_bytes,
                    })
                    .await?
                    .into_inner();
                match r.error {
                    Some(e) => Err(Error::from_api(&e)),
                    None => Ok(r.topic.unwrap_or_default()),
                }
            })
            .await?;
        self.client.forget(name);
        Ok(r)
    }

    /// Creates a topic unless it exists.
    pub async fn ensure_topic(&self, name: &str, spec: TopicSpec) -> Result<(), Error> {
        match self.create_topic(name, spec).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::TopicAlreadyExists) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        self.retry("delete topic", |mut a| async move {
            let r = a
                .delete_topic(api::DeleteTopicRequest {
                    name: name.to_string(),
                })
                .await?
                .into_inner();
            r.error.map_or(Ok(()), |e| Err(Error::from_api(&e)))
        })
        .await?;
        self.client.forget(name);
        Ok(())
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<api::TopicMetadata>, Error> {
        self.retry("list topics", |mut a| async move {
            Ok(a.list_topics(api::ListTopicsRequest {})
                .await?
                .into_inner()
                .topics)
        })
        .await
    }

    /// A topic's metadata and partition offsets, as the answering node sees them.
    pub async fn describe_topic(&self, name: &str) -> Result<api::DescribeTopicResponse, Error> {
        self.retry("describe topic", |mut a| async move {
            let r = a
                .describe_topic(api::DescribeTopicRequest {
                    name: name.to_string(),
                })
                .await?
                .into_inner();
            match &r.error {
                Some(e) => Err(Error::from_api(e)),
                None => Ok(r),
            }
        })
        .await
    }

    /// Cluster status as `addr` sees it.
    pub async fn cluster_status_at(&self, addr: &str) -> Result<api::ClusterStatusResponse, Error> {
        let mut a = self.client.admin_at(addr)?;
        Ok(a.cluster_status(api::ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// Moves leadership of `group` to `to_node`, waiting until it has moved.
    pub async fn transfer_leader(&self, group: u64, to_node: u64) -> Result<(), Error> {
        self.retry("transfer leader", |mut a| async move {
            let r = a
                .transfer_leader(api::TransferLeaderRequest {
                    group_id: group,
                    to_node,
                })
                .await?
                .into_inner();
            r.error.map_or(Ok(()), |e| Err(Error::from_api(&e)))
        })
        .await
    }

    /// Replaces member `old` (gone for good) by the new, empty node `new` (running with
    /// `join`) in every group: `new` catches up as a learner, then becomes a voter in place of
    /// `old`. Returns once every group has changed; safe to call again after a failure.
    pub async fn replace_node(
        &self,
        old: u64,
        new: u64,
        new_peer_address: &str,
        new_client_address: &str,
    ) -> Result<Vec<u64>, Error> {
        let req = api::ReplaceNodeRequest {
            old_node_id: old,
            new_node_id: new,
            new_peer_address: new_peer_address.to_string(),
            new_client_address: new_client_address.to_string(),
            groups: Vec::new(),
        };
        // Each group's new replica catches up inside the call: allow it an hour.
        let slow = Admin {
            call_timeout: REPLACE_NODE_TIMEOUT,
            ..self.clone()
        };
        let r = slow
            .retry("replace node", |mut a| {
                let req = req.clone();
                async move {
                    let r = a.replace_node(req).await?.into_inner();
                    match r.error {
                        Some(e) => Err(Error::from_api(&e)),
                        None => Ok(r.groups_done),
                    }
                }
            })
            .await?;
        let _ = self.client.metadata(&[]).await;
        Ok(r)
    }
}

impl Client {
    /// Admin operations.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }
}
