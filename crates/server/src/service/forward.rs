//! Forwarding a call once to the node that can serve it (the metadata leader, a group's
//! leader), over the peer listener, with a deadline.

use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};
use tonic::{Request, Response, Status};

use super::{Shared, error};
use crate::metadata::META_GROUP;

/// Metadata key marking a request one node forwarded to another (never forwarded again).
pub(super) const FORWARDED: &str = "x-runnel-forwarded";

/// How long a forwarded call may take (the leader itself may wait up to [`ADMIN_WAIT`]).
pub(super) const FORWARD_WAIT: Duration = Duration::from_secs(15);

impl Shared {
    pub(super) fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, api::Error> {
        let mut ch = self.channels.lock().expect("channels lock");
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| error(ErrorCode::UnknownServerError, e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        ch.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Where to send a call that must run on `group`'s leader: `None` when that is this node,
    /// else a channel to the leader (an error if it is unknown or the call was forwarded once).
    pub(super) fn forward_target(
        &self,
        group: u64,
        forwarded: bool,
    ) -> Result<Option<tonic::transport::Channel>, api::Error> {
        let m = self.host.metrics(group);
        match m.as_ref().and_then(|m| m.leader) {
            Some(l) if l == self.node_id() => Ok(None),
            Some(l) if !forwarded => Ok(Some(self.channel(&self.peer_addr(group, l))?)),
            _ => Err(self.not_leader(group, m.as_ref())),
        }
    }

    /// The wall clocks of the other nodes that answer within `wait` (each asked over its peer
    /// listener, in parallel), for judging time against a quorum rather than one clock.
    pub async fn peer_clocks(&self, wait: Duration) -> Vec<i64> {
        let me = self.node_id();
        let asks = self
            .nodes()
            .into_iter()
            .filter(|n| n.node_id != me)
            .map(|n| self.peer_addr(META_GROUP, n.node_id))
            .filter(|a| !a.is_empty())
            .filter_map(|a| self.channel(&a).ok())
            .map(|ch| async move {
                let mut a = api::admin_client::AdminClient::new(ch);
                let call = a.cluster_status(mark_forwarded(api::ClusterStatusRequest {}));
                match tokio::time::timeout(wait, call).await {
                    Ok(Ok(r)) => Some(r.into_inner().wall_clock_ms),
                    _ => None,
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

pub(super) fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_some()
}

pub(super) fn mark_forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// A forwarded call, bounded: a leader that stopped (or vanished behind a black-holing network)
/// must not hold the caller forever.
pub(super) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    tokio::time::timeout(FORWARD_WAIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer from the leader within {FORWARD_WAIT:?}"
            )))
        })
}

pub(super) fn forward_failed(s: Status) -> api::Error {
    error(
        ErrorCode::LeaderNotAvailable,
        format!("forwarding to the leader failed: {}", s.message()),
    )
}
