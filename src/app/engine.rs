//! `Engine`: the event-driven core assembled. The command processor and its
//! enqueuer, the mode controller with the listener, poller and deadline scheduler, the workers'
//! queue, table maintenance, the retention purge, the replica heartbeat and the step
//! announcer, sharing one store and one set of metrics.
//!
//! Shutdown order: stop the sources of commands (listener, poller, scheduler) and
//! maintenance, then let the processor finish what it holds within its grace period.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::EngineHandles;
use crate::cluster::{Fleet, ReplicaState};
use crate::config::TaskerConfig;
use crate::dispatch::announce::StepAnnouncer;
use crate::dispatch::deadlines::DeadlinePoke;
use crate::dispatch::enqueue::TaskClaimStepEnqueuer;
use crate::dispatch::parked::ParkedFetches;
use crate::dispatch::worker::WorkerQueue;
use crate::model::namespaces::NamespaceSelector;
use crate::readiness::commands::{CommandProcessor, CommandProcessorHandle, ProcessorTask};
use crate::readiness::mode::DeploymentModeController;
use crate::readiness::poller::SweepRequester;
use crate::readiness::task_changes::TaskWatches;
use crate::readiness::{ListenerState, ListenerStatus, TaskReadinessEventSystem};
use crate::store::maintenance::TableMaintenance;
use crate::store::retention::PurgeTotals;
use crate::store::{Store, StoreLimits};
use crate::telemetry::metrics::Metrics;

use super::lane_gauges::LaneGauges;
use super::retention::RetentionPurger;

pub struct Engine {
    pub store: Store,
    pub commands: CommandProcessorHandle,
    pub mode_controller: std::sync::Arc<DeploymentModeController>,
    pub workers: WorkerQueue,
    pub metrics: Metrics,
    processor: ProcessorTask,
    /// This replica in the registry.
    pub fleet: Fleet,
    /// The tasks WatchTask streams follow, woken by the event system.
    pub watches: TaskWatches,
    /// Stops table maintenance, the replica heartbeat and the following of the fleet's mode.
    maintenance: (CancellationToken, Vec<tokio::task::JoinHandle<()>>),
    /// Kept alive so the observable gauges keep reporting.
    _gauges: Vec<opentelemetry::metrics::ObservableGauge<u64>>,
    /// The gauges per queue, read from the database when metrics are collected.
    pub lane_gauges: LaneGauges,
    /// What this replica's retention purge removed.
    pub purge_totals: PurgeTotals,
}

impl Engine {
    /// What the API serves from.
    pub fn handles(&self) -> EngineHandles {
        EngineHandles {
            store: self.store.clone(),
            commands: self.commands.clone(),
            mode_controller: self.mode_controller.clone(),
            workers: self.workers.clone(),
            fleet: self.fleet.clone(),
            watches: self.watches.clone(),
            metrics: self.metrics.clone(),
            purge_totals: self.purge_totals.clone(),
        }
    }

    /// Start everything. The store must be migrated.
    pub fn start(store: Store, config: &TaskerConfig, metrics: Metrics) -> Self {
        let store = store.with_limits(StoreLimits {
            max_namespaces: Some(config.database.max_namespaces),
            no_namespaces_on_first_use: !config.database.create_namespaces_on_first_use,
            max_parent_results_bytes: Some(
                u32::try_from(config.orchestration.workers.max_parent_results_bytes)
                    .unwrap_or(u32::MAX),
            ),
        });
        let handoff = ParkedFetches::new();
        // the id the store's connections announce, so that this replica claims first what its
        // own transactions made ready
        let fleet = store.replica_id().map_or_else(Fleet::new, Fleet::with_id);
        let announcer =
            StepAnnouncer::new(config.orchestration.replicas.announce_grace, fleet.clone());
        let enqueuer = TaskClaimStepEnqueuer::new(
            store.clone(),
            handoff.clone(),
            announcer.clone(),
            metrics.clone(),
        );
        let sweeps = SweepRequester::new();
        let claim_sweeps = sweeps.clone();
        let (commands, processor) = CommandProcessor::spawn(
            &config.orchestration.command_processor,
            enqueuer.clone(),
            sweeps.clone(),
            metrics.clone(),
        );
        let poke = DeadlinePoke::default();
        let watches = TaskWatches::new();
        let mode_controller = std::sync::Arc::new(DeploymentModeController::start(
            store.clone(),
            config,
            commands.clone(),
            metrics.clone(),
            poke.clone(),
            sweeps.clone(),
            TaskReadinessEventSystem::new(
                commands.clone(),
                sweeps,
                handoff.clone(),
                fleet.clone(),
                watches.clone(),
                poke.clone(),
                metrics.clone(),
            ),
        ));
        let workers = WorkerQueue::new(
            store.clone(),
            handoff,
            announcer.clone(),
            poke,
            enqueuer,
            &config.orchestration,
        );
        let stop_maintenance = CancellationToken::new();
        let maintenance = tokio::spawn(
            TableMaintenance::new(store.clone())
                .run(stop_maintenance.clone())
                .instrument(tracing::info_span!("table_maintenance")),
        );
        let heartbeat = tokio::spawn(
            fleet
                .clone()
                .heartbeat(
                    store.clone(),
                    config.orchestration.replicas.clone(),
                    config.grpc.bind.to_string(),
                    ReplicaState {
                        serves_every_namespace: config
                            .orchestration
                            .task_readiness
                            .namespaces
                            .is_empty(),
                        mode: mode_controller.mode_changes(),
                        listening: listening_flag(
                            mode_controller.listener_status(),
                            stop_maintenance.clone(),
                        ),
                    },
                    move || claim_sweeps.request(),
                    stop_maintenance.clone(),
                )
                .instrument(tracing::info_span!("replica_heartbeat")),
        );
        let announcements = tokio::spawn(
            announcer
                .run(store.clone(), stop_maintenance.clone())
                .instrument(tracing::info_span!("step_announcer")),
        );
        let follow = {
            let (mode_controller, heard, stop) = (
                mode_controller.clone(),
                fleet.fleet_mode(),
                stop_maintenance.clone(),
            );
            tokio::spawn(async move { mode_controller.follow_fleet_mode(heard, stop).await })
        };
        let purge_totals = PurgeTotals::default();
        let purger = tokio::spawn(
            RetentionPurger::new(
                store.clone(),
                config.orchestration.retention.clone(),
                NamespaceSelector::from_config(&config.orchestration.task_readiness.namespaces)
                    .patterns()
                    .map(<[String]>::to_vec),
                commands.clone(),
                metrics.clone(),
                purge_totals.clone(),
            )
            .run(stop_maintenance.clone())
            .instrument(tracing::info_span!("retention_purger")),
        );
        let (lane_gauges, lane_reader) =
            LaneGauges::start(metrics.meter(), store.clone(), stop_maintenance.clone());
        let depth = commands.clone();
        let in_flight = commands.clone();
        let (pool_size, pool_idle) = (store.pool().clone(), store.pool().clone());
        let gauges = vec![
            metrics
                .meter()
                .u64_observable_gauge("command_queue_depth")
                .with_description("Commands queued and not yet picked up by the processor")
                .with_unit("{command}")
                .with_callback(move |o| o.observe(depth.queue_depth() as u64, &[]))
                .build(),
            metrics
                .meter()
                .u64_observable_gauge("commands_in_flight")
                .with_description("Claim-and-enqueue passes running")
                .with_unit("{command}")
                .with_callback(move |o| o.observe(in_flight.stats().in_flight(), &[]))
                .build(),
            metrics
                .meter()
                .u64_observable_gauge("db.pool.connections")
                .with_description("Connections open in the database pool")
                .with_unit("{connection}")
                .with_callback(move |o| o.observe(u64::from(pool_size.size()), &[]))
                .build(),
            metrics
                .meter()
                .u64_observable_gauge("db.pool.idle")
                .with_description("Idle connections in the database pool (open minus in use)")
                .with_unit("{connection}")
                .with_callback(move |o| o.observe(pool_idle.num_idle() as u64, &[]))
                .build(),
        ];
        Self {
            store,
            commands,
            mode_controller,
            workers,
            metrics,
            processor,
            fleet,
            watches,
            maintenance: (
                stop_maintenance,
                vec![
                    maintenance,
                    heartbeat,
                    announcements,
                    follow,
                    lane_reader,
                    purger,
                ],
            ),
            _gauges: gauges,
            lane_gauges,
            purge_totals,
        }
    }

    /// Whether the systems the mode needs are up (listener listening, when it should be).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.mode_controller.wait_ready(timeout).await
    }

    /// Stop intake, then drain in-flight commands within the grace period. Called after the
    /// gRPC server has drained its requests.
    pub async fn shutdown(self) {
        self.workers.shutdown().await;
        self.mode_controller.stop().await;
        let (stop, tasks) = self.maintenance;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        self.processor.shutdown().await;
    }
}

/// Whether the listener is listening, as a flag that changes only when that does (the
/// registry's `listening`; the status's other fields change more often).
fn listening_flag(
    mut status: watch::Receiver<ListenerStatus>,
    stop: CancellationToken,
) -> watch::Receiver<bool> {
    let is_listening = |s: &ListenerStatus| s.state == ListenerState::Listening;
    let (tx, rx) = watch::channel(is_listening(&status.borrow_and_update()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = status.changed() => if changed.is_err() { return },
            }
            let now = is_listening(&status.borrow_and_update());
            tx.send_if_modified(|l| std::mem::replace(l, now) != now);
        }
    });
    rx
}
