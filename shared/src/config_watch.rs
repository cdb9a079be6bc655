//! Live reload of a service's configuration file.
//!
//! The file's directory is watched, not the file: Kubernetes updates a ConfigMap mounted as a
//! directory by swapping the `..data` symlink, so the file's own inode never changes. Any
//! event in the directory re-reads the file through the same layered [`load`](crate::config::load)
//! as at start (defaults, file, environment). A version that parses and validates and differs
//! from the last one is published; a broken one is logged and ignored, so a typo in a
//! ConfigMap never takes a running node down. Which settings a service applies live is the
//! service's choice; the rest wait for a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::config::{Validate, load};

/// Events closer together than this are read as one change (an editor's save, a symlink
/// swap); it coalesces work and is not used to wait for anything.
const SETTLE: Duration = Duration::from_millis(200);

/// The watch could not be set up.
#[derive(Debug, Error)]
#[error("FERRY-CONFIG-004: cannot watch {path} for changes: {source}")]
pub struct ConfigWatchError {
    /// The watched directory.
    pub path: String,
    /// The watcher's error.
    pub source: notify::Error,
}

/// Stops watching when dropped.
pub struct ConfigWatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: JoinHandle<()>,
}

impl Drop for ConfigWatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `new` differs from `applied` in more than the settings applied live, which
/// `copy_live` copies from `applied` into a copy of `new` before comparing.
pub fn needs_restart<T: Clone + PartialEq>(applied: &T, new: &T, copy_live: impl FnOnce(&mut T, &T)) -> bool {
    let mut rest = new.clone();
    copy_live(&mut rest, applied);
    rest != *applied
}

/// Watches `file` and publishes each new valid configuration, starting from `initial`.
pub fn watch_config<T>(
    file: &Path,
    env_prefix: &'static str,
    initial: T,
) -> Result<(watch::Receiver<T>, ConfigWatchGuard), ConfigWatchError>
where
    T: DeserializeOwned + Serialize + Default + Validate + PartialEq + Send + Sync + 'static,
{
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let changed = Arc::new(Notify::new());
    let signal = changed.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            signal.notify_one();
        }
    })
    .map_err(|source| ConfigWatchError { path: dir.display().to_string(), source })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| ConfigWatchError { path: dir.display().to_string(), source })?;

    let (tx, rx) = watch::channel(initial);
    let file = file.to_path_buf();
    let task = tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(SETTLE).await;
            let path = file.clone();
            let loaded = tokio::task::spawn_blocking(move || load::<T>(Some(&path), env_prefix)).await;
            match loaded {
                Ok(Ok(config)) => {
                    let published = tx.send_if_modified(|current| {
                        if *current == config {
                            false
                        } else {
                            *current = config;
                            true
                        }
                    });
                    if published {
                        info!(file = %file.display(), "configuration changed");
                    }
                }
                Ok(Err(e)) => {
                    warn!(file = %file.display(), error = %e, "changed configuration ignored; the running one stays")
                }
                Err(e) => warn!(error = %e, "configuration reload task failed"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok((rx, ConfigWatchGuard { _watcher: watcher, task }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{ConfigError, invalid};
    use serde::Deserialize;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Conf {
        workers: u32,
    }
    impl Default for Conf {
        fn default() -> Self {
            Conf { workers: 1 }
        }
    }
    impl Validate for Conf {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.workers == 0 { Err(invalid("workers", "must be at least 1")) } else { Ok(()) }
        }
    }

    async fn next(rx: &mut watch::Receiver<Conf>) -> Conf {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("no configuration change published within 10 s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn publishes_edits_and_ignores_invalid_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.toml");
        std::fs::write(&file, "workers = 2\n").unwrap();
        let (mut rx, _guard) = watch_config(&file, "FERRY_TEST_WATCH", Conf { workers: 2 }).unwrap();
        std::fs::write(&file, "workers = 5\n").unwrap();
        assert_eq!(next(&mut rx).await.workers, 5);
        // Invalid, then valid: only the valid one is published.
        std::fs::write(&file, "workers = 0\n").unwrap();
        // No event to await for "nothing happened": a window of several settle periods, after
        // which the invalid version must not have been published.
        tokio::time::sleep(SETTLE * 3).await;
        assert!(!rx.has_changed().unwrap(), "an invalid configuration is not published");
        std::fs::write(&file, "workers = 6\n").unwrap();
        assert_eq!(next(&mut rx).await.workers, 6);
    }

    #[tokio::test]
    async fn follows_a_kubernetes_configmap_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let v1 = root.join("..2026_v1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("svc.toml"), "workers = 3\n").unwrap();
        std::os::unix::fs::symlink("..2026_v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.toml", root.join("svc.toml")).unwrap();
        let file = root.join("svc.toml");
        assert_eq!(load::<Conf>(Some(&file), "FERRY_TEST_WATCH").unwrap().workers, 3);
        let (mut rx, _guard) = watch_config(&file, "FERRY_TEST_WATCH", Conf { workers: 3 }).unwrap();
        // The kubelet's update: a new timestamped directory, then an atomic rename of a new symlink.
        let v2 = root.join("..2026_v2");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("svc.toml"), "workers = 9\n").unwrap();
        std::os::unix::fs::symlink("..2026_v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_eq!(next(&mut rx).await.workers, 9);
    }
}
