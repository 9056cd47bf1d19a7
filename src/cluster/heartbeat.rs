//! The replica heartbeat: this replica's row in `tasker.replicas`, beaten every interval and
//! at once on a change of its mode or listening, and what each beat brings back (others alive,
//! the claimers, the fleet's mode).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Fleet;
use crate::config::{DeploymentMode, ReplicasConfig};
use crate::store::Store;

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

impl Fleet {
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
