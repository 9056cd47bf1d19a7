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
