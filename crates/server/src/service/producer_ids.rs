//! `InitProducerId`: producer ids, handed out from blocks reserved in the metadata log.

use runnel_proto::api::{self};
use runnel_proto::raft as pb;
use tonic::{Request, Response, Status};

use super::forward::{bounded, forward_failed, forwarded, mark_forwarded};
use super::{Api, Shared};
use crate::metadata::{self, META_GROUP};

impl Shared {
    pub(super) async fn next_producer_id(&self) -> Result<i64, api::Error> {
        let mut pids = self.pids.lock().await;
        if pids.0 >= pids.1 {
            let offset = self
                .write_meta(pb::MetaRecord {
                    kind: Some(pb::meta_record::Kind::ProducerIdBlock(
                        pb::ProducerIdBlock {
                            node_id: self.node_id(),
                        },
                    )),
                })
                .await?;
            let start = metadata::producer_block_start(offset);
            *pids = (start, start + metadata::PRODUCER_ID_BLOCK);
        }
        let id = pids.0;
        pids.0 += 1;
        Ok(id)
    }
}

pub(super) async fn init_producer_id(
    api: &Api,
    req: Request<api::InitProducerIdRequest>,
) -> Result<Response<api::InitProducerIdResponse>, Status> {
    let s = &api.shared;
    let fwd = forwarded(&req);
    let fail = |e| api::InitProducerIdResponse {
        error: Some(e),
        producer_id: -1,
        producer_epoch: -1,
    };
    // Ids come in blocks reserved through the metadata group; a node that does not lead
    // it asks the leader.
    let have_block = {
        let p = s.pids.lock().await;
        p.0 < p.1
    };
    if !have_block {
        match s.forward_target(META_GROUP, fwd) {
            Err(e) => return Ok(Response::new(fail(e))),
            Ok(Some(ch)) => {
                let r = bounded(
                    api::broker_client::BrokerClient::new(ch)
                        .init_producer_id(mark_forwarded(api::InitProducerIdRequest {})),
                )
                .await;
                return Ok(Response::new(match r {
                    Ok(r) => r.into_inner(),
                    Err(st) => fail(forward_failed(st)),
                }));
            }
            Ok(None) => {}
        }
    }
    Ok(Response::new(match s.next_producer_id().await {
        Ok(id) => api::InitProducerIdResponse {
            error: None,
            producer_id: id,
            producer_epoch: 0,
        },
        Err(e) => fail(e),
    }))
}
