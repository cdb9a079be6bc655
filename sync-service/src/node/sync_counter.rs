//! The running-sync counter (rule 2): every shard-sync task owns a [`SyncTaskGuard`] that
//! increments a watch counter when created and decrements it when dropped, so a normal end,
//! an error, an abort and a panic all count down.

use std::sync::Arc;

use tokio::sync::watch;

/// Counts running shard-sync tasks and publishes the count.
#[derive(Debug, Clone)]
pub struct SyncCounter {
    tx: Arc<watch::Sender<u32>>,
}

impl Default for SyncCounter {
    fn default() -> Self {
        SyncCounter { tx: Arc::new(watch::channel(0).0) }
    }
}

impl SyncCounter {
    /// A guard counting one task until it is dropped. Create it before spawning the task and
    /// move it in, so the count never misses a task that has not started yet.
    pub fn guard(&self) -> SyncTaskGuard {
        self.tx.send_modify(|n| *n += 1);
        SyncTaskGuard { tx: self.tx.clone() }
    }

    /// The count now.
    pub fn current(&self) -> u32 {
        *self.tx.borrow()
    }

    /// A receiver that sees every change of the count.
    pub fn subscribe(&self) -> watch::Receiver<u32> {
        self.tx.subscribe()
    }
}

/// Counts one running shard-sync task; dropping it (however the task ends) decrements the count.
#[derive(Debug)]
pub struct SyncTaskGuard {
    tx: Arc<watch::Sender<u32>>,
}

impl Drop for SyncTaskGuard {
    fn drop(&mut self) {
        self.tx.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    async fn wait_for(rx: &mut watch::Receiver<u32>, want: u32) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|n| *n == want))
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
