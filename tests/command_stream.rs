//! StreamCommandEvents through the gRPC API: each filter passes exactly its events, and an
//! observer that reconnects resumes after the last sequence it saw, told of any gap.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tokio_stream::StreamExt;
use tonic::Code;

type Events = tonic::Streaming<v1::CommandEvent>;

/// A service that runs commands only when asked (PollingOnly, no poll within a test).
fn quiet(event_buffer: usize) -> tasker::config::TaskerConfig {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    cfg.orchestration.command_processor.event_buffer = event_buffer;
    cfg
}

fn one_step(ns: &str) -> v1::CreateTaskRequest {
    tasker::client::task(ns)
        .named("observed")
        .step("only")
        .build()
}

async fn open(
    readiness: &mut Readiness,
    f: impl FnOnce(&mut v1::StreamCommandEventsRequest),
) -> Events {
    let mut r = v1::StreamCommandEventsRequest::default();
    f(&mut r);
    readiness
        .stream_command_events(r)
        .await
        .unwrap()
        .into_inner()
}

async fn next(events: &mut Events) -> v1::CommandEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on")
        .expect("an event")
}

/// Inject a command and wait for its answer: its events are published by then.
async fn inject(readiness: &mut Readiness, task: &str) -> String {
    readiness
        .process_task_readiness(v1::ProcessTaskReadinessRequest {
            task_uuid: task.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .command_id
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn each_filter_passes_exactly_its_events(pool: PgPool) {
    let server = TestServer::start(&pool, &quiet(4096)).await;
    let ch = server.channel().await;
    let (mut tasks, mut readiness) = (Tasks::new(ch.clone()), Readiness::new(ch.clone()));
    let mut admin = Admin::new(ch);
    let create = |ns: &'static str| one_step(ns);
    let ta = tasks
        .create_task(create("a"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let tb = tasks
        .create_task(create("b"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let tc = tasks
        .create_task(create("c"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;

    let mut all = open(&mut readiness, |_| {}).await;
    let mut filtered = vec![
        (
            "namespaces",
            open(&mut readiness, |r| r.namespaces = vec!["a".into()]).await,
        ),
        (
            "task_uuids",
            open(&mut readiness, |r| r.task_uuids = vec![tb.clone()]).await,
        ),
        (
            "phases",
            open(&mut readiness, |r| {
                r.phases = vec![v1::CommandPhase::Completed.into()]
            })
            .await,
        ),
        (
            "triggered_by",
            open(&mut readiness, |r| {
                r.triggered_by = vec![v1::TriggeredBy::CatchUp.into()]
            })
            .await,
        ),
        (
            "outcomes",
            open(&mut readiness, |r| {
                r.outcomes = vec![v1::CommandOutcome::NothingReady.into()]
            })
            .await,
        ),
    ];

    inject(&mut readiness, &ta).await; // enqueued (api)
    inject(&mut readiness, &tb).await; // enqueued (api)
    inject(&mut readiness, &ta).await; // nothing_ready (api)
                                       // a mode change sweeps: task c is worked by a catch-up command
    admin
        .set_deployment_mode(v1::SetDeploymentModeRequest {
            mode: v1::DeploymentMode::EventDrivenOnly as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    // everything, until c's command completed
    let mut seen = Vec::new();
    loop {
        let e = next(&mut all).await;
        let done = e.task_uuid == tc && e.phase() == v1::CommandPhase::Completed;
        seen.push(e);
        if done {
            break;
        }
    }
    for (filter, stream) in &mut filtered {
        let passes = |e: &v1::CommandEvent| match *filter {
            "namespaces" => e.namespace == "a",
            "task_uuids" => e.task_uuid == tb,
            "phases" => e.phase() == v1::CommandPhase::Completed,
            "triggered_by" => e.triggered_by() == v1::TriggeredBy::CatchUp,
            "outcomes" => e.outcome() == v1::CommandOutcome::NothingReady,
            _ => unreachable!(),
        };
        let expected: Vec<(u64, i32)> = seen
            .iter()
            .filter(|e| passes(e))
            .map(|e| (e.sequence, e.phase))
            .collect();
        assert!(
            !expected.is_empty(),
            "{filter}: the run has events it passes"
        );
        assert!(expected.len() < seen.len(), "{filter}: and events it stops");
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let e = next(stream).await;
            got.push((e.sequence, e.phase));
        }
        assert_eq!(got, expected, "{filter}");
    }
    // sequences increase by one per event
    assert!(seen.windows(2).all(|w| w[1].sequence == w[0].sequence + 1));

    for (req, field) in [
        (
            v1::StreamCommandEventsRequest {
                triggered_by: vec![99],
                ..Default::default()
            },
            "triggered_by[0]",
        ),
        (
            v1::StreamCommandEventsRequest {
                outcomes: vec![v1::CommandOutcome::Enqueued.into(), 0],
                ..Default::default()
            },
            "outcomes[1]",
        ),
        (
            v1::StreamCommandEventsRequest {
                phases: vec![
                    v1::CommandPhase::Started.into(),
                    v1::CommandPhase::Gap.into(),
                ],
                ..Default::default()
            },
            "phases[1]",
        ),
        (
            v1::StreamCommandEventsRequest {
                namespaces: vec!["Not OK".into()],
                ..Default::default()
            },
            "namespaces[0]",
        ),
    ] {
        let e = readiness.stream_command_events(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
    }
    // every broken rule at once, each entry named
    let e = readiness
        .stream_command_events(v1::StreamCommandEventsRequest {
            task_uuids: vec![ta.clone(), "nope".into()],
            phases: vec![0],
            triggered_by: vec![v1::TriggeredBy::Api.into(), 42],
            outcomes: vec![99, 0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let fields = field_violations(&e);
    assert_eq!(
        fields,
        [
            "task_uuids[1]",
            "phases[0]",
            "triggered_by[1]",
            "outcomes[0]",
            "outcomes[1]"
        ],
        "{}",
        e.message()
    );
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_reconnecting_observer_resumes_after_its_last_sequence(pool: PgPool) {
    // a ring of 8 events: under three commands' worth
    let server = TestServer::start(&pool, &quiet(8)).await;
    let ch = server.channel().await;
    let (mut tasks, mut readiness) = (Tasks::new(ch.clone()), Readiness::new(ch));
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            tasks
                .create_task(one_step("r"))
                .await
                .unwrap()
                .into_inner()
                .task_uuid,
        );
    }
    let mut first = open(&mut readiness, |_| {}).await;
    let c1 = inject(&mut readiness, &ids[0]).await;
    let last = loop {
        let e = next(&mut first).await;
        if e.command_id == c1 && e.phase() == v1::CommandPhase::Completed {
            break e.sequence;
        }
    };
    drop(first);
    // while it is away: one command (3 events)
    let c2 = inject(&mut readiness, &ids[1]).await;
    let mut resumed = open(&mut readiness, |r| r.resume_after = last).await;
    let phases = [
        v1::CommandPhase::Received,
        v1::CommandPhase::Started,
        v1::CommandPhase::Completed,
    ];
    for (i, phase) in phases.into_iter().enumerate() {
        let e = next(&mut resumed).await;
        assert_eq!((e.command_id.as_str(), e.phase()), (c2.as_str(), phase));
        assert_eq!(
            e.sequence,
            last + 1 + i as u64,
            "nothing lost, nothing twice"
        );
    }
    // then live events
    let c3 = inject(&mut readiness, &ids[2]).await;
    assert_eq!(next(&mut resumed).await.command_id, c3);

    // away for longer than the ring holds: a gap saying how many are gone, then the ring
    for id in &ids[3..6] {
        inject(&mut readiness, id).await;
    }
    let mut late = open(&mut readiness, |r| r.resume_after = last).await;
    let gap = next(&mut late).await;
    assert_eq!(gap.phase(), v1::CommandPhase::Gap);
    // events after `last`: 3 (c2) + 3 (c3) + 9; the ring holds 8
    assert_eq!(gap.missed, 15 - 8);
    let after_gap = next(&mut late).await;
    assert_eq!(after_gap.sequence, last + 15 - 8 + 1);

    // a number from before this replica started: unknown
    let mut stale = open(&mut readiness, |r| r.resume_after = 5).await;
    let gap = next(&mut stale).await;
    assert_eq!(gap.phase(), v1::CommandPhase::Gap);
    assert!(
        gap.error.contains("before this replica started"),
        "{}",
        gap.error
    );
    // a number this replica never issued (beyond its last: another replica's, say): said so,
    // then the events from now on
    let mut foreign = open(&mut readiness, |r| r.resume_after = u64::MAX / 2).await;
    let gap = next(&mut foreign).await;
    assert_eq!((gap.phase(), gap.missed), (v1::CommandPhase::Gap, 0));
    assert!(
        gap.error.contains("never issued by this replica"),
        "{}",
        gap.error
    );
    let c7 = inject(&mut readiness, &ids[0]).await;
    assert_eq!(next(&mut foreign).await.command_id, c7);
    server.stop().await;
}
