//! Who holds the server's connection slots, and whether they use them.
//!
//! A connection slot is worth keeping while its connection has a call open. Without this, 1,024
//! clients that finished the HTTP/2 handshake and then only answered PINGs held every slot, and
//! legitimate clients were refused for as long as they stayed. So every connection is in the
//! [`Connections`] registry with its [`ConnectionActivity`] (calls open now, idle since when),
//! kept by the [`CallAccounting`] layer, and:
//!
//! - a new connection when every slot is taken closes the one idle longest with no call open
//!   to take its slot (only when every connection has a call open is the newcomer refused);
//! - a connection with no call open for `grpc.idle_timeout_seconds` is closed;
//! - one peer address holds at most `grpc.max_connections_per_peer` connections.
//!
//! ```text
//!  accept ─> admit(peer): per-peer cap? ─> slot free? take it
//!                                     └─> all taken: evict the idle longest (no call open)
//!                                                    or refuse when every one has a call
//!  call starts ─> open += 1          call's response ends ─> open -= 1 (0: idle from now)
//!  sweep (every second): idle past idle_timeout ─> close
//! ```
//!
//! Closing a connection cancels its [`ConnectionActivity::closed`] token, which the connection's
//! reads turn into end-of-stream: the HTTP/2 server then ends the connection.
//!
//! The same layer caps the standard health service's Watch streams (`grpc.max_health_watches`):
//! they are open to callers without a token, and each costs a task and its buffers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;

/// The connection a request came on: its addresses (as tonic's `TcpConnectInfo`) and its
/// activity. Every request carries it in its extensions.
#[derive(Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub activity: Arc<ConnectionActivity>,
}

impl ConnectionInfo {
    pub fn peer(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }
}

/// One connection's use of its slot.
pub struct ConnectionActivity {
    id: u64,
    peer: IpAddr,
    /// Calls open on the connection now (a call is open until its response has ended).
    open_calls: AtomicUsize,
    /// Milliseconds since the registry's epoch when the last call ended (or the connection
    /// was accepted): how long it has been idle, while no call is open.
    idle_since_ms: AtomicU64,
    /// Cancelled when the connection is to be closed.
    pub closed: CancellationToken,
    registry: Arc<Registry>,
}

impl ConnectionActivity {
    fn idle_since(&self) -> Option<u64> {
        (self.open_calls.load(Ordering::Acquire) == 0)
            .then(|| self.idle_since_ms.load(Ordering::Acquire))
    }

    /// A call started on this connection; it is open until the guard drops.
    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.open_calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

impl Drop for ConnectionActivity {
    fn drop(&mut self) {
        self.registry.remove(self.id, self.peer);
    }
}

/// Keeps a call counted as open on its connection.
struct CallGuard(Arc<ConnectionActivity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.registry.now_ms(), Ordering::Release);
        a.open_calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the accept loop holds to the connections.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub idle_timeout: Duration,
}

/// The registry of open connections.
#[derive(Clone)]
pub struct Connections {
    registry: Arc<Registry>,
    limits: ConnectionLimits,
}

struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    /// Every open connection (weakly: a connection that ends removes itself).
    by_id: HashMap<u64, std::sync::Weak<ConnectionActivity>>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: u64, peer: IpAddr) {
        let mut open = self.lock();
        if open.by_id.remove(&id).is_some() {
            if let Some(n) = open.per_peer.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.per_peer.remove(&peer);
                }
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its peer address holds `grpc.max_connections_per_peer` connections.
    PerPeer,
    /// Every slot is taken by a connection with a call open.
    Full,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            registry: Arc::new(Registry {
                epoch: Instant::now(),
                next_id: AtomicU64::new(0),
                open: Mutex::new(Open::default()),
            }),
            limits,
        }
    }

    /// A slot for a new connection from `peer`: a free one, or the one of the connection idle
    /// longest with no call open, which is closed.
    pub fn admit(&self, peer: IpAddr) -> Result<Arc<ConnectionActivity>, Refusal> {
        let mut open = self.registry.lock();
        if open.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_per_peer {
            return Err(Refusal::PerPeer);
        }
        if open.by_id.len() >= self.limits.max_connections {
            let idlest = open
                .by_id
                .iter()
                .filter_map(|(id, a)| {
                    let a = a.upgrade()?;
                    Some((a.idle_since()?, *id, a))
                })
                .min_by_key(|(since, id, _)| (*since, *id));
            let Some((_, id, victim)) = idlest else {
                return Err(Refusal::Full);
            };
            open.by_id.remove(&id);
            if let Some(n) = open.per_peer.get_mut(&victim.peer) {
                *n -= 1;
                if *n == 0 {
                    open.per_peer.remove(&victim.peer);
                }
            }
            victim.closed.cancel();
            tracing::debug!(peer = %victim.peer, "closed the connection idle longest to admit a new one");
        }
        let activity = Arc::new(ConnectionActivity {
            id: self.registry.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            open_calls: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.registry.now_ms()),
            closed: CancellationToken::new(),
            registry: self.registry.clone(),
        });
        open.by_id.insert(activity.id, Arc::downgrade(&activity));
        *open.per_peer.entry(peer).or_default() += 1;
        Ok(activity)
    }

    /// Close the connections with no call open for longer than the idle timeout; how many.
    pub fn close_idle(&self) -> usize {
        let limit = self.limits.idle_timeout.as_millis() as u64;
        let now = self.registry.now_ms();
        let open = self.registry.lock();
        let mut closed = 0;
        for a in open.by_id.values().filter_map(std::sync::Weak::upgrade) {
            if a.idle_since()
                .is_some_and(|since| now.saturating_sub(since) > limit)
                && !a.closed.is_cancelled()
            {
                a.closed.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Close idle connections every second until `stop`.
    pub async fn sweep_idle(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let closed = self.close_idle();
            if closed > 0 {
                tracing::debug!(
                    closed,
                    "closed connections idle past grpc.idle_timeout_seconds"
                );
            }
        }
    }
}

/// The path of the standard health service's Watch.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// A tower layer that counts every call as open on its connection until its response ends,
/// and caps the health service's Watch streams.
#[derive(Clone)]
pub struct CallAccounting {
    health_watches: Arc<Semaphore>,
    max_health_watches: usize,
}

impl CallAccounting {
    pub fn new(max_health_watches: usize) -> Self {
        Self {
            health_watches: Arc::new(Semaphore::new(max_health_watches)),
            max_health_watches,
        }
    }
}

impl<S> tower::Layer<S> for CallAccounting {
    type Service = CallAccountingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallAccountingService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallAccountingService<S> {
    inner: S,
    layer: CallAccounting,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CallAccountingService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<Accounted<ResBody>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let mut held = Held::default();
        if req.uri().path() == HEALTH_WATCH {
            match self.layer.health_watches.clone().try_acquire_owned() {
                Ok(permit) => held.permit = Some(permit),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "{} health Watch streams are open (grpc.max_health_watches); use Check, or retry later",
                        self.layer.max_health_watches
                    ));
                    return Box::pin(async move {
                        Ok(status.into_http::<ResBody>().map(Accounted::bare))
                    });
                }
            }
        }
        held.call = req
            .extensions()
            .get::<ConnectionInfo>()
            .map(|c| c.activity.call_started());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| Accounted { body, held }))
        })
    }
}

/// What a call holds until its response ends.
#[derive(Default)]
struct Held {
    call: Option<CallGuard>,
    permit: Option<OwnedSemaphorePermit>,
}

/// A response body that keeps its call counted (and its permit held) until it ends.
pub struct Accounted<B> {
    body: B,
    held: Held,
}

impl<B> Accounted<B> {
    fn bare(body: B) -> Self {
        Self {
            body,
            held: Held::default(),
        }
    }
}

impl<B: Default> Default for Accounted<B> {
    fn default() -> Self {
        Self::bare(B::default())
    }
}

impl<B> http_body::Body for Accounted<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // the response has ended: the call no longer holds its connection or permit
            self.held = Held::default();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_peer: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            max_per_peer: per_peer,
            idle_timeout: Duration::from_secs(60),
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn a_full_server_closes_the_connection_idle_longest_never_one_in_a_call() {
        let c = Connections::new(limits(3, 10));
        let busy = c.admit(A).unwrap();
        let _call = busy.call_started();
        tokio::time::advance(Duration::from_millis(10)).await;
        let older = c.admit(A).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let newer = c.admit(A).unwrap();
        let _fourth = c.admit(B).expect("admitted by closing an idle connection");
        assert!(
            older.closed.is_cancelled(),
            "the idle-longest one is closed"
        );
        assert!(!newer.closed.is_cancelled() && !busy.closed.is_cancelled());
        let fifth = c.admit(B).unwrap();
        assert!(newer.closed.is_cancelled());
        // with a call open on every connection, a newcomer is refused
        let _calls = [_fourth.call_started(), fifth.call_started()];
        assert_eq!(c.admit(B).err(), Some(Refusal::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn one_peer_holds_at_most_its_share_and_a_closed_connection_frees_it() {
        let c = Connections::new(limits(10, 2));
        let first = c.admit(A).unwrap();
        let _second = c.admit(A).unwrap();
        assert_eq!(c.admit(A).err(), Some(Refusal::PerPeer));
        assert!(c.admit(B).is_ok());
        drop(first);
        assert!(c.admit(A).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_idle_past_the_timeout_are_closed() {
        let c = Connections::new(limits(10, 10));
        let idle = c.admit(A).unwrap();
        let busy = c.admit(A).unwrap();
        let call = busy.call_started();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(c.close_idle(), 1);
        assert!(idle.closed.is_cancelled() && !busy.closed.is_cancelled());
        drop(call);
        assert_eq!(c.close_idle(), 0, "idle from the end of its call");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(c.close_idle(), 1);
    }
}
