//! The epoch diff (ARCHITECTURE.md, "The epoch diff and plan"): which shards a node gains at an epoch change and from
//! whom, which it loses and which it keeps. A pure function both services use, so they always
//! agree on how a gained shard is filled.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    committee::Committee,
    types::{NodeId, ShardIndex},
};

/// What the node knows of the previous epoch's assignment.
#[derive(Debug, Clone, Copy)]
pub enum PreviousAssignment<'a> {
    /// The node missed epochs and does not know who owned what before (catch-up path): every
    /// shard it owns next is filled by blob recovery.
    Unknown,
    /// The cluster starts: there is no previous epoch and no data to move.
    Genesis,
    /// The node processed the previous epoch (incremental path): gained shards are filled by
    /// shard sync from their previous owner.
    Known(&'a Committee),
}

/// How the node fills the shards it gains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillPath {
    /// Shard sync from each gained shard's previous owner.
    Incremental,
    /// Blob recovery of every owned shard.
    CatchUp,
    /// Nothing to fill: the first epoch.
    Genesis,
}

/// A shard the node owns next and did not own before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GainedShard {
    /// The shard.
    pub shard: ShardIndex,
    /// Its owner in the previous epoch; `None` on the catch-up and genesis paths.
    pub previous_owner: Option<NodeId>,
}

/// The result of [`diff`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochDiff {
    /// How gained shards are filled.
    pub path: FillPath,
    /// Shards owned next but not before, ascending.
    pub gained: Vec<GainedShard>,
    /// Shards owned before but not next, ascending. Empty on the catch-up path (unknown).
    pub lost: Vec<ShardIndex>,
    /// Shards owned both before and next, ascending.
    pub kept: Vec<ShardIndex>,
}

impl EpochDiff {
    /// Every shard the node owns next, ascending.
    pub fn owned_next(&self) -> Vec<ShardIndex> {
        let mut all: Vec<ShardIndex> = self.gained.iter().map(|g| g.shard).chain(self.kept.iter().copied()).collect();
        all.sort();
        all
    }
}

/// Computes the diff of `next` against `previous` for `node`.
pub fn diff(previous: PreviousAssignment<'_>, next: &Committee, node: &NodeId) -> EpochDiff {
    let owned_next = next.shards_of(node);
    match previous {
        PreviousAssignment::Unknown | PreviousAssignment::Genesis => EpochDiff {
            path: if matches!(previous, PreviousAssignment::Unknown) { FillPath::CatchUp } else { FillPath::Genesis },
            gained: owned_next.into_iter().map(|shard| GainedShard { shard, previous_owner: None }).collect(),
            lost: Vec::new(),
            kept: Vec::new(),
        },
        PreviousAssignment::Known(prev) => {
            let owned_prev: BTreeSet<ShardIndex> = prev.shards_of(node).into_iter().collect();
            let next_set: BTreeSet<ShardIndex> = owned_next.iter().copied().collect();
            let gained = owned_next
                .iter()
                .filter(|s| !owned_prev.contains(s))
                .map(|&shard| GainedShard { shard, previous_owner: prev.owner(shard).cloned() })
                .collect();
            EpochDiff {
                path: FillPath::Incremental,
                gained,
                lost: owned_prev.difference(&next_set).copied().collect(),
                kept: owned_prev.intersection(&next_set).copied().collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::committee::{rebalance, tests::member};
    use proptest::prelude::*;

    #[test]
    fn catch_up_fills_everything_by_recovery() {
        let c = Committee::genesis(8, vec![member("a", 1), member("b", 1)]).unwrap();
        let a = NodeId::new("a").unwrap();
        let d = diff(PreviousAssignment::Unknown, &c, &a);
        assert_eq!(d.path, FillPath::CatchUp);
        assert_eq!(d.owned_next(), c.shards_of(&a));
        assert!(d.gained.iter().all(|g| g.previous_owner.is_none()));
    }

    #[test]
    fn a_joining_node_gains_from_previous_owners() {
        let c0 = Committee::genesis(8, vec![member("a", 1), member("b", 1)]).unwrap();
        let c1 = rebalance(&c0, vec![member("a", 1), member("b", 1), member("c", 2)]).unwrap();
        let c = NodeId::new("c").unwrap();
        let d = diff(PreviousAssignment::Known(&c0), &c1, &c);
        assert_eq!(d.gained.len(), 4);
        assert!(d.kept.is_empty() && d.lost.is_empty());
        for g in &d.gained {
            assert_eq!(g.previous_owner.as_ref(), c0.owner(g.shard));
        }
    }

    fn committee_strategy(n: u32) -> impl Strategy<Value = Committee> {
        proptest::collection::vec(0u8..6, n as usize).prop_map(move |owners| {
            let members: Vec<_> = (0..6).map(|i| member(&format!("n{i}"), 1)).collect();
            Committee {
                epoch: 0,
                n_shards: n,
                assignment: owners.iter().map(|o| members[*o as usize].node_id.clone()).collect(),
                members,
            }
        })
    }

    proptest! {
        #[test]
        fn diff_partitions_the_owned_shards(
            (prev, next) in (1u32..40).prop_flat_map(|n| (committee_strategy(n), committee_strategy(n))),
            who in 0u8..7,
        ) {
            let node = NodeId::new(format!("n{who}")).unwrap();
            let d = diff(PreviousAssignment::Known(&prev), &next, &node);
            let owned_next: BTreeSet<_> = next.shards_of(&node).into_iter().collect();
            let owned_prev: BTreeSet<_> = prev.shards_of(&node).into_iter().collect();
            // gained ∪ kept = owned next, and they are disjoint.
            let union: BTreeSet<_> = d.owned_next().into_iter().collect();
            prop_assert_eq!(&union, &owned_next);
            prop_assert_eq!(d.gained.len() + d.kept.len(), owned_next.len());
            // lost ∩ owned next = ∅, and lost ∪ kept = owned before.
            prop_assert!(d.lost.iter().all(|s| !owned_next.contains(s)));
            let before: BTreeSet<_> = d.lost.iter().chain(&d.kept).copied().collect();
            prop_assert_eq!(before, owned_prev);
            // Each gained shard's source is its previous owner, never the node itself.
            for g in &d.gained {
                prop_assert_eq!(g.previous_owner.as_ref(), prev.owner(g.shard));
                prop_assert_ne!(g.previous_owner.as_ref(), Some(&node));
            }
        }
    }
}
