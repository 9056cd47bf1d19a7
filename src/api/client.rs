//! A client for Tasker's gRPC API: connecting (plaintext or TLS, with a bearer token), and
//! [`WorkerClient`], what a worker process needs to lease steps, complete or fail them and
//! extend a lease, as gRPC calls or as messages on one Work stream
//! ([`WorkerClient::over_stream`]); [`task`], a `CreateTaskRequest` written the way a DAG is
//! drawn.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tasker::client::{Connect, WorkerClient};
//! let mut worker = WorkerClient::connect(&Connect::new("http://127.0.0.1:50051"), "billing", "w1").await?;
//! loop {
//!     for step in worker.fetch(1, std::time::Duration::from_secs(10)).await? {
//!         let results = serde_json::json!({ "ok": true });
//!         worker.complete(&step, &results).await?;
//!     }
//! }
//! # }
//! ```
//!
//! Every call carries the token as `authorization: Bearer ...` and, when the calling process
//! exports traces, the current span's `traceparent`, so a worker's trace continues into the
//! service.

pub use super::task_builder::{chain, diamond, task, TaskBuilder};

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use super::client_stream::{mismatched, WorkStream};
use crate::proto::v1::work_request::Call;
use crate::proto::v1::work_response::Result as Answer;
use crate::proto::{self, v1};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Connect {
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    pub endpoint: String,
    /// A bearer token; `None` for a server without tokens.
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (TLS only). Without it, the
    /// system's trusted roots are used.
    pub ca_cert: Option<PathBuf>,
    pub connect_timeout: Duration,
}

impl Connect {
    /// `endpoint`: a URL, or `host:port` for plaintext (as grpcurl takes it).
    pub fn new(endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("http://{endpoint}")
        };
        Self {
            endpoint,
            token: None,
            ca_cert: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Connect and return a channel whose calls all carry the token and trace context.
    pub async fn channel(&self) -> Result<AuthorizedChannel, ConnectError> {
        let token = self
            .token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ConnectError::Token)
            })
            .transpose()?;
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| ConnectError::Endpoint(self.endpoint.clone(), e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let tls = self.endpoint.starts_with("https://");
        if !tls && self.ca_cert.is_some() {
            return Err(ConnectError::Endpoint(
                self.endpoint.clone(),
                "a CA certificate was given for a plaintext endpoint: use https://".into(),
            ));
        }
        if tls {
            let mut config = ClientTlsConfig::new().with_native_roots();
            if let Some(path) = &self.ca_cert {
                let pem = std::fs::read(path)
                    .map_err(|e| ConnectError::CaCert(path.clone(), e.to_string()))?;
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| ConnectError::Endpoint(self.endpoint.clone(), e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ConnectError::Connect(self.endpoint.clone(), error_chain(&e)))?;
        Ok(InterceptedService::new(channel, CallMetadata { token }))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("the token contains characters not allowed in a header")]
    Token,
    #[error("cannot read the CA certificate {0}: {1}")]
    CaCert(PathBuf, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
}

/// Adds the bearer token and the current trace context to every call.
#[derive(Clone)]
pub struct CallMetadata {
    token: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for CallMetadata {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(tp) = crate::telemetry::current_traceparent().and_then(|t| t.parse().ok()) {
            req.metadata_mut().insert("traceparent", tp);
        }
        Ok(req)
    }
}

/// A channel whose calls carry the token and trace context; build any generated client on it
/// (`proto::v1::task_service_client::TaskServiceClient::new(channel)`).
pub type AuthorizedChannel = InterceptedService<Channel, CallMetadata>;

/// A step leased to this worker.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedStep {
    pub step_uuid: String,
    pub task_uuid: String,
    pub name: String,
    pub attempt: i32,
    pub inputs: Value,
    /// Parent step name -> that step's results.
    pub parent_results: Value,
    /// Proves the lease: sent with every report on this attempt.
    pub lease_token: String,
    /// The step's queue.
    pub queue: String,
}

impl From<v1::LeasedStep> for LeasedStep {
    fn from(s: v1::LeasedStep) -> Self {
        Self {
            step_uuid: s.step_uuid,
            task_uuid: s.task_uuid,
            name: s.name,
            attempt: s.attempt,
            inputs: proto::struct_to_json(s.inputs),
            parent_results: proto::struct_to_json(s.parent_results),
            lease_token: s.lease_token,
            queue: s.queue,
        }
    }
}

/// A worker for one namespace: long-poll for steps, then complete or fail each. Each call is
/// a gRPC call, or, after [`WorkerClient::over_stream`], a message on one Work stream.
#[derive(Clone)]
pub struct WorkerClient {
    inner: v1::worker_service_client::WorkerServiceClient<AuthorizedChannel>,
    /// For the tasks this worker creates and starts itself.
    tasks: v1::task_service_client::TaskServiceClient<AuthorizedChannel>,
    /// Calls go over this stream when set.
    stream: Option<WorkStream>,
    namespace: String,
    worker_id: String,
    /// The queues whose steps it runs, in order of preference; empty: the default queue.
    pub queues: Vec<String>,
    /// Seconds each lease lasts; extend it for longer work.
    pub lease_seconds: i32,
}

impl WorkerClient {
    pub async fn connect(
        connect: &Connect,
        namespace: impl Into<String>,
        worker_id: impl Into<String>,
    ) -> Result<Self, ConnectError> {
        Ok(Self::new(connect.channel().await?, namespace, worker_id))
    }

    pub fn new(
        channel: AuthorizedChannel,
        namespace: impl Into<String>,
        worker_id: impl Into<String>,
    ) -> Self {
        Self {
            inner: v1::worker_service_client::WorkerServiceClient::new(channel.clone()),
            tasks: v1::task_service_client::TaskServiceClient::new(channel),
            stream: None,
            namespace: namespace.into(),
            worker_id: worker_id.into(),
            queues: Vec::new(),
            lease_seconds: 30,
        }
    }

    /// Run only the steps of these queues (in order of preference).
    pub fn with_queues(mut self, queues: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Send every call as a message on one `WorkerService/Work` stream (opened now, and
    /// again after it ends) instead of a gRPC call each: no call set-up per step. The calls
    /// and their answers are the same.
    pub async fn over_stream(mut self) -> Result<Self, Status> {
        self.stream = Some(WorkStream::open(self.inner.clone()).await?);
        Ok(self)
    }

    /// Lease up to `max` steps, waiting up to `wait` for the first (the server caps the wait
    /// at its `grpc.max_fetch_wait_ms`). An empty result means none arrived in time.
    pub async fn fetch(&mut self, max: i32, wait: Duration) -> Result<Vec<LeasedStep>, Status> {
        let r = v1::FetchStepsRequest {
            namespace: self.namespace.clone(),
            worker_id: self.worker_id.clone(),
            max_steps: max,
            wait_ms: i32::try_from(wait.as_millis()).unwrap_or(i32::MAX),
            lease_seconds: self.lease_seconds,
            queues: self.queues.clone(),
        };
        let r = match &self.stream {
            Some(s) => match s.call(Call::FetchSteps(r)).await? {
                Answer::FetchSteps(r) => r,
                _ => return Err(mismatched("FetchSteps")),
            },
            None => self.inner.fetch_steps(r).await?.into_inner(),
        };
        Ok(r.steps.into_iter().map(Into::into).collect())
    }

    /// Report the attempt done with `results` (a JSON object). Safe to retry after a lost
    /// answer: the same completion again is answered OK (`already_recorded`).
    pub async fn complete(&mut self, step: &LeasedStep, results: &Value) -> Result<(), Status> {
        self.complete_step(step, results, None).await?;
        Ok(())
    }

    /// [`WorkerClient::complete`], and lease up to `max` of the steps this completion makes
    /// ready (of this worker's queues) in the same call: eager dispatch, one call and one
    /// commit per hop of a chain. An empty result means none: fetch as usual.
    pub async fn complete_and_next(
        &mut self,
        step: &LeasedStep,
        results: &Value,
        max: i32,
    ) -> Result<Vec<LeasedStep>, Status> {
        let next = v1::NextSteps {
            max_steps: max,
            queues: self.queues.clone(),
            lease_seconds: self.lease_seconds,
        };
        let r = self.complete_step(step, results, Some(next)).await?;
        Ok(r.next_steps.into_iter().map(Into::into).collect())
    }

    /// Create a task and lease up to `max` of the steps it makes ready (of this worker's
    /// queues) to this worker in the same call: eager start, one call and one commit from a
    /// new task to its first steps in hand. The task as created, and the steps leased; none
    /// for a task that starts later, waits for its concurrency key, or that its idempotency
    /// key returned (fetch as usual).
    pub async fn create_task_and_next(
        &mut self,
        task: impl Into<v1::CreateTaskRequest>,
        max: i32,
    ) -> Result<(v1::CreateTaskResponse, Vec<LeasedStep>), Status> {
        let mut request = task.into();
        request.worker_id = self.worker_id.clone();
        request.next = Some(v1::NextSteps {
            max_steps: max,
            queues: self.queues.clone(),
            lease_seconds: self.lease_seconds,
        });
        let mut created = self.tasks.create_task(request).await?.into_inner();
        let steps = std::mem::take(&mut created.next_steps);
        Ok((created, steps.into_iter().map(Into::into).collect()))
    }

    async fn complete_step(
        &mut self,
        step: &LeasedStep,
        results: &Value,
        next: Option<v1::NextSteps>,
    ) -> Result<v1::CompleteStepResponse, Status> {
        let r = v1::CompleteStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            results: Some(proto::json_to_struct(results)),
            lease_token: step.lease_token.clone(),
            next,
        };
        match &self.stream {
            Some(s) => match s.call(Call::CompleteStep(r)).await? {
                Answer::CompleteStep(r) => Ok(r),
                _ => Err(mismatched("CompleteStep")),
            },
            None => Ok(self.inner.complete_step(r).await?.into_inner()),
        }
    }

    /// Report the attempt failed. `retryable`: another attempt may be made (after `backoff`;
    /// `None`: the step's declared retry policy decides, else at once) while attempts remain.
    pub async fn fail(
        &mut self,
        step: &LeasedStep,
        message: &str,
        retryable: bool,
        backoff: Option<Duration>,
    ) -> Result<v1::FailStepResponse, Status> {
        let r = v1::FailStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            error_message: message.to_string(),
            retryable,
            backoff_ms: backoff.map(|b| i64::try_from(b.as_millis()).unwrap_or(i64::MAX)),
            error_details: None,
            lease_token: step.lease_token.clone(),
        };
        match &self.stream {
            Some(s) => match s.call(Call::FailStep(r)).await? {
                Answer::FailStep(r) => Ok(r),
                _ => Err(mismatched("FailStep")),
            },
            None => Ok(self.inner.fail_step(r).await?.into_inner()),
        }
    }

    /// Keep the lease for another `lease_seconds`.
    pub async fn extend(&mut self, step: &LeasedStep) -> Result<(), Status> {
        let r = v1::ExtendLeaseRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            lease_seconds: self.lease_seconds,
            lease_token: step.lease_token.clone(),
        };
        match &self.stream {
            Some(s) => match s.call(Call::ExtendLease(r)).await? {
                Answer::ExtendLease(_) => Ok(()),
                _ => Err(mismatched("ExtendLease")),
            },
            None => self.inner.extend_lease(r).await.map(drop),
        }
    }
}
