//! Step DAGs: validating a requested task before anything is written, and building the common
//! shapes (chain, diamond, fan-out/fan-in) that tests and the benchmark use.
//!
//! Validation reports every violation at once, each with the field it concerns, so a client
//! can fix a request in one go. The database re-checks what it can (unique names, same-task
//! edges, no cycles), but a request that fails here writes nothing.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::model::namespaces::{namespace_name_problem, queue_name_problem, DEFAULT_QUEUE};
use crate::model::retry::RetryPolicy;

pub(crate) use crate::model::limits;

/// A requested step, before uuids are assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSpec {
    pub name: String,
    pub depends_on: Vec<String>,
    /// 0 means the default.
    pub max_attempts: i32,
    pub retryable: bool,
    pub inputs: Value,
    /// The step's queue; empty: the default queue.
    pub queue: String,
    /// Its backoff between attempts; `None`: the task's.
    pub retry: Option<RetryPolicy>,
    /// An attempt's execution limit in milliseconds; `None`: none.
    pub timeout_ms: Option<i64>,
    /// How long it may wait for a worker once queued, in milliseconds; `None`: no limit.
    pub schedule_to_start_ms: Option<i64>,
}

impl StepSpec {
    pub fn new(name: impl Into<String>, depends_on: &[&str]) -> Self {
        Self {
            name: name.into(),
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
            max_attempts: 0,
            retryable: true,
            inputs: Value::Object(Default::default()),
            queue: String::new(),
            retry: None,
            timeout_ms: None,
            schedule_to_start_ms: None,
        }
    }

    /// The queue whose workers run it.
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = queue.to_string();
        self
    }

    /// The queue it goes to: the default one when none is named.
    pub fn queue_or_default(&self) -> &str {
        if self.queue.is_empty() {
            DEFAULT_QUEUE
        } else {
            &self.queue
        }
    }

    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }
}

/// A requested task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    pub context: Value,
    pub idempotency_key: Option<String>,
    pub steps: Vec<StepSpec>,
    /// At most the namespace's `max_tasks_per_key` tasks with the same key run at once.
    pub concurrency_key: Option<String>,
    /// The retry policy of the steps that declare none.
    pub retry: Option<RetryPolicy>,
    /// When its first steps become ready; `None` (or a time not in the future): at once.
    pub start_at: Option<DateTime<Utc>>,
}

/// One rule a request breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl TaskSpec {
    /// A digest of what the request asks for (name, priority, context and each step with its
    /// dependencies, inputs and attempts), independent of the order of steps, of
    /// dependencies and of object keys. A CreateTask that repeats an idempotency key must
    /// repeat the request, which this compares.
    pub fn request_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                let mut deps = s.depends_on.clone();
                deps.sort();
                let mut step = serde_json::json!({
                    "name": s.name,
                    "depends_on": deps,
                    "max_attempts": s.max_attempts,
                    "retryable": s.retryable,
                    "inputs": canonical(&s.inputs),
                });
                // only when named: the digests of tasks from before queues stay what they were
                if s.queue_or_default() != DEFAULT_QUEUE {
                    step["queue"] = Value::String(s.queue.clone());
                }
                if let Some(r) = &s.retry {
                    step["retry"] = serde_json::json!(r);
                }
                if let Some(t) = s.timeout_ms {
                    step["timeout_ms"] = serde_json::json!(t);
                }
                if let Some(t) = s.schedule_to_start_ms {
                    step["schedule_to_start_ms"] = serde_json::json!(t);
                }
                step
            })
            .collect();
        steps.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut doc = serde_json::json!({
            "name": self.name,
            "priority": self.priority,
            "context": canonical(&self.context),
            "steps": steps,
        });
        // only when given: the digests of tasks from before keys stay what they were
        if let Some(key) = &self.concurrency_key {
            doc["concurrency_key"] = Value::String(key.clone());
        }
        if let Some(r) = &self.retry {
            doc["retry"] = serde_json::json!(r);
        }
        if let Some(at) = &self.start_at {
            doc["start_at"] =
                Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        }
        let hash = Sha256::digest(canonical(&doc).to_string().as_bytes());
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        steps: Vec<StepSpec>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            priority: 0,
            context: Value::Object(Default::default()),
            idempotency_key: None,
            steps,
            concurrency_key: None,
            retry: None,
            start_at: None,
        }
    }

    /// The start time's rule, which needs the clock and the configured horizon (so it is not
    /// part of [`validate`](Self::validate)): at most `horizon` after `now`.
    pub fn start_problem(
        &self,
        now: DateTime<Utc>,
        horizon: std::time::Duration,
    ) -> Option<Violation> {
        let at = self.start_at?;
        let latest = now + chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
        (at > latest).then(|| Violation {
            field: "start_at".into(),
            message: format!(
                "must be at most {} days ahead (orchestration.scheduling.max_start_delay_days), is {at}",
                horizon.as_secs() / 86_400
            ),
        })
    }

    /// `n` steps, each depending on the one before.
    pub fn chain(namespace: &str, n: usize) -> Self {
        let steps = (0..n)
            .map(|i| {
                let deps = if i == 0 {
                    vec![]
                } else {
                    vec![format!("s{}", i - 1)]
                };
                StepSpec {
                    depends_on: deps,
                    ..StepSpec::new(format!("s{i}"), &[])
                }
            })
            .collect();
        Self::new(namespace, format!("chain-{n}"), steps)
    }

    /// a -> (b, c) -> d
    pub fn diamond(namespace: &str) -> Self {
        Self::new(
            namespace,
            "diamond",
            vec![
                StepSpec::new("a", &[]),
                StepSpec::new("b", &["a"]),
                StepSpec::new("c", &["a"]),
                StepSpec::new("d", &["b", "c"]),
            ],
        )
    }

    /// root -> `width` parallel steps -> join
    pub fn fan(namespace: &str, width: usize) -> Self {
        let mut steps = vec![StepSpec::new("root", &[])];
        for i in 0..width {
            steps.push(StepSpec::new(format!("leaf{i}"), &["root"]));
        }
        let leaves: Vec<String> = (0..width).map(|i| format!("leaf{i}")).collect();
        steps.push(StepSpec {
            depends_on: leaves,
            ..StepSpec::new("join", &[])
        });
        Self::new(namespace, format!("fan-{width}"), steps)
    }

    /// Every violation of the rules, empty when the request is acceptable.
    pub fn validate(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        let mut push = |field: String, message: String| v.push(Violation { field, message });
        if let Some(p) = namespace_name_problem(&self.namespace) {
            push("namespace".into(), p);
        }
        check_name(&self.name, "name", &mut push);
        if !(limits::MIN_PRIORITY..=limits::MAX_PRIORITY).contains(&self.priority) {
            push(
                "priority".into(),
                format!(
                    "must be between {} and {}, is {}",
                    limits::MIN_PRIORITY,
                    limits::MAX_PRIORITY,
                    self.priority
                ),
            );
        }
        check_document(&self.context, "context", &mut push);
        if let Some(key) = &self.concurrency_key {
            check_name(key, "concurrency_key", &mut push);
        }
        if let Some(r) = &self.retry {
            for (field, message) in r.problems("retry") {
                push(field, message);
            }
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > limits::MAX_IDEMPOTENCY_KEY_BYTES {
                push(
                    "idempotency_key".into(),
                    format!("must be 1 to {} bytes", limits::MAX_IDEMPOTENCY_KEY_BYTES),
                );
            } else if let Some(p) = limits::text_problem(key) {
                push("idempotency_key".into(), p);
            }
        }
        if self.steps.is_empty() {
            push("steps".into(), "a task needs at least one step".into());
        }
        if self.steps.len() > limits::MAX_STEPS {
            push(
                "steps".into(),
                format!(
                    "at most {} steps, got {}",
                    limits::MAX_STEPS,
                    self.steps.len()
                ),
            );
            return v; // per-step checks on a huge request only produce noise
        }
        let mut seen = HashSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            check_name(&s.name, &format!("steps[{i}].name"), &mut push);
            if !s.name.is_empty() && !seen.insert(s.name.as_str()) {
                push(
                    format!("steps[{i}].name"),
                    format!(
                        "duplicate step name {:?}: names must be unique within a task",
                        s.name
                    ),
                );
            }
            if s.max_attempts < 0 || s.max_attempts > limits::MAX_ATTEMPTS {
                push(
                    format!("steps[{i}].max_attempts"),
                    format!(
                        "must be between 1 and {} (0 for the default), is {}",
                        limits::MAX_ATTEMPTS,
                        s.max_attempts
                    ),
                );
            }
            check_document(&s.inputs, &format!("steps[{i}].inputs"), &mut push);
            if let Some(r) = &s.retry {
                for (field, message) in r.problems(&format!("steps[{i}].retry")) {
                    push(field, message);
                }
            }
            for (field, value) in [
                ("timeout", s.timeout_ms),
                ("schedule_to_start", s.schedule_to_start_ms),
            ] {
                if let Some(t) = value.filter(|t| !(1..=limits::MAX_STEP_TIMEOUT_MS).contains(t)) {
                    push(
                        format!("steps[{i}].{field}"),
                        format!(
                            "must be more than 0 and at most {} days, is {t} ms",
                            limits::MAX_STEP_TIMEOUT_MS / 86_400_000
                        ),
                    );
                }
            }
            if !s.queue.is_empty() {
                if let Some(p) = queue_name_problem(&s.queue) {
                    push(format!("steps[{i}].queue"), p);
                }
            }
            if s.depends_on.len() > limits::MAX_DEPENDENCIES_PER_STEP {
                push(
                    format!("steps[{i}].depends_on"),
                    format!("at most {} dependencies", limits::MAX_DEPENDENCIES_PER_STEP),
                );
            }
        }
        let names: HashSet<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        for (i, s) in self.steps.iter().enumerate() {
            let mut deps = HashSet::new();
            for d in &s.depends_on {
                if d == &s.name {
                    push(
                        format!("steps[{i}].depends_on"),
                        format!("step {:?} depends on itself", s.name),
                    );
                } else if !names.contains(d.as_str()) {
                    push(
                        format!("steps[{i}].depends_on"),
                        format!("unknown dependency {d:?}"),
                    );
                } else if !deps.insert(d.as_str()) {
                    push(
                        format!("steps[{i}].depends_on"),
                        format!("dependency {d:?} listed twice"),
                    );
                }
            }
        }
        let edges: usize = self.steps.iter().map(|s| s.depends_on.len()).sum();
        if edges > limits::MAX_EDGES {
            push(
                "steps".into(),
                format!(
                    "at most {} dependencies in all the steps together, got {edges}",
                    limits::MAX_EDGES
                ),
            );
        }
        if let Err(cycle) = self.topological_order() {
            push(
                "steps".into(),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            );
        }
        v
    }

    /// The steps' indices in an order where every step comes after all its parents (Kahn's
    /// algorithm), or a cycle among them, as step names (a walk through what is left).
    /// Dependencies on unknown names are ignored here (`validate` reports them).
    fn topological_order(&self) -> Result<Vec<usize>, Vec<String>> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let n = self.steps.len();
        let mut indegree = vec![0usize; n];
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, s) in self.steps.iter().enumerate() {
            for d in &s.depends_on {
                if let Some(&p) = index.get(d.as_str()) {
                    if p != i {
                        children[p].push(i);
                        indegree[i] += 1;
                    }
                }
            }
        }
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = queue.pop_front() {
            order.push(i);
            for &c in &children[i] {
                indegree[c] -= 1;
                if indegree[c] == 0 {
                    queue.push_back(c);
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Every remaining node has a remaining parent: walk parents until one repeats.
        let start = (0..n)
            .find(|&i| indegree[i] > 0)
            .expect("a node is left when the order is short");
        let mut path = vec![start];
        let mut on_path: HashMap<usize, usize> = HashMap::from([(start, 0)]);
        let mut cur = start;
        loop {
            let parent = self.steps[cur]
                .depends_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .find(|&p| indegree[p] > 0 && p != cur)
                .expect("every node left has a parent left");
            if let Some(&pos) = on_path.get(&parent) {
                let mut cycle: Vec<String> = path[pos..]
                    .iter()
                    .rev()
                    .map(|&i| self.steps[i].name.clone())
                    .collect();
                cycle.push(cycle[0].clone());
                return Err(cycle);
            }
            on_path.insert(parent, path.len());
            path.push(parent);
            cur = parent;
        }
    }

    /// Validate, then assign uuids (v7: time-ordered, index friendly), positions in a
    /// topological order, and each step's parents by uuid.
    pub fn into_new_task(self) -> Result<NewTask, Vec<Violation>> {
        let violations = self.validate();
        if !violations.is_empty() {
            return Err(violations);
        }
        let order = self.topological_order().expect("validate found no cycle");
        let mut position = vec![0i32; self.steps.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos as i32;
        }
        let uuids: HashMap<&str, Uuid> = self
            .steps
            .iter()
            .map(|s| (s.name.as_str(), Uuid::now_v7()))
            .collect();
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| NewStep {
                step_uuid: uuids[s.name.as_str()],
                name: s.name.clone(),
                position: position[i],
                parents: s.depends_on.iter().map(|d| uuids[d.as_str()]).collect(),
                max_attempts: if s.max_attempts == 0 {
                    limits::DEFAULT_MAX_ATTEMPTS
                } else {
                    s.max_attempts
                },
                retryable: s.retryable,
                inputs_bytes: sent_bytes(&s.inputs),
                inputs: s.inputs.clone(),
                queue: s.queue_or_default().to_string(),
                retry: s.retry.or(self.retry),
                timeout_ms: s.timeout_ms.map(|t| t as i32),
                schedule_to_start_ms: s.schedule_to_start_ms.map(|t| t as i32),
            })
            .collect();
        Ok(NewTask {
            task_uuid: Uuid::now_v7(),
            namespace: self.namespace,
            name: self.name,
            priority: self.priority,
            context_bytes: sent_bytes(&self.context),
            context: self.context,
            idempotency_key: self.idempotency_key,
            concurrency_key: self.concurrency_key,
            start_at: self.start_at,
            steps,
        })
    }
}

/// Bytes a document takes as sent (what a response budget counts).
fn sent_bytes(doc: &Value) -> i32 {
    i32::try_from(crate::proto::struct_encoded_len(doc)).unwrap_or(i32::MAX)
}

fn check_name(name: &str, field: &str, push: &mut impl FnMut(String, String)) {
    if let Some(problem) = name_problem(name) {
        push(field.into(), problem);
    }
}

/// Why a task, step or worker name is not acceptable, or `None`. Names reach terminals,
/// logs and dashboards: control characters (terminal escapes) and the Unicode bidirectional
/// controls (which make text display in another order than it reads, as in U+202E) are
/// refused.
pub fn name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        Some("must not be empty".into())
    } else if name.len() > limits::MAX_NAME_BYTES {
        Some(format!(
            "must be at most {} bytes, is {}",
            limits::MAX_NAME_BYTES,
            name.len()
        ))
    } else {
        name.chars()
            .find(|&c| c.is_control() || limits::is_bidi_control(c))
            .map(|c| {
                format!(
                    "must not contain control or bidirectional-formatting characters (found U+{:04X})",
                    c as u32
                )
            })
    }
}

fn check_document(doc: &Value, field: &str, push: &mut impl FnMut(String, String)) {
    if let Some(problem) = limits::document_problem(doc) {
        push(field.into(), problem);
    }
}

/// A task to create. Validation of the DAG's shape happens before this (see `TaskSpec::into_new_task`);
/// the database re-checks what it can.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    pub context: Value,
    /// The context's size as sent (a response budget counts it before reading the context).
    pub context_bytes: i32,
    pub idempotency_key: Option<String>,
    pub concurrency_key: Option<String>,
    /// When its first steps become ready (`None`: at once).
    pub start_at: Option<DateTime<Utc>>,
    pub steps: Vec<NewStep>,
}

/// A step to create, as `tasker.create_task` takes it: parents already resolved to uuids,
/// `position` a topological order of the task (every parent lower than its children).
#[derive(Debug, Clone, Serialize)]
pub struct NewStep {
    pub step_uuid: Uuid,
    pub name: String,
    pub position: i32,
    pub parents: Vec<Uuid>,
    pub max_attempts: i32,
    pub retryable: bool,
    pub inputs: Value,
    /// The inputs' size as sent.
    pub inputs_bytes: i32,
    pub queue: String,
    /// Its own retry policy, else the task's; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// An attempt's execution limit; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i32>,
    /// How long it may wait for a worker once queued; absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_to_start_ms: Option<i32>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_request_digest_ignores_order_and_sees_content() {
        let mut a = TaskSpec::diamond("ns");
        a.context = serde_json::json!({"x": 1, "y": {"b": 2, "a": 1}});
        let mut b = a.clone();
        b.steps.reverse();
        b.context = serde_json::json!({"y": {"a": 1, "b": 2}, "x": 1});
        assert_eq!(a.request_digest(), b.request_digest());
        let mut c = a.clone();
        c.steps[1].inputs = serde_json::json!({"k": "v"});
        assert_ne!(a.request_digest(), c.request_digest());
        let mut d = a.clone();
        d.priority += 1;
        assert_ne!(a.request_digest(), d.request_digest());
    }

    use super::*;

    fn fields(spec: &TaskSpec) -> Vec<String> {
        spec.validate().into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn shapes_are_valid() {
        assert!(TaskSpec::chain("ns", 20).validate().is_empty());
        assert!(TaskSpec::diamond("ns").validate().is_empty());
        assert!(TaskSpec::fan("ns", 50).validate().is_empty());
    }

    #[test]
    fn every_violation_is_reported_with_its_field() {
        let spec = TaskSpec::new(
            "Bad Namespace",
            "",
            vec![
                StepSpec::new("a", &["zz"]),
                StepSpec::new("a", &[]),
                StepSpec::new("", &["a", "a"]).max_attempts(-1),
            ],
        );
        let f = fields(&spec);
        for expected in [
            "namespace",
            "name",
            "steps[0].depends_on",
            "steps[1].name",
            "steps[2].name",
            "steps[2].max_attempts",
            "steps[2].depends_on",
        ] {
            assert!(
                f.contains(&expected.to_string()),
                "missing {expected} in {f:?}"
            );
        }
    }

    #[test]
    fn cycles_are_named() {
        let spec = TaskSpec::new(
            "ns",
            "t",
            vec![
                StepSpec::new("a", &["c"]),
                StepSpec::new("b", &["a"]),
                StepSpec::new("c", &["b"]),
                StepSpec::new("d", &[]),
            ],
        );
        let v = spec.validate();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].message.starts_with("dependency cycle: "),
            "{}",
            v[0].message
        );
        for n in ["a", "b", "c"] {
            assert!(v[0].message.contains(n));
        }
        let self_dep = TaskSpec::new("ns", "t", vec![StepSpec::new("a", &["a"])]);
        assert_eq!(fields(&self_dep), vec!["steps[0].depends_on".to_string()]);
    }

    #[test]
    fn limits_are_enforced() {
        let many = TaskSpec::chain("ns", limits::MAX_STEPS + 1);
        assert_eq!(fields(&many), vec!["steps".to_string()]);
        let mut big = TaskSpec::diamond("ns");
        big.steps[0].inputs = serde_json::json!({ "blob": "x".repeat(limits::MAX_DOCUMENT_BYTES) });
        assert_eq!(fields(&big), vec!["steps[0].inputs".to_string()]);
        let mut p = TaskSpec::diamond("ns");
        p.priority = 5000;
        assert_eq!(fields(&p), vec!["priority".to_string()]);
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;

    #[test]
    fn positions_put_every_parent_first() {
        let t = TaskSpec::new(
            "ns",
            "t",
            vec![
                StepSpec::new("d", &["b", "c"]),
                StepSpec::new("c", &["a"]),
                StepSpec::new("b", &["a"]),
                StepSpec::new("a", &[]),
            ],
        )
        .into_new_task()
        .unwrap();
        let pos: HashMap<Uuid, i32> = t.steps.iter().map(|s| (s.step_uuid, s.position)).collect();
        for s in &t.steps {
            for p in &s.parents {
                assert!(pos[p] < s.position, "{} after a parent", s.name);
            }
        }
        let d = t.steps.iter().find(|s| s.name == "d").unwrap();
        assert_eq!(d.parents.len(), 2);
    }

    #[test]
    fn edges_are_capped() {
        // 11 layers of 10, each step depending on the whole layer before: 1,000 edges is fine
        let layered = |width: usize, layers: usize| {
            let mut steps = Vec::new();
            for l in 0..layers {
                for w in 0..width {
                    let deps: Vec<String> = if l == 0 {
                        vec![]
                    } else {
                        (0..width).map(|p| format!("l{}s{p}", l - 1)).collect()
                    };
                    steps.push(StepSpec {
                        depends_on: deps,
                        ..StepSpec::new(format!("l{l}s{w}"), &[])
                    });
                }
            }
            TaskSpec::new("ns", "layered", steps)
        };
        assert!(layered(10, 11).validate().is_empty());
        let too_many = layered(100, 10).validate();
        assert!(
            too_many
                .iter()
                .any(|v| v.field == "steps" && v.message.contains("10000")),
            "{too_many:?}"
        );
    }
}

/// `v` with every object's keys in sorted order, so that its text does not depend on the
/// order a client sent them in.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}
