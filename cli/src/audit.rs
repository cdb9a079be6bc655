//! `ferryctl audit`: for every node of the current committee and every shard it owns, checks
//! that the node holds a sliver that verifies against the metadata for every certified blob,
//! and reports what is missing or corrupt, per node and shard. What an operator runs after an
//! incident to know, not assume, that no data was silently lost.
//!
//! What counts as certified is the union of every member's certified index (each member
//! verified every certificate in it), read a page at a time from all members together; each
//! page of the union is checked on every node with `AuditBlobs` (which reads and hashes the
//! slivers), so memory stays O(page x members). A member whose index lacks blobs others know
//! is reported too (its anti-entropy has not caught up). Blobs claimed to be encoded
//! inconsistently cannot be held by anyone and are counted apart. A node that cannot be asked,
//! or that is at another epoch than the committee, is a finding too: its data is not proven.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

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
    /// Certified blobs other members know that this node's index lacks (anti-entropy lag).
    pub index_missing: u64,
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
    index_missing: u64,
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
            (m.node_id.clone(), NodeTally { client, problem, index_missing: 0, shards })
        })
        .collect();
    let (mut certified, mut invalid) = (0u64, 0u64);
    let mut start = Some(BlobId::MIN);
    while let Some(from) = start {
        // One page from every member; the union is exact up to the smallest last id among the
        // pages that did not reach the end of the index.
        let mut pages: Vec<Option<IndexPage>> = Vec::with_capacity(tallies.len());
        for (_, tally) in tallies.iter_mut() {
            pages.push(list_page(tally, from).await);
        }
        let bound = pages
            .iter()
            .flatten()
            .filter(|(_, complete)| !complete)
            .filter_map(|(ids, _)| ids.last().map(|(id, _)| *id))
            .min();
        let within = |id: &BlobId| bound.is_none_or(|b| *id <= b);
        let mut union: BTreeMap<BlobId, bool> = BTreeMap::new();
        for (ids, _) in pages.iter().flatten() {
            for (id, claimed_invalid) in ids.iter().filter(|(id, _)| within(id)) {
                *union.entry(*id).or_default() |= *claimed_invalid;
            }
        }
        for ((_, tally), page) in tallies.iter_mut().zip(&pages) {
            if let Some((ids, _)) = page {
                let known: BTreeSet<BlobId> = ids.iter().map(|(id, _)| *id).filter(within).collect();
                tally.index_missing += union.keys().filter(|id| !known.contains(id)).count() as u64;
            }
        }
        invalid += union.values().filter(|v| **v).count() as u64;
        let ids: Vec<BlobId> = union.iter().filter(|(_, v)| !**v).map(|(id, _)| *id).collect();
        certified += ids.len() as u64;
        for chunk in ids.chunks(PAGE) {
            for (_, tally) in tallies.iter_mut() {
                audit_page(&committee, tally, chunk).await;
            }
        }
        start = bound.and_then(|b| b.successor());
    }
    let nodes = tallies
        .into_iter()
        .map(|(node, t)| NodeAudit {
            node,
            problem: t.problem,
            index_missing: t.index_missing,
            shards: t.shards.into_values().collect(),
        })
        .collect();
    Ok(AuditReport { epoch: committee.epoch, certified, invalid, nodes })
}

/// A page of a node's certified index from `from`: ids with whether an inconsistency was
/// claimed, and whether the index ended. `None` (and the node marked) if it cannot be read.
/// One page of a node's certified index: each blob with whether it is claimed invalid, and
/// whether the index ended.
type IndexPage = (Vec<(BlobId, bool)>, bool);

async fn list_page(tally: &mut NodeTally, from: BlobId) -> Option<IndexPage> {
    if tally.problem.is_some() {
        return None;
    }
    let client = tally.client.as_mut()?;
    let request =
        pb::ListCertifiedRequest { start_blob_id: from.0.to_vec(), end_blob_id: Vec::new(), limit: PAGE as u32 };
    match client.list_certified(request).await {
        Ok(r) => {
            let r = r.into_inner();
            let ids = r
                .blobs
                .iter()
                .filter_map(|e| Some((BlobId::from_bytes(&e.blob_id).ok()?, e.invalid.is_some())))
                .collect();
            Some((ids, r.complete))
        }
        Err(s) => {
            tally.problem = Some(format!("ListCertified failed: {}: {}", s.code(), s.message()));
            None
        }
    }
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
        if n.index_missing > 0 {
            let _ = writeln!(
                out,
                "    its certified index lacks {} blobs other members know (anti-entropy catching up)",
                n.index_missing
            );
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
