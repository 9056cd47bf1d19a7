//! Readiness events and their classification.
//!
//! The database announces changes on a few channels (see the notification functions in `migrations/`).
//! [`ChannelMap`] is the one table that says which channel carries which kind of event;
//! [`ReadinessEventClassifier`] uses it to turn a `(channel, payload)` pair into a typed
//! [`TaskReadinessEvent`], or an error that the listener counts and logs. No other code matches
//! on channel names.

use serde::Deserialize;
use uuid::Uuid;

use crate::namespaces::namespace_name_problem;
use crate::vocabulary::TriggeredBy;

/// The kinds of event the database announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    TaskReady,
    TaskStateChange,
    NamespaceCreated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskReady => "task_ready",
            Self::TaskStateChange => "task_state_change",
            Self::NamespaceCreated => "namespace_created",
        }
    }
}

/// Channel name -> event kind. Namespaced channels are `<base>.<namespace>`.
#[derive(Debug, Clone)]
pub struct ChannelMap {
    entries: Vec<(String, EventKind, bool)>,
}

impl Default for ChannelMap {
    /// The channels the migrations' triggers notify on.
    fn default() -> Self {
        Self {
            entries: vec![
                ("tasker_task_ready".into(), EventKind::TaskReady, true),
                ("tasker_task_state".into(), EventKind::TaskStateChange, true),
                (
                    "tasker_namespace_created".into(),
                    EventKind::NamespaceCreated,
                    false,
                ),
            ],
        }
    }
}

impl ChannelMap {
    /// The channel for a kind: global when `namespace` is `None`.
    pub fn channel(&self, kind: EventKind, namespace: Option<&str>) -> String {
        let (base, _, namespaced) = self
            .entries
            .iter()
            .find(|(_, k, _)| *k == kind)
            .expect("every kind has a channel");
        match namespace {
            Some(ns) if *namespaced => format!("{base}.{ns}"),
            _ => base.clone(),
        }
    }

    /// The kind a channel carries, and its namespace if it is a namespaced channel.
    pub fn classify<'a>(&self, channel: &'a str) -> Option<(EventKind, Option<&'a str>)> {
        self.entries.iter().find_map(|(base, kind, namespaced)| {
            if channel == base {
                Some((*kind, None))
            } else if *namespaced {
                channel
                    .strip_prefix(base.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .map(|ns| (*kind, Some(ns)))
            } else {
                None
            }
        })
    }
}

/// Steps of a task became ready.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskReadyEvent {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub priority: i32,
    pub ready_steps: i32,
    pub triggered_by: TriggeredBy,
    pub step_uuid: Option<Uuid>,
    pub step_state: Option<String>,
    pub task_state: Option<String>,
    /// W3C trace context of the request that caused the change, when it carried one.
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskStateChangeEvent {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub priority: i32,
    pub from_state: String,
    pub to_state: String,
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NamespaceCreatedEvent {
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskReadinessEvent {
    TaskReady(TaskReadyEvent),
    TaskStateChange(TaskStateChangeEvent),
    NamespaceCreated(NamespaceCreatedEvent),
}

impl TaskReadinessEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::TaskReady(_) => EventKind::TaskReady,
            Self::TaskStateChange(_) => EventKind::TaskStateChange,
            Self::NamespaceCreated(_) => EventKind::NamespaceCreated,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("notification on unknown channel {0:?}")]
    UnknownChannel(String),
    #[error("malformed {kind} payload on {channel:?}: {reason}")]
    Malformed {
        kind: &'static str,
        channel: String,
        reason: String,
    },
}

/// The trace context in a payload, read before classification so the classification itself
/// can be traced under it. Tolerates anything: a payload that is not ours has none.
pub fn payload_traceparent(payload: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct TraceOnly {
        traceparent: Option<String>,
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return None;
    }
    serde_json::from_str::<TraceOnly>(payload).ok()?.traceparent
}

/// The largest payload PostgreSQL delivers; anything claiming more is not ours.
const MAX_PAYLOAD_BYTES: usize = 8000;

#[derive(Debug, Clone, Default)]
pub struct ReadinessEventClassifier {
    channels: ChannelMap,
}

impl ReadinessEventClassifier {
    pub fn new(channels: ChannelMap) -> Self {
        Self { channels }
    }

    pub fn channels(&self) -> &ChannelMap {
        &self.channels
    }

    /// Parse and check a notification. Never panics, whatever the payload.
    pub fn classify(
        &self,
        channel: &str,
        payload: &str,
    ) -> Result<TaskReadinessEvent, ClassifyError> {
        let (kind, channel_ns) = self
            .channels
            .classify(channel)
            .ok_or_else(|| ClassifyError::UnknownChannel(channel.to_string()))?;
        let malformed = |reason: String| ClassifyError::Malformed {
            kind: kind.as_str(),
            channel: channel.to_string(),
            reason,
        };
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(malformed(format!(
                "{} bytes exceeds {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let event = match kind {
            EventKind::TaskReady => {
                let e: TaskReadyEvent =
                    serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?;
                if !matches!(
                    e.triggered_by,
                    TriggeredBy::StepTransition | TriggeredBy::TaskStart
                ) {
                    return Err(malformed(format!(
                        "triggered_by {} is not a database trigger",
                        e.triggered_by
                    )));
                }
                if e.ready_steps < 0 {
                    return Err(malformed(format!(
                        "ready_steps {} is negative",
                        e.ready_steps
                    )));
                }
                TaskReadinessEvent::TaskReady(e)
            }
            EventKind::TaskStateChange => TaskReadinessEvent::TaskStateChange(
                serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?,
            ),
            EventKind::NamespaceCreated => TaskReadinessEvent::NamespaceCreated(
                serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?,
            ),
        };
        let namespace = match &event {
            TaskReadinessEvent::TaskReady(e) => &e.namespace,
            TaskReadinessEvent::TaskStateChange(e) => &e.namespace,
            TaskReadinessEvent::NamespaceCreated(e) => &e.namespace,
        };
        if let Some(problem) = namespace_name_problem(namespace) {
            return Err(malformed(format!("namespace {problem}")));
        }
        if let Some(ns) = channel_ns {
            if ns != namespace {
                return Err(malformed(format!(
                    "payload namespace {namespace:?} does not match channel namespace {ns:?}"
                )));
            }
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = r#"{"task_uuid":"01890a5d-ac96-774b-bcce-b302099a8057","namespace":"billing","priority":3,"ready_steps":2,"triggered_by":"step_transition","step_uuid":"01890a5d-ac96-774b-bcce-b302099a8058","step_state":"complete","task_state":"in_progress"}"#;

    #[test]
    fn classifies_each_channel() {
        let c = ReadinessEventClassifier::default();
        for ch in ["tasker_task_ready", "tasker_task_ready.billing"] {
            let TaskReadinessEvent::TaskReady(e) = c.classify(ch, READY).unwrap() else {
                panic!("not task ready")
            };
            assert_eq!(
                (e.priority, e.ready_steps, e.triggered_by),
                (3, 2, TriggeredBy::StepTransition)
            );
        }
        let ns = c
            .classify("tasker_namespace_created", r#"{"namespace":"billing"}"#)
            .unwrap();
        assert_eq!(ns.kind(), EventKind::NamespaceCreated);
        let st = c
            .classify(
                "tasker_task_state.billing",
                r#"{"task_uuid":"01890a5d-ac96-774b-bcce-b302099a8057","namespace":"billing","priority":0,"from_state":"pending","to_state":"in_progress"}"#,
            )
            .unwrap();
        assert_eq!(st.kind(), EventKind::TaskStateChange);
    }

    #[test]
    fn rejects_what_is_not_ours() {
        let c = ReadinessEventClassifier::default();
        assert!(matches!(
            c.classify("other", READY),
            Err(ClassifyError::UnknownChannel(_))
        ));
        assert!(matches!(
            c.classify("tasker_namespace_created.x", "{}"),
            Err(ClassifyError::UnknownChannel(_))
        ));
        for bad in [
            "",
            "null",
            "{",
            "[]",
            r#"{"task_uuid":"nope"}"#,
            &READY.replace("step_transition", "fallback_polling"),
            &READY.replace("\"ready_steps\":2", "\"ready_steps\":-1"),
            &READY.replace("billing", "Not Valid"),
            &"x".repeat(9000),
        ] {
            assert!(
                matches!(
                    c.classify("tasker_task_ready", bad),
                    Err(ClassifyError::Malformed { .. })
                ),
                "accepted {bad:?}"
            );
        }
        assert!(matches!(
            c.classify("tasker_task_ready.other", READY),
            Err(ClassifyError::Malformed { .. })
        ));
    }
}
