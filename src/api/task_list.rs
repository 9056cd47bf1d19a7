//! ListTasks' request: its filters checked and turned into a [`TaskListQuery`], and its page
//! tokens.
//!
//! Pages are keyed, not counted: a token names the last task of the page (creation time and
//! uuid, which never change) and the filters it was issued for, so the next page starts right
//! after that task whatever was created, completed or cancelled meanwhile. A token used with
//! other filters or another order is refused instead of paging something else.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tonic::Status;
use uuid::Uuid;

use super::convert::enum_filter;
use super::error::{invalid, Violations};
use crate::model::namespaces::namespace_name_problem;
use crate::model::states::TaskState;
use crate::proto::{v1, Vocabulary};
use crate::store::TaskListQuery;

/// Tasks per page unless asked for another number, and the most a page may ask for.
pub const DEFAULT_PAGE_SIZE: i32 = 100;
pub const MAX_PAGE_SIZE: i32 = 1000;

/// Tokens start with this, so that they are recognisable (and versioned) without promising
/// their form.
const TOKEN_PREFIX: &str = "tasks-v1.";

/// A checked ListTasks request: the query for its page (one task more than the page, to know
/// whether another follows) and the fingerprint of its filters, for the next token.
pub struct TaskListRequest {
    pub query: TaskListQuery,
    pub page_size: usize,
    fingerprint: String,
}

impl TaskListRequest {
    /// Check every field; every broken rule is reported at once, each naming its field (the
    /// page token is judged only with valid filters, which it must match).
    pub fn parse(r: v1::ListTasksRequest) -> Result<Self, Status> {
        let mut bad = Violations::default();
        // a failed check's value stands in with its default; the request is refused below
        let page_size = bad
            .check(match r.page_size {
                0 => Ok(DEFAULT_PAGE_SIZE),
                n if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
                n => Err(invalid(
                    "page_size",
                    format!("must be between 0 and {MAX_PAGE_SIZE}, is {n}"),
                )),
            })
            .unwrap_or_default();
        if let Some(problem) = (!r.namespace.is_empty())
            .then(|| namespace_name_problem(&r.namespace))
            .flatten()
        {
            bad.check::<()>(Err(invalid("namespace", problem)));
        }
        let mut states: Vec<TaskState> = bad
            .check(enum_filter::<v1::TaskState>("states", &r.states))
            .unwrap_or_default()
            .into_iter()
            .map(|v| {
                v.word()
                    .parse()
                    .expect("the API's task states are the database's (model::states tests)")
            })
            .collect();
        bad.check(super::convert::text(
            "name",
            &r.name,
            crate::model::limits::MAX_NAME_BYTES,
            false,
        ));
        let mut time = |field: &str, t| bad.check(time(field, t)).flatten();
        let created_after = time("created_after", r.created_after);
        let created_before = time("created_before", r.created_before);
        let updated_after = time("updated_after", r.updated_after);
        let updated_before = time("updated_before", r.updated_before);
        bad.check(range(
            "created_after",
            created_after,
            "created_before",
            created_before,
        ));
        bad.check(range(
            "updated_after",
            updated_after,
            "updated_before",
            updated_before,
        ));
        let order = bad
            .check(
                v1::TaskOrder::try_from(r.order)
                    .map_err(|_| invalid("order", format!("{} is not a TaskOrder", r.order))),
            )
            .unwrap_or_default();
        bad.into_result()?;
        let newest_first = order != v1::TaskOrder::OldestFirst;
        // by word, so that page tokens handed out by earlier builds stay valid
        states.sort_by_key(|s| s.as_str());
        states.dedup();
        let words: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let (words, created_after_s, created_before_s, updated_after_s, updated_before_s) = (
            words.join(","),
            stamp(created_after),
            stamp(created_before),
            stamp(updated_after),
            stamp(updated_before),
        );
        let mut filters: Vec<&str> = vec![
            &r.namespace,
            &words,
            &r.name,
            &created_after_s,
            &created_before_s,
            &updated_after_s,
            &updated_before_s,
            if newest_first { "newest" } else { "oldest" },
        ];
        // only when set: the tokens handed out before the filter existed stay valid
        if r.scheduled {
            filters.push("scheduled");
        }
        let fingerprint = fingerprint(&filters);
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(parse_token(&r.page_token, &fingerprint)?)
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Ok(Self {
            query: TaskListQuery {
                namespace: non_empty(r.namespace),
                states,
                name: non_empty(r.name),
                created_after,
                created_before,
                updated_after,
                updated_before,
                newest_first,
                scheduled: r.scheduled,
                after,
                limit: i64::from(page_size) + 1,
            },
            page_size: page_size as usize,
            fingerprint,
        })
    }

    /// The token of the page after the one ending with the task created at `created_at`.
    pub fn next_token(&self, created_at: DateTime<Utc>, task_uuid: Uuid) -> String {
        format!(
            "{TOKEN_PREFIX}{}.{task_uuid}.{}",
            created_at.timestamp_micros(),
            self.fingerprint
        )
    }
}

fn time(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Status> {
    t.map(|t| crate::proto::datetime(&t).ok_or_else(|| invalid(field, "is not a valid timestamp")))
        .transpose()
}

fn range(
    from_field: &str,
    from: Option<DateTime<Utc>>,
    to_field: &str,
    to: Option<DateTime<Utc>>,
) -> Result<(), Status> {
    match (from, to) {
        (Some(a), Some(b)) if a >= b => Err(invalid(
            to_field,
            format!("must be later than {from_field}"),
        )),
        _ => Ok(()),
    }
}

fn stamp(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.timestamp_micros().to_string())
        .unwrap_or_default()
}

/// 16 hex digits of a hash of the filters: enough to tell a token from another request's.
pub(super) fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_token(token: &str, fingerprint: &str) -> Result<(DateTime<Utc>, Uuid), Status> {
    let refused = || {
        invalid(
            "page_token",
            "is not a next_page_token this server returned",
        )
    };
    let mut parts = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(refused)?
        .split('.');
    let (Some(micros), Some(uuid), Some(issued_for), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused());
    };
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(refused)?;
    let task_uuid = uuid.parse::<Uuid>().map_err(|_| refused())?;
    if issued_for != fingerprint {
        return Err(invalid(
            "page_token",
            "was issued for other filters or another order: send the same ones to page on",
        ));
    }
    Ok((created_at, task_uuid))
}
