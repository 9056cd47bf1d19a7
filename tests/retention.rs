//! Retention: finished tasks leave the database with every row that refers to them once their
//! namespace's retention has passed, while unfinished tasks and tasks in error within their
//! (longer) period stay whole; replicas purging at once never take the same task; the
//! history refuses any other way out; an idempotency key is free again once its task is gone.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::proto::v1;
use tasker::testkit::{RetentionDefaults, StepSpec, TaskSpec};
use uuid::Uuid;

/// Complete or cancelled tasks kept 1 s, tasks in error an hour, the purger looking every
/// 100 ms.
fn retention_config() -> TaskerConfig {
    let mut c = test_config(DeploymentMode::Hybrid);
    let r = &mut c.orchestration.retention;
    r.retention = Duration::from_secs(1);
    r.error_retention = Duration::from_secs(3600);
    r.purge_interval = Duration::from_millis(100);
    c
}

/// Per table of the `tasker` schema, the rows with a uuid column naming one of `ids`: every
/// reference to a task or step, whatever the table (found from the catalogue, so a table
/// added later is covered).
async fn rows_naming(pool: &PgPool, ids: &[Uuid]) -> BTreeMap<String, i64> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'tasker' AND data_type = 'uuid'
           AND table_name IN (SELECT table_name FROM information_schema.tables
                              WHERE table_schema = 'tasker' AND table_type = 'BASE TABLE')
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(columns.len() >= 10, "{columns:?}");
    let mut by_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (table, column) in columns {
        by_table.entry(table).or_default().push(column);
    }
    let mut found = BTreeMap::new();
    for (table, columns) in by_table {
        let naming: Vec<String> = columns.iter().map(|c| format!("{c} = ANY($1)")).collect();
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM tasker.{table} WHERE {}",
            naming.join(" OR ")
        ))
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap();
        found.insert(table, n);
    }
    found
}

/// A task and its steps, as ids.
async fn task_and_steps(tasks: &mut Tasks, task: &str) -> Vec<Uuid> {
    let t = get_task(tasks, task).await;
    let mut ids = vec![task.parse().unwrap()];
    ids.extend(t.steps.iter().map(|s| s.step_uuid.parse::<Uuid>().unwrap()));
    ids
}

async fn create(tasks: &mut Tasks, request: v1::CreateTaskRequest) -> v1::CreateTaskResponse {
    tasks.create_task(request).await.unwrap().into_inner()
}

/// Keep `namespace`'s complete and cancelled tasks `seconds` (SetNamespaceSettings, the
/// retention alone).
async fn set_retention(admin: &mut Admin, namespace: &str, seconds: i64) {
    admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: namespace.into(),
            retention: Some(prost_types::Duration { seconds, nanos: 0 }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["retention".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Wait until GetTask answers NOT_FOUND for every task in `gone`.
async fn wait_gone(tasks: &mut Tasks, gone: &[&str], within: Duration) {
    tokio::time::timeout(within, async {
        for task in gone {
            loop {
                let r = tasks
                    .get_task(v1::GetTaskRequest {
                        task_uuid: task.to_string(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Err(s) if s.code() == tonic::Code::NotFound => break,
                    Err(s) => panic!("GetTask {task}: {s:?}"),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    })
    .await
    .expect("finished tasks past their retention are removed");
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn finished_tasks_leave_with_every_row_while_running_and_recent_errors_stay(pool: PgPool) {
    let mut config = retention_config();
    config.orchestration.retention.retention = Duration::from_secs(86_400);
    let server = TestServer::start(&pool, &config).await;
    let channel = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(channel.clone()), Workers::new(channel.clone()));

    // complete: both steps run
    let done = create(&mut tasks, two_steps("shop", "done"))
        .await
        .task_uuid;
    for _ in 0..2 {
        let s = lease_one(&workers, "shop").await;
        complete_leased(&mut workers, &s).await;
    }
    // in error (kept an hour)
    let failed = create(&mut tasks, two_steps("shop", "failed"))
        .await
        .task_uuid;
    let s = lease_one(&workers, "shop").await;
    assert_eq!(s.task_uuid, failed);
    fail_for_good(&mut workers, &s, "broken").await;
    // running: its first step leased and held
    let running = create(&mut tasks, two_steps("shop", "running"))
        .await
        .task_uuid;
    let held = lease_one(&workers, "shop").await;
    assert_eq!(held.task_uuid, running);
    // cancelled while a step was leased
    let cancelled = create(&mut tasks, two_steps("shop", "cancelled"))
        .await
        .task_uuid;
    let leftover = lease_one(&workers, "shop").await;
    assert_eq!(leftover.task_uuid, cancelled);
    cancel(&mut tasks, &cancelled).await;

    let gone_ids = [
        task_and_steps(&mut tasks, &done).await,
        task_and_steps(&mut tasks, &cancelled).await,
    ]
    .concat();
    let kept_ids = [
        task_and_steps(&mut tasks, &failed).await,
        task_and_steps(&mut tasks, &running).await,
    ]
    .concat();
    let kept_before = rows_naming(&pool, &kept_ids).await;
    assert!(kept_before["step_transitions"] > 0 && kept_before["task_transitions"] > 0);
    // now the namespace keeps finished tasks for a second (until here, the fleet's day)
    set_retention(&mut Admin::new(channel.clone()), "shop", 1).await;
    wait_gone(&mut tasks, &[&done, &cancelled], Duration::from_secs(60)).await;
    let left: BTreeMap<String, i64> = rows_naming(&pool, &gone_ids)
        .await
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(left.is_empty(), "rows still naming removed tasks: {left:?}");
    assert_eq!(
        rows_naming(&pool, &kept_ids).await,
        kept_before,
        "the running task and the task in error within its period stay whole"
    );
    // the running task goes on
    complete_leased(&mut workers, &held).await;
    let status = Admin::new(channel)
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .retention
        .unwrap();
    assert!(status.purging);
    assert!(
        status.tasks_purged >= 2 && status.steps_purged >= 4,
        "{status:?}"
    );
    assert!(status.rows_purged > status.steps_purged, "{status:?}");
    assert!(status.schema_bytes > 0);
    let shop = status
        .namespaces
        .iter()
        .find(|n| n.namespace == "shop")
        .unwrap();
    assert!(
        shop.oldest_error_age.is_some(),
        "the task in error is kept: {shop:?}"
    );
    assert!(!status.behind, "{status:?}");
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_namespace_retention_overrides_the_default_and_refuses_bad_periods(pool: PgPool) {
    let mut config = retention_config();
    // the fleet's default keeps everything for a day: only the namespace's own period purges
    config.orchestration.retention.retention = Duration::from_secs(86_400);
    let server = TestServer::start(&pool, &config).await;
    let channel = server.channel().await;
    let (mut tasks, mut workers, mut admin) = (
        Tasks::new(channel.clone()),
        Workers::new(channel.clone()),
        Admin::new(channel.clone()),
    );
    let keep_for = |s: i64| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let both = create(&mut tasks, two_steps("short", "t")).await.task_uuid;
    admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "short".into(),
            max_tasks_per_key: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    // changing the retention alone leaves the key limit as it is
    let settings = admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "short".into(),
            retention: keep_for(1),
            update_mask: mask(&["retention"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settings.max_tasks_per_key, Some(2));
    assert_eq!(settings.retention, keep_for(1));
    assert_eq!(settings.error_retention, None);
    assert_eq!(settings.effective_error_retention, keep_for(3600));

    for (request, field) in [
        (
            v1::SetNamespaceSettingsRequest {
                namespace: "short".into(),
                retention: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                update_mask: mask(&["retention"]),
                ..Default::default()
            },
            "retention",
        ),
        (
            v1::SetNamespaceSettingsRequest {
                namespace: "short".into(),
                error_retention: keep_for(3_651 * 86_400),
                update_mask: mask(&["error_retention"]),
                ..Default::default()
            },
            "error_retention",
        ),
        (
            v1::SetNamespaceSettingsRequest {
                namespace: "short".into(),
                update_mask: mask(&["retention", "ttl"]),
                ..Default::default()
            },
            "update_mask.paths[1]",
        ),
    ] {
        let refused = admin.set_namespace_settings(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            field_violations(&refused),
            vec![field.to_string()],
            "{refused:?}"
        );
    }
    let unchanged = admin
        .get_namespace_settings(v1::GetNamespaceSettingsRequest {
            namespace: "short".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged, settings, "a refused change changes nothing");

    // the other namespace keeps its task under the fleet's day
    let kept = create(&mut tasks, two_steps("long", "t")).await.task_uuid;
    for namespace in ["short", "short", "long", "long"] {
        let s = lease_one(&workers, namespace).await;
        complete_leased(&mut workers, &s).await;
    }
    wait_gone(&mut tasks, &[&both], Duration::from_secs(60)).await;
    tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: kept,
            ..Default::default()
        })
        .await
        .expect("kept under the fleet's default");
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn two_replicas_purging_at_once_take_each_task_once(pool: PgPool) {
    const TASKS: usize = 120;
    let store = tasker::testkit::Store::new(pool.clone());
    let mut created = Vec::new();
    for i in 0..TASKS {
        let t = common::create(
            &store,
            TaskSpec::new("bulk", format!("t{i}"), vec![StepSpec::new("only", &[])]),
        )
        .await;
        run_named(&store, t.task_uuid, "bulk", "only").await;
        created.push(t.task_uuid);
    }
    // every task: its row, its step, and the history of both
    let steps: Vec<Uuid> =
        sqlx::query_scalar("SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = ANY($1)")
            .bind(&created)
            .fetch_all(&pool)
            .await
            .unwrap();
    let ids = [created.clone(), steps].concat();
    let rows_before: i64 = rows_naming(&pool, &ids).await.values().sum();
    let deadlocks = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadlocks_before = deadlocks().await;
    let defaults = RetentionDefaults {
        retention: Duration::from_millis(1),
        error_retention: Duration::from_secs(3600),
    };
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            // each replica its own pool, as two processes have
            let (url, start) = (database_url(&pool), start.clone());
            tokio::spawn(async move {
                let store = tasker::testkit::Store::connect(&url, &Default::default())
                    .await
                    .unwrap();
                start.wait().await;
                let (mut tasks, mut rows) = (0i64, 0i64);
                loop {
                    let batch = store
                        .purge_finished_tasks(defaults, 3, None)
                        .await
                        .expect("a purge batch never fails beside another");
                    if batch.tasks == 0 {
                        return (tasks, rows);
                    }
                    tasks += i64::from(batch.tasks);
                    rows += batch.rows_removed;
                }
            })
        })
        .collect();
    let mut totals = Vec::new();
    for r in replicas {
        totals.push(r.await.unwrap());
    }
    let tasks: i64 = totals.iter().map(|t| t.0).sum();
    let rows: i64 = totals.iter().map(|t| t.1).sum();
    assert_eq!(tasks, TASKS as i64, "each task purged once: {totals:?}");
    assert_eq!(rows, rows_before, "each row removed once: {totals:?}");
    assert!(totals.iter().all(|t| t.0 > 0), "both purged: {totals:?}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(deadlocks().await, deadlocks_before);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_history_refuses_every_other_way_out(pool: PgPool) {
    let store = tasker::testkit::Store::new(pool.clone());
    let t = common::create(
        &store,
        TaskSpec::new("ns", "t", vec![StepSpec::new("only", &[])]),
    )
    .await;
    run_named(&store, t.task_uuid, "ns", "only").await;
    let history = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM tasker.step_transitions)
                  + (SELECT count(*) FROM tasker.task_transitions)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = history().await;
    assert!(before >= 4);
    for statement in [
        "DELETE FROM tasker.step_transitions",
        "DELETE FROM tasker.task_transitions WHERE true",
        "UPDATE tasker.step_transitions SET attempt = attempt",
        "UPDATE tasker.task_transitions SET metadata = '{}'",
    ] {
        let e = sqlx::query(statement).execute(&pool).await.unwrap_err();
        assert!(e.to_string().contains("is append-only"), "{statement}: {e}");
    }
    assert_eq!(history().await, before);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_idempotency_key_is_free_again_once_its_task_is_removed(pool: PgPool) {
    let mut config = retention_config();
    config.orchestration.retention.retention = Duration::from_secs(86_400);
    let server = TestServer::start(&pool, &config).await;
    let channel = server.channel().await;
    let (mut tasks, mut workers, mut admin) = (
        Tasks::new(channel.clone()),
        Workers::new(channel.clone()),
        Admin::new(channel),
    );
    let mut request = tasker::client::task("orders").step("charge").build();
    request.idempotency_key = "order-7".into();
    let first = create(&mut tasks, request.clone()).await;
    assert!(first.created);
    let s = lease_one(&workers, "orders").await;
    complete_leased(&mut workers, &s).await;
    // kept (a day): the repeat returns it
    let repeat = create(&mut tasks, request.clone()).await;
    assert!(!repeat.created);
    assert_eq!(repeat.task_uuid, first.task_uuid);
    // the namespace's retention shortened: it goes, and the key with it
    set_retention(&mut admin, "orders", 1).await;
    wait_gone(&mut tasks, &[&first.task_uuid], Duration::from_secs(60)).await;
    let again = create(&mut tasks, request).await;
    assert!(again.created, "the key is free once its task is removed");
    assert_ne!(again.task_uuid, first.task_uuid);
    server.stop().await;
}
