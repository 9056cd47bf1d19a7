//! Finding ready work: the notification listener, the event types and classifier, the
//! fallback poller (which also runs catch-up sweeps) and the deadline scheduler for retries
//! and leases. All of them only produce `ProcessTaskReadiness` commands; none orchestrates.
//!
//! Layout:
//! - `events`: `TaskReadinessEvent`, `ChannelMap`, `ReadinessEventClassifier`
//! - `listener`: `TaskReadinessListener` (LISTEN connection, reconnects, catch-up requests)
//! - `poller`: `ReadinessFallbackPoller` (periodic rounds and on-demand catch-up sweeps)
//! - `deadlines`: `DeadlineScheduler` (precise wake-ups for retry backoffs and lease expiry)

pub mod deadlines;
pub mod events;
pub mod listener;
pub mod poller;

use std::sync::Arc;

use tokio::sync::Notify;

pub use deadlines::DeadlineScheduler;
pub use events::{
    ChannelMap, ClassifyError, EventKind, ReadinessEventClassifier, TaskReadinessEvent,
    TaskReadyEvent,
};
pub use listener::{ListenerState, ListenerStatus, TaskReadinessListener};
pub use poller::{PollerStatus, ReadinessFallbackPoller};

/// Which namespaces an instance serves: all, or a list of names and `prefix*` patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSelector {
    /// `None`: all namespaces.
    patterns: Option<Vec<String>>,
}

impl NamespaceSelector {
    pub fn all() -> Self {
        Self { patterns: None }
    }

    /// An empty list means all.
    pub fn from_config(patterns: &[String]) -> Self {
        Self {
            patterns: (!patterns.is_empty()).then(|| patterns.to_vec()),
        }
    }

    /// For the SQL functions' `p_namespaces` argument.
    pub fn patterns(&self) -> Option<&[String]> {
        self.patterns.as_deref()
    }

    pub fn matches(&self, namespace: &str) -> bool {
        match &self.patterns {
            None => true,
            Some(ps) => ps.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => namespace.starts_with(prefix),
                None => namespace == p,
            }),
        }
    }

    /// Exact names listed (prefix patterns excluded).
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.patterns
            .iter()
            .flatten()
            .filter(|p| !p.ends_with('*'))
            .map(String::as_str)
    }

    pub fn has_prefix_patterns(&self) -> bool {
        self.patterns.iter().flatten().any(|p| p.ends_with('*'))
    }
}

/// Asks the poller for a catch-up sweep. Requests made while one is pending fold into it.
#[derive(Clone, Default, Debug)]
pub struct SweepRequester {
    notify: Arc<Notify>,
}

impl SweepRequester {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.notify.notify_one();
    }

    pub(crate) async fn requested(&self) {
        self.notify.notified().await
    }
}

/// `base * 2^attempt`, capped, then scaled by a random factor in [0.5, 1.0] so instances that
/// lost the database together do not come back in lockstep.
pub(crate) fn backoff(
    attempt: u32,
    base: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    exp.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

/// A period with up to 10% jitter either way.
pub(crate) fn jittered(period: std::time::Duration) -> std::time::Duration {
    period.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_matches_names_and_prefixes() {
        let s = NamespaceSelector::from_config(&["billing".into(), "etl-*".into()]);
        assert!(s.matches("billing") && s.matches("etl-eu") && s.matches("etl-"));
        assert!(!s.matches("billing2") && !s.matches("etl"));
        assert!(NamespaceSelector::from_config(&[]).matches("anything"));
        assert_eq!(s.exact_names().collect::<Vec<_>>(), vec!["billing"]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        use std::time::Duration;
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        assert!(backoff(0, base, max) <= base);
        assert!(backoff(20, base, max) <= max);
        assert!(backoff(5, base, max) >= Duration::from_millis(1600));
    }
}
