//! Domain types, each validated when it is constructed from untrusted input.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use ferry_proto::v1 as pb;

/// A malformed domain value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TypeError {
    /// A blob id that is not 32 bytes (or 64 hex characters).
    #[error("FERRY-TYPE-001: blob id must be 32 bytes (64 hex characters), got {0}")]
    BlobIdLength(String),
    /// A shard index not below the number of shards.
    #[error("FERRY-TYPE-002: shard index {index} out of range: the cluster has {n_shards} shards")]
    ShardOutOfRange {
        /// The index given.
        index: u32,
        /// Shards in the cluster.
        n_shards: u32,
    },
    /// A node id that is empty, too long or has characters outside `[a-z0-9-]`.
    #[error("FERRY-TYPE-003: node id {0:?} is invalid: use 1 to 63 characters of a-z, 0-9 and '-'")]
    NodeId(String),
    /// A status enum value that is unspecified or unknown.
    #[error("FERRY-TYPE-004: unknown or unspecified {kind} value {value}")]
    Status {
        /// Which enum.
        kind: &'static str,
        /// The raw value.
        value: i32,
    },
}

/// An epoch number. Epoch 0 is the genesis committee.
pub type Epoch = u64;

/// The id of a blob: BLAKE3 of its canonical metadata. Ordered as big-endian bytes, which is
/// the order of the shard store's keys and of the registry's listing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The smallest id.
    pub const MIN: BlobId = BlobId([0; 32]);

    /// Parses an id from raw bytes received over the network.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TypeError> {
        <[u8; 32]>::try_from(bytes).map(BlobId).map_err(|_| TypeError::BlobIdLength(format!("{} bytes", bytes.len())))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, as used in keys, logs and the CLI.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The next id in order, or `None` for the largest one. A cursor that has processed `self`
    /// resumes from `self.successor()`.
    pub fn successor(&self) -> Option<BlobId> {
        let mut next = self.0;
        for byte in next.iter_mut().rev() {
            if *byte == u8::MAX {
                *byte = 0;
            } else {
                *byte += 1;
                return Some(BlobId(next));
            }
        }
        None
    }
}

impl FromStr for BlobId {
    type Err = TypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes =
            hex::decode(s.trim()).map_err(|_| TypeError::BlobIdLength(format!("{:?} (not hex)", truncate(s))))?;
        BlobId::from_bytes(&bytes).map_err(|_| TypeError::BlobIdLength(format!("{:?}", truncate(s))))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl TryFrom<String> for BlobId {
    type Error = TypeError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BlobId> for String {
    fn from(id: BlobId) -> String {
        id.to_hex()
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_hex()[..12])
    }
}

/// The index of a shard, `0..n_shards`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
#[serde(transparent)]
pub struct ShardIndex(pub u32);

impl ShardIndex {
    /// Validates a raw index against the cluster's number of shards.
    pub fn checked(index: u32, n_shards: u32) -> Result<Self, TypeError> {
        if index < n_shards { Ok(ShardIndex(index)) } else { Err(TypeError::ShardOutOfRange { index, n_shards }) }
    }

    /// As a `usize` for indexing.
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node's id: 1 to 63 characters of `[a-z0-9-]`, so it is a valid DNS label and etcd key part.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Validates a node id.
    pub fn new(id: impl Into<String>) -> Result<Self, TypeError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= 63
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid { Ok(NodeId(id)) } else { Err(TypeError::NodeId(truncate(&id))) }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = TypeError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl FromStr for NodeId {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node's lifecycle status (ARCHITECTURE.md, "States").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(tag = "status", content = "epoch", rename_all = "snake_case")]
pub enum NodeStatus {
    /// Not a member of the current committee.
    Standby,
    /// A member holding all its data.
    Active,
    /// Missed epochs; catching up to the current committee.
    RecoveryCatchUp,
    /// Recovering missing slivers, to be complete at this epoch.
    RecoveryInProgress(Epoch),
}

impl NodeStatus {
    /// Whether node recovery owns the attestation (rule 5).
    pub fn is_recovering(self) -> bool {
        matches!(self, NodeStatus::RecoveryCatchUp | NodeStatus::RecoveryInProgress(_))
    }

    /// The protobuf enum and recovery epoch (0 when not recovering).
    pub fn to_proto(self) -> (pb::NodeStatus, Epoch) {
        match self {
            NodeStatus::Standby => (pb::NodeStatus::Standby, 0),
            NodeStatus::Active => (pb::NodeStatus::Active, 0),
            NodeStatus::RecoveryCatchUp => (pb::NodeStatus::RecoveryCatchUp, 0),
            NodeStatus::RecoveryInProgress(e) => (pb::NodeStatus::RecoveryInProgress, e),
        }
    }

    /// From the protobuf enum and recovery epoch.
    pub fn from_proto(status: i32, recovery_epoch: Epoch) -> Result<Self, TypeError> {
        match pb::NodeStatus::try_from(status) {
            Ok(pb::NodeStatus::Standby) => Ok(NodeStatus::Standby),
            Ok(pb::NodeStatus::Active) => Ok(NodeStatus::Active),
            Ok(pb::NodeStatus::RecoveryCatchUp) => Ok(NodeStatus::RecoveryCatchUp),
            Ok(pb::NodeStatus::RecoveryInProgress) => Ok(NodeStatus::RecoveryInProgress(recovery_epoch)),
            _ => Err(TypeError::Status { kind: "NodeStatus", value: status }),
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeStatus::Standby => f.write_str("Standby"),
            NodeStatus::Active => f.write_str("Active"),
            NodeStatus::RecoveryCatchUp => f.write_str("RecoveryCatchUp"),
            NodeStatus::RecoveryInProgress(e) => write!(f, "RecoveryInProgress({e})"),
        }
    }
}

/// A shard's status on one node (ARCHITECTURE.md, "States"; the edges are in sync-service's `node::shard_state`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ShardStatus {
    /// Gained; being filled by shard sync from its previous owner.
    ActiveSync,
    /// Shard sync failed for good (or catch-up): filled by blob recovery.
    ActiveRecover,
    /// Holds every certified blob's sliver; accepts writes.
    Active,
    /// Lost at an epoch change: still served to its new owner; no new writes.
    LockedToMove,
}

impl ShardStatus {
    /// The protobuf enum.
    pub fn to_proto(self) -> pb::ShardStatus {
        match self {
            ShardStatus::ActiveSync => pb::ShardStatus::ActiveSync,
            ShardStatus::ActiveRecover => pb::ShardStatus::ActiveRecover,
            ShardStatus::Active => pb::ShardStatus::Active,
            ShardStatus::LockedToMove => pb::ShardStatus::LockedToMove,
        }
    }

    /// From the protobuf enum.
    pub fn from_proto(value: i32) -> Result<Self, TypeError> {
        match pb::ShardStatus::try_from(value) {
            Ok(pb::ShardStatus::ActiveSync) => Ok(ShardStatus::ActiveSync),
            Ok(pb::ShardStatus::ActiveRecover) => Ok(ShardStatus::ActiveRecover),
            Ok(pb::ShardStatus::Active) => Ok(ShardStatus::Active),
            Ok(pb::ShardStatus::LockedToMove) => Ok(ShardStatus::LockedToMove),
            _ => Err(TypeError::Status { kind: "ShardStatus", value }),
        }
    }

    /// Whether the node owns the shard in its current epoch (every status but `LockedToMove`).
    pub fn is_owned(self) -> bool {
        !matches!(self, ShardStatus::LockedToMove)
    }
}

impl fmt::Display for ShardStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_parses_and_orders() {
        let id: BlobId = "00".repeat(31).to_string().add_str("ff").parse().expect("valid id");
        assert_eq!(id.successor().expect("has successor").0[30], 1);
        assert!(BlobId::MIN < id);
        assert!("abc".parse::<BlobId>().is_err());
        assert!(BlobId::from_bytes(&[0; 31]).is_err());
        assert_eq!(BlobId([0xff; 32]).successor(), None);
    }

    trait AddStr {
        fn add_str(self, s: &str) -> String;
    }
    impl AddStr for String {
        fn add_str(mut self, s: &str) -> String {
            self.push_str(s);
            self
        }
    }

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(NodeId::new("node-1").is_ok());
        for bad in ["", "Node", "a_b", &"x".repeat(64)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn shard_index_is_checked() {
        assert!(ShardIndex::checked(3, 4).is_ok());
        assert_eq!(ShardIndex::checked(4, 4), Err(TypeError::ShardOutOfRange { index: 4, n_shards: 4 }));
    }

    #[test]
    fn statuses_round_trip_through_proto() {
        for s in
            [NodeStatus::Standby, NodeStatus::Active, NodeStatus::RecoveryCatchUp, NodeStatus::RecoveryInProgress(7)]
        {
            let (p, e) = s.to_proto();
            assert_eq!(NodeStatus::from_proto(p as i32, e), Ok(s));
        }
        assert!(NodeStatus::from_proto(0, 0).is_err());
        assert!(ShardStatus::from_proto(99).is_err());
    }
}
