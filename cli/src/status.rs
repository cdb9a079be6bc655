//! Cluster status: epoch and phase from etcd, and for every node its sync-service status and
//! recovery progress over gRPC, as a table with progress bars or as JSON. Every figure comes
//! from counts the nodes keep with their data: a status call costs O(shards), whatever the
//! number of blobs.

use std::time::Duration;

use ferry_proto::v1::{
    self as pb, recovery_service_client::RecoveryServiceClient, sync_service_client::SyncServiceClient,
};
use ferry_shared::{control_plane::ControlPlane, grpc::Connector, types::ShardStatus};
use serde::Serialize;

/// One node's status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// Node id.
    pub node_id: String,
    /// Status from sync-service, or the error reaching it.
    pub status: Result<SyncReport, String>,
    /// Recovery progress, or the error reaching recovery-service.
    pub recovery: Result<RecoveryReport, String>,
}

/// What sync-service says.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Processed epoch.
    pub epoch: u64,
    /// Node status.
    pub node_status: String,
    /// Running shard syncs.
    pub running_syncs: u32,
    /// Blobs in the node's certified index.
    pub certified: u64,
    /// Whether the index caught up with the peers since the node started.
    pub index_caught_up: bool,
    /// Certified blobs owned shards lack, to be recovered.
    pub pending: u64,
    /// Shards.
    pub shards: Vec<ShardReport>,
}

/// One shard.
#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    /// Index.
    pub shard: u32,
    /// Status.
    pub status: String,
    /// Slivers stored.
    pub slivers: u64,
    /// Sync progress: (done, source, attempts, last error), if synced.
    pub sync: Option<(u64, String, u32, String)>,
}

/// What recovery-service says.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// Phase name.
    pub phase: String,
    /// Paused.
    pub paused: bool,
    /// Waiting for syncs.
    pub waiting_for_syncs: bool,
    /// Scanned.
    pub blobs_scanned: u64,
    /// Recovered.
    pub blobs_recovered: u64,
    /// Failed.
    pub blobs_failed: u64,
    /// Bytes fetched.
    pub bytes_fetched: u64,
    /// Blob checks saved by cursors kept across epoch changes.
    pub rescans_saved: u64,
}

/// The whole cluster's status.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// Current epoch.
    pub epoch: u64,
    /// Phase.
    pub phase: String,
    /// Certified blobs: the largest certified index among the nodes that answered.
    pub blobs: u64,
    /// Nodes.
    pub nodes: Vec<NodeReport>,
    /// Attesters of the current epoch.
    pub attesters: Vec<String>,
}

/// Collects the status of every member of the current committee.
pub async fn collect(cp: &ControlPlane, connector: &Connector) -> anyhow::Result<ClusterReport> {
    let phase = cp.current().await?.ok_or_else(|| anyhow::anyhow!("the cluster has no committee; is it up?"))?;
    let committee = cp.current_committee().await?.ok_or_else(|| anyhow::anyhow!("no committee"))?;
    let mut nodes = Vec::new();
    for m in &committee.members {
        let status = async {
            let mut c = SyncServiceClient::new(
                connector
                    .channel(&m.sync_address, &m.node_id, Some(Duration::from_secs(3)))
                    .map_err(|e| e.message().to_string())?,
            );
            let s = c.get_status(pb::GetStatusRequest {}).await.map_err(|e| e.message().to_string())?.into_inner();
            let node_status = ferry_shared::types::NodeStatus::from_proto(s.node_status, s.recovery_epoch)
                .map(|n| n.to_string())
                .unwrap_or_else(|e| e.to_string());
            Ok::<_, String>(SyncReport {
                epoch: s.epoch,
                node_status,
                running_syncs: s.running_syncs,
                certified: s.certified_count,
                index_caught_up: s.index_caught_up,
                pending: s.pending_count,
                shards: s
                    .shards
                    .into_iter()
                    .map(|r| ShardReport {
                        shard: r.shard,
                        status: ShardStatus::from_proto(r.status).map(|s| s.to_string()).unwrap_or_default(),
                        slivers: r.sliver_count,
                        sync: r.sync.map(|p| (p.blobs_done, p.source, p.attempts, p.last_error)),
                    })
                    .collect(),
            })
        }
        .await;
        let recovery = async {
            let mut c = RecoveryServiceClient::new(
                connector
                    .channel(&m.recovery_address, &m.node_id, Some(Duration::from_secs(3)))
                    .map_err(|e| e.message().to_string())?,
            );
            let s = c
                .get_recovery_status(pb::GetRecoveryStatusRequest {})
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            Ok::<_, String>(RecoveryReport {
                phase: pb::RecoveryPhase::try_from(s.phase)
                    .map(|p| p.as_str_name().trim_start_matches("RECOVERY_PHASE_").to_lowercase())
                    .unwrap_or_default(),
                paused: s.paused,
                waiting_for_syncs: s.waiting_for_syncs,
                blobs_scanned: s.blobs_scanned,
                blobs_recovered: s.blobs_recovered,
                blobs_failed: s.blobs_failed,
                bytes_fetched: s.bytes_fetched,
                rescans_saved: s.rescans_saved,
            })
        }
        .await;
        nodes.push(NodeReport { node_id: m.node_id.to_string(), status, recovery });
    }
    let attesters = cp.attestations(phase.epoch()).await?.into_iter().map(|a| a.node_id.to_string()).collect();
    let blobs = nodes.iter().filter_map(|n| n.status.as_ref().ok()).map(|s| s.certified).max().unwrap_or(0);
    Ok(ClusterReport { epoch: phase.epoch(), phase: format!("{phase:?}"), blobs, nodes, attesters })
}

fn bar(done: u64, total: u64) -> String {
    let width = 20;
    let filled = (done.min(total) * width as u64).checked_div(total).map_or(width, |f| f as usize);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Renders a report for people.
pub fn render(r: &ClusterReport) -> String {
    let mut out =
        format!("epoch {}  phase {}  blobs {}  attested: [{}]\n", r.epoch, r.phase, r.blobs, r.attesters.join(", "));
    for n in &r.nodes {
        match &n.status {
            Ok(s) => {
                out.push_str(&format!(
                    "{:<10} {:<24} epoch {}  running syncs {}  certified {}{}{}\n",
                    n.node_id,
                    s.node_status,
                    s.epoch,
                    s.running_syncs,
                    s.certified,
                    if s.index_caught_up { "" } else { " (index catching up)" },
                    if s.pending > 0 { format!("  pending {}", s.pending) } else { String::new() }
                ));
                for sh in &s.shards {
                    let progress = match &sh.sync {
                        Some((done, source, attempts, err)) if sh.status == "ActiveSync" => format!(
                            "sync from {source} {} {done}/{} attempts {attempts} {err}",
                            bar(*done, r.blobs),
                            r.blobs
                        ),
                        Some((done, source, _, _)) => format!("synced {done} from {source}"),
                        None => String::new(),
                    };
                    out.push_str(&format!(
                        "    shard {:>3} {:<13} {} {:>6} slivers {progress}\n",
                        sh.shard,
                        sh.status,
                        bar(sh.slivers, r.blobs),
                        sh.slivers
                    ));
                }
            }
            Err(e) => out.push_str(&format!("{:<10} UNREACHABLE: {e}\n", n.node_id)),
        }
        match &n.recovery {
            Ok(rec) => out.push_str(&format!(
                "    recovery {}{}{} scanned {} recovered {} failed {} fetched {} B, re-scan saved {}\n",
                rec.phase,
                if rec.paused { " (paused)" } else { "" },
                if rec.waiting_for_syncs { " (waiting for shard syncs)" } else { "" },
                rec.blobs_scanned,
                rec.blobs_recovered,
                rec.blobs_failed,
                rec.bytes_fetched,
                rec.rescans_saved
            )),
            Err(e) => out.push_str(&format!("    recovery UNREACHABLE: {e}\n")),
        }
    }
    out
}
