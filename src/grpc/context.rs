//! What every service handler shares: the store, the core's handles, limits and uptime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::commands::CommandProcessorHandle;
use crate::config::TaskerConfig;
use crate::core::OrchestrationCore;
use crate::events::UnifiedEventCoordinator;
use crate::store::Store;
use crate::worker::WorkerQueue;

#[derive(Clone)]
pub struct ApiContext {
    pub store: Store,
    pub commands: CommandProcessorHandle,
    pub coordinator: Arc<UnifiedEventCoordinator>,
    pub workers: WorkerQueue,
    pub max_fetch_wait: Duration,
    pub started: Instant,
    draining: Arc<AtomicBool>,
}

impl ApiContext {
    pub fn new(core: &OrchestrationCore, config: &TaskerConfig) -> Self {
        Self {
            store: core.store.clone(),
            commands: core.commands.clone(),
            coordinator: core.coordinator.clone(),
            workers: core.workers.clone(),
            max_fetch_wait: Duration::from_millis(config.grpc.max_fetch_wait_ms as u64),
            started: Instant::now(),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
