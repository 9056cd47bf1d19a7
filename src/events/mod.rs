//! The event system and its coordinator.
//!
//! - [`TaskReadinessEventSystem`]: turns a `TaskReadyEvent` into an
//!   `OrchestrationCommand::ProcessTaskReadiness` and hands it to the command processor. It
//!   does nothing else: no orchestration happens on the event path.
//! - `coordinator`: [`UnifiedEventCoordinator`], the one owner of the deployment mode, which
//!   runs the listener, the poller and the deadline scheduler accordingly.
//!
//! There is one event system, so there is no `EventDrivenSystem` trait: a trait with a single
//! implementation would only add indirection.

mod coordinator;

use std::time::Instant;

pub use coordinator::{CoordinatorStatus, UnifiedEventCoordinator};

use crate::commands::{CommandProcessorHandle, OrchestrationCommand, SubmitError};
use crate::metrics::Metrics;
use crate::readiness::{SweepRequester, TaskReadyEvent};

#[derive(Clone)]
pub struct TaskReadinessEventSystem {
    commands: CommandProcessorHandle,
    sweeps: SweepRequester,
    metrics: Metrics,
}

impl TaskReadinessEventSystem {
    pub fn new(commands: CommandProcessorHandle, sweeps: SweepRequester, metrics: Metrics) -> Self {
        Self {
            commands,
            sweeps,
            metrics,
        }
    }

    /// The command for an event. The payload's fields describe what prompted it; the handler
    /// re-reads the truth from the database.
    pub fn command_for(event: TaskReadyEvent) -> OrchestrationCommand {
        OrchestrationCommand::ProcessTaskReadiness {
            task_uuid: event.task_uuid,
            namespace: event.namespace,
            priority: event.priority,
            ready_steps: event.ready_steps,
            triggered_by: event.triggered_by,
            step_uuid: event.step_uuid,
            step_state: event.step_state,
            task_state: event.task_state,
        }
    }

    /// Convert and submit without waiting: the listener must keep reading. A full processor
    /// queue refuses the command; a catch-up sweep is requested, which runs with backpressure
    /// once there is room, so the task is not stranded even with no periodic poller.
    pub fn process_task_ready(&self, event: TaskReadyEvent, received: Instant) {
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
