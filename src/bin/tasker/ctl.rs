//! `tasker ctl`: the gRPC client for operators and CI scripts.
//!
//! Every subcommand makes one call (or, for `watch`, one stream) against `--endpoint`, with
//! `--token` (or `TASKER_TOKEN`) as the bearer token, and prints the answer as JSON
//! (`--output json`) or as an aligned table. A failed call prints the gRPC status code and
//! message on stderr and exits with a code per class of status ([`CtlError::exit_code`]), so
//! CI can tell "my request was wrong" from "the service is away". When tracing is exporting,
//! each call carries a `traceparent`, so a CI job's trace continues into the service.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tasker::client::{AuthorizedChannel, Connect};
use tasker::proto::{json_to_struct, struct_to_json, v1, Vocabulary};
use tokio_stream::StreamExt;
use tonic::Status;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Json,
    Table,
    /// Graphviz (`task get` only): the step DAG, each step coloured by its state.
    Dot,
}

/// Options of every `ctl` subcommand, accepted before or after it (`ctl task get ID --output
/// json` as well as `ctl --output json task get ID`).
#[derive(Debug, Args)]
pub struct CtlOptions {
    /// The service's gRPC endpoint: http://host:port, or https://host:port for TLS.
    #[arg(
        long,
        global = true,
        env = "TASKER_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Bearer token (scopes: read, write, admin).
    #[arg(long, global = true, env = "TASKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (https:// endpoints); without
    /// it the system's trusted roots are used.
    #[arg(long, global = true, env = "TASKER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// json, table, or dot (`task get`: the step DAG in Graphviz).
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Get or set the deployment mode.
    Mode {
        #[command(subcommand)]
        action: ModeAction,
    },
    /// Mode, listener, poller, command queue, uptime.
    Status,
    /// A task's readiness: execution status, counts, per-step readiness.
    Readiness { task: String },
    /// Tasks with ready steps, best first.
    ReadyTasks {
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i32,
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Inject ProcessTaskReadiness for a task and print its outcome.
    Inject { task: String },
    /// Stream command lifecycle events as JSON lines until interrupted.
    Watch {
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
        #[arg(long = "task")]
        tasks: Vec<String>,
        /// received, started, completed, failed, coalesced, rejected (repeatable)
        #[arg(long = "phase")]
        phases: Vec<String>,
        /// step_transition, task_start, fallback_polling, api, catch_up, retry_timer (repeatable)
        #[arg(long = "triggered-by")]
        triggered_by: Vec<String>,
        /// enqueued, nothing_ready, claimed_elsewhere, task_not_active, task_not_found, failed
        /// (repeatable)
        #[arg(long = "outcome")]
        outcomes: Vec<String>,
        /// Resume after this sequence (the last line's "sequence" of a previous watch).
        #[arg(long, default_value_t = 0)]
        resume_after: u64,
    },
    /// Create, get or cancel tasks.
    Task {
        #[command(subcommand)]
        action: TaskAction,
    },
    /// Create, delete (when empty) or list namespaces.
    Namespace {
        #[command(subcommand)]
        action: NamespaceAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum NamespaceAction {
    /// Create a namespace (admin scope); OK when it exists.
    Create { namespace: String },
    /// Delete a namespace that holds no task (admin scope).
    Delete { namespace: String },
    /// Every namespace, oldest first.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ModeAction {
    /// The mode in effect here, where it comes from, and each source's value.
    Get,
    /// EventDrivenOnly, Hybrid or PollingOnly: for this replica, or with --fleet for every
    /// replica (stored in the database; a replica's own mode still wins on that replica).
    Set {
        mode: String,
        #[arg(long)]
        fleet: bool,
    },
    /// Remove this replica's own mode (or with --fleet, the fleet's): the next source applies.
    Clear {
        #[arg(long)]
        fleet: bool,
    },
}

fn mode_scope(fleet: bool) -> i32 {
    if fleet {
        v1::DeploymentModeScope::Fleet as i32
    } else {
        v1::DeploymentModeScope::Replica as i32
    }
}

fn source_name(raw: i32) -> &'static str {
    match v1::DeploymentModeSource::try_from(raw) {
        Ok(v1::DeploymentModeSource::Replica) => "replica",
        Ok(v1::DeploymentModeSource::Fleet) => "fleet",
        Ok(v1::DeploymentModeSource::Config) => "config",
        _ => "unspecified",
    }
}

#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Create a task from a JSON or YAML file (by extension; `-` reads JSON from stdin).
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    Get {
        task: String,
        /// Also show each step's results and last error (read page by page).
        #[arg(long)]
        data: bool,
    },
    Cancel {
        task: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Tasks, newest first: filter by namespace, state (repeatable) and name.
    List {
        #[arg(long)]
        namespace: Option<String>,
        /// pending, in_progress, complete, error, cancelled (repeatable)
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        oldest_first: bool,
        /// Tasks per page (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: i32,
        /// A previous answer's next_page_token.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Wait for a task to finish: exit 0 when it is complete, 7 when cancelled, 8 when it is
    /// in error, 5 when --timeout passes first. Prints each change as a JSON line.
    Wait {
        task: String,
        /// Seconds to wait at most (0: no limit).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// Retry a task in error: its failed steps get more attempts (default 1 each).
    Retry {
        task: String,
        #[arg(long, default_value_t = 1)]
        attempts: i32,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Mark a step done by hand with results its children receive (admin scope).
    Resolve {
        step: String,
        #[arg(long)]
        reason: String,
        /// The step's results as a JSON object.
        #[arg(long)]
        results: Option<String>,
    },
}

/// A task file: the CreateTask request in JSON or YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    namespace: String,
    name: String,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    steps: Vec<StepFile>,
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
}

type Svc = AuthorizedChannel;

/// Why `ctl` failed: a call's status, or something before any call.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("{0}")]
    Usage(String),
    /// The service could not be reached.
    #[error("{0}")]
    Connect(String),
    /// `task wait`: the task ended other than complete (its state), or the wait timed out.
    #[error("task {task} is {}", state.word())]
    TaskEnded { task: String, state: v1::TaskState },
    #[error("task {task} did not finish within {seconds} s")]
    WaitTimedOut { task: String, seconds: u64 },
}

impl CtlError {
    /// The process's exit code, one per class (README, "tasker ctl"): 2 the request is wrong,
    /// 3 not found, 4 refused in the current state, 5 unavailable or timed out, 6 not allowed,
    /// 7 the waited-for task was cancelled, 8 it is in error, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        use tonic::Code;
        match self {
            Self::Usage(_) => 2,
            Self::Connect(_) | Self::WaitTimedOut { .. } => 5,
            Self::TaskEnded {
                state: v1::TaskState::Cancelled,
                ..
            } => 7,
            Self::TaskEnded { .. } => 8,
            Self::Status(s) => match s.code() {
                Code::InvalidArgument | Code::OutOfRange => 2,
                Code::NotFound => 3,
                Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => 4,
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => 5,
                Code::Unauthenticated | Code::PermissionDenied => 6,
                _ => 1,
            },
        }
    }
}

impl From<Status> for CtlError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

pub async fn run(opts: CtlOptions, command: CtlCommand) -> Result<(), CtlError> {
    let span = tracing::info_span!("tasker.ctl", otel.kind = "client");
    let _enter = span.enter();
    let connect = Connect {
        endpoint: opts.endpoint.clone(),
        token: opts.token.clone(),
        ca_cert: opts.ca_cert.clone(),
        connect_timeout: std::time::Duration::from_secs(5),
    };
    let svc: Svc = connect
        .channel()
        .await
        .map_err(|e| CtlError::Connect(e.to_string()))?;
    let out = opts.output;
    if out == Output::Dot
        && !matches!(
            command,
            CtlCommand::Task {
                action: TaskAction::Get { .. }
            }
        )
    {
        return Err(CtlError::Usage(
            "--output dot draws a task's steps: it goes with `task get` only".into(),
        ));
    }
    let print = |v: Value| print_value(&v, out);
    match command {
        CtlCommand::Mode {
            action: ModeAction::Get,
        } => {
            let r = v1::admin_service_client::AdminServiceClient::new(svc)
                .get_deployment_mode(v1::GetDeploymentModeRequest {})
                .await?
                .into_inner();
            let set = |raw: i32| match mode_name(raw) {
                "Unspecified" => Value::Null,
                name => Value::String(name.into()),
            };
            print(json!({
                "mode": mode_name(r.mode), "source": source_name(r.source),
                "replica_mode": set(r.replica_mode), "fleet_mode": set(r.fleet_mode),
                "config_mode": set(r.config_mode),
            }));
        }
        CtlCommand::Mode {
            action: ModeAction::Set { mode, fleet },
        } => {
            let m: tasker::config::DeploymentMode = mode.parse().map_err(CtlError::Usage)?;
            let r = v1::admin_service_client::AdminServiceClient::new(svc)
                .set_deployment_mode(v1::SetDeploymentModeRequest {
                    mode: v1::DeploymentMode::from(m) as i32,
                    scope: mode_scope(fleet),
                    clear: false,
                })
                .await?
                .into_inner();
            print(
                json!({ "previous": mode_name(r.previous), "current": mode_name(r.current), "source": source_name(r.source) }),
            );
        }
        CtlCommand::Mode {
            action: ModeAction::Clear { fleet },
        } => {
            let r = v1::admin_service_client::AdminServiceClient::new(svc)
                .set_deployment_mode(v1::SetDeploymentModeRequest {
                    mode: v1::DeploymentMode::Unspecified as i32,
                    scope: mode_scope(fleet),
                    clear: true,
                })
                .await?
                .into_inner();
            print(
                json!({ "previous": mode_name(r.previous), "current": mode_name(r.current), "source": source_name(r.source) }),
            );
        }
        CtlCommand::Namespace { action } => {
            let mut admin = v1::admin_service_client::AdminServiceClient::new(svc);
            let namespace = |n: v1::Namespace| json!({ "namespace": n.namespace, "created_at": ts(n.created_at) });
            match action {
                NamespaceAction::Create { namespace: name } => {
                    let r = admin
                        .create_namespace(v1::CreateNamespaceRequest { namespace: name })
                        .await?
                        .into_inner();
                    let mut out = r.namespace.map(namespace).unwrap_or(Value::Null);
                    out["created"] = Value::Bool(r.created);
                    print(out);
                }
                NamespaceAction::Delete { namespace: name } => {
                    admin
                        .delete_namespace(v1::DeleteNamespaceRequest {
                            namespace: name.clone(),
                        })
                        .await?;
                    print(json!({ "namespace": name, "deleted": true }));
                }
                NamespaceAction::List => {
                    let r = admin
                        .list_namespaces(v1::ListNamespacesRequest {})
                        .await?
                        .into_inner();
                    print(Value::Array(
                        r.namespaces.into_iter().map(namespace).collect(),
                    ));
                }
            }
        }
        CtlCommand::Status => {
            let r = v1::admin_service_client::AdminServiceClient::new(svc)
                .get_status(v1::GetStatusRequest {})
                .await?
                .into_inner();
            print(json!({
                "mode": mode_name(r.mode),
                "listener_connected": r.listener_connected,
                "listener_channels": r.listener_channels,
                "listener_reconnects": r.listener_reconnects,
                "poller_last_run": ts(r.poller_last_run),
                "poller_last_tasks_found": r.poller_last_tasks_found,
                "command_queue_depth": r.command_queue_depth,
                "commands_in_flight": r.commands_in_flight,
                "commands_processed": r.commands_processed,
                "uptime_seconds": r.uptime.map(|d| d.seconds),
                "version": r.version,
                "draining": r.draining,
                "poller_periodic": r.poller_periodic,
                "parked_fetches": r.parked_fetches,
                "claims_lost": r.claims_lost,
                "events_left_to_peers": r.events_left_to_peers,
                "watch_streams": r.watch_streams,
                "watched_tasks": r.watched_tasks,
                "replica_id": r.replica_id,
                "replicas": r.replicas.into_iter().map(|p| json!({
                    "replica_id": p.replica_id,
                    "address": p.address,
                    "version": p.version,
                    "mode": mode_name(p.mode),
                    "listening": p.listening,
                    "serves_every_namespace": p.serves_every_namespace,
                    "started_at": ts(p.started_at),
                    "heartbeat_at": ts(p.heartbeat_at),
                })).collect::<Vec<_>>(),
            }));
        }
        CtlCommand::Readiness { task } => {
            let r = v1::readiness_service_client::ReadinessServiceClient::new(svc)
                .get_task_readiness(v1::GetTaskReadinessRequest { task_uuid: task })
                .await?
                .into_inner();
            let c = r.counts.unwrap_or_default();
            print(json!({
                "task_uuid": r.task_uuid,
                "namespace": r.namespace,
                "task_state": v1::TaskState::word_of(r.task_state),
                "execution_status": v1::ExecutionStatus::word_of(r.execution_status),
                "counts": {
                    "total": c.total, "pending": c.pending, "enqueued": c.enqueued,
                    "in_progress": c.in_progress, "complete": c.complete, "failed": c.failed,
                    "ready": c.ready, "waiting_for_retry": c.waiting_for_retry, "cancelled": c.cancelled,
                },
                "steps": r.steps.into_iter().map(|s| json!({
                    "name": s.name, "step_uuid": s.step_uuid, "state": v1::StepState::word_of(s.state),
                    "dependencies_satisfied": s.dependencies_satisfied, "ready": s.ready,
                    "attempts": s.attempts, "max_attempts": s.max_attempts,
                    "next_retry_at": ts(s.next_retry_at),
                })).collect::<Vec<_>>(),
            }));
        }
        CtlCommand::ReadyTasks {
            namespace,
            limit,
            page_token,
        } => {
            let r = v1::readiness_service_client::ReadinessServiceClient::new(svc)
                .list_ready_tasks(v1::ListReadyTasksRequest {
                    namespace: namespace.unwrap_or_default(),
                    limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print(json!({
                "tasks": r.tasks.into_iter().map(|t| json!({
                    "task_uuid": t.task_uuid, "namespace": t.namespace, "priority": t.priority,
                    "computed_priority": t.computed_priority, "ready_steps": t.ready_steps,
                    "ready_since": ts(t.ready_since),
                })).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            }));
        }
        CtlCommand::Inject { task } => {
            let r = v1::readiness_service_client::ReadinessServiceClient::new(svc)
                .process_task_readiness(v1::ProcessTaskReadinessRequest {
                    task_uuid: task,
                    ..Default::default()
                })
                .await?
                .into_inner();
            print(json!({
                "command_id": r.command_id, "outcome": v1::CommandOutcome::word_of(r.outcome),
                "coalesced": r.coalesced,
                "steps_enqueued": r.steps_enqueued, "enqueued_step_uuids": r.enqueued_step_uuids,
            }));
        }
        CtlCommand::Watch {
            namespaces,
            tasks,
            phases,
            triggered_by,
            outcomes,
            resume_after,
        } => {
            let phases = enum_flags::<v1::CommandPhase>("--phase", &phases)?;
            let triggered_by = enum_flags::<v1::TriggeredBy>("--triggered-by", &triggered_by)?;
            let outcomes = enum_flags::<v1::CommandOutcome>("--outcome", &outcomes)?;
            let mut stream = v1::readiness_service_client::ReadinessServiceClient::new(svc)
                .stream_command_events(v1::StreamCommandEventsRequest {
                    namespaces,
                    task_uuids: tasks,
                    phases,
                    triggered_by,
                    outcomes,
                    resume_after,
                })
                .await?
                .into_inner();
            while let Some(e) = stream.next().await {
                let e = e?;
                // always JSON lines: one event per line, for piping into jq
                println!(
                    "{}",
                    terminal_safe(&json!({
                        "command_id": e.command_id, "task_uuid": e.task_uuid, "namespace": e.namespace,
                        "triggered_by": v1::TriggeredBy::word_of(e.triggered_by),
                        "phase": v1::CommandPhase::word_of(e.phase),
                        "outcome": (e.outcome != 0).then(|| v1::CommandOutcome::word_of(e.outcome)),
                        "steps_enqueued": e.steps_enqueued,
                        "duration_ms": e.duration.map(|d| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6),
                        "timestamp": ts(e.timestamp), "error": e.error, "missed": e.missed,
                        "sequence": e.sequence,
                    }).to_string(), true)
                );
            }
        }
        CtlCommand::Task {
            action: TaskAction::Create { file },
        } => {
            let request = read_task_file(&file)?;
            let r = v1::task_service_client::TaskServiceClient::new(svc)
                .create_task(request)
                .await?
                .into_inner();
            print(json!({
                "task_uuid": r.task_uuid, "created": r.created,
                "steps": r.steps.into_iter().map(|s| json!({"name": s.name, "step_uuid": s.step_uuid})).collect::<Vec<_>>(),
            }));
        }
        CtlCommand::Task {
            action: TaskAction::Get { task, data },
        } => {
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
        }
        CtlCommand::Task {
            action: TaskAction::Cancel { task, reason },
        } => {
            let r = v1::task_service_client::TaskServiceClient::new(svc)
                .cancel_task(v1::CancelTaskRequest {
                    task_uuid: task,
                    reason,
                })
                .await?
                .into_inner();
            print(task_json(r.task.unwrap_or_default()));
        }
        CtlCommand::Task {
            action:
                TaskAction::List {
                    namespace,
                    states,
                    name,
                    oldest_first,
                    limit,
                    page_token,
                },
        } => {
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
                })).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            }));
        }
        CtlCommand::Task {
            action: TaskAction::Wait { task, timeout },
        } => {
            let waited = wait_for_task(&connect, svc, task.clone());
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
        }
        CtlCommand::Task {
            action:
                TaskAction::Retry {
                    task,
                    attempts,
                    reason,
                },
        } => {
            let r = v1::task_service_client::TaskServiceClient::new(svc)
                .retry_task(v1::RetryTaskRequest {
                    task_uuid: task,
                    extra_attempts: attempts,
                    reason,
                })
                .await?
                .into_inner();
            print(task_json(r.task.unwrap_or_default()));
        }
        CtlCommand::Task {
            action:
                TaskAction::Resolve {
                    step,
                    reason,
                    results,
                },
        } => {
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
        }
    }
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

fn read_task_file(path: &std::path::Path) -> Result<v1::CreateTaskRequest, CtlError> {
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
    Ok(v1::CreateTaskRequest {
        namespace: file.namespace,
        name: file.name,
        priority: file.priority,
        context: file.context.as_ref().map(json_to_struct),
        idempotency_key: file.idempotency_key.unwrap_or_default(),
        steps: file
            .steps
            .into_iter()
            .map(|s| v1::StepDefinition {
                name: s.name,
                depends_on: s.depends_on,
                max_attempts: s.max_attempts,
                retryable: s.retryable,
                inputs: s.inputs.as_ref().map(json_to_struct),
            })
            .collect(),
    })
}

fn task_json(t: v1::Task) -> Value {
    json!({
        "task_uuid": t.task_uuid, "namespace": t.namespace, "name": t.name, "priority": t.priority,
        "state": v1::TaskState::word_of(t.state), "context": struct_to_json(t.context), "idempotency_key": t.idempotency_key,
        "created_at": ts(t.created_at), "updated_at": ts(t.updated_at),
        "completed_at": ts(t.completed_at),
        "steps": t.steps.into_iter().map(|s| json!({
            "name": s.name, "step_uuid": s.step_uuid, "state": v1::StepState::word_of(s.state),
            "attempts": s.attempts,
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

/// A repeatable flag's values as the enum's raw values: each a word or a value's name.
fn enum_flags<E>(flag: &str, values: &[String]) -> Result<Vec<i32>, CtlError>
where
    E: Vocabulary + TryFrom<i32> + Into<i32>,
{
    values
        .iter()
        .map(|v| {
            E::from_input(v).map(Into::into).ok_or_else(|| {
                CtlError::Usage(format!(
                    "{flag} {v:?}: not a {}; expected one of {}",
                    E::TYPE,
                    E::words().join(", ")
                ))
            })
        })
        .collect()
}

fn mode_name(raw: i32) -> &'static str {
    match v1::DeploymentMode::try_from(raw) {
        Ok(v1::DeploymentMode::EventDrivenOnly) => "EventDrivenOnly",
        Ok(v1::DeploymentMode::Hybrid) => "Hybrid",
        Ok(v1::DeploymentMode::PollingOnly) => "PollingOnly",
        _ => "Unspecified",
    }
}

fn ts(t: Option<prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|d| Value::String(d.to_rfc3339()))
        .unwrap_or(Value::Null)
}

/// The task's step DAG in Graphviz: one node per step (name, state, attempts), filled by
/// state; an edge from each parent to its child. `dot -Tsvg` draws it.
pub fn task_dot(t: &v1::Task) -> String {
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

fn print_value(v: &Value, output: Output) {
    match output {
        Output::Dot => print!("{}", table(v)),
        Output::Json => println!(
            "{}",
            terminal_safe(
                &serde_json::to_string_pretty(v).expect("JSON values serialize"),
                true
            )
        ),
        Output::Table => print!("{}", table(v)),
    }
}

/// Scalars as `key  value` lines; arrays of objects as aligned tables under their key.
pub fn table(v: &Value) -> String {
    let Value::Object(map) = v else {
        return format!("{v}\n");
    };
    let mut out = String::new();
    let width = map.keys().map(String::len).max().unwrap_or(0);
    let scalar = |v: &Value| match v {
        Value::String(s) => terminal_safe(s, false),
        Value::Null => "-".into(),
        other => terminal_safe(&other.to_string(), false),
    };
    let mut tables = Vec::new();
    for (k, val) in map {
        let k = terminal_safe(k, false);
        match val {
            Value::Array(rows) if rows.iter().all(Value::is_object) && !rows.is_empty() => {
                tables.push((k, rows))
            }
            Value::Object(inner) => {
                let flat: Vec<String> = inner
                    .iter()
                    .map(|(ik, iv)| format!("{}={}", terminal_safe(ik, false), scalar(iv)))
                    .collect();
                out.push_str(&format!("{k:width$}  {}\n", flat.join(" ")));
            }
            other => out.push_str(&format!("{k:width$}  {}\n", scalar(other))),
        }
    }
    for (k, rows) in tables {
        let cols: Vec<String> = rows[0]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let o: &Map<String, Value> = r.as_object().expect("checked above");
                cols.iter()
                    .map(|c| o.get(c).map(scalar).unwrap_or_default())
                    .collect()
            })
            .collect();
        let header: Vec<String> = cols.iter().map(|c| terminal_safe(c, false)).collect();
        let widths: Vec<usize> = header
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .map(|r| r[i].len())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        out.push_str(&format!("\n{k}:\n"));
        let line = |vals: &[String]| {
            vals.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        out.push_str(&line(&header));
        out.push('\n');
        for r in &cells {
            out.push_str(&line(r));
            out.push('\n');
        }
    }
    out
}

/// Text from the server made safe to print: control characters (terminal escape sequences,
/// carriage returns, C1 controls) and Unicode bidirectional controls are shown as `\u001b`
/// escapes instead of acting on the terminal. `keep_newlines` spares the line breaks of
/// pretty-printed JSON, whose string values never contain a raw one.
fn terminal_safe(s: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if (c.is_control() && !(keep_newlines && c == '\n')) || tasker::limits::is_bidi_control(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_task_files_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let yaml = read_task_file(&dir.join("diamond.yaml")).unwrap();
        assert_eq!((yaml.namespace.as_str(), yaml.steps.len()), ("demo", 4));
        assert_eq!(yaml.steps[3].depends_on, ["charge", "pack"]);
        assert_eq!(yaml.steps[1].max_attempts, 5);
        let json = read_task_file(&dir.join("chain.json")).unwrap();
        assert!(!json.steps.is_empty());
    }

    #[test]
    fn the_dot_output_draws_each_step_and_edge_and_quotes_names() {
        let step = |name: &str, deps: &[&str], state: v1::StepState| v1::Step {
            name: name.into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            state: state.into(),
            attempts: 1,
            max_attempts: 3,
            ..Default::default()
        };
        let t = v1::Task {
            task_uuid: "t-1".into(),
            name: "deploy".into(),
            namespace: "ci".into(),
            state: v1::TaskState::Error.into(),
            steps: vec![
                step("build", &[], v1::StepState::Complete),
                step("say \"hi\"", &["build"], v1::StepState::Error),
            ],
            ..Default::default()
        };
        let dot = task_dot(&t);
        assert!(dot.starts_with("digraph \"task t-1\" {"), "{dot}");
        assert!(
            dot.contains("\"build\" [label=\"build\\ncomplete (1/3)\", fillcolor=palegreen];"),
            "{dot}"
        );
        assert!(dot.contains("\"build\" -> \"say \\\"hi\\\"\";"), "{dot}");
        assert!(dot.contains("fillcolor=salmon"), "{dot}");
        assert!(dot.trim_end().ends_with('}'));
    }

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        let hostile = json!({
            "name": "a\u{1b}]0;pwned\u{7}b",
            "context": {"k\u{1b}[2J": "x\u{202e}y\rz"},
            "steps": [{"name": "s\u{9b}31m", "state": "pending"}],
        });
        let text = table(&hostile);
        assert!(
            !text
                .chars()
                .any(|c| (c.is_control() && c != '\n') || tasker::limits::is_bidi_control(c)),
            "{text:?}"
        );
        assert!(text.contains("a\\u001b]0;pwned\\u0007b"), "{text}");
        assert!(text.contains("x\\u202ey\\u000dz"), "{text}");
        assert!(text.contains("s\\u009b31m"), "{text}");
        let json = terminal_safe(&serde_json::to_string_pretty(&hostile).unwrap(), true);
        assert!(!json
            .chars()
            .any(|c| (c.is_control() && c != '\n') || tasker::limits::is_bidi_control(c)));
        assert!(json.contains("x\\u202ey"), "{json}");
    }
}
