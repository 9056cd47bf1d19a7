//! The one mapping from internal errors to gRPC status codes. Client mistakes become
//! `INVALID_ARGUMENT` with field violations (google.rpc.BadRequest), the state machine's
//! refusals `FAILED_PRECONDITION`, a saturated processor `RESOURCE_EXHAUSTED`, a lost database
//! `UNAVAILABLE`. Internal details (SQL messages) are logged, never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::model::dag::Violation;
use crate::readiness::commands::SubmitError;
use crate::store::StoreError;

/// The `google.rpc.ErrorInfo.domain` of the reasons this service gives.
pub const ERROR_DOMAIN: &str = "tasker.v1";

/// `INVALID_ARGUMENT` naming one field and the rule it breaks.
pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid {field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// `INVALID_ARGUMENT` listing every violation.
pub fn violations(list: Vec<Violation>) -> Status {
    let summary = list
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let details: Vec<FieldViolation> = list
        .into_iter()
        .map(|v| FieldViolation::new(v.field, v.message))
        .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        summary,
        ErrorDetails::with_bad_request(details),
    )
}

/// The broken rules of one request, gathered so that the caller hears of all of them at once
/// (as CreateTask reports every violation of its DAG), not one per attempt.
#[derive(Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// The value of a check that passed; `None` for one that failed, its violations kept.
    pub fn check<T>(&mut self, checked: Result<T, Status>) -> Option<T> {
        checked
            .map_err(|status| {
                let named = status
                    .get_details_bad_request()
                    .map(|b| b.field_violations)
                    .unwrap_or_default();
                if named.is_empty() {
                    // a check that named no field: keep its message whole
                    self.0.push(Violation {
                        field: String::new(),
                        message: status.message().to_string(),
                    });
                }
                self.0.extend(named.into_iter().map(|v| Violation {
                    field: v.field,
                    message: v.description,
                }));
            })
            .ok()
    }

    /// The violations gathered, to be reported with others.
    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }

    /// `INVALID_ARGUMENT` listing every violation, if there is one (worded as [`invalid`]'s
    /// when it is the only one).
    pub fn into_result(mut self) -> Result<(), Status> {
        match self.0.len() {
            0 => Ok(()),
            1 => {
                let v = self.0.remove(0);
                Err(invalid(&v.field, v.message))
            }
            _ => Err(violations(self.0)),
        }
    }
}

pub fn store(e: StoreError) -> Status {
    match e {
        StoreError::InvalidArgument { field, message } => invalid(&field, message),
        StoreError::NotFound { what } => Status::not_found(format!("{what} not found")),
        StoreError::Aborted(m) => Status::aborted(m),
        StoreError::FailedPrecondition(m) => Status::failed_precondition(m),
        StoreError::Refused { refusal, message } => Status::with_error_details(
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(
                refusal.reason(),
                ERROR_DOMAIN,
                std::collections::HashMap::<String, String>::new(),
            ),
        ),
        StoreError::AlreadyExists(m) => Status::already_exists(m),
        StoreError::ShuttingDown => {
            Status::unavailable("the service is shutting down; retry (on another instance)")
        }
        StoreError::ResourceExhausted(m) => Status::resource_exhausted(m),
        StoreError::StatementTimeout => Status::deadline_exceeded(
            "the database cancelled the request's statement: it ran longer than database.statement_timeout_ms",
        ),
        StoreError::Unavailable(e) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error")
        }
    }
}

pub fn submit(e: SubmitError) -> Status {
    match e {
        SubmitError::Overloaded => Status::resource_exhausted(e.to_string()),
        SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutting_down_is_unavailable_and_sql_text_never_leaks() {
        assert_eq!(store(StoreError::ShuttingDown).code(), Code::Unavailable);
        let internal = store(StoreError::Database(sqlx::Error::Protocol(
            "relation tasker.secret does not exist".into(),
        )));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret"));
        let unexpected = store(StoreError::unexpected("tasker.f", "maybe"));
        assert_eq!(unexpected.code(), Code::Internal);
    }
}
