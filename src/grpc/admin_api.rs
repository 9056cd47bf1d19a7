//! `tasker.v1.AdminService`: the deployment mode (read and switch at run time) and status.

use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::convert::{mode_from_proto, mode_to_proto};
use crate::events::ListenerState;
use crate::proto::{self, v1};

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
        Ok(Response::new(v1::GetDeploymentModeResponse {
            mode: mode_to_proto(self.ctx.coordinator.mode()) as i32,
        }))
    }

    async fn set_deployment_mode(
        &self,
        request: Request<v1::SetDeploymentModeRequest>,
    ) -> Result<Response<v1::SetDeploymentModeResponse>, Status> {
        let mode = mode_from_proto("mode", request.get_ref().mode)?;
        let previous = self.ctx.coordinator.set_mode(mode);
        Ok(Response::new(v1::SetDeploymentModeResponse {
            previous: mode_to_proto(previous) as i32,
            current: mode_to_proto(mode) as i32,
        }))
    }

    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        let status = self.ctx.coordinator.status();
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
            replica_id: self.ctx.fleet.replica_id().to_string(),
            replicas,
        }))
    }
}
