//! Tracing and metrics against running services: one trace follows a blob recovery from
//! recovery-service through its own sync-service to the peers it fetches from, and the
//! Prometheus endpoints count what shard sync and recovery did.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{collections::HashMap, net::SocketAddr};

use ferry_e2e::{Cluster, trace_to_memory};
use ferry_shared::{
    metrics::{self, sample},
    types::NodeStatus,
};
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;
use tracing::Instrument as _;

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| match &kv.value {
        Value::String(s) => s.as_str().to_string(),
        other => other.to_string(),
    })
}

fn trace_id(span: &tracing::Span) -> opentelemetry::trace::TraceId {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    span.context().span().span_context().trace_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_spans_recovery_service_its_sync_service_and_a_peer() {
    let (exporter, provider, _telemetry) = trace_to_memory();

    let mut cluster = Cluster::new(4, 8).await.unwrap();
    cluster.start_genesis().await.unwrap();
    for i in 0..4 {
        cluster.start_recovery(i).await.unwrap();
    }
    cluster.store_random_blobs(7, 2000, 21).await.unwrap();
    // A client's trace: one store, as ferryctl makes it, reaches every node that stores a sliver.
    let client_span = tracing::info_span!("ferryctl", command = "store");
    let client_trace = trace_id(&client_span);
    cluster.client().store(b"traced from the client").instrument(client_span).await.unwrap();
    provider.force_flush().unwrap();
    let stored_on: std::collections::BTreeSet<String> = exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .filter(|s| s.span_context.trace_id() == client_trace && s.name == "/ferry.v1.SyncService/StoreBlobs")
        .filter_map(|s| attr(s, "ferry.node"))
        .collect();
    assert_eq!(stored_on.len(), 4, "the client's trace continues on every node it stored on: {stored_on:?}");
    let certified_on: std::collections::BTreeSet<String> = exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .filter(|s| s.span_context.trace_id() == client_trace && s.name == "/ferry.v1.SyncService/CertifyBlobs")
        .filter_map(|s| attr(s, "ferry.node"))
        .collect();
    assert_eq!(certified_on.len(), 4, "and on every node it delivered the certificate to: {certified_on:?}");
    // Node 3 loses its data and recovers every blob from its peers.
    cluster.stop_recovery(3).await.unwrap();
    cluster.stop_sync(3).await.unwrap();
    cluster.wipe(3).unwrap();
    cluster.start_sync(3).await.unwrap();
    cluster
        .wait_view(3, "RecoveryInProgress after the wipe", |v| matches!(v.status(), NodeStatus::RecoveryInProgress(_)))
        .await
        .unwrap();
    exporter.reset();
    cluster.start_recovery(3).await.unwrap();
    cluster.wait_all_active(3, 0).await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let mut traces: HashMap<_, Vec<&SpanData>> = HashMap::new();
    for span in &spans {
        traces.entry(span.span_context.trace_id()).or_default().push(span);
    }
    let server_of = |s: &SpanData| (attr(s, "ferry.service"), attr(s, "ferry.node"), s.name.to_string());
    let complete = traces.values().find(|trace| {
        let recovery = trace.iter().any(|s| s.name == "recover_batch");
        let local = trace.iter().any(|s| {
            server_of(s)
                == (Some("sync-service".into()), Some("node-3".into()), "/ferry.v1.SyncService/StoreBlobs".into())
        });
        let peer = trace.iter().any(|s| {
            let (service, node, name) = server_of(s);
            service.as_deref() == Some("sync-service")
                && node.as_deref() != Some("node-3")
                && name == "/ferry.v1.SyncService/GetSlivers"
        });
        recovery && local && peer
    });
    let Some(trace) = complete else {
        let names: Vec<String> = spans
            .iter()
            .map(|s| format!("{} {:?}/{:?}", s.name, attr(s, "ferry.service"), attr(s, "ferry.node")))
            .collect();
        panic!(
            "no trace holds recover_batch, node-3's StoreBlobs and a peer's GetSlivers; {} spans: {names:?}",
            spans.len()
        );
    };
    // The server spans continue the caller's trace: none is a root of its own. (Sharing the
    // trace id at all is only possible through the propagated context.)
    for s in trace.iter().filter(|s| attr(s, "ferry.service").as_deref() == Some("sync-service")) {
        assert_ne!(s.parent_span_id, opentelemetry::trace::SpanId::INVALID, "server span {} is a root", s.name);
    }
    let nodes: std::collections::BTreeSet<String> = trace.iter().filter_map(|s| attr(s, "ferry.node")).collect();
    println!("one recovery trace: {} spans across nodes {nodes:?}", trace.len());
    assert!(nodes.len() >= 2, "the trace crosses nodes: {nodes:?}");

    // The same recovery, counted: every blob recovered, bytes fetched, slivers stored locally.
    let recovery3 = scrape(cluster.nodes[3].recovery.as_ref().unwrap().metrics_addr).await;
    assert_eq!(sample(&recovery3, "ferry_recovery_blobs_recovered_total", &[]), 8.0, "{recovery3}");
    assert!(sample(&recovery3, "ferry_recovery_bytes_fetched_total", &[]) > 0.0);
    assert_eq!(sample(&recovery3, "ferry_recovery_attestations_total", &[]), 0.0, "no attestation at epoch 0");
    let sync3 = scrape(cluster.nodes[3].sync.as_ref().unwrap().metrics_addr).await;
    assert!(
        sample(
            &sync3,
            "ferry_rpc_duration_seconds_count",
            &["method=\"/ferry.v1.SyncService/StoreBlobs\"", "code=\"OK\""]
        ) >= 1.0,
        "{sync3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epoch_proposal_trace_reaches_the_shard_syncs_and_their_sources() {
    let (exporter, _provider, _telemetry) = trace_to_memory();
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    cluster.start_genesis().await.unwrap();
    cluster.store_random_blobs(10, 2000, 5).await.unwrap();
    let committee = cluster.committee().await.unwrap();
    let members = committee
        .members
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.node_id == cluster.nodes[0].id {
                m.weight = 3;
            }
            m
        })
        .collect();
    // What `ferryctl epoch next --yes` does, inside its command span.
    let span = tracing::info_span!("ferryctl", command = "epoch");
    let trace = trace_id(&span);
    cluster.next_epoch(members).instrument(span).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    // A span is exported when it and its children have closed; node 0's epoch change closes
    // after its shard-sync tasks have returned, a moment after the shards turn Active.
    let in_trace = || -> Vec<SpanData> {
        exporter.get_finished_spans().unwrap().into_iter().filter(|s| s.span_context.trace_id() == trace).collect()
    };
    let epoch_nodes = |spans: &[SpanData]| -> std::collections::BTreeSet<String> {
        spans.iter().filter(|s| s.name == "epoch_change").filter_map(|s| attr(s, "ferry.node")).collect()
    };
    let exported = exporter.clone();
    ferry_e2e::wait_until("every node's epoch_change span is exported", || {
        let spans: Vec<SpanData> =
            exported.get_finished_spans().unwrap().into_iter().filter(|s| s.span_context.trace_id() == trace).collect();
        async move { Ok(epoch_nodes(&spans).len() == 4) }
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}: every node's epoch change joins the proposer's trace, got {:?}", epoch_nodes(&in_trace()))
    });
    let spans = in_trace();
    assert!(
        spans.iter().any(|s| s.name == "shard_sync" && attr(s, "node").as_deref() == Some("node-0")),
        "node 0's shard syncs are in the trace"
    );
    let sources: Vec<String> = spans
        .iter()
        .filter(|s| s.name == "/ferry.v1.SyncService/StreamShard")
        .filter_map(|s| attr(s, "ferry.node"))
        .collect();
    assert!(
        !sources.is_empty() && sources.iter().all(|n| n != "node-0"),
        "the previous owners' StreamShard spans are in the trace: {sources:?}"
    );
}

async fn scrape(addr: SocketAddr) -> String {
    metrics::scrape(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_shard_sync_streaming_recovery_and_rpcs() {
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    cluster.start_genesis().await.unwrap();
    for i in 0..4 {
        cluster.start_recovery(i).await.unwrap();
    }
    let blobs = cluster.store_random_blobs(12, 3000, 8).await.unwrap();
    // Node 0 gains shards at epoch 1 and fills them by shard sync.
    let committee = cluster.committee().await.unwrap();
    let members = committee
        .members
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.node_id == cluster.nodes[0].id {
                m.weight = 3;
            }
            m
        })
        .collect();
    let next = cluster.next_epoch(members).await.unwrap();
    let gained = next.shards_of(&cluster.nodes[0].id).len() - committee.shards_of(&cluster.nodes[0].id).len();
    assert!(gained > 0);
    cluster.wait_all_active(0, 1).await.unwrap();
    cluster.wait_done(1).await.unwrap();

    // The epoch can be `Done` (a quorum of others attested) a moment before node 0 records
    // its own attestation and its sync tasks release their guards: wait for both, bounded.
    let metrics_addr = cluster.nodes[0].sync.as_ref().unwrap().metrics_addr;
    ferry_e2e::wait_until("node 0 attested and no sync running", || async move {
        let text = scrape(metrics_addr).await;
        Ok(sample(&text, "ferry_attestations_total", &[]) >= 1.0 && sample(&text, "ferry_sync_running", &[]) == 0.0)
    })
    .await
    .unwrap();
    let node0 = scrape(metrics_addr).await;
    assert!(sample(&node0, "ferry_sync_completed_total", &[]) >= gained as f64, "{node0}");
    assert_eq!(
        sample(&node0, "ferry_sync_slivers_total", &[]),
        (gained * blobs.len()) as f64,
        "every gained sliver came by shard sync"
    );
    assert!(sample(&node0, "ferry_sync_bytes_total", &[]) > 0.0);
    assert_eq!(sample(&node0, "ferry_attestations_total", &[]), 1.0, "exactly one attestation for epoch 1");
    let mut streamed = 0.0;
    let mut stream_rpcs = 0.0;
    for i in 1..4 {
        let text = scrape(cluster.nodes[i].sync.as_ref().unwrap().metrics_addr).await;
        streamed += sample(&text, "ferry_stream_items_total", &[]);
        stream_rpcs += sample(
            &text,
            "ferry_rpc_duration_seconds_count",
            &["method=\"/ferry.v1.SyncService/StreamShard\"", "code=\"OK\""],
        );
    }
    assert_eq!(streamed, (gained * blobs.len()) as f64, "the previous owners served exactly the gained slivers");
    assert!(stream_rpcs >= gained as f64, "StreamShard calls are timed until their streams end: {stream_rpcs}");
    // Shard sync filled the gained shards, so blob recovery had nothing to do.
    let recovery0 = scrape(cluster.nodes[0].recovery.as_ref().unwrap().metrics_addr).await;
    assert!(recovery0.contains("ferry_recovery_blobs_recovered_total 0"), "{recovery0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_caller_with_a_certificate_continues_a_trace() {
    let (exporter, provider, _telemetry) = trace_to_memory();
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let status_on = |trace: opentelemetry::trace::TraceId| {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| {
                s.name == "/ferry.v1.SyncService/GetStatus" && attr(s, "ferry.node").as_deref() == Some("node-0")
            })
            .filter(|s| s.span_context.trace_id() == trace)
            .count()
    };
    // An anonymous caller sends a sampled trace context of its own making.
    let forged = opentelemetry::trace::TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
    let mut request = tonic::Request::new(ferry_proto::v1::GetStatusRequest::default());
    request
        .metadata_mut()
        .insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
    let mut anonymous =
        ferry_proto::v1::sync_service_client::SyncServiceClient::new(cluster.anonymous_channel(0).await.unwrap());
    let refused = anonymous.get_status(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // A caller with a certificate: its trace goes on.
    let span = tracing::info_span!("operator", command = "status");
    let verified = trace_id(&span);
    let mut client = cluster.sync_client_as(0, ferry_e2e::CLIENT).await.unwrap();
    ferry_e2e::status(&mut client).instrument(span).await.unwrap();
    provider.force_flush().unwrap();
    assert_eq!(status_on(verified), 1, "the operator's trace continues on node-0");
    assert_eq!(status_on(forged), 0, "an anonymous caller's trace context is not continued");
    let anonymous_spans = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "/ferry.v1.SyncService/GetStatus" && s.span_context.trace_id() != verified)
        .count();
    assert!(anonymous_spans >= 1, "the anonymous call has a span of its own, in a new trace");
}
