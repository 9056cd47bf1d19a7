//! The README's examples, run as a user would run them: every `grpcurl` command of "Try it with
//! grpcurl" and every `tasker ctl` command of the ctl section, in order, against a live server,
//! with their placeholders (`<task_uuid>`, `<step_uuid>`, `<lease_token>`, `<sequence>`) filled
//! with real values of the state each command is about (a task in error for RetryTask, a
//! fresh lease for CompleteStep, ...). A command must succeed; one that streams (WatchTask,
//! StreamCommandEvents, `ctl watch`) must have started streaming when it is stopped after a
//! few seconds; a comment that says what a SetDeploymentMode answers (`"current": "..."`) is
//! checked. So the README cannot drift from the service: a renamed field, a missing token, a
//! wrong enum name fails here.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tokio_stream::StreamExt;

/// The commands of the first ```sh block after `heading`, each with the comment lines just
/// before it; `\`-continued lines, and lines inside a quoted argument, joined.
fn commands(readme: &str, heading: &str) -> Vec<(String, String)> {
    let section = &readme[readme.find(heading).expect("the README has the section")..];
    let start = section.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let block = &section[start..start + section[start..].find("```").expect("closed")];
    let mut out = Vec::new();
    let (mut comment, mut command) = (String::new(), String::new());
    for line in block.lines() {
        let trimmed = line.trim();
        if command.is_empty() && trimmed.starts_with('#') {
            comment.push_str(trimmed);
            comment.push('\n');
            continue;
        }
        if command.is_empty() && trimmed.is_empty() {
            comment.clear();
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            command.push_str(head);
            command.push(' ');
            continue;
        }
        command.push_str(line);
        // a quoted argument may go on over the next lines
        if command.matches('\'').count() % 2 == 1 {
            command.push('\n');
            continue;
        }
        out.push((std::mem::take(&mut comment), std::mem::take(&mut command)));
    }
    out
}

/// Values for the placeholders of one command, chosen by what it does.
struct Fixtures {
    /// The README's own task (created by its CreateTask command).
    task: Option<String>,
    /// A task in error (RetryTask), a task whose steps wait (ResolveStep), a finished task
    /// (`ctl task wait`).
    in_error: String,
    waiting_step: String,
    complete: String,
    sequence: u64,
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_readme_examples_run_as_written(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let addr = server.addr;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch.clone()));

    // the states the examples are about
    let in_error = task_in_error(&mut tasks, &mut workers).await;
    let waiting = tasks
        .create_task(two_steps("readme-waiting", "w"))
        .await
        .unwrap()
        .into_inner();
    let complete = tasks
        .create_task(task("readme-done").named("d").step("only").build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let only = lease_one(&workers, "readme-done").await;
    complete_leased(&mut workers, &only).await;
    // a sequence number the replica issued
    let mut events = Readiness::new(ch.clone())
        .stream_command_events(v1::StreamCommandEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    Readiness::new(ch.clone())
        .process_task_readiness(v1::ProcessTaskReadinessRequest {
            task_uuid: complete.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sequence = events.next().await.unwrap().unwrap().sequence;
    let mut fixtures = Fixtures {
        task: None,
        in_error,
        waiting_step: waiting.steps[1].step_uuid.clone(),
        complete,
        sequence,
    };

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let grpcurl = commands(&readme, "## Try it with grpcurl");
    assert!(grpcurl.len() > 25, "{} grpcurl commands", grpcurl.len());
    for (comment, command) in &grpcurl {
        let values = placeholders(command, &mut fixtures, &mut tasks, &mut workers).await;
        let out = run(addr, command, &values).await;
        if command.contains("TaskService/CreateTask") {
            let created: serde_json::Value = serde_json::from_str(&out).unwrap();
            fixtures.task = Some(created["taskUuid"].as_str().unwrap().to_string());
            if command.contains("\"next\"") {
                // eager start: its first step comes back leased in the answer
                assert_eq!(created["nextSteps"][0]["name"], "a", "{out}");
            }
        }
        if let Some(current) = comment
            .split("\"current\": \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            assert!(
                out.contains(&format!("\"current\": \"{current}\"")),
                "{command}\nanswered\n{out}\nbut its comment says {current}"
            );
        }
    }

    let ctl = commands(&readme, "## `tasker ctl`");
    assert!(ctl.len() > 15, "{} ctl commands", ctl.len());
    for (_, command) in &ctl {
        let values = placeholders(command, &mut fixtures, &mut tasks, &mut workers).await;
        run(addr, command, &values).await;
    }
    server.stop().await;
}

/// A task whose first step failed for good.
async fn task_in_error(tasks: &mut Tasks, workers: &mut Workers) -> String {
    let id = tasks
        .create_task(two_steps("readme-error", "e"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let first = lease_one(workers, "readme-error").await;
    fail_for_good(workers, &first, "broken").await;
    id
}

/// The placeholder values for `command`.
async fn placeholders(
    command: &str,
    f: &mut Fixtures,
    tasks: &mut Tasks,
    workers: &mut Workers,
) -> HashMap<&'static str, String> {
    let mut v = HashMap::new();
    let task = if command.contains("RetryTask") || command.contains("task retry") {
        // the retry takes it out of error: the next one needs another
        std::mem::replace(&mut f.in_error, task_in_error(tasks, workers).await)
    } else if command.contains("task wait") {
        f.complete.clone()
    } else {
        f.task.clone().unwrap_or_else(|| f.complete.clone())
    };
    v.insert("<task_uuid>", task);
    v.insert("<sequence>", f.sequence.to_string());
    if command.contains("ResolveStep") || command.contains("task resolve") {
        v.insert("<step_uuid>", f.waiting_step.clone());
        // the next resolution needs another waiting step
        let next = tasks
            .create_task(two_steps("readme-waiting", "w"))
            .await
            .unwrap()
            .into_inner();
        f.waiting_step = next.steps[1].step_uuid.clone();
    } else if command.contains("<lease_token>") {
        // a lease of its own for each report on an attempt
        tasks
            .create_task(two_steps("readme-work", "r"))
            .await
            .unwrap();
        let leased = lease_one(workers, "readme-work").await;
        assert_eq!(leased.attempt, 1, "the examples say attempt 1");
        v.insert("<step_uuid>", leased.step_uuid);
        v.insert("<lease_token>", leased.lease_token);
    }
    v
}

/// Run one README command (placeholders filled, the example address replaced by the test
/// server's, `tasker ctl` pointed at it); its stdout. Panics when it fails.
async fn run(addr: SocketAddr, command: &str, values: &HashMap<&'static str, String>) -> String {
    let mut line = command.to_string();
    for (k, v) in values {
        line = line.replace(k, v);
    }
    line = line.replace("127.0.0.1:50051", &addr.to_string());
    // a pipe into another program (dot) is the reader's: run the tasker part
    if let Some((head, _)) = line.split_once(" | ") {
        line = head.to_string();
    }
    let tasker = env!("CARGO_BIN_EXE_tasker");
    line = line.replace(
        "tasker ctl",
        &format!("{tasker} ctl --endpoint http://{addr}"),
    );
    let streams = line.contains("TaskService/WatchTask")
        || line.contains("StreamCommandEvents")
        || line.contains(" watch ");
    let grpcurl_dir = std::env::var("GRPCURL")
        .ok()
        .and_then(|g| {
            std::path::Path::new(&g)
                .parent()
                .map(|p| p.display().to_string())
        })
        .unwrap_or_default();
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg(&line)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "PATH",
            format!(
                "{grpcurl_dir}:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("TASKER_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let limit = if streams {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(30)
    };
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) if streams => {
            // a stream runs until stopped: it passed if it did not fail at once
            return String::new();
        }
        Err(_) => panic!("{line}\ndid not finish within {limit:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "README command failed ({:?}):\n{line}\n{stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The README is the front page: at most 250 lines, the two set-up commands first (start the
/// service, run the tests), CI running exactly that test command, and no dated measurements
/// or history (figures with their dates live in docs/benchmarks.md).
#[test]
fn the_readme_is_a_front_page() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    assert!(lines.len() <= 250, "README.md has {} lines", lines.len());

    let start = lines
        .iter()
        .position(|l| *l == "```sh")
        .expect("a sh block");
    assert!(
        start <= 3,
        "the set-up commands start on line {}",
        start + 1
    );
    let command = |line: &str| line.split('#').next().unwrap_or("").trim().to_string();
    assert_eq!(command(lines[start + 1]), "cargo run --release -- serve");
    let test_command = command(lines[start + 2]);
    assert_eq!(test_command, "scripts/test");
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).expect(".ci/run");
    let last = ci
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert_eq!(
        last.trim(),
        format!("exec {test_command} --no-server"),
        ".ci/run must end by running the README's test command"
    );

    let dated = lines.iter().enumerate().find(|(_, l)| {
        l.as_bytes().windows(10).any(|w| {
            let digit = |i: usize| w[i].is_ascii_digit();
            (0..4).all(digit)
                && w[4] == b'-'
                && digit(5)
                && digit(6)
                && w[7] == b'-'
                && digit(8)
                && digit(9)
        })
    });
    assert!(dated.is_none(), "a dated line in the README: {:?}", dated);
}
