//! `tasker ctl`: the gRPC client for operators and CI scripts.
//!
//! Every subcommand makes one call (or, for `watch`, one stream) against `--endpoint`, with
//! `--token` (or `TASKER_TOKEN`) as the bearer token, and prints the answer as JSON
//! (`--output json`) or as an aligned table. A failed call prints the gRPC status code and
//! message on stderr and exits with a code per class of status ([`CtlError::exit_code`]), so
//! CI can tell "my request was wrong" from "the service is away". When tracing is exporting,
//! each call carries a `traceparent`, so a CI job's trace continues into the service.

use std::path::PathBuf;

mod mode;
mod namespace;
mod output;
mod queue;
mod readiness;
mod schedule;
mod status;
mod task;

use clap::{Args, Subcommand, ValueEnum};
use tasker::client::{AuthorizedChannel, Connect};
use tasker::proto::{v1, Vocabulary};
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
    Watch(WatchFilter),
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
    /// A queue's in-flight limit and pause.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Cron schedules whose ticks create tasks.
    Schedule {
        #[command(subcommand)]
        action: ScheduleAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScheduleAction {
    /// A schedule: each tick of CRON (5 fields, or 6 with seconds first) in TIME_ZONE creates
    /// the task of --task-file (as `task create`'s file, without idempotency key).
    Create {
        namespace: String,
        name: String,
        #[arg(long)]
        cron: String,
        /// IANA time zone (Europe/Paris); empty: UTC.
        #[arg(long, default_value = "")]
        time_zone: String,
        #[arg(long)]
        task_file: PathBuf,
        /// allow, skip or buffer_one: what a tick does while the previous task still runs.
        #[arg(long, default_value = "allow")]
        overlap: String,
        /// skip or run_latest: what the ticks missed while no replica ran become.
        #[arg(long, default_value = "skip")]
        catch_up: String,
        #[arg(long)]
        paused: bool,
    },
    /// The schedule, its next ticks and its latest runs.
    Get { namespace: String, name: String },
    /// Every schedule (of one namespace).
    List {
        #[arg(long)]
        namespace: Option<String>,
    },
    /// No tick runs until resumed.
    Pause { namespace: String, name: String },
    /// Ticks run again from the next one (the paused ones are not caught up).
    Resume { namespace: String, name: String },
    /// The schedule goes; the tasks it made stay.
    Delete { namespace: String, name: String },
    /// Create the schedule's task now.
    Trigger { namespace: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Its limit, whether it is paused, its steps in flight and queued (no queue: the default).
    Show {
        namespace: String,
        #[arg(default_value = "")]
        queue: String,
    },
    /// At most N of its steps leased at once, fleet-wide (admin scope); --none removes it.
    Limit {
        namespace: String,
        queue: String,
        #[arg(required_unless_present = "none")]
        max_in_flight: Option<i32>,
        #[arg(long, conflicts_with = "max_in_flight")]
        none: bool,
    },
    /// Lease none of its steps until resumed (no queue: the whole namespace; admin scope).
    Pause {
        namespace: String,
        #[arg(default_value = "")]
        queue: String,
    },
    /// Lease its steps again; its waiting workers get them at once (admin scope).
    Resume {
        namespace: String,
        #[arg(default_value = "")]
        queue: String,
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
    /// At most N tasks with the same concurrency key in progress at once (admin scope);
    /// --none removes the limit; no N: show it.
    KeyLimit {
        namespace: String,
        max_tasks_per_key: Option<i32>,
        #[arg(long, conflicts_with = "max_tasks_per_key")]
        none: bool,
    },
    /// How long finished tasks are kept before they are removed with all their rows (admin
    /// scope): --retention for complete or cancelled tasks, --error-retention for tasks in
    /// error, each a duration (90s, 2m, 12h, 7d) or `default` (the fleet's); neither: show.
    Retention {
        namespace: String,
        #[arg(long)]
        retention: Option<String>,
        #[arg(long)]
        error_retention: Option<String>,
    },
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

#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Create a task from a JSON or YAML file (by extension; `-` reads JSON from stdin).
    Create {
        #[arg(long)]
        file: PathBuf,
        /// Start it later (RFC 3339, e.g. 2026-12-05T02:00:00Z); overrides the file's start_at.
        #[arg(long)]
        start_at: Option<String>,
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
    List(TaskListFilter),
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

/// Which command events `watch` streams.
#[derive(Debug, Args)]
pub struct WatchFilter {
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    #[arg(long = "task")]
    pub tasks: Vec<String>,
    /// received, started, completed, failed, coalesced, rejected (repeatable)
    #[arg(long = "phase")]
    pub phases: Vec<String>,
    /// step_transition, task_start, fallback_polling, api, catch_up, retry_timer (repeatable)
    #[arg(long = "triggered-by")]
    pub triggered_by: Vec<String>,
    /// enqueued, nothing_ready, claimed_elsewhere, task_not_active, task_not_found, failed
    /// (repeatable)
    #[arg(long = "outcome")]
    pub outcomes: Vec<String>,
    /// Resume after this sequence (the last line's "sequence" of a previous watch).
    #[arg(long, default_value_t = 0)]
    pub resume_after: u64,
}

/// Which tasks `task list` shows, and the page.
#[derive(Debug, Args)]
pub struct TaskListFilter {
    #[arg(long)]
    pub namespace: Option<String>,
    /// pending, in_progress, complete, error, cancelled (repeatable)
    #[arg(long = "state")]
    pub states: Vec<String>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub oldest_first: bool,
    /// Only tasks still waiting for their start_at.
    #[arg(long)]
    pub scheduled: bool,
    /// Tasks per page (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: i32,
    /// A previous answer's next_page_token.
    #[arg(long)]
    pub page_token: Option<String>,
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

/// What every handler has: the channel, how to print, and how to connect again.
pub(crate) struct Ctl {
    svc: Svc,
    out: Output,
    connect: Connect,
}

/// Connect, then run the subcommand's handler (one per subcommand).
pub async fn run(opts: CtlOptions, command: CtlCommand) -> Result<(), CtlError> {
    let span = tracing::info_span!("tasker.ctl", otel.kind = "client");
    let _enter = span.enter();
    let connect = Connect {
        endpoint: opts.endpoint.clone(),
        token: opts.token.clone(),
        ca_cert: opts.ca_cert.clone(),
        connect_timeout: std::time::Duration::from_secs(5),
    };
    if opts.output == Output::Dot
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
    let svc: Svc = connect
        .channel()
        .await
        .map_err(|e| CtlError::Connect(e.to_string()))?;
    let ctl = &Ctl {
        svc,
        out: opts.output,
        connect,
    };
    match command {
        CtlCommand::Mode { action } => match action {
            ModeAction::Get => mode::get(ctl).await,
            ModeAction::Set { mode, fleet } => mode::set(ctl, mode, fleet).await,
            ModeAction::Clear { fleet } => mode::clear(ctl, fleet).await,
        },
        CtlCommand::Namespace { action } => match action {
            NamespaceAction::Create { namespace } => namespace::create(ctl, namespace).await,
            NamespaceAction::Delete { namespace } => namespace::delete(ctl, namespace).await,
            NamespaceAction::List => namespace::list(ctl).await,
            NamespaceAction::KeyLimit {
                namespace,
                max_tasks_per_key,
                none,
            } => namespace::key_limit(ctl, namespace, max_tasks_per_key, none).await,
            NamespaceAction::Retention {
                namespace,
                retention,
                error_retention,
            } => namespace::retention(ctl, namespace, retention, error_retention).await,
        },
        CtlCommand::Queue { action } => match action {
            QueueAction::Show { namespace, queue } => queue::show(ctl, namespace, queue).await,
            QueueAction::Limit {
                namespace,
                queue,
                max_in_flight,
                none: _,
            } => queue::limit(ctl, namespace, queue, max_in_flight).await,
            QueueAction::Pause { namespace, queue } => {
                queue::pause(ctl, namespace, queue, true).await
            }
            QueueAction::Resume { namespace, queue } => {
                queue::pause(ctl, namespace, queue, false).await
            }
        },
        CtlCommand::Schedule { action } => match action {
            ScheduleAction::Create {
                namespace,
                name,
                cron,
                time_zone,
                task_file,
                overlap,
                catch_up,
                paused,
            } => {
                schedule::create(
                    ctl,
                    schedule::ScheduleSpec {
                        namespace,
                        name,
                        cron,
                        time_zone,
                        task_file,
                        overlap,
                        catch_up,
                        paused,
                    },
                )
                .await
            }
            ScheduleAction::Get { namespace, name } => schedule::get(ctl, namespace, name).await,
            ScheduleAction::List { namespace } => schedule::list(ctl, namespace).await,
            ScheduleAction::Pause { namespace, name } => {
                schedule::pause(ctl, namespace, name, true).await
            }
            ScheduleAction::Resume { namespace, name } => {
                schedule::pause(ctl, namespace, name, false).await
            }
            ScheduleAction::Delete { namespace, name } => {
                schedule::delete(ctl, namespace, name).await
            }
            ScheduleAction::Trigger { namespace, name } => {
                schedule::trigger(ctl, namespace, name).await
            }
        },
        CtlCommand::Status => status::show(ctl).await,
        CtlCommand::Readiness { task } => readiness::readiness(ctl, task).await,
        CtlCommand::ReadyTasks {
            namespace,
            limit,
            page_token,
        } => readiness::ready_tasks(ctl, namespace, limit, page_token).await,
        CtlCommand::Inject { task } => readiness::inject(ctl, task).await,
        CtlCommand::Watch(filter) => readiness::watch(ctl, filter).await,
        CtlCommand::Task { action } => match action {
            TaskAction::Create { file, start_at } => task::create(ctl, file, start_at).await,
            TaskAction::Get { task, data } => task::get(ctl, task, data).await,
            TaskAction::Cancel { task, reason } => task::cancel(ctl, task, reason).await,
            TaskAction::List(filter) => task::list(ctl, filter).await,
            TaskAction::Wait { task, timeout } => task::wait(ctl, task, timeout).await,
            TaskAction::Retry {
                task,
                attempts,
                reason,
            } => task::retry(ctl, task, attempts, reason).await,
            TaskAction::Resolve {
                step,
                reason,
                results,
            } => task::resolve(ctl, step, reason, results).await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::output::{table, terminal_safe};
    use super::task::{read_task_file, task_dot};
    use super::*;
    use serde_json::json;

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
