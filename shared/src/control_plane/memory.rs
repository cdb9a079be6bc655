//! An in-memory [`Kv`] with etcd's semantics (global revisions, guarded transactions,
//! watches that replay history after a revision), for unit tests only: integration tests and
//! production use [`super::etcd::EtcdKv`].

use std::{collections::BTreeMap, sync::Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{Guard, Kv, KvEvent, KvEventStream, Result, Versioned};

#[derive(Default)]
struct State {
    revision: u64,
    data: BTreeMap<String, Versioned>,
    history: Vec<KvEvent>,
}

/// In-memory key-value store for unit tests.
pub struct MemoryKv {
    state: Mutex<State>,
    events: broadcast::Sender<KvEvent>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        MemoryKv { state: Mutex::new(State::default()), events: broadcast::channel(4096).0 }
    }
}

impl MemoryKv {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a test panicked while holding it; the data is plain.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Kv for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.lock().data.get(key).cloned())
    }

    async fn range(&self, prefix: &str, start: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>> {
        let state = self.lock();
        let from = start.unwrap_or(prefix).to_string();
        Ok(state
            .data
            .range(from..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn txn(&self, guards: Vec<Guard>, puts: Vec<(String, Vec<u8>)>) -> Result<bool> {
        let mut state = self.lock();
        let holds = guards.iter().all(|g| match g {
            Guard::Absent(k) => !state.data.contains_key(k),
            Guard::ModRevision(k, r) => state.data.get(k).map(|v| v.mod_revision) == Some(*r),
        });
        if !holds {
            return Ok(false);
        }
        if puts.is_empty() {
            return Ok(true);
        }
        state.revision += 1;
        let revision = state.revision;
        for (key, value) in puts {
            let version = state.data.get(&key).map(|v| v.version).unwrap_or(0) + 1;
            state.data.insert(key.clone(), Versioned { value: value.clone(), mod_revision: revision, version });

            let event = KvEvent { revision, key, value };
            state.history.push(event.clone());
            // No receivers is fine: nobody watches yet.
            let _ = self.events.send(event);
        }
        Ok(true)
    }

    async fn revision(&self) -> Result<u64> {
        Ok(self.lock().revision)
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<KvEventStream> {
        // Subscribe before copying history so no event falls between the two.
        let live = self.events.subscribe();
        let history: Vec<KvEvent> = {
            let state = self.lock();
            state.history.iter().filter(|e| e.revision > after && e.key.starts_with(prefix)).cloned().collect()
        };
        let last = history.last().map(|e| e.revision).unwrap_or(after);
        let prefix = prefix.to_string();
        let live = BroadcastStream::new(live).filter_map(move |item| {
            let prefix = prefix.clone();
            async move {
                match item {
                    Ok(e) if e.revision > last && e.key.starts_with(&prefix) => Some(Ok(e)),
                    Ok(_) => None,
                    Err(_) => Some(Err(super::ControlPlaneError::WatchResume {
                        after: last,
                        reason: "in-memory watcher lagged".into(),
                    })),
                }
            }
        });
        Ok(Box::pin(futures::stream::iter(history.into_iter().map(Ok)).chain(live)))
    }
}
