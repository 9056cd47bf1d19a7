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
//!  pass: TaskClaimStepEnqueuer (claimed elsewhere -> retry after a short delay)
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use uuid::Uuid;

use super::{
    CommandEvent, CommandFailure, CommandOutcome, CommandPhase, CommandResult, OrchestrationCommand,
};
use crate::config::CommandProcessorConfig;
use crate::enqueue::TaskClaimStepEnqueuer;
use crate::metrics::Metrics;
use crate::vocabulary::EnqueueOutcome;

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
}

impl ProcessorStats {
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
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
    events: broadcast::Sender<CommandEvent>,
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

    /// Every lifecycle event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CommandEvent> {
        self.events.subscribe()
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
    pub fn spawn(
        cfg: &CommandProcessorConfig,
        enqueuer: TaskClaimStepEnqueuer,
        metrics: Metrics,
    ) -> (CommandProcessorHandle, ProcessorTask) {
        let capacity = cfg.channel_capacity;
        let (tx, rx) = mpsc::channel(capacity);
        let (events, _) = broadcast::channel(cfg.event_buffer);
        let stats = Arc::new(ProcessorStats::default());
        let stop = CancellationToken::new();
        let grace = cfg.shutdown_grace_period;
        let actor = Actor {
            rx,
            pass: PassContext {
                enqueuer,
                events: events.clone(),
                metrics: metrics.clone(),
                stats: stats.clone(),
                claim_retry_delay: cfg.claim_retry_delay,
                claim_retry_attempts: cfg.claim_retry_attempts,
            },
            max_concurrent: cfg.max_concurrent_commands,
            in_flight: HashMap::new(),
            running: JoinSet::new(),
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
    enqueuer: TaskClaimStepEnqueuer,
    events: broadcast::Sender<CommandEvent>,
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
}

struct Actor {
    rx: mpsc::Receiver<Envelope>,
    pass: PassContext,
    max_concurrent: usize,
    /// Tasks with a pass running -> the rerun to do after it, if any command came meanwhile.
    in_flight: HashMap<Uuid, Option<Pass>>,
    running: JoinSet<Uuid>,
    /// Which task each running pass serves, so a pass that panics still frees its task.
    running_tasks: HashMap<tokio::task::Id, Uuid>,
    stop: CancellationToken,
    grace: Duration,
}

impl Actor {
    async fn run(mut self) {
        let mut draining_since: Option<Instant> = None;
        loop {
            let room = self.running.len() < self.max_concurrent;
            tokio::select! {
                biased;
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.pass_finished(done);
                }
                _ = self.stop.cancelled(), if draining_since.is_none() => {
                    // stop intake: senders now get ShuttingDown; what is queued is still received
                    self.rx.close();
                    draining_since = Some(Instant::now());
                }
                maybe = self.rx.recv(), if room => match maybe {
                    Some(env) => self.accept(env),
                    None => {
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
                    None => {
                        *rerun = Some(Pass {
                            owner: env,
                            coalesced: Vec::new(),
                        })
                    }
                    Some(pass) => {
                        if let Some(reply) = env.reply {
                            pass.coalesced.push((env.id, reply));
                        }
                    }
                }
            }
            None => {
                self.in_flight.insert(task, None);
                self.spawn(Pass {
                    owner: env,
                    coalesced: Vec::new(),
                });
            }
        }
    }

    fn pass_finished(&mut self, done: Result<(tokio::task::Id, Uuid), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Err(e) = &done {
            // the task is still ready in the database; the rerun or the poller will take it
            tracing::error!(error = %e, "command pass ended abnormally");
            self.pass.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(task) = self.running_tasks.remove(&id) else {
            return;
        };
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
        Some(s) => tokio::time::sleep_until((s + grace).into()).await,
        None => std::future::pending().await,
    }
}

/// One claim-and-enqueue pass for the owner's task; replies to everyone waiting on it.
async fn run_pass(ctx: PassContext, pass: Pass) -> Uuid {
    let Pass { owner, coalesced } = pass;
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
        outcome = tracing::field::Empty,
        steps_enqueued = tracing::field::Empty,
    );
    publish(
        &ctx.events,
        owner.id,
        command,
        CommandPhase::Started,
        owner.received,
        |_| {},
    );
    let metadata = json!({ "command_id": owner.id, "triggered_by": triggered_by.as_str() });

    let (outcome, steps) = async {
        let mut claim_retries = 0;
        let mut transient_retries = 0;
        loop {
            match ctx.enqueuer.claim_and_enqueue(task_uuid, &metadata, triggered_by).await {
                Ok(r) if r.outcome == EnqueueOutcome::ClaimedElsewhere && claim_retries < ctx.claim_retry_attempts => {
                    // The holder may have read its ready set before a completion that made more
                    // steps ready; try again once it is likely done.
                    claim_retries += 1;
                    tokio::time::sleep(ctx.claim_retry_delay * claim_retries).await;
                }
                Ok(r) => break (CommandOutcome::Finished(r.outcome), r.enqueued_steps),
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
                    break (CommandOutcome::Failed(failure), Vec::new());
                }
            }
        }
    }
    .instrument(span.clone())
    .await;

    span.record("outcome", outcome.as_str());
    span.record("steps_enqueued", steps.len());
    let (phase, error) = match &outcome {
        CommandOutcome::Failed(f) => (CommandPhase::Failed, Some(f.message().to_string())),
        _ => (CommandPhase::Completed, None),
    };
    publish(&ctx.events, owner.id, command, phase, owner.received, |e| {
        e.outcome = Some(outcome.as_str().to_string());
        e.steps_enqueued = steps.len() as u32;
        e.error = error.clone();
    });
    ctx.metrics.command_processed(outcome.as_str());
    ctx.stats.processed.fetch_add(1, Ordering::Relaxed);
    ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);

    let result = CommandResult {
        command_id: owner.id,
        outcome,
        enqueued_steps: steps,
        coalesced: false,
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
    task_uuid
}

fn publish(
    events: &broadcast::Sender<CommandEvent>,
    id: Uuid,
    command: &OrchestrationCommand,
    phase: CommandPhase,
    received: Instant,
    fill: impl FnOnce(&mut CommandEvent),
) {
    if events.receiver_count() == 0 {
        return;
    }
    let mut event = CommandEvent {
        command_id: id,
        task_uuid: command.task_uuid(),
        namespace: command.namespace().to_string(),
        triggered_by: command.triggered_by(),
        phase,
        outcome: None,
        steps_enqueued: 0,
        duration: received.elapsed(),
        timestamp: Utc::now(),
        error: None,
    };
    fill(&mut event);
    let _ = events.send(event);
}
