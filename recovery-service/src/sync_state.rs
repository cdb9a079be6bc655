//! Follows this node's sync-service `WatchSyncState` stream as a watch channel, reconnecting
//! with backoff (a `tonic-watch`-style adapter). While the stream is down the value is `None`:
//! the running-sync count is *unknown*, never zero (rule 2), so nothing that waits for zero
//! proceeds.

use std::time::Duration;

use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::grpc::TracedChannel;
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The last sync state seen, or `None` while the stream is down.
pub type SyncStateRx = watch::Receiver<Option<pb::SyncState>>;

/// Spawns the follower; the returned receiver starts as `None` (unknown).
pub fn follow(channel: TracedChannel) -> (SyncStateRx, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut client = SyncServiceClient::new(channel.clone());
            match client.watch_sync_state(pb::WatchSyncStateRequest {}).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    info!("following sync-service state");
                    loop {
                        match stream.message().await {
                            Ok(Some(state)) => {
                                backoff = Duration::from_millis(100);
                                debug!(running = state.running_syncs, epoch = state.epoch, "sync state");
                                tx.send_replace(Some(state));
                            }
                            Ok(None) => {
                                warn!("sync-state stream ended; the running-sync count is unknown until it is back");
                                break;
                            }
                            Err(status) => {
                                warn!(%status, "sync-state stream broke; the running-sync count is unknown until it is back");
                                break;
                            }
                        }
                    }
                }
                Err(status) => debug!(%status, "cannot reach sync-service yet"),
            }
            tx.send_replace(None);
            if tx.is_closed() {
                return;
            }
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    (rx, task)
}

/// Waits until the sync state is known and has no running shard syncs; returns that state.
/// `on_wait` is called once if it has to wait at all.
pub async fn wait_for_no_syncs(rx: &mut SyncStateRx, mut on_wait: impl FnMut()) -> Option<pb::SyncState> {
    let ready = |s: &Option<pb::SyncState>| s.as_ref().is_some_and(|s| s.running_syncs == 0);
    if !ready(&rx.borrow_and_update()) {
        on_wait();
    }
    rx.wait_for(ready).await.ok().and_then(|s| s.clone())
}
