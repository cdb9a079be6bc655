//! The running-sync counter (rule 2): every shard-sync task owns a [`SyncTaskGuard`] that
//! increments the count when created and decrements it when dropped, so a normal end, an error,
//! an abort and a panic all count down.
//!
//! The count lives in the node's published [`NodeView`], the same value that carries the shard
//! statuses: a subscriber always sees a count and a view that belong together (never the new
//! count with the old view, or the reverse).

use std::sync::Arc;

use tokio::sync::watch;

use super::NodeView;

/// Counts running shard-sync tasks in the published view.
#[derive(Debug, Clone)]
pub struct SyncCounter {
    view: Arc<watch::Sender<NodeView>>,
}

impl Default for SyncCounter {
    /// A counter with a view channel of its own (tests).
    fn default() -> Self {
        SyncCounter { view: Arc::new(watch::channel(NodeView::default()).0) }
    }
}

impl SyncCounter {
    /// A counter publishing in `view`.
    pub fn new(view: Arc<watch::Sender<NodeView>>) -> Self {
        SyncCounter { view }
    }

    /// A guard counting one task until it is dropped. Create it before spawning the task and
    /// move it in, so the count never misses a task that has not started yet.
    pub fn guard(&self) -> SyncTaskGuard {
        self.view.send_modify(|v| v.running_syncs += 1);
        SyncTaskGuard { view: self.view.clone() }
    }

    /// The count now.
    pub fn current(&self) -> u32 {
        self.view.borrow().running_syncs
    }

    /// A receiver of the view, which changes with every change of the count.
    pub fn subscribe(&self) -> watch::Receiver<NodeView> {
        self.view.subscribe()
    }
}

/// Counts one running shard-sync task; dropping it (however the task ends) decrements the count.
#[derive(Debug)]
pub struct SyncTaskGuard {
    view: Arc<watch::Sender<NodeView>>,
}

impl Drop for SyncTaskGuard {
    fn drop(&mut self) {
        self.view.send_modify(|v| v.running_syncs = v.running_syncs.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    async fn wait_for(rx: &mut watch::Receiver<NodeView>, want: u32) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.running_syncs == want))
            .await
            .unwrap_or_else(|_| panic!("counter did not reach {want} within 5 s"))
            .unwrap();
    }

    #[tokio::test]
    async fn counter_returns_to_zero_on_end_error_abort_and_panic() {
        let counter = SyncCounter::default();
        let mut rx = counter.subscribe();
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();

        let normal = counter.guard();
        let ends = tokio::spawn(async move {
            let _g = normal;
        });
        let failing = counter.guard();
        let errs = tokio::spawn(async move {
            let _g = failing;
            Err::<(), &str>("stream broke")
        });
        let aborted = counter.guard();
        let held = tokio::spawn(async move {
            let _g = aborted;
            let _ = hold_rx.await; // never resolves before the abort
        });
        let panicking = counter.guard();
        let panics = tokio::spawn(async move {
            let _g = panicking;
            panic!("sync task panicked");
        });
        assert!(counter.current() >= 1, "guards count before their tasks run");

        ends.await.unwrap();
        assert!(errs.await.unwrap().is_err());
        assert!(panics.await.unwrap_err().is_panic());
        wait_for(&mut rx, 1).await; // only the held task is left
        held.abort();
        assert!(held.await.unwrap_err().is_cancelled());
        wait_for(&mut rx, 0).await;
        drop(hold_tx);
    }
}
