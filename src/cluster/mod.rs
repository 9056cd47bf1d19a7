//! The replica registry, as this replica sees it: its id, its heartbeat into
//! `tasker.replicas` (with its mode and whether it listens), whether any other replica is
//! alive, and which replicas claim first.
//!
//! Whether others are alive decides whether an enqueue announces the steps no local fetch took
//! (`tasker_steps_enqueued`): only while another replica could have a fetch parked for them.
//! A single replica sends no such notification and pays nothing for the registry but one
//! asynchronous-commit heartbeat per interval.
//!
//! **Claim split.** Every listening replica hears every notification. Instead of all of them
//! racing for the task's claim (the losers' attempts are wasted round trips), one of the
//! replicas listening now and serving every namespace (the *claimers*, as of the last
//! heartbeat) works each event and the others drop it. (A replica serving some namespaces
//! drops the others' events before the split, so it is never a claimer; in a fleet of such
//! replicas there are none, and each works the events of its own namespaces.) Which one: the replica whose transaction made the steps ready (the
//! notification names it), when it is a claimer, because the worker that completed the step
//! is most likely parked on it again and gets the next step handed over in the enqueue's own
//! transaction; otherwise the claimer with the highest [`claim_score`] for the task
//! (rendezvous hashing). Rendezvous hashing moves only the departed or arrived replica's share
//! when the claimers change. Views of the claimers can differ for up to a heartbeat, and a
//! claimer can die with events in hand; so whenever a replica's view of the claimers changes
//! it requests a catch-up sweep, which works every ready task regardless of the split. An
//! event dropped because some replica's view was stale is thus swept by that replica when its
//! view catches up; one left to a dead claimer, when the others see it gone (`gone_after`).
//! Sweeps, the poller, deadlines and API commands are not split: they are rare or explicit.
//!
//! The heartbeat also brings the fleet's deployment mode (set through any replica), as does
//! its notification (`tasker_fleet_mode`) to listening replicas; [`Fleet::fleet_mode`] is
//! what the mode controller applies, below this replica's own override.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{DeploymentMode, ReplicasConfig};
use crate::store::Store;

/// This replica's identity and what it last heard of the others. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fleet {
    replica_id: Uuid,
    peers_alive: Arc<AtomicBool>,
    fleet_mode: Arc<watch::Sender<Option<DeploymentMode>>>,
    /// The replicas listening, sorted, as of the last heartbeat (empty: none known yet).
    claimers: Arc<RwLock<Arc<[Uuid]>>>,
    /// Events this replica dropped because another claimer works their task.
    left_to_peers: Arc<AtomicU64>,
}

/// What this replica tells the registry about itself with each heartbeat, changes included.
#[derive(Clone)]
pub struct ReplicaState {
    pub mode: watch::Receiver<DeploymentMode>,
    /// Whether its LISTEN connection is up.
    pub listening: watch::Receiver<bool>,
    /// Whether it serves every namespace. One that serves some only drops the other
    /// namespaces' events before the split, so it must not be a claimer (an event falling to
    /// it would be dropped by everyone).
    pub serves_every_namespace: bool,
}

/// A task's score for a replica under rendezvous hashing; the highest scoring claimer claims
/// first. Defined here bit for bit (not with std's hasher, whose output may change between
/// Rust releases) so that replicas of different builds agree during a rolling upgrade.
pub fn claim_score(task: Uuid, replica: Uuid) -> u64 {
    let (t_hi, t_lo) = task.as_u64_pair();
    let (r_hi, r_lo) = replica.as_u64_pair();
    mix64(mix64(t_hi ^ mix64(r_hi)) ^ t_lo ^ mix64(r_lo).rotate_left(29))
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The claimer with the highest score for `task` (`None` when there are none).
pub fn first_claimer(task: Uuid, claimers: &[Uuid]) -> Option<Uuid> {
    claimers
        .iter()
        .copied()
        .max_by_key(|r| (claim_score(task, *r), *r))
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Self {
        Self::with_id(Uuid::now_v7())
    }

    /// This replica under `replica_id` (the one its store's connections announce).
    pub fn with_id(replica_id: Uuid) -> Self {
        Self {
            replica_id,
            peers_alive: Arc::new(AtomicBool::new(false)),
            fleet_mode: Arc::new(watch::Sender::new(None)),
            claimers: Arc::new(RwLock::new(Arc::from(Vec::new()))),
            left_to_peers: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether this replica works an event for `task` that `origin` caused (see the module
    /// doc): yes when it is the event's first claimer, or when it knows of no claimers yet.
    /// One that does not appear among the claimers (it started listening after the last
    /// heartbeat) leaves every task to those that do, as they expect.
    pub fn claims_first(&self, task: Uuid, origin: Option<Uuid>) -> bool {
        let claimers = self.claimers();
        let first = match origin {
            Some(o) if claimers.binary_search(&o).is_ok() => Some(o),
            _ => first_claimer(task, &claimers),
        };
        let mine = first.is_none_or(|f| f == self.replica_id);
        if !mine {
            self.left_to_peers.fetch_add(1, Ordering::Relaxed);
        }
        mine
    }

    /// The replicas listening, sorted, as of the last heartbeat.
    pub fn claimers(&self) -> Arc<[Uuid]> {
        self.claimers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Events dropped here because another replica claims their task first.
    pub fn events_left_to_peers(&self) -> u64 {
        self.left_to_peers.load(Ordering::Relaxed)
    }

    /// Record the claimers a heartbeat returned; true when they changed.
    fn heard_claimers(&self, mut claimers: Vec<Uuid>) -> bool {
        claimers.sort();
        let mut current = self.claimers.write().unwrap_or_else(|e| e.into_inner());
        if **current == *claimers {
            return false;
        }
        *current = Arc::from(claimers);
        true
    }

    /// The fleet's deployment mode as last heard (`None`: none set), changes included.
    pub fn fleet_mode(&self) -> watch::Receiver<Option<DeploymentMode>> {
        self.fleet_mode.subscribe()
    }

    /// The fleet's mode, from a heartbeat or an announcement.
    pub fn heard_fleet_mode(&self, mode: Option<DeploymentMode>) {
        self.fleet_mode.send_if_modified(|m| {
            let changed = *m != mode;
            *m = mode;
            changed
        });
    }

    pub fn replica_id(&self) -> Uuid {
        self.replica_id
    }

    /// This replica's id, for an enqueue to announce its steps under, while others are alive.
    pub fn announce_as(&self) -> Option<Uuid> {
        self.peers_alive
            .load(Ordering::Relaxed)
            .then_some(self.replica_id)
    }

    /// Unit tests: behave as if another replica were alive.
    #[cfg(test)]
    pub(crate) fn peers_alive_for_test(&self) {
        self.peers_alive.store(true, Ordering::Relaxed);
    }

    /// Whether a `tasker_steps_enqueued` notification came from another replica.
    pub fn is_other(&self, replica: Uuid) -> bool {
        replica != self.replica_id
    }

    /// Heart-beat until `stop`, then remove this replica's row. Beats every interval, and at
    /// once when this replica starts or stops listening or changes mode, so the others see it
    /// within their next beat. A failed heartbeat keeps the last answer (a replica that cannot
    /// reach the database enqueues nothing anyway). A change of the claimers requests a
    /// catch-up sweep: `on_claimers_changed` is called (see the module doc).
    pub async fn heartbeat(
        self,
        store: Store,
        cfg: ReplicasConfig,
        address: String,
        mut state: ReplicaState,
        on_claimers_changed: impl Fn() + Send,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(cfg.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                Ok(()) = state.mode.changed() => {}
                Ok(()) = state.listening.changed() => {}
            }
            let listening = *state.listening.borrow_and_update();
            let mode = *state.mode.borrow_and_update();
            match store
                .replica_heartbeat(
                    self.replica_id,
                    &address,
                    cfg.gone_after,
                    mode,
                    listening,
                    state.serves_every_namespace,
                )
                .await
            {
                Ok(beat) => {
                    let others = beat.other_replicas;
                    let before = self.peers_alive.swap(others > 0, Ordering::Relaxed);
                    if before != (others > 0) {
                        tracing::info!(other_replicas = others, "replicas alive changed");
                    }
                    self.heard_fleet_mode(beat.fleet_mode);
                    if self.heard_claimers(beat.claimers) {
                        tracing::info!(claimers = ?self.claimers(), "claimers changed; catch-up sweep");
                        on_claimers_changed();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
            }
        }
        // best effort: a replica that cannot say goodbye is gone after `gone_after`
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            store.remove_replica(self.replica_id),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    /// The score is part of the fleet's contract: replicas of different builds must agree.
    #[test]
    fn the_claim_score_is_fixed_bit_for_bit() {
        let task = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        let replica = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);
        assert_eq!(claim_score(task, replica), claim_score(task, replica));
        assert_eq!(claim_score(task, replica), 0x4d0f_b021_7bb1_1f06);
    }

    /// Three claimers take about a third of the tasks each; when one leaves, only its tasks
    /// move, and they spread over the other two.
    #[test]
    fn claimers_split_tasks_evenly_and_a_departure_moves_only_its_share() {
        let claimers = ids(3);
        let tasks = ids(30_000);
        let first: Vec<Uuid> = tasks
            .iter()
            .map(|t| first_claimer(*t, &claimers).unwrap())
            .collect();
        for c in &claimers {
            let share = first.iter().filter(|f| *f == c).count();
            assert!((9_000..11_000).contains(&share), "share {share}");
        }
        let remaining = &claimers[..2];
        let mut moved_to = [0usize; 2];
        for (t, before) in tasks.iter().zip(&first) {
            let after = first_claimer(*t, remaining).unwrap();
            if *before == claimers[2] {
                moved_to[remaining.iter().position(|r| *r == after).unwrap()] += 1;
            } else {
                assert_eq!(after, *before, "a task of a remaining claimer moved");
            }
        }
        assert!(moved_to.iter().all(|n| *n > 4_000), "{moved_to:?}");
    }

    #[test]
    fn a_replica_that_knows_no_claimers_claims_everything_and_one_not_among_them_nothing() {
        let fleet = Fleet::new();
        assert!(fleet.claims_first(Uuid::now_v7(), None));
        assert!(fleet.heard_claimers(ids(2)));
        assert!((0..100).all(|_| !fleet.claims_first(Uuid::now_v7(), None)));
        assert_eq!(fleet.events_left_to_peers(), 100);
        let mut with_me = ids(1);
        with_me.push(fleet.replica_id());
        assert!(fleet.heard_claimers(with_me.clone()));
        assert!(
            !fleet.heard_claimers(with_me),
            "the same claimers are no change"
        );
        let mine = (0..1000)
            .filter(|_| fleet.claims_first(Uuid::now_v7(), None))
            .count();
        assert!((350..650).contains(&mine), "{mine}");
    }

    /// The replica whose transaction made the steps ready claims first while it listens;
    /// one that does not (or anything else's change) leaves the choice to the hash.
    #[test]
    fn the_origin_of_an_event_claims_it_first_when_it_listens() {
        let fleet = Fleet::new();
        let other = Uuid::now_v7();
        assert!(fleet.heard_claimers(vec![other, fleet.replica_id()]));
        assert!((0..100).all(|_| fleet.claims_first(Uuid::now_v7(), Some(fleet.replica_id()))));
        assert!((0..100).all(|_| !fleet.claims_first(Uuid::now_v7(), Some(other))));
        let polling_only = Uuid::now_v7();
        let mine = (0..1000)
            .filter(|_| fleet.claims_first(Uuid::now_v7(), Some(polling_only)))
            .count();
        assert!((350..650).contains(&mine), "{mine}");
    }
}
