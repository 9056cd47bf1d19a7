//! The event system: the one path from a database notification to a command.
//!
//! ```text
//!  PostgreSQL NOTIFY ──> TaskReadinessListener ──> ReadinessEventClassifier ──> TaskReadinessEvent
//!                        (listener)                (notifications)
//!        TaskReadyEvent ──> TaskReadinessEventSystem ──> OrchestrationCommand::ProcessTaskReadiness
//!                                                        ──> CommandProcessor
//!    StepsEnqueuedEvent ──> TaskReadinessEventSystem ──> wake-up of the fetches parked here
//!  TaskStateChangeEvent ──> TaskReadinessEventSystem ──> wake-up of the task's WatchTask streams
//!        FleetModeEvent ──> TaskReadinessEventSystem ──> the fleet's mode, for the mode controller
//! ```
//!
//! - `notifications`: the channels, the event types and their classifier;
//! - `listener`: [`TaskReadinessListener`], the LISTEN connection (reconnects, catch-up
//!   requests), which hands every classified event to the event system below;
//! - [`TaskReadinessEventSystem`]: turns a `TaskReadyEvent` into a command and hands it to the
//!   command processor; passes on the other replicas' wake-ups (to the parked fetches) and the
//!   fleet's mode (to the mode controller). No orchestration happens on the event path.
//!
//! There is one event system, so there is no `EventDrivenSystem` trait: a trait with a single
//! implementation would only add indirection. Which of these run is decided by the
//! `DeploymentModeController` (`mode`), per deployment mode.

use std::time::Instant;

use super::classifier::{
    DeadlineEvent, FleetModeEvent, StepsEnqueuedEvent, TaskReadyEvent, TaskStateChangeEvent,
};

use crate::cluster::Fleet;
use crate::dispatch::deadlines::DeadlinePoke;
use crate::dispatch::parked::ParkedFetches;
use crate::readiness::commands::{CommandProcessorHandle, OrchestrationCommand, SubmitError};
use crate::readiness::poller::SweepRequester;
use crate::readiness::task_changes::TaskWatches;
use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct TaskReadinessEventSystem {
    commands: CommandProcessorHandle,
    sweeps: SweepRequester,
    handoff: ParkedFetches,
    fleet: Fleet,
    watches: TaskWatches,
    deadlines: DeadlinePoke,
    metrics: Metrics,
}

impl TaskReadinessEventSystem {
    pub fn new(
        commands: CommandProcessorHandle,
        sweeps: SweepRequester,
        handoff: ParkedFetches,
        fleet: Fleet,
        watches: TaskWatches,
        deadlines: DeadlinePoke,
        metrics: Metrics,
    ) -> Self {
        Self {
            commands,
            sweeps,
            handoff,
            fleet,
            watches,
            deadlines,
            metrics,
        }
    }

    /// A deadline was made on some replica: the deadline scheduler here wakes for it if it
    /// planned to sleep past it.
    pub fn deadline_announced(&self, event: DeadlineEvent) {
        self.deadlines.deadline_at(event.at);
    }

    /// A task changed state: its `WatchTask` streams read what changed.
    pub fn task_state_changed(&self, event: TaskStateChangeEvent) {
        self.watches.changed(event.task_uuid);
    }

    /// The fleet's deployment mode changed: the mode controller applies it (below this
    /// replica's own override), as it would from the next heartbeat.
    pub fn fleet_mode(&self, event: FleetModeEvent) {
        self.fleet.heard_fleet_mode(event.mode);
    }

    /// Another replica enqueued steps no fetch parked there took, or the database let some
    /// through: wake as many fetches parked here for that queue (they read it; one that
    /// finds nothing parks again).
    pub fn steps_enqueued(&self, event: StepsEnqueuedEvent) {
        if event.replica.is_none_or(|r| self.fleet.is_other(r)) {
            self.handoff.queued(
                &event.namespace,
                event.queue.as_deref(),
                event.steps as usize,
            );
        }
    }

    /// The command for an event: the task and where the event came from. The handler re-reads
    /// the truth from the database.
    pub fn command_for(event: TaskReadyEvent) -> OrchestrationCommand {
        OrchestrationCommand::process_task(event.task_uuid, event.namespace, event.triggered_by)
    }

    /// Convert and submit without waiting: the listener must keep reading. An event whose
    /// task another listening replica claims first is left to it (`cluster`: the claim split).
    /// A full processor queue refuses the command; a catch-up sweep is requested, which runs
    /// with backpressure once there is room, so the task is not stranded even with no
    /// periodic poller.
    pub fn process_task_ready(&self, event: TaskReadyEvent, received: Instant) {
        // steps of it became ready: a change its watchers see, whoever claims it
        self.watches.changed(event.task_uuid);
        if !self.fleet.claims_first(event.task_uuid, event.replica) {
            return;
        }
        let triggered_by = event.triggered_by;
        match self.commands.try_submit(Self::command_for(event)) {
            Ok(_) => {
                self.metrics.command_sent(triggered_by.as_str());
                self.metrics
                    .readiness_latency(received.elapsed().as_secs_f64() * 1000.0);
            }
            Err(SubmitError::Overloaded) => {
                tracing::warn!(
                    "command processor saturated; event dropped, catch-up sweep requested"
                );
                self.sweeps.request();
            }
            Err(SubmitError::ShuttingDown) => {}
        }
    }
}
