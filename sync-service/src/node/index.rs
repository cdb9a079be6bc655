//! The node's certified index: every certified blob of the cluster, with its certificate, kept
//! on every node (as Walrus nodes keep the certified status of every blob).
//!
//! Blobs enter it verified, from three sources: a client delivering certificates
//! (`CertifyBlobs`), a shard stream carrying certificates with its slivers, and anti-entropy
//! with peers. [`ingest`] verifies certificates against the committee of their epoch and, in the
//! same write batch that adds them, hands every owned shard that lacks the blob's sliver to
//! blob recovery (the pending table): learning a certified blob is what starts its repair
//! (rule 9), also for a node that missed writes while it was up.
//!
//! Anti-entropy ([`run`]) compares the index with one peer at a time, top down: 256 digests
//! (count and XOR of the ids' hashes, one per first byte of the id), then 256 finer digests under
//! each top-level digest that differs, then lists only the ranges that still differ and fetches
//! the certificates it lacks. Two nodes in step exchange 11 KB; a wiped node lists everything.
//!
//! After every start the index must catch up before blob recovery scans it or the node attests
//! ([`catch_up`]): a full round with every member of the committee, or, once
//! `index.catch_up_deadline_ms` has passed, with members that (with this node) own a quorum of
//! shards. A store succeeds only once members owning a quorum of shards took its certificate,
//! and any two quorums share a shard, so a blob certified in the current committee is known to
//! at least one member of any quorum the node reconciles with.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    Member,
    backoff::Backoff,
    certificate::{self, Certificate, CommitteeKeys},
    erasure::BlobMetadata,
    grpc::{self, TracedChannel},
    registry::CertifiedRecord,
    types::{BlobId, Epoch, ShardIndex, ShardStatus},
};
use futures::{StreamExt, stream::FuturesUnordered};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Node, NodeError};
use crate::store::{BUCKETS, SetDigest, TOP_BUCKETS};

/// What verifying one certificate (a batched BLS pairing check, a fraction of a millisecond)
/// costs the background throttle, in bytes of background work it stands for.
const CERTIFICATE_COST_BYTES: u64 = 64 * 1024;

/// Certificates a catch-up verifies per throttle charge: tens of milliseconds of one core, so
/// the throttle paces the work finely and clients' calls never wait behind a long verification.
const VERIFY_CHUNK: usize = 64;

/// A certified blob offered to the index.
#[derive(Debug, Clone)]
pub struct Offered {
    /// The blob.
    pub blob: BlobId,
    /// Its certificate, not yet verified.
    pub certificate: Certificate,
    /// Its metadata, if the sender had it (checked against the id before it is stored).
    pub metadata: Option<BlobMetadata>,
}

/// Verifies offered certificates and adds the valid ones to the index, with pending entries for
/// the owned shards that lack their slivers. One result per offer: whether it was new, or why it
/// was refused.
pub async fn ingest(node: &Arc<Node>, offered: Vec<Offered>) -> Result<Vec<Result<bool, String>>, NodeError> {
    let ids: Vec<BlobId> = offered.iter().map(|o| o.blob).collect();
    let known = node.store.call(move |s| s.are_certified(&ids)).await?;
    let mut results: Vec<Option<Result<bool, String>>> =
        known.iter().map(|k| if *k { Some(Ok(false)) } else { None }).collect();
    // The committees the new ones name.
    let mut keys: BTreeMap<Epoch, Arc<CommitteeKeys>> = BTreeMap::new();
    for (i, o) in offered.iter().enumerate() {
        if results[i].is_some() || keys.contains_key(&o.certificate.epoch) {
            continue;
        }
        match node.committees.get(o.certificate.epoch).await {
            Ok(Some(k)) => {
                keys.insert(o.certificate.epoch, k);
            }
            Ok(None) => results[i] = Some(Err(format!("no committee of epoch {} is known", o.certificate.epoch))),
            Err(e) => return Err(NodeError::Registry(e)),
        }
    }
    let n_shards = node.view().committee().map(|c| c.n_shards);
    let todo: Vec<usize> = (0..offered.len()).filter(|i| results[*i].is_none()).collect();
    if !todo.is_empty() {
        // Pairings are CPU work: off the async workers.
        let cluster = node.cluster().to_string();
        let batch: Vec<(BlobId, Certificate, Arc<CommitteeKeys>)> = todo
            .iter()
            .filter_map(|i| {
                let o = &offered[*i];
                keys.get(&o.certificate.epoch).map(|k| (o.blob, o.certificate.clone(), k.clone()))
            })
            .collect();
        let verdicts = tokio::task::spawn_blocking(move || {
            let items: Vec<(BlobId, &Certificate, &CommitteeKeys)> =
                batch.iter().map(|(b, c, k)| (*b, c, k.as_ref())).collect();
            certificate::verify_batch(&cluster, &items)
        })
        .await
        .map_err(|e| NodeError::Store(crate::store::StoreError::Task(e.to_string())))?;
        let mut verdicts = verdicts.into_iter();
        for &i in &todo {
            if !keys.contains_key(&offered[i].certificate.epoch) {
                continue;
            }
            results[i] = Some(match verdicts.next() {
                Some(Ok(())) => match &offered[i].metadata {
                    Some(m) if m.verify_id(&offered[i].blob).is_err() => {
                        Err("metadata does not hash to the blob id".into())
                    }
                    Some(m) if Some(m.n_shards) != n_shards && n_shards.is_some() => {
                        Err(format!("metadata is for {} shards", m.n_shards))
                    }
                    _ => Ok(true),
                },
                Some(Err(e)) => Err(e.to_string()),
                None => Err("not verified".into()),
            });
        }
    }
    let accepted: Vec<Offered> =
        offered.into_iter().zip(&results).filter(|(_, r)| matches!(r, Some(Ok(true)))).map(|(o, _)| o).collect();
    if !accepted.is_empty() {
        let added = add_to_index(node, accepted).await?;
        if added.repairs > 0 {
            node.bump_repair_generation();
        }
        if added.learned > 0 {
            node.metrics.index_learned.inc_by(added.learned);
        }
    }
    Ok(results.into_iter().map(|r| r.unwrap_or(Err("not verified".into()))).collect())
}

struct Added {
    learned: u64,
    repairs: u64,
}

/// Writes verified blobs into the index with their metadata and the pending entries of owned
/// shards that lack them, in one batch, under the data lock (no shard changes status meanwhile).
async fn add_to_index(node: &Arc<Node>, accepted: Vec<Offered>) -> Result<Added, NodeError> {
    let guard = node.data_write().await;
    let view = node.view();
    let owned: Vec<(ShardIndex, ShardStatus)> = view
        .owned(&node.id)
        .into_iter()
        .filter_map(|s| view.shards.get(&s).filter(|r| r.status.is_owned()).map(|r| (s, r.status)))
        .collect();
    Ok(guard
        .call(move |s| {
            let mut batch = s.counted()?;
            let mut added = Added { learned: 0, repairs: 0 };
            for o in &accepted {
                let record = CertifiedRecord { certificate: o.certificate.clone(), invalid: None };
                if !batch.put_certified(&o.blob, &record)? {
                    continue;
                }
                added.learned += 1;
                if let Some(m) = &o.metadata {
                    batch.put_metadata(&o.blob, m)?;
                }
                for (shard, status) in &owned {
                    if batch.add_missing(*shard, &o.blob)? && *status == ShardStatus::Active {
                        added.repairs += 1;
                    }
                }
            }
            batch.commit()?;
            Ok(added)
        })
        .await?)
}

fn peer_client(node: &Node, member: &Member) -> Result<SyncServiceClient<TracedChannel>, String> {
    let channel = node
        .connector
        .channel(&member.sync_address, &member.node_id, Some(Duration::from_secs(10)))
        .map_err(|s| s.message().to_string())?;
    Ok(SyncServiceClient::new(channel)
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES))
}

fn digest_of(d: &pb::RangeDigest) -> SetDigest {
    SetDigest { count: d.count, xor: d.digest.as_slice().try_into().unwrap_or([0; 32]), bytes: 0 }
}

/// The id range `[start, end)` of buckets `first..=last` at `level` (1: by the id's first
/// byte, 2: by its first two bytes); `None` as the end for the end of the id space.
fn bucket_range(level: u32, first: usize, last: usize) -> (BlobId, Option<BlobId>) {
    let (buckets, width) = if level == 1 { (TOP_BUCKETS, 1) } else { (BUCKETS, 2) };
    let id_of = |bucket: usize| {
        let mut id = [0u8; 32];
        id[..width].copy_from_slice(&(bucket as u16).to_be_bytes()[2 - width..]);
        BlobId(id)
    };
    (id_of(first), (last + 1 < buckets).then(|| id_of(last + 1)))
}

/// Merges sorted bucket indices into runs of consecutive buckets.
fn runs(buckets: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &b in buckets {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == b => *last = b,
            _ => out.push((b, b)),
        }
    }
    out
}

/// One anti-entropy round with `peer`: finds the id ranges where the two indexes differ and
/// takes in what the peer has and this node lacks. Returns the blobs learned.
pub async fn reconcile(node: &Arc<Node>, peer: &Member) -> Result<u64, String> {
    let mut client = peer_client(node, peer)?;
    let page = node.config.index.page;
    let theirs = client
        .get_range_digests(pb::GetRangeDigestsRequest { level: 1, first: 0, count: TOP_BUCKETS as u32 })
        .await
        .map_err(|s| format!("GetRangeDigests: {}", s.message()))?
        .into_inner()
        .buckets;
    let ours = node.store.call(|s| s.range_digests(1, 0, TOP_BUCKETS)).await.map_err(|e| e.to_string())?;
    let mut ranges: Vec<(BlobId, Option<BlobId>)> = Vec::new();
    let mut whole_top = Vec::new();
    for d in &theirs {
        let bucket = d.bucket as usize;
        let Some(mine) = ours.get(bucket) else { continue };
        let theirs = digest_of(d);
        if theirs == *mine || theirs.count == 0 {
            continue;
        }
        if mine.count == 0 {
            whole_top.push(bucket); // nothing here at all: list the whole range
            continue;
        }
        // Narrow down to the finer buckets that differ.
        let first = bucket * 256;
        let fine = client
            .get_range_digests(pb::GetRangeDigestsRequest { level: 2, first: first as u32, count: 256 })
            .await
            .map_err(|s| format!("GetRangeDigests: {}", s.message()))?
            .into_inner()
            .buckets;
        let mine_fine = node.store.call(move |s| s.range_digests(2, first, 256)).await.map_err(|e| e.to_string())?;
        let differ: Vec<usize> = fine
            .iter()
            .filter(|f| {
                let b = f.bucket as usize;
                b >= first && mine_fine.get(b - first).is_some_and(|m| *m != digest_of(f) && f.count > 0)
            })
            .map(|f| f.bucket as usize)
            .collect();
        ranges.extend(runs(&differ).into_iter().map(|(a, b)| bucket_range(2, a, b)));
    }
    ranges.extend(runs(&whole_top).into_iter().map(|(a, b)| bucket_range(1, a, b)));
    ranges.sort_by_key(|r| r.0);
    let mut learned = 0;
    for (start, end) in ranges {
        let mut from = Some(start);
        while let Some(at) = from {
            let listed = client
                .list_certified(pb::ListCertifiedRequest {
                    start_blob_id: at.0.to_vec(),
                    end_blob_id: end.map(|e| e.0.to_vec()).unwrap_or_default(),
                    limit: page as u32,
                })
                .await
                .map_err(|s| format!("ListCertified: {}", s.message()))?
                .into_inner();
            let ids: Vec<BlobId> = listed.blobs.iter().filter_map(|e| BlobId::from_bytes(&e.blob_id).ok()).collect();
            from = if listed.complete { None } else { ids.last().and_then(BlobId::successor) };
            let check = ids.clone();
            let missing: Vec<BlobId> = node
                .store
                .call(move |s| {
                    let known = s.are_certified(&check)?;
                    Ok(check.into_iter().zip(known).filter(|(_, k)| !k).map(|(id, _)| id).collect())
                })
                .await
                .map_err(|e| e.to_string())?;
            if missing.is_empty() {
                continue;
            }
            let fetched = client
                .get_certificates(pb::GetCertificatesRequest {
                    blob_ids: missing.iter().map(|id| id.0.to_vec()).collect(),
                    include_metadata: true,
                })
                .await
                .map_err(|s| format!("GetCertificates: {}", s.message()))?
                .into_inner()
                .blobs;
            let offered: Vec<Offered> = fetched
                .iter()
                .filter_map(|e| {
                    Some(Offered {
                        blob: BlobId::from_bytes(&e.blob_id).ok()?,
                        certificate: Certificate::from_proto(e.certificate.as_ref()?).ok()?,
                        metadata: e.metadata.as_ref().and_then(|m| BlobMetadata::from_proto(m).ok()),
                    })
                })
                .collect();
            let mut refused = Vec::new();
            let mut offered = offered.into_iter().peekable();
            while offered.peek().is_some() {
                let chunk: Vec<Offered> = offered.by_ref().take(VERIFY_CHUNK).collect();
                // Verifying certificates is background CPU: charged to the throttle as the bytes
                // hashing would take as long.
                node.throttle.acquire(chunk.len() as u64 * CERTIFICATE_COST_BYTES).await;
                let outcomes = ingest(node, chunk).await.map_err(|e| e.to_string())?;
                learned += outcomes.iter().filter(|r| matches!(r, Ok(true))).count() as u64;
                refused.extend(outcomes.into_iter().filter_map(Result::err));
            }
            if let Some(first) = refused.first() {
                warn!(peer = %peer.node_id, refused = refused.len(), first = %first, "a peer offered certificates that do not verify");
            }
        }
    }
    Ok(learned)
}

/// Whether any reachable member of `committee` reports certified blobs: a node that starts
/// empty in epoch 0 is a genesis node only if the cluster stored nothing yet (else it is a
/// wiped node and catches up). Members that do not answer within a few seconds count as empty;
/// should one of them hold blobs after all, the index learns them later and the blobs' slivers
/// are recovered as pending repairs.
pub async fn peers_hold_blobs(node: &Arc<Node>, committee: &ferry_shared::Committee) -> bool {
    let mut asks: FuturesUnordered<_> = committee
        .members
        .iter()
        .filter(|m| m.node_id != node.id)
        .map(|m| async move {
            let mut client = peer_client(node, m).ok()?;
            let answer = tokio::time::timeout(Duration::from_secs(3), client.get_status(pb::GetStatusRequest {}));
            Some(answer.await.ok()?.ok()?.into_inner().certified_count)
        })
        .collect();
    while let Some(answer) = asks.next().await {
        if answer.is_some_and(|n| n > 0) {
            return true;
        }
    }
    false
}

/// Catches the index up with the committee's members (see the module comment), then marks it
/// caught up. Retries the members that did not answer until the rule is met.
pub async fn catch_up(node: &Arc<Node>) {
    let started = Instant::now();
    let deadline = Duration::from_millis(node.config.index.catch_up_deadline_ms);
    let mut answered: BTreeSet<ferry_shared::NodeId> = BTreeSet::new();
    let mut learned = 0u64;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let view = node.view();
        let Some(committee) = view.committee().cloned() else { return };
        let peers: Vec<Member> = committee
            .members
            .iter()
            .filter(|m| m.node_id != node.id && !answered.contains(&m.node_id))
            .cloned()
            .collect();
        // One peer after another: the first usually brings everything and the others' digests
        // then match. Concurrent rounds would each verify the same certificates (three times
        // the CPU with four nodes).
        for peer in &peers {
            match reconcile(node, peer).await {
                Ok(n) => {
                    learned += n;
                    answered.insert(peer.node_id.clone());
                }
                Err(e) => debug!(peer = %peer.node_id, error = %e, "catch-up round failed; retrying"),
            }
        }
        let everyone = committee.members.iter().all(|m| m.node_id == node.id || answered.contains(&m.node_id));
        let with_me = answered.iter().chain(std::iter::once(&node.id));
        let quorum = committee.is_quorum(with_me);
        if everyone || (quorum && started.elapsed() >= deadline) {
            let missed: Vec<String> = committee
                .members
                .iter()
                .filter(|m| m.node_id != node.id && !answered.contains(&m.node_id))
                .map(|m| m.node_id.to_string())
                .collect();
            info!(
                learned,
                ?missed,
                took_ms = started.elapsed().as_millis() as u64,
                "certified index caught up with the peers"
            );
            node.set_index_caught_up();
            // An attestation held back only by the catch-up goes out now.
            super::attestation::attest_if_ready(node).await;
            return;
        }
        backoff.wait().await;
    }
}

/// Keeps the index in step for the life of the process: catches up once the node is a member,
/// then one round with the next peer in turn every `index.anti_entropy_interval_ms`.
pub async fn run(node: Arc<Node>) {
    let mut views = node.subscribe();
    if views.wait_for(|v| v.committee().is_some_and(|c| c.is_member(&node.id))).await.is_err() {
        return;
    }
    catch_up(&node).instrument(info_span!("index_catch_up", node = %node.id)).await;
    let interval = Duration::from_millis(node.config.index.anti_entropy_interval_ms);
    let mut turn = 0usize;
    loop {
        tokio::time::sleep(interval).await;
        let Some(committee) = node.view().committee().cloned() else { continue };
        let peers: Vec<&Member> = committee.members.iter().filter(|m| m.node_id != node.id).collect();
        if peers.is_empty() {
            continue;
        }
        let peer = peers[turn % peers.len()];
        turn += 1;
        match reconcile(&node, peer).await {
            Ok(0) => debug!(peer = %peer.node_id, "anti-entropy round: in step"),
            Ok(n) => info!(peer = %peer.node_id, learned = n, "anti-entropy round learned certified blobs"),
            Err(e) => debug!(peer = %peer.node_id, error = %e, "anti-entropy round failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_buckets_become_id_ranges() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        let (start, end) = bucket_range(2, 0x0102, 0x0103);
        assert_eq!(&start.0[..3], &[1, 2, 0]);
        assert_eq!(&end.map(|e| e.0[..3].to_vec()), &Some(vec![1, 4, 0]));
        let (start, end) = bucket_range(1, 0xfe, 0xff);
        assert_eq!(start.0[0], 0xfe);
        assert_eq!(end, None, "the last bucket runs to the end of the id space");
        assert_eq!(bucket_range(2, 0xffff, 0xffff).1, None);
    }
}
