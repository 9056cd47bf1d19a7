//! The store's error type and the one place where database errors become domain errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The request names a field that breaks a rule; nothing was written.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// A transition the state machine does not allow from the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A worker's report on an attempt that the attempt's state refuses, with the reason the
    /// worker acts on.
    #[error("{message}")]
    Refused {
        refusal: super::steps::Refusal,
        message: String,
    },
    #[error("{0}")]
    AlreadyExists(String),
    /// The request met a concurrent change that undid its premise (a namespace deleted while
    /// a task was created in it): retrying it decides anew.
    #[error("{0}")]
    Aborted(String),
    /// This instance is shutting down: try again (on another instance).
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The database cannot be reached (connection refused, reset, pool timed out).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    /// A database function answered with a value this code does not know: a bug (a schema
    /// newer than the service, or a function changed without its caller).
    #[error("{function} answered {value:?}, which this service does not know")]
    Unexpected {
        function: &'static str,
        value: String,
    },
    /// A limit of the service is reached (the message names it): retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// PostgreSQL cancelled the statement: it ran past `database.statement_timeout_ms`.
    #[error("the database cancelled the statement after database.statement_timeout_ms")]
    StatementTimeout,
    /// Anything else; its details are logged, never sent to a client.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    pub fn unexpected(function: &'static str, value: impl std::fmt::Display) -> Self {
        Self::Unexpected {
            function,
            value: value.to_string(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_connection_error(&e) {
            return Self::Unavailable(e);
        }
        if let Some(db) = e.as_database_error() {
            let message = db.message().to_string();
            match db.code().as_deref() {
                // raised by the state-machine guard triggers
                Some("TK001") => return Self::FailedPrecondition(message),
                Some("TK002") => return Self::invalid("namespace", message),
                Some("TK003") => return Self::invalid("steps", message),
                Some("TK004") => return Self::invalid("steps.depends_on", message),
                Some("TK005") => return Self::ResourceExhausted(message),
                Some("TK006") => {
                    return Self::not_found(format!(
                        "namespace {message:?} (an admin creates namespaces here: database.create_namespaces_on_first_use is off)"
                    ))
                }
                Some("23503") if db.constraint() == Some("tasks_namespace_fkey") => {
                    return Self::Aborted(
                        "the namespace was deleted while the task was being created; retry".into(),
                    )
                }
                Some("23503")
                    if matches!(
                        db.constraint(),
                        Some("step_edges_parent_same_task" | "step_edges_child_same_task")
                    ) =>
                {
                    return Self::invalid(
                        "steps.depends_on",
                        "a dependency is not a step of this task",
                    )
                }
                Some("23505") => {
                    return match db.constraint() {
                        Some("workflow_steps_name_unique") => {
                            Self::invalid("steps.name", "step names must be unique within a task")
                        }
                        Some("tasks_pkey") | Some("workflow_steps_pkey") => {
                            Self::AlreadyExists("an object with this uuid already exists".into())
                        }
                        _ => Self::AlreadyExists("already exists".into()),
                    }
                }
                Some("23514") => {
                    // A row rule of a table (its guard trigger raises it under the rule's
                    // name: a CHECK would be parsed again at every statement); the service
                    // validates every field with a named rule before it writes, so this is
                    // the backstop for writes that bypass it.
                    let field = match db.constraint() {
                        Some("tasks_valid") => "request",
                        Some("tasks_concurrency_key_valid") => "concurrency_key",
                        Some("workflow_steps_valid")
                        | Some("workflow_steps_timeout_valid")
                        | Some("workflow_steps_schedule_to_start_valid") => "steps",
                        Some("namespaces_name_valid") => "namespace",
                        _ => "request",
                    };
                    return Self::invalid(
                        field,
                        format!("violates rule {}", db.constraint().unwrap_or("check")),
                    );
                }
                Some("57014") => return Self::StatementTimeout,
                Some("22P02") | Some("22023") => {
                    return Self::invalid("request", "malformed value")
                }
                _ => {}
            }
        }
        Self::Database(e)
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // admin shutdown, crash shutdown, cannot connect now, connection failures
            Some("57P01")
                | Some("57P02")
                | Some("57P03")
                | Some("08000")
                | Some("08003")
                | Some("08006")
                | Some("08001")
                | Some("08004")
        ),
        _ => false,
    }
}

/// Whether the same operation may succeed if simply tried again: lost connections, a database
/// restarting, serialization failures and deadlocks. Client mistakes and state-machine
/// refusals are final.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    if is_connection_error(e) {
        return true;
    }
    matches!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("40001") | Some("40P01") | Some("55P03")
    )
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::ShuttingDown => true,
            Self::Database(e) => is_retryable(e),
            _ => false,
        }
    }

    /// Whether the connection the statement ran on may be lost or left mid-answer: an error
    /// that did not come from the server as its answer.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Database(e) => e.as_database_error().is_none(),
            _ => false,
        }
    }
}
