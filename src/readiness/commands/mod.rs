//! Orchestration commands: what every trigger source (notifications, the fallback poller,
//! catch-up sweeps, the retry timer, the API) sends, and the lifecycle events the processor
//! publishes for observers.
//!
//! Layout: this file holds the types; `processor` holds the [`CommandProcessor`] actor, which
//! runs each pass through the `TaskClaimStepEnqueuer` (`crate::dispatch::enqueue`); `event_log` numbers
//! the lifecycle events and keeps the latest for observers that reconnect.

mod event_log;
mod processor;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::model::command::{EnqueueOutcome, TriggeredBy};
use crate::model::states::text_enum;

pub use event_log::{CommandEventLog, Gap, Resumed};
#[cfg(test)]
pub(crate) use processor::PassRunner;
pub use processor::{CommandProcessor, CommandProcessorHandle, ProcessorTask, SubmitError};

/// The commands the processor understands.
#[derive(Debug, Clone, PartialEq)]
pub enum OrchestrationCommand {
    /// Claim the task and enqueue its ready steps. The handler reads what is ready from the
    /// database; `namespace` and `triggered_by` label the command for observers and traces.
    ProcessTaskReadiness {
        task_uuid: Uuid,
        namespace: String,
        triggered_by: TriggeredBy,
    },
}

impl OrchestrationCommand {
    pub fn process_task(
        task_uuid: Uuid,
        namespace: impl Into<String>,
        triggered_by: TriggeredBy,
    ) -> Self {
        Self::ProcessTaskReadiness {
            task_uuid,
            namespace: namespace.into(),
            triggered_by,
        }
    }

    pub fn task_uuid(&self) -> Uuid {
        match self {
            Self::ProcessTaskReadiness { task_uuid, .. } => *task_uuid,
        }
    }

    pub fn namespace(&self) -> &str {
        match self {
            Self::ProcessTaskReadiness { namespace, .. } => namespace,
        }
    }

    pub fn triggered_by(&self) -> TriggeredBy {
        match self {
            Self::ProcessTaskReadiness { triggered_by, .. } => *triggered_by,
        }
    }
}

/// What a command achieved: the outcome of its claim-and-enqueue pass, or a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// The pass ran. `ClaimedElsewhere` here means another instance held the task's claim
    /// through every retry; it (or the poller) will handle the task.
    Finished(EnqueueOutcome),
    /// The pass failed (database unavailable, ...); the task stays ready and is swept again.
    Failed(CommandFailure),
}

/// Why a pass failed, in words safe to show any observer: a class and a fixed message, never
/// the database's own text (that is logged with the command id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandFailure {
    /// The database could not be reached, or kept refusing (deadlocks, serialization) through
    /// every retry.
    DatabaseUnavailable,
    /// Any other database error: a bug or an operator's change to the schema.
    Internal,
}

impl CommandFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DatabaseUnavailable => "database_unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::DatabaseUnavailable => {
                "the database was unavailable; the task stays ready and will be swept again"
            }
            Self::Internal => {
                "internal error (logged with this command id); the task stays ready and will be swept again"
            }
        }
    }
}

impl CommandOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Finished(o) => o.as_str(),
            Self::Failed(_) => "failed",
        }
    }
}

/// The reply to a caller that waits for its command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResult {
    pub command_id: Uuid,
    pub outcome: CommandOutcome,
    pub enqueued_steps: Vec<Uuid>,
    /// true when this command was folded into another pass of the same task.
    pub coalesced: bool,
}

text_enum! {
    /// A phase of a command's life.
    pub enum CommandPhase {
        Received = "received",
        Started = "started",
        Completed = "completed",
        Failed = "failed",
        /// Folded into a pass of the same task that is in flight; that task gets one more pass.
        Coalesced = "coalesced",
        /// Refused at the door: the processor was saturated or stopping.
        Rejected = "rejected",
    }
}

/// One lifecycle event, broadcast to observers (the gRPC event stream).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandEvent {
    pub command_id: Uuid,
    pub task_uuid: Uuid,
    pub namespace: String,
    pub triggered_by: TriggeredBy,
    pub phase: CommandPhase,
    /// For completed / failed / coalesced.
    pub outcome: Option<String>,
    pub steps_enqueued: u32,
    /// Of them, steps left waiting on their queue's pause or in-flight limit.
    pub steps_held: u32,
    /// Since the command was received.
    pub duration: Duration,
    pub timestamp: DateTime<Utc>,
    /// For failed: why, safe to show. For rejected: the reason (overloaded, shutting_down).
    pub error: Option<String>,
    /// Its number in this process's event log (see `event_log`); set when published.
    pub sequence: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;
    use crate::proto::words::tests::round_trips;

    /// The words a command's life is reported in (its source, phases and outcomes) each have a
    /// value in the API's enums.
    #[test]
    fn every_command_word_has_a_proto_value() {
        let words = |it: &mut dyn Iterator<Item = &'static str>| -> Vec<String> {
            it.map(String::from).collect()
        };
        round_trips::<v1::TriggeredBy>(&words(&mut TriggeredBy::ALL.iter().map(|t| t.as_str())));
        let mut phases = words(&mut CommandPhase::ALL.iter().map(|p| p.as_str()));
        phases.push("gap".into());
        round_trips::<v1::CommandPhase>(&phases);
        let mut outcomes = words(&mut EnqueueOutcome::ALL.iter().map(|o| o.as_str()));
        outcomes.push("failed".into());
        round_trips::<v1::CommandOutcome>(&outcomes);
        round_trips::<v1::FailStepOutcome>(&["retry_scheduled".into(), "failed".into()]);
    }
}
