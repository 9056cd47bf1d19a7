//! The worker examples users start from run against a live server: the Rust one on the
//! crate's client (`cargo run --example worker`, with unary calls and `--stream`), the Python one on stubs generated from
//! `proto/` with grpcio-tools. Each works a diamond to completion as a separate process.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::{struct_to_json, v1};

/// Run a worker process for four steps of its queue, then check the diamond (every step in
/// that queue) completed through it.
async fn run_worker_on_a_diamond(pool: &PgPool, ns: &str, worker: tokio::process::Command) {
    let server = TestServer::start(pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let task = tasks
        .create_task(
            task(ns)
                .named("diamond")
                .step("a")
                .queue("examples")
                .step("b")
                .after("a")
                .queue("examples")
                .step("c")
                .after("a")
                .queue("examples")
                .step("d")
                .after("b")
                .after("c")
                .queue("examples")
                .build(),
        )
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut worker = worker;
    let endpoint = format!("{}", server.addr);
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        worker
            .args([
                "--namespace",
                ns,
                "--queue",
                "examples",
                "--steps",
                "4",
                "--endpoint",
                &endpoint,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the worker finished its four steps")
    .expect("the worker ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "worker failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("completed ").count(), 4, "{stdout}");
    let t = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: task,
            include_step_data: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(t.state(), v1::TaskState::Complete);
    let d = t.steps.iter().find(|s| s.name == "d").unwrap();
    let results = struct_to_json(d.results.clone());
    assert_eq!(results["step"], "d");
    assert_eq!(results["parents"], serde_json::json!(["b", "c"]));
    server.stop().await;
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tasker"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_rust_worker_example_completes_a_workflow(pool: PgPool) {
    let exe = target_dir().join("examples").join("worker");
    assert!(exe.exists(), "{} is built by `cargo test`", exe.display());
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env_remove("TASKER_TOKEN");
    run_worker_on_a_diamond(&pool, "rust-example", cmd).await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_rust_worker_example_completes_a_workflow_over_a_work_stream(pool: PgPool) {
    let exe = target_dir().join("examples").join("worker");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--stream").env_remove("TASKER_TOKEN");
    run_worker_on_a_diamond(&pool, "rust-stream-example", cmd).await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_python_worker_example_completes_a_workflow(pool: PgPool) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/worker.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script).env_remove("TASKER_TOKEN");
    run_worker_on_a_diamond(&pool, "python-example", cmd).await;
}
