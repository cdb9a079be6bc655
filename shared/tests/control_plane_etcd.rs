//! Integration tests of the control plane against a real etcd (one `/usr/bin/etcd` per test,
//! started by `ferry_shared::testing::EtcdProcess`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::Barrier;

use ferry_shared::{
    committee::{Committee, Member, rebalance},
    control_plane::{access, etcd::EtcdKv, *},
    crypto::NodeKeypair,
    testing::{EtcdProcess, free_port},
    tls::{ClusterCa, PeerIdentity, TlsConfig, TlsMaterial, write_dev_pki},
    types::{NodeId, NodeStatus},
};

const STEP: Duration = Duration::from_secs(15);

struct Cluster {
    etcd: EtcdProcess,
    cp: ControlPlane,
    keys: Vec<(NodeId, Arc<NodeKeypair>)>,
    c0: Committee,
}

impl Cluster {
    /// A fresh etcd with a 4-member, 4-shard genesis committee (epoch 0, `Done(0)`) proposed
    /// unless `propose` is false.
    async fn start(propose: bool) -> Cluster {
        let etcd = EtcdProcess::start().await.expect("start etcd");
        let cp =
            tokio::time::timeout(STEP, ControlPlane::connect_etcd(std::slice::from_ref(&etcd.endpoint), "test", None))
                .await
                .expect("connect in time")
                .unwrap_or_else(|e| panic!("connect: {e}; etcd log:\n{}", etcd.log_tail()));
        let keys: Vec<_> =
            (0..4).map(|i| (NodeId::new(format!("node-{i}")).unwrap(), Arc::new(NodeKeypair::generate()))).collect();
        let members = keys.iter().map(|(id, k)| member(id, k, 1)).collect();
        let c0 = Committee::genesis(4, members).unwrap();
        assert_eq!(c0.epoch, 0);
        if propose {
            cp.propose_epoch(&c0).await.unwrap();
            assert_eq!(cp.current().await.unwrap(), Some(EpochPhase::Done(0)));
        }
        Cluster { etcd, cp, keys, c0 }
    }

    /// The committee of `prev.epoch + 1`: node-3's weight changes, every node still owns one shard.
    fn next(&self, prev: &Committee, weight: u64) -> Committee {
        let mut members = prev.members.clone();
        for m in &mut members {
            if m.node_id.as_str() == "node-3" {
                m.weight = weight;
            }
        }
        let next = rebalance(prev, members).unwrap();
        assert_eq!(next.epoch, prev.epoch + 1);
        for (id, _) in &self.keys {
            assert_eq!(next.shards_of(id).len(), 1, "{id} owns one shard in epoch {}", next.epoch);
        }
        next
    }

    /// Proposes the epoch-1 committee; the phase becomes `ChangeSync(1)`.
    async fn start_epoch_1(&self) -> Committee {
        let c1 = self.next(&self.c0, 2);
        self.cp.propose_epoch(&c1).await.unwrap();
        assert_eq!(self.cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
        c1
    }

    fn attestation(&self, node: usize, epoch: u64) -> AttestationRecord {
        let (id, key) = &self.keys[node];
        AttestationRecord::sign(key, id.clone(), epoch, "sync-service", vec![])
    }

    async fn attest_all(&self, nodes: &[usize], epoch: u64) {
        for &n in nodes {
            assert!(matches!(
                self.cp.attest(&self.attestation(n, epoch)).await.unwrap(),
                AttestOutcome::Created { .. }
            ));
        }
    }
}

fn member(id: &NodeId, key: &NodeKeypair, weight: u64) -> Member {
    Member::for_key(id.clone(), key, "127.0.0.1:1", "127.0.0.1:2", weight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_attesters_create_exactly_one_record() {
    let cluster = Cluster::start(true).await;
    cluster.start_epoch_1().await;
    let barrier = Arc::new(Barrier::new(20));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cp = cluster.cp.clone();
        let barrier = barrier.clone();
        let record = cluster.attestation(0, 1);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let outcome = cp.attest(&record).await.unwrap();
            (record, outcome)
        }));
    }
    let mut created = Vec::new();
    let mut present = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (record, AttestOutcome::Created { flipped_to_done }) => {
                assert!(!flipped_to_done, "one node's shard is not a quorum");
                created.push(record);
            }
            (_, AttestOutcome::AlreadyPresent(existing)) => present.push(existing),
        }
    }
    assert_eq!(created.len(), 1, "exactly one attester creates the record");
    assert_eq!(present.len(), 19);
    let stored = cluster.cp.attestations(1).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0], created[0], "the stored record is the creator's");
    assert!(present.iter().all(|p| *p == created[0]), "the others get the stored record back unchanged");
    assert_eq!(cluster.cp.attestation(1, &cluster.keys[0].0).await.unwrap().as_ref(), Some(&created[0]));
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phase_flips_to_done_exactly_once_at_first_quorum() {
    let cluster = Cluster::start(true).await;
    let c1 = cluster.start_epoch_1().await;
    assert_eq!(c1.f(), 1);
    assert_eq!(c1.quorum_shards(), 3);
    let barrier = Arc::new(Barrier::new(4));
    let mut tasks = Vec::new();
    for n in 0..4 {
        let cp = cluster.cp.clone();
        let barrier = barrier.clone();
        let record = cluster.attestation(n, 1);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cp.attest(&record).await.unwrap()
        }));
    }
    let mut flips = 0;
    for task in tasks {
        match task.await.unwrap() {
            AttestOutcome::Created { flipped_to_done } => flips += usize::from(flipped_to_done),
            other => panic!("each node attests once, got {other:?}"),
        }
    }
    assert_eq!(flips, 1, "exactly one attester flips the phase");
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::Done(1)));
    assert_eq!(cluster.cp.attestations(1).await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phase_flips_to_done_at_the_third_sequential_attestation() {
    let cluster = Cluster::start(true).await;
    cluster.start_epoch_1().await;
    let c = &cluster;
    let outcome = |n| async move { c.cp.attest(&c.attestation(n, 1)).await.unwrap() };
    assert_eq!(outcome(0).await, AttestOutcome::Created { flipped_to_done: false });
    assert_eq!(outcome(1).await, AttestOutcome::Created { flipped_to_done: false });
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
    // A repeated attestation adds no shards.
    assert!(matches!(outcome(1).await, AttestOutcome::AlreadyPresent(_)));
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
    assert_eq!(outcome(2).await, AttestOutcome::Created { flipped_to_done: true });
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::Done(1)));
    assert_eq!(outcome(3).await, AttestOutcome::Created { flipped_to_done: false });
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::Done(1)));
}

async fn next_event(stream: &mut EpochEventStream) -> WatchedEpochEvent {
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("no watch error")
}

/// The next `Started` or `Done` event; attestation events before it are skipped (and counted).
async fn next_phase_event(stream: &mut EpochEventStream, attested: &mut usize) -> WatchedEpochEvent {
    loop {
        let e = next_event(stream).await;
        if matches!(e.event, EpochEvent::Attested { .. }) {
            *attested += 1;
        } else {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watcher_restarted_from_last_revision_sees_every_event_once() {
    let cluster = Cluster::start(false).await;
    let cp = &cluster.cp;
    let mut first = cp.watch_epochs(0).await.unwrap();

    // Epochs 0 and 1 start and finish before anything is read.
    cp.propose_epoch(&cluster.c0).await.unwrap();
    let c1 = cluster.next(&cluster.c0, 2);
    cp.propose_epoch(&c1).await.unwrap();
    cluster.attest_all(&[0, 1, 2], 1).await;
    assert_eq!(cp.current().await.unwrap(), Some(EpochPhase::Done(1)));

    // Read up to Started(1), which has a revision of its own (epoch 0's Started and Done
    // share one revision, so a cursor inside it would be ambiguous), and stop.
    let mut seen = Vec::new();
    let mut attested = 0;
    for _ in 0..3 {
        seen.push(next_phase_event(&mut first, &mut attested).await);
    }
    assert_eq!(attested, 0, "the attestations of epoch 1 come after its Started");
    let cursor = seen.last().unwrap().revision;
    drop(first);

    // More events while nobody watches.
    let c2 = cluster.next(&c1, 1);
    cp.propose_epoch(&c2).await.unwrap();
    cluster.attest_all(&[3, 2, 1], 2).await;
    assert_eq!(cp.current().await.unwrap(), Some(EpochPhase::Done(2)));
    let c3 = cluster.next(&c2, 2);
    cp.propose_epoch(&c3).await.unwrap();

    let mut second = cp.watch_epochs(cursor).await.unwrap();
    for _ in 0..4 {
        seen.push(next_phase_event(&mut second, &mut attested).await);
    }
    assert!(attested >= 4, "the attestations of epochs 1 and 2 (up to each flip) are events too: {attested}");
    // Nothing else: no duplicates after the expected events.
    let extra = tokio::time::timeout(Duration::from_millis(500), second.next()).await;
    assert!(extra.is_err(), "unexpected extra event: {extra:?}");

    let events: Vec<EpochEvent> = seen.iter().map(|e| e.event.clone()).collect();
    let expected = vec![
        EpochEvent::Started(cluster.c0.clone()),
        EpochEvent::Done(0),
        EpochEvent::Started(c1),
        EpochEvent::Done(1),
        EpochEvent::Started(c2),
        EpochEvent::Done(2),
        EpochEvent::Started(c3),
    ];
    assert_eq!(events, expected);
    assert!(seen.windows(2).all(|w| w[0].revision <= w[1].revision), "revisions in order: {seen:?}");
    assert!(seen[3].revision > cursor, "the restarted watch begins after the cursor");
    let unique: HashSet<(u64, String)> = seen.iter().map(|e| (e.revision, format!("{:?}", e.event))).collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    assert!(cp.revision().await.unwrap() >= seen.last().unwrap().revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_etcd_is_a_typed_error() {
    // Reserved and not listened on: connections are refused.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let result = tokio::time::timeout(STEP, ControlPlane::connect_etcd(std::slice::from_ref(&endpoint), "test", None))
        .await
        .expect("connect gives up in time");
    match result {
        Err(ControlPlaneError::Unavailable { endpoints, .. }) => assert_eq!(endpoints, endpoint),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let direct =
        tokio::time::timeout(STEP, EtcdKv::connect(std::slice::from_ref(&endpoint), None, "/")).await.expect("in time");
    assert!(matches!(direct, Err(ControlPlaneError::Unavailable { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_started_before_etcd_waits_for_it() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // The client starts first and retries; etcd comes up once the first attempt has failed.
    let connecting = tokio::spawn(async move {
        ControlPlane::connect_etcd_with_retry(std::slice::from_ref(&endpoint), "test", None, 10).await
    });
    let refused =
        tokio::time::timeout(STEP, ControlPlane::connect_etcd(&[format!("http://127.0.0.1:{port}")], "test", None))
            .await
            .expect("in time");
    assert!(refused.is_err(), "nothing listens yet");
    let _etcd = EtcdProcess::start_on(port).await.unwrap();
    let cp = tokio::time::timeout(Duration::from_secs(40), connecting)
        .await
        .expect("the retrying client connects once etcd is up")
        .unwrap()
        .unwrap();
    assert!(cp.revision().await.unwrap() >= 1);
    // With one attempt only, a dead endpoint is the typed error at once.
    let dead = format!("http://127.0.0.1:{}", free_port());
    assert!(matches!(
        ControlPlane::connect_etcd_with_retry(std::slice::from_ref(&dead), "test", None, 1).await,
        Err(ControlPlaneError::Unavailable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_killed_after_connect_is_a_typed_error() {
    let mut cluster = Cluster::start(true).await;
    cluster.etcd.kill();
    let result = tokio::time::timeout(STEP, cluster.cp.current()).await.expect("gives up in time");
    assert!(matches!(result, Err(ControlPlaneError::Unavailable { .. })), "got {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_member_attestation_is_refused() {
    let cluster = Cluster::start(true).await;
    let outsider_key = NodeKeypair::generate();
    let outsider = AttestationRecord::sign(&outsider_key, NodeId::new("outsider").unwrap(), 0, "sync-service", vec![]);
    let refused = cluster.cp.attest(&outsider).await;
    assert!(matches!(refused, Err(ControlPlaneError::AttestationRefused(_))), "got {refused:?}");

    // A member's id signed with someone else's key.
    let forged = AttestationRecord::sign(&outsider_key, cluster.keys[0].0.clone(), 0, "sync-service", vec![]);
    let refused = cluster.cp.attest(&forged).await;
    assert!(matches!(refused, Err(ControlPlaneError::AttestationRefused(_))), "got {refused:?}");

    // An epoch without a committee.
    let refused = cluster.cp.attest(&cluster.attestation(0, 7)).await;
    assert!(matches!(refused, Err(ControlPlaneError::AttestationRefused(_))), "got {refused:?}");

    assert!(cluster.cp.attestations(0).await.unwrap().is_empty());
    assert!(cluster.cp.attestations(7).await.unwrap().is_empty());
    assert_eq!(cluster.cp.current().await.unwrap(), Some(EpochPhase::Done(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn epoch_out_of_order_is_refused() {
    let cluster = Cluster::start(false).await;
    let cp = &cluster.cp;
    let c1 = cluster.next(&cluster.c0, 2);
    let c2 = cluster.next(&c1, 1);
    let refused = |r: Result<()>, proposed: u64| match r {
        Err(ControlPlaneError::EpochOrder { proposed: p, .. }) => assert_eq!(p, proposed),
        other => panic!("expected EpochOrder for {proposed}, got {other:?}"),
    };

    // Nothing before genesis.
    refused(cp.propose_epoch(&c1).await, 1);
    assert_eq!(cp.current().await.unwrap(), None);

    cp.propose_epoch(&cluster.c0).await.unwrap();
    refused(cp.propose_epoch(&cluster.c0).await, 0);
    // Skipping an epoch.
    refused(cp.propose_epoch(&c2).await, 2);
    cp.propose_epoch(&c1).await.unwrap();
    // Epoch 2 cannot start while epoch 1 is still syncing, nor can epoch 1 be proposed twice.
    refused(cp.propose_epoch(&c2).await, 2);
    refused(cp.propose_epoch(&c1).await, 1);

    assert_eq!(cp.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
    assert_eq!(cp.committee(1).await.unwrap(), Some(c1));
    assert_eq!(cp.committee(2).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_pages_in_key_order_within_the_prefix() {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let kv = EtcdKv::connect(std::slice::from_ref(&etcd.endpoint), None, "/").await.unwrap();
    let puts = ["/p/b", "/p/a", "/p/c", "/p0", "/o/z"].iter().map(|k| (k.to_string(), k.as_bytes().to_vec())).collect();
    assert!(kv.txn(vec![], puts).await.unwrap());
    let keys = |v: Vec<(String, Versioned)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(kv.range("/p/", None, usize::MAX).await.unwrap()), ["/p/a", "/p/b", "/p/c"]);
    assert_eq!(keys(kv.range("/p/", None, 2).await.unwrap()), ["/p/a", "/p/b"]);
    assert_eq!(keys(kv.range("/p/", Some("/p/b"), 5).await.unwrap()), ["/p/b", "/p/c"]);
    let a = kv.get("/p/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"/p/a");
    assert_eq!(a.mod_revision, kv.revision().await.unwrap());
    assert!(!kv.txn(vec![Guard::Absent("/p/a".into())], vec![("/p/a".into(), b"x".to_vec())]).await.unwrap());
    assert!(
        kv.txn(vec![Guard::ModRevision("/p/a".into(), a.mod_revision)], vec![("/p/a".into(), b"y".to_vec())])
            .await
            .unwrap()
    );
    assert_eq!(kv.get("/p/a").await.unwrap().unwrap().value, b"y");
    assert_eq!(kv.get("/p/none").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_from_compacted_revision_is_a_resume_error() {
    let cluster = Cluster::start(true).await;
    cluster.start_epoch_1().await;
    let head = cluster.cp.revision().await.unwrap();
    let mut client = etcd_client::Client::connect([cluster.etcd.endpoint.as_str()], None).await.unwrap();
    client.compact(i64::try_from(head).unwrap(), None).await.unwrap();
    let mut stream = cluster.cp.watch_epochs(0).await.unwrap();
    let item = tokio::time::timeout(STEP, stream.next()).await.expect("an item in time").expect("an item");
    assert!(matches!(item, Err(ControlPlaneError::WatchResume { after: 0, .. })), "got {item:?}");
    let end = tokio::time::timeout(STEP, stream.next()).await.expect("ends in time");
    assert!(end.is_none(), "the stream ends after the error");
    // Resuming from the head works.
    let mut live = cluster.cp.watch_epochs(head).await.unwrap();
    cluster.attest_all(&[0, 1, 2], 1).await;
    assert_eq!(next_phase_event(&mut live, &mut 0).await.event, EpochEvent::Done(1));
}

/// Is `result` etcd's RBAC refusing the request (not a network failure)?
fn is_denied<T: std::fmt::Debug>(result: Result<T>) -> bool {
    matches!(result, Err(ControlPlaneError::Denied { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secured_etcd_gives_each_party_only_what_its_role_allows() {
    ferry_shared::tls::install_crypto_provider();
    let pki = tempfile::tempdir().unwrap();
    let ids: Vec<NodeId> = (0..4).map(|i| NodeId::new(format!("node-{i}")).unwrap()).collect();
    write_dev_pki(pki.path(), &ids, "ops", "app").unwrap();
    // A client certificate called like a node, and a whole second CA with an operator.
    ClusterCa::load(pki.path()).unwrap().issue_client("node-1").unwrap().write(pki.path(), "impostor").unwrap();
    let foreign = tempfile::tempdir().unwrap();
    write_dev_pki(foreign.path(), &ids, "ops", "app").unwrap();
    let load = |dir: &std::path::Path, name: &str| TlsConfig::from_dir(dir, name).load(None).unwrap().unwrap();
    let operator = load(pki.path(), "ops");

    let etcd = EtcdProcess::start_secured(pki.path(), &operator).await.expect("start etcd with TLS");
    let endpoints = [etcd.endpoint.clone()];
    assert!(etcd.endpoint.starts_with("https://"));
    let mut parties: Vec<PeerIdentity> = ids.iter().cloned().map(PeerIdentity::Node).collect();
    parties.push(PeerIdentity::Client("app".into()));
    let report = access::apply(&endpoints, &operator, "test", &parties).await.unwrap();
    assert_eq!(report.users_created.len(), 7, "root, four nodes, the client and the operator: {report:?}");
    let again = access::apply(&endpoints, &operator, "test", &parties).await.unwrap();
    assert!(again.users_created.is_empty(), "a second run changes nothing: {again:?}");

    let connect = |material: Arc<TlsMaterial>, cluster: &'static str| {
        let endpoints = endpoints.clone();
        async move {
            tokio::time::timeout(STEP, ControlPlane::connect_etcd(&endpoints, cluster, Some(&material)))
                .await
                .expect("connect in time")
        }
    };
    let ops = connect(operator.clone(), "test").await.unwrap();
    let keys: Vec<_> = ids.iter().map(|id| (id.clone(), Arc::new(NodeKeypair::generate()))).collect();
    let c0 = Committee::genesis(4, keys.iter().map(|(id, k)| member(id, k, 1)).collect()).unwrap();
    ops.propose_epoch(&c0).await.unwrap();
    let mut members = c0.members.clone();
    members[3].weight = 2;
    let c1 = rebalance(&c0, members).unwrap();

    // A node reads everything of its cluster, writes its attestation and its own record only.
    let node0 = connect(load(pki.path(), "node-0"), "test").await.unwrap();
    assert_eq!(node0.committee(0).await.unwrap(), Some(c0.clone()));
    let record =
        |i: usize| NodeRecord { node_id: ids[i].clone(), status: NodeStatus::Active, epoch: 0, updated_at_ms: 1 };
    node0.put_node(&record(0)).await.unwrap();
    assert!(is_denied(node0.put_node(&record(1)).await), "a node cannot write another node's record");
    assert!(is_denied(node0.propose_epoch(&c1).await), "a node cannot propose an epoch");
    let app = connect(load(pki.path(), "app"), "test").await.unwrap();
    assert!(is_denied(app.propose_epoch(&c1).await), "nor can an application client");
    ops.propose_epoch(&c1).await.unwrap();
    let attestation = AttestationRecord::sign(&keys[0].1, ids[0].clone(), 1, "sync-service", vec![]);
    assert!(matches!(node0.attest(&attestation).await.unwrap(), AttestOutcome::Created { .. }));
    assert!(is_denied(connect(load(pki.path(), "node-0"), "other").await), "nor read another cluster's keys");

    // An application client only reads.
    assert_eq!(app.current().await.unwrap(), Some(EpochPhase::ChangeSync(1)));
    let attestation1 = AttestationRecord::sign(&keys[1].1, ids[1].clone(), 1, "sync-service", vec![]);
    assert!(is_denied(app.attest(&attestation1).await), "a client cannot write an attestation");
    assert!(is_denied(app.put_node(&record(1)).await));

    // A client certificate called like a node is not that node's etcd user.
    assert!(is_denied(connect(load(pki.path(), "impostor"), "test").await), "node-1.client.ferry has no user");
    // Nothing is served without a certificate from the cluster CA, nor in plaintext.
    let foreign_operator = TlsConfig {
        ca_file: pki.path().join("ca.pem"),
        cert_file: foreign.path().join("ops.pem"),
        key_file: foreign.path().join("ops.key"),
        ..TlsConfig::default()
    };
    let foreign_operator = foreign_operator.load(None).unwrap().unwrap();
    assert!(matches!(connect(foreign_operator, "test").await, Err(ControlPlaneError::Unavailable { .. })));
    let no_cert = ControlPlane::connect_etcd(&endpoints, "test", None).await;
    assert!(
        matches!(no_cert, Err(ControlPlaneError::Unavailable { ref message, .. }) if message.contains("certificate"))
    );
    let ca_only = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(pki.path().join("ca.pem")).unwrap()));
    let anonymous = async {
        let options = etcd_client::ConnectOptions::new().with_tls(ca_only).with_timeout(Duration::from_secs(3));
        let mut client = etcd_client::Client::connect(&endpoints, Some(options)).await?;
        client.get("/ferry/test/current", None).await
    };
    assert!(
        tokio::time::timeout(STEP, anonymous).await.expect("in time").is_err(),
        "etcd itself refuses a connection without a client certificate"
    );
    let plaintext = [etcd.endpoint.replace("https://", "http://")];
    assert!(ControlPlane::connect_etcd(&plaintext, "test", None).await.is_err());
    // What the operator wrote and the node attested is all there is.
    assert_eq!(ops.attestations(1).await.unwrap(), vec![attestation]);
    assert_eq!(ops.nodes().await.unwrap(), vec![record(0)]);

    // Revocation. Not of a member, and not while an epoch changes (a node that leaves still
    // serves its shards); not of the operator doing it.
    let revoke = |party: PeerIdentity| {
        let (endpoints, operator) = (endpoints.clone(), operator.clone());
        async move { access::revoke(&endpoints, &operator, "test", &[party]).await }
    };
    let node3 = PeerIdentity::Node(ids[3].clone());
    let refused = revoke(node3.clone()).await;
    assert!(matches!(refused, Err(ControlPlaneError::RevokeRefused { .. })), "a member mid-change: {refused:?}");
    let refused = revoke(operator.own_identity().clone()).await;
    assert!(matches!(refused, Err(ControlPlaneError::RevokeRefused { .. })), "the operator itself: {refused:?}");
    let attest_all = |epoch: u64, nodes: std::ops::Range<usize>| {
        let (ops, keys, ids) = (ops.clone(), keys.clone(), ids.clone());
        async move {
            for i in nodes {
                ops.attest(&AttestationRecord::sign(&keys[i].1, ids[i].clone(), epoch, "sync-service", vec![]))
                    .await
                    .unwrap();
            }
            ops.complete_epoch_if_quorum(epoch).await.unwrap();
            assert_eq!(ops.current().await.unwrap(), Some(EpochPhase::Done(epoch)));
        }
    };
    attest_all(1, 1..4).await;
    // Epoch 2 goes on without node 3: refused while it changes, allowed once it is done.
    let c2 = rebalance(&c1, c1.members.iter().filter(|m| m.node_id != ids[3]).cloned().collect()).unwrap();
    ops.propose_epoch(&c2).await.unwrap();
    let refused = revoke(node3.clone()).await;
    assert!(matches!(refused, Err(ControlPlaneError::RevokeRefused { .. })), "mid-change: {refused:?}");
    attest_all(2, 0..3).await;
    let node3_connection = connect(load(pki.path(), "node-3"), "test").await.unwrap();
    node3_connection.put_node(&record(3)).await.unwrap();
    let report = revoke(node3.clone()).await.unwrap();
    assert_eq!(report.users_deleted, vec!["node-3.node.ferry".to_string()]);
    assert!(is_denied(node3_connection.put_node(&record(3)).await), "an open connection is refused at once");
    assert!(is_denied(node3_connection.current().await), "and reads nothing either");
    assert!(is_denied(connect(load(pki.path(), "node-3"), "test").await), "nor does a new one");
    node0.put_node(&record(0)).await.unwrap();
    assert_eq!(node0.current().await.unwrap(), Some(EpochPhase::Done(2)), "other nodes keep their access");
    assert!(revoke(node3).await.unwrap().users_deleted.is_empty(), "revoking again changes nothing");
    // A leaked client certificate goes the same way, whatever the phase.
    assert_eq!(revoke(PeerIdentity::Client("app".into())).await.unwrap().users_deleted.len(), 1);
    assert!(is_denied(app.current().await), "a revoked client reads nothing");
}
