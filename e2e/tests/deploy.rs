//! The Kubernetes manifests under `deploy/`: both kustomize overlays render and pass strict
//! schema validation and Ferry's own rules (`deploy/validate.py`), and those rules catch the
//! broken manifests that `deploy/validate.py --self-test` makes on purpose.
//!
//! Needs `python3` with `kubernetes-validate` and `kubectl` (`scripts/setup` installs the first
//! and warns about the second); nothing here talks to a cluster.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Read when the test runs, not when it is built: a test binary reused from a build in another
/// checkout would look there.
fn repo_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests");
    Path::new(&dir).parent().expect("e2e/ lies inside the repository").to_path_buf()
}

/// Runs `python3 deploy/validate.py ARGS` from the repository root and fails the test with the
/// script's whole output unless it exits 0.
fn validate(args: &[&str]) {
    let root = repo_root();
    let script = root.join("deploy").join("validate.py");
    assert!(script.exists(), "missing {}", script.display());
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .current_dir(&root)
        .output()
        .expect("python3 must be installed to run deploy/validate.py (scripts/setup)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python3 deploy/validate.py {} failed ({}).\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        args.join(" "),
        out.status,
    );
}

#[test]
fn manifests_render_and_validate() {
    validate(&[]);
}

#[test]
fn validation_rules_catch_broken_manifests() {
    validate(&["--self-test"]);
}
