//! `tasker ctl` as a process against a live server: what CI sees (output and exit codes).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sqlx::PgPool;
use tasker::config::{DeploymentMode, TokenConfig};
use tasker::proto::v1;

/// `tasker ctl --endpoint http://ADDR --output json ARGS...`: exit code and stdout.
async fn ctl(addr: SocketAddr, args: &[&str]) -> (i32, String) {
    ctl_with(addr, &[], args).await
}

async fn ctl_with(addr: SocketAddr, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    ctl_as(addr, "json", env, args).await
}

async fn ctl_as(
    addr: SocketAddr,
    output: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tasker"))
        .arg("ctl")
        .arg("--endpoint")
        .arg(format!("http://{addr}"))
        .arg("--output")
        .arg(output)
        .args(args)
        .env_remove("TASKER_TOKEN")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run tasker ctl");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn chain(ns: &str) -> v1::CreateTaskRequest {
    tasker::client::task(ns)
        .named("ci")
        .step("build")
        .step("test")
        .after("build")
        .build()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn exit_codes_tell_the_class_of_failure(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.auth.tokens = vec![TokenConfig {
        name: "ci".into(),
        sha256: tasker::hash_token("ci-secret"),
        scopes: vec!["read".into(), "write".into()],
    }];
    let server = TestServer::start(&pool, &cfg).await;
    let a = server.addr;
    let token = [("TASKER_TOKEN", "ci-secret")];

    let (code, out) = ctl(a, &["task", "get", "not-a-uuid"]).await;
    assert_eq!(code, 6, "no token: unauthenticated: {out}");
    let (code, out) = ctl_with(a, &token, &["task", "get", "not-a-uuid"]).await;
    assert_eq!(code, 2, "invalid argument: {out}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let (code, out) = ctl_with(a, &token, &["task", "get", &unknown]).await;
    assert_eq!(code, 3, "not found: {out}");
    let (code, out) = ctl_with(a, &token, &["mode", "set", "PollingOnly"]).await;
    assert_eq!(code, 6, "permission denied (admin scope): {out}");

    let mut tasks = Tasks::new(server.channel().await);
    let mut authorized = tonic::Request::new(chain("ci"));
    authorized
        .metadata_mut()
        .insert("authorization", "Bearer ci-secret".parse().unwrap());
    let task = tasks
        .create_task(authorized)
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let (code, out) = ctl_with(a, &token, &["task", "cancel", &task]).await;
    assert_eq!(code, 0, "{out}");
    // a retried cancel is fine
    let (code, out) = ctl_with(a, &token, &["task", "cancel", &task]).await;
    assert_eq!(code, 0, "{out}");
    server.stop().await;

    // nothing listens there any more
    let (code, out) = ctl_with(a, &token, &["status"]).await;
    assert_eq!(code, 5, "unavailable: {out}");
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn task_wait_gates_on_the_outcome_and_task_list_lists(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let a = server.addr;
    let ch = server.channel().await;
    let (mut tasks, workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    let create = |ns: &str| chain(ns);
    let ok = tasks
        .create_task(create("ok"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let failing = tasks
        .create_task(create("bad"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let waiting = tasks
        .create_task(create("idle"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let cancelled = tasks
        .create_task(create("gone"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    cancel(&mut tasks, &cancelled).await;

    // the waits start before the work is done
    let wait_ok =
        tokio::spawn(async move { ctl(a, &["task", "wait", &ok, "--timeout", "60"]).await });
    let wait_bad = {
        let failing = failing.clone();
        tokio::spawn(async move { ctl(a, &["task", "wait", &failing, "--timeout", "60"]).await })
    };
    let mut w = workers.clone();
    for _ in 0..2 {
        let s = lease_one(&workers, "ok").await;
        complete_leased(&mut w, &s).await;
    }
    let s = lease_one(&workers, "bad").await;
    fail_for_good(&mut w, &s, "compiler error").await;

    let (code, out) = tokio::time::timeout(Duration::from_secs(60), wait_ok)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 0, "complete: {out}");
    // the change it followed, or (when the process started after the work) its snapshot
    assert!(
        out.contains(r#""to":"complete""#) || out.contains(r#""state":"complete""#),
        "{out}"
    );
    let ok_task = out
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l).ok()?["task_uuid"]
                .as_str()
                .map(String::from)
        })
        .unwrap();
    let (code, out) = ctl(a, &["task", "cancel", &ok_task]).await;
    assert_eq!(code, 4, "a complete task cannot be cancelled: {out}");
    let (code, dot) = ctl_as(a, "dot", &[], &["task", "get", &ok_task]).await;
    assert_eq!(code, 0, "{dot}");
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains(r#""build" -> "test";"#), "{dot}");
    assert!(dot.contains("fillcolor=palegreen"), "{dot}");
    let (code, out) = ctl_as(a, "dot", &[], &["status"]).await;
    assert_eq!(code, 2, "dot goes with task get only: {out}");
    let (code, out) = tokio::time::timeout(Duration::from_secs(60), wait_bad)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 8, "in error: {out}");
    // retried from the command line, it runs again and completes
    let (code, out) = ctl(a, &["task", "retry", &failing, "--reason", "fixed"]).await;
    assert_eq!(code, 0, "{out}");
    let s = lease_one(&workers, "bad").await;
    assert_eq!(s.attempt, 2);
    let (code, out) = ctl(a, &["task", "retry", &failing]).await;
    assert_eq!(code, 4, "not in error any more: {out}");
    let (code, out) = ctl(a, &["task", "wait", &cancelled]).await;
    assert_eq!(code, 7, "cancelled: {out}");
    let (code, out) = ctl(a, &["task", "wait", &waiting, "--timeout", "1"]).await;
    assert_eq!(code, 5, "timed out: {out}");

    // the short word or the proto's name
    for state in ["cancelled", "TASK_STATE_CANCELLED"] {
        let (code, out) = ctl(a, &["task", "list", "--state", state]).await;
        assert_eq!(code, 0, "{out}");
        let listed: Value = serde_json::from_str(&out).unwrap();
        let tasks = listed["tasks"].as_array().unwrap();
        let ids: Vec<&str> = tasks
            .iter()
            .map(|t| t["task_uuid"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [cancelled.as_str()], "{state}");
        assert_eq!(tasks[0]["state"], "cancelled", "JSON keeps the short words");
    }
    for state in ["finished", "TASK_STATE_UNSPECIFIED"] {
        let (code, out) = ctl(a, &["task", "list", "--state", state]).await;
        assert_eq!(code, 2, "a state that does not exist: {out}");
        assert!(
            out.contains(&format!("--state {state:?}")) && out.contains("in_progress"),
            "the flag, the value and the choices: {out}"
        );
    }
    server.stop().await;
}

/// What a new user types works, and shows what the server has: options after the subcommand
/// (`task get ID --data --output json`), `status` with the replica and its fleet, the
/// parked fetches and the watch streams, `task get --data` with each step's inputs and times;
/// and `task wait` survives a replica draining in a rolling deploy: it connects again to the
/// same endpoint and follows on until the task completes (exit 0).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn ctl_takes_options_anywhere_shows_everything_and_waits_across_a_restart(pool: PgPool) {
    let cfg = test_config(DeploymentMode::Hybrid);
    let server = TestServer::start(&pool, &cfg).await;
    let addr = server.addr;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut request = chain("typed");
    request.steps[0].inputs = Some(tasker::proto::json_to_struct(&serde_json::json!({"n": 7})));
    let task = tasks
        .create_task(request)
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let workers = Workers::new(ch);
    let first = lease_one(&workers, "typed").await;

    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tasker"))
            .arg("ctl")
            .args(&args)
            .env_remove("TASKER_TOKEN")
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let endpoint = format!("http://{addr}");
    let (code, out) = run(vec![
        "task".into(),
        "get".into(),
        task.clone(),
        "--data".into(),
        "--output".into(),
        "json".into(),
        "--endpoint".into(),
        endpoint.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        got["steps"][0]["inputs"],
        serde_json::json!({"n": 7}),
        "{out}"
    );
    assert!(got["steps"][0]["enqueued_at"].is_string(), "{out}");
    assert!(got["steps"][0]["started_at"].is_string(), "{out}");
    assert!(got["updated_at"].is_string(), "{out}");

    let (code, out) = run(vec![
        "status".into(),
        "--endpoint".into(),
        endpoint.clone(),
        "--output".into(),
        "json".into(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    for key in [
        "replica_id",
        "replicas",
        "claims_lost",
        "events_left_to_peers",
        "parked_fetches",
        "poller_periodic",
        "watch_streams",
        "watched_tasks",
    ] {
        assert!(status.get(key).is_some(), "status lacks {key}: {out}");
    }

    // task wait, across a drain and a restart on the same address
    let wait = tokio::spawn(run(vec![
        "task".into(),
        "wait".into(),
        task.clone(),
        "--timeout".into(),
        "60".into(),
        "--endpoint".into(),
        endpoint.clone(),
        "--output".into(),
        "json".into(),
    ]));
    // it is watching: the replica has its stream
    let mut admin = Admin::new(server.channel().await);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = admin
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.watch_streams > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ctl never watched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let server = TestServer::start_on(&pool, &cfg, addr).await;
    let ch = server.channel().await;
    let mut w = Workers::new(ch);
    complete_leased(&mut w, &first).await;
    let second = lease_one(&w, "typed").await;
    complete_leased(&mut w, &second).await;
    let (code, out) = tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("task wait ended")
        .unwrap();
    assert_eq!(code, 0, "task wait failed across the restart: {out}");
    assert!(out.contains("following on"), "it followed on: {out}");
    assert!(
        out.contains(r#""state":"complete""#) || out.contains(r#""to":"complete""#),
        "{out}"
    );
    server.stop().await;
}
