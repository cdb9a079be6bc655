//! Writes real values for each fuzz target to start from into `corpus/<target>/seed-*`
//! (checked in): honest and altered shard items, metadata, committees and phases as nodes
//! write them, and certificates of each role from a cluster CA.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;

use ferry_fuzz::fixture;
use ferry_proto::v1 as pb;
use ferry_shared::{tls::ClusterCa, types::ShardIndex};
use prost::Message;
use rustls_pki_types::{CertificateDer, pem::PemObject};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn with_field(head: &[u8], field: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut out = head.to_vec();
    out.push(u8::try_from(field.len()).expect("a short field"));
    out.extend_from_slice(field);
    out.extend_from_slice(rest);
    out
}

fn main() {
    let f = fixture();
    let metadata = f.blob.metadata.to_proto().encode_to_vec();
    let sliver = &f.blob.slivers[1];
    write("blob_metadata", "honest", &with_field(&1u32.to_le_bytes(), &sliver[..sliver.len().min(255)], &metadata));

    for shard in [0u8, 5] {
        let item = f.honest_item(ShardIndex(u32::from(shard))).encode_to_vec();
        write("shard_item", &format!("honest-{shard}"), &[[shard, 0].as_slice(), &item].concat());
        write("shard_item", &format!("known-{shard}"), &[[shard, 1].as_slice(), &item].concat());
    }
    let mut bare = f.honest_item(ShardIndex(2));
    bare.metadata = None;
    write("shard_item", "no-metadata", &[[2u8, 1].as_slice(), &bare.encode_to_vec()].concat());

    let committee = serde_json::to_vec(f.committee.as_ref()).unwrap();
    write("control_plane_event", "committee", &with_field(&[5], b"0", &committee));
    write("control_plane_event", "done", &with_field(&[1], b"", br#"{"phase":{"phase":"done","epoch":3}}"#));
    write("control_plane_event", "attested", &with_field(&[2], b"00000000000000000001/node-1", b"{}"));

    // sync_handlers: `[method][caller]` then the request; methods as numbered in the target.
    let id = f.blob.blob_id.0.to_vec();
    let shard0 = f.committee.shards_of(&f.committee.members[0].node_id)[0];
    let upload = pb::BlobUpload {
        blob_id: id.clone(),
        metadata: Some(f.blob.metadata.to_proto()),
        slivers: vec![pb::SliverUpload { shard: shard0.0, data: f.blob.slivers[shard0.as_usize()].clone() }],
    };
    let certified = pb::CertifiedBlob { blob_id: id.clone(), certificate: Some(f.certificate.to_proto()) };
    let requests: Vec<(&str, u8, u8, Vec<u8>)> = vec![
        (
            "store-metadata",
            0,
            4,
            pb::StoreMetadataRequest { blob_id: id.clone(), metadata: Some(f.blob.metadata.to_proto()) }
                .encode_to_vec(),
        ),
        (
            "store-sliver",
            1,
            4,
            pb::StoreSliverRequest {
                blob_id: id.clone(),
                shard: shard0.0,
                data: f.blob.slivers[shard0.as_usize()].clone(),
            }
            .encode_to_vec(),
        ),
        ("store-blobs", 2, 4, pb::StoreBlobsRequest { blobs: vec![upload], skip_confirmations: false }.encode_to_vec()),
        ("certify", 3, 4, pb::CertifyBlobsRequest { blobs: vec![certified] }.encode_to_vec()),
        (
            "get-certificates",
            4,
            2,
            pb::GetCertificatesRequest { blob_ids: vec![id.clone()], include_metadata: true }.encode_to_vec(),
        ),
        (
            "report-inconsistency",
            8,
            2,
            pb::ReportInconsistencyRequest {
                blob_id: id.clone(),
                proof: Some(pb::InconsistencyProof {
                    shards: vec![1, 2, 3, 4],
                    mismatched: 0,
                    reported_by: "node-1".into(),
                }),
            }
            .encode_to_vec(),
        ),
        ("get-slivers", 11, 2, pb::GetSliversRequest { shard: shard0.0, blob_ids: vec![id.clone()] }.encode_to_vec()),
        (
            "stream-shard",
            16,
            2,
            pb::StreamShardRequest { shard: shard0.0, include_metadata: true, ..Default::default() }.encode_to_vec(),
        ),
    ];
    for (name, method, caller, request) in requests {
        write("sync_handlers", name, &[[method, caller].as_slice(), &request].concat());
    }

    let ca = ClusterCa::generate().unwrap();
    let node = f.committee.members[0].node_id.clone();
    for (name, cert) in [
        ("node", ca.issue_node(&node, &[]).unwrap()),
        ("client", ca.issue_client("app").unwrap()),
        ("operator", ca.issue_operator("ops").unwrap()),
    ] {
        let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
        write("peer_identity", name, &with_field(&[], b"/ferry.v1.SyncService/GetStatus", &der));
    }
}
