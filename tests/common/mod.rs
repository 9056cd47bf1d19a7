//! Shared test helpers: building tasks, acting as a worker, waiting on notifications.
//! Every test gets its own fresh database from `#[sqlx::test]` with the crate's migrator.

#![allow(dead_code)]

pub mod process;

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;
use tasker::testkit::TaskSpec;
use tasker::testkit::{CreatedTask, LeasedStep, Store};
use uuid::Uuid;

/// How long a test waits for something it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn create(store: &Store, spec: TaskSpec) -> CreatedTask {
    let task = spec.into_new_task().expect("valid spec");
    store
        .create_task(&task, &json!({}), None)
        .await
        .expect("create task")
}

pub fn step(created: &CreatedTask, name: &str) -> Uuid {
    created
        .steps
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .1
}

/// Enqueue what is ready, lease everything queued in the namespace.
pub async fn enqueue_and_lease(store: &Store, task: Uuid, namespace: &str) -> Vec<LeasedStep> {
    store
        .claim_and_enqueue(task, &json!({}), None, &[], None)
        .await
        .expect("enqueue");
    store
        .fetch_steps(
            namespace,
            &[tasker::testkit::DEFAULT_QUEUE.to_string()],
            "test-worker",
            1000,
            60_000,
        )
        .await
        .expect("fetch")
}

pub async fn complete(store: &Store, leased: &LeasedStep) {
    store
        .complete_step(leased.held(), &json!({"by": leased.name}), &json!({}), None)
        .await
        .expect("complete");
}

/// Create `spec`'s task with its first step allowed one attempt, lease that step and fail it
/// for good: the task is in error. The task, and the failed step.
pub async fn in_error(store: &Store, mut spec: TaskSpec) -> (CreatedTask, Uuid) {
    spec.steps[0].max_attempts = 1;
    let namespace = spec.namespace.clone();
    let t = create(store, spec).await;
    let first = enqueue_and_lease(store, t.task_uuid, &namespace).await[0].held();
    store
        .fail_step(
            first,
            &failure(json!({"message": "broken"}), false, 0),
            &json!({}),
            None,
        )
        .await
        .expect("fail for good");
    (t, first.step_uuid)
}

/// Lease the named step (enqueueing first) and complete it.
pub async fn run_named(store: &Store, task: Uuid, namespace: &str, name: &str) {
    let leased = enqueue_and_lease(store, task, namespace).await;
    let l = leased
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("step {name} was not leasable; got {:?}", names(&leased)));
    complete(store, l).await;
}

pub fn names(leased: &[LeasedStep]) -> Vec<String> {
    leased.iter().map(|l| l.name.clone()).collect()
}

pub async fn ready_names(store: &Store, task: Uuid) -> Vec<String> {
    store
        .step_readiness(task)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.ready)
        .map(|r| r.name)
        .collect()
}

pub async fn listener(pool: &PgPool, channels: &[&str]) -> PgListener {
    let mut l = PgListener::connect_with(pool).await.expect("listener");
    l.listen_all(channels.iter().copied())
        .await
        .expect("listen");
    l
}

pub async fn recv(l: &mut PgListener) -> PgNotification {
    tokio::time::timeout(WAIT, l.recv())
        .await
        .expect("timed out waiting for a notification")
        .expect("listener error")
}

/// Everything delivered on `channels` before a sentinel sent now: notifications are delivered
/// in commit order, so once the sentinel arrives nothing earlier is still on its way.
pub async fn drain_until_sentinel(
    pool: &PgPool,
    l: &mut PgListener,
    channels: &[&str],
) -> Vec<PgNotification> {
    let sentinel = format!("sentinel-{}", Uuid::now_v7());
    let mut tx = pool.begin().await.unwrap();
    for c in channels {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(c)
            .bind(&sentinel)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let mut got = Vec::new();
    let mut sentinels = 0;
    while sentinels < channels.len() {
        let n = recv(l).await;
        if n.payload() == sentinel {
            sentinels += 1;
        } else {
            got.push(n);
        }
    }
    got
}

pub fn failure(
    error: serde_json::Value,
    retryable: bool,
    backoff_ms: i64,
) -> tasker::testkit::StepFailure {
    tasker::testkit::StepFailure {
        error,
        retryable,
        backoff_ms: Some(backoff_ms),
    }
}

// ---- helpers for tests that run the orchestration core ----

use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::testkit::Engine;
use tasker::testkit::ListenerState;
use tasker::testkit::Metrics;

/// EventDrivenOnly (no poller) with the parked fetches' periodic re-read out of the way (an
/// hour): work reaches a waiting worker only by an event or a wake-up.
pub fn events_only_config() -> TaskerConfig {
    let mut cfg = test_config(DeploymentMode::EventDrivenOnly);
    cfg.orchestration.workers.fetch_recheck_interval = std::time::Duration::from_secs(3600);
    cfg
}

/// A configuration for tests: fast polling, no age threshold, quick claim retries.
pub fn test_config(mode: DeploymentMode) -> TaskerConfig {
    let mut c = TaskerConfig::default();
    c.orchestration.deployment.mode = mode;
    c.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(1);
    c.orchestration.task_readiness.age_threshold = Duration::from_secs(0);
    c.orchestration.task_readiness.listener_max_backoff = Duration::from_millis(200);
    c.orchestration.command_processor.claim_retry_delay = Duration::from_millis(5);
    c.orchestration.command_processor.shutdown_grace_period = Duration::from_secs(2);
    c
}

pub async fn start_core(pool: &PgPool, config: &TaskerConfig) -> Engine {
    start_core_with(pool, config, Metrics::noop()).await
}

/// Logs for tests: `RUST_LOG=tasker=debug cargo test ... -- --nocapture`.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub async fn start_core_with(pool: &PgPool, config: &TaskerConfig, metrics: Metrics) -> Engine {
    init_logs();
    let core = Engine::start(Store::new(pool.clone()), config, metrics);
    assert!(core.wait_ready(WAIT).await, "core did not become ready");
    core
}

/// Whether every given task reached a final state.
pub async fn all_final(pool: &PgPool, tasks: &[Uuid]) -> bool {
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.tasks WHERE task_uuid = ANY($1) AND state NOT IN ('complete', 'error', 'cancelled')",
    )
    .bind(tasks)
    .fetch_one(pool)
    .await
    .unwrap();
    open == 0
}

/// Act as a worker on `namespace` until every task in `tasks` is final: lease (long-poll),
/// complete. Returns the steps in the order they were leased. Fails after `timeout`.
pub async fn work_until_done(
    core: &Engine,
    pool: &PgPool,
    namespace: &str,
    tasks: &[Uuid],
    timeout: Duration,
) -> Vec<LeasedStep> {
    work_until_done_with(
        core,
        pool,
        namespace,
        tasks,
        timeout,
        |_| Box::pin(async {}),
    )
    .await
}

/// [`work_until_done`], running `before_complete` on each leased step before completing it
/// (to inject a fault, switch a mode, ...).
pub async fn work_until_done_with(
    core: &Engine,
    pool: &PgPool,
    namespace: &str,
    tasks: &[Uuid],
    timeout: Duration,
    mut before_complete: impl FnMut(&LeasedStep) -> futures::future::BoxFuture<'static, ()>,
) -> Vec<LeasedStep> {
    let mut leased_all = Vec::new();
    let run = async {
        while !all_final(pool, tasks).await {
            let steps = core
                .workers
                .fetch(
                    namespace,
                    "test-worker",
                    50,
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                )
                .await
                .expect("fetch");
            for s in &steps {
                before_complete(s).await;
                core.workers
                    .complete(s.held(), &json!({"by": s.name}), Some("test-worker"), None)
                    .await
                    .expect("complete");
            }
            leased_all.extend(steps);
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("tasks not finished within {timeout:?}"));
    leased_all
}

/// Steps enqueued while an earlier attempt of theirs had not ended (completed, failed, expired,
/// cancelled or resolved), read from the history: what a double delivery really is. (Counting
/// repeated `(step, attempt)` pairs would say 0 by construction: every enqueue increments the
/// attempt and the queue is unique on it.)
pub async fn duplicate_enqueues(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "WITH enq AS (
             SELECT step_uuid, id, lag(id) OVER (PARTITION BY step_uuid ORDER BY id) AS prev_id
             FROM tasker.step_transitions WHERE to_state = 'enqueued')
         SELECT count(*) FROM enq e
         WHERE e.prev_id IS NOT NULL
           AND NOT EXISTS (
               SELECT 1 FROM tasker.step_transitions t
               WHERE t.step_uuid = e.step_uuid AND t.id > e.prev_id AND t.id < e.id
                 AND t.to_state IN ('waiting_for_retry', 'error', 'complete', 'cancelled',
                                    'resolved_manually'))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// No step was enqueued again before its previous attempt ended, and every child was enqueued
/// after all its parents completed.
pub async fn assert_exactly_once_in_order(pool: &PgPool) {
    assert_eq!(
        duplicate_enqueues(pool).await,
        0,
        "a step was enqueued while its previous attempt was still open"
    );
    let out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.step_edges e
         JOIN tasker.workflow_steps p ON p.step_uuid = e.parent_step_uuid
         JOIN tasker.workflow_steps c ON c.step_uuid = e.child_step_uuid
         WHERE c.enqueued_at IS NOT NULL AND (p.completed_at IS NULL OR c.enqueued_at < p.completed_at)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        out_of_order, 0,
        "a step was enqueued before a parent completed"
    );
}

pub async fn enqueue_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.step_transitions WHERE to_state = 'enqueued'")
        .fetch_one(pool)
        .await
        .unwrap()
}

// ---- an in-process gRPC server ----

use std::net::SocketAddr;

#[allow(unused_imports)] // each test file uses some of them
pub use tasker::client::{chain, diamond, task};
use tasker::proto::v1;
use tasker::testkit::ServedApi;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub core: std::sync::Arc<Engine>,
    api: ServedApi,
}

impl TestServer {
    /// Bind 127.0.0.1:0, start the core and serve; returns once the server accepts calls.
    pub async fn start(pool: &PgPool, config: &TaskerConfig) -> Self {
        Self::start_with(pool, config, Metrics::noop()).await
    }

    pub async fn start_with(pool: &PgPool, config: &TaskerConfig, metrics: Metrics) -> Self {
        Self::start_at(pool, config, metrics, "127.0.0.1:0".parse().unwrap()).await
    }

    /// On a given address (a restarted server where its clients expect it).
    pub async fn start_on(pool: &PgPool, config: &TaskerConfig, addr: SocketAddr) -> Self {
        Self::start_at(pool, config, Metrics::noop(), addr).await
    }

    async fn start_at(
        pool: &PgPool,
        config: &TaskerConfig,
        metrics: Metrics,
        addr: SocketAddr,
    ) -> Self {
        let core = std::sync::Arc::new(start_core_with(pool, config, metrics).await);
        let api = ServedApi::start(&core, config, addr).await.unwrap();
        Self {
            addr: api.addr,
            core,
            api,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    pub async fn stop(self) {
        self.api.stop().await.unwrap();
        if let Ok(core) = std::sync::Arc::try_unwrap(self.core) {
            core.shutdown().await;
        }
    }
}

pub type Tasks = v1::task_service_client::TaskServiceClient<Channel>;
pub type Workers = v1::worker_service_client::WorkerServiceClient<Channel>;
pub type Readiness = v1::readiness_service_client::ReadinessServiceClient<Channel>;
pub type Admin = v1::admin_service_client::AdminServiceClient<Channel>;

pub fn step_def(name: &str, deps: &[&str]) -> v1::StepDefinition {
    v1::StepDefinition {
        name: name.into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

/// A FetchSteps request as the tests' workers send it (worker "w").
pub fn fetch_request(
    namespace: &str,
    max_steps: i32,
    wait_ms: i32,
    lease_seconds: i32,
) -> v1::FetchStepsRequest {
    v1::FetchStepsRequest {
        namespace: namespace.into(),
        worker_id: "w".into(),
        max_steps,
        wait_ms,
        lease_seconds,
        queues: Vec::new(),
    }
}

/// GetTask over gRPC: the task as it is now (it must exist).
pub async fn get_task(tasks: &mut Tasks, task_uuid: &str) -> v1::Task {
    tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: task_uuid.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Lease the next step of `namespace` over gRPC, waiting up to 5 s for one.
pub async fn lease_one(workers: &Workers, namespace: &str) -> v1::LeasedStep {
    let mut w = workers.clone();
    w.fetch_steps(fetch_request(namespace, 1, 5000, 30))
        .await
        .unwrap()
        .into_inner()
        .steps
        .remove(0)
}

/// Fetches on `namespace` until a step is leased (one whose lease runs out, say), within
/// `within`.
pub async fn lease_within(workers: &Workers, namespace: &str, within: Duration) -> v1::LeasedStep {
    let mut w = workers.clone();
    tokio::time::timeout(within, async {
        loop {
            let got = w
                .fetch_steps(fetch_request(namespace, 1, 5_000, 30))
                .await
                .unwrap()
                .into_inner()
                .steps;
            if let Some(s) = got.into_iter().next() {
                return s;
            }
        }
    })
    .await
    .expect("a step is leased in time")
}

/// Waits until at least `n` fetches are parked on the server (`GetStatus.parked_fetches`).
pub async fn until_parked(ch: &Channel, n: u64) {
    let mut admin = Admin::new(ch.clone());
    tokio::time::timeout(WAIT, async {
        loop {
            let s = admin
                .get_status(v1::GetStatusRequest::default())
                .await
                .unwrap()
                .into_inner();
            if s.parked_fetches >= n {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the fetches park");
}

/// The next pass on a command event stream, Started then Completed: the Completed event.
pub async fn next_pass(events: &mut tonic::Streaming<v1::CommandEvent>) -> v1::CommandEvent {
    assert_eq!(next_event(events).await.phase(), v1::CommandPhase::Started);
    let done = next_event(events).await;
    assert_eq!(done.phase(), v1::CommandPhase::Completed);
    done
}

async fn next_event(events: &mut tonic::Streaming<v1::CommandEvent>) -> v1::CommandEvent {
    tokio::time::timeout(WAIT, events.message())
        .await
        .expect("an event")
        .unwrap()
        .expect("the stream goes on")
}

/// What a worker asks for next (`CompleteStepRequest.next`, `CreateTaskRequest.next`).
pub fn ask_next(max_steps: i32, queues: &[&str], lease_seconds: i32) -> Option<v1::NextSteps> {
    Some(v1::NextSteps {
        max_steps,
        queues: queues.iter().map(|q| q.to_string()).collect(),
        lease_seconds,
    })
}

/// Two fetches parked on `namespace` (waiting longer than a test does: only an enqueue's
/// wake-up answers them in time): one for two steps of the default queue, one for up to five
/// of "warehouse". Returns once both wait; each answers the steps it received.
pub async fn park_default_and_warehouse(
    ch: &Channel,
    namespace: &str,
) -> (
    tokio::task::JoinHandle<Vec<v1::LeasedStep>>,
    tokio::task::JoinHandle<Vec<v1::LeasedStep>>,
) {
    let mut default = Workers::new(ch.clone());
    let request = fetch_request(namespace, 2, 20_000, 30);
    let parked = tokio::spawn(async move {
        default
            .fetch_steps(request)
            .await
            .unwrap()
            .into_inner()
            .steps
    });
    let mut warehouse = Workers::new(ch.clone());
    let mut request = fetch_request(namespace, 5, 20_000, 30);
    request.queues = vec!["warehouse".into()];
    let ship = tokio::spawn(async move {
        warehouse
            .fetch_steps(request)
            .await
            .unwrap()
            .into_inner()
            .steps
    });
    until_parked(ch, 2).await;
    (parked, ship)
}

/// The step an eager call leased (`mine`) and those the parked default-queue fetch received
/// are `expected`, each once; the warehouse fetch received "ship".
pub async fn assert_split(
    mine: &str,
    parked: tokio::task::JoinHandle<Vec<v1::LeasedStep>>,
    ship: tokio::task::JoinHandle<Vec<v1::LeasedStep>>,
    expected: &[&str],
) {
    let theirs = tokio::time::timeout(WAIT, parked).await.unwrap().unwrap();
    let mut all: Vec<String> = theirs.iter().map(|s| s.name.clone()).collect();
    all.push(mine.to_string());
    all.sort();
    assert_eq!(all, expected);
    let ship = tokio::time::timeout(WAIT, ship).await.unwrap().unwrap();
    assert_eq!(
        ship.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["ship"]
    );
}

// ---- what a deployment mode runs, observed ----

/// LISTEN connections of this test's database (the listener names its connection).
pub async fn listen_connections(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'tasker-listener' AND datname = current_database()",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Wait until `mode` is in effect, and check it is, in the database and in the poller:
/// - listening modes: the listener is listening, on exactly one connection, whose backend
///   pid it reports; otherwise no LISTEN connection exists;
/// - polling modes: periodic rounds run (one more happens); otherwise they stop (none in
///   three polling intervals).
pub async fn assert_mode_in_effect(
    core: &Engine,
    pool: &PgPool,
    mode: DeploymentMode,
    interval: Duration,
) {
    let mut listener = core.mode_controller.listener_status();
    let status = tokio::time::timeout(
        WAIT,
        listener.wait_for(|s| {
            (s.state == ListenerState::Listening) == mode.listens()
                && (mode.listens() || s.state == ListenerState::Disabled)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("listener state did not follow {mode}"))
    .unwrap()
    .clone();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pids = listen_connections(pool).await;
        let expected: Vec<i32> = status.backend_pid.into_iter().collect();
        if pids == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{mode}: LISTEN connections {pids:?}, expected {expected:?}"
        );
        // the backend of a closed connection leaves pg_stat_activity a moment after the close
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut poller = core.mode_controller.poller_status();
    let periodic = tokio::time::timeout(WAIT, poller.wait_for(|s| s.periodic == mode.polls()))
        .await
        .unwrap_or_else(|_| panic!("{mode}: the poller's periodic rounds did not follow"))
        .unwrap();
    let rounds = periodic.rounds;
    drop(periodic);
    let next_round =
        tokio::time::timeout(interval * 3, poller.wait_for(|s| s.rounds > rounds)).await;
    if mode.polls() {
        assert!(
            next_round.is_ok(),
            "{mode}: no periodic round in three intervals"
        );
    } else {
        assert!(next_round.is_err(), "{mode}: the poller kept polling");
    }
}

/// The URL of a test's own database, for what connects by itself (a service process, a store
/// with its own connection settings). It reaches the database the way the pool does: over
/// TCP, or through the Unix socket of a socket-only server (the embedded cluster, where no
/// server answers on a TCP port).
pub fn database_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("test databases are named")
    );
    match o.get_socket() {
        Some(dir) => format!("{url}?host={}", percent_encode(&dir.display().to_string())),
        None => url,
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A task of two steps, `first` then `second`, as CreateTask takes it.
pub fn two_steps(namespace: &str, name: &str) -> v1::CreateTaskRequest {
    tasker::client::task(namespace)
        .named(name)
        .step("first")
        .step("second")
        .after("first")
        .build()
}

/// Cancel a task over gRPC.
pub async fn cancel(tasks: &mut Tasks, task: &str) {
    tasks
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: task.into(),
            reason: String::new(),
        })
        .await
        .unwrap();
}

/// Fail a leased step for good (not retryable): its task goes into error.
pub async fn fail_for_good(workers: &mut Workers, step: &v1::LeasedStep, message: &str) {
    workers
        .fail_step(v1::FailStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            lease_token: step.lease_token.clone(),
            error_message: message.into(),
            retryable: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// From here on every readiness announcement is lost (the function that sends them does
/// nothing); returns its definition, to restore it.
pub async fn silence_readiness_announcements(pool: &PgPool) -> String {
    let original: String = sqlx::query_scalar(
        "SELECT pg_get_functiondef('tasker.send_task_ready(uuid, text, text)'::regprocedure)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION tasker.send_task_ready(p_task_uuid uuid, p_namespace text, p_triggered_by text)
         RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$",
    )
    .execute(pool)
    .await
    .unwrap();
    original
}

/// Complete a leased step over gRPC, with no results.
pub async fn complete_leased(workers: &mut Workers, step: &v1::LeasedStep) {
    workers
        .complete_step(v1::CompleteStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            results: None,
            lease_token: step.lease_token.clone(),
            next: None,
        })
        .await
        .unwrap();
}

/// A document of about `bytes` bytes (one string field), as requests carry inputs and results.
pub fn blob_struct(bytes: usize) -> prost_types::Struct {
    tasker::proto::json_to_struct(&serde_json::json!({ "blob": "x".repeat(bytes) }))
}

/// The fields a status's BadRequest details name, in order.
pub fn field_violations(status: &tonic::Status) -> Vec<String> {
    tonic_types::StatusExt::get_details_bad_request(status)
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The reason of a status's ErrorInfo details (a refused report on an attempt says why).
pub fn refusal_reason(status: &tonic::Status) -> Option<String> {
    tonic_types::StatusExt::get_details_error_info(status).map(|i| {
        assert_eq!(i.domain, "tasker.v1");
        i.reason
    })
}

/// A temporary directory other users can pass through (as a repository checkout is), so that
/// an embedded cluster started in it by root runs there, not in a fallback directory.
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A token named `name` with `scopes`, whose secret is `<name>-secret` (see [`as_token`]).
pub fn token(name: &str, scopes: &[&str]) -> tasker::config::TokenConfig {
    tasker::config::TokenConfig {
        name: name.into(),
        sha256: tasker::hash_token(&format!("{name}-secret")),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

/// `message` as a request carrying the bearer token of [`token`]`(name, ..)`.
pub fn as_token<T>(name: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {name}-secret").parse().unwrap(),
    );
    r
}
