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

use common::*;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
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

async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
}

/// Workers over gRPC: lease, complete; on any transport error reconnect (to the next
/// endpoint) after a short back-off. Workers are clients: retrying is their job.
struct Workers {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
    completed: Arc<AtomicU64>,
}

impl Workers {
    fn start(endpoints: Vec<SocketAddr>, ns: &str, n: usize) -> Self {
        let stop = CancellationToken::new();
        let completed = Arc::new(AtomicU64::new(0));
        let handles = (0..n)
            .map(|i| {
                let (endpoints, ns, stop, completed) = (
                    endpoints.clone(),
                    ns.to_string(),
                    stop.clone(),
                    completed.clone(),
                );
                tokio::spawn(async move {
                    let mut k = i;
                    while !stop.is_cancelled() {
                        let addr = endpoints[k % endpoints.len()];
                        k += 1;
                        let Ok(ch) = connect(addr).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let mut w = common::Workers::new(ch);
                        loop {
                            let req = v1::FetchStepsRequest {
                                namespace: ns.clone(),
                                worker_id: format!("w{i}"),
                                max_steps: 4,
                                wait_ms: 1000,
                                lease_seconds: 5,
                            };
                            let fetched = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = w.fetch_steps(req) => r,
                            };
                            let Ok(fetched) = fetched else { break };
                            for s in fetched.into_inner().steps {
                                let done = w
                                    .complete_step(v1::CompleteStepRequest {
                                        step_uuid: s.step_uuid,
                                        attempt: s.attempt,
                                        results: None,
                                    })
                                    .await;
                                match done {
                                    Ok(_) => {
                                        completed.fetch_add(1, Ordering::Relaxed);
                                    }
                                    // lease expired during a fault: the step is retried
                                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
                                    Err(_) => break,
                                }
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
    let duplicated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT step_uuid, attempt FROM tasker.step_transitions
          WHERE to_state = 'enqueued' GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
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

fn assert_clean(r: &Report) {
    assert_eq!(r.lost, 0, "tasks lost");
    assert_eq!(r.duplicated, 0, "step attempts enqueued twice");
    assert_eq!(r.stuck, 0, "steps stuck");
    assert_eq!(r.errored, 0, "tasks failed");
}

#[sqlx::test(migrator = "tasker::store::MIGRATOR")]
async fn f1_listener_killed_repeatedly(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let tasks = create_workload(server.addr, "f1").await;
    let workers = Workers::start(vec![server.addr], "f1", 8);
    let mut status = server.core.coordinator.listener_status();
    let mut kills = 0;
    while !all_final(&pool, &tasks).await && kills < 10 {
        let st = status
            .wait_for(|s| s.state == tasker::readiness::ListenerState::Listening)
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
    wait_all_final(&pool, &tasks, RECOVERY_LIMIT).await;
    let recovery = t.elapsed();
    workers.stop().await;
    let r = invariants(&pool, &tasks).await;
    row(
        "1 listener killed repeatedly (EventDrivenOnly)",
        &format!("{kills} listener kills"),
        &r,
        recovery,
    );
    assert!(kills >= 3);
    assert_clean(&r);
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::store::MIGRATOR")]
async fn f2a_all_connections_killed_at_once(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let tasks = create_workload(server.addr, "f2").await;
    let workers = Workers::start(vec![server.addr], "f2", 8);
    // once work is under way, cut every connection of the service to its database
    while workers.completed.load(Ordering::Relaxed) < 200 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()) k",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let t = Instant::now();
    wait_all_final(&pool, &tasks, RECOVERY_LIMIT).await;
    let recovery = t.elapsed();
    workers.stop().await;
    let r = invariants(&pool, &tasks).await;
    row(
        "2a all service connections killed at once",
        &format!("{killed} backends terminated"),
        &r,
        recovery,
    );
    assert_clean(&r);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2b_database_restarted_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tasker::local_db::EmbeddedCluster::start(dir.path())
        .await
        .expect("throwaway cluster");
    let url = cluster.url("postgres");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap();
    tasker::store::MIGRATOR.run(&pool).await.unwrap();
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.database.url = url;
    let server = TestServer::start(&pool, &cfg).await;
    let tasks = create_workload(server.addr, "f2b").await;
    let workers = Workers::start(vec![server.addr], "f2b", 8);
    while workers.completed.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    cluster.restart().expect("restart");
    wait_all_final(&pool, &tasks, RECOVERY_LIMIT).await;
    let recovery = t.elapsed();
    workers.stop().await;
    let r = invariants(&pool, &tasks).await;
    row(
        "2b database restarted mid-run (pg_ctl restart -m fast)",
        "1 restart",
        &r,
        recovery,
    );
    assert_clean(&r);
    server.stop().await;
    pool.close().await;
    drop(cluster);
}
