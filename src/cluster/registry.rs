//! `Fleet`: this replica's identity in the registry and what it last heard of the others
//! (whether any is alive, the claimers, the fleet's deployment mode); whether it claims an
//! event first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use uuid::Uuid;

use super::claim_split::first_claimer;
use crate::config::DeploymentMode;

/// This replica's identity and what it last heard of the others. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub(super) replica_id: Uuid,
    pub(super) peers_alive: Arc<AtomicBool>,
    fleet_mode: Arc<watch::Sender<Option<DeploymentMode>>>,
    /// The replicas listening, sorted, as of the last heartbeat (empty: none known yet).
    claimers: Arc<RwLock<Arc<[Uuid]>>>,
    /// Events this replica dropped because another claimer works their task.
    left_to_peers: Arc<AtomicU64>,
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
    pub(super) fn heard_claimers(&self, mut claimers: Vec<Uuid>) -> bool {
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
}
