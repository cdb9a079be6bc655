//! recovery-service's gRPC API: status, a progress stream, the attestation log, and
//! pause/resume. Who may call what is [`method_table`], enforced by `ferry_shared::authz`
//! before a request is decoded: pause and resume need this node's certificate or an
//! operator's; the read-only calls any identity of the cluster.

use std::{pin::Pin, sync::Arc};

use ferry_proto::v1::{self as pb, recovery_service_server::RecoveryService};
use ferry_shared::authz::{Access, MethodRule, MethodTable, SMALL_REQUEST_BYTES, internal_error};
use futures::Stream;
use tokio_stream::{StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::node_recovery::Recovery;

/// The gRPC implementation.
#[derive(Clone)]
pub struct RecoveryServer {
    recovery: Arc<Recovery>,
}

impl RecoveryServer {
    /// Serves `recovery`.
    pub fn new(recovery: Arc<Recovery>) -> Self {
        RecoveryServer { recovery }
    }
}

/// Every method of the recovery-service port: who may call it and its largest request.
pub fn method_table() -> MethodTable {
    let rule = |path, access| MethodRule { path, access, max_request_bytes: SMALL_REQUEST_BYTES };
    MethodTable::new([
        rule("/ferry.v1.RecoveryService/GetRecoveryStatus", Access::Authenticated),
        rule("/ferry.v1.RecoveryService/WatchRecovery", Access::Authenticated),
        rule("/ferry.v1.RecoveryService/ListAttestations", Access::Authenticated),
        rule("/ferry.v1.RecoveryService/PauseRecovery", Access::SelfOrOperator),
        rule("/ferry.v1.RecoveryService/ResumeRecovery", Access::SelfOrOperator),
    ])
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
        let records = self.recovery.attestations().await.map_err(internal_error)?;
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
        _request: Request<pb::PauseRecoveryRequest>,
    ) -> Result<Response<pb::PauseRecoveryResponse>, Status> {
        self.recovery.set_paused(true).await.map_err(internal_error)?;
        Ok(Response::new(pb::PauseRecoveryResponse {}))
    }

    async fn resume_recovery(
        &self,
        _request: Request<pb::ResumeRecoveryRequest>,
    ) -> Result<Response<pb::ResumeRecoveryResponse>, Status> {
        self.recovery.set_paused(false).await.map_err(internal_error)?;
        Ok(Response::new(pb::ResumeRecoveryResponse {}))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn every_method_has_exactly_one_rule() {
        let mismatches =
            super::method_table().mismatches(ferry_proto::FILE_DESCRIPTOR_SET, &["ferry.v1.RecoveryService"]).unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }
}
