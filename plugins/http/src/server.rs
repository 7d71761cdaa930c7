//! The cloud as an HTTP/1.1 and HTTP/2 service (axum routes on hyper, TLS through rustls).
//!
//! The server does not generate anything itself: `POST /v1/adapt` hands the body to an
//! [`HttpEndpoint`], the cloud's end of the exchange, and waits for the reply the cloud node
//! gives it. The node's loop micro-batches what arrives together.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mmpg::DeviceId;
use mmpg::bundle::Bundle;
use mmpg::security::{Denial, Guard};
use mmpg::transport::{CloudEndpoint, Peer, Request, TransportError};
use mmpg::wire::{Header, MessageKind};
use tokio::sync::oneshot;

use crate::HttpError;
use crate::metrics::Metrics;
use crate::tls::device_identity;

/// The content type of envelopes.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Most connections the server holds at once, by default.
pub const MAX_CONNECTIONS: usize = 8192;

/// What one peer, and all peers together, may hold of the server at once. A peer is the device
/// its client certificate names (mutual TLS); without mutual TLS devices cannot be told apart and
/// only the totals apply.
///
/// With these bounds the server's own memory beyond the cloud's model is at most
/// `connections × PER_CONNECTION + buffered_bytes` ([`Limits::worst_case_bytes`]), and one
/// peer's share of it at most `connections_per_peer × PER_CONNECTION + requests_per_peer ×
/// body_limit` ([`Limits::per_peer_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, all peers together (beyond it, closed at once).
    pub connections: usize,
    /// Connections not yet authenticated (TLS handshakes in progress), at once: the rest of
    /// `connections` stays for devices that have authenticated.
    pub handshakes: usize,
    /// Connections one authenticated peer holds at once.
    pub connections_per_peer: usize,
    /// Adaptation requests one authenticated peer has in flight at once (429 beyond).
    pub requests_per_peer: usize,
    /// Request bytes buffered at once, all peers together (503 beyond): each request reserves
    /// its declared length (or `body_limit` when it declares none) before its body is read.
    pub buffered_bytes: usize,
    /// A connection with no request in flight for this long is closed (the TLS handshake
    /// included), whatever its protocol: hyper's header timeout alone starts only with a first
    /// byte (hyper#3178).
    pub idle: Duration,
}

/// Worst-case bytes one connection holds in the server besides request bodies: the TLS
/// record buffers (rustls: 2 × 16 KiB and overhead), hyper's HTTP/1.1 read buffer
/// ([`H1_BUFFER`]) or HTTP/2's receive window ([`H2_WINDOW`]) and its headers
/// ([`H2_STREAMS`] × [`MAX_HEADERS`]).
pub const PER_CONNECTION: usize = 40 * 1024 + H2_WINDOW as usize + H2_STREAMS as usize * MAX_HEADERS;

/// hyper's HTTP/1.1 read buffer, at most (bytes).
const H1_BUFFER: usize = 64 * 1024;
/// HTTP/2 receive window per connection and per stream (bytes): what a peer may send ahead.
const H2_WINDOW: u32 = 256 * 1024;
/// HTTP/2 streams one connection may open at once.
const H2_STREAMS: u32 = 16;
/// Largest header block accepted (bytes).
const MAX_HEADERS: usize = 16 * 1024;
const _: () = assert!(H1_BUFFER <= H2_WINDOW as usize);

impl Limits {
    /// Defaults for a body limit and request timeout: 8,192 connections, a quarter of them in
    /// handshakes, 16 per peer, 4 requests in flight per peer, 64 request bodies buffered, idle
    /// after the request timeout.
    pub fn new(body_limit: usize, request_timeout: Duration) -> Self {
        Self {
            connections: MAX_CONNECTIONS,
            handshakes: MAX_CONNECTIONS / 4,
            connections_per_peer: 16,
            requests_per_peer: 4,
            buffered_bytes: 64 * body_limit,
            idle: request_timeout,
        }
    }

    /// The server's worst-case memory beyond the cloud's model, in bytes:
    /// `connections × PER_CONNECTION + buffered_bytes`.
    pub fn worst_case_bytes(&self) -> usize {
        self.connections.saturating_mul(PER_CONNECTION).saturating_add(self.buffered_bytes)
    }

    /// One authenticated peer's worst case, in bytes:
    /// `connections_per_peer × PER_CONNECTION + requests_per_peer × body_limit`.
    pub fn per_peer_bytes(&self, body_limit: usize) -> usize {
        self.connections_per_peer
            .saturating_mul(PER_CONNECTION)
            .saturating_add(self.requests_per_peer.saturating_mul(body_limit))
    }
}

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to bind (port 0: any free port).
    pub listen: SocketAddr,
    /// HTTPS when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest request body, in bytes (413 above).
    pub body_limit: usize,
    /// Longest a request may take from its body received to its reply (504 after), and the
    /// longest a client may take to send its headers or finish the TLS handshake.
    pub request_timeout: Duration,
    /// Requests waiting for the cloud before new ones are refused with 503.
    pub queue: usize,
    /// The gate every adaptation request passes (mutual TLS deployments): identity,
    /// revocation, impersonation, per-device rate.
    pub guard: Option<Arc<Guard>>,
    /// What one peer, and all together, may hold.
    pub limits: Limits,
}

/// The device a connection's client certificate identifies (`None` without mutual TLS).
#[derive(Debug, Clone, Default)]
struct Identity(Option<String>);

/// What the service shows besides adaptation: readiness, the cloud's info, the device bundle.
#[derive(Debug, Default)]
pub struct Published {
    ready: AtomicBool,
    info: RwLock<Option<bytes::Bytes>>,
    bundle: RwLock<Option<BundleFiles>>,
}

/// A published bundle: the manifest's bytes and every file by name. Shared, not copied, by
/// every response that sends them: a thousand devices fetching the model hold one copy.
type BundleFiles = (bytes::Bytes, BTreeMap<String, bytes::Bytes>);

impl Published {
    /// Publishes the cloud's info (JSON) and its device bundle, and becomes ready.
    pub fn ready(&self, info: Vec<u8>, bundle: &Bundle) {
        let mut files: BTreeMap<String, bytes::Bytes> =
            bundle.files().into_iter().map(|(name, bytes)| (name.to_string(), bytes.into())).collect();
        if let Some(signature) = bundle.signature() {
            files.insert(mmpg::bundle::SIGNATURE.into(), signature.to_vec().into());
        }
        if let Ok(mut slot) = self.bundle.write() {
            *slot = Some((bundle.manifest_bytes().to_vec().into(), files));
        }
        if let Ok(mut slot) = self.info.write() {
            *slot = Some(info.into());
        }
        self.ready.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// A request on its way to the cloud node, and where its reply goes.
struct Delivery {
    peer: Peer,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
}

struct Shared {
    queue: SyncSender<Delivery>,
    metrics: Arc<Metrics>,
    published: Arc<Published>,
    request_timeout: Duration,
    guard: Option<Arc<Guard>>,
    body_limit: usize,
    /// Request bytes that may still be buffered (permits are bytes).
    buffered: Arc<tokio::sync::Semaphore>,
}

/// What each authenticated peer holds now: connections and requests in flight. An entry lives
/// while the peer holds something, so the map is never larger than the connections held.
#[derive(Debug, Default)]
struct Peers(std::sync::Mutex<HashMap<String, (usize, usize)>>);

/// One unit a peer holds (a connection, or a request in flight); given back on drop.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<Peers>,
    peer: String,
    request: bool,
}

impl Peers {
    /// Takes a connection (`request = false`) or a request slot for `peer`, if it holds fewer
    /// than `max`.
    fn take(self: &Arc<Self>, peer: &str, request: bool, max: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A device already holding something costs no allocation: the common case.
        if !map.contains_key(peer) {
            map.insert(peer.to_string(), (0, 0));
        }
        let held = map.get_mut(peer)?;
        let count = if request { &mut held.1 } else { &mut held.0 };
        if *count >= max {
            if *held == (0, 0) {
                map.remove(peer);
            }
            return None;
        }
        *count += 1;
        Some(PeerSlot { peers: self.clone(), peer: peer.to_string(), request })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = map.get_mut(&self.peer) {
            let count = if self.request { &mut held.1 } else { &mut held.0 };
            *count = count.saturating_sub(1);
            if *held == (0, 0) {
                map.remove(&self.peer);
            }
        }
    }
}

/// A connection's requests in flight, when it last finished one, and when it last wrote to its
/// peer: what the idle watchdog reads.
#[derive(Debug)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<Instant>,
    wrote: std::sync::Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self { in_flight: 0.into(), last: std::sync::Mutex::new(now), wrote: std::sync::Mutex::new(now) })
    }

    fn wrote(&self) {
        *self.wrote.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    /// How long requests have been in flight without a byte written to the peer (zero when none
    /// is): a peer that never opens its window, or never reads, holds its responses.
    fn stuck_for(&self, now: Instant) -> Duration {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return Duration::ZERO;
        }
        let wrote = *self.wrote.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        now.saturating_duration_since(wrote.max(last))
    }

    /// A request started; it ends when the returned value is dropped (its response sent, or
    /// the connection gone).
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// How long the connection has had nothing in flight (zero while it has).
    fn idle_for(&self, now: Instant) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        now.saturating_duration_since(last)
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once `activity` has been idle for `idle`, or its requests have been in flight without
/// a byte sent for twice that (a request's own work is bounded by the request timeout, at most
/// `idle`; sending its response by another `idle`): the connection is then dropped.
async fn idle_watch(activity: Arc<Activity>, idle: Duration) {
    loop {
        let now = Instant::now();
        let (waited, stuck) = (activity.idle_for(now), activity.stuck_for(now));
        if waited >= idle || stuck >= 2 * idle {
            return;
        }
        let left = if activity.in_flight.load(Ordering::Acquire) > 0 { 2 * idle - stuck } else { idle - waited };
        tokio::time::sleep(left.clamp(Duration::from_millis(10), idle)).await;
    }
}

/// A connection's stream, noting every write that made progress.
struct Watched<Io> {
    io: Io,
    activity: Arc<Activity>,
}

impl<Io> Watched<Io> {
    /// `written`, noted as progress when it wrote anything.
    fn noted(&self, written: std::task::Poll<std::io::Result<usize>>) -> std::task::Poll<std::io::Result<usize>> {
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        written
    }
}

impl<Io: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<Io> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<Io> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(written)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The cloud's end of the HTTP exchange: requests that reached `POST /v1/adapt`.
#[derive(Debug)]
pub struct HttpEndpoint {
    requests: Receiver<Delivery>,
    waiting: HashMap<u64, oneshot::Sender<Vec<u8>>>,
    next_ticket: u64,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("peer", &self.peer).field("bytes", &self.bytes.len()).finish()
    }
}

impl CloudEndpoint for HttpEndpoint {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError> {
        match self.requests.recv_timeout(timeout) {
            Ok(d) => {
                self.next_ticket += 1;
                self.waiting.insert(self.next_ticket, d.reply);
                Ok(Some(Request { ticket: self.next_ticket, peer: d.peer, bytes: d.bytes }))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Closed("the HTTP server stopped".into())),
        }
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError> {
        // A client that timed out or hung up has dropped its receiver: nothing to do.
        if let Some(reply) = self.waiting.remove(&ticket) {
            let _ = reply.send(bytes);
        }
        Ok(())
    }
}

/// A running server. Dropping it (or [`CloudServer::shutdown`]) stops accepting, lets requests
/// in flight finish (up to the request timeout) and joins its threads.
#[derive(Debug)]
pub struct CloudServer {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl CloudServer {
    /// Binds `settings.listen` and starts serving on a runtime of its own; returns the server
    /// and the endpoint the cloud node answers from.
    ///
    /// # Errors
    /// [`HttpError::Bind`] when the address cannot be bound; [`HttpError::Runtime`].
    pub fn start(settings: ServerSettings, published: Arc<Published>) -> Result<(Self, HttpEndpoint), HttpError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("mmpg-http")
            .build()
            .map_err(|e| HttpError::Runtime(e.to_string()))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(settings.listen))
            .map_err(|e| HttpError::Bind { address: settings.listen, error: e.to_string() })?;
        let address = listener.local_addr().map_err(|e| HttpError::Runtime(e.to_string()))?;
        let (queue, requests) = mpsc::sync_channel(settings.queue.max(1));
        let metrics = Arc::new(Metrics::default());
        let limits = settings.limits;
        let peers = Arc::new(Peers::default());
        let shared = Arc::new(Shared {
            queue,
            metrics: metrics.clone(),
            published,
            request_timeout: settings.request_timeout,
            guard: settings.guard.clone(),
            body_limit: settings.body_limit,
            buffered: Arc::new(tokio::sync::Semaphore::new(limits.buffered_bytes.max(settings.body_limit))),
        });
        let app = router(shared, settings.body_limit);
        let (stop, stopped) = oneshot::channel();
        let tls = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let accept = Accept { app, tls, timeout: settings.request_timeout, limits, peers, metrics: metrics.clone() };
        let thread = std::thread::Builder::new()
            .name("mmpg-http-accept".into())
            .spawn(move || runtime.block_on(accept_loop(listener, accept, stopped)))
            .map_err(|e| HttpError::Runtime(e.to_string()))?;
        let endpoint = HttpEndpoint { requests, waiting: HashMap::new(), next_ticket: 0 };
        Ok((Self { address, stop: Some(stop), thread: Some(thread), metrics }, endpoint))
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its metrics (also what the cloud node's loop reports to).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Stops accepting, lets requests in flight finish, and returns when the server is down.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CloudServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn router(shared: Arc<Shared>, body_limit: usize) -> Router {
    let limit = shared.request_timeout;
    let readers = Router::new()
        .route("/v1/hello", get(hello))
        .route("/v1/bundle", get(manifest))
        .route("/v1/bundle/{file}", get(bundle_file))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), readers_only));
    Router::new()
        .route("/v1/adapt", post(adapt))
        .merge(readers)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(body_limit))
        // The whole request, its body's arrival included: a body sent one byte at a time is cut
        // off, not waited for.
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(limit, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => plain(StatusCode::REQUEST_TIMEOUT, format!("request not completed within {limit:?}")),
                }
            },
        ))
        .with_state(shared)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message.into() + "\n").into_response()
}

fn octets(status: StatusCode, bytes: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, OCTET_STREAM)], bytes).into_response()
}

fn not_ready() -> Response {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "the cloud is not ready: its generator is still loading");
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 403 for who the peer is, 429 (with `Retry-After`) for how often it asks.
fn denied(denial: &Denial, identity: Option<&str>) -> Response {
    match denial {
        Denial::RateLimited { retry_after } => {
            let mut r = plain(StatusCode::TOO_MANY_REQUESTS, denial.message(identity));
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, value);
            }
            r
        }
        _ => plain(StatusCode::FORBIDDEN, denial.message(identity)),
    }
}

/// `POST /v1/adapt`. What is cheap and needs no body is checked before a byte of the body is
/// read: readiness, the declared length, the peer's identity, revocation and rate, its requests
/// in flight, and the server's room for buffered bytes. Only then is the body read (bounded), and
/// the envelope's claimed device checked against the identity.
async fn adapt(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(Identity(identity)): Extension<Identity>,
    request: axum::extract::Request,
) -> Response {
    let started = Instant::now();
    if !s.published.is_ready() {
        s.metrics.outcome("not_ready");
        return not_ready();
    }
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared.filter(|l| *l > s.body_limit as u64) {
        s.metrics.outcome("too_large");
        let message = format!("a body of {length} bytes is over this cloud's limit of {} bytes", s.body_limit);
        return plain(StatusCode::PAYLOAD_TOO_LARGE, message);
    }
    let address = peer.to_string();
    if let Some(guard) = &s.guard
        && let Err(denial) = guard.admit(identity.as_deref(), None, &address)
    {
        s.metrics.outcome(denial.label());
        return denied(&denial, identity.as_deref());
    }
    // Bytes reserved before reading: the declared length, or the limit for a body that declares
    // none (chunked); given back when the reply is sent.
    let reserve = declared.and_then(|l| usize::try_from(l).ok()).unwrap_or(s.body_limit).max(1);
    let Ok(_reserved) = s.buffered.clone().try_acquire_many_owned(u32::try_from(reserve).unwrap_or(u32::MAX)) else {
        s.metrics.outcome("busy");
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cloud is at capacity for request bodies; retry later",
        );
    };
    let body = match axum::body::to_bytes(request.into_body(), s.body_limit).await {
        Ok(body) => body,
        Err(e) if is_length_limit(&e) => {
            s.metrics.outcome("too_large");
            let message = format!("the body is over this cloud's limit of {} bytes", s.body_limit);
            return plain(StatusCode::PAYLOAD_TOO_LARGE, message);
        }
        Err(e) => {
            s.metrics.outcome("cut_short");
            return plain(StatusCode::BAD_REQUEST, format!("the body was cut short: {e}"));
        }
    };
    s.metrics.received(body.len());
    if let Some(guard) = &s.guard
        && let Some(claimed) = Header::peek(&body).ok().map(|h| h.device)
        && let Err(denial) = guard.admit_claim(identity.as_deref(), claimed, &address)
    {
        s.metrics.outcome(denial.label());
        return denied(&denial, identity.as_deref());
    }
    let (reply, replied) = oneshot::channel();
    let delivery = Delivery { peer: Peer { identity: identity.map(DeviceId), address }, bytes: body.to_vec(), reply };
    drop(body);
    match s.queue.try_send(delivery) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            s.metrics.outcome("busy");
            return retry_later(StatusCode::SERVICE_UNAVAILABLE, "the cloud is at capacity; retry later");
        }
        Err(TrySendError::Disconnected(_)) => {
            s.metrics.outcome("not_ready");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the cloud is shutting down");
        }
    }
    match tokio::time::timeout(s.request_timeout, replied).await {
        Ok(Ok(bytes)) => {
            s.metrics.replied(bytes.len(), started.elapsed());
            // An error reply is still an envelope: the device reads why from it.
            let status = match mmpg::wire::peek_kind(&bytes) {
                Some(MessageKind::Params) => StatusCode::OK,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            if let Some(guard) = s.guard.as_ref().filter(|_| status != StatusCode::OK) {
                guard.audit_if_replayed(&bytes, &peer.to_string());
            }
            octets(status, bytes)
        }
        Ok(Err(_)) => plain(StatusCode::SERVICE_UNAVAILABLE, "the cloud dropped the request"),
        Err(_) => {
            s.metrics.outcome("timeout");
            plain(StatusCode::GATEWAY_TIMEOUT, format!("no reply within {:?}", s.request_timeout))
        }
    }
}

/// Whether reading a body failed on the size limit (not on a peer that hung up).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A refusal the peer may retry after a second.
fn retry_later(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = plain(status, message);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Under mutual TLS, what is not adaptation (info, bundle, metrics) is still only for an
/// authenticated device that is not revoked.
async fn readers_only(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(Identity(identity)): Extension<Identity>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(guard) = &s.guard
        && let Err(refused) = guard.admit_reader(identity.as_deref(), &peer.to_string())
    {
        s.metrics.outcome(refused.label());
        return denied(&refused, identity.as_deref());
    }
    next.run(request).await
}

async fn hello(State(s): State<Arc<Shared>>) -> Response {
    match s.published.info.read().ok().and_then(|i| i.clone()) {
        Some(info) => ([(header::CONTENT_TYPE, "application/json")], info).into_response(),
        None => not_ready(),
    }
}

async fn manifest(State(s): State<Arc<Shared>>) -> Response {
    match s.published.bundle.read().ok().and_then(|b| b.as_ref().map(|(m, _)| m.clone())) {
        Some(m) => ([(header::CONTENT_TYPE, "application/json")], m).into_response(),
        None => not_ready(),
    }
}

async fn bundle_file(State(s): State<Arc<Shared>>, Path(file): Path<String>) -> Response {
    let Ok(bundle) = s.published.bundle.read() else { return not_ready() };
    match bundle.as_ref() {
        None => not_ready(),
        Some((_, files)) => match files.get(&file) {
            Some(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, OCTET_STREAM)], bytes.clone()).into_response(),
            None => plain(StatusCode::NOT_FOUND, format!("no file `{file}` in the bundle")),
        },
    }
}

/// Ready once the cloud serves; a revocation list that cannot be taken is said here too (the
/// previous list stays in force, so the cloud still serves).
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if !s.published.is_ready() {
        return not_ready();
    }
    match s.guard.as_ref().and_then(|g| g.revocations().problem()) {
        Some(problem) => plain(StatusCode::OK, format!("ready; degraded: revocation list: {problem}")),
        None => plain(StatusCode::OK, "ready"),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    if let Some(guard) = &s.guard {
        s.metrics.security(guard.revocations().problem().is_none(), &guard.suppressed());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

/// What the accept loop needs for every connection.
struct Accept {
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    timeout: Duration,
    limits: Limits,
    peers: Arc<Peers>,
    metrics: Arc<Metrics>,
}

async fn accept_loop(listener: tokio::net::TcpListener, accept: Accept, mut stopped: oneshot::Receiver<()>) {
    let Accept { app, tls, timeout, limits, peers, metrics } = accept;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that sends its headers too slowly is cut off, not waited for.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(H1_BUFFER);
    // What one HTTP/2 connection may make the server hold: streams, window, headers. Idle
    // connections are closed by the idle watchdog, not by pings (a peer answering pings would
    // keep an idle connection forever).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS)
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .max_header_list_size(MAX_HEADERS as u32)
        .max_send_buf_size(H2_WINDOW as usize);
    let builder = Arc::new(builder);
    // Connections beyond this are closed at once, so that a flood of sockets cannot take every
    // file descriptor the process has; unauthenticated ones have a smaller share of their own.
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: back off rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.outcome("connections");
            continue;
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            metrics.outcome("handshakes");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            peer,
            limits,
            peers: peers.clone(),
            metrics: metrics.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's header timeout starts with the first byte: a client that sends nothing at
            // all is cut off here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            match tls {
                None => {
                    drop(handshake);
                    connection.serve(stream, None).await;
                }
                Some(tls) => {
                    // Under mutual TLS a client without a valid certificate fails right here.
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, tls.accept(stream)).await else { return };
                    drop(handshake);
                    let identity =
                        stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(device_identity);
                    connection.serve(stream, identity).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(timeout, graceful.shutdown()).await;
}

/// One accepted connection, ready to serve once its peer is known.
struct Connection {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
    limits: Limits,
    peers: Arc<Peers>,
    metrics: Arc<Metrics>,
}

impl Connection {
    /// Serves HTTP/1.1 or HTTP/2 on `io` until the peer closes it, the server stops, or it has
    /// been idle for `limits.idle`; an authenticated peer over its connection count is closed
    /// at once.
    async fn serve<Io>(self, io: Io, identity: Option<String>)
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection { app, builder, watcher, peer, limits, peers, metrics } = self;
        let _peer_slot = match identity.as_deref() {
            Some(id) => match peers.take(id, false, limits.connections_per_peer) {
                Some(slot) => Some(slot),
                None => {
                    metrics.outcome("peer_connections");
                    return;
                }
            },
            None => None,
        };
        let activity = Activity::new();
        let watched = activity.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(Identity(identity.clone()));
            // Every route counts against the device's requests in flight until its response's
            // body is sent: a device cannot hold more by asking for bundle files instead.
            let taken = identity.as_deref().map(|id| peers.take(id, true, limits.requests_per_peer));
            let refused = matches!(taken, Some(None));
            let slot = taken.flatten();
            let in_flight = watched.start();
            let app = app.clone();
            let metrics = metrics.clone();
            let id = identity.clone().unwrap_or_default();
            async move {
                if refused {
                    metrics.outcome("peer_requests");
                    let n = limits.requests_per_peer;
                    let plural = if n == 1 { "" } else { "s" };
                    let message = format!("device `{id}` already has {n} request{plural} in flight");
                    return Ok(retry_later(StatusCode::TOO_MANY_REQUESTS, message));
                }
                let response = tower::ServiceExt::oneshot(app, request).await?;
                // In flight until the response's body is sent (or the connection drops).
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                        let _ = (&in_flight, &slot);
                        frame
                    }))
                }))
            }
        });
        let io = Watched { io, activity: activity.clone() };
        let serve = watcher.watch(builder.serve_connection(TokioIo::new(io), service).into_owned());
        tokio::select! {
            _ = serve => {}
            () = idle_watch(activity, limits.idle) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use proptest::prelude::*;

    use super::*;

    fn server_with(limits: Limits, ready: bool) -> (CloudServer, HttpEndpoint) {
        let settings = ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            body_limit: 1 << 20,
            request_timeout: Duration::from_millis(300),
            queue: 4,
            guard: None,
            limits,
        };
        let published = Arc::new(Published::default());
        if ready {
            let schema = mmpg::SlotSchema::new(vec![mmpg::SlotSpec::f32("w", vec![1])]).expect("schema");
            let entry = |p: &str| mmpg::bundle::PluginEntry { plugin: p.into(), settings: mmpg::toml::Table::new() };
            let reference = mmpg::FeatureStats { mean: vec![0.0], std: vec![1.0] };
            let bundle = Bundle::new(vec![1], reference, schema, (entry("m"), entry("a")), "t".into());
            published.ready(b"{}".to_vec(), &bundle);
        }
        CloudServer::start(settings, published).expect("server starts")
    }

    fn server() -> (CloudServer, HttpEndpoint) {
        server_with(Limits::new(1 << 20, Duration::from_millis(300)), true)
    }

    /// Reads until the server closes the connection (bounded); returns what it sent.
    fn until_closed(stream: &mut std::net::TcpStream) -> String {
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout set");
        let mut out = Vec::new();
        let read = stream.read_to_end(&mut out);
        assert!(read.is_ok(), "the server closes the connection: {read:?}");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_client_that_sends_nothing_is_disconnected() {
        let (server, _endpoint) = server();
        let mut stream = std::net::TcpStream::connect(server.address()).expect("connects");
        assert_eq!(until_closed(&mut stream), "");
    }

    #[test]
    fn a_body_that_never_arrives_is_cut_off() {
        let (server, _endpoint) = server();
        let mut stream = std::net::TcpStream::connect(server.address()).expect("connects");
        let head = "POST /v1/adapt HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\nM";
        stream.write_all(head.as_bytes()).expect("sent");
        let answer = until_closed(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    /// Issue 28: a length over the limit is refused on its declaration, before any body byte.
    #[test]
    fn an_oversized_declared_length_is_refused_at_once() {
        let (server, _endpoint) = server();
        let mut stream = std::net::TcpStream::connect(server.address()).expect("connects");
        let head = "POST /v1/adapt HTTP/1.1\r\nhost: x\r\ncontent-length: 900000000\r\n\r\n";
        stream.write_all(head.as_bytes()).expect("sent");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout set");
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).expect("an answer without the body");
        assert_eq!(&answer, b"HTTP/1.1 413");
    }

    /// Issue 28 (hyper#3178): a keep-alive connection that finished its request and then sends
    /// nothing is closed after the idle time, not held forever.
    #[test]
    fn a_keep_alive_connection_left_idle_is_closed() {
        let (server, _endpoint) = server();
        let mut stream = std::net::TcpStream::connect(server.address()).expect("connects");
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").expect("sent");
        let answer = until_closed(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
    }

    /// Issue 28: request bodies are reserved against the server's total before they are read;
    /// past it, a request is refused at once (503), and the room comes back when they end.
    #[test]
    fn buffered_bytes_are_bounded_in_total() {
        let limits = Limits { buffered_bytes: 1 << 20, ..Limits::new(1 << 20, Duration::from_secs(5)) };
        let (server, _endpoint) = server_with(limits, true);
        let open = |n: usize| {
            let mut stream = std::net::TcpStream::connect(server.address()).expect("connects");
            let head = format!("POST /v1/adapt HTTP/1.1\r\nhost: x\r\ncontent-length: {n}\r\n\r\nM");
            stream.write_all(head.as_bytes()).expect("sent");
            stream
        };
        let held = [open(500_000), open(500_000)];
        std::thread::sleep(Duration::from_millis(200));
        let mut third = open(500_000);
        third.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout set");
        let mut answer = [0u8; 12];
        third.read_exact(&mut answer).expect("an answer at once");
        assert_eq!(&answer, b"HTTP/1.1 503");
        drop(held);
    }

    proptest! {
        /// Whatever the order of takes and releases, no peer holds more than its maximum, and
        /// the map forgets a peer that holds nothing.
        #[test]
        fn peers_never_hold_more_than_their_share(ops in proptest::collection::vec((0u8..3, any::<bool>(), any::<bool>()), 1..200), max in 1usize..5) {
            let peers = Arc::new(Peers::default());
            let mut held: Vec<PeerSlot> = Vec::new();
            for (peer, request, release) in ops {
                if release && !held.is_empty() {
                    held.remove(0);
                } else if let Some(slot) = peers.take(&peer.to_string(), request, max) {
                    held.push(slot);
                }
                for p in 0u8..3 {
                    for r in [false, true] {
                        let n = held.iter().filter(|s| s.peer == p.to_string() && s.request == r).count();
                        prop_assert!(n <= max);
                    }
                }
            }
            held.clear();
            prop_assert!(peers.0.lock().expect("lock").is_empty());
        }
    }
}
