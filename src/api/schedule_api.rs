//! `tasker.v1.ScheduleService`: cron schedules whose ticks create tasks. The request is checked
//! here (the expression and zone by `model::schedule`, the task template as CreateTask checks
//! a task); firing belongs to the deadline scheduler (`readiness::deadlines`).

use chrono::Utc;
use prost::Message;
use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::error::{invalid, Violations};
use crate::model::dag::{TaskSpec, Violation};
use crate::model::namespaces::namespace_name_problem;
use crate::model::schedule::{self, CatchUp, CronSpec, Overlap};
use crate::proto::{self, v1, words, Vocabulary};
use crate::store::{NewSchedule, ScheduleRecord};

/// Runs GetSchedule shows; ticks ahead it lists.
const RECENT_RUNS: i64 = 10;
const NEXT_FIRE_TIMES: usize = 5;
const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

pub struct ScheduleApi {
    ctx: ApiContext,
}

impl ScheduleApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    /// The schedule as the API shows it, with its next ticks and (`runs`) its latest runs.
    async fn to_proto(&self, s: ScheduleRecord, runs: bool) -> Result<v1::Schedule, Status> {
        let recent_runs = if runs {
            self.ctx
                .store
                .schedule_runs(&s.namespace, &s.name, RECENT_RUNS)
                .await?
                .into_iter()
                .map(|r| v1::ScheduleRun {
                    fire_at: Some(proto::timestamp(r.fire_at)),
                    outcome: r.outcome,
                    task_uuid: r.task_uuid.map(|u| u.to_string()).unwrap_or_default(),
                    catch_up: r.catch_up,
                    missed_ticks: r.missed,
                    recorded_at: Some(proto::timestamp(r.recorded_at)),
                })
                .collect()
        } else {
            Vec::new()
        };
        let next_fire_times = match (s.paused, s.next_fire_at) {
            (false, Some(next)) => CronSpec::parse(&s.cron, &s.time_zone)
                .map(|spec| {
                    std::iter::once(next)
                        .chain(spec.upcoming(next, NEXT_FIRE_TIMES - 1))
                        .map(proto::timestamp)
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(v1::Schedule {
            task: v1::CreateTaskRequest::decode(s.task.as_slice()).ok(),
            overlap: words::raw::<v1::OverlapPolicy>(s.overlap),
            catch_up: words::raw::<v1::CatchUpPolicy>(s.catch_up),
            paused: s.paused,
            next_fire_times,
            buffered_fire_at: proto::opt_timestamp(s.buffered_fire_at),
            recent_runs,
            created_at: Some(proto::timestamp(s.created_at)),
            updated_at: Some(proto::timestamp(s.updated_at)),
            namespace: s.namespace,
            name: s.name,
            cron: s.cron,
            time_zone: s.time_zone,
        })
    }
}

/// A schedule is named by its namespace and its name, both following the namespace rules.
fn check_names(namespace: &str, name: &str, bad: &mut Violations) {
    for (field, value) in [("namespace", namespace), ("name", name)] {
        if let Some(problem) = namespace_name_problem(value) {
            bad.check::<()>(Err(invalid(field, problem)));
        }
    }
}

fn named(namespace: &str, name: &str) -> Result<(), Status> {
    let mut bad = Violations::default();
    check_names(namespace, name, &mut bad);
    bad.into_result()
}

/// A policy field as the model's value, by its word (`OVERLAP_POLICY_BUFFER_ONE` ->
/// `buffer_one`); UNSPECIFIED: `default`; a number the enum lacks: INVALID_ARGUMENT.
fn policy<E, T>(field: &str, raw: i32, default: T) -> Result<T, Status>
where
    E: Vocabulary + TryFrom<i32>,
    T: std::str::FromStr,
{
    let unknown = || {
        invalid(
            field,
            format!("{raw} is not a {} ({})", E::TYPE, E::words().join(", ")),
        )
    };
    let value = E::try_from(raw).map_err(|_| unknown())?;
    if value.name() == E::zero_name() {
        return Ok(default);
    }
    value.word().parse().map_err(|_| unknown())
}

/// The template's own problems, as CreateTask would name them, under `task.`.
fn check_template(namespace: &str, task: &v1::CreateTaskRequest, bad: &mut Violations) {
    let mut problems: Vec<Violation> = Vec::new();
    if !task.namespace.is_empty() && task.namespace != namespace {
        problems.push(Violation {
            field: "namespace".into(),
            message: format!(
                "must be empty or the schedule's namespace ({namespace:?}), is {:?}",
                task.namespace
            ),
        });
    }
    if !task.idempotency_key.is_empty() {
        problems.push(Violation {
            field: "idempotency_key".into(),
            message: "must be empty: each tick's task gets the key schedule:<name>:<tick time>"
                .into(),
        });
    }
    if task.start_at.is_some() {
        problems.push(Violation {
            field: "start_at".into(),
            message: "must be empty: a tick's task starts at the tick".into(),
        });
    }
    let mut request = task.clone();
    request.namespace = namespace.to_string();
    request.idempotency_key = "schedule:check".into();
    request.start_at = None;
    let (spec, conversion) = TaskSpec::from_request(request);
    problems.extend(conversion);
    problems.extend(spec.validate());
    for p in problems {
        bad.check::<()>(Err(invalid(&format!("task.{}", p.field), p.message)));
    }
}

#[tonic::async_trait]
impl v1::schedule_service_server::ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: Request<v1::CreateScheduleRequest>,
    ) -> Result<Response<v1::CreateScheduleResponse>, Status> {
        let r = request.into_inner();
        let mut bad = Violations::default();
        check_names(&r.namespace, &r.name, &mut bad);
        let spec = match CronSpec::parse(&r.cron, &r.time_zone) {
            Ok(spec) => Some(spec),
            Err(problems) => {
                for (field, message) in problems {
                    bad.check::<()>(Err(invalid(&field, message)));
                }
                None
            }
        };
        let overlap = bad.check(policy::<v1::OverlapPolicy, _>(
            "overlap",
            r.overlap,
            Overlap::Allow,
        ));
        let catch_up = bad.check(policy::<v1::CatchUpPolicy, _>(
            "catch_up",
            r.catch_up,
            CatchUp::Skip,
        ));
        match &r.task {
            Some(task) => check_template(&r.namespace, task, &mut bad),
            None => {
                bad.check::<()>(Err(invalid(
                    "task",
                    "is required: the task each tick creates",
                )));
            }
        }
        bad.into_result()?;
        let (spec, overlap, catch_up) = (
            spec.expect("checked"),
            overlap.expect("checked"),
            catch_up.expect("checked"),
        );
        let mut task = r.task.expect("checked");
        task.namespace = r.namespace.clone();
        let made = self
            .ctx
            .store
            .create_schedule(&NewSchedule {
                next_fire_at: spec.next_after(Utc::now()),
                namespace: r.namespace,
                name: r.name,
                cron: r.cron,
                time_zone: r.time_zone,
                task: task.encode_to_vec(),
                overlap,
                catch_up,
                paused: r.paused,
            })
            .await?;
        Ok(Response::new(v1::CreateScheduleResponse {
            schedule: Some(self.to_proto(made, false).await?),
        }))
    }

    async fn get_schedule(
        &self,
        request: Request<v1::GetScheduleRequest>,
    ) -> Result<Response<v1::GetScheduleResponse>, Status> {
        let r = request.into_inner();
        named(&r.namespace, &r.name)?;
        let s = self.ctx.store.get_schedule(&r.namespace, &r.name).await?;
        Ok(Response::new(v1::GetScheduleResponse {
            schedule: Some(self.to_proto(s, true).await?),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<v1::ListSchedulesRequest>,
    ) -> Result<Response<v1::ListSchedulesResponse>, Status> {
        let r = request.into_inner();
        let mut bad = Violations::default();
        if !r.namespace.is_empty() {
            if let Some(problem) = namespace_name_problem(&r.namespace) {
                bad.check::<()>(Err(invalid("namespace", problem)));
            }
        }
        let size = bad
            .check(match r.page_size {
                0 => Ok(DEFAULT_PAGE_SIZE),
                n if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
                n => Err(invalid(
                    "page_size",
                    format!("must be between 0 and {MAX_PAGE_SIZE}, is {n}"),
                )),
            })
            .unwrap_or_default();
        // the token is the last schedule's "namespace/name" (neither can hold a "/")
        let after = match r.page_token.split_once('/') {
            _ if r.page_token.is_empty() => None,
            Some((ns, name))
                if namespace_name_problem(ns).is_none()
                    && namespace_name_problem(name).is_none() =>
            {
                Some((ns.to_string(), name.to_string()))
            }
            _ => {
                bad.check::<()>(Err(invalid(
                    "page_token",
                    "is not a next_page_token this server returned",
                )));
                None
            }
        };
        bad.into_result()?;
        let mut rows = self
            .ctx
            .store
            .list_schedules(
                (!r.namespace.is_empty()).then_some(r.namespace.as_str()),
                after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
                i64::from(size) + 1,
            )
            .await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = if more {
            rows.last()
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut schedules = Vec::with_capacity(rows.len());
        for s in rows {
            schedules.push(self.to_proto(s, false).await?);
        }
        Ok(Response::new(v1::ListSchedulesResponse {
            schedules,
            next_page_token,
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::PauseScheduleResponse>, Status> {
        let r = request.into_inner();
        named(&r.namespace, &r.name)?;
        let s = self
            .ctx
            .store
            .set_schedule_paused(&r.namespace, &r.name, true, None)
            .await?;
        Ok(Response::new(v1::PauseScheduleResponse {
            schedule: Some(self.to_proto(s, false).await?),
        }))
    }

    async fn resume_schedule(
        &self,
        request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ResumeScheduleResponse>, Status> {
        let r = request.into_inner();
        named(&r.namespace, &r.name)?;
        let current = self.ctx.store.get_schedule(&r.namespace, &r.name).await?;
        let next = CronSpec::parse(&current.cron, &current.time_zone)
            .ok()
            .and_then(|spec| spec.next_after(Utc::now()));
        let s = self
            .ctx
            .store
            .set_schedule_paused(&r.namespace, &r.name, false, next)
            .await?;
        Ok(Response::new(v1::ResumeScheduleResponse {
            schedule: Some(self.to_proto(s, false).await?),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<v1::DeleteScheduleRequest>,
    ) -> Result<Response<v1::DeleteScheduleResponse>, Status> {
        let r = request.into_inner();
        named(&r.namespace, &r.name)?;
        if !self
            .ctx
            .store
            .delete_schedule(&r.namespace, &r.name)
            .await?
        {
            return Err(Status::not_found(format!(
                "schedule {:?} in namespace {:?} not found",
                r.name, r.namespace
            )));
        }
        Ok(Response::new(v1::DeleteScheduleResponse {}))
    }

    async fn trigger_schedule(
        &self,
        request: Request<v1::TriggerScheduleRequest>,
    ) -> Result<Response<v1::TriggerScheduleResponse>, Status> {
        let r = request.into_inner();
        named(&r.namespace, &r.name)?;
        let current = self.ctx.store.get_schedule(&r.namespace, &r.name).await?;
        let key = format!("schedule:{}:trigger:{}", r.name, uuid::Uuid::now_v7());
        let task =
            schedule::task_for_tick(&r.namespace, &current.task, key).map_err(|problem| {
                Status::failed_precondition(format!(
                    "the schedule's task cannot be made: {problem}"
                ))
            })?;
        let task_uuid = self
            .ctx
            .store
            .trigger_schedule(&r.namespace, &r.name, &task)
            .await?;
        Ok(Response::new(v1::TriggerScheduleResponse {
            task_uuid: task_uuid.to_string(),
        }))
    }
}
