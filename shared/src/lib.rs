//! What both Ferry services (and `ferryctl`) need: domain types, the committee and shard
//! assignment, the epoch diff, the erasure code and blob metadata, node keys and signatures,
//! compact certificates and the per-blob registry records nodes keep,
//! configuration loading and its live reload, mutual TLS, telemetry and metrics set-up and the
//! control-plane client.

pub mod authz;
pub mod backoff;
pub mod certificate;
pub mod client;
pub mod committee;
pub mod config;
pub mod config_watch;
pub mod control_plane;
pub mod crypto;
pub mod diff;
pub mod erasure;
pub mod failpoints;
pub mod grpc;
pub mod lifecycle;
pub mod metrics;
pub mod registry;
pub mod serving;
pub mod shard_item;
pub mod telemetry;
pub mod testing;
pub mod throttle;
pub mod tls;
pub mod types;

pub use committee::{Committee, Member};
pub use diff::{EpochDiff, GainedShard, PreviousAssignment};
pub use types::{BlobId, Epoch, NodeId, NodeStatus, ShardIndex, ShardStatus};
