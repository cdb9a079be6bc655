//! Unit tests of the control-plane rules over the in-memory store.
#![allow(clippy::unwrap_used)]

use futures::StreamExt;

use super::*;
use crate::committee::{Member, rebalance};
use crate::crypto::NodeKeypair;

pub(crate) struct Fixture {
    pub cp: ControlPlane,
    pub keys: Vec<(NodeId, NodeKeypair)>,
    pub c0: Committee,
}

pub(crate) async fn fixture(nodes: usize, shards: u32) -> Fixture {
    let cp = ControlPlane::in_memory("test");
    let keys: Vec<_> = (0..nodes).map(|i| (NodeId::new(format!("n{i}")).unwrap(), NodeKeypair::generate())).collect();
    let members = keys.iter().map(|(id, k)| Member::for_key(id.clone(), k, "", "", 1)).collect();
    let c0 = Committee::genesis(shards, members).unwrap();
    cp.propose_epoch(&c0).await.unwrap();
    Fixture { cp, keys, c0 }
}

impl Fixture {
    pub fn next_committee(&self) -> Committee {
        let mut members = self.c0.members.clone();
        members[0].weight = 3;
        rebalance(&self.c0, members).unwrap()
    }

    pub fn attestation(&self, i: usize, epoch: Epoch) -> AttestationRecord {
        let (id, key) = &self.keys[i];
        AttestationRecord::sign(key, id.clone(), epoch, "sync-service", Vec::new())
    }
}

#[tokio::test]
async fn genesis_is_done_and_epochs_follow_in_order() {
    let f = fixture(4, 8).await;
    assert_eq!(f.cp.current().await.unwrap(), Some(EpochPhase::Done(0)));
    let c1 = f.next_committee();
    f.cp.propose_epoch(&c1).await.unwrap();
    assert_eq!(f.cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
    // Epoch 2 cannot start before epoch 1 is done, and epoch 1 cannot be proposed twice.
    let mut c2 = rebalance(&c1, c1.members.clone()).unwrap();
    assert!(matches!(f.cp.propose_epoch(&c2).await, Err(ControlPlaneError::EpochOrder { proposed: 2, .. })));
    assert!(f.cp.propose_epoch(&c1).await.is_err());
    c2.assignment.pop();
    assert!(matches!(f.cp.propose_epoch(&c2).await, Err(ControlPlaneError::Committee(_))));
}

#[tokio::test]
async fn attestation_is_created_once_and_flips_phase_at_quorum() {
    let f = fixture(4, 4).await;
    f.cp.propose_epoch(&f.next_committee()).await.unwrap();
    let c1 = f.cp.committee(1).await.unwrap().unwrap();
    // Attest in shard-weight order until quorum: the flip comes exactly at the quorum.
    let mut order: Vec<usize> = (0..4).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(c1.shards_of(&f.keys[i].0).len()));
    let mut owned = 0;
    let mut flips = 0;
    for &i in &order {
        let out = f.cp.attest(&f.attestation(i, 1)).await.unwrap();
        owned += c1.shards_of(&f.keys[i].0).len() as u32;
        let AttestOutcome::Created { flipped_to_done } = out else { panic!("first attestation must be created") };
        assert_eq!(flipped_to_done, owned >= c1.quorum_shards() && flips == 0, "flip exactly at the first quorum");
        flips += u32::from(flipped_to_done);
        assert!(matches!(f.cp.attest(&f.attestation(i, 1)).await.unwrap(), AttestOutcome::AlreadyPresent(_)));
    }
    assert_eq!(flips, 1);
    assert_eq!(f.cp.current().await.unwrap(), Some(EpochPhase::Done(1)));
    assert_eq!(f.cp.attestations(1).await.unwrap().len(), 4);
}

#[tokio::test]
async fn forged_and_foreign_attestations_are_refused() {
    let f = fixture(4, 4).await;
    let mut forged = f.attestation(1, 0);
    forged.node_id = f.keys[2].0.clone();
    assert!(matches!(f.cp.attest(&forged).await, Err(ControlPlaneError::AttestationRefused(_))));
    let stranger =
        AttestationRecord::sign(&NodeKeypair::generate(), NodeId::new("zz").unwrap(), 0, "sync-service", Vec::new());
    assert!(matches!(f.cp.attest(&stranger).await, Err(ControlPlaneError::AttestationRefused(_))));
    assert!(matches!(f.cp.attest(&f.attestation(0, 9)).await, Err(ControlPlaneError::AttestationRefused(_))));
}

#[tokio::test]
async fn listings_are_read_a_page_at_a_time_and_miss_nothing() {
    // More attesters than a page holds: every one of them is listed, once, in node order.
    let f = fixture(3 * LIST_PAGE + 5, 64).await;
    let c1 = f.next_committee();
    f.cp.propose_epoch(&c1).await.unwrap();
    for i in 0..f.keys.len() {
        f.cp.attest(&f.attestation(i, 1)).await.unwrap();
        let record =
            NodeRecord { node_id: f.keys[i].0.clone(), status: NodeStatus::Active, epoch: 1, updated_at_ms: 0 };
        f.cp.put_node(&record).await.unwrap();
    }
    let mut expected: Vec<NodeId> = f.keys.iter().map(|(id, _)| id.clone()).collect();
    expected.sort();
    let attesters: Vec<NodeId> = f.cp.attestations(1).await.unwrap().into_iter().map(|a| a.node_id).collect();
    assert_eq!(attesters, expected);
    let nodes: Vec<NodeId> = f.cp.nodes().await.unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(nodes, expected);
}

#[tokio::test]
async fn watch_replays_history_after_a_revision_then_follows_live() {
    let f = fixture(4, 4).await;
    let mut all = f.cp.watch_epochs(0).await.unwrap();
    let first = all.next().await.unwrap().unwrap();
    assert!(matches!(&first.event, EpochEvent::Started(c) if c.epoch == 0));
    let second = all.next().await.unwrap().unwrap();
    assert_eq!(second.event, EpochEvent::Done(0));
    assert_eq!(first.revision, second.revision, "committee and phase are one transaction");

    f.cp.propose_epoch(&f.next_committee()).await.unwrap();
    let started = all.next().await.unwrap().unwrap();
    assert!(matches!(&started.event, EpochEvent::Started(c) if c.epoch == 1));
    let mut resumed = f.cp.watch_epochs(started.revision).await.unwrap();
    for i in 0..4 {
        f.cp.attest(&f.attestation(i, 1)).await.unwrap();
    }
    // Every attestation is an event (followers complete a lost phase flip on them); the flip
    // comes right after the quorum-completing one.
    for stream in [&mut resumed, &mut all] {
        let mut events = Vec::new();
        for _ in 0..5 {
            events.push(stream.next().await.unwrap().unwrap().event);
        }
        let attested: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, EpochEvent::Attested { epoch: 1, .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(attested.len(), 4, "{events:?}");
        let done_at = events.iter().position(|e| *e == EpochEvent::Done(1)).unwrap();
        let before: Vec<NodeId> = events[..done_at]
            .iter()
            .filter_map(|e| match e {
                EpochEvent::Attested { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect();
        let c1 = f.next_committee();
        assert!(c1.is_quorum(before.iter()), "{events:?}");
        assert!(!c1.is_quorum(before[..before.len() - 1].iter()), "the flip follows the first quorum: {events:?}");
    }
}

#[tokio::test]
async fn a_committee_that_is_not_valid_or_misfiled_is_an_error_not_a_committee() {
    let f = fixture(4, 8).await;
    // Longer than its shard count: a reader indexing slivers by it would go out of bounds.
    let mut long = f.c0.clone();
    long.assignment.push(f.keys[0].0.clone());
    let key = f.cp.epoch_key(0);
    f.cp.kv.txn(Vec::new(), vec![(key.clone(), serde_json::to_vec(&long).unwrap())]).await.unwrap();
    let err = f.cp.committee(0).await.unwrap_err();
    assert!(
        matches!(&err, ControlPlaneError::Corrupt { message, .. } if message.contains("invalid committee")),
        "{err}"
    );
    assert!(f.cp.current_committee().await.is_err(), "the current committee is read the same way");
    // A valid committee under another epoch's key.
    let mut misfiled = f.c0.clone();
    misfiled.epoch = 5;
    f.cp.kv.txn(Vec::new(), vec![(key, serde_json::to_vec(&misfiled).unwrap())]).await.unwrap();
    let err = f.cp.committee(0).await.unwrap_err();
    assert!(err.to_string().contains("epoch 5"), "{err}");
}
