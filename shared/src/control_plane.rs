//! The control plane: committees per epoch, the current epoch and its phase, attestations and
//! node statuses, kept in etcd under `/ferry/<cluster>/`. Control state only: it grows with
//! nodes and epochs, never with blobs (the storage nodes keep per-blob state), and every read
//! of a listing is paged so that no response nears etcd's message limit.
//!
//! [`ControlPlane`] holds all of Ferry's rules (create-if-absent attestation, the phase flip
//! to `Done` at the first quorum, epoch proposals) on top of a small transactional key-value
//! trait, [`Kv`], so the same logic runs against etcd ([`etcd::EtcdKv`]) in production and
//! integration tests and against [`memory::MemoryKv`] in unit tests.

pub mod access;
pub mod etcd;
pub mod memory;

use std::{pin::Pin, sync::Arc};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

use crate::{
    committee::{Committee, CommitteeError},
    crypto::{self, ShardEvidence},
    tls::TlsMaterial,
    types::{Epoch, NodeId, NodeStatus},
};

/// A control-plane failure.
#[derive(Debug, Error)]
pub enum ControlPlaneError {
    /// etcd could not be reached or refused the request.
    #[error("FERRY-CP-001: etcd at {endpoints} is unreachable or failed: {message}")]
    Unavailable {
        /// Endpoints tried.
        endpoints: String,
        /// What went wrong.
        message: String,
    },
    /// A stored value could not be decoded.
    #[error("FERRY-CP-002: value at {key} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// Decode error.
        message: String,
    },
    /// An epoch proposal that does not follow the current epoch.
    #[error("FERRY-CP-003: cannot start epoch {proposed}: {reason}")]
    EpochOrder {
        /// Proposed epoch.
        proposed: Epoch,
        /// Why not.
        reason: String,
    },
    /// A proposed committee is invalid.
    #[error("FERRY-CP-004: invalid committee: {0}")]
    Committee(#[from] CommitteeError),
    /// The watch cannot resume from the requested revision (compacted or from the future).
    #[error("FERRY-CP-005: cannot resume the watch after revision {after}: {reason}")]
    WatchResume {
        /// Last processed revision.
        after: u64,
        /// Why not.
        reason: String,
    },
    /// An attestation from a node that is not a member of that epoch, or for an unknown epoch.
    #[error("FERRY-CP-006: attestation refused: {0}")]
    AttestationRefused(String),
    /// A concurrent writer won too many times in a row.
    #[error("FERRY-CP-008: too much contention updating {0}; retry")]
    Contention(String),
    /// etcd's RBAC refused the request to this party's user (the common name of its
    /// certificate): the role it holds does not cover the key. Not retried.
    #[error("FERRY-CP-009: etcd at {endpoints} refused {what}: {message}")]
    Denied {
        /// Endpoints asked.
        endpoints: String,
        /// The request.
        what: String,
        /// etcd's answer.
        message: String,
    },
    /// Revoking a party's etcd access now would cut off something that still needs it.
    #[error("FERRY-CP-010: cannot revoke {party}: {reason}")]
    RevokeRefused {
        /// The party.
        party: String,
        /// Why not now.
        reason: String,
    },
}

/// Result of control-plane calls.
pub type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

/// A value read with the revision at which it was last modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// Revision of its last modification.
    pub mod_revision: u64,
    /// How many times the key was written since it was created (1 = never overwritten).
    pub version: u64,
}

/// A condition of a [`Kv::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist.
    Absent(String),
    /// The key was last modified at this revision.
    ModRevision(String, u64),
}

/// A put seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    /// Revision of the put.
    pub revision: u64,
    /// Full key.
    pub key: String,
    /// New value.
    pub value: Vec<u8>,
}

/// A stream of watched puts, in revision order.
pub type KvEventStream = Pin<Box<dyn Stream<Item = Result<KvEvent>> + Send>>;

/// The transactional key-value store the control plane is built on.
#[async_trait]
pub trait Kv: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Reads up to `limit` keys with `prefix`, from `start` (inclusive, a full key) in key order.
    async fn range(&self, prefix: &str, start: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>>;
    /// Writes `puts` atomically if every guard holds; returns whether it did.
    async fn txn(&self, guards: Vec<Guard>, puts: Vec<(String, Vec<u8>)>) -> Result<bool>;
    /// The store's current revision.
    async fn revision(&self) -> Result<u64>;
    /// Puts under `prefix` with revision greater than `after`, first the history then live.
    async fn watch(&self, prefix: &str, after: u64) -> Result<KvEventStream>;
}

/// Phase of the current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", content = "epoch", rename_all = "snake_case")]
pub enum EpochPhase {
    /// Nodes are moving shards for this epoch.
    ChangeSync(Epoch),
    /// Owners of a quorum of shards attested epoch-sync-done for this epoch.
    Done(Epoch),
}

impl EpochPhase {
    /// The epoch the phase is about.
    pub fn epoch(self) -> Epoch {
        match self {
            EpochPhase::ChangeSync(e) | EpochPhase::Done(e) => e,
        }
    }
}

/// An epoch-sync-done attestation as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationRecord {
    /// Attesting node.
    pub node_id: NodeId,
    /// Epoch attested.
    pub epoch: Epoch,
    /// `sync-service` or `recovery-service`.
    pub attested_by: String,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// One entry per owned shard.
    pub evidence: Vec<ShardEvidence>,
    /// Hex ed25519 signature over [`crypto::attestation_message`].
    pub signature: String,
}

impl AttestationRecord {
    /// Builds and signs an attestation.
    pub fn sign(
        key: &crypto::NodeKeypair,
        node_id: NodeId,
        epoch: Epoch,
        attested_by: &str,
        evidence: Vec<ShardEvidence>,
    ) -> Self {
        let created_at_ms = crypto::now_ms();
        let msg = crypto::attestation_message(&node_id, epoch, attested_by, created_at_ms, &evidence);
        AttestationRecord {
            signature: hex::encode(key.sign(&msg)),
            node_id,
            epoch,
            attested_by: attested_by.to_string(),
            created_at_ms,
            evidence,
        }
    }

    /// Verifies the signature with the node's key from the committee.
    pub fn verify(&self, committee: &Committee) -> std::result::Result<(), crypto::CryptoError> {
        let member = committee.member(&self.node_id).ok_or(crypto::CryptoError::PublicKey)?;
        let sig = hex::decode(&self.signature).map_err(|_| crypto::CryptoError::BadSignature)?;
        let msg = crypto::attestation_message(
            &self.node_id,
            self.epoch,
            &self.attested_by,
            self.created_at_ms,
            &self.evidence,
        );
        crypto::verify(&member.public_key, &msg, &sig)
    }
}

/// Result of [`ControlPlane::attest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestOutcome {
    /// This call created the attestation.
    Created {
        /// Whether this call flipped the epoch's phase to `Done`.
        flipped_to_done: bool,
    },
    /// An attestation for this node and epoch existed already; it is returned unchanged.
    AlreadyPresent(AttestationRecord),
}

/// The one attester of a node in a process: hands out one [`AttestToken`] at a time, and none
/// for an epoch attested already. Rule 5's "exactly once" rests on etcd's create-if-absent; the
/// token serialises a process's triggers (a sync finishing, a recovery completing, a restart),
/// so two of them never race each other to it, and none is lost: a trigger that finds the token
/// in use waits for it, then checks again.
#[derive(Debug, Default)]
pub struct Attester {
    attested: tokio::sync::Mutex<std::collections::BTreeSet<Epoch>>,
}

impl Attester {
    /// The token for `epoch` (waiting while another trigger holds it), or `None` once the epoch
    /// is attested.
    pub async fn token(&self, epoch: Epoch) -> Option<AttestToken<'_>> {
        let attested = self.attested.lock().await;
        if attested.contains(&epoch) {
            return None;
        }
        Some(AttestToken { attested, epoch })
    }
}

/// The right to attest one epoch: not `Clone`, consumed by [`AttestToken::attest`]. Dropped
/// without a stored attestation (an error, a check that failed), it can be taken again.
#[derive(Debug)]
pub struct AttestToken<'a> {
    attested: tokio::sync::MutexGuard<'a, std::collections::BTreeSet<Epoch>>,
    epoch: Epoch,
}

impl AttestToken<'_> {
    /// The epoch this token attests.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Stores `record` (which must be for this token's epoch) create-if-absent.
    pub async fn attest(mut self, control_plane: &ControlPlane, record: &AttestationRecord) -> Result<AttestOutcome> {
        if record.epoch != self.epoch {
            return Err(ControlPlaneError::AttestationRefused(format!(
                "a token for epoch {} cannot attest epoch {}",
                self.epoch, record.epoch
            )));
        }
        let outcome = control_plane.attest(record).await?;
        self.attested.insert(self.epoch);
        Ok(outcome)
    }

    /// Records that the epoch is attested (found in etcd), so no trigger asks again.
    pub fn already_attested(mut self) {
        self.attested.insert(self.epoch);
    }
}

/// A node's status as mirrored for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub node_id: NodeId,
    /// Its status.
    pub status: NodeStatus,
    /// Latest epoch it processed.
    pub epoch: Epoch,
    /// Unix milliseconds of the update.
    pub updated_at_ms: u64,
}

/// An epoch event, as followed by nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochEvent {
    /// A committee was proposed: the epoch starts (`ChangeSync`).
    Started(Committee),
    /// The epoch change completed (`Done`).
    Done(Epoch),
    /// A node attested epoch-sync-done for an epoch.
    Attested {
        /// The epoch attested.
        epoch: Epoch,
        /// The attesting node.
        node: NodeId,
    },
    /// A committee or phase that does not decode or is not valid (someone wrote the control
    /// plane by hand, or a writer is broken): to be alarmed on and skipped, never applied, and
    /// never a reason to stop following.
    Poisoned {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
}

/// An epoch event with its revision, the cursor a follower persists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedEpochEvent {
    /// Revision of the event; resume with `watch_epochs(revision)`.
    pub revision: u64,
    /// The event.
    pub event: EpochEvent,
}

/// A stream of epoch events.
pub type EpochEventStream = Pin<Box<dyn Stream<Item = Result<WatchedEpochEvent>> + Send>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CurrentRecord {
    phase: EpochPhase,
}

/// Ferry's control plane over a [`Kv`] store, keys under `/ferry/<cluster>/`.
#[derive(Clone)]
pub struct ControlPlane {
    kv: Arc<dyn Kv>,
    cluster: String,
    prefix: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlPlane({})", self.prefix)
    }
}

const CAS_RETRIES: usize = 64;

/// Keys per page of a listing: attestations of nodes with 1,000 shards are about 100 KB each.
const LIST_PAGE: usize = 16;

impl ControlPlane {
    /// A control plane for `cluster` over `kv`.
    pub fn new(kv: Arc<dyn Kv>, cluster: &str) -> Self {
        ControlPlane { kv, cluster: cluster.to_string(), prefix: Self::cluster_prefix(cluster) }
    }

    fn cluster_prefix(cluster: &str) -> String {
        format!("/ferry/{cluster}/")
    }

    /// The cluster's name: its keys' prefix, and part of every storage confirmation.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// [`ControlPlane::connect_etcd`], retried with backoff (200 ms doubling to 5 s) for up to
    /// `attempts` tries, so a service that starts before etcd waits for it instead of exiting.
    /// A refusal by etcd's RBAC is not retried: waiting does not grant a role.
    pub async fn connect_etcd_with_retry(
        endpoints: &[String],
        cluster: &str,
        identity: Option<&TlsMaterial>,
        attempts: u32,
    ) -> Result<Self> {
        if identity.is_none() && etcd::needs_identity(endpoints) {
            // Retrying cannot produce a certificate.
            return Self::connect_etcd(endpoints, cluster, identity).await;
        }
        let mut backoff = std::time::Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::connect_etcd(endpoints, cluster, identity).await {
                Ok(cp) => return Ok(cp),
                Err(e @ ControlPlaneError::Denied { .. }) => return Err(e),
                Err(e) if attempt < attempts => {
                    tracing::warn!(error = %e, attempt, "control plane unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects to etcd at `endpoints`; keys live under `/ferry/<cluster>/`. `https://`
    /// endpoints need `identity`: its certificate authenticates this party, and etcd's RBAC
    /// allows its user (the certificate's common name) what [`access`] granted to its role.
    pub async fn connect_etcd(endpoints: &[String], cluster: &str, identity: Option<&TlsMaterial>) -> Result<Self> {
        let prefix = Self::cluster_prefix(cluster);
        let kv = etcd::EtcdKv::connect(endpoints, identity, &prefix).await?;
        Ok(Self::new(Arc::new(kv), cluster))
    }

    /// The key prefix of this cluster, `/ferry/<cluster>/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An in-memory control plane for unit tests.
    pub fn in_memory(cluster: &str) -> Self {
        Self::new(Arc::new(memory::MemoryKv::default()), cluster)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn epoch_key(&self, epoch: Epoch) -> String {
        // Zero-padded so keys sort by epoch.
        self.key(&format!("epochs/{epoch:020}"))
    }

    fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes)
            .map_err(|e| ControlPlaneError::Corrupt { key: key.to_string(), message: e.to_string() })
    }

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        // Serialising our own plain data types cannot fail.
        serde_json::to_vec(value).unwrap_or_default()
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        match self.kv.get(key).await? {
            Some(v) => Ok(Some((Self::decode(key, &v.value)?, v.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every value under `prefix`, read a page of [`LIST_PAGE`] keys at a time so no response
    /// nears etcd's message limit (an attestation of a node owning many shards is large).
    async fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let page = self.kv.range(prefix, start.as_deref(), LIST_PAGE).await?;
            let full = page.len() == LIST_PAGE;
            for (key, value) in &page {
                out.push(Self::decode(key, &value.value)?);
            }
            match page.last() {
                // The next page starts right after the last key (keys are UTF-8; NUL sorts first).
                Some((key, _)) if full => start = Some(format!("{key}\0")),
                _ => return Ok(out),
            }
        }
    }

    /// The current epoch's phase, if the cluster has started.
    pub async fn current(&self) -> Result<Option<EpochPhase>> {
        Ok(self.get_json::<CurrentRecord>(&self.key("current")).await?.map(|(c, _)| c.phase))
    }

    /// The committee of an epoch. One that is not valid (shard count, one owner per shard,
    /// keys) or is stored under another epoch is an error, never handed to a caller that would
    /// index shards by it.
    pub async fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        let key = self.epoch_key(epoch);
        let Some((committee, _)) = self.get_json::<Committee>(&key).await? else { return Ok(None) };
        let corrupt = |message: String| ControlPlaneError::Corrupt { key: key.clone(), message };
        committee.validate().map_err(|e| corrupt(format!("invalid committee: {e}")))?;
        if committee.epoch != epoch {
            return Err(corrupt(format!("holds the committee of epoch {}", committee.epoch)));
        }
        Ok(Some(committee))
    }

    /// The committee of the current epoch.
    pub async fn current_committee(&self) -> Result<Option<Committee>> {
        match self.current().await? {
            Some(phase) => self.committee(phase.epoch()).await,
            None => Ok(None),
        }
    }

    /// Starts an epoch with `committee`. Epoch 0 starts the cluster and is `Done` at once
    /// (there is nothing to move); epoch `e > 0` needs epoch `e - 1` to be `Done` and enters
    /// `ChangeSync(e)`. Committee and phase are written in one transaction.
    pub async fn propose_epoch(&self, committee: &Committee) -> Result<()> {
        committee.validate()?;
        let e = committee.epoch;
        let current_key = self.key("current");
        let current = self.get_json::<CurrentRecord>(&current_key).await?;
        let (guard, phase) = match (&current, e) {
            (None, 0) => (Guard::Absent(current_key.clone()), EpochPhase::Done(0)),
            (None, _) => {
                return Err(ControlPlaneError::EpochOrder {
                    proposed: e,
                    reason: "the cluster has not started; propose epoch 0 first".into(),
                });
            }
            (Some((c, rev)), _) if c.phase == EpochPhase::Done(e.wrapping_sub(1)) && e > 0 => {
                if let Some(prev) = self.committee(e - 1).await?
                    && prev.n_shards != committee.n_shards
                {
                    return Err(ControlPlaneError::EpochOrder {
                        proposed: e,
                        reason: format!("the cluster has {} shards; a committee cannot change that", prev.n_shards),
                    });
                }
                (Guard::ModRevision(current_key.clone(), *rev), EpochPhase::ChangeSync(e))
            }
            (Some((c, _)), _) => {
                return Err(ControlPlaneError::EpochOrder {
                    proposed: e,
                    reason: format!(
                        "the current phase is {:?}; the next epoch can start only after the current one is done",
                        c.phase
                    ),
                });
            }
        };
        let mut puts =
            vec![(self.epoch_key(e), Self::encode(committee)), (current_key, Self::encode(&CurrentRecord { phase }))];
        // The proposer's trace, so every node's epoch change and shard syncs join it.
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            puts.push((self.trace_key(e), traceparent.into_bytes()));
        }
        if self.kv.txn(vec![guard, Guard::Absent(self.epoch_key(e))], puts).await? {
            Ok(())
        } else {
            Err(ControlPlaneError::EpochOrder {
                proposed: e,
                reason: "another proposal changed the epoch concurrently".into(),
            })
        }
    }

    fn trace_key(&self, epoch: Epoch) -> String {
        self.key(&format!("traces/{epoch:020}"))
    }

    /// The W3C `traceparent` of whoever proposed `epoch`, if it was traced.
    pub async fn epoch_traceparent(&self, epoch: Epoch) -> Result<Option<String>> {
        Ok(self.kv.get(&self.trace_key(epoch)).await?.map(|v| String::from_utf8_lossy(&v.value).into_owned()))
    }

    fn attestation_key(&self, epoch: Epoch, node: &NodeId) -> String {
        self.key(&format!("attestations/{epoch:020}/{node}"))
    }

    /// Records an epoch-sync-done attestation exactly once per (node, epoch), create-if-absent,
    /// and flips the phase from `ChangeSync(e)` to `Done(e)` in a transaction once the
    /// attesters own a quorum of shards in epoch `e`. Refused for non-members and unknown epochs.
    pub async fn attest(&self, attestation: &AttestationRecord) -> Result<AttestOutcome> {
        let e = attestation.epoch;
        let committee = self
            .committee(e)
            .await?
            .ok_or_else(|| ControlPlaneError::AttestationRefused(format!("epoch {e} has no committee")))?;
        if !committee.is_member(&attestation.node_id) {
            return Err(ControlPlaneError::AttestationRefused(format!(
                "{} is not a member of epoch {e}",
                attestation.node_id
            )));
        }
        attestation.verify(&committee).map_err(|err| {
            ControlPlaneError::AttestationRefused(format!("signature of {}: {err}", attestation.node_id))
        })?;
        let key = self.attestation_key(e, &attestation.node_id);
        if !self.kv.txn(vec![Guard::Absent(key.clone())], vec![(key.clone(), Self::encode(attestation))]).await? {
            let (existing, _) = self.get_json::<AttestationRecord>(&key).await?.ok_or_else(|| {
                ControlPlaneError::Corrupt { key: key.clone(), message: "attestation vanished".into() }
            })?;
            return Ok(AttestOutcome::AlreadyPresent(existing));
        }
        let flipped_to_done = self.flip_to_done_if_quorum(&committee).await?;
        Ok(AttestOutcome::Created { flipped_to_done })
    }

    /// Flips `ChangeSync(epoch)` to `Done(epoch)` if the attesters of `epoch` own a quorum of
    /// its shards; returns whether this call flipped it. Any node may call it, any number of
    /// times: the guarded write succeeds once. Nodes call it whenever they see an attestation,
    /// so a flip its quorum-completing attester never made (it failed or died right after its
    /// attestation) is made by the others.
    pub async fn complete_epoch_if_quorum(&self, epoch: Epoch) -> Result<bool> {
        match self.current().await? {
            Some(EpochPhase::ChangeSync(e)) if e == epoch => {}
            _ => return Ok(false),
        }
        let Some(committee) = self.committee(epoch).await? else { return Ok(false) };
        self.flip_to_done_if_quorum(&committee).await
    }

    async fn flip_to_done_if_quorum(&self, committee: &Committee) -> Result<bool> {
        let e = committee.epoch;
        let current_key = self.key("current");
        for _ in 0..CAS_RETRIES {
            let Some((current, rev)) = self.get_json::<CurrentRecord>(&current_key).await? else {
                return Ok(false);
            };
            if current.phase != EpochPhase::ChangeSync(e) {
                return Ok(false);
            }
            let attesters: Vec<NodeId> = self.attestations(e).await?.into_iter().map(|a| a.node_id).collect();
            if !committee.is_quorum(attesters.iter()) {
                return Ok(false);
            }
            // The crash window between the quorum-completing attestation and its flip.
            crate::failpoints::fail_point!("cp-before-done-flip", |arg| {
                crate::failpoints::crash_if_asked(arg);
                Err(ControlPlaneError::Unavailable {
                    endpoints: "fail point cp-before-done-flip".into(),
                    message: "the attester failed before the phase flip".into(),
                })
            });
            let done = CurrentRecord { phase: EpochPhase::Done(e) };
            if self
                .kv
                .txn(
                    vec![Guard::ModRevision(current_key.clone(), rev)],
                    vec![(current_key.clone(), Self::encode(&done))],
                )
                .await?
            {
                return Ok(true);
            }
        }
        Err(ControlPlaneError::Contention(current_key))
    }

    /// Every attestation for an epoch, ordered by node id.
    pub async fn attestations(&self, epoch: Epoch) -> Result<Vec<AttestationRecord>> {
        self.list_json(&self.key(&format!("attestations/{epoch:020}/"))).await
    }

    /// How many times the attestation key of `node` for `epoch` was written (0 = absent). Rule
    /// 5 says exactly once: any other number is a second attestation, whatever its content.
    pub async fn attestation_writes(&self, epoch: Epoch, node: &NodeId) -> Result<u64> {
        Ok(self.kv.get(&self.attestation_key(epoch, node)).await?.map(|v| v.version).unwrap_or(0))
    }

    /// The attestation of one node for one epoch.
    pub async fn attestation(&self, epoch: Epoch, node: &NodeId) -> Result<Option<AttestationRecord>> {
        Ok(self.get_json(&self.attestation_key(epoch, node)).await?.map(|(a, _)| a))
    }

    /// Mirrors a node's status for operators.
    pub async fn put_node(&self, record: &NodeRecord) -> Result<()> {
        let key = self.key(&format!("nodes/{}", record.node_id));
        self.kv.txn(Vec::new(), vec![(key, Self::encode(record))]).await?;
        Ok(())
    }

    /// Every node's mirrored status.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.list_json(&self.key("nodes/")).await
    }

    /// How much the cluster keeps in etcd: keys under its prefix and their value bytes, read a
    /// page at a time. Control state only, so this grows with nodes and epochs, never blobs.
    pub async fn footprint(&self) -> Result<(u64, u64)> {
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut start: Option<String> = None;
        loop {
            let page = self.kv.range(&self.prefix, start.as_deref(), LIST_PAGE).await?;
            keys += page.len() as u64;
            bytes += page.iter().map(|(k, v)| (k.len() + v.value.len()) as u64).sum::<u64>();
            match page.last() {
                Some((key, _)) if page.len() == LIST_PAGE => start = Some(format!("{key}\0")),
                _ => return Ok((keys, bytes)),
            }
        }
    }

    /// The store's current revision: a follower that read state directly resumes from here.
    pub async fn revision(&self) -> Result<u64> {
        self.kv.revision().await
    }

    /// Epoch events after `after_revision`, history first, then live; each exactly once.
    ///
    /// The genesis committee and its `Done(0)` are written in one transaction and so share a
    /// revision; a follower that resumes after that revision does not see `Done(0)` again,
    /// which is harmless (nothing moves at genesis) and why followers also read the current
    /// phase at start-up.
    pub async fn watch_epochs(&self, after_revision: u64) -> Result<EpochEventStream> {
        let stream = self.kv.watch(&self.prefix, after_revision).await?;
        let this = self.clone();
        let mapped = stream.filter_map(move |item| {
            let event = match item {
                Ok(ev) => this
                    .epoch_event(&ev.key, &ev.value)
                    .map(|event| Ok(WatchedEpochEvent { revision: ev.revision, event })),
                Err(e) => Some(Err(e)),
            };
            std::future::ready(event)
        });
        Ok(Box::pin(mapped))
    }

    /// What a write of `value` under `key` means to a follower: an epoch event, or `None` for
    /// keys followers do not act on. Every committee is validated here, whoever wrote it; a
    /// value that does not decode or validate is [`EpochEvent::Poisoned`], never an error, so
    /// one bad write cannot stop a follower. Pure, and fuzzed (`fuzz_targets/control_plane_event.rs`).
    pub fn epoch_event(&self, key: &str, value: &[u8]) -> Option<EpochEvent> {
        let rest = key.strip_prefix(&self.prefix)?;
        let poisoned = |reason: String| EpochEvent::Poisoned { key: key.to_string(), reason };
        let event = if let Some(epoch) = rest.strip_prefix("epochs/") {
            match Self::decode::<Committee>(key, value) {
                Err(e) => poisoned(e.to_string()),
                Ok(c) => match c.validate() {
                    Err(e) => poisoned(format!("invalid committee: {e}")),
                    Ok(()) if epoch.parse::<Epoch>().ok() != Some(c.epoch) => {
                        poisoned(format!("the committee of epoch {} is stored under another epoch", c.epoch))
                    }
                    Ok(()) => EpochEvent::Started(c),
                },
            }
        } else if rest == "current" {
            match Self::decode::<CurrentRecord>(key, value) {
                Ok(CurrentRecord { phase: EpochPhase::Done(e) }) => EpochEvent::Done(e),
                Ok(_) => return None,
                Err(e) => poisoned(e.to_string()),
            }
        } else if let Some(rest) = rest.strip_prefix("attestations/") {
            // `<epoch:020>/<node>`; the value is not needed to act on it.
            let (epoch, node) = rest.split_once('/')?;
            let (Ok(epoch), Ok(node)) = (epoch.parse::<Epoch>(), NodeId::new(node.to_string())) else {
                tracing::warn!(%key, "ignoring an attestation key that does not parse");
                return None;
            };
            EpochEvent::Attested { epoch, node }
        } else {
            return None;
        };
        Some(event)
    }
}

#[cfg(test)]
mod tests;
