//! The `CommandProcessor` actor: a bounded queue of commands, processed concurrently up to a
//! limit, never two at once for the same task.
//!
//! ```text
//!  senders: listener, poller, sweeps, deadline timer, gRPC
//!     │ try_submit / execute            -> full queue: SubmitError::Overloaded at once
//!     │ submit_waiting / execute_waiting -> wait for room (the poller: backpressure)
//!     ▼
//!  actor loop ─ receives only while fewer than max_concurrent passes run
//!     │ task already in flight? ─yes─> mark it to run once more (coalesce); keep the reply
//!     │                          no ──> spawn a pass
//!     ▼
//!  pass: TaskClaimStepEnqueuer
//!     │ claimed elsewhere ──> slot free; the task stays in flight; after delay x attempt the
//!     │                       pass queues again for a slot (ahead of new commands)
//!     │ finished: rerun marked? ─yes─> one more pass for the task (same slot)
//!     │                          no ──> slot free
//! ```
//!
//! A burst of N commands for one task therefore costs at most two passes: the one in flight
//! and one rerun that sees everything committed before it started. Every phase of every
//! command is published on a broadcast channel; a slow observer lags and is told how much it
//! missed by the channel, it never slows the processor.
//!
//! Shutdown: [`ProcessorTask::shutdown`] stops intake (senders get `ShuttingDown`), processes
//! what is already queued and in flight for up to the grace period, then abandons the rest:
//! abandoned tasks are still ready in the database and the next start-up sweep takes them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use chrono::Utc;
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use uuid::Uuid;

use super::{
    CommandEvent, CommandEventLog, CommandFailure, CommandOutcome, CommandPhase, CommandResult,
    OrchestrationCommand, Resumed,
};
use crate::config::CommandProcessorConfig;
use crate::dispatch::enqueue::TaskClaimStepEnqueuer;
use crate::model::command::{EnqueueOutcome, TriggeredBy};
use crate::readiness::poller::SweepRequester;
use crate::store::{EnqueueResult, StoreError};
use crate::telemetry::metrics::Metrics;

/// What a pass runs: one claim-and-enqueue for a task. The service's is the
/// [`TaskClaimStepEnqueuer`]; the unit tests below script their own to drive the actor's
/// timing (coalescing, retries, overload, shutdown) under a paused clock.
pub trait PassRunner: Send + Sync + 'static {
    fn run(
        &self,
        task_uuid: Uuid,
        namespace: String,
        metadata: serde_json::Value,
        triggered_by: TriggeredBy,
    ) -> BoxFuture<'static, Result<EnqueueResult, StoreError>>;
}

impl PassRunner for TaskClaimStepEnqueuer {
    fn run(
        &self,
        task_uuid: Uuid,
        namespace: String,
        metadata: serde_json::Value,
        triggered_by: TriggeredBy,
    ) -> BoxFuture<'static, Result<EnqueueResult, StoreError>> {
        let enqueuer = self.clone();
        Box::pin(async move {
            enqueuer
                .claim_and_enqueue(task_uuid, &namespace, &metadata, triggered_by)
                .await
        })
    }
}

/// A pass whose database work fails with a retryable error is tried this many more times.
const TRANSIENT_RETRIES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the command processor is saturated (queue full); try again later")]
    Overloaded,
    #[error("the command processor is shutting down")]
    ShuttingDown,
}

/// Counters shared by the actor and its handles.
#[derive(Debug, Default)]
pub struct ProcessorStats {
    in_flight: AtomicU64,
    processed: AtomicU64,
    /// Claim attempts that found the task's claim held by someone else (another replica, or
    /// another pass here): each retry counts.
    claims_lost: AtomicU64,
}

impl ProcessorStats {
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    pub fn claims_lost(&self) -> u64 {
        self.claims_lost.load(Ordering::Relaxed)
    }
}

struct Envelope {
    id: Uuid,
    command: OrchestrationCommand,
    received: Instant,
    reply: Option<oneshot::Sender<CommandResult>>,
    /// The sender's span: the pass's span is its child, so a trace follows the command.
    parent: Span,
}

/// Cheap to clone; the actor stops once every handle is dropped (or on shutdown).
#[derive(Clone)]
pub struct CommandProcessorHandle {
    tx: mpsc::Sender<Envelope>,
    events: Arc<CommandEventLog>,
    stats: Arc<ProcessorStats>,
    metrics: Metrics,
    capacity: usize,
}

impl CommandProcessorHandle {
    /// Queue a command without waiting; `Overloaded` when the queue is full.
    pub fn try_submit(&self, command: OrchestrationCommand) -> Result<Uuid, SubmitError> {
        let (env, _) = self.envelope(command, false);
        let id = env.id;
        self.try_send(env)?;
        Ok(id)
    }

    /// Queue a command, waiting for room in the queue (backpressure instead of refusal).
    pub async fn submit_waiting(&self, command: OrchestrationCommand) -> Result<Uuid, SubmitError> {
        let (env, _) = self.envelope(command, false);
        let id = env.id;
        self.send_waiting(env).await?;
        Ok(id)
    }

    /// Queue a command and wait for its result; `Overloaded` at once when the queue is full.
    pub async fn execute(
        &self,
        command: OrchestrationCommand,
    ) -> Result<CommandResult, SubmitError> {
        let (env, rx) = self.envelope(command, true);
        self.try_send(env)?;
        rx.expect("reply requested")
            .await
            .map_err(|_| SubmitError::ShuttingDown)
    }

    /// Queue a command, waiting for room, and wait for its result.
    pub async fn execute_waiting(
        &self,
        command: OrchestrationCommand,
    ) -> Result<CommandResult, SubmitError> {
        let (env, rx) = self.envelope(command, true);
        self.send_waiting(env).await?;
        rx.expect("reply requested")
            .await
            .map_err(|_| SubmitError::ShuttingDown)
    }

    /// A readiness pass another transaction ran itself (eager dispatch: the completion that
    /// made the steps ready claimed and enqueued them): published and counted like a pass of
    /// the processor's own, so that observers see every enqueue. `started`: when it began.
    pub fn record_inline(
        &self,
        command: &OrchestrationCommand,
        result: &EnqueueResult,
        started: Instant,
    ) {
        let id = Uuid::now_v7();
        publish(
            &self.events,
            id,
            command,
            CommandPhase::Started,
            started,
            |_| {},
        );
        let outcome = CommandOutcome::Finished(result.outcome);
        publish(
            &self.events,
            id,
            command,
            CommandPhase::Completed,
            started,
            |e| {
                e.outcome = Some(outcome.as_str().to_string());
                e.steps_enqueued = u32::try_from(result.enqueued_steps.len()).unwrap_or(u32::MAX);
                e.steps_held = u32::try_from(result.held).unwrap_or(u32::MAX);
            },
        );
        self.metrics.command_processed(outcome.as_str());
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
    }

    /// Every lifecycle event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CommandEvent> {
        self.events.subscribe()
    }

    /// Every lifecycle event after sequence number `after` that the log still holds, then
    /// every new one (see `event_log`).
    pub fn resume(&self, after: u64) -> Resumed {
        self.events.resume(after)
    }

    /// Commands queued and not yet picked up.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    pub fn stats(&self) -> &ProcessorStats {
        &self.stats
    }

    fn envelope(
        &self,
        command: OrchestrationCommand,
        want_reply: bool,
    ) -> (Envelope, Option<oneshot::Receiver<CommandResult>>) {
        let (reply, rx) = if want_reply {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        (
            Envelope {
                id: Uuid::now_v7(),
                command,
                received: Instant::now(),
                reply,
                parent: Span::current(),
            },
            rx,
        )
    }

    fn try_send(&self, env: Envelope) -> Result<(), SubmitError> {
        self.tx.try_send(env).map_err(|e| {
            let (env, err, reason) = match e {
                mpsc::error::TrySendError::Full(env) => {
                    (env, SubmitError::Overloaded, "overloaded")
                }
                mpsc::error::TrySendError::Closed(env) => {
                    (env, SubmitError::ShuttingDown, "shutting_down")
                }
            };
            self.reject(&env, reason);
            err
        })
    }

    async fn send_waiting(&self, env: Envelope) -> Result<(), SubmitError> {
        self.tx
            .send(env)
            .await
            .map_err(|mpsc::error::SendError(env)| {
                self.reject(&env, "shutting_down");
                SubmitError::ShuttingDown
            })
    }

    fn reject(&self, env: &Envelope, reason: &'static str) {
        self.metrics.command_rejected(reason);
        publish(
            &self.events,
            env.id,
            &env.command,
            CommandPhase::Rejected,
            env.received,
            |e| {
                e.error = Some(reason.to_string());
            },
        );
    }
}

/// The running actor; [`ProcessorTask::shutdown`] stops it gracefully.
pub struct ProcessorTask {
    join: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    grace: Duration,
}

impl ProcessorTask {
    /// Stop intake, finish queued and in-flight commands within the grace period.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let deadline = self.grace + Duration::from_secs(1);
        if tokio::time::timeout(deadline, self.join).await.is_err() {
            tracing::warn!("command processor did not stop within its grace period");
        }
    }
}

/// Namespace for [`CommandProcessor::spawn`].
pub struct CommandProcessor;

impl CommandProcessor {
    /// `sweeps`: a pass that fails for good asks for a catch-up sweep, so that its task is
    /// tried again in every deployment mode (with no periodic poller, nothing else would).
    pub fn spawn(
        cfg: &CommandProcessorConfig,
        runner: impl PassRunner,
        sweeps: SweepRequester,
        metrics: Metrics,
    ) -> (CommandProcessorHandle, ProcessorTask) {
        let capacity = cfg.channel_capacity;
        let (tx, rx) = mpsc::channel(capacity);
        let events = Arc::new(CommandEventLog::new(cfg.event_buffer));
        let stats = Arc::new(ProcessorStats::default());
        let stop = CancellationToken::new();
        let grace = cfg.shutdown_grace_period;
        let actor = Actor {
            rx,
            pass: PassContext {
                runner: Arc::new(runner),
                sweeps,
                events: events.clone(),
                metrics: metrics.clone(),
                stats: stats.clone(),
                claim_retry_delay: cfg.claim_retry_delay,
                claim_retry_attempts: cfg.claim_retry_attempts,
            },
            max_concurrent: cfg.max_concurrent_commands,
            in_flight: HashMap::new(),
            running: JoinSet::new(),
            delayed: JoinSet::new(),
            retries_due: VecDeque::new(),
            running_tasks: HashMap::new(),
            stop: stop.clone(),
            grace,
        };
        let join = tokio::spawn(
            actor
                .run()
                .instrument(tracing::info_span!("command_processor")),
        );
        (
            CommandProcessorHandle {
                tx,
                events,
                stats,
                metrics,
                capacity,
            },
            ProcessorTask { join, stop, grace },
        )
    }
}

/// What a pass needs, shared by all passes.
#[derive(Clone)]
struct PassContext {
    runner: Arc<dyn PassRunner>,
    sweeps: SweepRequester,
    events: Arc<CommandEventLog>,
    metrics: Metrics,
    stats: Arc<ProcessorStats>,
    claim_retry_delay: Duration,
    claim_retry_attempts: u32,
}

/// A pass to run for a task: the command that owns it and every caller waiting on it.
struct Pass {
    owner: Envelope,
    /// Replies for coalesced commands: (their command id, sender).
    coalesced: Vec<(Uuid, oneshot::Sender<CommandResult>)>,
    /// Attempts so far that found the task's claim held elsewhere.
    claim_retries: u32,
    /// The owner came while another pass for the task ran: this pass is that one's rerun,
    /// and the owner's answer says it was coalesced too.
    rerun: bool,
}

impl Pass {
    fn new(owner: Envelope) -> Self {
        Self {
            owner,
            coalesced: Vec::new(),
            claim_retries: 0,
            rerun: false,
        }
    }

    fn rerun(owner: Envelope) -> Self {
        Self {
            rerun: true,
            ..Self::new(owner)
        }
    }
}

/// How a pass ended: done, or to be tried again after a delay (the claim was held elsewhere)
/// without holding a slot meanwhile.
enum PassEnd {
    Done,
    RetryAfter(Duration, Pass),
}

struct Actor {
    rx: mpsc::Receiver<Envelope>,
    pass: PassContext,
    max_concurrent: usize,
    /// Tasks with a pass running -> the rerun to do after it, if any command came meanwhile.
    in_flight: HashMap<Uuid, Option<Pass>>,
    running: JoinSet<PassEnd>,
    /// Passes waiting out a claim-retry delay; they hold no slot (their task stays in flight).
    delayed: JoinSet<Pass>,
    /// Passes whose delay is over, waiting for a slot; served before new commands.
    retries_due: VecDeque<Pass>,
    /// Which task each running pass serves, so a pass that panics still frees its task.
    running_tasks: HashMap<tokio::task::Id, Uuid>,
    stop: CancellationToken,
    grace: Duration,
}

impl Actor {
    async fn run(mut self) {
        let mut draining_since: Option<Instant> = None;
        loop {
            while self.running.len() < self.max_concurrent {
                let Some(pass) = self.retries_due.pop_front() else {
                    break;
                };
                self.spawn(pass);
            }
            let room = self.running.len() < self.max_concurrent;
            tokio::select! {
                biased;
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.pass_finished(done);
                }
                Some(Ok(pass)) = self.delayed.join_next(), if !self.delayed.is_empty() => {
                    self.retries_due.push_back(pass);
                }
                _ = self.stop.cancelled(), if draining_since.is_none() => {
                    // stop intake: senders now get ShuttingDown; what is queued is still received
                    self.rx.close();
                    draining_since = Some(Instant::now());
                }
                maybe = self.rx.recv(), if room => match maybe {
                    Some(env) => self.accept(env),
                    None => {
                        // passes still waiting out a claim retry are abandoned: the claim
                        // they wait for is held by another replica, which works the task
                        if self.running.is_empty() {
                            break;
                        }
                        // every sender gone: finish what runs, then stop
                        if draining_since.is_none() {
                            draining_since = Some(Instant::now());
                        }
                        if self.wait_for_running(draining_since).await {
                            break;
                        }
                    }
                },
                _ = sleep_until_grace(draining_since, self.grace), if draining_since.is_some() => {
                    tracing::warn!(abandoned = self.running.len(), "grace period over; abandoning in-flight commands (their tasks stay ready for the next sweep)");
                    break;
                }
            }
        }
        self.running.abort_all();
    }

    /// With intake finished, wait for the running passes; false if the grace period ran out.
    async fn wait_for_running(&mut self, since: Option<Instant>) -> bool {
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.pass_finished(done),
                _ = sleep_until_grace(since, self.grace) => {
                    tracing::warn!(abandoned = self.running.len(), "grace period over; abandoning in-flight commands");
                    return true;
                }
            }
        }
        true
    }

    fn accept(&mut self, env: Envelope) {
        publish(
            &self.pass.events,
            env.id,
            &env.command,
            CommandPhase::Received,
            env.received,
            |_| {},
        );
        let task = env.command.task_uuid();
        match self.in_flight.get_mut(&task) {
            Some(rerun) => {
                publish(
                    &self.pass.events,
                    env.id,
                    &env.command,
                    CommandPhase::Coalesced,
                    env.received,
                    |_| {},
                );
                match rerun {
                    None => *rerun = Some(Pass::rerun(env)),
                    Some(pass) => {
                        if let Some(reply) = env.reply {
                            pass.coalesced.push((env.id, reply));
                        }
                    }
                }
            }
            None => {
                self.in_flight.insert(task, None);
                self.spawn(Pass::new(env));
            }
        }
    }

    fn pass_finished(&mut self, done: Result<(tokio::task::Id, PassEnd), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let Some(task) = self.running_tasks.remove(&id) else {
            return;
        };
        match done {
            Ok((_, PassEnd::RetryAfter(delay, pass))) => {
                // the slot is free; the task stays in flight, so commands for it meanwhile
                // coalesce into the rerun as usual
                self.delayed.spawn(async move {
                    tokio::time::sleep(delay).await;
                    pass
                });
                return;
            }
            Ok((_, PassEnd::Done)) => {}
            Err(e) => {
                // the task is still ready in the database; the rerun or the poller will take it
                tracing::error!(error = %e, "command pass ended abnormally");
                self.pass.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        match self.in_flight.get_mut(&task).and_then(Option::take) {
            Some(rerun) => self.spawn(rerun),
            None => {
                self.in_flight.remove(&task);
            }
        }
    }

    fn spawn(&mut self, pass: Pass) {
        let ctx = self.pass.clone();
        ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let task = pass.owner.command.task_uuid();
        let handle = self.running.spawn(run_pass(ctx, pass));
        self.running_tasks.insert(handle.id(), task);
    }
}

async fn sleep_until_grace(since: Option<Instant>, grace: Duration) {
    match since {
        Some(s) => tokio::time::sleep_until(s + grace).await,
        None => std::future::pending().await,
    }
}

/// One claim-and-enqueue pass for the owner's task; replies to everyone waiting on it, unless
/// the claim was held elsewhere and it is to be tried again (then it replies to nobody yet).
async fn run_pass(ctx: PassContext, pass: Pass) -> PassEnd {
    let Pass {
        owner,
        coalesced,
        claim_retries,
        rerun,
    } = pass;
    let command = &owner.command;
    let task_uuid = command.task_uuid();
    let triggered_by = command.triggered_by();
    let span = tracing::info_span!(
        parent: &owner.parent,
        "command.process_task_readiness",
        command_id = %owner.id,
        task_uuid = %task_uuid,
        namespace = %command.namespace(),
        triggered_by = triggered_by.as_str(),
        claim_retries,
        outcome = tracing::field::Empty,
        steps_enqueued = tracing::field::Empty,
    );
    if claim_retries == 0 {
        publish(
            &ctx.events,
            owner.id,
            command,
            CommandPhase::Started,
            owner.received,
            |_| {},
        );
    }
    let metadata = json!({ "command_id": owner.id, "triggered_by": triggered_by.as_str() });

    let ended = async {
        let mut transient_retries = 0;
        loop {
            let ran = ctx.runner.run(task_uuid, command.namespace().to_string(), metadata.clone(), triggered_by).await;
            if matches!(&ran, Ok(r) if r.outcome == EnqueueOutcome::ClaimedElsewhere) {
                ctx.stats.claims_lost.fetch_add(1, Ordering::Relaxed);
            }
            match ran {
                Ok(r) if r.outcome == EnqueueOutcome::ClaimedElsewhere && claim_retries < ctx.claim_retry_attempts => {
                    // The holder may have read its ready set before a completion that made more
                    // steps ready; try again once it is likely done, without holding a slot.
                    break Err(ctx.claim_retry_delay * (claim_retries + 1));
                }
                Ok(r) => {
                    break Ok((
                        CommandOutcome::Finished(r.outcome),
                        r.enqueued_steps,
                        u32::try_from(r.held).unwrap_or(u32::MAX),
                    ))
                }
                Err(e) if e.is_retryable() && transient_retries < TRANSIENT_RETRIES => {
                    transient_retries += 1;
                    tracing::warn!(error = %e, attempt = transient_retries, "claim-and-enqueue failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(transient_retries))).await;
                }
                Err(e) => {
                    // the database's own words stay in the log, with the command id in the span
                    tracing::error!(error = %e, "claim-and-enqueue failed");
                    let failure = if e.is_retryable() {
                        CommandFailure::DatabaseUnavailable
                    } else {
                        CommandFailure::Internal
                    };
                    // the task is still ready in the database: a sweep tries it again
                    ctx.sweeps.request();
                    break Ok((CommandOutcome::Failed(failure), Vec::new(), 0));
                }
            }
        }
    }
    .instrument(span.clone())
    .await;
    ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    let (outcome, steps, held) = match ended {
        Ok(done) => done,
        Err(delay) => {
            span.record("outcome", "claim_retry");
            return PassEnd::RetryAfter(
                delay,
                Pass {
                    owner,
                    coalesced,
                    claim_retries: claim_retries + 1,
                    rerun,
                },
            );
        }
    };

    span.record("outcome", outcome.as_str());
    span.record("steps_enqueued", steps.len());
    let (phase, error) = match &outcome {
        CommandOutcome::Failed(f) => (CommandPhase::Failed, Some(f.message().to_string())),
        _ => (CommandPhase::Completed, None),
    };
    publish(&ctx.events, owner.id, command, phase, owner.received, |e| {
        e.outcome = Some(outcome.as_str().to_string());
        e.steps_enqueued = steps.len() as u32;
        e.steps_held = held;
        e.error = error.clone();
    });
    ctx.metrics.command_processed(outcome.as_str());
    ctx.stats.processed.fetch_add(1, Ordering::Relaxed);

    let result = CommandResult {
        command_id: owner.id,
        outcome,
        enqueued_steps: steps,
        coalesced: rerun,
    };
    for (id, reply) in coalesced {
        let _ = reply.send(CommandResult {
            command_id: id,
            coalesced: true,
            ..result.clone()
        });
    }
    if let Some(reply) = owner.reply {
        let _ = reply.send(result);
    }
    PassEnd::Done
}

fn publish(
    events: &CommandEventLog,
    id: Uuid,
    command: &OrchestrationCommand,
    phase: CommandPhase,
    received: Instant,
    fill: impl FnOnce(&mut CommandEvent),
) {
    let mut event = CommandEvent {
        command_id: id,
        task_uuid: command.task_uuid(),
        namespace: command.namespace().to_string(),
        triggered_by: command.triggered_by(),
        phase,
        outcome: None,
        steps_enqueued: 0,
        steps_held: 0,
        duration: received.elapsed(),
        timestamp: Utc::now(),
        error: None,
        sequence: 0,
    };
    fill(&mut event);
    events.publish(event);
}

#[cfg(test)]
mod tests {
    //! The actor's timing, under a paused clock: each pass is answered by the test through a
    //! scripted runner, so every interleaving below is exact.

    use super::*;
    use crate::model::command::TriggeredBy;
    use futures::FutureExt;

    struct Call {
        task: Uuid,
        at: Instant,
        answer: oneshot::Sender<Result<EnqueueResult, StoreError>>,
    }

    #[derive(Clone)]
    struct Scripted {
        calls: mpsc::UnboundedSender<Call>,
    }

    impl PassRunner for Scripted {
        fn run(
            &self,
            task: Uuid,
            _namespace: String,
            _metadata: serde_json::Value,
            _triggered_by: TriggeredBy,
        ) -> BoxFuture<'static, Result<EnqueueResult, StoreError>> {
            let (answer, rx) = oneshot::channel();
            let _ = self.calls.send(Call {
                task,
                at: Instant::now(),
                answer,
            });
            Box::pin(async move { rx.await.unwrap_or(Err(StoreError::ShuttingDown)) })
        }
    }

    fn result(outcome: EnqueueOutcome) -> Result<EnqueueResult, StoreError> {
        Ok(EnqueueResult {
            outcome,
            namespace: Some("ns".into()),
            enqueued_steps: Vec::new(),
            max_ready_wait_ms: None,
            leased: Vec::new(),
            queued: Vec::new(),
            held: 0,
        })
    }

    fn config(capacity: usize, max_concurrent: usize) -> CommandProcessorConfig {
        CommandProcessorConfig {
            channel_capacity: capacity,
            max_concurrent_commands: max_concurrent,
            claim_retry_delay: Duration::from_millis(25),
            claim_retry_attempts: 3,
            shutdown_grace_period: Duration::from_secs(2),
            ..CommandProcessorConfig::default()
        }
    }

    fn start(
        cfg: &CommandProcessorConfig,
    ) -> (
        CommandProcessorHandle,
        ProcessorTask,
        mpsc::UnboundedReceiver<Call>,
        SweepRequester,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sweeps = SweepRequester::new();
        let (handle, task) =
            CommandProcessor::spawn(cfg, Scripted { calls: tx }, sweeps.clone(), Metrics::noop());
        (handle, task, rx, sweeps)
    }

    fn command(task: Uuid) -> OrchestrationCommand {
        OrchestrationCommand::process_task(task, "ns", TriggeredBy::Api)
    }

    /// The next call to the runner; fails the test (instead of hanging it) when none comes.
    /// With the clock paused, an idle runtime jumps straight to the timeout.
    async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
        tokio::time::timeout(Duration::from_secs(60), calls.recv())
            .await
            .expect("the runner was not called")
            .expect("the processor stopped")
    }

    /// Nothing more is asked of the runner: with the clock paused, an idle runtime jumps
    /// straight to the timeout.
    async fn no_more_calls(calls: &mut mpsc::UnboundedReceiver<Call>) {
        let more = tokio::time::timeout(Duration::from_secs(60), calls.recv()).await;
        assert!(more.is_err(), "an unexpected pass ran");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_for_one_task_costs_exactly_two_passes() {
        let (handle, task, mut calls, _) = start(&config(1024, 4));
        let mut events = handle.subscribe();
        let t = Uuid::now_v7();
        handle.try_submit(command(t)).unwrap();
        let first = next_call(&mut calls).await;
        assert_eq!(first.task, t);
        // 50 more while the first pass runs, and one caller that waits for its result
        for _ in 0..50 {
            handle.try_submit(command(t)).unwrap();
        }
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(t)).await }
        });
        let mut coalesced = 0;
        while coalesced < 51 {
            let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("commands for a task in flight are coalesced")
                .unwrap();
            if e.phase == CommandPhase::Coalesced {
                coalesced += 1;
            }
        }
        first.answer.send(result(EnqueueOutcome::Enqueued)).unwrap();
        // one rerun sees everything committed before it started
        let rerun = next_call(&mut calls).await;
        assert_eq!(rerun.task, t);
        rerun
            .answer
            .send(result(EnqueueOutcome::NothingReady))
            .unwrap();
        let r = waiting.await.unwrap().unwrap();
        assert!(r.coalesced);
        assert_eq!(
            r.outcome,
            CommandOutcome::Finished(EnqueueOutcome::NothingReady)
        );
        no_more_calls(&mut calls).await;
        assert_eq!(handle.stats().processed(), 2);
        task.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_says_so() {
        // one pass at a time, two queued behind it
        let (handle, task, mut calls, _) = start(&config(2, 1));
        let mut events = handle.subscribe();
        handle.try_submit(command(Uuid::now_v7())).unwrap();
        let running = next_call(&mut calls).await;
        handle.try_submit(command(Uuid::now_v7())).unwrap();
        handle.try_submit(command(Uuid::now_v7())).unwrap();
        // the actor gets every chance to run: no second pass starts beside the first, and
        // the two commands stay queued
        no_more_calls(&mut calls).await;
        assert_eq!(handle.queue_depth(), 2);
        assert_eq!(
            handle.try_submit(command(Uuid::now_v7())),
            Err(SubmitError::Overloaded)
        );
        assert!(matches!(
            handle.execute(command(Uuid::now_v7())).now_or_never(),
            Some(Err(SubmitError::Overloaded))
        ));
        let mut rejected = 0;
        while let Ok(e) = events.try_recv() {
            if e.phase == CommandPhase::Rejected {
                assert_eq!(e.error.as_deref(), Some("overloaded"));
                rejected += 1;
            }
        }
        assert_eq!(rejected, 2);
        running
            .answer
            .send(result(EnqueueOutcome::Enqueued))
            .unwrap();
        for _ in 0..2 {
            next_call(&mut calls)
                .await
                .answer
                .send(result(EnqueueOutcome::Enqueued))
                .unwrap();
        }
        task.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_held_elsewhere_is_retried_with_growing_delays() {
        let (handle, task, mut calls, _) = start(&config(16, 4));
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(Uuid::now_v7())).await }
        });
        let mut times = Vec::new();
        for _ in 0..4 {
            let call = next_call(&mut calls).await;
            times.push(call.at);
            call.answer
                .send(result(EnqueueOutcome::ClaimedElsewhere))
                .unwrap();
        }
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [25, 50, 75].map(Duration::from_millis),
            "delay x attempt, three retries"
        );
        let r = waiting.await.unwrap().unwrap();
        assert_eq!(
            r.outcome,
            CommandOutcome::Finished(EnqueueOutcome::ClaimedElsewhere)
        );
        assert_eq!(
            handle.stats().claims_lost(),
            4,
            "every attempt that lost counts"
        );
        no_more_calls(&mut calls).await;
        task.shutdown().await;
    }

    /// With one slot: while a pass waits out its claim-retry delay, another task's command
    /// runs at once, and the waiting pass gets the slot back when its delay is over.
    #[tokio::test(start_paused = true)]
    async fn a_pass_waiting_to_retry_a_claim_holds_no_slot() {
        let (handle, task, mut calls, _) = start(&config(16, 1));
        let (held, other) = (Uuid::now_v7(), Uuid::now_v7());
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(held)).await }
        });
        let lost = next_call(&mut calls).await;
        assert_eq!(lost.task, held);
        let lost_at = lost.at;
        lost.answer
            .send(result(EnqueueOutcome::ClaimedElsewhere))
            .unwrap();
        // give the actor the chance to see the pass end before the next command comes
        tokio::task::yield_now().await;
        handle.try_submit(command(other)).unwrap();
        let next = next_call(&mut calls).await;
        assert_eq!(next.task, other, "the other task's command runs first");
        assert_eq!(next.at, lost_at, "at once, not after the claim-retry delay");
        next.answer.send(result(EnqueueOutcome::Enqueued)).unwrap();
        let retry = next_call(&mut calls).await;
        assert_eq!(retry.task, held);
        assert_eq!(retry.at - lost_at, Duration::from_millis(25));
        retry.answer.send(result(EnqueueOutcome::Enqueued)).unwrap();
        let r = waiting.await.unwrap().unwrap();
        assert_eq!(
            r.outcome,
            CommandOutcome::Finished(EnqueueOutcome::Enqueued)
        );
        assert_eq!(handle.stats().in_flight(), 0);
        assert_eq!(handle.stats().processed(), 2);
        task.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_fails_for_good_reports_a_safe_error_and_asks_for_a_sweep() {
        let (handle, task, mut calls, sweeps) = start(&config(16, 4));
        let mut events = handle.subscribe();
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(Uuid::now_v7())).await }
        });
        next_call(&mut calls)
            .await
            .answer
            .send(Err(StoreError::Database(sqlx::Error::Protocol(
                "relation tasker.secret_table does not exist".into(),
            ))))
            .unwrap();
        let r = waiting.await.unwrap().unwrap();
        assert_eq!(r.outcome, CommandOutcome::Failed(CommandFailure::Internal));
        let failed = loop {
            let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("a failed event")
                .unwrap();
            if e.phase == CommandPhase::Failed {
                break e;
            }
        };
        let error = failed.error.unwrap();
        assert_eq!(error, CommandFailure::Internal.message());
        assert!(!error.contains("secret"), "{error}");
        assert!(
            sweeps.requested().now_or_never().is_some(),
            "a catch-up sweep was requested"
        );
        no_more_calls(&mut calls).await;
        task.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_then_reported_as_unavailable() {
        let (handle, task, mut calls, _) = start(&config(16, 4));
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(Uuid::now_v7())).await }
        });
        let mut times = Vec::new();
        for _ in 0..=TRANSIENT_RETRIES {
            let call = next_call(&mut calls).await;
            times.push(call.at);
            call.answer
                .send(Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)))
                .unwrap();
        }
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [50, 100, 150].map(Duration::from_millis));
        let r = waiting.await.unwrap().unwrap();
        assert_eq!(
            r.outcome,
            CommandOutcome::Failed(CommandFailure::DatabaseUnavailable)
        );
        task.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_intake_and_abandons_work_after_the_grace_period() {
        let cfg = config(16, 4);
        let (handle, task, mut calls, _) = start(&cfg);
        let stuck = tokio::spawn({
            let handle = handle.clone();
            async move { handle.execute(command(Uuid::now_v7())).await }
        });
        let _never_answered = next_call(&mut calls).await;
        let started = Instant::now();
        let stopping = tokio::spawn(task.shutdown());
        // intake stops at once, while the stuck pass still holds its grace period
        tokio::task::yield_now().await;
        assert_eq!(
            handle.try_submit(command(Uuid::now_v7())),
            Err(SubmitError::ShuttingDown)
        );
        stopping.await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= cfg.shutdown_grace_period && took < cfg.shutdown_grace_period * 2,
            "stopped after {took:?}"
        );
        assert_eq!(stuck.await.unwrap(), Err(SubmitError::ShuttingDown));
    }
}
