//! The words every layer speaks: where a readiness command came from ([`TriggeredBy`]) and
//! what one claim-and-enqueue pass achieved ([`EnqueueOutcome`]).
//!
//! They live here, below everything else, so that the store, the enqueuer, the command
//! processor, the event system and the gRPC layer can share them without importing each
//! other. Both are parsed strictly: a value the database or a notification sends that is not
//! listed here is an error naming it, never a silent default.

use super::states::text_enum;

text_enum! {
    /// Where a command came from. Every source produces the same command and goes through the
    /// same handler; only this label differs.
    pub enum TriggeredBy {
        /// A step transition made steps ready (database -> NOTIFY).
        StepTransition = "step_transition",
        /// A task was created with ready root steps (database -> NOTIFY).
        TaskStart = "task_start",
        /// The periodic fallback poller found the task ready for longer than the age threshold.
        FallbackPolling = "fallback_polling",
        /// Injected through the gRPC API.
        Api = "api",
        /// A sweep after the listener (re)connected, the mode changed, or commands were refused.
        CatchUp = "catch_up",
        /// A retry backoff elapsed or a lease expired.
        RetryTimer = "retry_timer",
        /// A worker's completion asked for its next steps (`CompleteStepRequest.next`): the
        /// completion's own transaction claimed the task and enqueued what it made ready.
        EagerDispatch = "eager_dispatch",
    }
}

text_enum! {
    /// What one claim-and-enqueue pass did (`tasker.claim_and_enqueue`'s answer).
    pub enum EnqueueOutcome {
        /// Ready steps were moved to the queue.
        Enqueued = "enqueued",
        /// The claim succeeded but no step was ready (another pass got there first, or nothing
        /// is).
        NothingReady = "nothing_ready",
        /// Another instance holds the task's claim right now.
        ClaimedElsewhere = "claimed_elsewhere",
        /// The task is complete, failed or cancelled.
        TaskNotActive = "task_not_active",
        TaskNotFound = "task_not_found",
        /// The task waits for a slot of its concurrency key.
        WaitingOnKey = "waiting_on_key",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_and_nothing_else_parses() {
        for t in TriggeredBy::ALL {
            assert_eq!(t.as_str().parse::<TriggeredBy>(), Ok(*t));
        }
        for o in EnqueueOutcome::ALL {
            assert_eq!(o.as_str().parse::<EnqueueOutcome>(), Ok(*o));
        }
        assert!("Api".parse::<TriggeredBy>().is_err());
        assert!("enqueued ".parse::<EnqueueOutcome>().is_err());
    }
}
