//! The benchmark's workers: a separate process (`tasker bench-worker --spec JSON`) that drives
//! the service exactly as users do, through the public gRPC API with `tasker::client`: it
//! creates the tasks, long-polls `FetchSteps` and calls `CompleteStep`.
//!
//! It measures what a worker sees. For chains, "next step starts": from the moment a worker
//! sends `CompleteStep` for a step to the moment it holds the step's successor. For a fan-out
//! (root -> N leaves -> join): from the root's `CompleteStep` sent to the N-th leaf received,
//! and from the last leaf's `CompleteStep` sent to the join received.
//!
//! Protocol with the parent (stdout): the line `window-start` when the measurement window
//! opens (after the warm-up), `window-end` when it closes, then one line of JSON, the
//! [`WorkerReport`]. The parent samples CPU between the two marks.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tasker::client::{AuthorizedChannel, Connect, LeasedStep, WorkerClient};
use tasker::proto::v1;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the worker process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Service endpoints; chain `i` (or fan worker `i`) uses `endpoints[i % len]`.
    pub endpoints: Vec<String>,
    pub shape: Shape,
    pub warmup_ms: u64,
    pub window_ms: u64,
    /// Namespace prefix; chains use `<prefix>-<i>`, the fan uses `<prefix>`.
    pub namespace: String,
    /// Eager dispatch: each completion asks for the worker's next step
    /// (`CompleteStepRequest.next`, one step), and a chain worker creates each chain asking
    /// for its first (`CreateTaskRequest.next`, eager start); the worker fetches only when
    /// none came back.
    #[serde(default)]
    pub eager: bool,
    /// The worker's calls go as messages on one Work stream (`WorkerClient::over_stream`).
    #[serde(default)]
    pub stream: bool,
}

/// How a worker calls the service: eagerly or not, over a Work stream or as unary calls.
#[derive(Debug, Clone, Copy)]
struct Calls {
    eager: bool,
    stream: bool,
}

impl Calls {
    /// A worker client of `ns` calling the service this way.
    async fn client(
        self,
        ch: AuthorizedChannel,
        ns: &str,
        worker_id: String,
    ) -> anyhow::Result<WorkerClient> {
        let worker = WorkerClient::new(ch, ns, worker_id);
        Ok(if self.stream {
            worker.over_stream().await?
        } else {
            worker
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `count` chains at once, each of `length` steps, one worker per chain; a finished chain
    /// is replaced by a new one.
    Chains { count: usize, length: usize },
    /// One task at a time: root -> `width` leaves -> join, worked by `workers` workers.
    Fan { width: usize, workers: usize },
    /// A steady load: `length`-step chains created at `rate` steps per second (whatever the
    /// service's pace), worked by `workers` workers that long-poll and complete what is
    /// ready. Prints `progress <steps completed>` every second.
    Paced {
        rate: f64,
        length: usize,
        workers: usize,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Chains: CompleteStep sent -> successor received, ms, inside the window.
    pub next_step_ms: Vec<f64>,
    /// Fan: root CompleteStep sent -> last leaf received, ms.
    pub fan_out_ms: Vec<f64>,
    /// Fan: last leaf CompleteStep sent -> join received, ms.
    pub fan_in_ms: Vec<f64>,
    /// Steps completed (CompleteStep answered) inside the window.
    pub steps_in_window: u64,
    /// Steps completed in the whole run, warm-up included.
    pub steps_total: u64,
    pub window_secs: f64,
}

/// Window bounds, shared by every worker task.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// Run the spec; print the marks and the report on stdout.
pub async fn run(spec: WorkerSpec) -> anyhow::Result<()> {
    let started = Instant::now();
    let window = Window {
        start: started + Duration::from_millis(spec.warmup_ms),
        end: started + Duration::from_millis(spec.warmup_ms + spec.window_ms),
    };
    let mut channels = Vec::new();
    for e in &spec.endpoints {
        channels.push(Connect::new(e).channel().await?);
    }
    let stop = CancellationToken::new();
    let report = Arc::new(Mutex::new(WorkerReport {
        window_secs: spec.window_ms as f64 / 1000.0,
        ..Default::default()
    }));
    let completed_total = Arc::new(AtomicU64::new(0));
    let completed_window = Arc::new(AtomicU64::new(0));
    let counters = Counters {
        total: completed_total.clone(),
        window: completed_window.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    match spec.shape.clone() {
        Shape::Chains { count, length } => {
            for i in 0..count {
                let ch = channels[i % channels.len()].clone();
                let ns = format!("{}-{i}", spec.namespace);
                let (stop, report, counters) = (stop.clone(), report.clone(), counters.clone());
                let eager = Calls {
                    eager: spec.eager,
                    stream: spec.stream,
                };
                tasks.spawn(async move {
                    chain_worker(ch, ns, length, eager, window, stop, report, counters).await
                });
            }
        }
        Shape::Fan { width, workers } => {
            let fan = Arc::new(Mutex::new(FanState::default()));
            let creator = channels[0].clone();
            let ns = spec.namespace.clone();
            create_fan(&creator, &ns, width, &fan).await?;
            for i in 0..workers {
                let ch = channels[i % channels.len()].clone();
                let eager = Calls {
                    eager: spec.eager,
                    stream: spec.stream,
                };
                let (ns, stop, report, counters, fan, creator) = (
                    ns.clone(),
                    stop.clone(),
                    report.clone(),
                    counters.clone(),
                    fan.clone(),
                    creator.clone(),
                );
                tasks.spawn(async move {
                    fan_worker(
                        ch, creator, ns, i, width, eager, window, stop, report, counters, fan,
                    )
                    .await
                });
            }
        }
        Shape::Paced {
            rate,
            length,
            workers,
        } => {
            for i in 0..workers {
                let ch = channels[i % channels.len()].clone();
                let (ns, stop, counters) = (spec.namespace.clone(), stop.clone(), counters.clone());
                let eager = Calls {
                    eager: spec.eager,
                    stream: spec.stream,
                };
                tasks.spawn(
                    async move { paced_worker(ch, ns, i, eager, window, stop, counters).await },
                );
            }
            let (ch, ns, until) = (channels[0].clone(), spec.namespace.clone(), stop.clone());
            tasks.spawn(async move { paced_producer(ch, ns, rate, length, until).await });
            let (total, stop) = (completed_total.clone(), stop.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    println!("progress {}", total.load(Ordering::Relaxed));
                    std::io::stdout().flush()?;
                }
            });
        }
    }
    tokio::time::sleep_until(window.start).await;
    println!("window-start");
    std::io::stdout().flush()?;
    tokio::time::sleep_until(window.end).await;
    println!("window-end");
    std::io::stdout().flush()?;
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        match r? {
            // after the window, calls cut short by the stop (a cancelled long-poll resets its
            // stream; many at once can make the server close the connection) measure nothing
            Err(e) if stop.is_cancelled() => {
                eprintln!("bench worker: after the window: {e:#}");
            }
            r => r?,
        }
    }
    let mut report = report.lock().expect("no worker panicked").clone();
    report.steps_total = completed_total.load(Ordering::Relaxed);
    report.steps_in_window = completed_window.load(Ordering::Relaxed);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(Clone)]
struct Counters {
    total: Arc<AtomicU64>,
    window: Arc<AtomicU64>,
}

impl Counters {
    fn completed(&self, window: &Window, at: Instant) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if window.contains(at) {
            self.window.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn step_def(name: String, depends_on: Vec<String>) -> v1::StepDefinition {
    v1::StepDefinition {
        name,
        depends_on,
        ..Default::default()
    }
}

async fn create(ch: &AuthorizedChannel, req: v1::CreateTaskRequest) -> anyhow::Result<String> {
    let mut tasks = v1::task_service_client::TaskServiceClient::new(ch.clone());
    Ok(tasks.create_task(req).await?.into_inner().task_uuid)
}

/// A chain `s0 -> ... -> s(length-1)` of `ns`.
fn chain_request(ns: &str, length: usize) -> v1::CreateTaskRequest {
    let steps = (0..length)
        .map(|i| {
            let deps = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            step_def(format!("s{i}"), deps)
        })
        .collect();
    v1::CreateTaskRequest {
        namespace: ns.into(),
        name: format!("chain-{length}"),
        steps,
        ..Default::default()
    }
}

async fn create_chain(ch: &AuthorizedChannel, ns: &str, length: usize) -> anyhow::Result<()> {
    create(ch, chain_request(ns, length)).await?;
    Ok(())
}

/// Create a chain; with `eager`, leasing its first step to `worker` in the same call (eager
/// start), which it returns.
async fn start_chain(
    ch: &AuthorizedChannel,
    worker: &mut WorkerClient,
    ns: &str,
    length: usize,
    eager: bool,
) -> anyhow::Result<Option<LeasedStep>> {
    if eager {
        let (_, steps) = worker
            .create_task_and_next(chain_request(ns, length), 1)
            .await?;
        Ok(steps.into_iter().next())
    } else {
        create_chain(ch, ns, length).await?;
        Ok(None)
    }
}

/// Complete `step`; with `eager`, asking for the worker's next step in the same call.
async fn complete(
    worker: &mut WorkerClient,
    step: &LeasedStep,
    results: &serde_json::Value,
    eager: bool,
) -> anyhow::Result<Option<LeasedStep>> {
    if eager {
        Ok(worker
            .complete_and_next(step, results, 1)
            .await?
            .into_iter()
            .next())
    } else {
        worker.complete(step, results).await?;
        Ok(None)
    }
}

/// The step handed over with the last completion, else the next one leased, or `None` once
/// `stop` fires.
async fn take_or_fetch(
    handed: &mut Option<LeasedStep>,
    worker: &mut WorkerClient,
    stop: &CancellationToken,
) -> anyhow::Result<Option<LeasedStep>> {
    match handed.take() {
        Some(s) if !stop.is_cancelled() => Ok(Some(s)),
        _ => next_step(worker, stop).await,
    }
}

/// Lease the next step, or `None` once `stop` fires.
async fn next_step(
    worker: &mut WorkerClient,
    stop: &CancellationToken,
) -> anyhow::Result<Option<LeasedStep>> {
    if stop.is_cancelled() {
        return Ok(None);
    }
    loop {
        let fetched = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = worker.fetch(1, Duration::from_secs(10)) => r?,
        };
        if let Some(step) = fetched.into_iter().next() {
            return Ok(Some(step));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn chain_worker(
    ch: AuthorizedChannel,
    ns: String,
    length: usize,
    calls: Calls,
    window: Window,
    stop: CancellationToken,
    report: Arc<Mutex<WorkerReport>>,
    counters: Counters,
) -> anyhow::Result<()> {
    let mut worker = calls.client(ch.clone(), &ns, format!("bench-{ns}")).await?;
    let last = format!("s{}", length - 1);
    let results = json!({"ok": true});
    let mut samples = Vec::new();
    let worked = async {
        let mut handed = start_chain(&ch, &mut worker, &ns, length, calls.eager).await?;
        // when the CompleteStep of this chain's previous step was sent
        let mut sent: Option<Instant> = None;
        while let Some(step) = take_or_fetch(&mut handed, &mut worker, &stop).await? {
            let received = Instant::now();
            if let Some(s) = sent {
                if window.contains(s) && window.contains(received) {
                    samples.push((received - s).as_secs_f64() * 1000.0);
                }
            }
            let send = Instant::now();
            handed = complete(&mut worker, &step, &results, calls.eager).await?;
            counters.completed(&window, Instant::now());
            sent = Some(send);
            if step.name == last {
                sent = None;
                handed = start_chain(&ch, &mut worker, &ns, length, calls.eager).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    // what was measured counts even if a call after the window failed
    report
        .lock()
        .expect("no worker panicked")
        .next_step_ms
        .extend(samples);
    worked
}

/// Chains at `rate` steps per second: every 100 ms the chains owed so far (a fraction is
/// carried over), each created without waiting for the service to catch up.
async fn paced_producer(
    ch: AuthorizedChannel,
    ns: String,
    rate: f64,
    length: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let per_tick = rate / length as f64 / 10.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut owed = 0.0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            create_chain(&ch, &ns, length).await?;
        }
    }
}

/// Lease and complete whatever is ready, until `stop`.
async fn paced_worker(
    ch: AuthorizedChannel,
    ns: String,
    i: usize,
    calls: Calls,
    window: Window,
    stop: CancellationToken,
    counters: Counters,
) -> anyhow::Result<()> {
    let mut worker = calls.client(ch, &ns, format!("soak-{i}")).await?;
    let results = json!({"ok": true});
    let mut handed = None;
    while let Some(step) = take_or_fetch(&mut handed, &mut worker, &stop).await? {
        handed = complete(&mut worker, &step, &results, calls.eager).await?;
        counters.completed(&window, Instant::now());
    }
    Ok(())
}

/// The fan-out task in flight: when its root's completion was sent, how many leaves have been
/// received, the latest leaf completion sent.
#[derive(Default)]
struct FanState {
    task: String,
    root_sent: Option<Instant>,
    leaves_received: usize,
    last_leaf_sent: Option<Instant>,
}

async fn create_fan(
    ch: &AuthorizedChannel,
    ns: &str,
    width: usize,
    fan: &Mutex<FanState>,
) -> anyhow::Result<()> {
    let mut steps = vec![step_def("root".into(), vec![])];
    let leaves: Vec<String> = (0..width).map(|i| format!("leaf{i}")).collect();
    steps.extend(
        leaves
            .iter()
            .map(|l| step_def(l.clone(), vec!["root".into()])),
    );
    steps.push(step_def("join".into(), leaves));
    let task = create(
        ch,
        v1::CreateTaskRequest {
            namespace: ns.into(),
            name: format!("fan-{width}"),
            steps,
            ..Default::default()
        },
    )
    .await?;
    *fan.lock().expect("no worker panicked") = FanState {
        task,
        ..Default::default()
    };
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn fan_worker(
    ch: AuthorizedChannel,
    creator: AuthorizedChannel,
    ns: String,
    i: usize,
    width: usize,
    calls: Calls,
    window: Window,
    stop: CancellationToken,
    report: Arc<Mutex<WorkerReport>>,
    counters: Counters,
    fan: Arc<Mutex<FanState>>,
) -> anyhow::Result<()> {
    let mut worker = calls.client(ch, &ns, format!("bench-fan-{i}")).await?;
    let results = json!({"ok": true});
    let mut handed = None;
    while let Some(step) = take_or_fetch(&mut handed, &mut worker, &stop).await? {
        let received = Instant::now();
        {
            let mut f = fan.lock().expect("no worker panicked");
            if step.task_uuid == f.task && step.name.starts_with("leaf") {
                f.leaves_received += 1;
                if f.leaves_received == width {
                    if let Some(root) = f.root_sent.filter(|r| window.contains(*r)) {
                        if window.contains(received) {
                            report
                                .lock()
                                .expect("no worker panicked")
                                .fan_out_ms
                                .push((received - root).as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
            if step.task_uuid == f.task && step.name == "join" {
                if let Some(last) = f.last_leaf_sent.filter(|l| window.contains(*l)) {
                    if window.contains(received) {
                        report
                            .lock()
                            .expect("no worker panicked")
                            .fan_in_ms
                            .push((received - last).as_secs_f64() * 1000.0);
                    }
                }
            }
        }
        let send = Instant::now();
        {
            let mut f = fan.lock().expect("no worker panicked");
            match step.name.as_str() {
                "root" => f.root_sent = Some(send),
                "join" => {}
                _ => f.last_leaf_sent = Some(f.last_leaf_sent.map_or(send, |l| l.max(send))),
            }
        }
        handed = complete(&mut worker, &step, &results, calls.eager).await?;
        counters.completed(&window, Instant::now());
        if step.name == "join" {
            create_fan(&creator, &ns, width, &fan).await?;
        }
    }
    Ok(())
}
