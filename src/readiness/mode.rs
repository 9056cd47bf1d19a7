//! `DeploymentModeController`: the single owner of the deployment mode, and of the systems it
//! governs.
//!
//! It starts the `TaskReadinessListener`, the `ReadinessFallbackPoller` and the
//! `DeadlineScheduler` once, and publishes the mode on a `watch` channel that each of them
//! follows: the listener connects or disconnects, the poller turns its periodic rounds on or
//! off. Changing the mode at run time is therefore one `watch` update: nothing restarts, no
//! command already queued is touched, and a catch-up sweep runs right away so that no task
//! waits for a system that has just been switched on.
//!
//! | mode | listener | periodic poller | catch-up sweeps, deadline scheduler |
//! |---|---|---|---|
//! | EventDrivenOnly | on | off | on |
//! | Hybrid | on | on | on |
//! | PollingOnly | off | on | on |
//!
//! The mode in effect comes from three sources, the first that is set winning: this replica's
//! own override (`SetDeploymentMode`, replica scope), the fleet's mode (`SetDeploymentMode`,
//! fleet scope: stored in the database, heard by notification and heartbeat, so it reaches
//! every replica within a heartbeat and survives restarts), and the configuration
//! (`orchestration.deployment.mode`).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{DeploymentMode, TaskerConfig};
use crate::dispatch::deadlines::DeadlinePoke;
use crate::model::namespaces::NamespaceSelector;
use crate::readiness::commands::CommandProcessorHandle;
use crate::readiness::deadlines::{DeadlineScheduler, StoreDeadlines};
use crate::readiness::poller::SweepRequester;
use crate::readiness::poller::{PollerStatus, ReadinessFallbackPoller};
use crate::readiness::{
    ListenerState, ListenerStatus, TaskReadinessEventSystem, TaskReadinessListener,
};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeControllerStatus {
    pub mode: DeploymentMode,
    pub listener: ListenerStatus,
    pub poller: PollerStatus,
}

/// Where the mode in effect comes from (highest first: replica, fleet, config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeSource {
    Replica,
    Fleet,
    Config,
}

/// Every source of the mode; the effective one is the first set of replica, fleet, config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSources {
    pub config: DeploymentMode,
    pub fleet: Option<DeploymentMode>,
    pub replica: Option<DeploymentMode>,
}

impl ModeSources {
    pub fn effective(&self) -> (DeploymentMode, ModeSource) {
        match (self.replica, self.fleet) {
            (Some(m), _) => (m, ModeSource::Replica),
            (None, Some(m)) => (m, ModeSource::Fleet),
            (None, None) => (self.config, ModeSource::Config),
        }
    }
}

pub struct DeploymentModeController {
    mode: watch::Sender<DeploymentMode>,
    sources: std::sync::Mutex<ModeSources>,
    listener: watch::Receiver<ListenerStatus>,
    poller: watch::Receiver<PollerStatus>,
    sweeps: SweepRequester,
    cancel: CancellationToken,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl DeploymentModeController {
    /// Spawn the listener, the poller and the deadline scheduler, in `config`'s mode.
    pub fn start(
        store: Store,
        config: &TaskerConfig,
        commands: CommandProcessorHandle,
        metrics: Metrics,
        poke: DeadlinePoke,
        sweeps: SweepRequester,
        event_system: TaskReadinessEventSystem,
    ) -> Self {
        let tr = &config.orchestration.task_readiness;
        let selector = NamespaceSelector::from_config(&tr.namespaces);
        let (mode_tx, _) = watch::channel(config.orchestration.deployment.mode);
        let (listener_tx, listener_rx) = watch::channel(ListenerStatus::default());
        let (poller_tx, poller_rx) = watch::channel(PollerStatus::default());
        let cancel = CancellationToken::new();

        let listener = TaskReadinessListener::new(
            store.clone(),
            selector.clone(),
            event_system,
            mode_tx.subscribe(),
            listener_tx,
            sweeps.clone(),
            metrics.clone(),
            tr.listener_max_backoff,
            tr.listener_ping_interval,
        );
        let poller = ReadinessFallbackPoller::new(
            store.clone(),
            commands.clone(),
            selector.clone(),
            tr,
            mode_tx.subscribe(),
            sweeps.clone(),
            poller_tx,
            metrics.clone(),
        );
        let deadlines = DeadlineScheduler::new(
            StoreDeadlines {
                store,
                misfire_grace: config.orchestration.scheduling.misfire_grace,
            },
            commands,
            selector,
            tr.fallback_polling_interval,
            poke,
            metrics,
        );
        let tasks = vec![
            tokio::spawn(
                listener
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("readiness_listener")),
            ),
            tokio::spawn(
                poller
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("fallback_poller")),
            ),
            tokio::spawn(
                deadlines
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("deadline_scheduler")),
            ),
        ];
        // Start-up sweep: whatever was ready before this instance started (including commands
        // a crashed instance never finished) is processed now, in every mode.
        sweeps.request();
        tracing::info!(mode = %config.orchestration.deployment.mode, "deployment-mode controller started");
        Self {
            mode: mode_tx,
            sources: std::sync::Mutex::new(ModeSources {
                config: config.orchestration.deployment.mode,
                fleet: None,
                replica: None,
            }),
            listener: listener_rx,
            poller: poller_rx,
            sweeps,
            cancel,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    pub fn mode(&self) -> DeploymentMode {
        *self.mode.borrow()
    }

    /// The mode in effect, changes included.
    pub fn mode_changes(&self) -> watch::Receiver<DeploymentMode> {
        self.mode.subscribe()
    }

    /// This replica's own mode, over the fleet's and the configuration's; in effect at once.
    /// Returns the mode in effect before.
    pub fn set_mode(&self, mode: DeploymentMode) -> DeploymentMode {
        self.change_sources(|s| s.replica = Some(mode))
    }

    /// Drop this replica's own mode: the fleet's or the configuration's applies again.
    pub fn clear_replica_mode(&self) -> DeploymentMode {
        self.change_sources(|s| s.replica = None)
    }

    /// The fleet's mode as heard (`None`: none set).
    pub fn set_fleet_mode(&self, mode: Option<DeploymentMode>) -> DeploymentMode {
        self.change_sources(|s| s.fleet = mode)
    }

    pub fn mode_sources(&self) -> ModeSources {
        *self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode_source(&self) -> ModeSource {
        self.mode_sources().effective().1
    }

    fn change_sources(&self, change: impl FnOnce(&mut ModeSources)) -> DeploymentMode {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut sources);
        let (mode, source) = sources.effective();
        let previous = self.mode.send_replace(mode);
        if previous != mode {
            tracing::info!(from = %previous, to = %mode, source = ?source, "deployment mode changed");
            self.sweeps.request();
        }
        previous
    }

    /// Apply the fleet's mode as this replica hears it, until `stop`.
    pub async fn follow_fleet_mode(
        &self,
        mut fleet_mode: watch::Receiver<Option<DeploymentMode>>,
        stop: CancellationToken,
    ) {
        loop {
            let heard = *fleet_mode.borrow_and_update();
            self.set_fleet_mode(heard);
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = fleet_mode.changed() => if changed.is_err() { return },
            }
        }
    }

    pub fn status(&self) -> ModeControllerStatus {
        ModeControllerStatus {
            mode: self.mode(),
            listener: self.listener.borrow().clone(),
            poller: self.poller.borrow().clone(),
        }
    }

    pub fn listener_status(&self) -> watch::Receiver<ListenerStatus> {
        self.listener.clone()
    }

    pub fn poller_status(&self) -> watch::Receiver<PollerStatus> {
        self.poller.clone()
    }

    pub fn request_catch_up(&self) {
        self.sweeps.request();
    }

    /// Resolves once the systems the mode needs are up: the listener is listening whenever
    /// the mode listens. Owns its receivers, so it can be spawned.
    pub fn ready_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut mode = self.mode.subscribe();
        let mut listener = self.listener.clone();
        async move {
            loop {
                let listens = mode.borrow_and_update().listens();
                if !listens || listener.borrow_and_update().state == ListenerState::Listening {
                    return;
                }
                tokio::select! {
                    r = mode.changed() => if r.is_err() { return },
                    r = listener.changed() => if r.is_err() { return },
                }
            }
        }
    }

    /// Whether the systems the mode needs came up within `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.ready_signal())
            .await
            .is_ok()
    }

    /// Stop the listener, the poller and the scheduler (no new commands from them).
    pub async fn stop(&self) {
        self.cancel.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}
