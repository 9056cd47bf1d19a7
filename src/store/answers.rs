//! The answer words of the SQL functions that report what they did as a word rather than an
//! error (so that a refusal is an answer the caller handles, not an aborted transaction),
//! typed: a word this build does not know fails the row's decoding, naming it.

use crate::model::states::text_enum;

text_enum! {
    /// What `tasker.complete_step(s)`, `tasker.fail_step` and `tasker.extend_lease` answer
    /// about one attempt.
    pub enum AttemptAnswer {
        Completed = "completed",
        Extended = "extended",
        RetryScheduled = "retry_scheduled",
        Failed = "failed",
        StepNotFound = "step_not_found",
        StaleAttempt = "stale_attempt",
        NotInProgress = "not_in_progress",
        TaskCancelled = "task_cancelled",
        LeaseExpired = "lease_expired",
        LeaseNotHeld = "lease_not_held",
        TimedOut = "timed_out",
        ParentResultsTooLarge = "parent_results_too_large",
    }
}

text_enum! {
    /// What `tasker.cancel_task` answers.
    pub enum CancelAnswer {
        Cancelled = "cancelled",
        TaskNotFound = "task_not_found",
        TaskAlreadyFinal = "task_already_final",
    }
}

text_enum! {
    /// What `tasker.resolve_step_manually` answers.
    pub enum ResolveAnswer {
        Resolved = "resolved",
        ParentResultsTooLarge = "parent_results_too_large",
        StepNotFound = "step_not_found",
        IllegalTransition = "illegal_transition",
    }
}

text_enum! {
    /// What `tasker.retry_task` answers.
    pub enum RetryAnswer {
        Retried = "retried",
        TaskNotFound = "task_not_found",
        TaskNotInError = "task_not_in_error",
        AttemptsExhausted = "attempts_exhausted",
    }
}

text_enum! {
    /// What `tasker.create_namespace` and `tasker.delete_namespace` answer.
    pub enum NamespaceAnswer {
        Created = "created",
        Exists = "exists",
        Deleted = "deleted",
        NotFound = "not_found",
        NotEmpty = "not_empty",
    }
}
