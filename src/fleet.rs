//! The replica registry, as this replica sees it: its id, its heartbeat into
//! `tasker.replicas`, and whether any other replica is alive.
//!
//! That last fact decides one thing today: an enqueue announces the steps no local fetch took
//! (`tasker_steps_enqueued`) only while another replica could have a fetch parked for them.
//! A single replica sends no such notification and pays nothing for the registry but one
//! asynchronous-commit heartbeat per interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ReplicasConfig;
use crate::store::Store;

/// This replica's identity and what it last heard of the others. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fleet {
    replica_id: Uuid,
    peers_alive: Arc<AtomicBool>,
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
        }
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
                Ok(others) => {
                    let before = self.peers_alive.swap(others > 0, Ordering::Relaxed);
                    if before != (others > 0) {
                        tracing::info!(other_replicas = others, "replicas alive changed");
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
