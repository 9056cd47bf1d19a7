//! Declared retry policies: the backoff between a step's attempts when the worker's FailStep
//! names none, and when its lease runs out. The rules are checked here, before anything is
//! written; the backoff itself is computed where the failure is recorded, in the database
//! (`tasker.policy_backoff_ms`), from the policy stored with the step.

use serde::{Deserialize, Serialize};

/// The longest backoff a worker or a policy may ask for: one day.
pub const MAX_BACKOFF_MS: i64 = 24 * 3600 * 1000;
/// The fastest growth a policy may declare per attempt.
pub const MAX_MULTIPLIER: f64 = 100.0;

/// A retry policy as the database stores it (`workflow_steps.retry_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The first retry's backoff, in milliseconds.
    pub initial_ms: i64,
    /// How much each further attempt's backoff grows; 1: the same every time.
    pub multiplier: f64,
    /// The most a backoff grows to, in milliseconds.
    pub max_ms: i64,
    /// The fraction of each backoff that may be taken off at random, 0 to 1.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Every rule the policy breaks, as (field under `at`, rule).
    pub fn problems(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.initial_ms <= 0 || self.initial_ms > MAX_BACKOFF_MS {
            out.push((
                format!("{at}.initial_backoff"),
                format!(
                    "must be more than 0 and at most {MAX_BACKOFF_MS} ms, is {} ms",
                    self.initial_ms
                ),
            ));
        }
        if !(self.multiplier.is_finite() && (1.0..=MAX_MULTIPLIER).contains(&self.multiplier)) {
            out.push((
                format!("{at}.multiplier"),
                format!(
                    "must be between 1 and {MAX_MULTIPLIER} (0 means 1), is {}",
                    self.multiplier
                ),
            ));
        }
        if self.max_ms > MAX_BACKOFF_MS {
            out.push((
                format!("{at}.max_backoff"),
                format!("must be at most {MAX_BACKOFF_MS} ms, is {} ms", self.max_ms),
            ));
        } else if self.max_ms < self.initial_ms {
            out.push((
                format!("{at}.max_backoff"),
                format!(
                    "must not be below initial_backoff ({} ms), is {} ms",
                    self.initial_ms, self.max_ms
                ),
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            out.push((
                format!("{at}.jitter"),
                format!("must be between 0 and 1, is {}", self.jitter),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_ms: 200,
            multiplier: 2.0,
            max_ms: 1000,
            jitter: 0.1,
        }
    }

    #[test]
    fn a_sound_policy_has_no_problem() {
        assert!(policy().problems("retry").is_empty());
    }

    #[test]
    fn each_rule_names_its_field() {
        let fields = |p: RetryPolicy| -> Vec<String> {
            p.problems("steps[1].retry")
                .into_iter()
                .map(|(f, _)| f)
                .collect()
        };
        assert_eq!(
            fields(RetryPolicy {
                initial_ms: 0,
                ..policy()
            }),
            ["steps[1].retry.initial_backoff"]
        );
        assert_eq!(
            fields(RetryPolicy {
                multiplier: 0.5,
                ..policy()
            }),
            ["steps[1].retry.multiplier"]
        );
        assert_eq!(
            fields(RetryPolicy {
                max_ms: 100,
                ..policy()
            }),
            ["steps[1].retry.max_backoff"]
        );
        assert_eq!(
            fields(RetryPolicy {
                jitter: f64::NAN,
                ..policy()
            }),
            ["steps[1].retry.jitter"]
        );
    }
}
