//! A Tasker worker in Rust, on the crate's client (`tasker::client`).
//!
//! ```sh
//! cargo run --example worker -- --namespace demo                 # until interrupted
//! cargo run --example worker -- --namespace demo --steps 4        # stop after 4 steps
//! cargo run --example worker -- --namespace shop --queue payments  # only the payments steps
//! cargo run --example worker -- --namespace demo --stream        # every call on one Work stream
//! TASKER_TOKEN=... cargo run --example worker -- --endpoint https://tasker.example:50051 --namespace demo
//! ```
//!
//! Each step it leases is "done" by echoing what it was given: its results are
//! `{"step": <name>, "attempt": n, "inputs": ..., "parents": [<parent names>]}`. A step whose
//! inputs say `{"fail": "<message>"}` is failed instead (retryable, 100 ms backoff), which
//! shows the retry path. The client sends each step's lease token with its report, and each
//! completion asks for the worker's next step in the same call (eager dispatch: the step the
//! completion makes ready comes back with its answer, and the worker fetches only when none
//! did). With `--stream` the same calls go as messages on one `WorkerService/Work` stream
//! (`WorkerClient::over_stream`): no call set-up per step. When the service refuses a fetch for now (RESOURCE_EXHAUSTED: too many fetches waiting; UNAVAILABLE:
//! restarting), the worker waits and asks again, longer each time.

use std::time::Duration;

use serde_json::{json, Value};
use tasker::client::{Connect, WorkerClient};

struct Args {
    endpoint: String,
    namespace: String,
    /// The queues it runs (`--queue`, repeatable); none: the default queue.
    queues: Vec<String>,
    worker_id: String,
    /// Stop after this many steps (completed or failed); `None`: run until interrupted.
    steps: Option<u64>,
    /// Every call as a message on one Work stream.
    stream: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        endpoint: std::env::var("TASKER_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:50051".into()),
        namespace: String::new(),
        queues: Vec::new(),
        worker_id: format!("example-worker-{}", std::process::id()),
        steps: None,
        stream: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => a.endpoint = value()?,
            "--namespace" => a.namespace = value()?,
            "--queue" => a.queues.push(value()?),
            "--worker-id" => a.worker_id = value()?,
            "--stream" => a.stream = true,
            "--steps" => {
                a.steps = Some(value()?.parse().map_err(|e| format!("--steps: {e}"))?);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.namespace.is_empty() {
        return Err("--namespace is required".into());
    }
    Ok(a)
}

/// A FetchSteps refused for now: too many fetches waiting (RESOURCE_EXHAUSTED) or the service
/// restarting (UNAVAILABLE).
fn retry_later(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable
    )
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The work itself: echo the step back.
fn work(name: &str, attempt: i32, inputs: &Value, parents: &Value) -> Result<Value, String> {
    if let Some(message) = inputs.get("fail").and_then(Value::as_str) {
        return Err(message.to_string());
    }
    let parents: Vec<&String> = parents
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    Ok(json!({ "step": name, "attempt": attempt, "inputs": inputs, "parents": parents }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args().map_err(|e| {
        format!("{e}\nusage: worker --namespace NS [--queue Q]... [--endpoint URL] [--worker-id ID] [--steps N] [--stream]")
    })?;
    let mut connect = Connect::new(&args.endpoint);
    if let Ok(token) = std::env::var("TASKER_TOKEN") {
        connect = connect.token(token);
    }
    let mut worker = WorkerClient::connect(&connect, &args.namespace, &args.worker_id)
        .await?
        .with_queues(args.queues.clone());
    if args.stream {
        worker = worker.over_stream().await?;
    }
    eprintln!(
        "{} working namespace {:?} (queues {:?}) at {}",
        args.worker_id, args.namespace, args.queues, args.endpoint
    );
    let mut handled = 0u64;
    let mut backoff = FIRST_BACKOFF;
    // steps handed over with a completion's answer, run before fetching again
    let mut handed: Vec<tasker::client::LeasedStep> = Vec::new();
    while args.steps.is_none_or(|n| handled < n) {
        if !handed.is_empty() {
            let step = handed.remove(0);
            // ask for more only while more are wanted: a step handed over and never run
            // would wait for its lease to run out
            let more = args.steps.is_none_or(|n| handled + 1 < n);
            handed.extend(run(&mut worker, step, more).await?);
            handled += 1;
            continue;
        }
        let fetched = tokio::select! {
            r = worker.fetch(1, Duration::from_secs(10)) => r,
            _ = tokio::signal::ctrl_c() => break,
        };
        let leased = match fetched {
            Ok(steps) => {
                backoff = FIRST_BACKOFF;
                steps
            }
            // too many fetches waiting, or the service restarting: wait, longer each time
            Err(status) if retry_later(&status) => {
                eprintln!(
                    "FetchSteps: {:?}: {}; retrying in {backoff:?}",
                    status.code(),
                    status.message()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        handed.extend(leased);
    }
    Ok(())
}

/// Run one step and report it; with `more`, a completion asks for the next step (one) and
/// returns it.
async fn run(
    worker: &mut WorkerClient,
    step: tasker::client::LeasedStep,
    more: bool,
) -> Result<Vec<tasker::client::LeasedStep>, Box<dyn std::error::Error>> {
    let mut next = Vec::new();
    match work(&step.name, step.attempt, &step.inputs, &step.parent_results) {
        Ok(results) => {
            if more {
                next = worker.complete_and_next(&step, &results, 1).await?;
            } else {
                worker.complete(&step, &results).await?;
            }
            println!(
                "completed {} (attempt {}) of task {}",
                step.name, step.attempt, step.task_uuid
            );
        }
        Err(message) => {
            let r = worker
                .fail(&step, &message, true, Some(Duration::from_millis(100)))
                .await?;
            println!(
                "failed {} (attempt {}): {message}; {}",
                step.name,
                step.attempt,
                r.outcome().as_str_name()
            );
        }
    }
    Ok(next)
}
