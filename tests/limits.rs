//! Limits that keep one request from taking the database (or the server) down: statement
//! timeouts, cancelling a dropped request's statement, bounded DAG checks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use tasker::config::{DatabaseConfig, DeploymentMode};
use tasker::internal::{Store, StoreError, TaskSpec};
use tasker::proto::v1;
use tonic::{Code, Request};

/// A trigger that makes every task insert take `seconds`: a stand-in for a statement that
/// runs long.
async fn slow_task_inserts(pool: &PgPool, seconds: f64) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
         CREATE TRIGGER slow_insert BEFORE INSERT ON tasker.tasks
             FOR EACH ROW EXECUTE FUNCTION public.slow_insert();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn task_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The URL of the test's own database (the harness made it; `Store::connect` takes a URL).
async fn own_url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    tasker::internal::with_database(&base, &db)
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_statement_past_the_timeout_is_cancelled_and_writes_nothing(pool: PgPool) {
    slow_task_inserts(&pool, 5.0).await;
    let cfg = DatabaseConfig {
        statement_timeout: Duration::from_millis(300),
        ..DatabaseConfig::default()
    };
    let store = Store::connect(&own_url(&pool).await, &cfg).await.unwrap();
    let started = Instant::now();
    let task = TaskSpec::chain("limits", 3).into_new_task().unwrap();
    let err = store
        .create_task(&task, &serde_json::json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::StatementTimeout), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cancelled after {:?}, not by the 300 ms timeout",
        started.elapsed()
    );
    assert_eq!(task_count(&pool).await, 0, "nothing was written");
}

/// Statements of this database still running `create_task`.
async fn running_create_task(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state = 'active'
           AND query LIKE '%tasker.create_task(%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_dropped_request_leaves_no_running_statement(pool: PgPool) {
    slow_task_inserts(&pool, 60.0).await;
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let mut request = Request::new(v1::CreateTaskRequest {
        namespace: "limits".into(),
        name: "slow".into(),
        steps: vec![step_def("a", &[])],
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(500));
    let status = tasks.create_task(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // the statement was running when the client gave up; it must be gone well before the
    // trigger's 60 s
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = running_create_task(&pool).await;
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} create_task statement(s) still running 10 s after the client gave up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        task_count(&pool).await,
        0,
        "the cancelled task was not committed"
    );
    server.stop().await;
}

/// `layers` layers of `width` steps, each depending on every step of the layer before.
fn layered(width: usize, layers: usize) -> v1::CreateTaskRequest {
    let name = |l: usize, i: usize| format!("l{l}s{i}");
    let mut steps = Vec::new();
    for l in 0..layers {
        for i in 0..width {
            let deps: Vec<String> = if l == 0 {
                Vec::new()
            } else {
                (0..width).map(|j| name(l - 1, j)).collect()
            };
            steps.push(v1::StepDefinition {
                name: name(l, i),
                depends_on: deps,
                ..Default::default()
            });
        }
    }
    v1::CreateTaskRequest {
        namespace: "layers".into(),
        name: format!("layered {width}x{layers}"),
        steps,
        ..Default::default()
    }
}

/// The DAGs that used to hold a database core for seconds to minutes (the cycle check walked
/// every descendant per edge): 10 layers of 30 steps (8,100 edges) is created at once; 10
/// layers of 100 (90,000 edges) is refused by the edge limit before anything is written.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn layered_dags_are_created_at_once_or_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);

    let started = Instant::now();
    let created = tasks
        .create_task(layered(30, 10))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    println!("W=30: 300 steps, 8,100 edges, created in {took:?}");
    assert_eq!(created.steps.len(), 300);
    assert!(took < Duration::from_secs(1), "W=30 took {took:?}");
    let edges: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.step_edges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(edges, 8_100);

    let started = Instant::now();
    let refused = tasks.create_task(layered(100, 10)).await.unwrap_err();
    let took = started.elapsed();
    println!("W=100: refused in {took:?}: {}", refused.message());
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("10000"), "{}", refused.message());
    assert!(took < Duration::from_secs(1), "W=100 took {took:?}");
    assert_eq!(task_count(&pool).await, 1, "only the W=30 task");
    server.stop().await;
}
