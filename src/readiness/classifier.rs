//! Readiness events and their classification.
//!
//! The database announces changes on one channel per kind of event (see the notification
//! functions in `migrations/`). [`EventKind::channel`] is the one table that says which channel
//! carries which kind; [`ReadinessEventClassifier`] turns a `(channel, payload)` pair into a
//! typed [`TaskReadinessEvent`], or an error that the listener counts and logs. No other code
//! matches on channel names.

use serde::Deserialize;
use uuid::Uuid;

use crate::config::DeploymentMode;
use crate::model::command::TriggeredBy;
use crate::model::namespaces::namespace_name_problem;
use crate::model::states::TaskState;

/// The kinds of event the database announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    TaskReady,
    TaskStateChange,
    /// Steps another replica enqueued that no fetch parked there took: a wake-up for the
    /// fetches parked here, not a readiness change.
    StepsEnqueued,
    /// The fleet's deployment mode was set or cleared through some replica.
    FleetMode,
    /// A deadline (a retry's due time) made on some replica: every replica's deadline
    /// scheduler wakes for it, so it is met even if the replica that made it is gone.
    Deadline,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        Self::TaskReady,
        Self::TaskStateChange,
        Self::StepsEnqueued,
        Self::FleetMode,
        Self::Deadline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskReady => "task_ready",
            Self::TaskStateChange => "task_state_change",
            Self::StepsEnqueued => "steps_enqueued",
            Self::FleetMode => "fleet_mode",
            Self::Deadline => "deadline",
        }
    }

    /// The channel the database announces this kind on.
    pub fn channel(self) -> &'static str {
        match self {
            Self::TaskReady => "tasker_task_ready",
            Self::TaskStateChange => "tasker_task_state",
            Self::StepsEnqueued => "tasker_steps_enqueued",
            Self::FleetMode => "tasker_fleet_mode",
            Self::Deadline => "tasker_deadlines",
        }
    }

    /// The kind a channel carries.
    pub fn of_channel(channel: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.channel() == channel)
    }
}

/// Steps of a task became ready.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskReadyEvent {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub triggered_by: TriggeredBy,
    /// W3C trace context of the request that caused the change, when it carried one.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// The replica whose transaction made the steps ready (its connections announce its id as
    /// `tasker.replica_id`); it claims first when it listens. `None` for changes made by
    /// anything else (an operator's SQL, `tasker ctl` against the database).
    #[serde(default)]
    pub replica: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskStateChangeEvent {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub priority: i32,
    pub from_state: TaskState,
    pub to_state: TaskState,
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Steps of a namespace's queue that fetches may lease now: put there by another replica
/// (see `cluster`), or let through by the database (a slot of a limited queue freed, a queue
/// resumed, a limit raised).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StepsEnqueuedEvent {
    pub namespace: String,
    /// `None`: any queue of the namespace (a namespace resumed; or a replica of the previous
    /// release, which knew one queue).
    #[serde(default)]
    pub queue: Option<String>,
    pub steps: u32,
    /// The replica that enqueued them, which woke its own fetches already; `None` when the
    /// database sent it: every replica wakes its fetches, this one too.
    #[serde(default)]
    pub replica: Option<Uuid>,
}

/// A retry of a step of `namespace` falls due at `at`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineEvent {
    pub namespace: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// The fleet's deployment mode, `None` when it was cleared.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetModeEvent {
    pub mode: Option<DeploymentMode>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskReadinessEvent {
    TaskReady(TaskReadyEvent),
    TaskStateChange(TaskStateChangeEvent),
    StepsEnqueued(StepsEnqueuedEvent),
    FleetMode(FleetModeEvent),
    Deadline(DeadlineEvent),
}

impl TaskReadinessEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::TaskReady(_) => EventKind::TaskReady,
            Self::TaskStateChange(_) => EventKind::TaskStateChange,
            Self::StepsEnqueued(_) => EventKind::StepsEnqueued,
            Self::FleetMode(_) => EventKind::FleetMode,
            Self::Deadline(_) => EventKind::Deadline,
        }
    }

    /// The namespace the event concerns; `None` for the fleet-wide ones.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Self::TaskReady(e) => Some(&e.namespace),
            Self::TaskStateChange(e) => Some(&e.namespace),
            Self::StepsEnqueued(e) => Some(&e.namespace),
            Self::FleetMode(_) => None,
            Self::Deadline(e) => Some(&e.namespace),
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
pub struct ReadinessEventClassifier;

impl ReadinessEventClassifier {
    /// Parse and check a notification. Never panics, whatever the payload.
    pub fn classify(
        &self,
        channel: &str,
        payload: &str,
    ) -> Result<TaskReadinessEvent, ClassifyError> {
        let kind = EventKind::of_channel(channel)
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
                TaskReadinessEvent::TaskReady(e)
            }
            EventKind::TaskStateChange => TaskReadinessEvent::TaskStateChange(
                serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?,
            ),
            EventKind::StepsEnqueued => TaskReadinessEvent::StepsEnqueued(
                serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?,
            ),
            EventKind::FleetMode => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Payload {
                    mode: Option<String>,
                }
                let p: Payload =
                    serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?;
                let mode = p
                    .mode
                    .map(|m| m.parse::<DeploymentMode>().map_err(malformed))
                    .transpose()?;
                TaskReadinessEvent::FleetMode(FleetModeEvent { mode })
            }
            EventKind::Deadline => TaskReadinessEvent::Deadline(
                serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?,
            ),
        };
        if let Some(problem) = event.namespace().and_then(namespace_name_problem) {
            return Err(malformed(format!("namespace {problem}")));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = r#"{"task_uuid":"01890a5d-ac96-774b-bcce-b302099a8057","namespace":"billing","triggered_by":"step_transition"}"#;

    #[test]
    fn classifies_each_channel() {
        let c = ReadinessEventClassifier;
        let TaskReadinessEvent::TaskReady(e) = c.classify("tasker_task_ready", READY).unwrap()
        else {
            panic!("not task ready")
        };
        assert_eq!(
            (e.namespace.as_str(), e.triggered_by),
            ("billing", TriggeredBy::StepTransition)
        );
        let st = c
            .classify(
                "tasker_task_state",
                r#"{"task_uuid":"01890a5d-ac96-774b-bcce-b302099a8057","namespace":"billing","priority":0,"from_state":"pending","to_state":"in_progress"}"#,
            )
            .unwrap();
        assert_eq!(st.kind(), EventKind::TaskStateChange);
        let TaskReadinessEvent::StepsEnqueued(e) = c
            .classify(
                "tasker_steps_enqueued",
                r#"{"namespace":"billing","steps":3,"replica":"01890a5d-ac96-774b-bcce-b302099a8057"}"#,
            )
            .unwrap()
        else {
            panic!("not steps enqueued")
        };
        assert_eq!((e.namespace.as_str(), e.steps), ("billing", 3));
        for (payload, mode) in [
            (
                r#"{"mode":"PollingOnly"}"#,
                Some(DeploymentMode::PollingOnly),
            ),
            (r#"{"mode":null}"#, None),
        ] {
            assert_eq!(
                c.classify("tasker_fleet_mode", payload).unwrap(),
                TaskReadinessEvent::FleetMode(FleetModeEvent { mode })
            );
        }
        assert!(c
            .classify("tasker_fleet_mode", r#"{"mode":"Sometimes"}"#)
            .is_err());
        // as json_build_object writes a timestamptz
        let TaskReadinessEvent::Deadline(d) = c
            .classify(
                "tasker_deadlines",
                r#"{"namespace" : "billing", "at" : "2026-12-04T08:40:00.123456+00:00"}"#,
            )
            .unwrap()
        else {
            panic!("not a deadline")
        };
        assert_eq!(d.namespace, "billing");
        assert_eq!(d.at.timestamp_micros() % 1_000_000, 123_456);
        assert!(c
            .classify("tasker_deadlines", r#"{"namespace":"billing","at":"soon"}"#)
            .is_err());
    }

    #[test]
    fn rejects_what_is_not_ours() {
        let c = ReadinessEventClassifier;
        for channel in [
            "other",
            "tasker_task_ready.billing",
            "tasker_namespace_created",
        ] {
            assert!(matches!(
                c.classify(channel, READY),
                Err(ClassifyError::UnknownChannel(_))
            ));
        }
        for bad in [
            "",
            "null",
            "{",
            "[]",
            r#"{"task_uuid":"nope"}"#,
            &READY.replace("step_transition", "fallback_polling"),
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
    }
}
