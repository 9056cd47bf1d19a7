//! Readiness: finding the tasks with ready steps and turning each into one command. The
//! database's notifications (the listener and its classifier, the event system), the fallback
//! poller and its catch-up sweeps, the deadline scheduler (retries that fall due, leases that
//! run out), the command processor that runs every command's claim-and-enqueue pass, the
//! deployment-mode controller that decides which of these run, and the task-change wake-ups
//! of WatchTask.
//!
//! - `classifier`: the channels, the event types, `ReadinessEventClassifier`
//! - `listener`: `TaskReadinessListener`, the LISTEN connection
//! - `event_system`: `TaskReadinessEventSystem`, event -> command (and the other events'
//!   wake-ups)
//! - `commands`: `OrchestrationCommand`, the `CommandProcessor` actor, its event log
//! - `poller`: `ReadinessFallbackPoller` and `SweepRequester`
//! - `deadlines`: `DeadlineScheduler`
//! - `mode`: `DeploymentModeController`
//! - `task_changes`: `TaskWatches`

pub mod classifier;
pub mod commands;
pub mod deadlines;
pub mod event_system;
pub mod listener;
pub mod mode;
pub mod poller;
pub mod task_changes;

pub use classifier::{payload_traceparent, ReadinessEventClassifier};
pub use commands::{CommandPhase, OrchestrationCommand, SubmitError};
pub use event_system::TaskReadinessEventSystem;
pub use listener::{ListenerState, ListenerStatus, TaskReadinessListener};
pub use poller::PollerStatus;
