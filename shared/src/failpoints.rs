//! Fail points at Ferry's crash windows (the `fail` crate), compiled to nothing unless the
//! `failpoints` feature is on. Tests turn one on in-process with [`fail::cfg`], or for a
//! service process through the `FAILPOINTS` variable (`name=action;...`), which the service
//! binaries read at start ([`setup_from_env`]). An action `return(crash)` at a point that
//! supports it ends the process on the spot, as a SIGKILL would.
//!
//! The points: `cp-before-done-flip` (an attester that completed a quorum, before the phase
//! flip), `sync-after-batch` (a shard-sync task after a written batch), `sync-mark-failed`
//! (writing a failed sync's status), `sync-state-stream` (the `WatchSyncState` stream),
//! `store-sliver-write` (a `StoreSliver` write, in the store call), `recover-blob` (a blob
//! recovery task), `index-digests` (a node answering `GetRangeDigests`: delays it) and
//! `epoch-before-apply` (a node that has read a new committee and not applied it: delays it).

pub use fail;
pub use fail::fail_point;

/// Reads `FAILPOINTS` (a no-op without the feature). Keep the guard for the process's life.
pub fn setup_from_env() -> Option<fail::FailScenario<'static>> {
    if cfg!(feature = "failpoints") && std::env::var_os("FAILPOINTS").is_some() {
        Some(fail::FailScenario::setup())
    } else {
        None
    }
}

/// What a fail point's `return(...)` argument asks for: `crash` ends the process at once
/// (no destructors, no flushing: a crash), anything else lets the caller return its error.
pub fn crash_if_asked(argument: Option<String>) {
    if argument.as_deref() == Some("crash") {
        tracing::error!("fail point: crashing the process here");
        std::process::abort();
    }
}

/// Whether fail point `name` is set to act now (always false without the feature).
pub fn is_on(name: &str) -> bool {
    let _ = name; // unused without the feature
    let check = || -> bool {
        fail_point!(name, |_| true);
        false
    };
    check()
}

/// The delay fail point `name` asks of node `node` with `return(<ms>)` (every node) or
/// `return(<node>:<ms>)` (that node only), for async code, which the `sleep` action would
/// block. `None` when off (always without the feature).
pub fn delay_for(name: &str, node: &str) -> Option<std::time::Duration> {
    let _ = (name, node); // unused without the feature
    let check = || -> Option<String> {
        fail_point!(name, |arg| Some(arg.unwrap_or_default()));
        None
    };
    let argument = check()?;
    let (target, ms) = match argument.split_once(':') {
        Some((target, ms)) => (Some(target), ms),
        None => (None, argument.as_str()),
    };
    if target.is_some_and(|t| t != node) {
        return None;
    }
    ms.parse().ok().map(std::time::Duration::from_millis)
}

/// Resolves once fail point `name` is set to act (never without the feature): for long-lived
/// streams, which have no call at which to evaluate a point.
pub async fn tripped(name: &str) {
    if !cfg!(feature = "failpoints") {
        return std::future::pending().await;
    }
    while !is_on(name) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
