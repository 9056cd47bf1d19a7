//! Namespaces: the one rule for their names (mirrored exactly by the SQL check
//! `tasker.namespace_name_problem`), and [`NamespaceSelector`], which namespaces an instance
//! serves.

/// The longest namespace name. A namespace is a label in metrics, logs, notification payloads
/// and `tasker ctl` output: short and plain. (The cap once kept a per-namespace LISTEN channel
/// under PostgreSQL's 63-byte identifier limit; there are no such channels now, and the cap
/// stays so that every stored name remains valid.) The database enforces the same rule
/// (`tasker.namespace_name_problem`).
pub const MAX_NAMESPACE_BYTES: usize = 45;

/// The queue of a step whose definition names none, and of a fetch that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Why a queue name is not acceptable, or `None`: queues are named like namespaces (they are
/// labels of the same kinds, and a lane is the pair).
pub fn queue_name_problem(name: &str) -> Option<String> {
    namespace_name_problem(name)
}

/// Why a namespace name is not acceptable, or `None`. Mirrors the SQL check exactly.
pub fn namespace_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > MAX_NAMESPACE_BYTES {
        return Some(format!(
            "must be at most {MAX_NAMESPACE_BYTES} bytes (is {})",
            name.len()
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !(first_ok && rest_ok) {
        return Some(
            "must match ^[a-z0-9][a-z0-9_-]*$ (lower-case letters, digits, \"_\" and \"-\", starting with a letter or digit)"
                .into(),
        );
    }
    None
}

/// Which namespaces an instance serves: all, or a list of names and `prefix*` patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSelector {
    /// `None`: all namespaces.
    patterns: Option<Vec<String>>,
}

impl NamespaceSelector {
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
    }

    #[test]
    fn names_follow_the_name_rule() {
        assert_eq!(namespace_name_problem("billing-eu_2"), None);
        assert!(namespace_name_problem("").is_some());
        assert!(namespace_name_problem("Billing").is_some());
        assert!(namespace_name_problem("-x").is_some());
        assert!(namespace_name_problem(&"n".repeat(MAX_NAMESPACE_BYTES)).is_none());
        assert!(namespace_name_problem(&"n".repeat(MAX_NAMESPACE_BYTES + 1)).is_some());
    }
}
