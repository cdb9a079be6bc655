//! Knowing when a shared resource is really gone: [`Closing`] wraps a value (a RocksDB
//! handle) shared through `Arc`s and reports when the last one has dropped it, so a service
//! can wait for its store's lock to be released before it returns from shutdown.

use std::ops::Deref;

use tokio::sync::watch;

/// A value that announces its drop.
pub struct Closing<T> {
    // Field order matters: the value is dropped before the signal fires.
    value: T,
    signal: Signal,
}

struct Signal(watch::Sender<bool>);

impl Drop for Signal {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl<T> Closing<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Closing { value, signal: Signal(watch::channel(false).0) }
    }

    /// Resolves once the value has been dropped.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.signal.0.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }
}

impl<T> Deref for Closing<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn closed_resolves_only_after_the_last_clone_drops() {
        let a = Arc::new(Closing::new(vec![1, 2, 3]));
        let b = a.clone();
        let closed = a.closed();
        drop(a);
        let mut closed = Box::pin(closed);
        assert!(futures::poll!(closed.as_mut()).is_pending(), "one clone is still alive");
        assert_eq!(b.len(), 3);
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), closed).await.unwrap();
    }
}
