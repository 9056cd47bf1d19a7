//! Fault injection: each scenario runs 200 workflows (chains and diamonds) through the real
//! gRPC API with workers, injects its fault, and checks the invariants: every task reaches a
//! final state, every step attempt was enqueued exactly once, nothing is left stuck. Each
//! prints one row of the results table (scenario, workload, faults, lost, duplicated,
//! recovery time).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{connect, ServiceProcess};
use common::*;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WORKFLOWS: usize = 200;
const RECOVERY_LIMIT: Duration = Duration::from_secs(90);

/// 200 workflows in `ns`, alternating 4-step chains and diamonds, created over gRPC.
async fn create_workload(addr: SocketAddr, ns: &str) -> Vec<Uuid> {
    let mut tasks = Tasks::new(connect(addr).await.expect("connect"));
    let mut ids = Vec::with_capacity(WORKFLOWS);
    for i in 0..WORKFLOWS {
        let steps = if i % 2 == 0 {
            vec![
                step_def("s0", &[]),
                step_def("s1", &["s0"]),
                step_def("s2", &["s1"]),
                step_def("s3", &["s2"]),
            ]
        } else {
            vec![
                step_def("a", &[]),
                step_def("b", &["a"]),
                step_def("c", &["a"]),
                step_def("d", &["b", "c"]),
            ]
        };
        let r = tasks
            .create_task(v1::CreateTaskRequest {
                namespace: ns.into(),
                name: format!("wf-{i}"),
                steps,
                ..Default::default()
            })
            .await
            .expect("create");
        ids.push(r.into_inner().task_uuid.parse().unwrap());
    }
    ids
}

/// How a worker spreads its calls over the service's endpoints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Balancing {
    /// One endpoint until a call to it fails, then the next (a client-side failover).
    Sticky,
    /// Every call to the next endpoint (a round-robin load balancer): a step is often fetched
    /// from one replica and completed through another.
    RoundRobin,
}

/// Workers over gRPC: lease, complete; on any transport error move to the next endpoint after
/// a short back-off. Workers are clients: retrying is their job.
struct Workers {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
    completed: Arc<AtomicU64>,
    /// Fired on every completion, so a test can wait for progress without polling.
    progress: Arc<tokio::sync::Notify>,
}

/// A worker's connections, one per endpoint, made when first needed and dropped on failure.
struct Endpoints {
    addrs: Vec<SocketAddr>,
    clients: Vec<Option<common::Workers>>,
    next: usize,
    balancing: Balancing,
}

impl Endpoints {
    /// The client for the next call; `None` (after a back-off) when its endpoint is down.
    async fn client(&mut self) -> Option<(usize, common::Workers)> {
        let i = self.next % self.addrs.len();
        if self.balancing == Balancing::RoundRobin {
            self.next += 1;
        }
        if self.clients[i].is_none() {
            match connect(self.addrs[i]).await {
                Ok(ch) => self.clients[i] = Some(common::Workers::new(ch)),
                Err(_) => {
                    self.failed(i);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return None;
                }
            }
        }
        self.clients[i].clone().map(|c| (i, c))
    }

    fn failed(&mut self, i: usize) {
        self.clients[i] = None;
        if self.balancing == Balancing::Sticky {
            self.next += 1;
        }
    }
}

impl Workers {
    fn start(endpoints: Vec<SocketAddr>, ns: &str, n: usize) -> Self {
        Self::start_balanced(endpoints, ns, n, Balancing::Sticky)
    }

    fn start_balanced(
        endpoints: Vec<SocketAddr>,
        ns: &str,
        n: usize,
        balancing: Balancing,
    ) -> Self {
        let stop = CancellationToken::new();
        let completed = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(tokio::sync::Notify::new());
        let handles = (0..n)
            .map(|i| {
                let (ns, stop, completed, progress) = (
                    ns.to_string(),
                    stop.clone(),
                    completed.clone(),
                    progress.clone(),
                );
                let mut endpoints = Endpoints {
                    clients: vec![None; endpoints.len()],
                    addrs: endpoints.clone(),
                    next: i,
                    balancing,
                };
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let Some((at, mut w)) = endpoints.client().await else {
                            continue;
                        };
                        let req = v1::FetchStepsRequest {
                            namespace: ns.clone(),
                            worker_id: format!("w{i}"),
                            max_steps: 4,
                            wait_ms: 1000,
                            lease_seconds: 5,
                            queues: Vec::new(),
                        };
                        let fetched = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = w.fetch_steps(req) => r,
                        };
                        let fetched = match fetched {
                            Ok(f) => f,
                            Err(_) => {
                                endpoints.failed(at);
                                continue;
                            }
                        };
                        // every other worker asks for its next step with each completion
                        // (eager dispatch): the faults hit completions holding handed-over
                        // leases too
                        let eager = i % 2 == 1;
                        let mut todo: std::collections::VecDeque<v1::LeasedStep> =
                            fetched.into_inner().steps.into();
                        while let Some(s) = todo.pop_front() {
                            // a step whose completion cannot be delivered stays leased; its
                            // lease runs out and it is retried
                            let Some((at, mut w)) = endpoints.client().await else {
                                continue;
                            };
                            let done = w
                                .complete_step(v1::CompleteStepRequest {
                                    step_uuid: s.step_uuid,
                                    attempt: s.attempt,
                                    results: None,
                                    lease_token: s.lease_token,
                                    next: eager.then(|| v1::NextSteps {
                                        max_steps: 1,
                                        queues: Vec::new(),
                                        lease_seconds: 5,
                                    }),
                                })
                                .await;
                            match done {
                                Ok(r) => {
                                    completed.fetch_add(1, Ordering::Relaxed);
                                    progress.notify_waiters();
                                    todo.extend(r.into_inner().next_steps);
                                }
                                // lease expired during a fault: the step is retried
                                Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
                                Err(_) => endpoints.failed(at),
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            handles,
            completed,
            progress,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// Waits (on task state notifications, re-checking the table) until every task is final.
async fn wait_all_final(pool: &PgPool, tasks: &[Uuid], limit: Duration) -> Duration {
    let started = Instant::now();
    let mut listener: Option<PgListener> = None;
    loop {
        if all_final(pool, tasks).await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "tasks not final within {limit:?}"
        );
        if listener.is_none() {
            if let Ok(mut l) = PgListener::connect_with(pool).await {
                if l.listen("tasker_task_state").await.is_ok() {
                    listener = Some(l);
                }
            }
        }
        match listener.as_mut() {
            // a state change is the signal to look again; the timeout bounds a lost one
            Some(l) => match tokio::time::timeout(Duration::from_secs(1), l.try_recv()).await {
                Ok(Ok(Some(_))) | Err(_) => {}
                Ok(Ok(None)) | Ok(Err(_)) => listener = None,
            },
            None => tokio::time::sleep(Duration::from_millis(200)).await, // database unreachable
        }
    }
}

struct Report {
    lost: i64,
    duplicated: i64,
    stuck: i64,
    errored: i64,
}

async fn invariants(pool: &PgPool, tasks: &[Uuid]) -> Report {
    let lost: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[]) t(id) LEFT JOIN tasker.tasks k ON k.task_uuid = t.id
         WHERE k.task_uuid IS NULL OR k.state NOT IN ('complete', 'error', 'cancelled')",
    )
    .bind(tasks)
    .fetch_one(pool)
    .await
    .unwrap();
    let duplicated = duplicate_enqueues(pool).await;
    let stuck: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.workflow_steps WHERE state IN ('enqueued', 'in_progress', 'pending', 'waiting_for_retry')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let errored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.tasks WHERE state = 'error'")
            .fetch_one(pool)
            .await
            .unwrap();
    Report {
        lost,
        duplicated,
        stuck,
        errored,
    }
}

fn row(scenario: &str, faults: &str, r: &Report, recovery: Duration) {
    println!(
        "| {scenario} | {WORKFLOWS} workflows (chains + diamonds) | {faults} | {} | {} | {:.1} s |",
        r.lost,
        r.duplicated,
        recovery.as_secs_f64()
    );
}

/// Wait for every task to be final, stop the workers, check the invariants, print the row.
async fn finish(
    pool: &PgPool,
    tasks: &[Uuid],
    workers: Workers,
    since: Instant,
    scenario: &str,
    faults: &str,
) {
    wait_all_final(pool, tasks, RECOVERY_LIMIT).await;
    let recovery = since.elapsed();
    workers.stop().await;
    let r = invariants(pool, tasks).await;
    row(scenario, faults, &r, recovery);
    assert_clean(&r);
}

fn assert_clean(r: &Report) {
    assert_eq!(r.lost, 0, "tasks lost");
    assert_eq!(
        r.duplicated, 0,
        "steps enqueued again while their previous attempt was open"
    );
    assert_eq!(r.stuck, 0, "steps stuck");
    assert_eq!(r.errored, 0, "tasks failed");
}

/// The duplicate check itself: a step put back on the queue while its attempt is still in
/// progress (the state machine's guard switched off to do it) is counted.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_duplicate_check_sees_an_enqueue_while_an_attempt_is_open(pool: PgPool) {
    let store = tasker::testkit::Store::new(pool.clone());
    let t = create(&store, tasker::testkit::TaskSpec::chain("dup", 2)).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, "dup").await;
    assert_eq!(duplicate_enqueues(&pool).await, 0);
    // a retry that followed the rules: the attempt ended first
    store
        .fail_step(
            leased[0].held(),
            &failure(serde_json::json!({}), true, 0),
            &serde_json::json!({}),
            None,
        )
        .await
        .unwrap();
    let again = enqueue_and_lease(&store, t.task_uuid, "dup").await;
    assert_eq!(again[0].attempt, 2);
    assert_eq!(duplicate_enqueues(&pool).await, 0);
    // a double delivery: enqueued again while attempt 2 is in progress
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE tasker.workflow_steps DISABLE TRIGGER workflow_steps_guard")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE tasker.workflow_steps SET state = 'enqueued', attempts = attempts + 1
         WHERE step_uuid = $1",
    )
    .bind(again[0].step_uuid)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(duplicate_enqueues(&pool).await, 1);
    // what the suite counted before: repeated (step, attempt) pairs, blind to this
    let repeated_pairs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT step_uuid, attempt FROM tasker.step_transitions
          WHERE to_state = 'enqueued' GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(repeated_pairs, 0);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f1_listener_killed_repeatedly(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let tasks = create_workload(server.addr, "f1").await;
    let workers = Workers::start(vec![server.addr], "f1", 8);
    let mut status = server.core.mode_controller.listener_status();
    let mut kills = 0;
    while !all_final(&pool, &tasks).await && kills < 10 {
        let st = status
            .wait_for(|s| s.state == tasker::testkit::ListenerState::Listening)
            .await
            .unwrap()
            .clone();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(st.backend_pid.unwrap())
            .execute(&pool)
            .await
            .unwrap();
        kills += 1;
        status
            .wait_for(|s| s.generation > st.generation)
            .await
            .unwrap();
    }
    let t = Instant::now();
    assert!(kills >= 3);
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "1 listener killed repeatedly (EventDrivenOnly)",
        &format!("{kills} listener kills"),
    )
    .await;
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f2a_all_connections_killed_at_once(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let tasks = create_workload(server.addr, "f2").await;
    let workers = Workers::start(vec![server.addr], "f2", 8);
    // once work is under way, cut every connection of the service to its database
    wait_completed(&workers, 200).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()) k",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let t = Instant::now();
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "2a all service connections killed at once",
        &format!("{killed} backends terminated"),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2b_database_restarted_mid_run() {
    let dir = open_tempdir();
    let cluster = tasker::testkit::EmbeddedCluster::start(dir.path())
        .await
        .expect("throwaway cluster");
    let url = cluster.url("postgres");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap();
    tasker::MIGRATOR.run(&pool).await.unwrap();
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.database.url = Some(url);
    let server = TestServer::start(&pool, &cfg).await;
    let tasks = create_workload(server.addr, "f2b").await;
    let workers = Workers::start(vec![server.addr], "f2b", 8);
    wait_completed(&workers, 200).await;
    let t = Instant::now();
    cluster.restart().expect("restart");
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "2b database restarted mid-run (pg_ctl restart -m fast)",
        "1 restart",
    )
    .await;
    server.stop().await;
    pool.close().await;
    drop(cluster);
}

/// Leases a worker has received survive a crash of PostgreSQL (immediate shutdown, recovery
/// from the WAL): leased by a fetch, or handed to a parked fetch by the enqueue itself, each in
/// a transaction of its own. A lease lost in the crash would be given to a second worker under
/// the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_leases_survive_a_database_crash() {
    use tasker::testkit::{Store, Taker, TaskSpec, DEFAULT_QUEUE};
    let dir = open_tempdir();
    let cluster = tasker::testkit::EmbeddedCluster::start(dir.path())
        .await
        .expect("throwaway cluster");
    let url = cluster.url("postgres");
    let store = Store::new(sqlx::PgPool::connect(&url).await.unwrap());
    tasker::MIGRATOR.run(store.pool()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(create(&store, TaskSpec::chain("f9", 1)).await);
    }
    // nothing below commits but the enqueues and the leases
    let mut leases = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        if i % 2 == 0 {
            store
                .claim_and_enqueue(t.task_uuid, &serde_json::json!({}), None, &[], None)
                .await
                .unwrap();
            leases.extend(
                store
                    .fetch_steps("f9", &[DEFAULT_QUEUE.to_string()], "w", 1, 600_000)
                    .await
                    .unwrap(),
            );
        } else {
            let taker = Taker {
                worker_id: "w".into(),
                max: 1,
                lease_ms: 600_000,
                queues: None,
            };
            let r = store
                .claim_and_enqueue(t.task_uuid, &serde_json::json!({}), None, &[taker], None)
                .await
                .unwrap();
            leases.extend(r.leased.into_iter().map(|(_, s)| s));
        }
    }
    assert_eq!(leases.len(), 20);
    store.pool().close().await;
    cluster.crash_and_restart().expect("crash and restart");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut lost = Vec::new();
    for l in &leases {
        let held: Option<(String, Option<Uuid>)> = sqlx::query_as(
            "SELECT s.state, q.lease_token FROM tasker.workflow_steps s
             LEFT JOIN tasker.step_queue q ON q.step_uuid = s.step_uuid AND q.attempt = s.attempts
             WHERE s.step_uuid = $1 AND s.attempts = $2",
        )
        .bind(l.step_uuid)
        .bind(l.attempt)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if held != Some(("in_progress".into(), Some(l.lease_token))) {
            lost.push((l.step_uuid, held));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} leases lost in the crash: {lost:?}",
        lost.len(),
        leases.len()
    );
    pool.close().await;
    drop(cluster);
}

async fn wait_completed(workers: &Workers, at_least: u64) {
    let wait = async {
        loop {
            let next = workers.progress.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            if workers.completed.load(Ordering::Relaxed) >= at_least {
                return;
            }
            next.await;
        }
    };
    tokio::time::timeout(RECOVERY_LIMIT, wait)
        .await
        .unwrap_or_else(|_| panic!("fewer than {at_least} completions within {RECOVERY_LIMIT:?}"));
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f3_service_sigkilled_and_restarted(pool: PgPool) {
    let url = database_url(&pool);
    let service = ServiceProcess::spawn(&url, "Hybrid").await;
    let addr = service.addr;
    let tasks = create_workload(addr, "f3").await;
    let workers = Workers::start(vec![addr], "f3", 8);
    wait_completed(&workers, 150).await;
    service.sigkill().await;
    let t = Instant::now();
    // a new process on the same port: its start-up sweep takes what the dead one held
    let service = ServiceProcess::spawn_on(&url, "Hybrid", addr).await;
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "3 service SIGKILLed mid-run, restarted",
        "1 SIGKILL",
    )
    .await;
    service.sigkill().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f4_silent_worker_lease_expires_and_max_attempts_holds(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let tasks = create_workload(server.addr, "f4").await;
    // a worker that takes steps and never answers: short leases, then silence
    let mut silent = common::Workers::new(connect(server.addr).await.unwrap());
    let taken = silent
        .fetch_steps(v1::FetchStepsRequest {
            worker_id: "silent".into(),
            ..fetch_request("f4", 20, 5000, 1)
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(!taken.is_empty());
    // it completes its first step asking for what that makes ready (eager dispatch), and
    // goes silent holding those too
    let first = &taken[0];
    let handed = silent
        .complete_step(v1::CompleteStepRequest {
            step_uuid: first.step_uuid.clone(),
            attempt: first.attempt,
            results: None,
            lease_token: first.lease_token.clone(),
            next: Some(v1::NextSteps {
                max_steps: 4,
                queues: Vec::new(),
                lease_seconds: 1,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .next_steps;
    assert!(!handed.is_empty(), "a root's completion makes a step ready");
    let abandoned = taken.len() - 1 + handed.len();
    let t = Instant::now();
    let workers = Workers::start(vec![server.addr], "f4", 8);
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "4 silent worker (lease 1 s)",
        &format!(
            "{abandoned} steps held by a dead worker, {} of them leased eagerly",
            handed.len()
        ),
    )
    .await;
    // every abandoned step was retried as attempt 2, each attempt enqueued once
    let retried: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_steps WHERE attempts = 2")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(retried, abandoned as i64);

    // max_attempts is honoured: a one-attempt task whose worker goes silent ends in error,
    // visible in GetTaskReadiness
    let mut t1 = Tasks::new(connect(server.addr).await.unwrap());
    let mut once = v1::CreateTaskRequest {
        namespace: "f4-once".into(),
        name: "once".into(),
        steps: vec![step_def("only", &[])],
        ..Default::default()
    };
    once.steps[0].max_attempts = 1;
    let id = t1.create_task(once).await.unwrap().into_inner().task_uuid;
    let held = silent
        .fetch_steps(v1::FetchStepsRequest {
            worker_id: "silent".into(),
            ..fetch_request("f4-once", 1, 5000, 1)
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(held.len(), 1);
    wait_all_final(&pool, &[id.parse().unwrap()], RECOVERY_LIMIT).await;
    let mut rd = Readiness::new(connect(server.addr).await.unwrap());
    let readiness = rd
        .get_task_readiness(v1::GetTaskReadinessRequest { task_uuid: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (readiness.task_state(), readiness.execution_status()),
        (v1::TaskState::Error, v1::ExecutionStatus::BlockedByFailures)
    );
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f5a_two_instances_with_kills_and_restarts(pool: PgPool) {
    instances_with_kills(
        pool,
        &["Hybrid", "EventDrivenOnly"],
        "f5a",
        Balancing::Sticky,
    )
    .await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f5b_three_instances_with_kills_and_restarts(pool: PgPool) {
    instances_with_kills(
        pool,
        &["Hybrid", "Hybrid", "EventDrivenOnly"],
        "f5b",
        Balancing::Sticky,
    )
    .await;
}

/// Three replicas behind a round-robin worker pool: steps fetched from one replica are
/// completed through another, and replicas die and come back under it. No replica polls: a
/// dead replica's share of the claim split is taken over by the others' catch-up sweeps alone.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f5c_three_instances_behind_round_robin_workers_with_kills(pool: PgPool) {
    instances_with_kills(
        pool,
        &["EventDrivenOnly", "EventDrivenOnly", "EventDrivenOnly"],
        "f5c",
        Balancing::RoundRobin,
    )
    .await;
}

/// N service processes on one database; one after another is SIGKILLed mid-run and started
/// again on its port, three times.
async fn instances_with_kills(pool: PgPool, modes: &[&str], ns: &str, balancing: Balancing) {
    let url = database_url(&pool);
    let mut services = Vec::new();
    for mode in modes {
        services.push((ServiceProcess::spawn(&url, mode).await, *mode));
    }
    let addrs: Vec<SocketAddr> = services.iter().map(|(s, _)| s.addr).collect();
    let tasks = create_workload(addrs[0], ns).await;
    let workers = Workers::start_balanced(addrs.clone(), ns, 9, balancing);
    let mut faults = 0;
    for round in 0..3u64 {
        wait_completed(&workers, 100 * (round + 1)).await;
        let (victim, mode) = services.remove(0);
        let addr = victim.addr;
        victim.sigkill().await;
        faults += 1;
        // the same port and mode again, so the workers find it when they come back round
        services.push((ServiceProcess::spawn_on(&url, mode, addr).await, mode));
    }
    let t = Instant::now();
    finish(
        &pool,
        &tasks,
        workers,
        t,
        &format!(
            "5 {} instances on one database, killed and restarted ({} workers)",
            modes.len(),
            match balancing {
                Balancing::Sticky => "failover",
                Balancing::RoundRobin => "round-robin",
            }
        ),
        &format!("{faults} SIGKILLs + restarts"),
    )
    .await;
    for (s, _) in services {
        s.sigkill().await;
    }
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f6_mode_flipped_every_second(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let tasks = create_workload(server.addr, "f6").await;
    let workers = Workers::start(vec![server.addr], "f6", 8);
    let mut admin = Admin::new(connect(server.addr).await.unwrap());
    let modes = [
        v1::DeploymentMode::EventDrivenOnly,
        v1::DeploymentMode::PollingOnly,
        v1::DeploymentMode::Hybrid,
    ];
    let mut flips = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !all_final(&pool, &tasks).await {
        tick.tick().await;
        let mode = modes[flips % 3];
        admin
            .set_deployment_mode(v1::SetDeploymentModeRequest {
                mode: mode as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        flips += 1;
        assert!(flips < 90, "not done after 90 flips");
        // the flip takes effect: listener and poller as the mode says, and no LISTEN
        // connection left behind by a mode that does not listen
        let listens = mode != v1::DeploymentMode::PollingOnly;
        let polls = mode != v1::DeploymentMode::EventDrivenOnly;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = admin
                .get_status(v1::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let connections = listen_connections(&pool).await.len();
            if s.listener_connected == listens
                && s.poller_periodic == polls
                && connections == usize::from(listens)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?} not in effect: listener {} poller {} LISTEN connections {connections}",
                s.listener_connected,
                s.poller_periodic
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    workers.stop().await;
    let r = invariants(&pool, &tasks).await;
    row(
        "6 deployment mode flipped every second",
        &format!("{flips} flips"),
        &r,
        Duration::ZERO,
    );
    assert_clean(&r);
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f7_command_channel_saturated(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.orchestration.command_processor.channel_capacity = 20;
    cfg.orchestration.command_processor.max_concurrent_commands = 2;
    let server = TestServer::start(&pool, &cfg).await;
    let tasks = create_workload(server.addr, "f7").await;
    // a burst of 10x the channel size through the API, all at once
    let ch = connect(server.addr).await.unwrap();
    let burst = tasks.iter().map(|t| {
        let mut r = Readiness::new(ch.clone());
        let id = t.to_string();
        async move {
            r.process_task_readiness(v1::ProcessTaskReadinessRequest {
                task_uuid: id,
                ..Default::default()
            })
            .await
        }
    });
    let results = futures::future::join_all(burst).await;
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == tonic::Code::ResourceExhausted))
        .count();
    assert!(
        refused > 0,
        "no overload answer in a burst of {}",
        results.len()
    );
    let t = Instant::now();
    let workers = Workers::start(vec![server.addr], "f7", 8);
    finish(
        &pool,
        &tasks,
        workers,
        t,
        "7 command channel saturated (burst 10x capacity 20)",
        &format!("{refused} RESOURCE_EXHAUSTED"),
    )
    .await;
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn f8_notifications_lost_poller_recovers(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(2);
    let server = TestServer::start(&pool, &cfg).await;
    let tasks = create_workload(server.addr, "f8").await;
    let workers = Workers::start(vec![server.addr], "f8", 8);
    wait_completed(&workers, 100).await;
    // NOTIFY lost: the readiness announcement replaced by one that says nothing, for a while
    let original = silence_readiness_announcements(&pool).await;
    wait_completed(&workers, 300).await;
    sqlx::raw_sql(&original).execute(&pool).await.unwrap();
    let t = Instant::now();
    wait_all_final(&pool, &tasks, RECOVERY_LIMIT).await;
    let recovery = t.elapsed();
    workers.stop().await;
    let found = server
        .core
        .mode_controller
        .status()
        .poller
        .fallback_tasks_found_total;
    let r = invariants(&pool, &tasks).await;
    row(
        "8 NOTIFY lost (readiness announcements silenced), Hybrid",
        &format!("silent for 200 completions; poller found {found} tasks"),
        &r,
        recovery,
    );
    assert!(found > 0, "the poller did the recovering");
    assert_clean(&r);
    server.stop().await;
}

async fn status(addr: SocketAddr) -> v1::GetStatusResponse {
    v1::admin_service_client::AdminServiceClient::new(connect(addr).await.unwrap())
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Three replica processes on one database. Replicas B and C serve readiness for another
/// namespace only and re-read an idle queue once an hour, so a worker parked on B can be woken
/// only by replica A's announcement of the step it enqueued: it holds the step within 50 ms
/// of the enqueue (with the periodic re-read alone, it would wait an hour).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_step_enqueued_by_one_replica_wakes_a_fetch_parked_on_another(pool: PgPool) {
    let url = database_url(&pool);
    let elsewhere = [
        (
            "TASKER_ORCHESTRATION__WORKERS__FETCH_RECHECK_INTERVAL_MS",
            "3600000",
        ),
        (
            "TASKER_ORCHESTRATION__TASK_READINESS__NAMESPACES",
            "[\"elsewhere\"]",
        ),
    ];
    let a = ServiceProcess::spawn(&url, "Hybrid").await;
    let b = ServiceProcess::spawn_with(&url, "Hybrid", &elsewhere).await;
    let c = ServiceProcess::spawn_with(&url, "Hybrid", &elsewhere).await;
    // A announces once a heartbeat of its has seen B and C: wait for two of A's heartbeats
    // after C registered, the first of which may have been under way
    let a_id = status(a.addr).await.replica_id;
    let seen_after_c = async {
        let mut beats = 0;
        let mut last = None;
        while beats < 2 {
            let fleet = status(a.addr).await.replicas;
            let a_beat = fleet
                .iter()
                .find(|r| r.replica_id == a_id)
                .and_then(|r| r.heartbeat_at)
                .map(|t| (t.seconds, t.nanos));
            let c_started = fleet
                .iter()
                .filter_map(|r| r.started_at)
                .map(|t| (t.seconds, t.nanos))
                .max();
            if fleet.len() == 3 && a_beat > c_started && a_beat != last {
                beats += 1;
                last = a_beat;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), seen_after_c)
        .await
        .expect("replica A saw the other two");
    assert_eq!(status(b.addr).await.replicas.len(), 3);

    // a worker parks on B (observable in B's status), then a task is created through A
    let mut on_b =
        v1::worker_service_client::WorkerServiceClient::new(connect(b.addr).await.unwrap());
    let fetch = tokio::spawn(async move {
        on_b.fetch_steps(fetch_request("cross", 1, 15_000, 30))
            .await
    });
    within(Duration::from_secs(10), "the fetch parked on B", || async {
        status(b.addr).await.parked_fetches > 0
    })
    .await;
    v1::task_service_client::TaskServiceClient::new(connect(a.addr).await.unwrap())
        .create_task(v1::CreateTaskRequest {
            namespace: "cross".into(),
            name: "hop".into(),
            steps: vec![step_def("only", &[])],
            ..Default::default()
        })
        .await
        .unwrap();
    let leased = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the fetch parked on B returned well before its wait ran out")
        .unwrap()
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(leased.len(), 1);
    let wake_ms: f64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM started_at - enqueued_at) * 1000)::float8 FROM tasker.workflow_steps",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("enqueued on replica A, leased on replica B after {wake_ms:.2} ms");
    assert!(
        wake_ms < 50.0,
        "enqueued on A, leased on B after {wake_ms:.1} ms"
    );
    for s in [a, b, c] {
        s.sigkill().await;
    }
}

async fn deployment_mode(addr: SocketAddr) -> v1::GetDeploymentModeResponse {
    v1::admin_service_client::AdminServiceClient::new(connect(addr).await.unwrap())
        .get_deployment_mode(v1::GetDeploymentModeRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls `check` every 20 ms until it holds; how long that took, or a panic after `limit`.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// The fleet's mode, set through replica A: B and C apply it within a second (their LISTEN
/// connections go, and come back when the fleet returns to Hybrid), and all three come back
/// in it after being killed and restarted.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_fleet_mode_reaches_every_replica_and_survives_restarts(pool: PgPool) {
    use v1::DeploymentMode as M;
    let url = database_url(&pool);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ServiceProcess::spawn(&url, "Hybrid").await);
    }
    let addr_list: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let addrs = &addr_list[..];
    within(Duration::from_secs(10), "three listeners", || async {
        listen_connections(&pool).await.len() == 3
    })
    .await;
    let set_fleet = |mode: M| async move {
        v1::admin_service_client::AdminServiceClient::new(connect(addrs[0]).await.unwrap())
            .set_deployment_mode(v1::SetDeploymentModeRequest {
                mode: mode as i32,
                scope: v1::DeploymentModeScope::Fleet as i32,
                clear: false,
            })
            .await
            .unwrap()
            .into_inner()
    };
    let all_in = |mode: M| async move {
        for &a in addrs {
            let m = deployment_mode(a).await;
            if m.mode != mode as i32 || m.source != v1::DeploymentModeSource::Fleet as i32 {
                return false;
            }
        }
        true
    };

    let answer = set_fleet(M::PollingOnly).await;
    assert_eq!(answer.current, M::PollingOnly as i32);
    let took = within(
        Duration::from_secs(1),
        "PollingOnly on every replica",
        || all_in(M::PollingOnly),
    )
    .await;
    println!("fleet mode PollingOnly on all three replicas after {took:?}");
    within(
        Duration::from_secs(5),
        "LISTEN connections closed",
        || async { listen_connections(&pool).await.is_empty() },
    )
    .await;

    set_fleet(M::Hybrid).await;
    within(Duration::from_secs(1), "Hybrid on every replica", || {
        all_in(M::Hybrid)
    })
    .await;
    within(Duration::from_secs(5), "three listeners again", || async {
        listen_connections(&pool).await.len() == 3
    })
    .await;

    // stored: killed and restarted, every replica comes back in the fleet's mode
    set_fleet(M::PollingOnly).await;
    for r in replicas {
        r.sigkill().await;
    }
    let mut restarted = Vec::new();
    for &a in addrs {
        restarted.push(ServiceProcess::spawn_on(&url, "Hybrid", a).await);
    }
    within(Duration::from_secs(2), "PollingOnly after restart", || {
        all_in(M::PollingOnly)
    })
    .await;
    within(
        Duration::from_secs(5),
        "no LISTEN after restart",
        || async { listen_connections(&pool).await.is_empty() },
    )
    .await;
    for r in restarted {
        r.sigkill().await;
    }
}

/// A replica killed with SIGKILL (no goodbye) leaves the fleet listing once it has been silent
/// for orchestration.replicas.gone_after_ms, and not before its heartbeats stop.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_killed_replica_leaves_the_fleet_after_gone_after(pool: PgPool) {
    let url = database_url(&pool);
    let fast = [
        (
            "TASKER_ORCHESTRATION__REPLICAS__HEARTBEAT_INTERVAL_MS",
            "200",
        ),
        ("TASKER_ORCHESTRATION__REPLICAS__GONE_AFTER_MS", "1000"),
    ];
    let a = ServiceProcess::spawn_with(&url, "Hybrid", &fast).await;
    let b = ServiceProcess::spawn_with(&url, "Hybrid", &fast).await;
    let b_id = status(b.addr).await.replica_id;
    within(Duration::from_secs(5), "both listed", || async {
        status(a.addr).await.replicas.len() == 2
    })
    .await;
    let killed = Instant::now();
    b.sigkill().await;
    within(
        Duration::from_secs(5),
        "the killed replica gone",
        || async {
            !status(a.addr)
                .await
                .replicas
                .iter()
                .any(|r| r.replica_id == b_id)
        },
    )
    .await;
    let gone = killed.elapsed();
    println!("killed replica left the fleet listing after {gone:?}");
    assert!(
        gone >= Duration::from_millis(600),
        "listed as gone after {gone:?}, before it could have missed its heartbeats"
    );
    a.sigkill().await;
}
