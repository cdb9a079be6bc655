//! `ferryctl store PATH...`: stores files (directories are walked) as blobs, many at once.
//!
//! Files are read in batches (up to [`BATCH_FILES`] files or [`BATCH_BYTES`] bytes), each
//! batch is stored with one `StoreBlobs` request per node and one `CertifyBlobs` per member,
//! and up to `concurrency` batches are in flight, so memory stays near
//! `concurrency x BATCH_BYTES` times the encoding overhead whatever the number of files.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ferry_shared::{
    client::{BlobClient, ClientError},
    types::BlobId,
};
use futures::{StreamExt, stream::FuturesOrdered};

/// Files per batch (the nodes' `StoreBlobs` limit).
pub const BATCH_FILES: usize = 256;
/// Bytes read per batch.
pub const BATCH_BYTES: u64 = 32 * 1024 * 1024;

/// What a store of many files did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreSummary {
    /// Files stored.
    pub stored: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Files that failed (read or store), with why.
    pub failed: Vec<(PathBuf, String)>,
    /// Wall time.
    pub elapsed: Duration,
}

impl StoreSummary {
    /// Blobs per second.
    pub fn blobs_per_sec(&self) -> f64 {
        self.stored as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// MiB per second.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Every regular file under `paths` (directories walked, in name order).
pub fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    for path in paths {
        walk(path, &mut out)?;
    }
    Ok(out)
}

fn walk(path: &Path, out: &mut Vec<(PathBuf, u64)>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, out)?;
        }
    } else if meta.is_file() {
        out.push((path.to_path_buf(), meta.len()));
    }
    Ok(())
}

/// Batches of files, by count and bytes.
fn batches(files: Vec<(PathBuf, u64)>) -> Vec<Vec<PathBuf>> {
    let mut out: Vec<Vec<PathBuf>> = Vec::new();
    let mut bytes = 0u64;
    for (path, len) in files {
        match out.last_mut() {
            Some(b) if b.len() < BATCH_FILES && bytes + len <= BATCH_BYTES => {
                bytes += len;
                b.push(path);
            }
            _ => {
                bytes = len;
                out.push(vec![path]);
            }
        }
    }
    out
}

/// Stores `files`, `concurrency` batches at a time; `on_stored` sees each file's outcome in
/// input order.
pub async fn store_files(
    client: &BlobClient,
    files: Vec<(PathBuf, u64)>,
    concurrency: usize,
    mut on_stored: impl FnMut(&Path, &Result<BlobId, String>),
) -> anyhow::Result<StoreSummary> {
    let started = Instant::now();
    let mut summary = StoreSummary::default();
    let mut pending = batches(files).into_iter();
    let mut in_flight = FuturesOrdered::new();
    loop {
        while in_flight.len() < concurrency.max(1) {
            let Some(batch) = pending.next() else { break };
            let client = client.clone();
            in_flight.push_back(async move {
                let read: Vec<(PathBuf, Result<Vec<u8>, String>)> = batch
                    .into_iter()
                    .map(|p| {
                        let data = std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()));
                        (p, data)
                    })
                    .collect();
                let blobs: Vec<&[u8]> = read.iter().filter_map(|(_, d)| d.as_ref().ok().map(Vec::as_slice)).collect();
                let stored = client.store_many(&blobs).await;
                (read, stored)
            });
        }
        let Some((read, stored)) = in_flight.next().await else { break };
        let mut stored: std::vec::IntoIter<Result<BlobId, ClientError>> = stored?.into_iter();
        for (path, data) in read {
            let outcome = match data {
                Err(e) => Err(e),
                Ok(data) => match stored.next() {
                    Some(Ok(id)) => {
                        summary.stored += 1;
                        summary.bytes += data.len() as u64;
                        Ok(id)
                    }
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("no answer".to_string()),
                },
            };
            on_stored(&path, &outcome);
            if let Err(e) = outcome {
                summary.failed.push((path, e));
            }
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn directories_are_walked_in_order_and_batched_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b"), b"22").unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        std::fs::write(dir.path().join("sub/c"), b"333").unwrap();
        let files = expand(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<String> =
            files.iter().map(|(p, _)| p.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(names, vec!["a", "b", "sub/c"]);
        assert_eq!(files.iter().map(|(_, l)| *l).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(expand(&[dir.path().join("nope")]).is_err());

        let many: Vec<(PathBuf, u64)> = (0..600).map(|i| (PathBuf::from(format!("{i}")), 10)).collect();
        let sizes: Vec<usize> = batches(many).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
        let big = vec![(PathBuf::from("x"), BATCH_BYTES), (PathBuf::from("y"), 1), (PathBuf::from("z"), BATCH_BYTES)];
        assert_eq!(batches(big).iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
