//! recovery-service's gRPC API: status, a progress stream, the attestation log, and
//! pause/resume. With TLS on, pause and resume need this node's certificate or an operator's
//! client certificate; the read-only calls are open to any TLS client.

use std::{pin::Pin, sync::Arc};

use ferry_proto::v1::{self as pb, recovery_service_server::RecoveryService};
use ferry_shared::{
    tls::{self, PeerIdentity},
    types::NodeId,
};
use futures::Stream;
use tokio_stream::{StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::node_recovery::Recovery;

/// The gRPC implementation.
#[derive(Clone)]
pub struct RecoveryServer {
    recovery: Arc<Recovery>,
    me: NodeId,
    tls: bool,
}

impl RecoveryServer {
    /// Serves `recovery` for node `me`; `tls` says whether callers are authenticated.
    pub fn new(recovery: Arc<Recovery>, me: NodeId, tls: bool) -> Self {
        RecoveryServer { recovery, me, tls }
    }

    /// Operator calls: this node itself or a client certificate.
    fn authorize_operator<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        match tls::caller(request)? {
            Some(PeerIdentity::Client(_)) => Ok(()),
            Some(PeerIdentity::Node(id)) if id == self.me => Ok(()),
            Some(other) => {
                Err(Status::permission_denied(format!("{other} may not pause or resume recovery on node {}", self.me)))
            }
            None => Err(Status::unauthenticated("this call needs a client certificate issued by the cluster CA")),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RecoveryService for RecoveryServer {
    async fn get_recovery_status(
        &self,
        _request: Request<pb::GetRecoveryStatusRequest>,
    ) -> Result<Response<pb::RecoveryStatus>, Status> {
        Ok(Response::new(self.recovery.status()))
    }

    type WatchRecoveryStream = BoxStream<pb::RecoveryStatus>;

    async fn watch_recovery(
        &self,
        _request: Request<pb::WatchRecoveryRequest>,
    ) -> Result<Response<Self::WatchRecoveryStream>, Status> {
        Ok(Response::new(Box::pin(WatchStream::new(self.recovery.subscribe()).map(Ok))))
    }

    async fn list_attestations(
        &self,
        _request: Request<pb::ListAttestationsRequest>,
    ) -> Result<Response<pb::ListAttestationsResponse>, Status> {
        let records = self.recovery.attestations().await.map_err(|e| Status::internal(e.to_string()))?;
        let attestations = records
            .into_iter()
            .map(|a| pb::Attestation {
                node_id: a.node_id.to_string(),
                epoch: a.epoch,
                attested_by: a.attested_by,
                created_at_ms: a.created_at_ms,
                evidence: a
                    .evidence
                    .into_iter()
                    .map(|e| pb::ShardEvidence {
                        shard: e.shard.0,
                        blob_count: e.blob_count,
                        blob_ids_digest: hex::decode(e.blob_ids_digest).unwrap_or_default(),
                    })
                    .collect(),
                signature: hex::decode(a.signature).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListAttestationsResponse { attestations }))
    }

    async fn pause_recovery(
        &self,
        request: Request<pb::PauseRecoveryRequest>,
    ) -> Result<Response<pb::PauseRecoveryResponse>, Status> {
        self.authorize_operator(&request)?;
        self.recovery.set_paused(true).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::PauseRecoveryResponse {}))
    }

    async fn resume_recovery(
        &self,
        request: Request<pb::ResumeRecoveryRequest>,
    ) -> Result<Response<pb::ResumeRecoveryResponse>, Status> {
        self.authorize_operator(&request)?;
        self.recovery.set_paused(false).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ResumeRecoveryResponse {}))
    }
}
