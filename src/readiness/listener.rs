//! `TaskReadinessListener`: one dedicated LISTEN connection, classified notifications handed
//! to the `TaskReadinessEventSystem`.
//!
//! ```text
//!            mode listens                 LISTEN ok (then: request a catch-up sweep)
//!  Disabled ─────────────> Connecting ─────────────────────────────> Listening
//!     ^                       ^   │ fails                               │ connection lost,
//!     │ mode stops listening  │   v                                     │ ping fails, Err
//!     └──────── (any) ──── Reconnecting{attempt} <──────────────────────┘
//!                          (backoff with jitter, 100 ms doubling to listener_max_backoff_ms)
//! ```
//!
//! Notifications sent while no connection listens are lost by PostgreSQL, so every successful
//! (re)connect asks the poller for a catch-up sweep *after* LISTEN is in place: whatever
//! became ready in the gap is found by the sweep, whatever becomes ready afterwards arrives as
//! a notification. `try_recv` is used (not `recv`, which reconnects silently), with sqlx's
//! eager reconnect off, so this loop owns backoff, logging and the sweep. An idle connection is
//! pinged every `listener_ping_interval_seconds`, so one that died without a RST is noticed.
//!
//! Channels: one per kind of event (`tasker_task_ready`, `tasker_task_state`,
//! `tasker_steps_enqueued`, the other replicas' wake-ups for parked fetches,
//! `tasker_fleet_mode`, the fleet's deployment mode, and `tasker_deadlines`, a retry's due time
//! for every replica's deadline scheduler). An instance that
//! serves some namespaces drops the events of the others here, by the payload's namespace:
//! PostgreSQL hands every listening connection every notification of the shared queue anyway,
//! whatever the channel, so a channel per namespace saved nothing and cost a second NOTIFY.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::classifier::{
    payload_traceparent, EventKind, ReadinessEventClassifier, TaskReadinessEvent,
};
use super::TaskReadinessEventSystem;
use crate::config::DeploymentMode;
use crate::model::namespaces::NamespaceSelector;
use crate::readiness::poller::SweepRequester;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `base * 2^attempt`, capped, then scaled by a random factor in [0.5, 1.0] so instances that
/// lost the database together do not come back in lockstep.
fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    exp.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}
const BACKOFF_BASE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerState {
    /// The deployment mode does not listen.
    Disabled,
    Connecting,
    Listening,
    Reconnecting {
        attempt: u32,
    },
    Stopped,
}

/// What the listener is doing, for status reports and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub state: ListenerState,
    pub channels: Vec<String>,
    /// The LISTEN connection's backend pid while connected.
    pub backend_pid: Option<i32>,
    pub reconnects: u64,
    pub connected_since: Option<DateTime<Utc>>,
    /// Counts successful connects, so a waiter can tell a reconnect happened.
    pub generation: u64,
}

impl Default for ListenerStatus {
    fn default() -> Self {
        Self {
            state: ListenerState::Disabled,
            channels: Vec::new(),
            backend_pid: None,
            reconnects: 0,
            connected_since: None,
            generation: 0,
        }
    }
}

enum Exit {
    Cancelled,
    ModeOff,
    Lost(ListenerError),
}

/// Why the LISTEN connection was lost or could not be set up. Every kind is retried with
/// backoff (the database may come back); the kinds that will not heal by themselves (bad
/// credentials, a missing database) are logged as errors that need an operator.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{during}: {source}")]
    Database {
        during: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0} did not finish within {CONNECT_TIMEOUT:?}")]
    TimedOut(&'static str),
    #[error("the connection closed")]
    Closed,
}

impl ListenerError {
    fn db(during: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database { during, source }
    }

    /// Whether waiting and trying again can fix it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Database { source, .. } => crate::store::is_retryable(source),
            Self::TimedOut(_) | Self::Closed => true,
        }
    }
}

pub struct TaskReadinessListener {
    /// How to open the LISTEN connection: the main pool's options, named `tasker-listener`.
    /// Each connection gets a pool of its own (of one), separate from the main pool: a LISTEN
    /// connection is held for good and must not starve (or be starved by) request handling,
    /// and closing that pool when listening stops closes the connection itself (a mode
    /// without the listener leaves no LISTEN connection behind).
    options: sqlx::postgres::PgConnectOptions,
    selector: NamespaceSelector,
    classifier: ReadinessEventClassifier,
    events: TaskReadinessEventSystem,
    mode: watch::Receiver<DeploymentMode>,
    status: watch::Sender<ListenerStatus>,
    sweeps: SweepRequester,
    metrics: Metrics,
    max_backoff: Duration,
    ping_interval: Duration,
}

impl TaskReadinessListener {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        selector: NamespaceSelector,
        events: TaskReadinessEventSystem,
        mode: watch::Receiver<DeploymentMode>,
        status: watch::Sender<ListenerStatus>,
        sweeps: SweepRequester,
        metrics: Metrics,
        max_backoff: Duration,
        ping_interval: Duration,
    ) -> Self {
        let options = (*store.pool().connect_options())
            .clone()
            .application_name("tasker-listener");
        Self {
            options,
            selector,
            classifier: ReadinessEventClassifier,
            events,
            mode,
            status,
            sweeps,
            metrics,
            max_backoff,
            ping_interval,
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut attempt: u32 = 0;
        loop {
            if !self.mode.borrow_and_update().listens() {
                self.set_state(ListenerState::Disabled, None, Vec::new());
                attempt = 0;
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    changed = self.mode.changed() => if changed.is_err() { break },
                }
                continue;
            }
            if attempt == 0 {
                self.set_state(ListenerState::Connecting, None, Vec::new());
            }
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_lazy_with(self.options.clone());
            let exit = match self.connect(&pool).await {
                Ok((listener, pid, channels)) => {
                    if attempt > 0 {
                        self.metrics.listener_reconnected();
                        tracing::info!(attempt, backend_pid = pid, "listener reconnected");
                    } else {
                        tracing::info!(backend_pid = pid, channels = ?channels, "listening for readiness notifications");
                    }
                    attempt = 0;
                    self.status.send_modify(|s| {
                        s.state = ListenerState::Listening;
                        s.backend_pid = Some(pid);
                        s.channels = channels.iter().cloned().collect();
                        s.connected_since = Some(Utc::now());
                        s.generation += 1;
                    });
                    // LISTEN is in place: whatever became ready while nobody listened is found now
                    self.sweeps.request();
                    self.listen(listener, &cancel).await
                }
                Err(e) => Exit::Lost(e),
            };
            // the listener is gone (dropped by `listen`): close its connection for good
            pool.close().await;
            match exit {
                Exit::Cancelled => break,
                Exit::ModeOff => {
                    tracing::info!("deployment mode no longer listens; LISTEN connection closed");
                    continue;
                }
                Exit::Lost(error) => {
                    attempt += 1;
                    let delay = backoff(attempt - 1, BACKOFF_BASE, self.max_backoff);
                    let retry_in_ms = delay.as_millis() as u64;
                    if error.is_retryable() {
                        tracing::warn!(attempt, %error, retry_in_ms, "listener connection lost; reconnecting");
                    } else {
                        tracing::error!(attempt, %error, retry_in_ms, "listener cannot connect and this will not heal by itself (check the database URL, credentials and database); retrying");
                    }
                    self.status.send_modify(|s| {
                        s.state = ListenerState::Reconnecting { attempt };
                        s.backend_pid = None;
                        s.reconnects += 1;
                    });
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.set_state(ListenerState::Stopped, None, Vec::new());
    }

    fn set_state(&self, state: ListenerState, pid: Option<i32>, channels: Vec<String>) {
        self.status.send_modify(|s| {
            s.state = state;
            s.backend_pid = pid;
            s.channels = channels;
            if s.state != ListenerState::Listening {
                s.connected_since = None;
            }
        });
    }

    async fn connect(
        &mut self,
        pool: &PgPool,
    ) -> Result<(PgListener, i32, BTreeSet<String>), ListenerError> {
        let fut = async {
            let mut listener = PgListener::connect_with(pool)
                .await
                .map_err(ListenerError::db("connecting"))?;
            listener.eager_reconnect(false);
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut listener)
                .await
                .map_err(ListenerError::db("reading the backend pid"))?;
            let channels = Self::channels();
            listener
                .listen_all(channels.iter().map(String::as_str))
                .await
                .map_err(ListenerError::db("LISTEN"))?;
            Ok((listener, pid, channels))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .unwrap_or(Err(ListenerError::TimedOut("connect and LISTEN")))
    }

    fn channels() -> BTreeSet<String> {
        EventKind::ALL
            .into_iter()
            .map(|k| k.channel().to_string())
            .collect()
    }

    async fn listen(&mut self, mut listener: PgListener, cancel: &CancellationToken) -> Exit {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Exit::Cancelled,
                changed = self.mode.changed() => {
                    if changed.is_err() {
                        return Exit::Cancelled;
                    }
                    if !self.mode.borrow_and_update().listens() {
                        return Exit::ModeOff;
                    }
                }
                received = tokio::time::timeout(self.ping_interval, listener.try_recv()) => match received {
                    Ok(Ok(Some(n))) => {
                        if let Err(e) = self.handle(n).await {
                            return Exit::Lost(e);
                        }
                    }
                    Ok(Ok(None)) => return Exit::Lost(ListenerError::Closed),
                    Ok(Err(e)) => return Exit::Lost(ListenerError::Database { during: "receiving", source: e }),
                    Err(_idle) => {
                        let ping = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::query("SELECT 1").execute(&mut listener)).await;
                        match ping {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Exit::Lost(ListenerError::Database { during: "ping", source: e }),
                            Err(_) => return Exit::Lost(ListenerError::TimedOut("ping")),
                        }
                    }
                }
            }
        }
    }

    async fn handle(&mut self, n: PgNotification) -> Result<(), ListenerError> {
        let received = Instant::now();
        // The receive span continues the trace of the request that caused the notification
        // (its traceparent rides in the payload); with none, it is a root: never a child of
        // this long-lived task.
        let span = tracing::info_span!(
            parent: None,
            "listener.receive",
            channel = n.channel(),
            payload_bytes = n.payload().len(),
            event_type = tracing::field::Empty,
        );
        if let Some(cx) = payload_traceparent(n.payload())
            .and_then(|tp| crate::telemetry::context_from_traceparent(&tp, None))
        {
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, cx);
        }
        let classified = span.in_scope(|| {
            let _classify = tracing::info_span!("listener.classify").entered();
            self.classifier.classify(n.channel(), n.payload())
        });
        let event = match classified {
            Ok(e) => e,
            Err(e) => {
                self.metrics.malformed_notification(n.channel());
                tracing::warn!(error = %e, "ignoring notification");
                return Ok(());
            }
        };
        // another instance serves this namespace's readiness; wake-ups are for any worker
        // parked here, whichever namespaces this instance claims for
        if let (
            TaskReadinessEvent::TaskReady(_)
            | TaskReadinessEvent::TaskStateChange(_)
            | TaskReadinessEvent::Deadline(_),
            Some(ns),
        ) = (&event, event.namespace())
        {
            if !self.selector.matches(ns) {
                return Ok(());
            }
        }
        self.metrics.event_received(event.kind().as_str());
        span.record("event_type", event.kind().as_str());
        match event {
            // the listener's span is current while the command is submitted: the command's
            // span becomes its child
            TaskReadinessEvent::TaskReady(e) => {
                span.in_scope(|| self.events.process_task_ready(e, received))
            }
            TaskReadinessEvent::TaskStateChange(e) => {
                tracing::debug!(task_uuid = %e.task_uuid, from = %e.from_state, to = %e.to_state, "task state changed");
                self.events.task_state_changed(e);
            }
            TaskReadinessEvent::StepsEnqueued(e) => self.events.steps_enqueued(e),
            TaskReadinessEvent::FleetMode(e) => self.events.fleet_mode(e),
            TaskReadinessEvent::Deadline(e) => self.events.deadline_announced(e),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        assert!(backoff(0, base, max) <= base);
        assert!(backoff(20, base, max) <= max);
        assert!(backoff(5, base, max) >= Duration::from_millis(1600));
    }
}
