//! `ctl readiness`, `ctl ready-tasks`, `ctl inject`, `ctl watch`: the readiness service.

use serde_json::{json, Value};
use tasker::proto::{v1, Vocabulary};
use tokio_stream::StreamExt;

use super::output::{enum_flags, print_value, terminal_safe, ts};
use super::{Ctl, CtlError, WatchFilter};

/// `readiness TASK`: each step's readiness and the task's counts.
pub(super) async fn readiness(ctl: &Ctl, task: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
}

/// `ready-tasks`: tasks with ready steps, best first, a page at a time.
pub(super) async fn ready_tasks(
    ctl: &Ctl,
    namespace: Option<String>,
    limit: i32,
    page_token: Option<String>,
) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
}

/// `inject TASK`: send the task a readiness command and print its result.
pub(super) async fn inject(ctl: &Ctl, task: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
}

/// `watch`: command events as JSON lines, until interrupted.
pub(super) async fn watch(ctl: &Ctl, filter: WatchFilter) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let WatchFilter {
        namespaces,
        tasks,
        phases,
        triggered_by,
        outcomes,
        resume_after,
    } = filter;
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
    Ok(())
}
