//! `tasker.v1.AdminService`: the deployment mode (read, and switch at run time for this replica
//! or the fleet) and status (this replica and the fleet).

use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::convert::{mode_from_proto, mode_to_proto};
use super::error::invalid;
use crate::config::DeploymentMode;
use crate::proto::{self, v1};
use crate::readiness::mode::ModeSource;
use crate::readiness::ListenerState;

pub struct AdminApi {
    ctx: ApiContext,
}

impl AdminApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
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
