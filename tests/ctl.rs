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
    v1::CreateTaskRequest {
        namespace: ns.into(),
        name: "ci".into(),
        steps: vec![step_def("build", &[]), step_def("test", &["build"])],
        ..Default::default()
    }
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn exit_codes_tell_the_class_of_failure(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.auth.tokens = vec![TokenConfig {
        name: "ci".into(),
        sha256: tasker::config::hash_token("ci-secret"),
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
    assert!(out.contains(r#""to":"complete""#), "{out}");
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
