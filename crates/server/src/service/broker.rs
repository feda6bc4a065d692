//! `runnel.v1.Broker`: one line per call, each to the module that implements it.

use runnel_proto::api;
use tonic::{Request, Response, Status};

use super::Api;
use super::{fetch, metadata, offsets, produce, producer_ids};

#[tonic::async_trait]
impl api::broker_server::Broker for Api {
    type SubscribeStream = fetch::FetchStream;

    async fn produce(
        &self,
        req: Request<api::ProduceRequest>,
    ) -> Result<Response<api::ProduceResponse>, Status> {
        produce::produce(self, req).await
    }

    async fn fetch(
        &self,
        req: Request<api::FetchRequest>,
    ) -> Result<Response<api::FetchResponse>, Status> {
        fetch::fetch(self, req).await
    }

    async fn subscribe(
        &self,
        req: Request<api::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        fetch::subscribe(self, req).await
    }

    async fn list_offsets(
        &self,
        req: Request<api::ListOffsetsRequest>,
    ) -> Result<Response<api::ListOffsetsResponse>, Status> {
        fetch::list_offsets(self, req).await
    }

    async fn commit_offsets(
        &self,
        req: Request<api::CommitOffsetsRequest>,
    ) -> Result<Response<api::CommitOffsetsResponse>, Status> {
        offsets::commit_offsets(self, req).await
    }

    async fn fetch_offsets(
        &self,
        req: Request<api::FetchOffsetsRequest>,
    ) -> Result<Response<api::FetchOffsetsResponse>, Status> {
        offsets::fetch_offsets(self, req).await
    }

    async fn init_producer_id(
        &self,
        req: Request<api::InitProducerIdRequest>,
    ) -> Result<Response<api::InitProducerIdResponse>, Status> {
        producer_ids::init_producer_id(self, req).await
    }

    async fn metadata(
        &self,
        req: Request<api::MetadataRequest>,
    ) -> Result<Response<api::MetadataResponse>, Status> {
        metadata::metadata(self, req).await
    }
}
