//! Wake-ups: the in-process signals that let a sleeping loop act the moment there is work,
//! instead of on its next tick. Each is a wake-up only; the database stays the truth, and
//! every sleeper re-reads it after waking.
//!
//! - [`StepWakeups`]: steps were enqueued in a namespace -> that many parked `FetchSteps`.
//! - [`DeadlinePoke`]: a retry or lease deadline now exists earlier than the deadline
//!   scheduler planned to wake -> the scheduler.
//! - [`SweepRequester`]: something may have been missed (listener reconnected, mode changed,
//!   commands refused) -> the poller runs a catch-up sweep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// Per-namespace wake-ups for workers long-polling for steps. The enqueuer notifies after its
/// commit; a waiting fetch registers before it reads the queue, so no wake-up falls between.
///
/// An enqueue of `n` steps wakes at most `n` waiters, not all of them: waking every idle
/// worker for one step made the others run an empty fetch each (measured in a soak with 16
/// workers: 6.9 fetch queries per enqueued step, three quarters of a core on this machine).
/// A waiter woken while its own fetch is in flight, and then dropped because that fetch found
/// steps, hands its wake-up on to the next waiter (`tokio::sync::Notify` semantics), so a
/// wake-up is never lost to a fetch that no longer needs it.
#[derive(Clone, Default)]
pub struct StepWakeups {
    by_namespace: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl StepWakeups {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `Notify` for a namespace (created on first use).
    pub fn for_namespace(&self, namespace: &str) -> Arc<Notify> {
        // the lock guards a map look-up only; never held across an await
        let mut map = self.by_namespace.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(namespace.to_string()).or_default().clone()
    }

    /// `steps` were enqueued in `namespace`: wake that many waiting fetches.
    pub fn notify(&self, namespace: &str, steps: usize) {
        let notify = {
            let map = self.by_namespace.lock().unwrap_or_else(|e| e.into_inner());
            map.get(namespace).cloned()
        };
        if let Some(n) = notify {
            for _ in 0..steps {
                n.notify_one();
            }
        }
    }
}

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

/// Asks the poller for a catch-up sweep. Requests made while one is pending fold into it.
#[derive(Clone, Default, Debug)]
pub struct SweepRequester {
    notify: Arc<Notify>,
}

impl SweepRequester {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.notify.notify_one();
    }

    pub(crate) async fn requested(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::time::Duration;

    /// Three waiters, two steps: exactly the first two registered wake; the third sleeps
    /// until the next enqueue. Polled once each, so nothing races the assertion.
    #[test]
    fn an_enqueue_wakes_one_waiter_per_step() {
        let wakeups = StepWakeups::new();
        let notify = wakeups.for_namespace("ns");
        let mut waiters: Vec<_> = (0..3)
            .map(|_| {
                let mut waiter = Box::pin(notify.notified());
                waiter.as_mut().enable();
                waiter
            })
            .collect();
        wakeups.notify("ns", 2);
        let woken: Vec<bool> = waiters
            .iter_mut()
            .map(|w| w.as_mut().now_or_never().is_some())
            .collect();
        assert_eq!(
            woken,
            vec![true, true, false],
            "first registered, first woken"
        );
        wakeups.notify("ns", 1);
        assert!(waiters[2].as_mut().now_or_never().is_some());
    }

    /// A waiter notified and then dropped (its own fetch found steps) passes the wake-up on.
    #[tokio::test]
    async fn a_dropped_waiter_hands_its_wake_up_on() {
        let wakeups = StepWakeups::new();
        let notify = wakeups.for_namespace("ns");
        let mut first = Box::pin(notify.notified());
        first.as_mut().enable();
        let second = notify.notified();
        tokio::pin!(second);
        second.as_mut().enable();
        wakeups.notify("ns", 1);
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the wake-up moved to the second waiter");
    }
}
