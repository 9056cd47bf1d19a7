//! Retention's vocabulary: the periods finished tasks are kept, and when the purge is behind.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The fleet's default periods (`orchestration.retention`), for namespaces without their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionDefaults {
    /// Complete or cancelled tasks.
    pub retention: Duration,
    /// Tasks in error.
    pub error_retention: Duration,
}

/// How long ago `t` was (zero for a time ahead of `now`: the clocks of two hosts).
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - t).to_std().unwrap_or_default()
}

/// A task finished at `oldest` and still kept under a period `keep` says the purge is behind:
/// it is kept for more than twice its period.
pub fn overdue(oldest: Option<DateTime<Utc>>, keep: Duration, now: DateTime<Utc>) -> bool {
    oldest.is_some_and(|t| age(t, now) > keep * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_overdue_past_twice_its_period() {
        let now = Utc::now();
        let keep = Duration::from_secs(60);
        let ago = |s: i64| Some(now - chrono::Duration::seconds(s));
        assert!(!overdue(None, keep, now));
        assert!(!overdue(ago(119), keep, now));
        assert!(overdue(ago(121), keep, now));
        // a clock ahead of ours is not an age
        assert_eq!(age(now + chrono::Duration::seconds(5), now), Duration::ZERO);
    }
}
