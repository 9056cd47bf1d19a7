//! `ctl namespace create | delete | list | key-limit | retention`.

use serde_json::{json, Value};
use tasker::proto::v1;

use super::output::{duration_text, parse_duration, print_value, ts};
use super::{Ctl, CtlError};

/// `namespace create`: an admin creates a namespace (needed when the service does not create them on first use).
pub(super) async fn create(ctl: &Ctl, namespace: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::admin_service_client::AdminServiceClient::new(svc)
        .create_namespace(v1::CreateNamespaceRequest { namespace })
        .await?
        .into_inner();
    let mut out = r.namespace.map(namespace_json).unwrap_or(Value::Null);
    out["created"] = Value::Bool(r.created);
    print(out);
    Ok(())
}

/// `namespace delete`: an empty namespace goes.
pub(super) async fn delete(ctl: &Ctl, namespace: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    v1::admin_service_client::AdminServiceClient::new(svc)
        .delete_namespace(v1::DeleteNamespaceRequest {
            namespace: namespace.clone(),
        })
        .await?;
    print(json!({ "namespace": namespace, "deleted": true }));
    Ok(())
}

/// `namespace list`: every namespace, oldest first.
pub(super) async fn list(ctl: &Ctl) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::admin_service_client::AdminServiceClient::new(svc)
        .list_namespaces(v1::ListNamespacesRequest {})
        .await?
        .into_inner();
    print(Value::Array(
        r.namespaces.into_iter().map(namespace_json).collect(),
    ));
    Ok(())
}

fn namespace_json(n: v1::Namespace) -> Value {
    json!({ "namespace": n.namespace, "created_at": ts(n.created_at) })
}

/// `namespace key-limit <namespace> [N | --none]`: set (or with neither, show) the most tasks
/// with the same concurrency key in progress at once.
pub(super) async fn key_limit(
    ctl: &Ctl,
    namespace: String,
    max_tasks_per_key: Option<i32>,
    none: bool,
) -> Result<(), CtlError> {
    let mut admin = v1::admin_service_client::AdminServiceClient::new(ctl.svc.clone());
    let r = if max_tasks_per_key.is_some() || none {
        admin
            .set_namespace_settings(v1::SetNamespaceSettingsRequest {
                namespace,
                max_tasks_per_key,
                update_mask: Some(mask(&["max_tasks_per_key"])),
                ..Default::default()
            })
            .await?
    } else {
        admin
            .get_namespace_settings(v1::GetNamespaceSettingsRequest { namespace })
            .await?
    }
    .into_inner();
    print_value(&settings_json(r), ctl.out);
    Ok(())
}

/// `namespace retention <namespace> [--retention D|default] [--error-retention D|default]`:
/// set either or both (the other stays), or with neither show them.
pub(super) async fn retention(
    ctl: &Ctl,
    namespace: String,
    retention: Option<String>,
    error_retention: Option<String>,
) -> Result<(), CtlError> {
    // a duration, or `default`: the field absent, so the fleet's default applies
    let period = |flag: &str, v: &str| -> Result<Option<prost_types::Duration>, CtlError> {
        if v == "default" {
            return Ok(None);
        }
        let d = parse_duration(flag, v)?;
        Ok(Some(prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }))
    };
    let mut admin = v1::admin_service_client::AdminServiceClient::new(ctl.svc.clone());
    let r = if retention.is_some() || error_retention.is_some() {
        let mut paths = Vec::new();
        let mut request = v1::SetNamespaceSettingsRequest {
            namespace,
            ..Default::default()
        };
        if let Some(v) = &retention {
            request.retention = period("--retention", v)?;
            paths.push("retention");
        }
        if let Some(v) = &error_retention {
            request.error_retention = period("--error-retention", v)?;
            paths.push("error_retention");
        }
        request.update_mask = Some(mask(&paths));
        admin.set_namespace_settings(request).await?
    } else {
        admin
            .get_namespace_settings(v1::GetNamespaceSettingsRequest { namespace })
            .await?
    }
    .into_inner();
    print_value(&settings_json(r), ctl.out);
    Ok(())
}

fn mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// A namespace's settings: its own (null: the fleet's default) and those that apply.
fn settings_json(r: v1::NamespaceSettings) -> Value {
    json!({
        "namespace": r.namespace,
        "max_tasks_per_key": r.max_tasks_per_key,
        "tasks_waiting_on_keys": r.tasks_waiting_on_keys,
        "retention": duration_text(r.retention),
        "error_retention": duration_text(r.error_retention),
        "effective_retention": duration_text(r.effective_retention),
        "effective_error_retention": duration_text(r.effective_error_retention),
    })
}
