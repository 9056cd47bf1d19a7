//! Replicas on one database, in one process: the claim split with a replica that serves some
//! namespaces only.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use uuid::Uuid;

const TASKS: usize = 20;

/// The claimers the registry holds now: alive (as the tests' heartbeats go), listening, serving
/// every namespace.
async fn registry_claimers(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar(
        "SELECT replica_id FROM tasker.replicas
         WHERE listening AND serves_every_namespace ORDER BY replica_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A replica configured for some namespaces drops the other namespaces' events before the
/// claim split. Were it a claimer, the events that fall to it (about half, with two) would be
/// left to it by the other replica and dropped by it: stranded, in EventDrivenOnly, until the
/// claimers next change. Only replicas serving every namespace claim, so every task of a
/// namespace it does not serve is enqueued by the other.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_event_never_falls_to_a_replica_that_does_not_serve_its_namespace(pool: PgPool) {
    let mut every = test_config(DeploymentMode::EventDrivenOnly);
    every.orchestration.replicas.heartbeat_interval = Duration::from_millis(50);
    let mut some = every.clone();
    some.orchestration.task_readiness.namespaces = vec!["billing".into()];
    let selective = TestServer::start(&pool, &some).await;
    let full = TestServer::start(&pool, &every).await;
    // both registered and listening, and both replicas' views of the claimers are the
    // registry's: no change of claimers (and so no catch-up sweep) comes after this
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let listening: i64 =
                sqlx::query_scalar("SELECT count(*) FROM tasker.replicas WHERE listening")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            let registry = registry_claimers(&pool).await;
            if listening == 2
                && *selective.core.fleet.claimers() == registry[..]
                && *full.core.fleet.claimers() == registry[..]
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both replicas listening, with settled views of the claimers");
    assert_eq!(
        registry_claimers(&pool).await,
        [full.core.fleet.replica_id()],
        "the replica serving some namespaces is not a claimer"
    );

    let mut tasks = Tasks::new(selective.channel().await);
    for _ in 0..TASKS {
        tasks
            .create_task(task("shipping").named("parcel").step("pack").build())
            .await
            .unwrap();
    }
    // every task's step is enqueued (by the replica that serves every namespace)
    let workers = Workers::new(full.channel().await);
    let mut leased = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while leased < TASKS && tokio::time::Instant::now() < deadline {
        leased += workers
            .clone()
            .fetch_steps(fetch_request("shipping", TASKS as i32, 1000, 30))
            .await
            .unwrap()
            .into_inner()
            .steps
            .len();
    }
    assert_eq!(leased, TASKS, "tasks stranded");
    full.stop().await;
    selective.stop().await;
}
