//! `WorkerService/Work`: a worker's calls as messages on one stream. What it must keep: each
//! call answered by its id exactly as its unary call answers (responses, eager dispatch,
//! errors with their details), calls running concurrently (a waiting fetch holds nothing up),
//! bad messages refused one by one with the stream going on, and a shutdown that answers what
//! it holds and ends the stream, which the Rust client then opens again.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::client::{Connect, WorkerClient};
use tasker::proto::v1;
use tasker::proto::v1::work_request::Call;
use tasker::proto::v1::work_response::Result as Answer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// An open Work stream: send calls, read answers.
struct Stream {
    calls: Option<mpsc::Sender<v1::WorkRequest>>,
    answers: tonic::Streaming<v1::WorkResponse>,
}

impl Stream {
    async fn open(workers: &mut Workers) -> Self {
        let (calls, outgoing) = mpsc::channel(16);
        let answers = workers
            .work(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        Self {
            calls: Some(calls),
            answers,
        }
    }

    async fn send(&self, id: u64, call: Option<Call>) {
        let request = v1::WorkRequest {
            id,
            traceparent: String::new(),
            call,
        };
        self.calls.as_ref().unwrap().send(request).await.unwrap();
    }

    /// The next answer, within 10 s.
    async fn answer(&mut self) -> v1::WorkResponse {
        tokio::time::timeout(Duration::from_secs(10), self.answers.message())
            .await
            .expect("an answer within 10 s")
            .unwrap()
            .expect("the stream is still open")
    }

    /// The next answer, which must refuse call `id`: its status.
    async fn refusal(&mut self, id: u64) -> tonic::Status {
        let answer = self.answer().await;
        assert_eq!(answer.id, id);
        error_status(&answer)
    }

    /// Close the sending side.
    fn close(&mut self) {
        self.calls = None;
    }
}

/// A server (events only) on `pool`, task and worker clients, and a Work stream open on it.
async fn serve_with_stream(pool: &PgPool) -> (TestServer, Tasks, Workers, Stream) {
    let server = TestServer::start(pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut workers = Workers::new(ch.clone());
    let stream = Stream::open(&mut workers).await;
    (server, Tasks::new(ch), workers, stream)
}

fn complete_with_next(step: &v1::LeasedStep) -> Call {
    Call::CompleteStep(v1::CompleteStepRequest {
        step_uuid: step.step_uuid.clone(),
        attempt: step.attempt,
        results: None,
        lease_token: step.lease_token.clone(),
        next: Some(v1::NextSteps {
            max_steps: 1,
            queues: Vec::new(),
            lease_seconds: 30,
        }),
    })
}

/// The error an answer carries, as the status the unary call would have ended with.
fn error_status(answer: &v1::WorkResponse) -> tonic::Status {
    match answer.result.as_ref() {
        Some(Answer::Error(e)) => tonic::Status::with_details(
            Code::from(e.code),
            e.message.clone(),
            prost::Message::encode_to_vec(e).into(),
        ),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A fetch waiting on an empty namespace holds nothing up: a chain's fetch, its eager
/// completions and a lease extension run beside it on the same stream, each answered by its
/// id, and the chain's steps run exactly once, in order.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn calls_on_one_stream_run_beside_a_waiting_fetch_each_answered_by_its_id(pool: PgPool) {
    let (server, mut tasks, _, mut stream) = serve_with_stream(&pool).await;
    // waits the whole test (or until the server stops): nothing ever comes to "idle"
    stream
        .send(
            100,
            Some(Call::FetchSteps(fetch_request("idle", 1, 20_000, 30))),
        )
        .await;
    stream
        .send(
            101,
            Some(Call::FetchSteps(fetch_request("shop", 1, 10_000, 30))),
        )
        .await;
    let task_uuid = tasks
        .create_task(chain("shop", 3).build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let answer = stream.answer().await;
    assert_eq!(answer.id, 101);
    let Some(Answer::FetchSteps(fetched)) = answer.result else {
        panic!("a fetch's answer: {answer:?}")
    };
    let mut step = fetched
        .steps
        .into_iter()
        .next()
        .expect("the chain's first step");
    let mut names = vec![step.name.clone()];
    for id in 102.. {
        stream
            .send(
                id,
                Some(Call::ExtendLease(v1::ExtendLeaseRequest {
                    step_uuid: step.step_uuid.clone(),
                    attempt: step.attempt,
                    lease_seconds: 60,
                    lease_token: step.lease_token.clone(),
                })),
            )
            .await;
        let answer = stream.answer().await;
        assert_eq!(answer.id, id);
        assert!(
            matches!(answer.result, Some(Answer::ExtendLease(ref e)) if e.lease_expires_at.is_some()),
            "{answer:?}"
        );
        stream
            .send(id + 1000, Some(complete_with_next(&step)))
            .await;
        let answer = stream.answer().await;
        assert_eq!(answer.id, id + 1000);
        let Some(Answer::CompleteStep(done)) = answer.result else {
            panic!("a completion's answer: {answer:?}")
        };
        assert!(!done.already_recorded);
        match done.next_steps.into_iter().next() {
            Some(next) => step = next,
            None => break,
        }
        names.push(step.name.clone());
    }
    assert_eq!(names, ["s0", "s1", "s2"]);
    assert_eq!(
        get_task(&mut tasks, &task_uuid).await.state(),
        v1::TaskState::Complete
    );
    assert_exactly_once_in_order(&pool).await;
    drop(stream);
    server.stop().await;
}

/// A bad call is answered with the status its unary call would have ended with (code,
/// message, the fields it names), changes nothing, and the stream goes on: a call with no
/// request, a second call with the id of one in flight, a completion with a bad uuid and no
/// token, a report on a lease the caller does not hold.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_bad_call_gets_its_status_and_the_stream_goes_on(pool: PgPool) {
    let (server, mut tasks, workers, mut stream) = serve_with_stream(&pool).await;
    stream.send(1, None).await;
    let status = stream.refusal(1).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&status), ["call"]);

    stream
        .send(
            2,
            Some(Call::FetchSteps(fetch_request("idle", 1, 20_000, 30))),
        )
        .await;
    stream
        .send(2, Some(Call::FetchSteps(fetch_request("idle", 1, 0, 30))))
        .await;
    let status = stream.refusal(2).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&status), ["id"]);

    stream
        .send(
            3,
            Some(Call::CompleteStep(v1::CompleteStepRequest {
                step_uuid: "not-a-uuid".into(),
                attempt: 1,
                results: None,
                lease_token: String::new(),
                next: None,
            })),
        )
        .await;
    let status = stream.refusal(3).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&status), ["step_uuid", "lease_token"]);

    tasks.create_task(chain("shop", 2).build()).await.unwrap();
    let step = lease_one(&workers, "shop").await;
    let mut stolen = step.clone();
    stolen.lease_token = uuid::Uuid::new_v4().simple().to_string();
    stream.send(4, Some(complete_with_next(&stolen))).await;
    let status = stream.refusal(4).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(refusal_reason(&status).as_deref(), Some("LEASE_NOT_HELD"));

    // nothing changed, and the stream still serves: the holder completes and gets the next
    stream.send(5, Some(complete_with_next(&step))).await;
    let answer = stream.answer().await;
    assert_eq!(answer.id, 5);
    let Some(Answer::CompleteStep(done)) = answer.result else {
        panic!("a completion's answer: {answer:?}")
    };
    assert!(!done.already_recorded);
    assert_eq!(done.next_steps.len(), 1);
    assert_eq!(done.next_steps[0].name, "s1");
    drop(stream);
    server.stop().await;
}

/// Closing the sending side ends the stream once every call is answered: a fetch still
/// waiting is answered when its steps come, then the stream ends with OK.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_closed_sending_side_ends_the_stream_after_the_last_answer(pool: PgPool) {
    let (server, mut tasks, _, mut stream) = serve_with_stream(&pool).await;
    stream
        .send(
            7,
            Some(Call::FetchSteps(fetch_request("shop", 1, 10_000, 30))),
        )
        .await;
    stream.close();
    tasks.create_task(chain("shop", 1).build()).await.unwrap();
    let answer = stream.answer().await;
    assert_eq!(answer.id, 7);
    assert!(
        matches!(answer.result, Some(Answer::FetchSteps(ref f)) if f.steps.len() == 1),
        "{answer:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), stream.answers.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    server.stop().await;
}

/// A server shutting down answers the fetch waiting on a stream at once and ends the stream;
/// the Rust client (`WorkerClient::over_stream`) opens a new one for its next call, on the
/// server that took over, and runs a chain there with eager completions.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_client_opens_its_stream_again_after_a_shutdown_ended_it(pool: PgPool) {
    let config = events_only_config();
    let server = TestServer::start(&pool, &config).await;
    let addr = server.addr;
    let channel = Connect::new(addr.to_string()).channel().await.unwrap();
    let worker = WorkerClient::new(channel, "shop", "w1")
        .over_stream()
        .await
        .unwrap();
    let mut waiting = worker.clone();
    let fetch = tokio::spawn(async move { waiting.fetch(1, Duration::from_secs(20)).await });
    // the fetch is parked before the shutdown begins
    wait_for_parked_fetch(&server).await;
    // the stream does not hold the shutdown up (its grace is 10 s)
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the server stops with a Work stream open");
    let fetched = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the shutdown answers the waiting fetch at once")
        .unwrap();
    assert_eq!(fetched.unwrap(), Vec::new());

    let server = TestServer::start_on(&pool, &config, addr).await;
    let mut tasks = Tasks::new(server.channel().await);
    tasks.create_task(chain("shop", 3).build()).await.unwrap();
    let mut worker = worker;
    let mut step = worker
        .fetch(1, Duration::from_secs(10))
        .await
        .expect("the next call opens a new stream")
        .remove(0);
    let mut names = vec![step.name.clone()];
    while let Some(next) = worker
        .complete_and_next(&step, &serde_json::json!({}), 1)
        .await
        .unwrap()
        .pop()
    {
        names.push(next.name.clone());
        step = next;
    }
    assert_eq!(names, ["s0", "s1", "s2"]);
    assert_exactly_once_in_order(&pool).await;
    drop(worker);
    server.stop().await;
}

/// Until a fetch is parked on the server (its parked-fetch gauge in GetStatus).
async fn wait_for_parked_fetch(server: &TestServer) {
    let mut admin = Admin::new(server.channel().await);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = admin
                .get_status(v1::GetStatusRequest::default())
                .await
                .unwrap()
                .into_inner();
            if status.parked_fetches > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a fetch parks within 10 s");
}

/// A response filled to the budget still fits the response limit once the stream wraps it
/// (id and field): steps are budgeted below `grpc.max_response_bytes` by the wrapping's size.
/// A step whose response would come within that margin of the limit is not sent past the
/// client's receive limit (which broke the stream): it is undeliverable, fails once and says
/// why, and the stream goes on.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_full_answer_fits_the_response_limit_once_wrapped(pool: PgPool) {
    let limit = 64 * 1024;
    let mut config = events_only_config();
    config.grpc.max_response_bytes = limit;
    let server = TestServer::start(&pool, &config).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    // the step as a response carries it, its lease's end at the longest nanos: the inputs'
    // length that makes its entry (counted as the budget counts it) exactly the limit
    let entry = |n: usize| {
        let step = v1::LeasedStep {
            step_uuid: uuid::Uuid::nil().to_string(),
            task_uuid: uuid::Uuid::nil().to_string(),
            name: "only".into(),
            attempt: 1,
            inputs: Some(blob_struct(n)),
            parent_results: Some(prost_types::Struct::default()),
            lease_expires_at: Some(prost_types::Timestamp {
                seconds: 1 << 31,
                nanos: 999_999_999,
            }),
            lease_token: uuid::Uuid::nil().simple().to_string(),
            queue: "default".into(),
        };
        prost::Message::encoded_len(&step) + 6
    };
    let n = (1..limit).rev().find(|&n| entry(n) <= limit).unwrap();
    assert!(
        entry(n) > limit - 8,
        "the step's entry is within a few bytes of the limit"
    );
    let created = tasks
        .create_task(v1::CreateTaskRequest {
            namespace: "full".into(),
            name: "full".into(),
            steps: vec![v1::StepDefinition {
                inputs: Some(blob_struct(n)),
                ..step_def("only", &[])
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // a client that receives at most the limit, as clients by default do at 4 MiB
    let mut workers = Workers::new(ch).max_decoding_message_size(limit);
    let mut stream = Stream::open(&mut workers).await;
    stream
        .send(
            u64::MAX,
            Some(Call::FetchSteps(fetch_request("full", 1, 5000, 30))),
        )
        .await;
    let answer = stream.answer().await;
    assert_eq!(answer.id, u64::MAX);
    assert!(
        matches!(answer.result, Some(Answer::FetchSteps(ref f)) if f.steps.is_empty()),
        "{answer:?}"
    );
    // (read in the database: GetTask could not carry this step's inputs either)
    let (state, message): (String, String) = sqlx::query_as(
        "SELECT state, last_error->>'message' FROM tasker.workflow_steps WHERE task_uuid = $1::uuid",
    )
    .bind(&created.task_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(state, "error");
    assert!(message.contains("for a Work stream's answer"), "{message}");
    // the stream goes on
    stream
        .send(1, Some(Call::FetchSteps(fetch_request("full", 1, 0, 30))))
        .await;
    assert_eq!(stream.answer().await.id, 1);
    drop(stream);
    server.stop().await;
}

/// A message the server cannot read (here: past `grpc.max_request_bytes`) ends the stream
/// with the status that call would have failed with, not with OK: the worker learns why, and
/// the Rust client's call waiting on it fails with that status.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_unreadable_message_ends_the_stream_with_its_status(pool: PgPool) {
    let mut config = events_only_config();
    config.grpc.max_request_bytes = 4096;
    let server = TestServer::start(&pool, &config).await;
    let mut workers = Workers::new(server.channel().await);
    let mut stream = Stream::open(&mut workers).await;
    let mut huge = fetch_request("big", 1, 0, 30);
    huge.worker_id = "w".repeat(8192);
    stream.send(1, Some(Call::FetchSteps(huge))).await;
    let end = tokio::time::timeout(Duration::from_secs(10), stream.answers.message())
        .await
        .expect("the stream ends");
    let status = end.expect_err("the stream ends with an error, not OK");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("4096"), "{status:?}");
    drop(stream);
    // the Rust client's call fails with that status, not as a stream that merely ended
    let channel = Connect::new(server.addr.to_string())
        .channel()
        .await
        .unwrap();
    let mut worker = WorkerClient::new(channel, "big", "w".repeat(8192))
        .over_stream()
        .await
        .unwrap();
    let status = worker
        .fetch(1, Duration::ZERO)
        .await
        .expect_err("the message is past the limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    drop(worker);
    server.stop().await;
}
