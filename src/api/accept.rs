//! Accepting connections under limits, before tonic sees them: the slots of `connections`
//! (a cap on open connections, per peer too, with the idlest giving way to a newcomer), TCP
//! no-delay and keepalive, and a deadline by which a new connection must have finished its TLS
//! handshake and sent the HTTP/2 preface. A socket that never speaks is closed at the deadline
//! instead of being held forever; a connection the registry closes reads end-of-stream.
//!
//! TLS is done here (tokio-rustls) rather than by tonic so that the preface deadline applies
//! to the decrypted stream: a client that completes the handshake and then idles is closed
//! too.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::connections::{ConnectionActivity, ConnectionInfo, Connections, Refusal};

/// The HTTP/2 client preface is 24 bytes; a connection has not started until it has sent them.
const PREFACE_BYTES: u64 = 24;

/// What an accepted connection must live up to.
#[derive(Clone)]
pub struct AcceptPolicy {
    pub connections: Connections,
    pub handshake_timeout: Duration,
    pub tcp_keepalive: Duration,
    pub tls: Option<TlsAcceptor>,
}

/// A TLS acceptor from PEM files, advertising HTTP/2.
pub fn tls_acceptor(cert_path: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_path)
        .with_context(|| format!("reading grpc.tls.cert_path {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing grpc.tls.cert_path {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading grpc.tls.key_path {}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("grpc.tls: protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("grpc.tls: certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The accepted connections, each within the policy, as a stream for tonic. The accept loop
/// ends when the stream is dropped (the server shut down).
pub fn incoming(
    listener: TcpListener,
    policy: AcceptPolicy,
) -> impl tokio_stream::Stream<Item = io::Result<Connection>> {
    let (tx, rx) = mpsc::channel::<io::Result<Connection>>(64);
    tokio::spawn(async move {
        let mut refused_since_log = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                // per-connection failures (ECONNABORTED, EMFILE): keep accepting
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let slot = match policy.connections.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refusal) => {
                    // closed at once: a client at the cap gets a reset, not a hang
                    drop(tcp);
                    refused_since_log += 1;
                    if refused_since_log == 1 || refused_since_log.is_multiple_of(1000) {
                        let why = match refusal {
                            Refusal::PerPeer => {
                                "grpc.max_connections_per_peer reached for this peer"
                            }
                            Refusal::Full => {
                                "grpc.max_connections reached, every connection with a call open"
                            }
                        };
                        tracing::warn!(%peer, refused = refused_since_log, "connection refused: {why}");
                    }
                    continue;
                }
            };
            refused_since_log = 0;
            let policy = policy.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match Connection::establish(tcp, peer, slot, &policy).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection closed before it started")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection: it holds its slot in the registry until it closes, errors its
/// reads if the HTTP/2 preface has not arrived by the deadline, and reads end-of-stream once
/// the registry closes it.
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
    preface_read: u64,
    preface_deadline: Pin<Box<Sleep>>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Connection {
    async fn establish(
        tcp: TcpStream,
        peer: SocketAddr,
        slot: Arc<ConnectionActivity>,
        policy: &AcceptPolicy,
    ) -> io::Result<Self> {
        let deadline = tokio::time::Instant::now() + policy.handshake_timeout;
        tcp.set_nodelay(true)?;
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(policy.tcp_keepalive))?;
        let info = ConnectionInfo {
            tcp: TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(peer),
            },
            activity: slot,
        };
        let io = match &policy.tls {
            None => Io::Plain(tcp),
            Some(acceptor) => {
                let tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                Io::Tls(Box::new(tls))
            }
        };
        let closed = Box::pin(info.activity.closed.clone().cancelled_owned());
        Ok(Self {
            io,
            info,
            preface_read: 0,
            preface_deadline: Box::pin(tokio::time::sleep_until(deadline)),
            closed,
        })
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed.as_mut().poll(cx).is_ready() {
            // closed by the registry (idle, or giving way to a newcomer): end of stream
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if this.preface_read >= PREFACE_BYTES {
            return polled;
        }
        this.preface_read += (buf.filled().len() - before) as u64;
        if polled.is_pending()
            && this.preface_read < PREFACE_BYTES
            && this.preface_deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within grpc.handshake_timeout_seconds",
            )));
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}
