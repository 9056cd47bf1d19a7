//! `tasker.v1.AdminService`: the deployment mode (read, and switch at run time for this replica
//! or the fleet), status (this replica and the fleet), namespaces with their tasks-per-key
//! limit, and queues (in-flight limits, pause and resume).

use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::convert::{mode_from_proto, mode_to_proto};
use super::error::{invalid, Violations};
use crate::config::{DeploymentMode, MAX_RETENTION};
use crate::model::namespaces::{queue_name_problem, DEFAULT_QUEUE};
use crate::model::retention::age;
use crate::proto::{self, v1};
use crate::readiness::mode::ModeSource;
use crate::readiness::ListenerState;
use crate::store::retention::RetentionChange;
use crate::store::LaneSettings;

pub struct AdminApi {
    ctx: ApiContext,
}

impl AdminApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
}

impl AdminApi {
    /// A namespace's settings as GetNamespaceSettings answers them.
    async fn namespace_settings(&self, namespace: &str) -> Result<v1::NamespaceSettings, Status> {
        let (max, waiting) = self.ctx.store.namespace_settings(namespace).await?;
        let (keep, keep_error) = self.ctx.store.namespace_retention(namespace).await?;
        let defaults = self.ctx.retention_defaults;
        Ok(v1::NamespaceSettings {
            namespace: namespace.to_string(),
            max_tasks_per_key: max,
            tasks_waiting_on_keys: waiting,
            retention: keep.map(proto::duration),
            error_retention: keep_error.map(proto::duration),
            effective_retention: Some(proto::duration(keep.unwrap_or(defaults.retention))),
            effective_error_retention: Some(proto::duration(
                keep_error.unwrap_or(defaults.error_retention),
            )),
        })
    }
}

impl AdminApi {
    /// Retention for GetStatus: this replica's purge totals, what every namespace keeps, the
    /// schema's size. A read that fails leaves its part empty: the status answers while the
    /// database is away.
    async fn retention_status(&self) -> v1::RetentionStatus {
        let (tasks_purged, steps_purged, rows_purged) = self.ctx.purge_totals.get();
        let store = &self.ctx.store;
        let kept = store
            .retention_status(self.ctx.retention_defaults, None)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading what retention keeps failed");
                Vec::new()
            });
        let schema_bytes = store.schema_bytes().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the schema's size failed");
            0
        });
        let now = chrono::Utc::now();
        let oldest = kept
            .iter()
            .flat_map(|n| [n.oldest_finished, n.oldest_error])
            .flatten()
            .min();
        v1::RetentionStatus {
            purging: self.ctx.purging,
            tasks_purged,
            steps_purged,
            rows_purged,
            schema_bytes: u64::try_from(schema_bytes).unwrap_or(0),
            oldest_finished_age: oldest.map(|t| proto::duration(age(t, now))),
            behind: kept.iter().any(|n| n.behind(now)),
            namespaces: kept
                .into_iter()
                .map(|n| v1::NamespaceRetention {
                    behind: n.behind(now),
                    retention: Some(proto::duration(n.retention)),
                    error_retention: Some(proto::duration(n.error_retention)),
                    oldest_finished_age: n.oldest_finished.map(|t| proto::duration(age(t, now))),
                    oldest_error_age: n.oldest_error.map(|t| proto::duration(age(t, now))),
                    namespace: n.namespace,
                })
                .collect(),
        }
    }
}

/// Which settings a SetNamespaceSettings changes.
struct SettingsMask {
    max_tasks_per_key: bool,
    retention: bool,
    error_retention: bool,
}

/// `update_mask`'s paths (none: every setting), each a setting's name.
fn settings_mask(mask: Option<&prost_types::FieldMask>) -> Result<SettingsMask, Status> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        return Ok(SettingsMask {
            max_tasks_per_key: true,
            retention: true,
            error_retention: true,
        });
    }
    let mut m = SettingsMask {
        max_tasks_per_key: false,
        retention: false,
        error_retention: false,
    };
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "max_tasks_per_key" => m.max_tasks_per_key = true,
            "retention" => m.retention = true,
            "error_retention" => m.error_retention = true,
            other => {
                return Err(invalid(
                    &format!("update_mask.paths[{i}]"),
                    format!("unknown setting {other:?}; expected max_tasks_per_key, retention or error_retention"),
                ))
            }
        }
    }
    Ok(m)
}

/// A retention period: absent (the fleet's default), or 1 s to [`MAX_RETENTION`].
fn retention_field(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    let ms = proto::duration_ms(d);
    let max_ms = i64::try_from(MAX_RETENTION.as_millis()).unwrap_or(i64::MAX);
    if !(1_000..=max_ms).contains(&ms) {
        return Err(invalid(
            field,
            format!(
                "must be between 1 s and {} days (absent: the fleet's default), is {ms} ms",
                MAX_RETENTION.as_secs() / 86_400,
            ),
        ));
    }
    Ok(Some(std::time::Duration::from_millis(ms as u64)))
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for AdminApi {
    async fn get_deployment_mode(
        &self,
        _request: Request<v1::GetDeploymentModeRequest>,
    ) -> Result<Response<v1::GetDeploymentModeResponse>, Status> {
        let sources = self.ctx.mode_controller.mode_sources();
        let (mode, source) = sources.effective();
        let opt = |m: Option<DeploymentMode>| {
            m.map_or(v1::DeploymentMode::Unspecified, mode_to_proto) as i32
        };
        Ok(Response::new(v1::GetDeploymentModeResponse {
            mode: mode_to_proto(mode) as i32,
            source: source_to_proto(source) as i32,
            replica_mode: opt(sources.replica),
            fleet_mode: opt(sources.fleet),
            config_mode: mode_to_proto(sources.config) as i32,
        }))
    }

    async fn set_deployment_mode(
        &self,
        request: Request<v1::SetDeploymentModeRequest>,
    ) -> Result<Response<v1::SetDeploymentModeResponse>, Status> {
        let r = request.into_inner();
        let scope = v1::DeploymentModeScope::try_from(r.scope).map_err(|_| {
            invalid(
                "scope",
                format!("unknown scope {}; expected DEPLOYMENT_MODE_SCOPE_REPLICA or DEPLOYMENT_MODE_SCOPE_FLEET", r.scope),
            )
        })?;
        let mode = if r.clear {
            if r.mode != v1::DeploymentMode::Unspecified as i32 {
                return Err(invalid("mode", "must be left unspecified with clear"));
            }
            None
        } else {
            Some(mode_from_proto("mode", r.mode)?)
        };
        let mode_controller = &self.ctx.mode_controller;
        let previous = match scope {
            v1::DeploymentModeScope::Fleet => {
                // stored first: the other replicas hear it from the database, this one too
                self.ctx.store.set_fleet_mode(mode).await?;
                mode_controller.set_fleet_mode(mode)
            }
            v1::DeploymentModeScope::Unspecified | v1::DeploymentModeScope::Replica => match mode {
                Some(m) => mode_controller.set_mode(m),
                None => mode_controller.clear_replica_mode(),
            },
        };
        let (current, source) = mode_controller.mode_sources().effective();
        Ok(Response::new(v1::SetDeploymentModeResponse {
            previous: mode_to_proto(previous) as i32,
            current: mode_to_proto(current) as i32,
            source: source_to_proto(source) as i32,
        }))
    }

    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        let status = self.ctx.mode_controller.status();
        let replicas = self
            .ctx
            .store
            .live_replicas(self.ctx.replica_gone_after)
            .await
            // the status must answer while the database is away: then without the fleet
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the replica registry failed");
                Vec::new()
            })
            .into_iter()
            .map(|r| v1::Replica {
                replica_id: r.replica_id.to_string(),
                address: r.address,
                version: r.version,
                started_at: Some(proto::timestamp(r.started_at)),
                heartbeat_at: Some(proto::timestamp(r.heartbeat_at)),
                mode: r
                    .deployment_mode
                    .and_then(|m| m.parse::<DeploymentMode>().ok())
                    .map_or(v1::DeploymentMode::Unspecified, mode_to_proto)
                    as i32,
                listening: r.listening,
                serves_every_namespace: r.serves_every_namespace,
            })
            .collect();
        let queues = self
            .ctx
            .store
            .configured_lanes()
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the queue settings failed");
                Vec::new()
            })
            .into_iter()
            .map(lane_to_proto)
            .collect();
        let retention = self.retention_status().await;
        Ok(Response::new(v1::GetStatusResponse {
            mode: mode_to_proto(status.mode) as i32,
            listener_connected: status.listener.state == ListenerState::Listening,
            listener_channels: status.listener.channels,
            poller_last_run: proto::opt_timestamp(status.poller.last_round_at),
            poller_last_tasks_found: status.poller.last_round_tasks_found,
            command_queue_depth: self.ctx.commands.queue_depth() as u64,
            commands_in_flight: self.ctx.commands.stats().in_flight(),
            uptime: Some(proto::duration(self.ctx.started.elapsed())),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listener_reconnects: status.listener.reconnects,
            commands_processed: self.ctx.commands.stats().processed(),
            draining: self.ctx.draining(),
            poller_periodic: status.poller.periodic,
            parked_fetches: *self.ctx.workers.parked_fetches().borrow() as u64,
            claims_lost: self.ctx.commands.stats().claims_lost(),
            replica_id: self.ctx.fleet.replica_id().to_string(),
            events_left_to_peers: self.ctx.fleet.events_left_to_peers(),
            watch_streams: self.ctx.feeds.streams() as u64,
            watched_tasks: self.ctx.feeds.tasks() as u64,
            replicas,
            queues,
            retention: Some(retention),
        }))
    }

    async fn create_namespace(
        &self,
        request: Request<v1::CreateNamespaceRequest>,
    ) -> Result<Response<v1::CreateNamespaceResponse>, Status> {
        let r = request.into_inner();
        let name = namespace_field(&r.namespace)?;
        let created = self.ctx.store.create_namespace(name).await?;
        let namespace = self
            .ctx
            .store
            .namespace_records()
            .await?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(namespace_to_proto);
        Ok(Response::new(v1::CreateNamespaceResponse {
            namespace,
            created,
        }))
    }

    async fn delete_namespace(
        &self,
        request: Request<v1::DeleteNamespaceRequest>,
    ) -> Result<Response<v1::DeleteNamespaceResponse>, Status> {
        let r = request.into_inner();
        self.ctx
            .store
            .delete_namespace(namespace_field(&r.namespace)?)
            .await?;
        Ok(Response::new(v1::DeleteNamespaceResponse {}))
    }

    async fn list_namespaces(
        &self,
        _request: Request<v1::ListNamespacesRequest>,
    ) -> Result<Response<v1::ListNamespacesResponse>, Status> {
        let namespaces = self
            .ctx
            .store
            .namespace_records()
            .await?
            .into_iter()
            .map(namespace_to_proto)
            .collect();
        Ok(Response::new(v1::ListNamespacesResponse { namespaces }))
    }

    async fn set_queue_settings(
        &self,
        request: Request<v1::SetQueueSettingsRequest>,
    ) -> Result<Response<v1::QueueSettings>, Status> {
        let r = request.into_inner();
        let mut bad = Violations::default();
        let lane = bad.check(lane_fields(&r.namespace, &r.queue, DEFAULT_QUEUE));
        let max = bad.check(match r.max_in_flight {
            Some(n) if !(1..=MAX_IN_FLIGHT).contains(&n) => Err(invalid(
                "max_in_flight",
                format!(
                    "must be between 1 and {MAX_IN_FLIGHT} (absent: no limit; to stop the queue, PauseQueue it), is {n}"
                ),
            )),
            other => Ok(other),
        });
        bad.into_result()?;
        let ((namespace, queue), max) = lane.zip(max).expect("checked");
        let lane = self
            .ctx
            .store
            .set_queue_limit(&namespace, &queue, max)
            .await?;
        Ok(Response::new(lane_to_proto(lane)))
    }

    async fn set_namespace_settings(
        &self,
        request: Request<v1::SetNamespaceSettingsRequest>,
    ) -> Result<Response<v1::NamespaceSettings>, Status> {
        let r = request.into_inner();
        let mut bad = Violations::default();
        let namespace = bad.check(namespace_field(&r.namespace));
        let mask = bad.check(settings_mask(r.update_mask.as_ref()));
        let max = bad.check(match r.max_tasks_per_key {
            Some(n) if !(1..=MAX_TASKS_PER_KEY).contains(&n) => Err(invalid(
                "max_tasks_per_key",
                format!(
                    "must be between 1 and {MAX_TASKS_PER_KEY} (absent: no limit; to stop a namespace, PauseQueue it), is {n}"
                ),
            )),
            other => Ok(other),
        });
        let keep = bad.check(retention_field("retention", r.retention.as_ref()));
        let keep_error = bad.check(retention_field(
            "error_retention",
            r.error_retention.as_ref(),
        ));
        bad.into_result()?;
        let (namespace, max, mask) = (
            namespace.expect("checked"),
            max.expect("checked"),
            mask.expect("checked"),
        );
        let change = RetentionChange {
            retention: mask.retention.then(|| keep.expect("checked")),
            error_retention: mask.error_retention.then(|| keep_error.expect("checked")),
        };
        self.ctx
            .store
            .set_namespace_retention(namespace, change)
            .await?;
        if mask.max_tasks_per_key {
            self.ctx.store.set_max_tasks_per_key(namespace, max).await?;
        }
        Ok(Response::new(self.namespace_settings(namespace).await?))
    }

    async fn get_namespace_settings(
        &self,
        request: Request<v1::GetNamespaceSettingsRequest>,
    ) -> Result<Response<v1::NamespaceSettings>, Status> {
        let r = request.into_inner();
        let namespace = namespace_field(&r.namespace)?;
        Ok(Response::new(self.namespace_settings(namespace).await?))
    }

    async fn get_queue_settings(
        &self,
        request: Request<v1::GetQueueSettingsRequest>,
    ) -> Result<Response<v1::QueueSettings>, Status> {
        let r = request.into_inner();
        let (namespace, queue) = lane_fields(&r.namespace, &r.queue, DEFAULT_QUEUE)?;
        let lane = self.ctx.store.lane_settings(&namespace, &queue).await?;
        Ok(Response::new(lane_to_proto(lane)))
    }

    async fn pause_queue(
        &self,
        request: Request<v1::PauseQueueRequest>,
    ) -> Result<Response<v1::QueueSettings>, Status> {
        let r = request.into_inner();
        let (namespace, queue) = lane_fields(&r.namespace, &r.queue, "")?;
        let lane = self
            .ctx
            .store
            .set_queue_paused(&namespace, &queue, true)
            .await?;
        Ok(Response::new(lane_to_proto(lane)))
    }

    async fn resume_queue(
        &self,
        request: Request<v1::ResumeQueueRequest>,
    ) -> Result<Response<v1::QueueSettings>, Status> {
        let r = request.into_inner();
        let (namespace, queue) = lane_fields(&r.namespace, &r.queue, "")?;
        let lane = self
            .ctx
            .store
            .set_queue_paused(&namespace, &queue, false)
            .await?;
        Ok(Response::new(lane_to_proto(lane)))
    }
}

/// The most a namespace's tasks-per-key limit may be.
const MAX_TASKS_PER_KEY: i32 = 1_000_000;

/// The most a queue's in-flight limit may be.
const MAX_IN_FLIGHT: i32 = 1_000_000;

/// The lane a request names, both fields checked (every bad one reported); an empty queue is
/// `empty_means`.
fn lane_fields(
    namespace: &str,
    queue: &str,
    empty_means: &str,
) -> Result<(String, String), Status> {
    let mut bad = Violations::default();
    bad.check(namespace_field(namespace));
    if !queue.is_empty() {
        if let Some(p) = queue_name_problem(queue) {
            bad.check::<()>(Err(invalid("queue", p)));
        }
    }
    bad.into_result()?;
    let queue = if queue.is_empty() { empty_means } else { queue };
    Ok((namespace.to_string(), queue.to_string()))
}

fn lane_to_proto(l: LaneSettings) -> v1::QueueSettings {
    v1::QueueSettings {
        namespace: l.namespace,
        queue: l.queue,
        max_in_flight: l.max_in_flight,
        paused: l.paused,
        namespace_paused: l.namespace_paused,
        in_flight: l.in_flight,
        queued: l.queued,
        held: l.held,
    }
}

fn namespace_to_proto(
    (namespace, created_at): (String, chrono::DateTime<chrono::Utc>),
) -> v1::Namespace {
    v1::Namespace {
        namespace,
        created_at: Some(proto::timestamp(created_at)),
    }
}

/// The namespace a request names, checked against the name rule.
fn namespace_field(namespace: &str) -> Result<&str, Status> {
    match crate::model::namespaces::namespace_name_problem(namespace) {
        Some(p) => Err(invalid("namespace", p)),
        None => Ok(namespace),
    }
}

fn source_to_proto(s: ModeSource) -> v1::DeploymentModeSource {
    match s {
        ModeSource::Replica => v1::DeploymentModeSource::Replica,
        ModeSource::Fleet => v1::DeploymentModeSource::Fleet,
        ModeSource::Config => v1::DeploymentModeSource::Config,
    }
}
