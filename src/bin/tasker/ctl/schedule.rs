//! `ctl schedule create | get | list | pause | resume | delete | trigger`: cron schedules whose
//! ticks create tasks.

use serde_json::{json, Value};
use tasker::proto::{v1, Vocabulary};

use super::output::{print_value, ts};
use super::task::read_task_file;
use super::{Ctl, CtlError};

type Schedules =
    v1::schedule_service_client::ScheduleServiceClient<tasker::client::AuthorizedChannel>;

/// What `schedule create` takes.
pub(super) struct ScheduleSpec {
    pub namespace: String,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub task_file: std::path::PathBuf,
    pub overlap: String,
    pub catch_up: String,
    pub paused: bool,
}

/// A policy typed as a word (`buffer_one`) or its value's name (`OVERLAP_POLICY_BUFFER_ONE`).
fn policy<E: Vocabulary + Into<i32> + TryFrom<i32>>(
    flag: &str,
    input: &str,
) -> Result<i32, CtlError> {
    E::from_input(input).map(Into::into).ok_or_else(|| {
        CtlError::Usage(format!(
            "{flag}: {input:?} is not one of {}",
            E::words().join(", ")
        ))
    })
}

/// `schedule create NS NAME --cron EXPR --task-file FILE [...]`: the task file is the same as
/// `task create`'s, without namespace (or with the schedule's) and without idempotency key.
pub(super) async fn create(ctl: &Ctl, s: ScheduleSpec) -> Result<(), CtlError> {
    let task = read_task_file(&s.task_file)?;
    let r = Schedules::new(ctl.svc.clone())
        .create_schedule(v1::CreateScheduleRequest {
            namespace: s.namespace,
            name: s.name,
            cron: s.cron,
            time_zone: s.time_zone,
            task: Some(task),
            overlap: policy::<v1::OverlapPolicy>("--overlap", &s.overlap)?,
            catch_up: policy::<v1::CatchUpPolicy>("--catch-up", &s.catch_up)?,
            paused: s.paused,
        })
        .await?
        .into_inner();
    print_value(&schedule_json(r.schedule), ctl.out);
    Ok(())
}

/// `schedule get NS NAME`: with its next ticks and latest runs.
pub(super) async fn get(ctl: &Ctl, namespace: String, name: String) -> Result<(), CtlError> {
    let r = Schedules::new(ctl.svc.clone())
        .get_schedule(v1::GetScheduleRequest { namespace, name })
        .await?
        .into_inner();
    print_value(&schedule_json(r.schedule), ctl.out);
    Ok(())
}

/// `schedule list [--namespace NS]`: every schedule, page by page.
pub(super) async fn list(ctl: &Ctl, namespace: Option<String>) -> Result<(), CtlError> {
    let mut client = Schedules::new(ctl.svc.clone());
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = client
            .list_schedules(v1::ListSchedulesRequest {
                namespace: namespace.clone().unwrap_or_default(),
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        all.extend(r.schedules.into_iter().map(|s| schedule_json(Some(s))));
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    print_value(&json!({ "schedules": all }), ctl.out);
    Ok(())
}

/// `schedule pause|resume NS NAME`.
pub(super) async fn pause(
    ctl: &Ctl,
    namespace: String,
    name: String,
    paused: bool,
) -> Result<(), CtlError> {
    let mut client = Schedules::new(ctl.svc.clone());
    let schedule = if paused {
        client
            .pause_schedule(v1::PauseScheduleRequest { namespace, name })
            .await?
            .into_inner()
            .schedule
    } else {
        client
            .resume_schedule(v1::ResumeScheduleRequest { namespace, name })
            .await?
            .into_inner()
            .schedule
    };
    print_value(&schedule_json(schedule), ctl.out);
    Ok(())
}

/// `schedule delete NS NAME`: the schedule goes, its tasks stay.
pub(super) async fn delete(ctl: &Ctl, namespace: String, name: String) -> Result<(), CtlError> {
    Schedules::new(ctl.svc.clone())
        .delete_schedule(v1::DeleteScheduleRequest {
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .await?;
    print_value(
        &json!({"deleted": {"namespace": namespace, "name": name}}),
        ctl.out,
    );
    Ok(())
}

/// `schedule trigger NS NAME`: its task now, outside its ticks.
pub(super) async fn trigger(ctl: &Ctl, namespace: String, name: String) -> Result<(), CtlError> {
    let r = Schedules::new(ctl.svc.clone())
        .trigger_schedule(v1::TriggerScheduleRequest { namespace, name })
        .await?
        .into_inner();
    print_value(&json!({"task_uuid": r.task_uuid}), ctl.out);
    Ok(())
}

fn schedule_json(s: Option<v1::Schedule>) -> Value {
    let Some(s) = s else { return Value::Null };
    json!({
        "namespace": s.namespace, "name": s.name, "cron": s.cron, "time_zone": s.time_zone,
        "overlap": v1::OverlapPolicy::word_of(s.overlap),
        "catch_up": v1::CatchUpPolicy::word_of(s.catch_up),
        "paused": s.paused,
        "task": s.task.map(|t| json!({"name": t.name, "steps": t.steps.len()})),
        "next_fire_times": s.next_fire_times.into_iter().map(|t| ts(Some(t))).collect::<Vec<_>>(),
        "buffered_fire_at": ts(s.buffered_fire_at),
        "recent_runs": s.recent_runs.into_iter().map(|r| json!({
            "fire_at": ts(r.fire_at), "outcome": r.outcome, "task_uuid": r.task_uuid,
            "catch_up": r.catch_up, "missed_ticks": r.missed_ticks,
        })).collect::<Vec<_>>(),
        "created_at": ts(s.created_at), "updated_at": ts(s.updated_at),
    })
}
