//! `ferryctl audit`: for every node of the current committee and every shard it owns, checks
//! that the node holds a sliver that verifies against the metadata for every certified blob,
//! and reports what is missing or corrupt, per node and shard. What an operator runs after an
//! incident to know, not assume, that no data was silently lost.
//!
//! The registry is read a page at a time and each page is checked on every node with
//! `AuditBlobs` (which reads and hashes the slivers), so memory stays O(page). Blobs whose
//! writer encoded them inconsistently (marked invalid with a proof) cannot be held by anyone
//! and are counted apart. A node that cannot be asked, or that is at another epoch than the
//! committee, is a finding too: its data is not proven.

use std::{collections::BTreeMap, fmt::Write as _, sync::Arc, time::Duration};

use anyhow::Context as _;
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    Committee,
    control_plane::ControlPlane,
    grpc::{self, Connector},
    types::{BlobId, NodeId, ShardIndex},
};
use serde::Serialize;

/// Blobs per registry page and per `AuditBlobs` call (the server's limit).
const PAGE: usize = 1024;
/// Missing blob ids kept per shard in the report, as examples.
const EXAMPLES: usize = 5;

/// What the audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// The committee's epoch.
    pub epoch: u64,
    /// Certified blobs checked (invalid ones excluded).
    pub certified: u64,
    /// Certified blobs marked invalid (inconsistently encoded), not expected anywhere.
    pub invalid: u64,
    /// One entry per member.
    pub nodes: Vec<NodeAudit>,
}

/// One node's findings.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAudit {
    /// The node.
    pub node: NodeId,
    /// Why the node could not be audited (unreachable, at another epoch), if so.
    pub problem: Option<String>,
    /// Per owned shard.
    pub shards: Vec<ShardAudit>,
}

/// One shard's findings on its owner.
#[derive(Debug, Clone, Serialize)]
pub struct ShardAudit {
    /// The shard.
    pub shard: u32,
    /// Certified blobs without a sliver here.
    pub missing: u64,
    /// Certified blobs whose sliver here does not verify.
    pub corrupt: u64,
    /// A few of the blobs missing or corrupt.
    pub examples: Vec<String>,
}

impl AuditReport {
    /// Number of holes: missing or corrupt slivers, plus one per node that could not be audited.
    pub fn holes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| u64::from(n.problem.is_some()) + n.shards.iter().map(|s| s.missing + s.corrupt).sum::<u64>())
            .sum()
    }
}

struct NodeTally {
    client: Option<SyncServiceClient<grpc::TracedChannel>>,
    problem: Option<String>,
    shards: BTreeMap<u32, ShardAudit>,
}

/// Runs the audit against the cluster's current committee.
pub async fn run(control_plane: &ControlPlane, connector: &Connector) -> anyhow::Result<AuditReport> {
    let committee = control_plane.current_committee().await?.context("the cluster has no committee; is it up?")?;
    let mut tallies: Vec<(NodeId, NodeTally)> = committee
        .members
        .iter()
        .map(|m| {
            let shards = committee
                .shards_of(&m.node_id)
                .into_iter()
                .map(|s| (s.0, ShardAudit { shard: s.0, missing: 0, corrupt: 0, examples: Vec::new() }))
                .collect();
            let (client, problem) = match connector.channel(&m.sync_address, &m.node_id, Some(Duration::from_secs(30)))
            {
                Ok(c) => (Some(SyncServiceClient::new(c).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)), None),
                Err(s) => (None, Some(format!("cannot reach it: {}", s.message()))),
            };
            (m.node_id.clone(), NodeTally { client, problem, shards })
        })
        .collect();
    let mut committees: BTreeMap<u64, Arc<Committee>> = BTreeMap::new();
    let (mut certified, mut invalid) = (0u64, 0u64);
    let mut start = None;
    loop {
        let page = control_plane.list_blobs(start, PAGE).await?;
        let Some(last) = page.last().map(|b| b.blob_id) else { break };
        let mut ids: Vec<BlobId> = Vec::new();
        for record in &page {
            let Some(cert) = &record.certificate else { continue };
            let cert_committee = match committees.get(&cert.epoch) {
                Some(c) => c.clone(),
                None => {
                    let Some(c) = control_plane.committee(cert.epoch).await? else { continue };
                    let c = Arc::new(c);
                    committees.insert(cert.epoch, c.clone());
                    c
                }
            };
            if cert.verify(&record.blob_id, &cert_committee).is_err() {
                continue; // not certified, whatever the record says
            }
            if record.invalid.is_some() {
                invalid += 1;
                continue;
            }
            ids.push(record.blob_id);
        }
        certified += ids.len() as u64;
        if !ids.is_empty() {
            for (_, tally) in tallies.iter_mut() {
                audit_page(&committee, tally, &ids).await;
            }
        }
        match last.successor() {
            Some(next) => start = Some(next),
            None => break,
        }
    }
    let nodes = tallies
        .into_iter()
        .map(|(node, t)| NodeAudit { node, problem: t.problem, shards: t.shards.into_values().collect() })
        .collect();
    Ok(AuditReport { epoch: committee.epoch, certified, invalid, nodes })
}

async fn audit_page(committee: &Committee, tally: &mut NodeTally, ids: &[BlobId]) {
    if tally.problem.is_some() {
        return;
    }
    let Some(client) = tally.client.as_mut() else { return };
    let request = pb::AuditBlobsRequest { blob_ids: ids.iter().map(|b| b.0.to_vec()).collect() };
    let response = match client.audit_blobs(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tally.problem = Some(format!("AuditBlobs failed: {}: {}", s.code(), s.message()));
            return;
        }
    };
    if response.epoch != committee.epoch {
        tally.problem = Some(format!("it is at epoch {}, the committee at {}", response.epoch, committee.epoch));
        return;
    }
    for blob in response.blobs {
        let id = BlobId::from_bytes(&blob.blob_id).map(|b| b.to_hex()).unwrap_or_default();
        for (shards, corrupt) in [(&blob.missing_shards, false), (&blob.corrupt_shards, true)] {
            for shard in shards {
                let Some(s) = tally.shards.get_mut(shard) else { continue };
                if corrupt {
                    s.corrupt += 1;
                } else {
                    s.missing += 1;
                }
                if s.examples.len() < EXAMPLES {
                    s.examples.push(id.clone());
                }
            }
        }
    }
}

/// The report as text: one line per node, one more per shard with a hole.
pub fn render(report: &AuditReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "audit of epoch {}: {} certified blobs ({} invalid, not expected anywhere)",
        report.epoch, report.certified, report.invalid
    );
    for n in &report.nodes {
        let holes: u64 = n.shards.iter().map(|s| s.missing + s.corrupt).sum();
        match &n.problem {
            Some(p) => {
                let _ = writeln!(out, "  {}: NOT AUDITED: {p}", n.node);
            }
            None if holes == 0 => {
                let _ = writeln!(out, "  {}: ok, {} shards hold every certified blob", n.node, n.shards.len());
            }
            None => {
                let _ = writeln!(out, "  {}: {holes} HOLES", n.node);
            }
        }
        for s in n.shards.iter().filter(|s| s.missing + s.corrupt > 0) {
            let _ = writeln!(
                out,
                "    shard {:>4}: {} missing, {} corrupt (e.g. {})",
                s.shard,
                s.missing,
                s.corrupt,
                s.examples.join(", ")
            );
        }
    }
    let holes = report.holes();
    let _ = writeln!(out, "{}", if holes == 0 { "no holes".to_string() } else { format!("{holes} holes") });
    out
}

/// Shards of `report` with a hole, as `(node, shard)`, for tests and scripts.
pub fn holes_by_shard(report: &AuditReport) -> Vec<(NodeId, ShardIndex, u64)> {
    report
        .nodes
        .iter()
        .flat_map(|n| {
            n.shards
                .iter()
                .filter(|s| s.missing + s.corrupt > 0)
                .map(move |s| (n.node.clone(), ShardIndex(s.shard), s.missing + s.corrupt))
        })
        .collect()
}
