//! `DeadlinePoke`: the deadlines the workers' calls create (a lease's expiry, a retry's due
//! time), told to the deadline scheduler (`readiness::deadlines`) so that it wakes for them
//! instead of sleeping past them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// Wakes the deadline scheduler early when a new deadline (a retry's due time, a lease's
/// expiry) comes before the one it sleeps towards. The scheduler publishes its planned wake-up,
/// so callers compare against it without a query and poke only when it matters.
#[derive(Clone, Debug)]
pub struct DeadlinePoke {
    notify: Arc<Notify>,
    /// Unix milliseconds of the scheduler's planned wake-up.
    planned_ms: Arc<AtomicI64>,
}

impl Default for DeadlinePoke {
    fn default() -> Self {
        Self {
            notify: Arc::default(),
            planned_ms: Arc::new(AtomicI64::new(i64::MAX)),
        }
    }
}

impl DeadlinePoke {
    /// A deadline now exists at `at`: wake the scheduler if it plans to sleep past it.
    pub fn deadline_at(&self, at: DateTime<Utc>) {
        if at.timestamp_millis() < self.planned_ms.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// The scheduler's side: it is reading the next deadline, so every deadline announced from
    /// now until its next [`plan`](Self::plan) must poke (and the poke waits as a permit).
    pub(crate) fn awake(&self) {
        // "planned to sleep forever": every deadline is earlier, so every one pokes
        self.planned_ms.store(i64::MAX, Ordering::Relaxed);
    }

    /// The scheduler's side: it will wake at `at` unless poked.
    pub(crate) fn plan(&self, at: DateTime<Utc>) {
        self.planned_ms
            .store(at.timestamp_millis(), Ordering::Relaxed);
    }

    /// The scheduler's side: resolves when poked (a poke made before this is awaited counts:
    /// `Notify` keeps one permit).
    pub(crate) async fn poked(&self) {
        self.notify.notified().await
    }
}
