//! `WorkerService/Work`: a worker's calls (fetch, complete, fail, extend) as messages on one
//! bidirectional stream, each answered by its id exactly as its unary call answers: the same
//! handlers run, so the stream is no second path to the store. What it saves is the call:
//! a unary call is an HTTP/2 stream with its headers, trailers and (in `@grpc/grpc-js`) a
//! call object, interceptors and status parsing, on both sides; a message on an open stream
//! is one DATA frame. For a worker not written in Rust that set-up was most of its CPU per
//! step (issue 25's lever 4).
//!
//! Calls run concurrently (a fetch waiting for steps holds up no completion), at most
//! [`MAX_CALLS_IN_FLIGHT`] per stream: the next message is read when one is answered, and
//! HTTP/2 flow control holds the worker back meanwhile. A worker gone (its stream dropped)
//! cancels its calls in flight as a dropped unary call is cancelled. Shutdown stops the
//! reading; the calls held are answered (waiting fetches return at once) and the stream ends.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::Stream;
use prost::Message as _;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};
use tracing::Instrument as _;

use super::auth::Caller;
use super::error::invalid;
use super::worker_api::WorkerApi;
use crate::proto::v1;
use crate::proto::v1::work_request::Call;
use crate::proto::v1::work_response::Result as Answer;
use crate::proto::v1::worker_service_server::WorkerService as _;

/// Calls one stream runs at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// What a WorkResponse adds around the response it carries, at most: the id (a tag and up to
/// ten bytes) and the response's field (a tag and up to five bytes of length). Responses that
/// carry steps are budgeted this much below `grpc.max_response_bytes`, whichever way they
/// travel, so that a full one still fits a client's receive limit on the stream, and a step
/// is deliverable the same way on both.
pub const ANSWER_OVERHEAD: usize = 32;

/// The answers of a Work stream, as tonic sends them.
pub type WorkAnswers = Pin<Box<dyn Stream<Item = Result<v1::WorkResponse, Status>> + Send>>;

/// Serve one Work stream: read its calls, run each as its unary call, send back the answers.
pub fn serve(api: WorkerApi, request: Request<Streaming<v1::WorkRequest>>) -> WorkAnswers {
    let caller = Caller::of(&request);
    let stream_span = tracing::Span::current();
    let drained = api.ctx().drained();
    let mut calls = request.into_inner();
    let (answers, out) = mpsc::channel(MAX_CALLS_IN_FLIGHT);
    tokio::spawn(
        async move {
            let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
            // the ids of the calls in flight: a second call with one of them is refused
            let in_flight = Arc::new(Mutex::new(HashSet::new()));
            tokio::pin!(drained);
            loop {
                let slot = tokio::select! {
                    biased;
                    () = &mut drained => break,
                    () = answers.closed() => break,
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                };
                let message = tokio::select! {
                    biased;
                    () = &mut drained => break,
                    () = answers.closed() => break,
                    message = calls.message() => message,
                };
                let call = match message {
                    Ok(Some(call)) => call,
                    // the worker closed its side: the calls held are answered, then the end
                    Ok(None) => break,
                    // a message that cannot be read (past grpc.max_request_bytes, not a
                    // WorkRequest) or a stream the worker reset: the stream ends with that
                    // status, as a call would (answers still in flight are lost with it)
                    Err(status) => {
                        tracing::debug!(%status, "Work stream broke");
                        let _ = answers.send(Err(status)).await;
                        break;
                    }
                };
                let id = call.id;
                let span = call_span(&stream_span, &call);
                let answers = answers.clone();
                if !in_flight.lock().expect("never poisoned").insert(id) {
                    let refused = invalid(
                        "id",
                        format!("{id} is the id of a call in flight on this stream: one call per id at a time"),
                    );
                    let _ = answers
                        .send(Ok(v1::WorkResponse {
                            id,
                            result: Some(Answer::Error(status_message(&refused))),
                        }))
                        .await;
                    continue;
                }
                let (api, caller, in_flight) = (api.clone(), caller.clone(), in_flight.clone());
                tokio::spawn(
                    async move {
                        let answer = tokio::select! {
                            answer = answer(&api, caller, call) => answer,
                            // the worker is gone: cancelled, as its unary call would be
                            () = answers.closed() => return,
                        };
                        in_flight.lock().expect("never poisoned").remove(&id);
                        let _ = answers
                            .send(Ok(v1::WorkResponse {
                                id,
                                result: Some(answer),
                            }))
                            .await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
        .instrument(tracing::Span::current()),
    );
    Box::pin(ReceiverStream::new(out))
}

/// One call, answered as its unary method answers it, and counted as that method.
async fn answer(api: &WorkerApi, caller: Caller, call: v1::WorkRequest) -> Answer {
    let started = Instant::now();
    let Some(call) = call.call else {
        return Answer::Error(status_message(&invalid(
            "call",
            "is required: one of fetch_steps, complete_step, fail_step, extend_lease",
        )));
    };
    let method = method_name(&call);
    fn request<T>(caller: Caller, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(caller);
        request
    }
    let answered = match call {
        Call::FetchSteps(r) => api
            .fetch_steps(request(caller, r))
            .await
            .map(|r| Answer::FetchSteps(r.into_inner())),
        Call::CompleteStep(r) => api
            .complete_step(request(caller, r))
            .await
            .map(|r| Answer::CompleteStep(r.into_inner())),
        Call::FailStep(r) => api
            .fail_step(request(caller, r))
            .await
            .map(|r| Answer::FailStep(r.into_inner())),
        Call::ExtendLease(r) => api
            .extend_lease(request(caller, r))
            .await
            .map(|r| Answer::ExtendLease(r.into_inner())),
    };
    let code = answered.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
    crate::telemetry::record_grpc_call(format!("tasker.v1.WorkerService/{method}"), code, started);
    answered.unwrap_or_else(|status| Answer::Error(status_message(&status)))
}

fn method_name(call: &Call) -> &'static str {
    match call {
        Call::FetchSteps(_) => "FetchSteps",
        Call::CompleteStep(_) => "CompleteStep",
        Call::FailStep(_) => "FailStep",
        Call::ExtendLease(_) => "ExtendLease",
    }
}

/// A call's span: the method it stands for, under the worker's trace context when the call
/// carries one, else under the stream's.
fn call_span(stream: &tracing::Span, call: &v1::WorkRequest) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let method = call.call.as_ref().map_or("", method_name);
    let span = tracing::info_span!(
        parent: stream,
        "grpc.work_call",
        otel.name = %format_args!("tasker.v1.WorkerService/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "tasker.v1.WorkerService",
        rpc.method = method,
        work.id = call.id,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if !call.traceparent.is_empty() {
        if let Some(cx) = crate::telemetry::context_from_traceparent(&call.traceparent, None) {
            let _ = span.set_parent(cx);
        }
    }
    span
}

/// A status as google.rpc.Status: its code, message and the details it carries (tonic keeps
/// them encoded as that same message, the `grpc-status-details-bin` trailer's content).
fn status_message(status: &Status) -> tonic_types::pb::Status {
    let details = tonic_types::pb::Status::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest wrapping: the largest id around the longest responses a budget allows.
    #[test]
    fn a_full_answer_still_fits_the_response_limit_on_the_stream() {
        let step = |name_len: usize| v1::LeasedStep {
            name: "x".repeat(name_len),
            ..Default::default()
        };
        for len in [1, 200, 20_000, 4 << 20] {
            let fetched = v1::FetchStepsResponse {
                steps: vec![step(len)],
            };
            let wrapped = v1::WorkResponse {
                id: u64::MAX,
                result: Some(Answer::FetchSteps(fetched.clone())),
            };
            assert!(wrapped.encoded_len() - fetched.encoded_len() <= ANSWER_OVERHEAD);
            let completed = v1::CompleteStepResponse {
                already_recorded: true,
                next_steps: vec![step(len)],
            };
            let wrapped = v1::WorkResponse {
                id: u64::MAX,
                result: Some(Answer::CompleteStep(completed.clone())),
            };
            // already_recorded never comes with steps; counted anyway
            assert!(wrapped.encoded_len() - completed.encoded_len() + 2 <= ANSWER_OVERHEAD);
        }
    }
}
