//! Step queues: each step of a DAG goes to the workers of its queue, and only to them; a
//! fetch parked on one queue is woken by that queue's steps only; a queue nobody fetches
//! holds up nothing else.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;

const TASKS: usize = 8;

/// One pool of workers of a queue: fetch (long-poll) and complete until `want` steps were
/// run, recording every step received with its queue.
async fn pool_of(
    workers: Workers,
    queue: &str,
    want: usize,
    concurrency: usize,
) -> Vec<(String, String)> {
    let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let mut workers = workers.clone();
        let received = received.clone();
        let queue = queue.to_string();
        handles.push(tokio::spawn(async move {
            loop {
                if received.lock().await.len() >= want {
                    return;
                }
                let steps = workers
                    .fetch_steps(v1::FetchStepsRequest {
                        namespace: "shop".into(),
                        worker_id: format!("{queue}-{w}"),
                        max_steps: 1,
                        wait_ms: 1000,
                        lease_seconds: 30,
                        queues: vec![queue.clone()],
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .steps;
                for s in steps {
                    received
                        .lock()
                        .await
                        .push((s.name.clone(), s.queue.clone()));
                    complete_leased(&mut workers, &s).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let r = received.lock().await.clone();
    r
}

/// charge (payments) -> ship (warehouse) -> refund-window (payments), beside an archive step
/// of a queue no worker fetches: the payments pool receives exactly the payments steps, the
/// warehouse pool exactly the warehouse steps, and the unfetched queue delays neither.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn two_worker_pools_on_two_queues_each_receive_exactly_their_own_steps(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    for i in 0..TASKS {
        let request = task("shop")
            .named(&format!("order-{i}"))
            .step("archive")
            .queue("archive")
            .step("charge")
            .queue("payments")
            .step("ship")
            .after("charge")
            .queue("warehouse")
            .step("refund-window")
            .after("ship")
            .queue("payments")
            .build();
        tasks.create_task(request).await.unwrap();
    }
    let (payments, warehouse) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            pool_of(Workers::new(ch.clone()), "payments", 2 * TASKS, 3),
            pool_of(Workers::new(ch.clone()), "warehouse", TASKS, 3),
        )
    })
    .await
    .expect("every payments and warehouse step is run");
    assert_eq!(payments.len(), 2 * TASKS);
    assert_eq!(warehouse.len(), TASKS);
    for (name, queue) in &payments {
        assert_eq!(queue, "payments");
        assert!(
            name == "charge" || name == "refund-window",
            "payments ran {name}"
        );
    }
    for (name, queue) in &warehouse {
        assert_eq!((name.as_str(), queue.as_str()), ("ship", "warehouse"));
    }
    // the archive steps wait, queued, for a worker of their queue
    let archived: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.workflow_steps WHERE name = 'archive' AND queue = 'archive' AND state = 'enqueued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(archived, TASKS as i64);
    // GetTask shows each step's queue
    let one = tasks
        .list_tasks(v1::ListTasksRequest {
            namespace: "shop".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .remove(0);
    let got = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: one.task_uuid,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let queues: Vec<(String, String)> = got
        .task
        .expect("the task")
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.queue.clone()))
        .collect();
    for (name, queue) in [
        ("archive", "archive"),
        ("charge", "payments"),
        ("ship", "warehouse"),
        ("refund-window", "payments"),
    ] {
        assert!(
            queues.contains(&(name.to_string(), queue.to_string())),
            "{queues:?}"
        );
    }
    server.stop().await;
}

/// A fetch that names no queue takes the default queue's steps (as before queues existed);
/// one naming an unknown queue gets nothing; a bad queue name is INVALID_ARGUMENT naming the
/// field, and a step's bad queue name refuses the task, nothing created.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_default_queue_and_bad_queue_names(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    tasks
        .create_task(task("plain").step("only").build())
        .await
        .unwrap();
    let nothing = workers
        .fetch_steps(v1::FetchStepsRequest {
            queues: vec!["nobody-uses-this".into()],
            ..fetch_request("plain", 1, 0, 30)
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(nothing.is_empty());
    let step = lease_one(&workers, "plain").await;
    assert_eq!(step.queue, "default");

    let refused = workers
        .fetch_steps(v1::FetchStepsRequest {
            queues: vec!["ok".into(), "Not OK".into()],
            ..fetch_request("plain", 1, 0, 30)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("queues[1]"), "{refused:?}");

    let refused = tasks
        .create_task(task("plain").step("a").queue("bad/queue").build())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("steps[0].queue"), "{refused:?}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "nothing created");
    server.stop().await;
}
