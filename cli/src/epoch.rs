//! Planning the next epoch: member changes -> the shared rebalance -> a plan that says which
//! shards move from whom to whom and how much data each move carries.

use std::collections::BTreeMap;

use std::time::Duration;

use anyhow::{Context, bail};
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    Committee, Member,
    committee::rebalance,
    control_plane::ControlPlane,
    grpc::Connector,
    types::{NodeId, ShardIndex},
};
use serde::Serialize;

/// One shard move of a plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardMove {
    /// Shard.
    pub shard: ShardIndex,
    /// Current owner.
    pub from: NodeId,
    /// Next owner.
    pub to: NodeId,
    /// Slivers the current owner holds in the shard ([`measure`]; 0 until measured).
    pub blobs: u64,
    /// Bytes of those slivers.
    pub bytes: u64,
}

/// The plan of an epoch change.
#[derive(Debug, Clone, Serialize)]
pub struct EpochPlan {
    /// The proposed committee.
    pub next: Committee,
    /// Shard moves.
    pub moves: Vec<ShardMove>,
}

/// Member changes requested on the command line.
#[derive(Debug, Clone, Default)]
pub struct MemberChanges {
    /// New members.
    pub add: Vec<Member>,
    /// Members to remove.
    pub remove: Vec<NodeId>,
    /// Weight changes.
    pub weights: Vec<(NodeId, u64)>,
}

/// Computes the plan of the next epoch from the current committee and `changes`.
pub async fn plan(cp: &ControlPlane, changes: &MemberChanges) -> anyhow::Result<EpochPlan> {
    let current = cp.current_committee().await?.context("the cluster has no committee; is it up?")?;
    let mut members: Vec<Member> = current.members.clone();
    for id in &changes.remove {
        let before = members.len();
        members.retain(|m| &m.node_id != id);
        if members.len() == before {
            bail!("cannot remove {id}: it is not a member");
        }
    }
    for m in &changes.add {
        if members.iter().any(|x| x.node_id == m.node_id) {
            bail!("cannot add {}: it is a member already", m.node_id);
        }
        members.push(m.clone());
    }
    for (id, w) in &changes.weights {
        let m = members
            .iter_mut()
            .find(|m| &m.node_id == id)
            .with_context(|| format!("cannot set the weight of {id}: not a member"))?;
        m.weight = *w;
    }
    let next = rebalance(&current, members).context("this change would leave shards without an owner")?;
    let moves = current
        .assignment
        .iter()
        .zip(&next.assignment)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| ShardMove {
            shard: ShardIndex(i as u32),
            from: a.clone(),
            to: b.clone(),
            blobs: 0,
            bytes: 0,
        })
        .collect();
    Ok(EpochPlan { next, moves })
}

/// Fills in how much each move carries, from the counts the current owners keep (one status
/// call per owner; an owner that does not answer leaves its moves at 0).
pub async fn measure(plan: &mut EpochPlan, cp: &ControlPlane, connector: &Connector) -> anyhow::Result<()> {
    let current = cp.current_committee().await?.context("the cluster has no committee; is it up?")?;
    let owners: std::collections::BTreeSet<NodeId> = plan.moves.iter().map(|m| m.from.clone()).collect();
    for owner in owners {
        let Some(member) = current.member(&owner) else { continue };
        let Ok(channel) = connector.channel(&member.sync_address, &owner, Some(Duration::from_secs(5))) else {
            continue;
        };
        let Ok(status) = SyncServiceClient::new(channel).get_status(pb::GetStatusRequest {}).await else { continue };
        for report in status.into_inner().shards {
            for m in plan.moves.iter_mut().filter(|m| m.from == owner && m.shard.0 == report.shard) {
                m.blobs = report.sliver_count;
                m.bytes = report.sliver_bytes;
            }
        }
    }
    Ok(())
}

/// Renders a plan for people.
pub fn render(plan: &EpochPlan) -> String {
    let mut out = format!("Plan for epoch {}: {} shard(s) move\n", plan.next.epoch, plan.moves.len());
    for m in &plan.moves {
        out.push_str(&format!(
            "  shard {:>3}: {} -> {}  ({} blobs, {} bytes)\n",
            m.shard.0, m.from, m.to, m.blobs, m.bytes
        ));
    }
    let mut per: BTreeMap<&NodeId, usize> = BTreeMap::new();
    for o in &plan.next.assignment {
        *per.entry(o).or_default() += 1;
    }
    out.push_str("  shards per node after: ");
    out.push_str(&per.iter().map(|(n, c)| format!("{n}={c}")).collect::<Vec<_>>().join(" "));
    out.push('\n');
    out
}
