//! `tasker.v1.ReadinessService`: readiness queries, command injection, the command stream.

use std::collections::HashSet;
use std::pin::Pin;

use futures::Stream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::context::ApiContext;
use super::convert::{self, enum_filter, uuid};
use super::error::{self, invalid, Violations};
use crate::model::command::TriggeredBy;
use crate::model::namespaces::namespace_name_problem;
use crate::proto::{self, v1, words, Vocabulary};
use crate::readiness::commands::{CommandEvent, CommandPhase, Gap, OrchestrationCommand};
use crate::store::ReadyRank;

pub struct ReadinessApi {
    ctx: ApiContext,
}

impl ReadinessApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
}

const MAX_PAGE: i64 = 1000;
/// ListReadyTasks' page tokens: the first page's time (the ranking's), the last task's place
/// in the ranking, and a fingerprint of the namespace filter.
const PAGE_TOKEN_PREFIX: &str = "ready-v1.";

fn parse_ready_token(
    token: &str,
    issued_for: &str,
) -> Result<(chrono::DateTime<chrono::Utc>, Option<ReadyRank>), Status> {
    let refused = || invalid("page_token", "is not a token this service issued");
    let parts: Vec<&str> = token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .ok_or_else(refused)?
        .split('.')
        .collect();
    let [as_of, priority, since, task, fingerprint] = parts[..] else {
        return Err(refused());
    };
    let micros = |s: &str| {
        s.parse::<i64>()
            .ok()
            .and_then(chrono::DateTime::from_timestamp_micros)
    };
    let parsed = (|| {
        Some((
            micros(as_of)?,
            priority.parse::<i32>().ok()?,
            micros(since)?,
            task.parse::<uuid::Uuid>().ok()?,
        ))
    })()
    .ok_or_else(refused)?;
    if fingerprint != issued_for {
        return Err(invalid(
            "page_token",
            "was issued for another namespace: send the same one to page on",
        ));
    }
    Ok((parsed.0, Some((parsed.1, parsed.2, parsed.3))))
}

fn event_to_proto(e: &CommandEvent) -> v1::CommandEvent {
    v1::CommandEvent {
        command_id: e.command_id.to_string(),
        task_uuid: e.task_uuid.to_string(),
        namespace: e.namespace.clone(),
        triggered_by: words::raw::<v1::TriggeredBy>(e.triggered_by.as_str()),
        phase: words::raw::<v1::CommandPhase>(e.phase.as_str()),
        outcome: e
            .outcome
            .as_deref()
            .map_or(0, words::raw::<v1::CommandOutcome>),
        steps_enqueued: e.steps_enqueued as i32,
        steps_held: e.steps_held as i32,
        duration: Some(proto::duration(e.duration)),
        timestamp: Some(proto::timestamp(e.timestamp)),
        error: e.error.clone().unwrap_or_default(),
        missed: 0,
        sequence: e.sequence,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CommandEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::readiness_service_server::ReadinessService for ReadinessApi {
    async fn get_task_readiness(
        &self,
        request: Request<v1::GetTaskReadinessRequest>,
    ) -> Result<Response<v1::GetTaskReadinessResponse>, Status> {
        let task = uuid("task_uuid", &request.get_ref().task_uuid)?;
        let ctx = self.ctx.store.execution_context(task).await?;
        let steps = self.ctx.store.step_readiness(task).await?;
        let ready_per_queue = queue_counts(&self.ctx.store.ready_per_queue(&[task]).await?, task);
        Ok(Response::new(v1::GetTaskReadinessResponse {
            ready_per_queue,
            task_uuid: ctx.task_uuid.to_string(),
            namespace: ctx.namespace,
            task_state: words::raw::<v1::TaskState>(&ctx.task_state),
            execution_status: words::raw::<v1::ExecutionStatus>(&ctx.execution_status),
            priority: ctx.priority,
            counts: Some(v1::StepCounts {
                total: ctx.total_steps,
                pending: ctx.pending_steps,
                enqueued: ctx.enqueued_steps,
                in_progress: ctx.in_progress_steps,
                complete: ctx.complete_steps,
                failed: ctx.failed_steps,
                ready: ctx.ready_steps,
                waiting_for_retry: ctx.waiting_for_retry_steps,
                cancelled: ctx.cancelled_steps,
            }),
            steps: steps
                .into_iter()
                .map(|s| v1::StepReadiness {
                    step_uuid: s.step_uuid.to_string(),
                    name: s.name,
                    state: words::raw::<v1::StepState>(&s.state),
                    dependencies_satisfied: s.dependencies_satisfied,
                    ready: s.ready,
                    next_retry_at: proto::opt_timestamp(s.next_retry_at),
                    attempts: s.attempts,
                    max_attempts: s.max_attempts,
                    retry_eligible: s.retry_eligible,
                    total_parents: s.total_parents,
                    completed_parents: s.completed_parents,
                })
                .collect(),
        }))
    }

    async fn list_ready_tasks(
        &self,
        request: Request<v1::ListReadyTasksRequest>,
    ) -> Result<Response<v1::ListReadyTasksResponse>, Status> {
        let r = request.into_inner();
        let limit = convert::bounded("limit", i64::from(r.limit), 100, 1, MAX_PAGE)?;
        let namespaces = if r.namespace.is_empty() {
            None
        } else {
            if let Some(p) = namespace_name_problem(&r.namespace) {
                return Err(invalid("namespace", p));
            }
            Some(vec![r.namespace.clone()])
        };
        let issued_for = super::task_list::fingerprint(&[&r.namespace]);
        let (as_of, after) = if r.page_token.is_empty() {
            (chrono::Utc::now(), None)
        } else {
            parse_ready_token(&r.page_token, &issued_for)?
        };
        // one more than asked, to know whether another page exists
        let mut rows = self
            .ctx
            .store
            .ready_tasks_page(namespaces.as_deref(), limit + 1, as_of, after)
            .await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let uuids: Vec<Uuid> = rows.iter().map(|t| t.task_uuid).collect();
        let per_queue = self.ctx.store.ready_per_queue(&uuids).await?;
        Ok(Response::new(v1::ListReadyTasksResponse {
            next_page_token: match rows.last() {
                Some(last) if more => format!(
                    "{PAGE_TOKEN_PREFIX}{}.{}.{}.{}.{issued_for}",
                    as_of.timestamp_micros(),
                    last.computed_priority,
                    last.ready_since.timestamp_micros(),
                    last.task_uuid
                ),
                _ => String::new(),
            },
            tasks: rows
                .into_iter()
                .map(|t| v1::ReadyTask {
                    task_uuid: t.task_uuid.to_string(),
                    namespace: t.namespace,
                    priority: t.priority,
                    computed_priority: t.computed_priority,
                    ready_steps: t.ready_steps,
                    ready_since: Some(proto::timestamp(t.ready_since)),
                    ready_per_queue: queue_counts(&per_queue, t.task_uuid),
                })
                .collect(),
        }))
    }

    async fn process_task_readiness(
        &self,
        request: Request<v1::ProcessTaskReadinessRequest>,
    ) -> Result<Response<v1::ProcessTaskReadinessResponse>, Status> {
        let r = request.into_inner();
        let task_uuid = uuid("task_uuid", &r.task_uuid)?;
        let task = self.ctx.store.get_task(task_uuid).await?;
        if !r.namespace.is_empty() && r.namespace != task.namespace {
            return Err(invalid(
                "namespace",
                format!(
                    "task {task_uuid} is in namespace {:?}, not {:?}",
                    task.namespace, r.namespace
                ),
            ));
        }
        let command =
            OrchestrationCommand::process_task(task_uuid, task.namespace, TriggeredBy::Api);
        let result = self
            .ctx
            .commands
            .execute(command)
            .await
            .map_err(error::submit)?;
        Ok(Response::new(v1::ProcessTaskReadinessResponse {
            command_id: result.command_id.to_string(),
            outcome: words::raw::<v1::CommandOutcome>(result.outcome.as_str()),
            steps_enqueued: result.enqueued_steps.len() as i32,
            enqueued_step_uuids: result
                .enqueued_steps
                .iter()
                .map(ToString::to_string)
                .collect(),
            coalesced: result.coalesced,
        }))
    }

    type StreamCommandEventsStream = EventStream;

    async fn stream_command_events(
        &self,
        request: Request<v1::StreamCommandEventsRequest>,
    ) -> Result<Response<Self::StreamCommandEventsStream>, Status> {
        let r = request.into_inner();
        let filter = EventFilter::parse(&r)?;
        let (backlog, gap, live) = if r.resume_after == 0 {
            (Vec::new(), None, self.ctx.commands.subscribe())
        } else {
            let resumed = self.ctx.commands.resume(r.resume_after);
            (resumed.backlog, resumed.gap, resumed.live)
        };
        let gap = gap.map(|g| match g {
            Gap::Missed(missed) => gap_event(missed, String::new()),
            Gap::BeforeStart => gap_event(
                0,
                format!(
                    "sequence {} is from before this replica started: the events since are unknown",
                    r.resume_after
                ),
            ),
            Gap::NeverIssued { next } => gap_event(
                0,
                format!(
                    "sequence {} was never issued by this replica (its next is {next}): sequences are per replica, so resume on the replica that sent it; events from now on follow",
                    r.resume_after
                ),
            ),
        });
        let before = futures::stream::iter(
            gap.into_iter()
                .map(Ok)
                .chain(
                    backlog
                        .into_iter()
                        .filter(|e| filter.passes(e))
                        .map(|e| Ok(event_to_proto(&e))),
                )
                .collect::<Vec<_>>(),
        );
        let live = BroadcastStream::new(live).filter_map(move |item| match item {
            Ok(e) => filter.passes(&e).then(|| Ok(event_to_proto(&e))),
            // a slow observer: say how much it missed and go on
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                Some(Ok(gap_event(missed, String::new())))
            }
        });
        let stream = futures::StreamExt::take_until(before.chain(live), self.ctx.drained());
        Ok(Response::new(Box::pin(stream)))
    }
}

fn gap_event(missed: u64, error: String) -> v1::CommandEvent {
    v1::CommandEvent {
        phase: v1::CommandPhase::Gap.into(),
        missed,
        error,
        timestamp: Some(proto::timestamp(chrono::Utc::now())),
        ..Default::default()
    }
}

/// Which command events a stream passes: each filter that is set must match.
struct EventFilter {
    namespaces: HashSet<String>,
    tasks: HashSet<uuid::Uuid>,
    phases: HashSet<CommandPhase>,
    triggered_by: HashSet<TriggeredBy>,
    outcomes: HashSet<String>,
}

impl EventFilter {
    /// Every broken rule of the request at once, each naming its field and entry.
    fn parse(r: &v1::StreamCommandEventsRequest) -> Result<Self, Status> {
        let mut bad = Violations::default();
        for (i, ns) in r.namespaces.iter().enumerate() {
            if let Some(problem) = namespace_name_problem(ns) {
                bad.check::<()>(Err(invalid(&format!("namespaces[{i}]"), problem)));
            }
        }
        let tasks = r
            .task_uuids
            .iter()
            .enumerate()
            .filter_map(|(i, t)| bad.check(uuid(&format!("task_uuids[{i}]"), t)))
            .collect();
        let phases = bad
            .check(domain_filter::<v1::CommandPhase, _>(
                "phases",
                &r.phases,
                |w| {
                    w.parse::<CommandPhase>().map_err(|_| {
                        "COMMAND_PHASE_GAP cannot be asked for: gap events always come"
                    })
                },
            ))
            .unwrap_or_default();
        let triggered_by = bad
            .check(domain_filter::<v1::TriggeredBy, _>(
                "triggered_by",
                &r.triggered_by,
                |w| {
                    w.parse::<TriggeredBy>()
                        .map_err(|_| "is not a source this build knows")
                },
            ))
            .unwrap_or_default();
        let outcomes = bad
            .check(enum_filter::<v1::CommandOutcome>("outcomes", &r.outcomes))
            .unwrap_or_default()
            .into_iter()
            .map(Vocabulary::word)
            .collect();
        bad.into_result()?;
        Ok(Self {
            namespaces: r.namespaces.iter().cloned().collect(),
            tasks,
            phases,
            triggered_by,
            outcomes,
        })
    }

    fn passes(&self, e: &CommandEvent) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&e.namespace))
            && (self.tasks.is_empty() || self.tasks.contains(&e.task_uuid))
            && (self.phases.is_empty() || self.phases.contains(&e.phase))
            && (self.triggered_by.is_empty() || self.triggered_by.contains(&e.triggered_by))
            && (self.outcomes.is_empty()
                || e.outcome
                    .as_ref()
                    .is_some_and(|o| self.outcomes.contains(o)))
    }
}

/// A repeated enum filter as the domain's values: each entry's word parsed by `parse`, whose
/// refusal names the entry. Every bad entry is reported.
fn domain_filter<E, T>(
    field: &str,
    raw: &[i32],
    parse: impl Fn(&str) -> Result<T, &'static str>,
) -> Result<HashSet<T>, Status>
where
    E: Vocabulary + TryFrom<i32>,
    T: Eq + std::hash::Hash,
{
    let mut bad = Violations::default();
    let values = enum_filter::<E>(field, raw)?
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| {
            bad.check(parse(&e.word()).map_err(|why| invalid(&format!("{field}[{i}]"), why)))
        })
        .collect();
    bad.into_result().map(|()| values)
}

/// The counts of one task, by queue.
fn queue_counts(rows: &[(Uuid, String, i32)], task: Uuid) -> Vec<v1::QueueCount> {
    rows.iter()
        .filter(|(t, _, _)| *t == task)
        .map(|(_, queue, steps)| v1::QueueCount {
            queue: queue.clone(),
            steps: *steps,
        })
        .collect()
}
