//! `runnel.v1.Admin`: one line per call, each to the module that implements it.

use runnel_proto::api;
use tonic::{Request, Response, Status};

use super::Api;
use super::{cluster_admin, topic_admin};

#[tonic::async_trait]
impl api::admin_server::Admin for Api {
    async fn create_topic(
        &self,
        req: Request<api::CreateTopicRequest>,
    ) -> Result<Response<api::CreateTopicResponse>, Status> {
        topic_admin::create_topic(self, req).await
    }

    async fn delete_topic(
        &self,
        req: Request<api::DeleteTopicRequest>,
    ) -> Result<Response<api::DeleteTopicResponse>, Status> {
        topic_admin::delete_topic(self, req).await
    }

    async fn list_topics(
        &self,
        _req: Request<api::ListTopicsRequest>,
    ) -> Result<Response<api::ListTopicsResponse>, Status> {
        topic_admin::list_topics(self, _req).await
    }

    async fn describe_topic(
        &self,
        req: Request<api::DescribeTopicRequest>,
    ) -> Result<Response<api::DescribeTopicResponse>, Status> {
        topic_admin::describe_topic(self, req).await
    }

    async fn cluster_status(
        &self,
        _req: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        cluster_admin::cluster_status(self, _req).await
    }

    async fn transfer_leader(
        &self,
        req: Request<api::TransferLeaderRequest>,
    ) -> Result<Response<api::TransferLeaderResponse>, Status> {
        cluster_admin::transfer_leader(self, req).await
    }

    async fn replace_node(
        &self,
        req: Request<api::ReplaceNodeRequest>,
    ) -> Result<Response<api::ReplaceNodeResponse>, Status> {
        cluster_admin::replace_node(self, req).await
    }
}
