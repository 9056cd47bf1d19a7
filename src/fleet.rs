//! The replica registry, as this replica sees it: its id, its heartbeat into
//! `tasker.replicas`, and whether any other replica is alive.
//!
//! That fact decides whether an enqueue announces the steps no local fetch took
//! (`tasker_steps_enqueued`): only while another replica could have a fetch parked for them.
//! A single replica sends no such notification and pays nothing for the registry but one
//! asynchronous-commit heartbeat per interval.
//!
//! The heartbeat also brings the fleet's deployment mode (set through any replica), as does
//! its notification (`tasker_fleet_mode`) to listening replicas; [`Fleet::fleet_mode`] is
//! what the coordinator applies, below this replica's own override.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Self {
        Self {
            replica_id: Uuid::now_v7(),
            peers_alive: Arc::new(AtomicBool::new(false)),
            fleet_mode: Arc::new(watch::Sender::new(None)),
        }
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

    /// Whether a `tasker_steps_enqueued` notification came from another replica.
    pub fn is_other(&self, replica: Uuid) -> bool {
        replica != self.replica_id
    }

    /// Heart-beat until `stop`, then remove this replica's row. A failed heartbeat keeps the
    /// last answer (a replica that cannot reach the database enqueues nothing anyway).
    pub async fn heartbeat(
        self,
        store: Store,
        cfg: ReplicasConfig,
        address: String,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(cfg.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match store
                .replica_heartbeat(self.replica_id, &address, cfg.gone_after)
                .await
            {
                Ok(beat) => {
                    let others = beat.other_replicas;
                    let before = self.peers_alive.swap(others > 0, Ordering::Relaxed);
                    if before != (others > 0) {
                        tracing::info!(other_replicas = others, "replicas alive changed");
                    }
                    self.heard_fleet_mode(beat.fleet_mode);
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
