//! `StepAnnouncer`: tells the other replicas of steps this replica queued that no fetch of its
//! own took, after giving its own workers a short grace to take them.
//!
//! While other replicas are alive, a FetchSteps parked on one of them must hear of steps
//! queued here (`tasker_steps_enqueued`), or it waits for its periodic re-read. But most such
//! steps are taken here within a millisecond or two: the worker that completed the step came
//! through this replica (which is why this replica enqueued its successor, see `cluster`), and
//! its next FetchSteps arrives just after the enqueue. Announcing every one of them costs
//! every replica a notification and PostgreSQL the commit of a notifying transaction per step
//! (measured: a quarter more database CPU per step with three replicas). So the enqueuer
//! reports queued steps here, fetches of this replica report what they take from the queue,
//! and only what is still untaken when the grace runs out is announced, in one statement for
//! all namespaces due.
//!
//! ```text
//!  enqueue: steps queued, none handed over, peers alive ──> queued(lane, n)   (due: now + grace)
//!  fetch here: read the queue, got k steps of the lane  ──> taken(lane, k)    (n -= k)
//!  due and n > 0 ───────────────────────────────────────> pg_notify tasker_steps_enqueued
//! ```
//!
//! The count is a hint: a local fetch may take older steps, another replica's fetch may take
//! these. An announcement too many wakes a fetch that finds nothing and parks again; one too
//! few leaves a remote fetch to its periodic re-read. The database stays the truth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::Fleet;
use crate::store::Store;

/// Cheap to clone.
#[derive(Clone)]
pub struct StepAnnouncer {
    inner: Arc<Inner>,
}

/// A queue of a namespace: (namespace, queue).
pub type Lane = (String, String);

struct Inner {
    pending: Mutex<HashMap<Lane, Pending>>,
    wake: Notify,
    grace: Duration,
    /// Whether other replicas are alive: alone, there is nobody to tell.
    fleet: Fleet,
}

struct Pending {
    steps: u32,
    /// When the first of these steps was reported: the announcement is due a grace later.
    due: Instant,
}

impl StepAnnouncer {
    pub fn new(grace: Duration, fleet: Fleet) -> Self {
        Self {
            inner: Arc::new(Inner {
                pending: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                grace,
                fleet,
            }),
        }
    }

    /// `steps` of a queue of `namespace` were queued here (by an enqueue, or put back from an
    /// undelivered lease) with no fetch of this replica to take them. Nothing to do while no
    /// other replica is alive.
    pub fn queued(&self, namespace: &str, queue: &str, steps: u32) {
        if steps == 0 || self.inner.fleet.announce_as().is_none() {
            return;
        }
        let due = Instant::now() + self.inner.grace;
        let mut pending = self.lock();
        let lane = (namespace.to_string(), queue.to_string());
        match pending.get_mut(&lane) {
            Some(p) => p.steps = p.steps.saturating_add(steps),
            None => {
                pending.insert(lane, Pending { steps, due });
            }
        }
        drop(pending);
        self.inner.wake.notify_one();
    }

    /// A fetch of this replica took `steps` of a queue of `namespace` from the queue.
    pub fn taken(&self, namespace: &str, queue: &str, steps: usize) {
        let mut pending = self.lock();
        let lane = (namespace.to_string(), queue.to_string());
        if let Some(p) = pending.get_mut(&lane) {
            p.steps = p
                .steps
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
            if p.steps == 0 {
                pending.remove(&lane);
            }
        }
    }

    /// Steps of a lane waiting to be announced (for tests and status).
    pub fn pending(&self, namespace: &str, queue: &str) -> u32 {
        self.lock()
            .get(&(namespace.to_string(), queue.to_string()))
            .map_or(0, |p| p.steps)
    }

    /// Announce what is due, as this replica, until `stop`. A failed announcement is dropped:
    /// the other replicas' fetches find the steps on their periodic re-read.
    pub async fn run(self, store: Store, stop: CancellationToken) {
        let replica = self.inner.fleet.replica_id();
        loop {
            let next = self.lock().values().map(|p| p.due).min();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.inner.wake.notified() => continue,
                _ = sleep_until_opt(next) => {}
            }
            let due = self.take_due(Instant::now());
            if due.is_empty() {
                continue;
            }
            if let Err(e) = store.announce_steps(&due, replica).await {
                tracing::warn!(error = %e, lanes = due.len(), "announcing queued steps failed");
            }
        }
    }

    /// Remove and return the lanes whose grace is over, with their untaken steps.
    fn take_due(&self, now: Instant) -> Vec<(Lane, u32)> {
        let mut pending = self.lock();
        let due: Vec<Lane> = pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(lane, _)| lane.clone())
            .collect();
        due.into_iter()
            .filter_map(|lane| pending.remove(&lane).map(|p| (lane, p.steps)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Lane, Pending>> {
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcer() -> StepAnnouncer {
        let fleet = Fleet::new();
        fleet.peers_alive_for_test();
        StepAnnouncer::new(Duration::from_millis(5), fleet)
    }

    #[test]
    fn a_replica_alone_announces_nothing() {
        let a = StepAnnouncer::new(Duration::from_millis(5), Fleet::new());
        a.queued("ns", "default", 3);
        assert_eq!(a.pending("ns", "default"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn steps_taken_here_within_the_grace_are_not_announced() {
        let a = announcer();
        a.queued("chain", "default", 1);
        a.queued("fan", "default", 3);
        a.queued("fan", "other", 1);
        a.taken("chain", "default", 1);
        a.taken("fan", "default", 1);
        assert_eq!(a.pending("chain", "default"), 0);
        assert_eq!(a.pending("fan", "default"), 2);
        assert_eq!(a.pending("fan", "other"), 1, "per queue");
        a.taken("fan", "other", 1);
        assert!(
            a.take_due(Instant::now()).is_empty(),
            "not due before the grace"
        );
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(
            a.take_due(Instant::now()),
            vec![(("fan".to_string(), "default".to_string()), 2)]
        );
        assert_eq!(a.pending("fan", "default"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_runs_from_the_first_untaken_step() {
        let a = announcer();
        a.queued("ns", "default", 1);
        tokio::time::advance(Duration::from_millis(4)).await;
        a.queued("ns", "default", 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            a.take_due(Instant::now()),
            vec![(("ns".to_string(), "default".to_string()), 2)]
        );
    }
}
