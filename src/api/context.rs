//! What every service handler shares: the store, the engine's handles, limits and uptime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cluster::Fleet;
use crate::config::TaskerConfig;
use crate::dispatch::worker::WorkerQueue;
use crate::readiness::commands::CommandProcessorHandle;
use crate::readiness::mode::DeploymentModeController;
use crate::readiness::task_changes::TaskWatches;
use crate::store::retention::{PurgeTotals, RetentionDefaults};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// The running engine's parts the API serves from. The composition root (`app::Engine`)
/// hands them over, so the API depends on the subsystems and not on their assembly.
#[derive(Clone)]
pub struct EngineHandles {
    pub store: Store,
    pub commands: CommandProcessorHandle,
    pub mode_controller: Arc<DeploymentModeController>,
    pub workers: WorkerQueue,
    pub fleet: Fleet,
    pub watches: TaskWatches,
    pub metrics: Metrics,
    /// What this replica's retention purge removed.
    pub purge_totals: PurgeTotals,
}

#[derive(Clone)]
pub struct ApiContext {
    pub store: Store,
    pub commands: CommandProcessorHandle,
    pub mode_controller: Arc<DeploymentModeController>,
    pub workers: WorkerQueue,
    pub fleet: Fleet,
    pub watches: TaskWatches,
    pub metrics: Metrics,
    pub purge_totals: PurgeTotals,
    /// The fleet's retention periods as this replica has them (`orchestration.retention`).
    pub retention_defaults: RetentionDefaults,
    /// This replica purges (`orchestration.retention.purge`).
    pub purging: bool,
    /// The feeds of the tasks WatchTask streams follow, and the streams' places.
    pub feeds: super::task_watch::TaskFeeds,
    /// A replica silent this long is not listed (`orchestration.replicas.gone_after_ms`).
    pub replica_gone_after: Duration,
    pub max_fetch_wait: Duration,
    /// How far ahead a task may start (`orchestration.scheduling.max_start_delay_days`).
    pub max_start_delay: Duration,
    /// The largest response the server encodes (`grpc.max_response_bytes`).
    pub max_response_bytes: usize,
    pub started: Instant,
    /// Cancelled when shutdown begins: streams end and long-polls return, so that the
    /// server's graceful shutdown is not held open by observers that never hang up.
    draining: CancellationToken,
}

impl ApiContext {
    pub fn new(engine: EngineHandles, config: &TaskerConfig) -> Self {
        Self {
            store: engine.store,
            commands: engine.commands,
            mode_controller: engine.mode_controller,
            workers: engine.workers,
            fleet: engine.fleet,
            watches: engine.watches,
            metrics: engine.metrics,
            purge_totals: engine.purge_totals,
            retention_defaults: config.orchestration.retention.defaults(),
            purging: config.orchestration.retention.purge,
            feeds: super::task_watch::TaskFeeds::new(
                config.grpc.max_watch_streams,
                config.grpc.max_watch_streams_per_caller,
            ),
            replica_gone_after: config.orchestration.replicas.gone_after,
            max_fetch_wait: config.grpc.max_fetch_wait,
            max_start_delay: config.orchestration.scheduling.max_start_delay(),
            max_response_bytes: config.grpc.max_response_bytes,
            started: Instant::now(),
            draining: CancellationToken::new(),
        }
    }

    pub fn set_draining(&self) {
        self.draining.cancel();
    }

    pub fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when shutdown begins.
    pub fn drained(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.draining.clone().cancelled_owned()
    }
}
