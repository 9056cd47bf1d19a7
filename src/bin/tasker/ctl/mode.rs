//! `ctl mode get | set | clear`: the deployment mode, of this replica or of the fleet.

use serde_json::{json, Value};
use tasker::proto::v1;

use super::output::{mode_name, print_value};
use super::{Ctl, CtlError};

/// `mode get`: the mode in effect, where it comes from, and each layer's setting.
pub(super) async fn get(ctl: &Ctl) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
}

/// `mode set MODE [--fleet]`.
pub(super) async fn set(ctl: &Ctl, mode: String, fleet: bool) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
}

/// `mode clear [--fleet]`: back to the layer below.
pub(super) async fn clear(ctl: &Ctl, fleet: bool) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
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
    Ok(())
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
