//! Shard-status transitions: the one place a shard's status changes, as a function of an event,
//! so only the legal edges of ARCHITECTURE.md ("Shard states") exist.
//!
//! ```text
//!   (none) --genesis--> Active
//!   (none) | LockedToMove --gained by sync--> ActiveSync --completed--> Active
//!                                             ActiveSync --completed with pending | failed--> ActiveRecover
//!   any --gained by recovery (catch-up, no known source)--> ActiveRecover
//!   Active | ActiveRecover --history broken (restart: writes may have been missed)--> ActiveRecover
//!   ActiveRecover --recovered (under the same scan)--> Active
//!   ActiveRecover --operator retries the sync--> ActiveSync
//!   owned --lost--> LockedToMove --new owner holds it--> (dropped)
//! ```
//!
//! Every entry into `ActiveRecover` draws a new scan id. Blob recovery keys its progress by it,
//! so progress made under an older history (before a restart, a catch-up, a loss and re-gain)
//! is never taken for progress on the new one.

use ferry_shared::types::{Epoch, NodeId, ShardStatus};
use thiserror::Error;

use crate::store::{ShardRecord, SyncProgress};

/// What happened to a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEvent {
    /// The cluster starts and the node owns the shard: there is nothing to fill.
    Genesis,
    /// Gained at `epoch` on the incremental path: stream it from `source`.
    GainedBySync {
        /// Epoch of the gain.
        epoch: Epoch,
        /// The shard's owner in `epoch - 1`.
        source: NodeId,
    },
    /// Gained (or held already) where no source can be trusted to be complete: catch-up after
    /// missed epochs, no previous owner, or blob recovery configured as the fill method.
    GainedByRecovery,
    /// The node restarted: writes may have been missed while it was down.
    HistoryBroken,
    /// The shard sync streamed the whole shard; `pending` blobs are left for blob recovery.
    SyncCompleted {
        /// Whether any blob is left for blob recovery.
        pending: bool,
    },
    /// The shard sync gave up; blob recovery fills the shard.
    SyncFailed,
    /// Blob recovery finished the scan `scan_id` with every certified blob present.
    Recovered {
        /// The scan the work ran under.
        scan_id: u64,
    },
    /// An operator asked for the failed sync to be tried again.
    RetrySync,
    /// Lost at `epoch`: kept, read-only, until its new owner holds it.
    Lost {
        /// The epoch that moved it away.
        epoch: Epoch,
    },
}

/// A transition the state machine does not have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IllegalTransition {
    /// No edge from the current status for the event.
    #[error("FERRY-SHARD-001: shard status {from} has no transition for {event}")]
    NoEdge {
        /// Current status, or `none` for a shard without a record.
        from: String,
        /// The event.
        event: String,
    },
    /// Blob recovery finished under a scan id the shard no longer has.
    #[error("FERRY-SHARD-002: the scan {finished} finished, but the shard now needs scan {current}; scan again")]
    StaleScan {
        /// Scan id of the finished work.
        finished: u64,
        /// Scan id the shard has now.
        current: u64,
    },
}

fn new_scan_id() -> u64 {
    // Random rather than a counter: a scan id never has to be coordinated across writers or
    // survive in another record, only differ from every earlier one of the shard.
    rand::random::<u64>().max(1)
}

fn recover(sync: Option<SyncProgress>) -> ShardRecord {
    ShardRecord { status: ShardStatus::ActiveRecover, sync, scan_id: Some(new_scan_id()), locked_epoch: None }
}

/// The record after `event`, or why the event is not legal in the current state.
pub fn apply(current: Option<&ShardRecord>, event: &ShardEvent) -> Result<ShardRecord, IllegalTransition> {
    use ShardStatus::*;
    let status = current.map(|r| r.status);
    let illegal = || IllegalTransition::NoEdge {
        from: status.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
        event: format!("{event:?}"),
    };
    let kept_sync = || current.and_then(|r| r.sync.clone());
    match (status, event) {
        (None, ShardEvent::Genesis) => Ok(ShardRecord::new(Active)),
        (None | Some(LockedToMove), ShardEvent::GainedBySync { epoch, source }) => Ok(ShardRecord {
            sync: Some(SyncProgress { gained_epoch: *epoch, source: Some(source.clone()), ..SyncProgress::default() }),
            ..ShardRecord::new(ActiveSync)
        }),
        (_, ShardEvent::GainedByRecovery) => Ok(recover(kept_sync())),
        (Some(Active | ActiveRecover), ShardEvent::HistoryBroken) => Ok(recover(kept_sync())),
        (Some(ActiveSync), ShardEvent::SyncCompleted { pending: false }) => {
            Ok(ShardRecord { sync: kept_sync(), ..ShardRecord::new(Active) })
        }
        (Some(ActiveSync), ShardEvent::SyncCompleted { pending: true } | ShardEvent::SyncFailed) => {
            Ok(recover(kept_sync()))
        }
        (Some(ActiveRecover), ShardEvent::Recovered { scan_id }) => {
            let current_scan = current.and_then(|r| r.scan_id).unwrap_or(0);
            if current_scan != *scan_id {
                return Err(IllegalTransition::StaleScan { finished: *scan_id, current: current_scan });
            }
            Ok(ShardRecord { sync: kept_sync(), ..ShardRecord::new(Active) })
        }
        (Some(ActiveRecover), ShardEvent::RetrySync) if kept_sync().is_some_and(|p| p.source.is_some()) => {
            let mut progress = kept_sync().unwrap_or_default();
            progress.attempts = 0;
            progress.finished = false;
            progress.finished_at_ms = 0;
            progress.last_error = None;
            Ok(ShardRecord { sync: Some(progress), ..ShardRecord::new(ActiveSync) })
        }
        (Some(ActiveSync | ActiveRecover | Active), ShardEvent::Lost { epoch }) => {
            Ok(ShardRecord { sync: kept_sync(), locked_epoch: Some(*epoch), ..ShardRecord::new(LockedToMove) })
        }
        _ => Err(illegal()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s.to_string()).unwrap()
    }

    fn record(status: ShardStatus) -> ShardRecord {
        let sync = SyncProgress { gained_epoch: 3, source: Some(node("node-1")), ..SyncProgress::default() };
        ShardRecord { status, sync: Some(sync), scan_id: Some(7), locked_epoch: None }
    }

    #[test]
    fn every_status_and_event_has_exactly_the_documented_outcome() {
        use ShardStatus::*;
        let events = [
            ShardEvent::Genesis,
            ShardEvent::GainedBySync { epoch: 4, source: node("node-2") },
            ShardEvent::GainedByRecovery,
            ShardEvent::HistoryBroken,
            ShardEvent::SyncCompleted { pending: false },
            ShardEvent::SyncCompleted { pending: true },
            ShardEvent::SyncFailed,
            ShardEvent::Recovered { scan_id: 7 },
            ShardEvent::RetrySync,
            ShardEvent::Lost { epoch: 5 },
        ];
        // Expected status after each event (None = illegal), per starting state.
        let table: [(Option<ShardStatus>, [Option<ShardStatus>; 10]); 5] = [
            (None, [Some(Active), Some(ActiveSync), Some(ActiveRecover), None, None, None, None, None, None, None]),
            (
                Some(ActiveSync),
                [
                    None,
                    None,
                    Some(ActiveRecover),
                    None,
                    Some(Active),
                    Some(ActiveRecover),
                    Some(ActiveRecover),
                    None,
                    None,
                    Some(LockedToMove),
                ],
            ),
            (
                Some(ActiveRecover),
                [
                    None,
                    None,
                    Some(ActiveRecover),
                    Some(ActiveRecover),
                    None,
                    None,
                    None,
                    Some(Active),
                    Some(ActiveSync),
                    Some(LockedToMove),
                ],
            ),
            (
                Some(Active),
                [
                    None,
                    None,
                    Some(ActiveRecover),
                    Some(ActiveRecover),
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(LockedToMove),
                ],
            ),
            (
                Some(LockedToMove),
                [None, Some(ActiveSync), Some(ActiveRecover), None, None, None, None, None, None, None],
            ),
        ];
        for (from, outcomes) in table {
            let start = from.map(record);
            for (event, want) in events.iter().zip(outcomes) {
                let got = apply(start.as_ref(), event).ok().map(|r| r.status);
                assert_eq!(got, want, "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn entering_active_recover_always_draws_a_new_scan_id() {
        let active = record(ShardStatus::Active);
        let a = apply(Some(&active), &ShardEvent::HistoryBroken).unwrap();
        let b = apply(Some(&a), &ShardEvent::HistoryBroken).unwrap();
        assert!(a.scan_id.is_some() && b.scan_id.is_some());
        assert_ne!(a.scan_id, Some(7));
        assert_ne!(a.scan_id, b.scan_id, "a second restart invalidates the first restart's scan");
        let syncing = apply(None, &ShardEvent::GainedBySync { epoch: 2, source: node("node-3") }).unwrap();
        assert_eq!(syncing.scan_id, None);
        let failed = apply(Some(&syncing), &ShardEvent::SyncFailed).unwrap();
        assert!(failed.scan_id.is_some());
    }

    #[test]
    fn a_scan_finished_under_an_old_history_does_not_complete_the_shard() {
        let recovering = apply(Some(&record(ShardStatus::Active)), &ShardEvent::HistoryBroken).unwrap();
        let scan = recovering.scan_id.unwrap();
        let broken_again = apply(Some(&recovering), &ShardEvent::HistoryBroken).unwrap();
        assert!(matches!(
            apply(Some(&broken_again), &ShardEvent::Recovered { scan_id: scan }),
            Err(IllegalTransition::StaleScan { .. })
        ));
        let current = broken_again.scan_id.unwrap();
        assert_eq!(
            apply(Some(&broken_again), &ShardEvent::Recovered { scan_id: current }).unwrap().status,
            ShardStatus::Active
        );
    }

    #[test]
    fn a_retry_needs_a_sync_with_a_source() {
        let mut no_source = record(ShardStatus::ActiveRecover);
        no_source.sync = None;
        assert!(apply(Some(&no_source), &ShardEvent::RetrySync).is_err());
        let retried = apply(Some(&record(ShardStatus::ActiveRecover)), &ShardEvent::RetrySync).unwrap();
        assert_eq!(retried.status, ShardStatus::ActiveSync);
        assert_eq!(retried.sync.unwrap().attempts, 0);
    }

    #[test]
    fn a_lost_shard_remembers_the_epoch_that_moved_it() {
        let locked = apply(Some(&record(ShardStatus::Active)), &ShardEvent::Lost { epoch: 9 }).unwrap();
        assert_eq!((locked.status, locked.locked_epoch), (ShardStatus::LockedToMove, Some(9)));
        assert!(apply(Some(&locked), &ShardEvent::Lost { epoch: 10 }).is_err(), "already locked");
    }
}
