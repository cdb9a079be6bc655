//! `ferryctl` as a user runs it: the real binary against a real local cluster. It checks the
//! happy path (up, store, read, status, epoch plan, attestations, node kill and start, down)
//! and that bad input gets one clear line on stderr and a non-zero exit.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(path.exists(), "build the binaries first (`make test` does): {}", path.display());
    path
}

/// Runs ferryctl; returns (success, stdout, stderr).
fn ferryctl(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("ferryctl")).arg("--dir").arg(dir).args(args).env_remove("FERRY_ETCD").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn assert_one_line_error(result: (bool, String, String), expect: &str) {
    let (ok, _, err) = result;
    assert!(!ok, "must fail: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(err.contains(expect), "{err:?} should mention {expect:?}");
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("no-cluster");
    assert_one_line_error(ferryctl(&nowhere, &["read", "not-a-blob-id", "-o", "x"]), "FERRY-TYPE-001");
    assert_one_line_error(ferryctl(&nowhere, &["store", "/does/not/exist"]), "cannot read /does/not/exist");
    assert_one_line_error(ferryctl(&nowhere, &["status"]), "no local cluster");
    assert_one_line_error(ferryctl(&nowhere, &["node", "kill", "node-1"]), "no local cluster");
    for cmd in [
        &["store", "--help"][..],
        &["read", "--help"],
        &["status", "--help"],
        &["epoch", "next", "--help"],
        &["attestations", "--help"],
        &["node", "--help"],
        &["cluster", "up", "--help"],
        &["demo", "--help"],
        &["keygen", "--help"],
    ] {
        let (ok, out, _) = ferryctl(&nowhere, cmd);
        assert!(ok && out.contains("Example"), "`{}` explains itself with an example: {out}", cmd.join(" "));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cluster_from_up_to_down() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let bin_dir = bin("sync-service").parent().unwrap().to_path_buf();
    let (ok, out, err) =
        ferryctl(&dir, &["cluster", "up", "--nodes", "4", "--shards", "4", "--bin-dir", bin_dir.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let result = std::panic::catch_unwind(|| {
        let file = tmp.path().join("blob");
        std::fs::write(&file, b"ferry carries shards").unwrap();
        let (ok, id, err) = ferryctl(&dir, &["store", file.to_str().unwrap()]);
        assert!(ok, "{err}");
        let id = id.trim().to_string();
        let back = tmp.path().join("back");
        let (ok, _, err) = ferryctl(&dir, &["read", &id, "-o", back.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert_eq!(std::fs::read(&back).unwrap(), b"ferry carries shards");
        let (ok, json, err) = ferryctl(&dir, &["status", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["nodes"].as_array().unwrap().len(), 4);
        assert_eq!(v["blobs"], 1);
        // A plan that would leave every shard without an owner is refused, and so is a bad weight.
        assert_one_line_error(
            ferryctl(
                &dir,
                &[
                    "epoch",
                    "next",
                    "--remove-node",
                    "node-0",
                    "--remove-node",
                    "node-1",
                    "--remove-node",
                    "node-2",
                    "--remove-node",
                    "node-3",
                ],
            ),
            "without an owner",
        );
        assert_one_line_error(ferryctl(&dir, &["epoch", "next", "--weight", "node-0=heavy"]), "not a whole number");
        assert_one_line_error(ferryctl(&dir, &["epoch", "next", "--remove-node", "node-9"]), "not a member");
        // A dry run prints the plan and changes nothing.
        let (ok, plan, _) = ferryctl(&dir, &["epoch", "next", "--weight", "node-0=3"]);
        assert!(
            ok && plan.contains("Plan for epoch 1") && plan.contains("-> node-0") && plan.contains("dry run"),
            "{plan}"
        );
        let (_, attestations, _) = ferryctl(&dir, &["attestations", "1"]);
        assert!(attestations.contains("no attestations"), "{attestations}");
        // SIGKILL a node and start it again.
        let (ok, _, err) = ferryctl(&dir, &["node", "kill", "node-2"]);
        assert!(ok, "{err}");
        let (ok, _, err) = ferryctl(&dir, &["node", "start", "node-2"]);
        assert!(ok, "{err}");
    });
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let (ok, _, err) = ferryctl(&dir, &["cluster", "down"]);
    assert!(ok, "{err}");
    // Nothing is left running after `down`.
    let mut pids: Vec<u64> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| [n["sync_pid"].as_u64(), n["recovery_pid"].as_u64()])
        .flatten()
        .collect();
    pids.extend(state["etcd_pid"].as_u64());
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z"), "process {pid} still runs after down: {stat}");
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn certs_writes_a_ca_and_certificates_that_name_their_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("secrets");
    let out_s = out.display().to_string();
    let (ok, stdout, stderr) = ferryctl(
        tmp.path(),
        &[
            "certs",
            "--out",
            &out_s,
            "--node",
            "ferry-0",
            "--node",
            "ferry-1",
            "--san",
            "*.ferry-peers.ferry.svc",
            "--client",
            "ops",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ferry-0.node.ferry") && stdout.contains("ops.client.ferry"), "{stdout}");
    for f in ["ca.pem", "ca.key", "ferry-0.pem", "ferry-0.key", "ferry-1.pem", "ferry-1.key", "ops.pem", "ops.key"] {
        assert!(out.join(f).exists(), "{f} written");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("ferry-0.key")).unwrap().permissions().mode() & 0o777,
        0o600,
        "private keys are not world-readable"
    );
    let node = ferry_shared::tls::TlsConfig::from_dir(&out, "ferry-1")
        .load(Some(&ferry_shared::NodeId::new("ferry-1").unwrap()))
        .unwrap();
    assert!(node.is_some(), "a node certificate loads as that node");
    // A later run reuses the CA to add a node, and refuses to overwrite.
    let ca_before = std::fs::read(out.join("ca.pem")).unwrap();
    assert!(ferryctl(tmp.path(), &["certs", "--out", &out_s, "--node", "ferry-2"]).0);
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca_before, "the CA is reused");
    assert_one_line_error(
        ferryctl(tmp.path(), &["certs", "--out", &out_s, "--node", "ferry-2"]),
        "refusing to overwrite",
    );
    assert_one_line_error(ferryctl(tmp.path(), &["certs", "--out", &out_s, "--node", "Bad_Id"]), "FERRY-TYPE");
    assert_one_line_error(ferryctl(tmp.path(), &["certs", "--out", &out_s]), "nothing to issue");
}
