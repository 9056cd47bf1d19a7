//! Limits that keep one request from taking the database (or the server) down: statement
//! timeouts, cancelling a dropped request's statement, bounded DAG checks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use tasker::config::{DatabaseConfig, DeploymentMode};
use tasker::proto::v1;
use tasker::testkit::{Store, StoreError, TaskSpec};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A trigger that makes every task insert take `seconds`: a stand-in for a statement that
/// runs long.
async fn slow_task_inserts(pool: &PgPool, seconds: f64) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
         CREATE TRIGGER slow_insert BEFORE INSERT ON tasker.tasks
             FOR EACH ROW EXECUTE FUNCTION public.slow_insert();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn task_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The URL of the test's own database (the harness made it; `Store::connect` takes a URL).
async fn own_url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    tasker::testkit::with_database(&base, &db)
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_statement_past_the_timeout_is_cancelled_and_writes_nothing(pool: PgPool) {
    slow_task_inserts(&pool, 5.0).await;
    let cfg = DatabaseConfig {
        statement_timeout: Duration::from_millis(300),
        ..DatabaseConfig::default()
    };
    let store = Store::connect(&own_url(&pool).await, &cfg).await.unwrap();
    let started = Instant::now();
    let task = TaskSpec::chain("limits", 3).into_new_task().unwrap();
    let err = store
        .create_task(&task, &serde_json::json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::StatementTimeout), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cancelled after {:?}, not by the 300 ms timeout",
        started.elapsed()
    );
    assert_eq!(task_count(&pool).await, 0, "nothing was written");
}

/// Statements of this database still running `create_task`.
async fn running_create_task(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state = 'active'
           AND query LIKE '%tasker.create_task(%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_dropped_request_leaves_no_running_statement(pool: PgPool) {
    slow_task_inserts(&pool, 60.0).await;
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let mut request = Request::new(task("limits").named("slow").step("a").build());
    request.set_timeout(Duration::from_millis(500));
    let status = tasks.create_task(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // the statement was running when the client gave up; it must be gone well before the
    // trigger's 60 s
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = running_create_task(&pool).await;
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} create_task statement(s) still running 10 s after the client gave up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        task_count(&pool).await,
        0,
        "the cancelled task was not committed"
    );
    server.stop().await;
}

/// `layers` layers of `width` steps, each depending on every step of the layer before.
fn layered(width: usize, layers: usize) -> v1::CreateTaskRequest {
    let name = |l: usize, i: usize| format!("l{l}s{i}");
    let mut steps = Vec::new();
    for l in 0..layers {
        for i in 0..width {
            let deps: Vec<String> = if l == 0 {
                Vec::new()
            } else {
                (0..width).map(|j| name(l - 1, j)).collect()
            };
            steps.push(v1::StepDefinition {
                name: name(l, i),
                depends_on: deps,
                ..Default::default()
            });
        }
    }
    v1::CreateTaskRequest {
        namespace: "layers".into(),
        name: format!("layered {width}x{layers}"),
        steps,
        ..Default::default()
    }
}

/// The DAGs that used to hold a database core for seconds to minutes (the cycle check walked
/// every descendant per edge): 10 layers of 30 steps (8,100 edges) is created at once; 10
/// layers of 100 (90,000 edges) is refused by the edge limit before anything is written.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn layered_dags_are_created_at_once_or_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);

    let started = Instant::now();
    let created = tasks
        .create_task(layered(30, 10))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    println!("W=30: 300 steps, 8,100 edges, created in {took:?}");
    assert_eq!(created.steps.len(), 300);
    assert!(took < Duration::from_secs(1), "W=30 took {took:?}");
    let edges: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.step_edges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(edges, 8_100);

    let started = Instant::now();
    let refused = tasks.create_task(layered(100, 10)).await.unwrap_err();
    let took = started.elapsed();
    println!("W=100: refused in {took:?}: {}", refused.message());
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("10000"), "{}", refused.message());
    assert!(took < Duration::from_secs(1), "W=100 took {took:?}");
    assert_eq!(task_count(&pool).await, 1, "only the W=30 task");
    server.stop().await;
}

/// Reads from `socket` until the server closes it (EOF or reset); how long that took.
async fn closed_by_server(socket: &mut (impl tokio::io::AsyncRead + Unpin)) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, socket.read(&mut buf)).await {
            Err(_) => panic!("the server kept a silent connection open for {WAIT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            // HTTP/2 settings frames and the like: keep reading
            Ok(Ok(_)) => continue,
        }
    }
}

fn limits_config() -> tasker::config::TaskerConfig {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.handshake_timeout = Duration::from_secs(1);
    cfg
}

/// A socket that never sends the HTTP/2 preface is closed at the handshake deadline, and so
/// is one that completes a TLS handshake and then says nothing.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn silent_connections_are_closed_at_the_handshake_deadline(pool: PgPool) {
    let server = TestServer::start(&pool, &limits_config()).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let took = closed_by_server(&mut silent).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    server.stop().await;

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut cfg = limits_config();
    cfg.grpc.tls.cert_path = Some(cert_path);
    cfg.grpc.tls.key_path = Some(key_path);
    let server = TestServer::start(&pool, &cfg).await;

    // no ClientHello
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut silent).await;

    // a full TLS handshake, then silence
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    closed_by_server(&mut tls).await;
    server.stop().await;
}

/// A connection that has said its HTTP/2 preface and SETTINGS and then only listens: what a
/// client holding a slot without using it looks like. Bound to `local` (any 127.x address is
/// the loopback), so tests can play several hosts.
async fn idle_http2(addr: std::net::SocketAddr, local: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tcp
}

/// A call from a new client on a new connection.
async fn new_client_call(addr: std::net::SocketAddr) -> Result<(), String> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Admin::new(ch)
        .get_deployment_mode(v1::GetDeploymentModeRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

/// Idle connections cannot lock clients out. With every slot held by connections that said
/// their preface and then only listen (1,024 of them took the server in the review), a new
/// client still gets in at once: the connection idle longest gives way. A connection with a
/// call open is never the one closed; only when every connection has one is a newcomer
/// refused. A connection idle past grpc.idle_timeout_seconds is closed, and one peer holds at
/// most grpc.max_connections_per_peer.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn idle_connections_cannot_lock_clients_out(pool: PgPool) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut cfg = limits_config();
    cfg.grpc.max_connections = 4;
    cfg.grpc.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(&pool, &cfg).await;
    // a client in a call: a long-poll that waits for a step
    let busy = server.channel().await;
    let mut busy_workers = Workers::new(busy);
    let long_poll = tokio::spawn(async move {
        busy_workers
            .fetch_steps(fetch_request("locked-out", 1, 15_000, 30))
            .await
    });
    while *server.core.workers.parked_fetches().borrow() == 0 {
        tokio::task::yield_now().await;
    }
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(idle_http2(server.addr, "127.0.0.1").await);
    }
    // every slot is taken; newcomers get in, one after another, within a moment each
    for i in 0..6 {
        let started = Instant::now();
        new_client_call(server.addr)
            .await
            .unwrap_or_else(|e| panic!("newcomer {i} was refused: {e}"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // the long-poll's connection was never closed: it receives its step
    Tasks::new(server.channel().await)
        .create_task(two_steps("locked-out", "t"))
        .await
        .unwrap();
    let leased = long_poll
        .await
        .unwrap()
        .expect("the busy connection survived");
    assert_eq!(leased.into_inner().steps.len(), 1);

    // with a call open on every connection, a newcomer is refused, until one ends
    let mut watches = Vec::new();
    for _ in 0..4 {
        let ch = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut w = HealthClient::new(ch)
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        w.message().await.unwrap().expect("first status");
        watches.push(w);
    }
    assert!(new_client_call(server.addr).await.is_err());
    watches.pop();
    let deadline = Instant::now() + WAIT;
    while new_client_call(server.addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no newcomer got in after a call ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(watches);
    server.stop().await;

    // idle past the timeout: closed
    let mut cfg = limits_config();
    cfg.grpc.handshake_timeout = Duration::from_secs(30);
    cfg.grpc.idle_timeout = Duration::from_secs(1);
    cfg.grpc.max_connections_per_peer = 2;
    let server = TestServer::start(&pool, &cfg).await;
    let mut quiet = idle_http2(server.addr, "127.0.0.1").await;
    let took = closed_by_server(&mut quiet).await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // one peer, two connections at most; another peer still gets in
    let _a = idle_http2(server.addr, "127.0.0.3").await;
    let _b = idle_http2(server.addr, "127.0.0.3").await;
    let mut third = idle_http2(server.addr, "127.0.0.3").await;
    let took = closed_by_server(&mut third).await;
    assert!(took < Duration::from_millis(900), "closed after {took:?}");
    new_client_call(server.addr).await.unwrap();
    server.stop().await;
}

/// Health Watch streams, open to callers without a token, are capped over all connections
/// (102,400 of them took the server from 34 MB to 695 MB): beyond grpc.max_health_watches,
/// RESOURCE_EXHAUSTED; a stream that ends gives its place back. Check stays open to all.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn health_watches_are_capped(pool: PgPool) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut cfg = limits_config();
    cfg.grpc.max_health_watches = 3;
    let server = TestServer::start(&pool, &cfg).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        // each on a connection of its own: the cap is the server's, not a connection's
        let mut health = HealthClient::new(server.channel().await);
        let mut w = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        w.message().await.unwrap().expect("first status");
        open.push(w);
    }
    let mut health = HealthClient::new(server.channel().await);
    let refused = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("grpc.max_health_watches"));
    health.check(HealthCheckRequest::default()).await.unwrap();
    open.pop();
    let deadline = Instant::now() + WAIT;
    loop {
        match health.watch(HealthCheckRequest::default()).await {
            Ok(_) => break,
            Err(e) => assert!(
                e.code() == Code::ResourceExhausted && Instant::now() < deadline,
                "{e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// One connection cannot open more than `grpc.max_concurrent_streams` calls: the next waits
/// until one ends (health watches need no token, so this is what an anonymous client meets).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn streams_per_connection_are_capped(pool: PgPool) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut cfg = limits_config();
    cfg.grpc.max_concurrent_streams = 4;
    let server = TestServer::start(&pool, &cfg).await;
    let channel = server.channel().await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("first status");
        open.push(stream);
    }
    let mut fifth = HealthClient::new(channel.clone());
    let call = fifth.watch(HealthCheckRequest::default());
    tokio::pin!(call);
    // the fifth is held back by the client's HTTP/2 layer, as the server told it to
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut call)
            .await
            .is_err(),
        "a fifth stream was opened on a connection limited to 4"
    );
    open.pop();
    let mut stream = tokio::time::timeout(WAIT, call)
        .await
        .expect("the fifth stream opens once one ends")
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first status");
    drop((open, stream));
    server.stop().await;
}

/// FetchSteps calls waiting at once are bounded: beyond the limit, RESOURCE_EXHAUSTED naming
/// it, without a query.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn waiting_fetches_are_bounded(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.orchestration.workers.max_parked_fetches = 2;
    let server = TestServer::start(&pool, &cfg).await;
    let channel = server.channel().await;
    let mut parked = server.core.workers.parked_fetches();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let mut workers = Workers::new(channel.clone());
            tokio::spawn(async move {
                workers
                    .fetch_steps(fetch_request("idle", 1, 10_000, 30))
                    .await
            })
        })
        .collect();
    tokio::time::timeout(WAIT, parked.wait_for(|n| *n == 2))
        .await
        .expect("two fetches parked")
        .unwrap();
    let refused = Workers::new(channel.clone())
        .fetch_steps(fetch_request("idle", 1, 10_000, 30))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_parked_fetches"),
        "{refused:?}"
    );
    for w in waiting {
        w.abort();
    }
    server.stop().await;
}

/// Sends a request body as is: bytes that are not the message the method expects.
#[derive(Clone, Default)]
struct RawBytes;

struct RawEncoder;
struct EmptyDecoder;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = EmptyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> EmptyDecoder {
        EmptyDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EmptyDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use prost::bytes::Buf;
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

/// One namespace or one caller cannot take every parked fetch: 1,024 long-polls in namespace
/// `junk` used to make every long-poll in every other namespace fail. Beyond
/// max_parked_fetches_per_namespace in a namespace, or max_parked_fetches_per_caller from one
/// token, RESOURCE_EXHAUSTED naming the limit, while another token's fetch in another
/// namespace still parks and receives its step.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn one_namespace_or_one_caller_cannot_take_every_parked_fetch(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.orchestration.workers.max_parked_fetches = 8;
    cfg.orchestration.workers.max_parked_fetches_per_namespace = 3;
    cfg.orchestration.workers.max_parked_fetches_per_caller = 4;
    cfg.grpc.auth.tokens = vec![
        token("junk", &["read", "write"]),
        token("work", &["read", "write"]),
    ];
    let server = TestServer::start(&pool, &cfg).await;
    let channel = server.channel().await;
    let fetch =
        |token: &str, namespace: &str| as_token(token, fetch_request(namespace, 1, 15_000, 30));
    let mut parked = server.core.workers.parked_fetches();
    let park = |token: &'static str, namespace: &'static str| {
        let mut workers = Workers::new(channel.clone());
        let r = fetch(token, namespace);
        tokio::spawn(async move { workers.fetch_steps(r).await })
    };
    let mut waiting = Vec::new();
    for (i, ns) in ["junk", "junk", "junk", "junk-2"].into_iter().enumerate() {
        waiting.push(park("junk", ns));
        tokio::time::timeout(WAIT, parked.wait_for(|n| *n == i + 1))
            .await
            .expect("parked")
            .unwrap();
    }
    let mut workers = Workers::new(channel.clone());
    let full_namespace = workers
        .fetch_steps(fetch("work", "junk"))
        .await
        .unwrap_err();
    assert_eq!(full_namespace.code(), Code::ResourceExhausted);
    assert!(
        full_namespace
            .message()
            .contains("max_parked_fetches_per_namespace"),
        "{full_namespace:?}"
    );
    let full_caller = workers
        .fetch_steps(fetch("junk", "junk-3"))
        .await
        .unwrap_err();
    assert_eq!(full_caller.code(), Code::ResourceExhausted);
    assert!(
        full_caller
            .message()
            .contains("max_parked_fetches_per_caller"),
        "{full_caller:?}"
    );
    // another caller in another namespace still parks, and gets its step
    let work = park("work", "work");
    tokio::time::timeout(WAIT, parked.wait_for(|n| *n == 5))
        .await
        .expect("the other caller parked")
        .unwrap();
    Tasks::new(channel.clone())
        .create_task(as_token("work", two_steps("work", "t")))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, work)
        .await
        .expect("the parked fetch was answered")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(got.steps.len(), 1);
    for w in waiting {
        w.abort();
    }
    server.stop().await;
}

async fn send_raw(channel: &Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawBytes,
    )
    .await
    .expect_err("a malformed request is refused")
}

/// A request that is not valid protobuf, or nests a Struct deeper than the decoder allows, is
/// the caller's error (INVALID_ARGUMENT) and writes nothing.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn malformed_requests_are_invalid_arguments(pool: PgPool) {
    let server = TestServer::start(&pool, &limits_config()).await;
    let channel = server.channel().await;
    // field 1 (namespace) as a length-delimited string of 100 bytes, with 3 present
    let truncated = vec![0x0a, 100, b'a', b'b', b'c'];
    let status = send_raw(&channel, "/tasker.v1.TaskService/CreateTask", truncated).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not a valid protobuf"),
        "{status:?}"
    );

    let mut deep = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(1.0)),
    };
    for _ in 0..120 {
        deep = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields: [("a".to_string(), deep)].into(),
            })),
        };
    }
    let Some(prost_types::value::Kind::StructValue(context)) = deep.kind else {
        unreachable!()
    };
    let status = Tasks::new(channel.clone())
        .create_task(v1::CreateTaskRequest {
            namespace: "limits".into(),
            name: "deep".into(),
            context: Some(context),
            steps: vec![step_def("a", &[])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(task_count(&pool).await, 0);
    server.stop().await;
}

/// CreateTask creates a namespace on first use, up to database.max_namespaces; one more is
/// RESOURCE_EXHAUSTED naming the limit and writes nothing, while existing namespaces go on.
/// Namespaces have a lifecycle: with create_namespaces_on_first_use off (as in production) a
/// write token cannot make namespaces (a CreateTask in an unknown one is NOT_FOUND, nothing
/// written; CreateNamespace needs admin); an admin creates them within the cap and deletes an
/// empty one, which frees its place; a namespace holding tasks is not deleted.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn namespaces_are_made_and_removed_by_an_admin(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.database.max_namespaces = 3;
    cfg.database.create_namespaces_on_first_use = false;
    cfg.grpc.auth.tokens = vec![
        token("writer", &["write", "read"]),
        token("ops", &["admin"]),
    ];
    let server = TestServer::start(&pool, &cfg).await;
    let channel = server.channel().await;
    let (mut tasks, mut admin) = (Tasks::new(channel.clone()), Admin::new(channel));
    let e = tasks
        .create_task(as_token("writer", two_steps("fresh", "t")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"fresh\""), "{e:?}");
    assert_eq!(task_count(&pool).await, 0);
    let create = |ns: &str| v1::CreateNamespaceRequest {
        namespace: ns.into(),
    };
    let e = admin
        .create_namespace(as_token("writer", create("fresh")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let made = admin
        .create_namespace(as_token("ops", create("fresh")))
        .await
        .unwrap()
        .into_inner();
    assert!(made.created && made.namespace.unwrap().namespace == "fresh");
    let again = admin
        .create_namespace(as_token("ops", create("fresh")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !again.created,
        "creating an existing namespace changes nothing"
    );
    let e = admin
        .create_namespace(as_token("ops", create("Not Valid")))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&e), ["namespace"]);
    tasks
        .create_task(as_token("writer", two_steps("fresh", "t")))
        .await
        .unwrap();
    let delete = |ns: &str| v1::DeleteNamespaceRequest {
        namespace: ns.into(),
    };
    let e = admin
        .delete_namespace(as_token("ops", delete("fresh")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "it holds a task");
    for ns in ["a", "b"] {
        admin
            .create_namespace(as_token("ops", create(ns)))
            .await
            .unwrap();
    }
    let e = admin
        .create_namespace(as_token("ops", create("c")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    admin
        .delete_namespace(as_token("ops", delete("a")))
        .await
        .unwrap();
    let e = admin
        .delete_namespace(as_token("ops", delete("a")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    admin
        .create_namespace(as_token("ops", create("c")))
        .await
        .unwrap();
    let listed: Vec<String> = admin
        .list_namespaces(as_token("writer", v1::ListNamespacesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.namespace)
        .collect();
    assert_eq!(listed, ["fresh", "b", "c"]);
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn namespaces_are_capped(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.database.max_namespaces = 3;
    let server = TestServer::start(&pool, &cfg).await;
    let mut tasks = Tasks::new(server.channel().await);
    let create = |namespace: &str| task(namespace).named("capped").step("a").build();
    for ns in ["ns-a", "ns-b", "ns-c"] {
        tasks.create_task(create(ns)).await.unwrap();
    }
    let refused = tasks.create_task(create("ns-d")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("database.max_namespaces"),
        "{refused:?}"
    );
    assert_eq!(task_count(&pool).await, 3);
    tasks.create_task(create("ns-a")).await.unwrap();
    let namespaces: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.namespaces")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(namespaces, 3);
    server.stop().await;
}

/// A join of 20 parents with 255 KiB results each: the completion that would give the join
/// more than orchestration.workers.max_parent_results_bytes is refused (INVALID_ARGUMENT,
/// naming the limit, nothing recorded, the lease still good), and the join is then delivered
/// to a client with the default 4 MiB message limit.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn parent_results_are_held_to_their_budget(pool: PgPool) {
    held_to_budget(&pool, blob_struct(255 * 1024)).await;
}

/// The budget counts results as they are sent (protobuf), not as JSON: an array of 23,000
/// zeros is 46 KB of JSON but 253 KB as sent. Counted as JSON, all 20 parents would fit the
/// 1 MiB budget and the join (5 MB as sent) could never be delivered.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn parent_results_are_counted_as_sent(pool: PgPool) {
    let zeros = tasker::proto::json_to_struct(&serde_json::json!({ "x": vec![0; 23_000] }));
    assert!(
        serde_json::to_vec(&tasker::proto::struct_to_json(Some(zeros.clone())))
            .unwrap()
            .len()
            < 50_000
    );
    assert!(prost::Message::encoded_len(&zeros) > 250_000);
    held_to_budget(&pool, zeros).await;
}

async fn held_to_budget(pool: &PgPool, results: prost_types::Struct) {
    let cfg = limits_config();
    let budget = cfg.orchestration.workers.max_parent_results_bytes;
    let server = TestServer::start(pool, &cfg).await;
    let channel = server.channel().await;
    let parents: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
    let parent_refs: Vec<&str> = parents.iter().map(String::as_str).collect();
    let mut steps: Vec<v1::StepDefinition> = parents.iter().map(|p| step_def(p, &[])).collect();
    steps.push(step_def("join", &parent_refs));
    Tasks::new(channel.clone())
        .create_task(v1::CreateTaskRequest {
            namespace: "budget".into(),
            name: "wide-join".into(),
            steps,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut workers = Workers::new(channel.clone());
    let leased = workers
        .fetch_steps(fetch_request("budget", 20, 5000, 60))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(leased.len(), 20);
    let (mut accepted, mut refused) = (0, 0);
    for step in &leased {
        let big = v1::CompleteStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            results: Some(results.clone()),
            lease_token: step.lease_token.clone(),
            next: None,
        };
        match workers.complete_step(big).await {
            Ok(_) => accepted += 1,
            Err(status) => {
                refused += 1;
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("orchestration.workers.max_parent_results_bytes"),
                    "{status:?}"
                );
                // nothing was recorded and the lease still holds: small results go through
                workers
                    .complete_step(v1::CompleteStepRequest {
                        step_uuid: step.step_uuid.clone(),
                        attempt: step.attempt,
                        results: Some(blob_struct(10)),
                        lease_token: step.lease_token.clone(),
                        next: None,
                    })
                    .await
                    .unwrap();
            }
        }
    }
    // each parent's entry in the join's parent results, as sent: its name ("p00"), its results
    // as a protobuf Value, and at most 16 bytes of framing
    let entry =
        3 + tasker::proto::value_encoded_len(&tasker::proto::struct_to_json(Some(results))) + 16;
    assert_eq!(accepted, budget / entry, "as many as fit the budget");
    assert_eq!(refused, 20 - accepted);
    // the join arrives whole, within a default client's 4 MiB limit
    let join = lease_one(&workers, "budget").await;
    assert_eq!(join.name, "join");
    let parents = join.parent_results.unwrap();
    assert_eq!(parents.fields.len(), 20);
    assert!(prost::Message::encoded_len(&parents) <= budget);
    server.stop().await;
}

/// Documents nest at most MAX_DOCUMENT_DEPTH levels: deeper results are refused, and the
/// deepest accepted reach a child in a FetchSteps response that the Rust client (prost, whose
/// decoder stops at 100 nested messages, as Python's does) decodes. Results nested 32 deep
/// used to be accepted and made the child's response undecodable.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn documents_nest_no_deeper_than_clients_decode(pool: PgPool) {
    use tasker::limits::MAX_DOCUMENT_DEPTH;
    let nested = |depth: usize| {
        let doc = (1..depth).fold(
            serde_json::json!({"leaf": [1]}),
            |inner, _| serde_json::json!({ "n": inner }),
        );
        assert_eq!(tasker::limits::document_depth(&doc), depth + 1);
        tasker::proto::json_to_struct(&doc)
    };
    let server = TestServer::start(&pool, &limits_config()).await;
    let channel = server.channel().await;
    Tasks::new(channel.clone())
        .create_task(
            task("deep")
                .named("deep")
                .step("parent")
                .step("child")
                .after("parent")
                .build(),
        )
        .await
        .unwrap();
    let mut workers = Workers::new(channel.clone());
    let parent = lease_one(&workers, "deep").await;
    let complete = |results| v1::CompleteStepRequest {
        step_uuid: parent.step_uuid.clone(),
        attempt: parent.attempt,
        results: Some(results),
        lease_token: parent.lease_token.clone(),
        next: None,
    };
    let refused = workers
        .complete_step(complete(nested(MAX_DOCUMENT_DEPTH)))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), field_violations(&refused)),
        (Code::InvalidArgument, vec!["results".to_string()]),
        "{refused:?}"
    );
    workers
        .complete_step(complete(nested(MAX_DOCUMENT_DEPTH - 1)))
        .await
        .unwrap();
    // the child receives its parent's results whole
    let child = lease_one(&workers, "deep").await;
    let got = tasker::proto::struct_to_json(child.parent_results);
    assert_eq!(tasker::limits::document_depth(&got), MAX_DOCUMENT_DEPTH + 1);
    // creating a task checks its documents the same way
    let e = Tasks::new(channel)
        .create_task(v1::CreateTaskRequest {
            namespace: "deep".into(),
            name: "deeper".into(),
            context: Some(nested(MAX_DOCUMENT_DEPTH)),
            steps: vec![v1::StepDefinition {
                inputs: Some(nested(MAX_DOCUMENT_DEPTH)),
                ..step_def("a", &[])
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        field_violations(&e),
        ["context", "steps[0].inputs"],
        "{e:?}"
    );
    server.stop().await;
}

/// A step whose inputs no response can carry (stored before the limits that now refuse
/// them) fails for good at its first lease, saying why, instead of being leased and lost at
/// every fetch until its attempts run out.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_step_no_response_can_carry_fails_once_saying_why(pool: PgPool) {
    let server = TestServer::start(&pool, &limits_config()).await;
    let channel = server.channel().await;
    let created = Tasks::new(channel.clone())
        .create_task(
            task("undeliverable")
                .named("old")
                .step("deep")
                .max_attempts(10)
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    let deep = (0..40).fold(
        serde_json::json!(1),
        |inner, _| serde_json::json!({ "n": inner }),
    );
    sqlx::query("UPDATE tasker.workflow_steps SET inputs = $1")
        .bind(&deep)
        .execute(&pool)
        .await
        .unwrap();
    let mut workers = Workers::new(channel.clone());
    let got = workers
        .fetch_steps(fetch_request("undeliverable", 1, 5000, 60))
        .await
        .expect("the response decodes")
        .into_inner()
        .steps;
    assert!(got.is_empty(), "delivered: {got:?}");
    let task = Tasks::new(channel)
        .get_task(v1::GetTaskRequest {
            task_uuid: created.task_uuid,
            include_step_data: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.state(), v1::TaskState::Error);
    let step = &task.steps[0];
    assert_eq!((step.state(), step.attempts), (v1::StepState::Error, 1));
    let error = tasker::proto::struct_to_json(step.last_error.clone());
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("undeliverable"),
        "{error}"
    );
    server.stop().await;
}

/// A fetch whose steps would not all fit the response budget returns those that fit and
/// leaves the others on the queue, unleased and at the same attempt, for the next fetch.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_fetch_leases_only_what_its_response_can_carry(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.grpc.max_response_bytes = 700 * 1024;
    let server = TestServer::start(&pool, &cfg).await;
    let channel = server.channel().await;
    let mut tasks = Tasks::new(channel.clone());
    for i in 0..5 {
        tasks
            .create_task(v1::CreateTaskRequest {
                namespace: "budget".into(),
                name: format!("big-{i}"),
                steps: vec![v1::StepDefinition {
                    inputs: Some(blob_struct(200 * 1024)),
                    ..step_def("only", &[])
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut workers = Workers::new(channel.clone());
    let mut delivered = Vec::new();
    while delivered.len() < 5 {
        let got = workers
            .fetch_steps(fetch_request("budget", 5, 0, 60))
            .await
            .unwrap()
            .into_inner()
            .steps;
        assert!(!got.is_empty() && got.len() <= 3, "{} steps", got.len());
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasker.step_queue WHERE leased_by IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        delivered.extend(got);
        assert_eq!(leased as usize, delivered.len(), "leased but not delivered");
    }
    assert!(delivered.iter().all(|s| s.attempt == 1));
    server.stop().await;
}

/// GetTask sends step inputs and results only when asked, and pages the steps: by page_size,
/// and early when the next step would pass the response limit. Every step comes exactly once,
/// in topological order; a token the server did not issue is INVALID_ARGUMENT.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn get_task_pages_its_steps_and_sends_their_data_on_request(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.grpc.max_response_bytes = 700 * 1024;
    let server = TestServer::start(&pool, &cfg).await;
    let mut tasks = Tasks::new(server.channel().await);
    let names: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
    let steps = names
        .iter()
        .enumerate()
        .map(|(i, n)| v1::StepDefinition {
            inputs: Some(blob_struct(200 * 1024)),
            ..step_def(
                n,
                &if i == 0 {
                    vec![]
                } else {
                    vec![names[i - 1].as_str()]
                },
            )
        })
        .collect();
    let created = tasks
        .create_task(v1::CreateTaskRequest {
            namespace: "pages".into(),
            name: "big".into(),
            steps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let get = |include_step_data: bool, page_size: i32, page_token: String| v1::GetTaskRequest {
        task_uuid: created.task_uuid.clone(),
        include_step_data,
        page_size,
        page_token,
    };

    // without data: every step in one response, no inputs
    let r = tasks
        .get_task(get(false, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    let t = r.task.unwrap();
    assert_eq!(t.steps.len(), 12);
    assert!(t
        .steps
        .iter()
        .all(|s| s.inputs.is_none() && s.results.is_none()));
    assert_eq!(r.next_page_token, "");

    // by page size
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = tasks
            .get_task(get(false, 5, token))
            .await
            .unwrap()
            .into_inner();
        let page = r.task.unwrap().steps;
        assert!(page.len() <= 5);
        seen.extend(page.into_iter().map(|s| s.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, names);

    // with data: pages end at the response limit (three 200 KiB steps per 700 KiB)
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = tasks
            .get_task(get(true, 0, token.clone()))
            .await
            .unwrap()
            .into_inner();
        let page = r.task.unwrap().steps;
        assert!(!page.is_empty() && page.len() <= 3, "{} steps", page.len());
        assert!(page.iter().all(|s| s.inputs.is_some()));
        seen.extend(page.into_iter().map(|s| s.name));
        pages += 1;
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, names);
    assert_eq!(pages, 4);

    // a real token, sent for another task
    let other = tasks
        .create_task(two_steps("pages", "small"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let refused = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: other,
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("page_token") && refused.message().contains("another task"),
        "{}",
        refused.message()
    );

    for (size, token) in [(0, "made-up"), (0, "steps-v2.abc.-3"), (1001, ""), (-1, "")] {
        let refused = tasks
            .get_task(get(false, size, token.into()))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{size} {token}: {refused:?}"
        );
    }
    server.stop().await;
}

/// `tasker bench --database-url X` would empty X's Tasker tables: without --allow-emptying it
/// refuses, says why, and X keeps its tasks.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bench_never_empties_a_named_database_unasked(pool: PgPool) {
    let store = Store::new(pool.clone());
    let task = TaskSpec::chain("kept", 2).into_new_task().unwrap();
    store
        .create_task(&task, &serde_json::json!({}), None)
        .await
        .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tasker"))
        .args([
            "--database-url",
            &own_url(&pool).await,
            "bench",
            "--scenarios",
            "chains:1x2",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--allow-emptying"), "{stderr}");
    assert_eq!(task_count(&pool).await, 1);
}

/// ListTasks and GetTask (with step data) read only the documents their response can carry:
/// the page is cut to the response budget in the query, before any context, input or result
/// is read. 40 tasks with 250 KB contexts: a page of 1,000 reads 5 of them for a 1 MiB
/// response, not 40; the same for 12 steps with 250 KB inputs. Paging still shows each once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn pages_read_only_the_documents_their_response_carries(pool: PgPool) {
    let mut cfg = limits_config();
    cfg.grpc.max_response_bytes = 1 << 20;
    cfg.orchestration.workers.max_parent_results_bytes = 512 << 10;
    let budget = cfg.grpc.max_response_bytes;
    let server = TestServer::start(&pool, &cfg).await;
    let mut tasks = Tasks::new(server.channel().await);
    let big = || Some(blob_struct(250_000));
    for i in 0..40 {
        tasks
            .create_task(v1::CreateTaskRequest {
                namespace: "heavy".into(),
                name: format!("t{i}"),
                context: big(),
                steps: vec![step_def("a", &[])],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let steps: Vec<v1::StepDefinition> = (0..12)
        .map(|i| v1::StepDefinition {
            inputs: big(),
            ..step_def(&format!("s{i}"), &[])
        })
        .collect();
    let wide = tasks
        .create_task(v1::CreateTaskRequest {
            namespace: "heavy-steps".into(),
            name: "wide".into(),
            steps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let fit = budget / 250_000 + 1;

    // what the store reads for one page
    let store = tasker::testkit::Store::new(pool.clone());
    let query = tasker::testkit::TaskListQuery {
        namespace: Some("heavy".into()),
        limit: 1001,
        ..Default::default()
    };
    let (read, more) = store.list_tasks(&query, budget).await.unwrap();
    assert!(
        read.len() <= fit && more,
        "a page read {} contexts of 250 KB for a {budget}-byte response",
        read.len()
    );
    let task = uuid::Uuid::parse_str(&wide.task_uuid).unwrap();
    let (read, more) = store
        .get_steps(task, None, 1001, true, budget)
        .await
        .unwrap();
    assert!(
        read.len() <= fit && more,
        "a page read the data of {} steps",
        read.len()
    );

    // and paging through the API shows every task and every step once
    let mut seen = std::collections::HashSet::new();
    let mut token = String::new();
    loop {
        let page = tasks
            .list_tasks(v1::ListTasksRequest {
                namespace: "heavy".into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!page.tasks.is_empty() && page.tasks.len() < fit);
        for t in page.tasks {
            assert!(seen.insert(t.task_uuid), "a task shown twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 40);
    let mut steps_seen = 0;
    let mut token = String::new();
    loop {
        let page = tasks
            .get_task(v1::GetTaskRequest {
                task_uuid: wide.task_uuid.clone(),
                include_step_data: true,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got = page.task.unwrap().steps;
        assert!(got.iter().all(|s| s.inputs.is_some()));
        steps_seen += got.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(steps_seen, 12);
    server.stop().await;
}
