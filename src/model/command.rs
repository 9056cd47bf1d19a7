//! The words every layer speaks: where a readiness command came from ([`TriggeredBy`]) and
//! what one claim-and-enqueue pass achieved ([`EnqueueOutcome`]).
//!
//! They live here, below everything else, so that the store, the enqueuer, the command
//! processor, the event system and the gRPC layer can share them without importing each
//! other. Both are parsed strictly: a value the database or a notification sends that is not
//! listed here is an error naming it, never a silent default.

use serde::{Deserialize, Serialize};

/// Where a command came from. Every source produces the same command and goes through the same
/// handler; only this label differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggeredBy {
    /// A step transition made steps ready (database -> NOTIFY).
    StepTransition,
    /// A task was created with ready root steps (database -> NOTIFY).
    TaskStart,
    /// The periodic fallback poller found the task ready for longer than the age threshold.
    FallbackPolling,
    /// Injected through the gRPC API.
    Api,
    /// A sweep after the listener (re)connected, the mode changed, or commands were refused.
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

/// What one claim-and-enqueue pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnqueueOutcome {
    /// Ready steps were moved to the queue.
    Enqueued,
    /// The claim succeeded but no step was ready (another pass got there first, or nothing is).
    NothingReady,
    /// Another instance holds the task's claim right now.
    ClaimedElsewhere,
    /// The task is complete, failed or cancelled.
    TaskNotActive,
    TaskNotFound,
}

impl EnqueueOutcome {
    pub const ALL: [EnqueueOutcome; 5] = [
        Self::Enqueued,
        Self::NothingReady,
        Self::ClaimedElsewhere,
        Self::TaskNotActive,
        Self::TaskNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueued => "enqueued",
            Self::NothingReady => "nothing_ready",
            Self::ClaimedElsewhere => "claimed_elsewhere",
            Self::TaskNotActive => "task_not_active",
            Self::TaskNotFound => "task_not_found",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_and_nothing_else_parses() {
        for t in TriggeredBy::ALL {
            assert_eq!(TriggeredBy::parse(t.as_str()), Some(t));
        }
        for o in EnqueueOutcome::ALL {
            assert_eq!(EnqueueOutcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(TriggeredBy::parse("Api"), None);
        assert_eq!(EnqueueOutcome::parse("enqueued "), None);
    }
}
