//! `DeadlineScheduler`: precise wake-ups for work that becomes ready with no event. A step in
//! retry backoff becomes ready at `next_retry_at`; a leased step whose worker went silent (or
//! whose attempt reached its timeout) must be retried when its lease runs out; a task created
//! to start later starts at its `start_at`; a cron schedule's tick creates its task.
//! Rather than leaving these to the next fallback poll (up to 30 s late, and the poller does
//! not look for starts at all), the scheduler sleeps until the earliest such deadline, then
//! promotes due retries (`waiting_for_retry -> pending`) and due starts (the task's roots join
//! the ready set), expires dead leases, fires due schedules (each in its own transaction, its
//! row locked: one task per tick whatever the number of replicas), and sends
//! `ProcessTaskReadiness` for each affected task (`triggered_by = retry_timer`, or `task_start`
//! for a start or a schedule's new task), so they are just as prompt in PollingOnly mode.
//!
//! ```text
//!  sleep until min(next deadline, poll interval) ──or poked (an earlier deadline)──────────┐
//!     ^                                                                                    v
//!     └── commands <── promote_due_retries + promote_due_starts + expire_leases <── wake ──┘
//! ```
//! The sleep is capped at the poll interval because other instances create deadlines too; a
//! retry's due time or a task's start made on another instance also arrives as a
//! `tasker_deadlines` notification (the event system pokes the scheduler with it), so it is met
//! on time even when the instance that made it is gone.
//!
//! A deadline created while the scheduler is between reading the next deadline and publishing
//! its plan must not be compared against the previous plan (already past, so it would not
//! poke, and the retry would wait for the cap): the scheduler marks itself awake before it
//! reads, so every deadline announced meanwhile leaves a poke behind, and it reads again.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::dispatch::deadlines::DeadlinePoke;
use crate::model::command::TriggeredBy;
use crate::model::namespaces::NamespaceSelector;
use crate::model::schedule::plan_wake;
use crate::readiness::commands::{CommandProcessorHandle, OrchestrationCommand};
use crate::store::{Store, StoreError, TaskRef};
use crate::telemetry::metrics::Metrics;

const BATCH: i32 = 500;

/// Where deadlines come from: the store in the service, a scripted source in the unit tests
/// below (which drive the scheduler's timing under a paused clock).
pub trait DeadlineSource: Send + Sync + 'static {
    /// The earliest retry due time, lease expiry or task start, if any.
    fn next_deadline(
        &self,
        namespaces: Option<Vec<String>>,
    ) -> BoxFuture<'static, Result<Option<DateTime<Utc>>, StoreError>>;
    /// Move due retries back to pending, start due tasks and end expired leases.
    fn take_due(&self, limit: i32, namespaces: Option<Vec<String>>) -> BoxFuture<'static, Due>;
}

/// What one wake-up found due.
#[derive(Debug, Default)]
pub struct Due {
    /// Steps whose retry backoff elapsed (now pending again).
    pub retries: Vec<TaskRef>,
    /// Steps whose lease ran out (their attempt ended).
    pub expired: Vec<TaskRef>,
    /// Root steps of tasks whose start time came (now ready).
    pub starts: Vec<TaskRef>,
    /// Tasks due schedules created: (task, namespace).
    pub scheduled: Vec<(uuid::Uuid, String)>,
    /// Queued steps no worker took within their schedule_to_start (failed for good).
    pub unstarted: Vec<TaskRef>,
}

/// The service's deadlines: the store's, with how late a schedule's tick may run and still be
/// on time (`orchestration.scheduling.misfire_grace_ms`).
#[derive(Clone)]
pub struct StoreDeadlines {
    pub store: Store,
    pub misfire_grace: Duration,
}

impl DeadlineSource for StoreDeadlines {
    fn next_deadline(
        &self,
        namespaces: Option<Vec<String>>,
    ) -> BoxFuture<'static, Result<Option<DateTime<Utc>>, StoreError>> {
        let store = self.store.clone();
        Box::pin(async move { Store::next_deadline(&store, namespaces.as_deref()).await })
    }

    fn take_due(&self, limit: i32, namespaces: Option<Vec<String>>) -> BoxFuture<'static, Due> {
        let store = self.store.clone();
        let grace = chrono::Duration::from_std(self.misfire_grace).unwrap_or_default();
        Box::pin(async move {
            let mut due = Due::default();
            match store
                .promote_due_retries(limit, namespaces.as_deref())
                .await
            {
                Ok(rows) => due.retries = rows,
                Err(e) => tracing::warn!(error = %e, "promoting due retries failed"),
            }
            match store.promote_due_starts(limit, namespaces.as_deref()).await {
                Ok(rows) => due.starts = rows,
                Err(e) => tracing::warn!(error = %e, "starting due tasks failed"),
            }
            match store.expire_leases(limit, namespaces.as_deref()).await {
                Ok(rows) => {
                    if !rows.is_empty() {
                        tracing::info!(steps = rows.len(), "leases expired; attempts ended");
                    }
                    due.expired = rows;
                }
                Err(e) => tracing::warn!(error = %e, "expiring leases failed"),
            }
            match store
                .fail_unstarted_steps(limit, namespaces.as_deref())
                .await
            {
                Ok(rows) => {
                    for r in &rows {
                        tracing::warn!(namespace = %r.namespace, task = %r.task_uuid, step = %r.step_uuid,
                                       "no worker started a step within its schedule_to_start; it failed");
                    }
                    due.unstarted = rows;
                }
                Err(e) => tracing::warn!(error = %e, "failing unstarted steps failed"),
            }
            // each due schedule in its own transaction, until none is left (or the batch)
            for _ in 0..limit {
                match store
                    .fire_due_schedule(namespaces.as_deref(), |d| plan_wake(d, grace))
                    .await
                {
                    Ok(Some(fired)) => {
                        tracing::debug!(namespace = %fired.namespace, schedule = %fired.schedule,
                                        tasks = fired.created.len(), "schedule fired");
                        due.scheduled.extend(
                            fired
                                .created
                                .into_iter()
                                .map(|t| (t, fired.namespace.clone())),
                        );
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "firing a due schedule failed");
                        break;
                    }
                }
            }
            due
        })
    }
}

pub struct DeadlineScheduler {
    source: Box<dyn DeadlineSource>,
    commands: CommandProcessorHandle,
    selector: NamespaceSelector,
    max_sleep: Duration,
    poke: DeadlinePoke,
    metrics: Metrics,
}

impl DeadlineScheduler {
    pub fn new(
        source: impl DeadlineSource,
        commands: CommandProcessorHandle,
        selector: NamespaceSelector,
        max_sleep: Duration,
        poke: DeadlinePoke,
        metrics: Metrics,
    ) -> Self {
        Self {
            source: Box::new(source),
            commands,
            selector,
            max_sleep,
            poke,
            metrics,
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let namespaces = self.selector.patterns().map(<[String]>::to_vec);
        loop {
            // from here until the plan is published, every new deadline pokes
            self.poke.awake();
            let sleep = match self.source.next_deadline(namespaces.clone()).await {
                Ok(Some(at)) => (at - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(self.max_sleep),
                Ok(None) => self.max_sleep,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the next retry/lease deadline failed");
                    Duration::from_secs(1).min(self.max_sleep)
                }
            };
            self.poke
                .plan(Utc::now() + chrono::Duration::from_std(sleep).unwrap_or_default());
            if !sleep.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(sleep) => {}
                    _ = self.poke.poked() => continue,
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            self.wake().await;
        }
    }

    /// Promote due retries and starts, expire dead leases, and send a command per affected
    /// task.
    pub async fn wake(&self) {
        let due = self
            .source
            .take_due(BATCH, self.selector.patterns().map(<[String]>::to_vec))
            .await;
        self.metrics
            .steps_promoted("retry", due.retries.len() as u64);
        self.metrics
            .steps_promoted("lease_expired", due.expired.len() as u64);
        self.metrics
            .steps_promoted("task_start", due.starts.len() as u64);
        self.metrics
            .steps_promoted("schedule_to_start", due.unstarted.len() as u64);
        // a task started now has nothing else due (no step of it ran), so its command says
        // why it is ready; any other task, once, as a timer's
        let tasks: HashMap<uuid::Uuid, (String, TriggeredBy)> = due
            .retries
            .into_iter()
            .chain(due.expired)
            .map(|r| (r, TriggeredBy::RetryTimer))
            .chain(due.starts.into_iter().map(|r| (r, TriggeredBy::TaskStart)))
            .map(|(r, by)| (r.task_uuid, (r.namespace, by)))
            .chain(
                due.scheduled
                    .into_iter()
                    .map(|(t, ns)| (t, (ns, TriggeredBy::TaskStart))),
            )
            .collect();
        for (task, (namespace, by)) in tasks {
            let command = OrchestrationCommand::process_task(task, namespace, by);
            if self.commands.submit_waiting(command).await.is_ok() {
                self.metrics.command_sent(by.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler's timing under a paused clock. Deadlines are wall-clock times (the
    //! database's), so the scripted source answers relative to `Utc::now()`; sleeps are
    //! measured on the paused tokio clock.

    use super::*;
    use crate::config::CommandProcessorConfig;
    use crate::model::command::EnqueueOutcome;
    use crate::readiness::commands::{CommandProcessor, PassRunner};
    use crate::readiness::poller::SweepRequester;
    use crate::store::EnqueueResult;
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;
    use uuid::Uuid;

    enum Ask {
        Next(oneshot::Sender<Option<DateTime<Utc>>>),
        Due(oneshot::Sender<Due>),
    }

    struct Scripted(mpsc::UnboundedSender<(Instant, Ask)>);

    impl DeadlineSource for Scripted {
        fn next_deadline(
            &self,
            _: Option<Vec<String>>,
        ) -> BoxFuture<'static, Result<Option<DateTime<Utc>>, StoreError>> {
            let (tx, rx) = oneshot::channel();
            let _ = self.0.send((Instant::now(), Ask::Next(tx)));
            Box::pin(async move { Ok(rx.await.unwrap_or(None)) })
        }

        fn take_due(&self, _: i32, _: Option<Vec<String>>) -> BoxFuture<'static, Due> {
            let (tx, rx) = oneshot::channel();
            let _ = self.0.send((Instant::now(), Ask::Due(tx)));
            Box::pin(async move { rx.await.unwrap_or_default() })
        }
    }

    /// Records the tasks commands were sent for.
    struct Recorder(mpsc::UnboundedSender<(Uuid, TriggeredBy)>);

    impl PassRunner for Recorder {
        fn run(
            &self,
            task: Uuid,
            _: String,
            _: serde_json::Value,
            triggered_by: TriggeredBy,
        ) -> BoxFuture<'static, Result<EnqueueResult, StoreError>> {
            let _ = self.0.send((task, triggered_by));
            Box::pin(async {
                Ok(EnqueueResult {
                    outcome: EnqueueOutcome::Enqueued,
                    namespace: None,
                    enqueued_steps: Vec::new(),
                    max_ready_wait_ms: None,
                    leased: Vec::new(),
                    queued: Vec::new(),
                    held: 0,
                })
            })
        }
    }

    const MAX_SLEEP: Duration = Duration::from_secs(30);

    struct Harness {
        asks: mpsc::UnboundedReceiver<(Instant, Ask)>,
        commands: mpsc::UnboundedReceiver<(Uuid, TriggeredBy)>,
        poke: DeadlinePoke,
        cancel: CancellationToken,
    }

    fn start() -> Harness {
        let (ask_tx, asks) = mpsc::unbounded_channel();
        let (cmd_tx, commands) = mpsc::unbounded_channel();
        let (handle, _task) = CommandProcessor::spawn(
            &CommandProcessorConfig::default(),
            Recorder(cmd_tx),
            SweepRequester::new(),
            Metrics::noop(),
        );
        let poke = DeadlinePoke::default();
        let scheduler = DeadlineScheduler::new(
            Scripted(ask_tx),
            handle,
            NamespaceSelector::from_config(&[]),
            MAX_SLEEP,
            poke.clone(),
            Metrics::noop(),
        );
        let cancel = CancellationToken::new();
        tokio::spawn(scheduler.run(cancel.clone()));
        Harness {
            asks,
            commands,
            poke,
            cancel,
        }
    }

    impl Harness {
        async fn ask(&mut self) -> (Instant, Ask) {
            tokio::time::timeout(Duration::from_secs(3600), self.asks.recv())
                .await
                .expect("the scheduler asked nothing")
                .expect("the scheduler stopped")
        }

        /// The next question must be "what is the next deadline?"; answer it.
        async fn answer_next(&mut self, at: Option<DateTime<Utc>>) -> Instant {
            match self.ask().await {
                (when, Ask::Next(tx)) => {
                    tx.send(at).unwrap();
                    when
                }
                (_, Ask::Due(_)) => panic!("asked for due work, expected a deadline query"),
            }
        }

        /// The next question must be "what is due?"; answer it.
        async fn answer_due(&mut self, due: Due) -> Instant {
            match self.ask().await {
                (when, Ask::Due(tx)) => {
                    tx.send(due).unwrap();
                    when
                }
                (_, Ask::Next(_)) => panic!("asked for a deadline, expected a wake-up"),
            }
        }
    }

    fn in_ms(ms: i64) -> Option<DateTime<Utc>> {
        Some(Utc::now() + chrono::Duration::milliseconds(ms))
    }

    fn task_ref() -> TaskRef {
        TaskRef {
            task_uuid: Uuid::now_v7(),
            step_uuid: Uuid::now_v7(),
            namespace: "ns".into(),
            priority: 0,
        }
    }

    fn near(d: Duration, ms: u64) -> bool {
        d >= Duration::from_millis(ms.saturating_sub(20)) && d <= Duration::from_millis(ms + 20)
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_until_the_next_deadline_then_sends_a_command_per_task() {
        let mut h = start();
        let asked = h.answer_next(in_ms(300)).await;
        let t = task_ref();
        let woke = h
            .answer_due(Due {
                retries: vec![t.clone()],
                ..Due::default()
            })
            .await;
        assert!(near(woke - asked, 300), "woke after {:?}", woke - asked);
        let (task, by) = h.commands.recv().await.unwrap();
        assert_eq!((task, by), (t.task_uuid, TriggeredBy::RetryTimer));
        // nothing known any more: it looks again after the cap (other instances make
        // deadlines too)
        let asked = h.answer_next(None).await;
        let woke = h.answer_due(Due::default()).await;
        assert!(near(woke - asked, MAX_SLEEP.as_millis() as u64));
        h.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_wakes_it_before_its_plan() {
        let mut h = start();
        let asked = h.answer_next(None).await; // sleeping for the cap now
        tokio::task::yield_now().await;
        h.poke
            .deadline_at(Utc::now() + chrono::Duration::milliseconds(200));
        let reread = h.answer_next(in_ms(200)).await;
        assert!(near(reread - asked, 0), "poked: reads again at once");
        let woke = h.answer_due(Due::default()).await;
        assert!(near(woke - reread, 200));
        h.cancel.cancel();
    }

    /// The race: a retry created while the scheduler reads the next deadline (its read does
    /// not see it yet) must still wake it, although the previous plan lies in the past.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_announced_while_it_reads_is_not_lost() {
        let mut h = start();
        // first round: something is due at once, so the published plan is "now" (then past)
        h.answer_next(in_ms(0)).await;
        h.answer_due(Due::default()).await;
        // second read in flight: a retry due in 100 ms is announced before it answers
        let (asked, tx) = match h.ask().await {
            (when, Ask::Next(tx)) => (when, tx),
            _ => panic!("expected a deadline query"),
        };
        h.poke
            .deadline_at(Utc::now() + chrono::Duration::milliseconds(100));
        tx.send(None).unwrap(); // the read that did not see it
        let reread = h.answer_next(in_ms(100)).await;
        assert!(
            reread - asked < Duration::from_secs(1),
            "the announcement was lost: next read after {:?}",
            reread - asked
        );
        let woke = h.answer_due(Due::default()).await;
        assert!(near(woke - reread, 100));
        h.cancel.cancel();
    }
}
