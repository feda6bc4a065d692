//! Accepting connections within limits, for both of a node's gRPC listeners.
//!
//! A node's descriptors and memory must go to its log first. So every listener:
//! - holds at most `max_connections` open at once; the next one is accepted and closed at once
//!   (logged, at most once a second), so client connections can never take the descriptors
//!   that segments, WAL files and checkpoints need;
//! - backs off (10 ms doubling to 1 s) when `accept` fails for lack of descriptors or memory
//!   (EMFILE, ENFILE, ENOBUFS, ENOMEM), instead of spinning on the error;
//! - closes a connection that has not sent the 24-byte HTTP/2 preface within
//!   `handshake_timeout`, and one with no call in flight for `idle_timeout`;
//! - pings idle HTTP/2 connections (`keepalive_interval`) and drops a peer that does not answer
//!   within `keepalive_timeout`; bounds streams per connection (`max_concurrent_streams`) and
//!   the time a call may take to produce its response (`request_timeout`: a stream that sent
//!   headers and no body ends then).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Length of the HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;

/// The limits one listener enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 pings on a connection that sent nothing.
    pub keepalive_interval: Duration,
    /// Time a ping has to be answered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Longest a call may take to produce its response (a streamed response may then go on).
    pub request_timeout: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 1024,
            request_timeout: Duration::from_secs(600),
        }
    }
}

impl ListenLimits {
    /// A tonic server builder with these limits' HTTP/2 settings.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .timeout(self.request_timeout)
            // Bounded header blocks and resets: a client cannot grow either without limit.
            .http2_max_header_list_size(64 * 1024)
            .http2_max_pending_accept_reset_streams(Some(256))
    }
}

/// Counters a listener keeps, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ListenStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed because they sent no preface in time or stayed idle.
    pub timed_out: AtomicU64,
    /// Accepts that failed for lack of descriptors or memory.
    pub accept_errors: AtomicU64,
}

/// What a call sees of its connection (as a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    activity: Arc<Activity>,
}

/// Calls in flight on a connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `born` when a call last started or ended.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the connection becomes idle, or `None` while a call is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle)
    }
}

/// An accepted connection that enforces the handshake and idle timeouts and holds its slot.
pub struct Conn {
    io: TcpStream,
    info: ConnInfo,
    preface_left: usize,
    handshake: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    stats: Arc<ListenStats>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    fn timed_out(&self, what: &str) -> io::Error {
        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(remote = ?self.info.remote, "closing connection: {what}");
        io::Error::new(io::ErrorKind::TimedOut, what.to_string())
    }

    /// Checks the preface and idle deadlines, registering wake-ups for both.
    fn check_deadlines(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.preface_left > 0 && self.handshake.as_mut().poll(cx).is_ready() {
            return Err(self.timed_out("no HTTP/2 preface within the handshake timeout"));
        }
        loop {
            let deadline = self
                .info
                .activity
                .idle_deadline(self.idle_timeout)
                .unwrap_or_else(|| Instant::now() + self.idle_timeout);
            if self.idle.deadline().into_std() != deadline {
                self.idle.as_mut().reset(deadline.into());
            }
            if self.idle.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if self
                .info
                .activity
                .idle_deadline(self.idle_timeout)
                .is_some_and(|d| d <= Instant::now())
            {
                return Err(self.timed_out("idle for the idle timeout"));
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                this.preface_left = this.preface_left.saturating_sub(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.check_deadlines(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Whether an accept error means the process or system ran out of a resource.
fn resource_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// Accepts connections from `listener` within `limits`; `name` labels the logs.
///
/// The listener closes when the stream is dropped (as the server stops), so its address can be
/// bound again at once.
pub fn incoming(
    listener: TcpListener,
    limits: &ListenLimits,
    name: &'static str,
    stats: Arc<ListenStats>,
) -> Incoming {
    Incoming {
        listener,
        limits: limits.clone(),
        name,
        stats,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        backoff: Duration::ZERO,
        pause: None,
        last_refusal_log: None,
    }
}

/// The stream of connections [`incoming`] accepts.
pub struct Incoming {
    listener: TcpListener,
    limits: ListenLimits,
    name: &'static str,
    stats: Arc<ListenStats>,
    slots: Arc<Semaphore>,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    last_refusal_log: Option<Instant>,
}

impl Incoming {
    fn conn(&self, io: TcpStream, remote: SocketAddr, slot: OwnedSemaphorePermit) -> Conn {
        if let Err(e) = io.set_nodelay(true) {
            // Without it, Nagle and delayed ACKs stall small replies by ~40 ms.
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Conn {
            io,
            info: ConnInfo {
                remote: Some(remote),
                activity: Arc::new(Activity {
                    born: Instant::now(),
                    in_flight: AtomicUsize::new(0),
                    last_ms: AtomicU64::new(0),
                }),
            },
            preface_left: PREFACE_LEN,
            handshake: Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
            idle_timeout: self.limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
            stats: Arc::clone(&self.stats),
            _slot: slot,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(p) = this.pause.as_mut() {
                ready!(p.as_mut().poll(cx));
                this.pause = None;
            }
            let (io, remote) = match ready!(this.listener.poll_accept(cx)) {
                Ok(a) => {
                    this.backoff = Duration::ZERO;
                    a
                }
                Err(e) if resource_exhausted(&e) => {
                    this.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    this.backoff =
                        (this.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!(listener = this.name, error = %e,
                        backoff_ms = this.backoff.as_millis() as u64,
                        "cannot accept a connection: backing off");
                    this.pause = Some(Box::pin(tokio::time::sleep(this.backoff)));
                    continue;
                }
                // The connection failed before we took it (ECONNABORTED and kin): next one.
                Err(e) => {
                    tracing::debug!(listener = this.name, error = %e, "accept failed");
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&this.slots).try_acquire_owned() else {
                this.stats.refused.fetch_add(1, Ordering::Relaxed);
                if this
                    .last_refusal_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    this.last_refusal_log = Some(Instant::now());
                    tracing::warn!(listener = this.name, %remote,
                        max = this.limits.max_connections,
                        "connection limit reached: closing new connections");
                }
                drop(io);
                continue;
            };
            return Poll::Ready(Some(Ok(this.conn(io, remote, slot))));
        }
    }
}

/// A tower layer that serves every call with one node's request limits in scope (see
/// [`runnel_proto::wire::FieldLimits`]), so that nodes sharing a process keep their own.
#[derive(Clone, Debug, Default)]
pub struct ScopeLimits(pub runnel_proto::wire::FieldLimits);

impl<S> tower_layer::Layer<S> for ScopeLimits {
    type Service = Scoped<S>;

    fn layer(&self, inner: S) -> Scoped<S> {
        Scoped {
            inner,
            limits: self.0.clone(),
        }
    }
}

/// The service [`ScopeLimits`] makes.
#[derive(Clone, Debug)]
pub struct Scoped<S> {
    inner: S,
    limits: runnel_proto::wire::FieldLimits,
}

impl<S, R> tower_service::Service<R> for Scoped<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tokio::task::futures::TaskLocalFuture<runnel_proto::wire::FieldLimits, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.limits.scope(self.inner.call(req))
    }
}

/// A tower layer that counts a connection's calls in flight, for its idle timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackCalls;

impl<S> tower_layer::Layer<S> for TrackCalls {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner }
    }
}

/// The service [`TrackCalls`] makes.
#[derive(Clone, Debug)]
pub struct Tracked<S> {
    inner: S,
}

/// Marks a call in flight until dropped.
struct CallGuard(Option<Arc<Activity>>);

impl CallGuard {
    fn start(activity: Option<Arc<Activity>>) -> Self {
        if let Some(a) = &activity {
            a.in_flight.fetch_add(1, Ordering::AcqRel);
            a.touch();
        }
        CallGuard(activity)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.touch();
            a.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Tracked<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let activity = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| Arc::clone(&c.activity));
        let guard = CallGuard::start(activity);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // The call stays in flight until its response body ends (a Subscribe stream).
            Ok(resp.map(|body| {
                tonic::body::Body::new(GuardedBody {
                    inner: body,
                    _guard: guard,
                })
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call in flight.
    struct GuardedBody<B> {
        #[pin]
        inner: B,
        _guard: CallGuard,
    }
}

impl<B: http_body::Body> http_body::Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let r = ready!(self.project().inner.poll_frame(cx));
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limits(max: usize) -> ListenLimits {
        ListenLimits {
            max_connections: max,
            handshake_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..ListenLimits::default()
        }
    }

    /// Reads from `s` until EOF or error; `true` if the server closed it before `deadline`.
    async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn connections_past_the_maximum_are_closed_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stats = Arc::new(ListenStats::default());
        let mut inc = incoming(l, &limits(2), "test", Arc::clone(&stats));
        // The server polls its incoming stream all the time; so does this task.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(c) = tokio_stream::StreamExt::next(&mut inc).await {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        });
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            held.push(rx.recv().await.unwrap().unwrap());
        }
        assert!(
            held[0].io.nodelay().unwrap(),
            "replies would wait for delayed ACKs"
        );
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_server(&mut third, Duration::from_secs(5)).await);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 2);
        drop(held.pop());
        // A slot is free again: the next connection is handed over.
        let _c = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a freed slot takes a new connection");
        assert!(next.unwrap().is_ok());
    }

    #[tokio::test]
    async fn dropping_the_stream_frees_the_address_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let inc = incoming(l, &limits(2), "test", Arc::default());
        drop(inc);
        TcpListener::bind(addr)
            .await
            .expect("the address is free again");
    }

    #[tokio::test]
    async fn a_connection_without_preface_is_closed_after_the_handshake_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stats = Arc::new(ListenStats::default());
        let mut inc = incoming(l, &limits(8), "test", Arc::clone(&stats));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = tokio_stream::StreamExt::next(&mut inc)
            .await
            .unwrap()
            .unwrap();
        client.write_all(b"PRI * HTTP/2.0").await.unwrap(); // part of the preface only
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(_) => continue,
                    Err(e) => return Some(e.kind()),
                }
            }
        })
        .await
        .expect("the handshake timeout fires");
        assert_eq!(got, Some(io::ErrorKind::TimedOut));
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_without_calls_in_flight() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stats = Arc::new(ListenStats::default());
        let mut inc = incoming(l, &limits(8), "test", Arc::clone(&stats));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = tokio_stream::StreamExt::next(&mut inc)
            .await
            .unwrap()
            .unwrap();
        client.write_all(&[0u8; PREFACE_LEN]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), PREFACE_LEN);
        // A call in flight keeps it open past the idle timeout.
        let call = CallGuard::start(Some(Arc::clone(&conn.info.activity)));
        let r = tokio::time::timeout(Duration::from_millis(1500), conn.read(&mut buf)).await;
        assert!(r.is_err(), "closed while a call was in flight: {r:?}");
        drop(call);
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the idle timeout fires")
            .expect_err("an idle connection ends with an error");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(500));
    }
}
