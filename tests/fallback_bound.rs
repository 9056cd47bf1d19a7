//! The design's promise: an event that is lost is made good by the fallback poller within
//! 30 s, with the shipped defaults (`fallback_polling_interval_seconds` 25 with up to 10 %
//! jitter, `age_threshold_seconds` 2: at most 2 + 27.5 s). Measured here with those defaults,
//! from the worst moment: just after a poll round, with the task too young for it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use tasker::config::{DeploymentMode, TaskReadinessConfig};

/// The promise.
const BOUND: Duration = Duration::from_secs(30);

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_lost_event_is_made_good_within_30_s_with_the_default_settings(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.orchestration.task_readiness = TaskReadinessConfig::default();
    let defaults = &cfg.orchestration.task_readiness;
    assert!(
        defaults.age_threshold + defaults.fallback_polling_interval.mul_f64(1.1) <= BOUND,
        "the defaults themselves keep the promise"
    );
    let server = TestServer::start(&pool, &cfg).await;
    // every readiness announcement is lost from here on
    silence_readiness_announcements(&pool).await;
    // the worst moment: right after a periodic round (the task will be too young for the
    // next one only if it comes within the age threshold; it cannot, so this waits a full
    // jittered interval plus whatever of the age is left)
    let rounds = |s: &tasker::testkit::PollerStatus| s.rounds;
    let mut poller = server.core.mode_controller.poller_status();
    let before = rounds(&poller.borrow_and_update());
    tokio::time::timeout(BOUND, async {
        while rounds(&poller.borrow_and_update()) == before {
            poller.changed().await.unwrap();
        }
    })
    .await
    .expect("a periodic round within 30 s");

    let mut tasks = Tasks::new(server.channel().await);
    let created = Instant::now();
    let task = tasks
        .create_task(task("lost").named("unannounced").step("only").build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    // a worker waits for it; only the poller can enqueue it
    let mut workers = Workers::new(server.channel().await);
    let fetched = tokio::time::timeout(BOUND + Duration::from_secs(5), async {
        loop {
            let steps = workers
                .fetch_steps(fetch_request("lost", 1, 10_000, 30))
                .await
                .unwrap()
                .into_inner()
                .steps;
            if let Some(s) = steps.into_iter().next() {
                return s;
            }
        }
    })
    .await
    .expect("the step reached a worker");
    let took = created.elapsed();
    assert_eq!(fetched.task_uuid, task);
    println!("lost event made good after {took:?} (bound {BOUND:?})");
    assert!(took <= BOUND, "took {took:?}");
    let found = server
        .core
        .mode_controller
        .status()
        .poller
        .fallback_tasks_found_total;
    assert_eq!(found, 1, "the poller found it");
    server.stop().await;
}
