//! ListTasks through the gRPC API: filters, order, keyset pages that hold while tasks are
//! created and change state, and the refusal of bad requests.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::Code;

/// A service that never processes anything by itself (PollingOnly, no poll within a test): the
/// tasks stay as the test made them.
fn quiet() -> tasker::config::TaskerConfig {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    cfg
}

fn one_step(ns: &str, name: &str) -> v1::CreateTaskRequest {
    tasker::client::task(ns).named(name).step("only").build()
}

fn list(req: impl FnOnce(&mut v1::ListTasksRequest)) -> v1::ListTasksRequest {
    let mut r = v1::ListTasksRequest::default();
    req(&mut r);
    r
}

async fn uuids(tasks: &mut Tasks, r: v1::ListTasksRequest) -> (Vec<String>, String) {
    let page = tasks.list_tasks(r).await.unwrap().into_inner();
    (
        page.tasks.into_iter().map(|t| t.task_uuid).collect(),
        page.next_page_token,
    )
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn tasks_are_listed_by_filter_in_order_and_paged(pool: PgPool) {
    let server = TestServer::start(&pool, &quiet()).await;
    let mut tasks = Tasks::new(server.channel().await);
    let mut made = Vec::new();
    for (ns, name) in [("a", "x"), ("a", "y"), ("b", "x"), ("a", "x"), ("b", "y")] {
        made.push(
            tasks
                .create_task(one_step(ns, name))
                .await
                .unwrap()
                .into_inner()
                .task_uuid,
        );
    }
    cancel(&mut tasks, &made[1]).await;
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();

    let (all, token) = uuids(&mut tasks, list(|_| {})).await;
    assert_eq!(all, newest_first, "newest first by default");
    assert!(token.is_empty(), "one page holds them all");
    let (oldest, _) = uuids(
        &mut tasks,
        list(|r| r.order = v1::TaskOrder::OldestFirst as i32),
    )
    .await;
    assert_eq!(oldest, made);
    let (in_a, _) = uuids(&mut tasks, list(|r| r.namespace = "a".into())).await;
    assert_eq!(in_a, [&made[3], &made[1], &made[0]].map(String::clone));
    let (named_x_in_a, _) = uuids(
        &mut tasks,
        list(|r| {
            r.namespace = "a".into();
            r.name = "x".into();
        }),
    )
    .await;
    assert_eq!(named_x_in_a, [&made[3], &made[0]].map(String::clone));
    let (cancelled, _) = uuids(
        &mut tasks,
        list(|r| r.states = vec![v1::TaskState::Cancelled.into()]),
    )
    .await;
    assert_eq!(cancelled, [made[1].clone()]);
    let (active, _) = uuids(
        &mut tasks,
        list(|r| {
            r.states = vec![
                v1::TaskState::Pending.into(),
                v1::TaskState::InProgress.into(),
            ]
        }),
    )
    .await;
    assert_eq!(active.len(), 4);
    assert!(!active.contains(&made[1]));

    // created between the second and the fourth task (the fourth excluded)
    let created = |i: usize| {
        let t = made[i].clone();
        let pool = pool.clone();
        async move {
            let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
                "SELECT created_at FROM tasker.tasks WHERE task_uuid = $1::uuid",
            )
            .bind(t)
            .fetch_one(&pool)
            .await
            .unwrap();
            tasker::proto::timestamp(at)
        }
    };
    let (from, to) = (created(1).await, created(3).await);
    let (window, _) = uuids(
        &mut tasks,
        list(|r| {
            r.created_after = Some(from);
            r.created_before = Some(to);
        }),
    )
    .await;
    assert_eq!(window, [&made[2], &made[1]].map(String::clone));

    // pages of two, newest first: every task once, in order, then no token
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = uuids(
            &mut tasks,
            list(|r| {
                r.page_size = 2;
                r.page_token = token.clone();
            }),
        )
        .await;
        assert!(page.len() <= 2);
        paged.extend(page);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(paged, newest_first);
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bad_list_requests_name_their_field(pool: PgPool) {
    let server = TestServer::start(&pool, &quiet()).await;
    let mut tasks = Tasks::new(server.channel().await);
    for _ in 0..3 {
        tasks.create_task(one_step("a", "x")).await.unwrap();
    }
    let (_, token) = uuids(&mut tasks, list(|r| r.page_size = 1)).await;
    assert!(!token.is_empty());
    let now = tasker::proto::timestamp(chrono::Utc::now());
    let cases: Vec<(&str, v1::ListTasksRequest)> = vec![
        ("page_size", list(|r| r.page_size = 1001)),
        ("page_size", list(|r| r.page_size = -1)),
        ("namespace", list(|r| r.namespace = "Not OK".into())),
        (
            "states[1]",
            list(|r| r.states = vec![v1::TaskState::Pending.into(), 42]),
        ),
        (
            "states[0]",
            list(|r| r.states = vec![v1::TaskState::Unspecified.into()]),
        ),
        ("name", list(|r| r.name = "n".repeat(256))),
        ("order", list(|r| r.order = 9)),
        (
            "created_before",
            list(|r| {
                r.created_after = Some(now);
                r.created_before = Some(now);
            }),
        ),
        (
            "updated_after",
            list(|r| {
                r.updated_after = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                })
            }),
        ),
        ("page_token", list(|r| r.page_token = "offset:10".into())),
        // a real token, sent with another filter or order than it was issued for
        (
            "page_token",
            list(|r| {
                r.page_token = token.clone();
                r.namespace = "a".into();
            }),
        ),
        (
            "page_token",
            list(|r| {
                r.page_token = token.clone();
                r.order = v1::TaskOrder::OldestFirst as i32;
            }),
        ),
    ];
    for (field, req) in cases {
        let e = tasks.list_tasks(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(&format!("invalid {field}:")),
            "{field}: {}",
            e.message()
        );
        assert_eq!(violated_fields(&e), [field]);
    }
    // every broken rule at once
    let e = tasks
        .list_tasks(list(|r| {
            r.page_size = -1;
            r.states = vec![0, v1::TaskState::Error.into(), 7];
            r.order = 9;
        }))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&e),
        ["page_size", "states[0]", "states[2]", "order"],
        "{}",
        e.message()
    );
    // the same token with the filters it was issued for pages on
    let (next, _) = uuids(
        &mut tasks,
        list(|r| {
            r.page_size = 1;
            r.page_token = token.clone();
        }),
    )
    .await;
    assert_eq!(next.len(), 1);
    server.stop().await;
}

/// 10,000 tasks, paged 500 at a time while other tasks are created and existing ones
/// cancelled: each of the 10,000 is seen exactly once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn paging_10000_tasks_while_they_change_sees_each_exactly_once(pool: PgPool) {
    let server = TestServer::start(&pool, &quiet()).await;
    let ch = server.channel().await;
    let existing: HashSet<String> = sqlx::query_scalar(
        "SELECT c.task_uuid::text FROM generate_series(1, 10000) i,
         LATERAL tasker.create_task(
             gen_random_uuid(), 'bulk', 'wf-' || (i % 7), 0, '{}'::jsonb, NULL,
             jsonb_build_array(jsonb_build_object(
                 'step_uuid', gen_random_uuid(), 'name', 'only', 'position', 0,
                 'parents', '[]'::jsonb, 'max_attempts', 3, 'retryable', true,
                 'inputs', '{}'::jsonb))) c",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(existing.len(), 10_000);

    // meanwhile: new tasks in the namespace, and existing ones cancelled (state and
    // updated_at change under the pages)
    let stop = tokio_util::sync::CancellationToken::new();
    let churn = {
        let (mut tasks, stop) = (Tasks::new(ch.clone()), stop.clone());
        let victims: Vec<String> = existing.iter().take(2000).cloned().collect();
        tokio::spawn(async move {
            let mut changes = 0u32;
            for victim in victims {
                if stop.is_cancelled() {
                    break;
                }
                tasks.create_task(one_step("bulk", "new")).await.unwrap();
                tasks
                    .cancel_task(v1::CancelTaskRequest {
                        task_uuid: victim,
                        reason: String::new(),
                    })
                    .await
                    .unwrap();
                changes += 1;
            }
            changes
        })
    };

    let mut tasks = Tasks::new(ch);
    let mut seen = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (page, next) = uuids(
            &mut tasks,
            list(|r| {
                r.namespace = "bulk".into();
                r.page_size = 500;
                r.page_token = token.clone();
            }),
        )
        .await;
        pages += 1;
        for t in page {
            assert!(seen.insert(t.clone()), "task {t} listed twice");
        }
        if next.is_empty() {
            break;
        }
        token = next;
    }
    stop.cancel();
    let changes = churn.await.unwrap();
    assert!(changes > 0, "tasks changed while the pages were read");
    let missing = existing.difference(&seen).count();
    assert_eq!(missing, 0, "{missing} existing tasks never listed");
    // newest first: only tasks created before the first page was read can be among it
    let extra = seen.len() - 10_000;
    assert!(
        extra <= changes as usize,
        "{extra} unknown tasks over {pages} pages"
    );
    server.stop().await;
}

/// The fields an INVALID_ARGUMENT's BadRequest names, in order.
fn violated_fields(e: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    e.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
