//! Orchestration commands: what every trigger source (notifications, the fallback poller,
//! catch-up sweeps, the retry timer, the API) sends, and the lifecycle events the processor
//! publishes for observers.
//!
//! Layout: this file holds the types; `processor` holds the [`CommandProcessor`] actor.

mod processor;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::store::EnqueueOutcome;

pub use processor::{CommandProcessor, CommandProcessorHandle, ProcessorStats, SubmitError};

/// The running actor's handle for shutdown.
pub mod processor_task {
    pub use super::processor::ProcessorTask;
}

/// Where a command came from. Every source produces the same command and goes through the same
/// handler; only this label differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggeredBy {
    /// A step transition made steps ready (database trigger -> NOTIFY).
    StepTransition,
    /// A task was created with ready root steps (database trigger -> NOTIFY).
    TaskStart,
    /// The periodic fallback poller found the task ready for longer than the age threshold.
    FallbackPolling,
    /// Injected through the gRPC API.
    Api,
    /// A sweep after the listener (re)connected, or after commands were refused.
    CatchUp,
    /// A retry backoff elapsed or a lease expired.
    RetryTimer,
}

impl TriggeredBy {
    pub const ALL: [TriggeredBy; 6] = [
        Self::StepTransition,
        Self::TaskStart,
        Self::FallbackPolling,
        Self::Api,
        Self::CatchUp,
        Self::RetryTimer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StepTransition => "step_transition",
            Self::TaskStart => "task_start",
            Self::FallbackPolling => "fallback_polling",
            Self::Api => "api",
            Self::CatchUp => "catch_up",
            Self::RetryTimer => "retry_timer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for TriggeredBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The commands the processor understands.
#[derive(Debug, Clone, PartialEq)]
pub enum OrchestrationCommand {
    /// Claim the task and enqueue its ready steps. The other fields describe what prompted the
    /// command (they come from the notification payload); the handler re-reads the truth from
    /// the database and does not trust them.
    ProcessTaskReadiness {
        task_uuid: Uuid,
        namespace: String,
        priority: i32,
        ready_steps: i32,
        triggered_by: TriggeredBy,
        step_uuid: Option<Uuid>,
        step_state: Option<String>,
        task_state: Option<String>,
    },
}

impl OrchestrationCommand {
    /// A ProcessTaskReadiness with only the task known (poller, sweeps, timers, API).
    pub fn process_task(
        task_uuid: Uuid,
        namespace: impl Into<String>,
        priority: i32,
        ready_steps: i32,
        triggered_by: TriggeredBy,
    ) -> Self {
        Self::ProcessTaskReadiness {
            task_uuid,
            namespace: namespace.into(),
            priority,
            ready_steps,
            triggered_by,
            step_uuid: None,
            step_state: None,
            task_state: None,
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
    /// The pass failed (database unavailable, ...); the task stays ready for the poller.
    Failed(String),
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

/// A phase of a command's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandPhase {
    Received,
    Started,
    Completed,
    Failed,
    /// Folded into a pass of the same task that is in flight; that task gets one more pass.
    Coalesced,
    /// Refused at the door: the processor was saturated or stopping.
    Rejected,
}

impl CommandPhase {
    pub const ALL: [CommandPhase; 6] = [
        Self::Received,
        Self::Started,
        Self::Completed,
        Self::Failed,
        Self::Coalesced,
        Self::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Coalesced => "coalesced",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
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
    /// Since the command was received.
    pub duration: Duration,
    pub timestamp: DateTime<Utc>,
    pub error: Option<String>,
}
