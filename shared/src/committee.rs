//! The committee of an epoch: its members and the assignment of every shard to exactly one
//! owner, plus `rebalance`, which derives the next assignment from member changes while moving
//! as few shards as possible.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::{Epoch, NodeId, ShardIndex};

/// A committee that breaks the one-owner-per-shard invariant or is otherwise unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommitteeError {
    /// The assignment does not have one entry per shard.
    #[error("FERRY-COMMITTEE-001: assignment has {got} entries but the cluster has {n_shards} shards")]
    AssignmentLength {
        /// Entries present.
        got: usize,
        /// Shards in the cluster.
        n_shards: u32,
    },
    /// A shard is owned by a node that is not a member.
    #[error("FERRY-COMMITTEE-002: shard {shard} is owned by {owner}, which is not a member")]
    UnknownOwner {
        /// The shard.
        shard: u32,
        /// The owner named.
        owner: NodeId,
    },
    /// Two members share a node id.
    #[error("FERRY-COMMITTEE-003: node {0} is listed twice")]
    DuplicateMember(NodeId),
    /// The number of shards is out of range.
    #[error("FERRY-COMMITTEE-004: a cluster needs between 1 and 1024 shards, got {0}")]
    ShardCount(u32),
    /// No member can own a shard.
    #[error("FERRY-COMMITTEE-005: the committee has no member with weight above zero")]
    NoWeight,
    /// A member's public key is not 32 bytes of hex.
    #[error("FERRY-COMMITTEE-006: member {0} has an invalid public key (want 64 hex characters)")]
    PublicKey(NodeId),
    /// A shard would be left without an owner, or given two.
    #[error("FERRY-COMMITTEE-007: shard {0} has {1} owners; every shard needs exactly one")]
    OwnerCount(u32, usize),
    /// A member's BLS key is malformed or its proof of possession does not verify.
    #[error("FERRY-COMMITTEE-008: member {0} has an invalid BLS key: {1}")]
    BlsKey(NodeId, String),
}

/// One member of a committee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's id; also the name its TLS certificate carries.
    pub node_id: NodeId,
    /// Hex of the node's ed25519 public key (32 bytes).
    pub public_key: String,
    /// Hex of the node's BLS12-381 public key (48 bytes) followed by its proof of possession
    /// (96 bytes), as `ferryctl keygen` prints it; signs storage confirmations.
    pub bls_key: String,
    /// gRPC address of the node's sync-service (`host:port`).
    pub sync_address: String,
    /// gRPC address of the node's recovery-service (`host:port`).
    pub recovery_address: String,
    /// Relative weight (stake); a member's share of shards is proportional to it.
    pub weight: u64,
}

impl Member {
    /// The entry of the node holding `key`, with weight `weight`.
    pub fn for_key(
        node_id: NodeId,
        key: &crate::crypto::NodeKeypair,
        sync_address: impl Into<String>,
        recovery_address: impl Into<String>,
        weight: u64,
    ) -> Member {
        Member {
            node_id,
            public_key: key.public_hex(),
            bls_key: key.bls_key_hex(),
            sync_address: sync_address.into(),
            recovery_address: recovery_address.into(),
            weight,
        }
    }
}

/// The committee of one epoch.
///
/// Invariant (checked by [`Committee::validate`]): `assignment.len() == n_shards` and every
/// owner is a member, so every shard has exactly one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committee {
    /// The epoch.
    pub epoch: Epoch,
    /// Number of shards of the cluster (fixed for its life).
    pub n_shards: u32,
    /// Members, sorted by node id.
    pub members: Vec<Member>,
    /// Owner of every shard, indexed by shard.
    pub assignment: Vec<NodeId>,
}

impl Committee {
    /// Checks every invariant of the committee.
    pub fn validate(&self) -> Result<(), CommitteeError> {
        if self.n_shards == 0 || self.n_shards > 1024 {
            return Err(CommitteeError::ShardCount(self.n_shards));
        }
        if self.assignment.len() != self.n_shards as usize {
            return Err(CommitteeError::AssignmentLength { got: self.assignment.len(), n_shards: self.n_shards });
        }
        let mut seen = BTreeSet::new();
        for m in &self.members {
            if !seen.insert(&m.node_id) {
                return Err(CommitteeError::DuplicateMember(m.node_id.clone()));
            }
            let key_ok = hex::decode(&m.public_key).map(|k| k.len() == 32).unwrap_or(false);
            if !key_ok {
                return Err(CommitteeError::PublicKey(m.node_id.clone()));
            }
            crate::crypto::parse_bls_key(&m.bls_key)
                .map_err(|e| CommitteeError::BlsKey(m.node_id.clone(), e.to_string()))?;
        }
        for (shard, owner) in self.assignment.iter().enumerate() {
            if !seen.contains(owner) {
                return Err(CommitteeError::UnknownOwner { shard: shard as u32, owner: owner.clone() });
            }
        }
        Ok(())
    }

    /// Byzantine fault bound `f = (n - 1) / 3`.
    pub fn f(&self) -> u32 {
        self.n_shards.saturating_sub(1) / 3
    }

    /// Shards needed for a quorum: `2f + 1`.
    pub fn quorum_shards(&self) -> u32 {
        2 * self.f() + 1
    }

    /// Owner of a shard, if the index is in range.
    pub fn owner(&self, shard: ShardIndex) -> Option<&NodeId> {
        self.assignment.get(shard.as_usize())
    }

    /// The member with this id.
    pub fn member(&self, node: &NodeId) -> Option<&Member> {
        self.members.iter().find(|m| &m.node_id == node)
    }

    /// Whether the node is a member.
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.member(node).is_some()
    }

    /// Shards owned by the node, ascending.
    pub fn shards_of(&self, node: &NodeId) -> Vec<ShardIndex> {
        self.assignment
            .iter()
            .enumerate()
            .filter(|(_, owner)| *owner == node)
            .map(|(i, _)| ShardIndex(i as u32))
            .collect()
    }

    /// Number of shards owned by the given set of nodes.
    pub fn shards_owned_by<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeId>) -> u32 {
        let nodes: BTreeSet<&NodeId> = nodes.into_iter().collect();
        self.assignment.iter().filter(|o| nodes.contains(o)).count() as u32
    }

    /// Whether the given nodes own at least a quorum of shards.
    pub fn is_quorum<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeId>) -> bool {
        self.shards_owned_by(nodes) >= self.quorum_shards()
    }

    /// A genesis committee: shards spread over the members by weight.
    pub fn genesis(n_shards: u32, members: Vec<Member>) -> Result<Committee, CommitteeError> {
        let empty = Committee { epoch: 0, n_shards, members: Vec::new(), assignment: Vec::new() };
        let mut committee = rebalance(&empty, members)?;
        committee.epoch = 0;
        Ok(committee)
    }
}

/// Shard counts per member, proportional to weight (largest remainder, ties by node id).
fn target_counts(n_shards: u32, members: &[Member]) -> Result<BTreeMap<NodeId, u32>, CommitteeError> {
    let total: u128 = members.iter().map(|m| u128::from(m.weight)).sum();
    if total == 0 {
        return Err(CommitteeError::NoWeight);
    }
    let n = u128::from(n_shards);
    let mut counts = BTreeMap::new();
    let mut remainders = Vec::new();
    let mut assigned: u128 = 0;
    for m in members {
        let exact = n * u128::from(m.weight);
        let base = exact / total;
        assigned += base;
        counts.insert(m.node_id.clone(), base as u32);
        remainders.push((exact % total, m.node_id.clone()));
    }
    // Largest remainders first; ties go to the smaller node id, so the result is deterministic.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    for (_, node) in remainders.into_iter().take((n - assigned) as usize) {
        if let Some(c) = counts.get_mut(&node) {
            *c += 1;
        }
    }
    Ok(counts)
}

/// Derives the next epoch's committee from the current one and the next members (joins,
/// leaves, weight changes). Each member's share of shards is proportional to its weight; a
/// shard moves only if its owner leaves or owns more than its share, so as few shards move as
/// possible. The result has `epoch = current.epoch + 1` and exactly one owner per shard.
///
/// An empty `current.assignment` (genesis) assigns shards round-robin by share.
pub fn rebalance(current: &Committee, mut members: Vec<Member>) -> Result<Committee, CommitteeError> {
    let n_shards = if current.assignment.is_empty() { current.n_shards } else { current.assignment.len() as u32 };
    if n_shards == 0 || n_shards > 1024 {
        return Err(CommitteeError::ShardCount(n_shards));
    }
    members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    for pair in members.windows(2) {
        if pair[0].node_id == pair[1].node_id {
            return Err(CommitteeError::DuplicateMember(pair[0].node_id.clone()));
        }
    }
    let targets = target_counts(n_shards, &members)?;

    let mut assignment: Vec<Option<NodeId>> = if current.assignment.is_empty() {
        vec![None; n_shards as usize]
    } else {
        current.assignment.iter().cloned().map(Some).collect()
    };
    // Keep each owner's lowest shards up to its target; free the rest.
    let mut kept: BTreeMap<NodeId, u32> = BTreeMap::new();
    for slot in assignment.iter_mut() {
        if let Some(owner) = slot.clone() {
            let target = targets.get(&owner).copied().unwrap_or(0);
            let count = kept.entry(owner).or_insert(0);
            if *count < target {
                *count += 1;
            } else {
                *slot = None;
            }
        }
    }
    // Hand freed shards to members below target, in node-id order.
    let mut deficits = targets.iter().flat_map(|(node, target)| {
        let have = kept.get(node).copied().unwrap_or(0);
        std::iter::repeat_n(node.clone(), target.saturating_sub(have) as usize)
    });
    let mut out = Vec::with_capacity(assignment.len());
    for (shard, slot) in assignment.into_iter().enumerate() {
        match slot.or_else(|| deficits.next()) {
            Some(owner) => out.push(owner),
            None => return Err(CommitteeError::OwnerCount(shard as u32, 0)),
        }
    }
    let next = Committee {
        epoch: if current.assignment.is_empty() { current.epoch } else { current.epoch + 1 },
        n_shards,
        members,
        assignment: out,
    };
    next.validate()?;
    Ok(next)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// A member whose keys derive from its id (memoised: BLS keys take a millisecond).
    pub(crate) fn member(id: &str, weight: u64) -> Member {
        static KEYS: std::sync::OnceLock<std::sync::Mutex<BTreeMap<String, (String, String)>>> =
            std::sync::OnceLock::new();
        let (public_key, bls_key) = KEYS
            .get_or_init(Default::default)
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_insert_with(|| {
                let key = crate::crypto::NodeKeypair::from_seed(*blake3::hash(id.as_bytes()).as_bytes());
                (key.public_hex(), key.bls_key_hex())
            })
            .clone();
        Member {
            node_id: NodeId::new(id).unwrap(),
            public_key,
            bls_key,
            sync_address: format!("127.0.0.1:{}", 1000 + weight),
            recovery_address: String::new(),
            weight,
        }
    }

    #[test]
    fn genesis_spreads_by_weight() {
        let c = Committee::genesis(10, vec![member("a", 1), member("b", 1), member("c", 3)]).unwrap();
        assert_eq!(c.shards_of(&NodeId::new("c").unwrap()).len(), 6);
        assert_eq!(c.f(), 3);
        assert_eq!(c.quorum_shards(), 7);
    }

    #[test]
    fn bad_committees_are_refused() {
        let mut c = Committee::genesis(4, vec![member("a", 1), member("b", 1)]).unwrap();
        c.assignment[2] = NodeId::new("zz").unwrap();
        assert!(matches!(c.validate(), Err(CommitteeError::UnknownOwner { shard: 2, .. })));
        c.assignment.pop();
        assert!(matches!(c.validate(), Err(CommitteeError::AssignmentLength { .. })));
        assert_eq!(Committee::genesis(4, vec![member("a", 0)]), Err(CommitteeError::NoWeight));
        assert!(Committee::genesis(0, vec![member("a", 1)]).is_err());
        assert!(matches!(
            Committee::genesis(4, vec![member("a", 1), member("a", 2)]),
            Err(CommitteeError::DuplicateMember(_))
        ));
        // Another member's BLS key (its proof names another key) or none at all.
        let mut c = Committee::genesis(4, vec![member("a", 1), member("b", 1)]).unwrap();
        c.members[0].bls_key = format!("{}{}", &c.members[0].bls_key[..96], &c.members[1].bls_key[96..]);
        assert!(matches!(c.validate(), Err(CommitteeError::BlsKey(..))));
        c.members[0].bls_key = String::new();
        assert!(matches!(c.validate(), Err(CommitteeError::BlsKey(..))));
    }

    fn members_strategy() -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::btree_map(0u8..12, 0u64..5, 1..8)
            .prop_map(|m| m.into_iter().map(|(id, w)| member(&format!("n{id}"), w)).collect())
    }

    proptest! {
        #[test]
        fn rebalance_keeps_one_owner_and_moves_only_what_it_must(
            n in 1u32..64,
            first in members_strategy(),
            second in members_strategy(),
        ) {
            prop_assume!(first.iter().any(|m| m.weight > 0));
            prop_assume!(second.iter().any(|m| m.weight > 0));
            let current = Committee::genesis(n, first).unwrap();
            let next = rebalance(&current, second.clone()).unwrap();
            prop_assert_eq!(next.epoch, current.epoch + 1);
            prop_assert!(next.validate().is_ok());
            prop_assert_eq!(next.assignment.len(), n as usize);

            // Lower bound on moves: every shard of a departing member, plus each remaining
            // owner's surplus over its target, must move. Rebalance moves exactly that many.
            let targets = target_counts(n, &next.members).unwrap();
            let mut must_move = 0u32;
            let mut owned: BTreeMap<&NodeId, u32> = BTreeMap::new();
            for o in &current.assignment { *owned.entry(o).or_default() += 1; }
            for (node, count) in owned {
                let target = targets.get(node).copied().unwrap_or(0);
                must_move += count.saturating_sub(target);
            }
            let moved = current.assignment.iter().zip(&next.assignment).filter(|(a, b)| a != b).count() as u32;
            prop_assert_eq!(moved, must_move);
            // Every member ends at its target.
            for (node, target) in &targets {
                prop_assert_eq!(next.shards_of(node).len() as u32, *target);
            }
        }
    }
}
