//! `[orchestration.*]`: how ready work is found (the deployment mode, the fallback poller, the
//! listener), processed (the command processor), completed (batched completions), handed to
//! workers (parked fetches) and shared between replicas. Each section states its defaults,
//! with the reason for each, and validates itself.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::{Checks, DAY_S};
use super::units::{millis, seconds};
use crate::model::mode::DeploymentMode;
use crate::model::namespaces::namespace_name_problem;
use crate::model::retention::RetentionDefaults;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestrationConfig {
    pub deployment: DeploymentConfig,
    pub task_readiness: TaskReadinessConfig,
    pub command_processor: CommandProcessorConfig,
    pub completions: CompletionsConfig,
    pub workers: WorkersConfig,
    pub replicas: ReplicasConfig,
    pub scheduling: SchedulingConfig,
    pub retention: RetentionConfig,
}

impl OrchestrationConfig {
    pub(super) fn validate(&self, c: &mut Checks) {
        self.task_readiness
            .validate(&mut c.section("task_readiness"));
        self.command_processor
            .validate(&mut c.section("command_processor"));
        self.completions.validate(&mut c.section("completions"));
        self.workers.validate(&mut c.section("workers"));
        self.replicas.validate(&mut c.section("replicas"));
        self.scheduling.validate(&mut c.section("scheduling"));
        self.retention.validate(&mut c.section("retention"));
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentConfig {
    /// Hybrid by default: events do the work, the poller proves it by finding nothing.
    pub mode: DeploymentMode,
}

/// The fallback poller and the LISTEN connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskReadinessConfig {
    #[serde(rename = "fallback_polling_interval_seconds", with = "seconds")]
    pub fallback_polling_interval: Duration,
    #[serde(rename = "age_threshold_seconds", with = "seconds")]
    pub age_threshold: Duration,
    pub batch_size: u32,
    /// Namespaces this instance serves: exact names or prefix patterns ending in `*`
    /// (`billing-*`). Empty means all.
    pub namespaces: Vec<String>,
    #[serde(rename = "listener_max_backoff_ms", with = "millis")]
    pub listener_max_backoff: Duration,
    #[serde(rename = "listener_ping_interval_seconds", with = "seconds")]
    pub listener_ping_interval: Duration,
}

impl Default for TaskReadinessConfig {
    fn default() -> Self {
        Self {
            // Events do the work, the poller is a safety net; with the jitter and the age
            // threshold it finds a missed event within `MISSED_EVENT_BOUND`.
            fallback_polling_interval: Duration::from_secs(25),
            // A task ready for less than this is probably being handled by its notification
            // right now.
            age_threshold: Duration::from_secs(2),
            // Tasks per poller query; the poller loops while a round comes back full.
            batch_size: 50,
            namespaces: Vec::new(),
            // Upper bound of the listener's reconnect backoff (jittered, doubling from 100 ms).
            listener_max_backoff: Duration::from_millis(5_000),
            // A LISTEN connection that is silently dead (no RST) is noticed within this.
            listener_ping_interval: Duration::from_secs(15),
        }
    }
}

impl TaskReadinessConfig {
    fn validate(&self, c: &mut Checks) {
        c.seconds(
            "fallback_polling_interval_seconds",
            self.fallback_polling_interval,
            1,
            DAY_S,
        );
        c.seconds("age_threshold_seconds", self.age_threshold, 0, DAY_S);
        c.range("batch_size", self.batch_size, 1, 10_000);
        c.millis(
            "listener_max_backoff_ms",
            self.listener_max_backoff,
            100,
            600_000,
        );
        c.seconds(
            "listener_ping_interval_seconds",
            self.listener_ping_interval,
            1,
            3_600,
        );
        for (i, ns) in self.namespaces.iter().enumerate() {
            // an entry is a namespace, or a prefix pattern ending in '*'
            let problem = match ns.strip_suffix('*') {
                Some(prefix) => namespace_name_problem(prefix)
                    .map(|p| format!("pattern {ns:?}: the part before '*' {p}")),
                None => namespace_name_problem(ns).map(|p| format!("namespace {ns:?} {p}")),
            };
            if let Some(problem) = problem {
                c.problem(&format!("namespaces[{i}]"), problem);
            }
        }
    }
}

/// The command processor: the one place commands are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandProcessorConfig {
    pub channel_capacity: usize,
    /// Lifecycle events kept for stream observers; one that falls further behind gets a gap
    /// event saying how many it missed.
    pub event_buffer: usize,
    pub max_concurrent_commands: usize,
    #[serde(rename = "claim_retry_delay_ms", with = "millis")]
    pub claim_retry_delay: Duration,
    pub claim_retry_attempts: u32,
    #[serde(rename = "shutdown_grace_period_seconds", with = "seconds")]
    pub shutdown_grace_period: Duration,
}

impl Default for CommandProcessorConfig {
    fn default() -> Self {
        Self {
            // Bounded: beyond this, senders are told "overloaded" instead of queueing without
            // limit; the poller picks up whatever was refused.
            channel_capacity: 1_024,
            // Enough for a few seconds of a busy processor.
            event_buffer: 4_096,
            // Each command holds a pooled connection for one short transaction.
            max_concurrent_commands: 8,
            // A task claimed by another instance is tried again after this delay: the holder
            // may have read its ready set before a completion that made more steps ready.
            claim_retry_delay: Duration::from_millis(25),
            claim_retry_attempts: 8,
            // In-flight commands get this long to finish on shutdown before they are
            // abandoned (their tasks stay ready and are picked up by the next startup sweep).
            shutdown_grace_period: Duration::from_secs(10),
        }
    }
}

impl CommandProcessorConfig {
    fn validate(&self, c: &mut Checks) {
        c.range("channel_capacity", self.channel_capacity, 1, 1_000_000);
        c.range("event_buffer", self.event_buffer, 1, 1_000_000);
        c.range(
            "max_concurrent_commands",
            self.max_concurrent_commands,
            1,
            1_000,
        );
        c.millis("claim_retry_delay_ms", self.claim_retry_delay, 1, 60_000);
        c.range("claim_retry_attempts", self.claim_retry_attempts, 0, 100);
        c.seconds(
            "shutdown_grace_period_seconds",
            self.shutdown_grace_period,
            0,
            3_600,
        );
    }
}

/// How workers' completions reach the database (`dispatch::completions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletionsConfig {
    /// Completions committed together at most; 1 commits each on its own.
    pub max_batch: usize,
    /// Batches (or lone completions, run at once when nothing waits) in flight at once.
    pub executors: usize,
}

impl Default for CompletionsConfig {
    fn default() -> Self {
        Self {
            // The NOTIFY commit lock is taken once per batch instead of once per completion;
            // a lone completion is never held back.
            max_batch: 64,
            // Two: one batch commits while the next does its row work.
            executors: 2,
        }
    }
}

impl CompletionsConfig {
    fn validate(&self, c: &mut Checks) {
        c.range("max_batch", self.max_batch, 1, 10_000);
        c.range("executors", self.executors, 1, 64);
    }
}

/// The workers' side: parked `FetchSteps` long-polls and what a step may be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// A parked fetch re-reads the queue this often even without a wake-up: a safety net for
    /// a wake-up that was missed (an announcement from another replica that was lost).
    #[serde(rename = "fetch_recheck_interval_ms", with = "millis")]
    pub fetch_recheck_interval: Duration,
    /// FetchSteps calls waiting at once (all namespaces); beyond it, RESOURCE_EXHAUSTED.
    pub max_parked_fetches: usize,
    /// ... in one namespace.
    pub max_parked_fetches_per_namespace: usize,
    /// ... from one caller: a token, or a peer address when no tokens are configured.
    pub max_parked_fetches_per_caller: usize,
    /// Bytes of parent results one step can be given (the sum over its parents).
    pub max_parent_results_bytes: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            // Steps queued on any replica wake the parked fetches at once (locally, or by
            // announcement); this only bounds the wait after a wake-up was lost.
            fetch_recheck_interval: Duration::from_millis(250),
            max_parked_fetches: 1_024,
            // A namespace can take a quarter of the places, not all.
            max_parked_fetches_per_namespace: 256,
            max_parked_fetches_per_caller: 256,
            // A completion that would take a child past this is refused.
            max_parent_results_bytes: 1024 * 1024,
        }
    }
}

impl WorkersConfig {
    fn validate(&self, c: &mut Checks) {
        c.millis(
            "fetch_recheck_interval_ms",
            self.fetch_recheck_interval,
            10,
            DAY_S * 1000,
        );
        c.range("max_parked_fetches", self.max_parked_fetches, 1, 1_000_000);
        c.range(
            "max_parked_fetches_per_namespace",
            self.max_parked_fetches_per_namespace,
            1,
            1_000_000,
        );
        c.range(
            "max_parked_fetches_per_caller",
            self.max_parked_fetches_per_caller,
            1,
            1_000_000,
        );
        c.range(
            "max_parent_results_bytes",
            self.max_parent_results_bytes,
            1024,
            1 << 30,
        );
    }
}

/// The replica registry: each service process heart-beats into the database, so replicas know
/// whether others are alive (and then announce enqueued steps to their parked fetches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    #[serde(rename = "heartbeat_interval_ms", with = "millis")]
    pub heartbeat_interval: Duration,
    /// A replica whose heartbeat is older than this is gone.
    #[serde(rename = "gone_after_ms", with = "millis")]
    pub gone_after: Duration,
    /// Steps queued here that no local fetch took are announced to the other replicas only
    /// if no local fetch takes them within this grace (0: at once).
    #[serde(rename = "announce_grace_ms", with = "millis")]
    pub announce_grace: Duration,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            gone_after: Duration::from_secs(5),
            announce_grace: Duration::from_millis(5),
        }
    }
}

impl ReplicasConfig {
    fn validate(&self, c: &mut Checks) {
        c.millis(
            "heartbeat_interval_ms",
            self.heartbeat_interval,
            100,
            60_000,
        );
        c.millis("announce_grace_ms", self.announce_grace, 0, 1_000);
        if self.gone_after < self.heartbeat_interval * 2 {
            c.problem(
                "gone_after_ms",
                format!(
                    "must be at least twice heartbeat_interval_ms ({} ms), is {} ms",
                    self.heartbeat_interval.as_millis(),
                    self.gone_after.as_millis()
                ),
            );
        }
    }
}

/// Time as an input: tasks that start later (`CreateTaskRequest.start_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// How far ahead a task may be created to start: a start years away is almost always a
    /// unit mistake (milliseconds sent as seconds), refused rather than kept for ever.
    pub max_start_delay_days: u32,
    /// How late a schedule's tick may run and still be on time. A later one was missed (no
    /// replica ran then) and its schedule's catch-up policy decides.
    #[serde(rename = "misfire_grace_ms", with = "millis")]
    pub misfire_grace: Duration,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            max_start_delay_days: 365,
            // a replica's restart or a long pause of the process does not lose ticks; an
            // outage longer than this does, as the catch-up policy says
            misfire_grace: Duration::from_secs(10),
        }
    }
}

impl SchedulingConfig {
    /// [`max_start_delay_days`](Self::max_start_delay_days) as a duration.
    pub fn max_start_delay(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_start_delay_days) * DAY_S)
    }

    fn validate(&self, c: &mut Checks) {
        c.range("max_start_delay_days", self.max_start_delay_days, 1, 36_500);
        c.millis("misfire_grace_ms", self.misfire_grace, 100, DAY_S * 1000);
    }
}

/// The longest a finished task may be kept: ten years (there is no "for ever": a namespace
/// that must keep everything sets this and archives elsewhere).
pub const MAX_RETENTION: Duration = Duration::from_secs(3_650 * DAY_S);

/// Retention: how long finished tasks are kept, and the purge that removes them afterwards
/// (`tasker.purge_finished_tasks`, run by every replica; the tasks each batch removes are
/// claimed, so replicas never purge the same rows). A namespace's own periods
/// (`AdminService.SetNamespaceSettings`) override the two defaults here, which should be the
/// same on every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Whether this replica purges.
    pub purge: bool,
    /// Tasks complete or cancelled for longer than this are removed with all their rows.
    #[serde(rename = "retention_seconds", with = "seconds")]
    pub retention: Duration,
    /// Tasks in error for longer than this are removed (longer: someone may still look into
    /// them, retry them or resolve their steps).
    #[serde(rename = "error_retention_seconds", with = "seconds")]
    pub error_retention: Duration,
    /// Tasks removed per transaction.
    pub purge_batch_size: u32,
    /// The most time one purge round spends deleting; the rest waits for the next round.
    #[serde(rename = "purge_round_budget_ms", with = "millis")]
    pub purge_round_budget: Duration,
    /// How often a purger that has caught up looks again.
    #[serde(rename = "purge_interval_ms", with = "millis")]
    pub purge_interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            purge: true,
            // a week: enough to look into what ran last weekend; River keeps a day, Temporal
            // asks for one to thirty days per namespace
            retention: Duration::from_secs(7 * DAY_S),
            // a month for tasks in error: they wait for a person
            error_retention: Duration::from_secs(30 * DAY_S),
            // about a thousand rows per ten-step task: a batch stays a few tens of
            // milliseconds, so it never holds a lock the hop waits for for long
            purge_batch_size: 100,
            // a round yields the database well within a hop's budget of a second's work
            purge_round_budget: Duration::from_millis(250),
            // retention is counted in minutes to days: ten seconds late is on time
            purge_interval: Duration::from_secs(10),
        }
    }
}

impl RetentionConfig {
    /// The two default periods, as the purge takes them.
    pub fn defaults(&self) -> RetentionDefaults {
        RetentionDefaults {
            retention: self.retention,
            error_retention: self.error_retention,
        }
    }

    fn validate(&self, c: &mut Checks) {
        let max = MAX_RETENTION.as_secs();
        c.seconds("retention_seconds", self.retention, 1, max);
        c.seconds("error_retention_seconds", self.error_retention, 1, max);
        c.range("purge_batch_size", self.purge_batch_size, 1, 10_000);
        c.millis("purge_round_budget_ms", self.purge_round_budget, 10, 60_000);
        c.millis("purge_interval_ms", self.purge_interval, 100, DAY_S * 1000);
    }
}
