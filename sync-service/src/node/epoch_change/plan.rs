//! What an epoch change (or a restart) does to the node, decided without I/O: the new node
//! status, the shard records to write, the storage to create and the syncs to stop and start.
//! `epoch_change` applies a plan; the table tests here cover every case.

use std::collections::BTreeSet;

use ferry_shared::{
    diff::{EpochDiff, FillPath},
    types::{NodeId, NodeStatus, ShardIndex, ShardStatus},
};

use super::super::{
    NodeView,
    shard_state::{self, IllegalTransition, ShardEvent},
};
use crate::{config::FillMethod, store::ShardRecord};

/// The writes and task changes of one epoch change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// Node status after the change.
    pub status: NodeStatus,
    /// Shard records to write, in one batch with the node state.
    pub records: Vec<(ShardIndex, ShardRecord)>,
    /// Shards whose storage must exist before the records are written.
    pub create_storage: Vec<ShardIndex>,
    /// Running syncs to stop: of shards lost, and of shards gained again (they restart).
    pub abort_syncs: Vec<ShardIndex>,
    /// Syncs to start once the batch is written.
    pub start_syncs: Vec<ShardIndex>,
}

/// The plan for applying `diff` (of the epoch `epoch`) to a node whose persisted view is
/// `view`. `member` says whether the node is in the new committee.
pub fn plan(
    view: &NodeView,
    diff: &EpochDiff,
    epoch: u64,
    member: bool,
    fill: FillMethod,
) -> Result<EpochPlan, IllegalTransition> {
    let status = match (member, diff.path, view.status()) {
        (false, _, _) => NodeStatus::Standby,
        (true, FillPath::Genesis, _) => NodeStatus::Active,
        (true, FillPath::CatchUp, _) => NodeStatus::RecoveryInProgress(epoch),
        (true, FillPath::Incremental, NodeStatus::RecoveryInProgress(_) | NodeStatus::RecoveryCatchUp) => {
            NodeStatus::RecoveryInProgress(epoch)
        }
        (true, FillPath::Incremental, _) => NodeStatus::Active,
    };

    let mut records = Vec::new();
    let mut abort_syncs = Vec::new();
    for g in &diff.gained {
        let existing = view.shards.get(&g.shard);
        let event = match (diff.path, &g.previous_owner, fill) {
            (FillPath::Genesis, _, _) => ShardEvent::Genesis,
            (FillPath::Incremental, Some(source), FillMethod::ShardSync) => {
                ShardEvent::GainedBySync { epoch, source: source.clone() }
            }
            // Catch-up: whatever the node holds may lack blobs certified while it was away,
            // so every owned shard (held before or not) is scanned by blob recovery.
            _ => ShardEvent::GainedByRecovery,
        };
        if existing.is_some() {
            abort_syncs.push(g.shard); // a shard gained again restarts its fill
        }
        records.push((g.shard, shard_state::apply(existing, &event)?));
    }
    // Lost shards are locked, not deleted (rule 1). On catch-up the previous assignment is
    // unknown: every held shard the node does not own now.
    let owned_next: BTreeSet<ShardIndex> = diff.owned_next().into_iter().collect();
    for (shard, record) in &view.shards {
        if !owned_next.contains(shard) && record.status != ShardStatus::LockedToMove {
            abort_syncs.push(*shard);
            records.push((*shard, shard_state::apply(Some(record), &ShardEvent::Lost { epoch })?));
        }
    }
    abort_syncs.sort();
    abort_syncs.dedup();
    let create_storage = records.iter().map(|(s, _)| *s).filter(|s| owned_next.contains(s)).collect();
    let start_syncs = records.iter().filter(|(_, r)| r.status == ShardStatus::ActiveSync).map(|(s, _)| *s).collect();
    Ok(EpochPlan { status, records, create_storage, abort_syncs, start_syncs })
}

/// The records a restart rewrites: every owned shard that claims data (`Active`, or in the
/// middle of a blob-recovery scan) may lack blobs certified while the node was down, so it
/// needs a new scan (rule 9). Syncing shards need none: a sync's completion checks the shard
/// against every certified blob.
pub fn restart(view: &NodeView, me: &NodeId) -> Result<Vec<(ShardIndex, ShardRecord)>, IllegalTransition> {
    let owned: BTreeSet<ShardIndex> = view.owned(me).into_iter().collect();
    view.shards
        .iter()
        .filter(|(shard, r)| {
            owned.contains(shard) && matches!(r.status, ShardStatus::Active | ShardStatus::ActiveRecover)
        })
        .map(|(shard, r)| Ok((*shard, shard_state::apply(Some(r), &ShardEvent::HistoryBroken)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use ferry_shared::{
        Committee, Member,
        diff::{PreviousAssignment, diff},
    };

    use super::*;
    use crate::store::NodeState;

    fn id(s: &str) -> NodeId {
        NodeId::new(s.to_string()).unwrap()
    }

    fn member(name: &str) -> Member {
        Member {
            node_id: id(name),
            public_key: String::new(),
            bls_key: String::new(),
            sync_address: String::new(),
            recovery_address: String::new(),
            weight: 1,
        }
    }

    /// Epoch `epoch` with shards 0..4 owned by `owners[i]`.
    fn committee(epoch: u64, owners: [&str; 4]) -> Committee {
        let mut names: Vec<&str> = owners.to_vec();
        names.sort();
        names.dedup();
        Committee {
            epoch,
            n_shards: 4,
            members: names.iter().map(|n| member(n)).collect(),
            assignment: owners.iter().map(|o| id(o)).collect(),
        }
    }

    fn view(status: NodeStatus, c: &Committee, shards: &[(u32, ShardStatus)]) -> NodeView {
        let shards: BTreeMap<ShardIndex, ShardRecord> =
            shards.iter().map(|(s, st)| (ShardIndex(*s), ShardRecord::new(*st))).collect();
        NodeView {
            state: Some(NodeState { status, epoch: c.epoch, committee: c.clone(), last_revision: 1 }),
            shards,
            ..NodeView::default()
        }
    }

    fn statuses(p: &EpochPlan) -> Vec<(u32, ShardStatus)> {
        p.records.iter().map(|(s, r)| (s.0, r.status)).collect()
    }

    use ShardStatus::*;

    #[test]
    fn every_path_and_starting_status_gives_the_documented_plan() {
        let me = id("a");
        let c0 = committee(0, ["a", "a", "b", "b"]);
        let c1 = committee(1, ["a", "c", "a", "b"]); // a keeps 0, loses 1, gains 2 from b
        struct Case {
            name: &'static str,
            view: NodeView,
            previous: Option<Committee>, // None = catch-up (unknown)
            next: Committee,
            fill: FillMethod,
            status: NodeStatus,
            records: Vec<(u32, ShardStatus)>,
            start: Vec<u32>,
            abort: Vec<u32>,
        }
        let active = view(NodeStatus::Active, &c0, &[(0, Active), (1, Active)]);
        let recovering = view(NodeStatus::RecoveryInProgress(0), &c0, &[(0, ActiveRecover), (1, ActiveRecover)]);
        let cases = vec![
            Case {
                name: "incremental, Active node: gained by sync, lost locked, kept untouched",
                view: active.clone(),
                previous: Some(c0.clone()),
                next: c1.clone(),
                fill: FillMethod::ShardSync,
                status: NodeStatus::Active,
                records: vec![(2, ActiveSync), (1, LockedToMove)],
                start: vec![2],
                abort: vec![1],
            },
            Case {
                name: "incremental, recovering node: still recovering, at the new epoch; kept keeps its scan",
                view: recovering.clone(),
                previous: Some(c0.clone()),
                next: c1.clone(),
                fill: FillMethod::ShardSync,
                status: NodeStatus::RecoveryInProgress(1),
                records: vec![(2, ActiveSync), (1, LockedToMove)],
                start: vec![2],
                abort: vec![1],
            },
            Case {
                name: "incremental with blob recovery as the fill method",
                view: active.clone(),
                previous: Some(c0.clone()),
                next: c1.clone(),
                fill: FillMethod::BlobRecovery,
                status: NodeStatus::Active,
                records: vec![(2, ActiveRecover), (1, LockedToMove)],
                start: vec![],
                abort: vec![1],
            },
            Case {
                name: "catch-up: every owned shard is scanned, the held Active one too",
                view: active.clone(),
                previous: None,
                next: committee(3, ["a", "c", "a", "b"]),
                fill: FillMethod::ShardSync,
                status: NodeStatus::RecoveryInProgress(3),
                records: vec![(0, ActiveRecover), (2, ActiveRecover), (1, LockedToMove)],
                start: vec![],
                abort: vec![0, 1],
            },
            Case {
                name: "removed from the committee: Standby, everything locked",
                view: active.clone(),
                previous: Some(c0.clone()),
                next: committee(1, ["b", "b", "b", "b"]),
                fill: FillMethod::ShardSync,
                status: NodeStatus::Standby,
                records: vec![(0, LockedToMove), (1, LockedToMove)],
                start: vec![],
                abort: vec![0, 1],
            },
            Case {
                name: "a locked shard gained back: synced again from its owner in between",
                view: view(NodeStatus::Active, &c1, &[(0, Active), (1, LockedToMove), (2, Active)]),
                previous: Some(c1.clone()),
                next: committee(2, ["a", "a", "a", "b"]),
                fill: FillMethod::ShardSync,
                status: NodeStatus::Active,
                records: vec![(1, ActiveSync)],
                start: vec![1],
                abort: vec![1],
            },
        ];
        for case in cases {
            let previous = match &case.previous {
                Some(c) => PreviousAssignment::Known(c),
                None => PreviousAssignment::Unknown,
            };
            let d = diff(previous, &case.next, &me);
            let p = plan(&case.view, &d, case.next.epoch, case.next.is_member(&me), case.fill).unwrap();
            assert_eq!(p.status, case.status, "{}", case.name);
            assert_eq!(statuses(&p), case.records, "{}", case.name);
            assert_eq!(p.start_syncs.iter().map(|s| s.0).collect::<Vec<_>>(), case.start, "{}", case.name);
            assert_eq!(p.abort_syncs.iter().map(|s| s.0).collect::<Vec<_>>(), case.abort, "{}", case.name);
            let owned = case.next.shards_of(&me);
            assert!(p.create_storage.iter().all(|s| owned.contains(s)), "{}: storage only for owned shards", case.name);
            for (s, r) in &p.records {
                if r.status == ActiveSync {
                    let source = r.sync.as_ref().and_then(|p| p.source.clone());
                    assert_eq!(
                        source.as_ref(),
                        case.previous.as_ref().and_then(|c| c.owner(*s)),
                        "{}: the source is the previous owner",
                        case.name
                    );
                }
                if r.status == LockedToMove {
                    assert_eq!(r.locked_epoch, Some(case.next.epoch), "{}", case.name);
                }
            }
        }
    }

    #[test]
    fn genesis_makes_every_owned_shard_active() {
        let me = id("a");
        let c0 = committee(0, ["a", "b", "a", "b"]);
        let d = diff(PreviousAssignment::Genesis, &c0, &me);
        let p = plan(&NodeView::default(), &d, 0, true, FillMethod::ShardSync).unwrap();
        assert_eq!(p.status, NodeStatus::Active);
        assert_eq!(statuses(&p), vec![(0, Active), (2, Active)]);
        assert_eq!(p.create_storage, vec![ShardIndex(0), ShardIndex(2)]);
    }

    #[test]
    fn a_restart_rescans_every_owned_shard_that_claims_data() {
        let me = id("a");
        let c1 = committee(1, ["a", "a", "a", "b"]);
        let v = view(NodeStatus::Active, &c1, &[(0, Active), (1, ActiveRecover), (2, ActiveSync), (3, LockedToMove)]);
        let rewritten = restart(&v, &me).unwrap();
        let got: Vec<(u32, ShardStatus)> = rewritten.iter().map(|(s, r)| (s.0, r.status)).collect();
        assert_eq!(got, vec![(0, ActiveRecover), (1, ActiveRecover)], "syncing and locked shards are left alone");
        assert!(rewritten.iter().all(|(_, r)| r.scan_id.is_some()));
    }
}
