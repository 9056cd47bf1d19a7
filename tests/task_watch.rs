//! WatchTask through the gRPC API: the first message is the task now, then every change of
//! its state in order, none missing, until it is complete; bad and unknown tasks refused.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::{v1, Vocabulary};
use tokio_stream::StreamExt;
use tonic::Code;

use v1::watch_task_response::Event;

const TASKS: usize = 100;

fn chain(ns: &str) -> v1::CreateTaskRequest {
    two_steps(ns, "watched")
}

/// Everything a stream sent, until it ended.
async fn drain(mut stream: tonic::Streaming<v1::WatchTaskResponse>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(m) = stream.next().await {
        events.push(m.expect("stream message").event.expect("an event"));
    }
    events
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn every_change_of_100_concurrent_tasks_reaches_their_watchers_in_order(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut ids = Vec::new();
    for _ in 0..TASKS {
        ids.push(
            tasks
                .create_task(chain("watched"))
                .await
                .unwrap()
                .into_inner()
                .task_uuid,
        );
    }
    // every watcher is following before any worker runs
    let mut streams = Vec::new();
    for id in &ids {
        let stream = tasks
            .watch_task(v1::WatchTaskRequest {
                task_uuid: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(tokio::spawn(drain(stream)));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (mut w, stop) = (Workers::new(ch.clone()), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let fetched = w
                        .fetch_steps(fetch_request("watched", 8, 200, 30))
                        .await
                        .unwrap()
                        .into_inner()
                        .steps;
                    for s in fetched {
                        complete_leased(&mut w, &s).await;
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for s in streams {
        all.push(
            tokio::time::timeout(Duration::from_secs(60), s)
                .await
                .expect("every stream ends once its task is complete")
                .unwrap(),
        );
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    for (id, events) in ids.iter().zip(all) {
        let Some(Event::Snapshot(snapshot)) = events.first() else {
            panic!("{id}: the first message is not the snapshot: {events:?}");
        };
        assert_eq!(snapshot.steps.len(), 2);
        let history: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, coalesce(from_state, 'unspecified'), to_state FROM tasker.task_transitions
             WHERE task_uuid = $1::uuid ORDER BY id",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
        let changes: Vec<(i64, String, String)> = events[1..]
            .iter()
            .filter_map(|e| match e {
                Event::TaskState(c) => {
                    Some((c.sequence, c.from_state().word(), c.to_state().word()))
                }
                _ => None,
            })
            .collect();
        // the changes are exactly the history after the state the snapshot shows
        let from = history.len() - changes.len();
        assert_eq!(
            changes,
            history[from..],
            "{id}: changes against the history"
        );
        assert_eq!(
            history[from - 1].2,
            snapshot.state().word(),
            "{id}: snapshot state"
        );
        assert_eq!(history.last().unwrap().2, "complete");
        // the steps' changes end with each step complete
        let completed: HashSet<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::StepState(c) if c.to_state() == v1::StepState::Complete => {
                    Some(c.name.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(completed, HashSet::from(["first", "second"]), "{id}");
    }
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn watching_a_finished_task_sends_its_state_and_ends_and_bad_ones_are_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let id = tasks
        .create_task(chain("finished"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    cancel(&mut tasks, &id).await;
    let stream = tasks
        .watch_task(v1::WatchTaskRequest {
            task_uuid: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let events = tokio::time::timeout(Duration::from_secs(10), drain(stream))
        .await
        .expect("the stream of a final task ends at once");
    assert!(
        matches!(&events[..], [Event::Snapshot(t)] if t.state() == v1::TaskState::Cancelled),
        "{events:?}"
    );

    let e = tasks
        .watch_task(v1::WatchTaskRequest {
            task_uuid: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("task_uuid"), "{}", e.message());
    let e = tasks
        .watch_task(v1::WatchTaskRequest {
            task_uuid: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await;
}

/// The streams of one task share its reads: 300 streams on a 20-step chain are one feed, each
/// stream sees every step complete and the task complete, and none waits on the others
/// (4,096 streams each re-reading every step at every change slowed every hop ~200x).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_streams_of_one_task_share_one_feed(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.max_watch_streams_per_caller = 1000;
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    // a connection carries at most grpc.max_concurrent_streams (256) calls
    let channels = [ch.clone(), server.channel().await];
    let mut tasks = Tasks::new(ch.clone());
    let steps: Vec<v1::StepDefinition> = (0..20)
        .map(|i| {
            let deps: Vec<String> = (i > 0).then(|| format!("s{}", i - 1)).into_iter().collect();
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            step_def(&format!("s{i}"), &deps)
        })
        .collect();
    let id = tasks
        .create_task(v1::CreateTaskRequest {
            namespace: "shared".into(),
            name: "chain".into(),
            steps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut streams = Vec::new();
    for i in 0..300 {
        // many streams per connection, as clients multiplex them
        let mut t = Tasks::new(channels[i % 2].clone());
        let stream = t
            .watch_task(v1::WatchTaskRequest {
                task_uuid: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(tokio::spawn(drain(stream)));
    }
    let status = Admin::new(ch.clone())
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.watch_streams, status.watched_tasks), (300, 1));
    let mut w = Workers::new(ch.clone());
    for _ in 0..20 {
        let s = lease_one(&w, "shared").await;
        complete_leased(&mut w, &s).await;
    }
    for s in streams {
        let events = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("every stream ends with its task")
            .unwrap();
        let completed = events
            .iter()
            .filter(|e| matches!(e, Event::StepState(c) if c.to_state() == v1::StepState::Complete))
            .count();
        assert_eq!(completed, 20, "{events:?}");
        assert!(
            matches!(events.last(), Some(Event::TaskState(t)) if t.to_state() == v1::TaskState::Complete)
        );
    }
    server.stop().await;
}

/// WatchTask streams are capped per caller and in all (a read token opened 4,096): beyond,
/// RESOURCE_EXHAUSTED naming the setting; a closed stream gives its place back.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn watch_streams_are_capped_per_caller_and_in_all(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.max_watch_streams = 5;
    cfg.grpc.max_watch_streams_per_caller = 3;
    cfg.grpc.auth.tokens = vec![
        token("a", &["read", "write"]),
        token("b", &["read", "write"]),
    ];
    let server = TestServer::start(&pool, &cfg).await;
    let mut tasks = Tasks::new(server.channel().await);
    let watch = |token: &str, id: &str| {
        as_token(
            token,
            v1::WatchTaskRequest {
                task_uuid: id.to_string(),
            },
        )
    };
    let id = tasks
        .create_task(as_token("a", chain("capped")))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            tasks
                .watch_task(watch("a", &id))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let e = tasks.watch_task(watch("a", &id)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("grpc.max_watch_streams_per_caller"),
        "{e:?}"
    );
    for _ in 0..2 {
        open.push(
            tasks
                .watch_task(watch("b", &id))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let e = tasks.watch_task(watch("b", &id)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("(grpc.max_watch_streams)"), "{e:?}");
    drop(open.remove(0));
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(e) = tasks.watch_task(watch("b", &id)).await {
        assert!(
            e.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline,
            "{e:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// A stream of an unfinished task ends with UNAVAILABLE (retry elsewhere) when the server
/// drains, not with OK as if the task were done.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_draining_server_ends_a_watch_with_unavailable(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let id = tasks
        .create_task(chain("drained"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut stream = tasks
        .watch_task(v1::WatchTaskRequest { task_uuid: id })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.next().await.unwrap().unwrap().event,
        Some(Event::Snapshot(_))
    ));
    let stopping = tokio::spawn(server.stop());
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ended when the server drained");
    let e = ended.expect("the stream ended with an error, not OK");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    stopping.await.unwrap();
}
