//! Request fields parsed with errors naming the field, and the deployment mode between its
//! protobuf and domain forms. (JSON <-> `Struct` and time conversions are in `crate::proto`,
//! where clients can use them too.)

use serde_json::Value;
use tonic::Status;
use uuid::Uuid;

use super::error::{invalid, Violations};
use crate::config::DeploymentMode;
use crate::proto::{v1, Vocabulary};

pub fn uuid(field: &str, s: &str) -> Result<Uuid, Status> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    Uuid::parse_str(s).map_err(|_| invalid(field, format!("{s:?} is not a UUID")))
}

impl From<DeploymentMode> for v1::DeploymentMode {
    fn from(m: DeploymentMode) -> Self {
        match m {
            DeploymentMode::EventDrivenOnly => Self::EventDrivenOnly,
            DeploymentMode::Hybrid => Self::Hybrid,
            DeploymentMode::PollingOnly => Self::PollingOnly,
        }
    }
}

pub fn mode_to_proto(m: DeploymentMode) -> v1::DeploymentMode {
    m.into()
}

pub fn mode_from_proto(field: &str, raw: i32) -> Result<DeploymentMode, Status> {
    match v1::DeploymentMode::try_from(raw) {
        Ok(v1::DeploymentMode::EventDrivenOnly) => Ok(DeploymentMode::EventDrivenOnly),
        Ok(v1::DeploymentMode::Hybrid) => Ok(DeploymentMode::Hybrid),
        Ok(v1::DeploymentMode::PollingOnly) => Ok(DeploymentMode::PollingOnly),
        _ => Err(invalid(
            field,
            format!("unknown deployment mode {raw}; expected DEPLOYMENT_MODE_EVENT_DRIVEN_ONLY, DEPLOYMENT_MODE_HYBRID or DEPLOYMENT_MODE_POLLING_ONLY"),
        )),
    }
}

/// A repeated enum field used as a filter: every entry a value this build knows, none the zero
/// value (`*_UNSPECIFIED` asks for nothing). Every bad entry is reported.
pub fn enum_filter<E>(field: &str, raw: &[i32]) -> Result<Vec<E>, Status>
where
    E: Vocabulary + TryFrom<i32>,
{
    let mut bad = Violations::default();
    let values = raw
        .iter()
        .enumerate()
        .filter_map(|(i, &n)| {
            bad.check(match E::try_from(n) {
                Ok(e) if n != 0 => Ok(e),
                Ok(e) => Err(invalid(
                    &format!("{field}[{i}]"),
                    format!("must not be {}", e.name()),
                )),
                Err(_) => Err(invalid(
                    &format!("{field}[{i}]"),
                    format!("{n} is not a {}", E::TYPE),
                )),
            })
        })
        .collect();
    bad.into_result().map(|()| values)
}

/// An integer field within bounds, with `0` meaning `default`.
pub fn bounded(field: &str, value: i64, default: i64, min: i64, max: i64) -> Result<i64, Status> {
    let v = if value == 0 { default } else { value };
    if v < min || v > max {
        return Err(invalid(
            field,
            format!("must be between {min} and {max}, is {value}"),
        ));
    }
    Ok(v)
}

/// A document a client sent, within the rules of [`crate::model::limits::document_problem`].
pub fn document(field: &str, doc: Value) -> Result<Value, Status> {
    match crate::model::limits::document_problem(&doc) {
        Some(problem) => Err(invalid(field, problem)),
        None => Ok(doc),
    }
}

/// Free text a client sent (a reason, an error message): at most `max_bytes`, no NUL; with
/// `required`, not blank.
pub fn text<'a>(
    field: &str,
    value: &'a str,
    max_bytes: usize,
    required: bool,
) -> Result<&'a str, Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, format!("must be 1 to {max_bytes} bytes")));
    }
    if value.len() > max_bytes {
        return Err(invalid(
            field,
            format!("must be at most {max_bytes} bytes, is {}", value.len()),
        ));
    }
    if let Some(problem) = crate::model::limits::text_problem(value) {
        return Err(invalid(field, problem));
    }
    Ok(value)
}

/// Bytes a message adds to a response as one entry of a repeated field: its encoding plus the
/// entry's tag and length prefix (at most 1 + 5 bytes). What the response budgets count.
pub fn repeated_entry_len(message: &impl prost::Message) -> usize {
    message.encoded_len() + 6
}
