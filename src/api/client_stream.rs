//! The worker client's side of `WorkerService/Work`: a [`WorkStream`] sends each call as a
//! message with an id and hands each answer to the call waiting for that id. It opens the
//! stream on first use and again after the stream ended or broke; a call in flight when that
//! happens fails with the status the stream ended with (UNAVAILABLE when it ended with OK or
//! the connection was lost: retry it; reports on an attempt are idempotent, and a lease whose
//! step never arrived expires).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::client::AuthorizedChannel;
use crate::proto::v1;
use crate::proto::v1::work_request::Call;
use crate::proto::v1::work_response::Result as Answer;
use crate::proto::v1::worker_service_client::WorkerServiceClient;

/// Calls waiting for their answers (or the status the stream ended with), by id.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Answer, Status>>>>>;

/// One Work stream, shared by the clones of a client.
#[derive(Clone)]
pub struct WorkStream {
    shared: Arc<Shared>,
}

struct Shared {
    client: WorkerServiceClient<AuthorizedChannel>,
    live: tokio::sync::Mutex<Option<Live>>,
    next_id: AtomicU64,
}

/// The stream open now.
#[derive(Clone)]
struct Live {
    calls: mpsc::Sender<v1::WorkRequest>,
    waiting: Waiting,
    ended: Arc<AtomicBool>,
}

impl WorkStream {
    /// Opens the stream at once, so that a server that refuses it (an unknown method, a token
    /// without the write scope) says so here.
    pub async fn open(client: WorkerServiceClient<AuthorizedChannel>) -> Result<Self, Status> {
        let stream = Self {
            shared: Arc::new(Shared {
                client,
                live: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        };
        stream.live().await?;
        Ok(stream)
    }

    /// The stream open now, opened again if it ended.
    async fn live(&self) -> Result<Live, Status> {
        let mut live = self.shared.live.lock().await;
        if let Some(l) = live.as_ref() {
            if !l.ended.load(Ordering::Acquire) && !l.calls.is_closed() {
                return Ok(l.clone());
            }
        }
        let opened = self.start().await?;
        *live = Some(opened.clone());
        Ok(opened)
    }

    async fn start(&self) -> Result<Live, Status> {
        let (calls, outgoing) = mpsc::channel(super::work_stream::MAX_CALLS_IN_FLIGHT);
        let mut client = self.shared.client.clone();
        let mut answers = client
            .work(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let ended = Arc::new(AtomicBool::new(false));
        let live = Live {
            calls,
            waiting: waiting.clone(),
            ended: ended.clone(),
        };
        tokio::spawn(async move {
            let end = loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let waiter = waiting.lock().expect("never poisoned").remove(&answer.id);
                        if let (Some(waiter), Some(result)) = (waiter, answer.result) {
                            let _ = waiter.send(Ok(result));
                        }
                    }
                    Ok(None) => break ended_stream(),
                    Err(status) => break status,
                }
            };
            // the calls still waiting fail with the stream's end; the next call reopens
            ended.store(true, Ordering::Release);
            for (_, waiter) in waiting.lock().expect("never poisoned").drain() {
                let _ = waiter.send(Err(end.clone()));
            }
        });
        Ok(live)
    }

    /// Send one call and wait for its answer: the unary call's response, or its status.
    pub async fn call(&self, call: Call) -> Result<Answer, Status> {
        let live = self.live().await?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (answered, answer) = oneshot::channel();
        {
            // under the lock the reader clears the waiting calls with once it ended: a call
            // put there after that would wait forever
            let mut waiting = live.waiting.lock().expect("never poisoned");
            if live.ended.load(Ordering::Acquire) {
                return Err(ended_stream());
            }
            waiting.insert(id, answered);
        }
        let request = v1::WorkRequest {
            id,
            traceparent: crate::telemetry::current_traceparent().unwrap_or_default(),
            call: Some(call),
        };
        if live.calls.send(request).await.is_err() {
            live.waiting.lock().expect("never poisoned").remove(&id);
            return Err(ended_stream());
        }
        match answer.await {
            Ok(Ok(Answer::Error(status))) => Err(Status::with_details(
                tonic::Code::from(status.code),
                status.message.clone(),
                status.encode_to_vec().into(),
            )),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(end)) => Err(end),
            Err(_) => Err(ended_stream()),
        }
    }
}

/// A call the stream ended under without answering (it ended with OK: a server shutting down).
fn ended_stream() -> Status {
    Status::unavailable("the Work stream ended before the call was answered: retry it")
}

/// The answer to a call of another kind than the one sent: a server bug, never a worker's.
pub fn mismatched(sent: &str) -> Status {
    Status::internal(format!(
        "the Work stream answered a {sent} with another call's answer"
    ))
}
