//! `ctl task create | get | cancel | list | wait | retry | resolve`.

use serde::Deserialize;
use serde_json::{json, Value};
use tasker::proto::{duration_from_ms, json_to_struct, struct_to_json, v1, Vocabulary};
use tokio_stream::StreamExt;
use tonic::Status;

use super::output::{enum_flags, print_value, terminal_safe, ts};
use super::{Ctl, CtlError, Output, Svc, TaskListFilter};
use tasker::client::Connect;

/// `task create FILE`: a task from a YAML or JSON file (`-`: stdin).
pub(super) async fn create(
    ctl: &Ctl,
    file: std::path::PathBuf,
    start_at: Option<String>,
) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let mut request = read_task_file(&file)?;
    if let Some(at) = start_at {
        request.start_at = Some(parse_start_at("--start-at", &at)?);
    }
    let r = v1::task_service_client::TaskServiceClient::new(svc)
        .create_task(request)
        .await?
        .into_inner();
    print(json!({
        "task_uuid": r.task_uuid, "created": r.created,
        "steps": r.steps.into_iter().map(|s| json!({"name": s.name, "step_uuid": s.step_uuid})).collect::<Vec<_>>(),
    }));
    Ok(())
}

/// `task get TASK [--data]`: the task with all its steps (every page), as JSON, a table or Graphviz.
pub(super) async fn get(ctl: &Ctl, task: String, data: bool) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let out = ctl.out;
    let mut client = v1::task_service_client::TaskServiceClient::new(svc);
    let mut whole: Option<v1::Task> = None;
    let mut page_token = String::new();
    loop {
        let r = client
            .get_task(v1::GetTaskRequest {
                task_uuid: task.clone(),
                include_step_data: data,
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        let page = r.task.unwrap_or_default();
        match &mut whole {
            Some(t) => t.steps.extend(page.steps),
            None => whole = Some(page),
        }
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    let whole = whole.unwrap_or_default();
    if out == Output::Dot {
        print!("{}", task_dot(&whole));
    } else {
        print(task_json(whole));
    }
    Ok(())
}

/// `task cancel TASK`.
pub(super) async fn cancel(ctl: &Ctl, task: String, reason: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::task_service_client::TaskServiceClient::new(svc)
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: task,
            reason,
        })
        .await?
        .into_inner();
    print(task_json(r.task.unwrap_or_default()));
    Ok(())
}

/// `task list`: tasks matching the filters, a page at a time.
pub(super) async fn list(ctl: &Ctl, filter: TaskListFilter) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let TaskListFilter {
        namespace,
        states,
        name,
        oldest_first,
        scheduled,
        limit,
        page_token,
    } = filter;
    let states = enum_flags::<v1::TaskState>("--state", &states)?;
    let r = v1::task_service_client::TaskServiceClient::new(svc)
        .list_tasks(v1::ListTasksRequest {
            namespace: namespace.unwrap_or_default(),
            states,
            name: name.unwrap_or_default(),
            order: if oldest_first {
                v1::TaskOrder::OldestFirst as i32
            } else {
                v1::TaskOrder::NewestFirst as i32
            },
            page_size: limit,
            page_token: page_token.unwrap_or_default(),
            scheduled,
            ..Default::default()
        })
        .await?
        .into_inner();
    print(json!({
        "tasks": r.tasks.into_iter().map(|t| json!({
            "task_uuid": t.task_uuid, "namespace": t.namespace, "name": t.name,
            "state": v1::TaskState::word_of(t.state), "priority": t.priority,
            "created_at": ts(t.created_at),
            "updated_at": ts(t.updated_at),
            "start_at": ts(t.start_at), "scheduled": t.scheduled,
        })).collect::<Vec<_>>(),
        "next_page_token": r.next_page_token,
    }));
    Ok(())
}

/// `task wait TASK [--timeout S]`: follow the task until it ends; the exit code says how.
pub(super) async fn wait(ctl: &Ctl, task: String, timeout: u64) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let connect = &ctl.connect;
    let waited = wait_for_task(connect, svc, task.clone());
    if timeout == 0 {
        waited.await?;
    } else {
        tokio::time::timeout(std::time::Duration::from_secs(timeout), waited)
            .await
            .map_err(|_| CtlError::WaitTimedOut {
                task,
                seconds: timeout,
            })??;
    }
    Ok(())
}

/// `task retry TASK`: a task in error gets more attempts.
pub(super) async fn retry(
    ctl: &Ctl,
    task: String,
    attempts: i32,
    reason: String,
) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::task_service_client::TaskServiceClient::new(svc)
        .retry_task(v1::RetryTaskRequest {
            task_uuid: task,
            extra_attempts: attempts,
            reason,
        })
        .await?
        .into_inner();
    print(task_json(r.task.unwrap_or_default()));
    Ok(())
}

/// `task resolve STEP`: a step is done by hand.
pub(super) async fn resolve(
    ctl: &Ctl,
    step: String,
    reason: String,
    results: Option<String>,
) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let results = results
        .map(|r| {
            serde_json::from_str::<Value>(&r)
                .map_err(|e| CtlError::Usage(format!("--results is not JSON: {e}")))
        })
        .transpose()?;
    let r = v1::task_service_client::TaskServiceClient::new(svc)
        .resolve_step(v1::ResolveStepRequest {
            step_uuid: step,
            reason,
            results: results.as_ref().map(json_to_struct),
        })
        .await?
        .into_inner();
    print(task_json(r.task.unwrap_or_default()));
    Ok(())
}

/// Follow a task (WatchTask) until it is complete (Ok), cancelled or in error (Err), printing
/// its state and each change as JSON lines. When the stream breaks off (the replica drains in a
/// rolling deploy, the connection drops) it connects to the same endpoint again and follows
/// on, from a new snapshot, so a CI gate does not fail for a restart; a note goes to stderr.
async fn wait_for_task(connect: &Connect, first: Svc, task: String) -> Result<(), CtlError> {
    const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(200);
    const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);
    let mut channel = Some(first);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let svc = match channel.take() {
            Some(svc) => svc,
            None => match connect.channel().await {
                Ok(svc) => svc,
                Err(e) => {
                    eprintln!("tasker ctl: task wait: {e}; trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        match follow_task(v1::task_service_client::TaskServiceClient::new(svc), &task).await {
            // UNAVAILABLE: the replica drains, or is gone; UNKNOWN: the connection broke
            // mid-stream (this service answers no call with UNKNOWN)
            Err(CtlError::Status(s))
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
            {
                eprintln!(
                    "tasker ctl: task wait: the stream broke off ({}); following on in {backoff:?}",
                    s.message()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            ended => return ended,
        }
    }
}

/// One WatchTask stream of [`wait_for_task`]: its end when the task ended, UNAVAILABLE when the
/// stream broke off first.
async fn follow_task(
    mut client: v1::task_service_client::TaskServiceClient<Svc>,
    task: &str,
) -> Result<(), CtlError> {
    use v1::watch_task_response::Event;
    let mut stream = client
        .watch_task(v1::WatchTaskRequest {
            task_uuid: task.to_string(),
        })
        .await?
        .into_inner();
    let ended = |state: i32| match v1::TaskState::try_from(state) {
        Ok(v1::TaskState::Complete) => Some(Ok(())),
        Ok(state @ (v1::TaskState::Cancelled | v1::TaskState::Error)) => {
            Some(Err(CtlError::TaskEnded {
                task: task.to_string(),
                state,
            }))
        }
        _ => None,
    };
    while let Some(m) = stream.next().await {
        let (line, state) = match m?.event {
            Some(Event::Snapshot(t)) => {
                let state = v1::TaskState::word_of(t.state);
                (json!({"task_uuid": t.task_uuid, "state": state}), t.state)
            }
            Some(Event::TaskState(c)) => {
                let to = v1::TaskState::word_of(c.to_state);
                let from = (c.from_state != 0).then(|| v1::TaskState::word_of(c.from_state));
                (
                    json!({"task_uuid": task, "from": from, "to": to, "at": ts(c.at)}),
                    c.to_state,
                )
            }
            Some(Event::StepState(c)) => {
                let line = json!({
                    "step": c.name, "step_uuid": c.step_uuid,
                    "from": v1::StepState::word_of(c.from_state),
                    "to": v1::StepState::word_of(c.to_state), "attempts": c.attempts,
                });
                println!("{}", terminal_safe(&line.to_string(), false));
                continue;
            }
            None => continue,
        };
        println!("{}", terminal_safe(&line.to_string(), false));
        if let Some(result) = ended(state) {
            return result;
        }
    }
    Err(CtlError::Status(Status::unavailable(
        "the server ended the stream before the task finished",
    )))
}

/// A task file: the CreateTask request in JSON or YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    /// A schedule's task file may leave it out (the schedule's).
    #[serde(default)]
    namespace: String,
    name: String,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    concurrency_key: Option<String>,
    /// The retry policy of the steps that declare none.
    #[serde(default)]
    retry: Option<RetryFile>,
    /// When its first steps become ready (RFC 3339).
    #[serde(default)]
    start_at: Option<String>,
    steps: Vec<StepFile>,
}

/// A start time as RFC 3339 (`2026-12-05T02:00:00Z`, or with an offset).
fn parse_start_at(what: &str, at: &str) -> Result<prost_types::Timestamp, CtlError> {
    chrono::DateTime::parse_from_rfc3339(at)
        .map(|t| tasker::proto::timestamp(t.with_timezone(&chrono::Utc)))
        .map_err(|e| {
            CtlError::Usage(format!(
                "{what}: {at:?} is not an RFC 3339 time (like 2026-12-05T02:00:00Z): {e}"
            ))
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: String,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    max_attempts: i32,
    #[serde(default)]
    retryable: Option<bool>,
    #[serde(default)]
    inputs: Option<Value>,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    retry: Option<RetryFile>,
    /// An attempt's execution limit, in milliseconds.
    #[serde(default)]
    timeout_ms: Option<i64>,
    /// How long it may wait for a worker once queued, in milliseconds.
    #[serde(default)]
    schedule_to_start_ms: Option<i64>,
}

/// A retry policy in a task file, durations in milliseconds (as FailStep's backoff_ms).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    initial_backoff_ms: i64,
    #[serde(default)]
    multiplier: f64,
    #[serde(default)]
    max_backoff_ms: Option<i64>,
    #[serde(default)]
    jitter: f64,
}

impl RetryFile {
    fn into_proto(self) -> v1::RetryPolicy {
        v1::RetryPolicy {
            initial_backoff: Some(duration_from_ms(self.initial_backoff_ms)),
            multiplier: self.multiplier,
            max_backoff: self.max_backoff_ms.map(duration_from_ms),
            jitter: self.jitter,
        }
    }
}

pub(super) fn read_task_file(path: &std::path::Path) -> Result<v1::CreateTaskRequest, CtlError> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CtlError::Usage(format!("reading stdin: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| CtlError::Usage(format!("reading {}: {e}", path.display())))?
    };
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let file: TaskFile = if yaml {
        serde_saphyr::from_str(&text)
            .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_str(&text)
            .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?
    };
    let start_at = file
        .start_at
        .as_deref()
        .map(|at| parse_start_at("start_at", at))
        .transpose()?;
    Ok(v1::CreateTaskRequest {
        start_at,
        namespace: file.namespace,
        name: file.name,
        priority: file.priority,
        context: file.context.as_ref().map(json_to_struct),
        idempotency_key: file.idempotency_key.unwrap_or_default(),
        concurrency_key: file.concurrency_key.unwrap_or_default(),
        steps: file
            .steps
            .into_iter()
            .map(|s| v1::StepDefinition {
                name: s.name,
                depends_on: s.depends_on,
                max_attempts: s.max_attempts,
                retryable: s.retryable,
                inputs: s.inputs.as_ref().map(json_to_struct),
                queue: s.queue,
                retry: s.retry.map(RetryFile::into_proto),
                timeout: s.timeout_ms.map(duration_from_ms),
                schedule_to_start: s.schedule_to_start_ms.map(duration_from_ms),
            })
            .collect(),
        retry: file.retry.map(RetryFile::into_proto),
        ..Default::default()
    })
}

fn task_json(t: v1::Task) -> Value {
    json!({
        "task_uuid": t.task_uuid, "namespace": t.namespace, "name": t.name, "priority": t.priority,
        "state": v1::TaskState::word_of(t.state), "context": struct_to_json(t.context), "idempotency_key": t.idempotency_key,
        "created_at": ts(t.created_at), "updated_at": ts(t.updated_at),
        "completed_at": ts(t.completed_at),
        "start_at": ts(t.start_at), "scheduled": t.scheduled,
        "steps": t.steps.into_iter().map(|s| json!({
            "name": s.name, "step_uuid": s.step_uuid, "state": v1::StepState::word_of(s.state),
            "attempts": s.attempts, "queue": s.queue,
            "max_attempts": s.max_attempts, "depends_on": s.depends_on,
            "inputs": s.inputs.map(|r| struct_to_json(Some(r))),
            "results": s.results.map(|r| struct_to_json(Some(r))),
            "last_error": s.last_error.map(|r| struct_to_json(Some(r))),
            "next_retry_at": ts(s.next_retry_at),
            "enqueued_at": ts(s.enqueued_at),
            "started_at": ts(s.started_at),
            "completed_at": ts(s.completed_at),
        })).collect::<Vec<_>>(),
    })
}

/// The task's step DAG in Graphviz: one node per step (name, state, attempts), filled by
/// state; an edge from each parent to its child. `dot -Tsvg` draws it.
pub(super) fn task_dot(t: &v1::Task) -> String {
    let colour = |state: &str| match state {
        "complete" | "resolved_manually" => "palegreen",
        "in_progress" | "enqueued" => "lightskyblue",
        "waiting_for_retry" => "khaki",
        "error" => "salmon",
        "cancelled" => "lightgrey",
        _ => "white",
    };
    // names come from clients: quoted, with the characters DOT gives meaning escaped
    let quote = |s: &str| {
        let escaped = s
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        format!("\"{escaped}\"")
    };
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\"];\n  label={};\n",
        quote(&format!("task {}", t.task_uuid)),
        quote(&format!(
            "{} ({}): {}",
            t.name,
            t.namespace,
            v1::TaskState::word_of(t.state)
        ))
    );
    for s in &t.steps {
        let state = v1::StepState::word_of(s.state);
        out.push_str(&format!(
            "  {} [label={}, fillcolor={}];\n",
            quote(&s.name),
            quote(&format!(
                "{}\n{} ({}/{})",
                s.name, state, s.attempts, s.max_attempts
            )),
            colour(&state)
        ));
    }
    for s in &t.steps {
        for parent in &s.depends_on {
            out.push_str(&format!("  {} -> {};\n", quote(parent), quote(&s.name)));
        }
    }
    out.push_str("}\n");
    terminal_safe(&out, true)
}
