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
use axum::body::Bytes;
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

/// Most connections the server holds at once.
pub const MAX_CONNECTIONS: usize = 8192;

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
}

/// The device a connection's client certificate identifies (`None` without mutual TLS).
#[derive(Debug, Clone, Default)]
struct Identity(Option<String>);

/// What the service shows besides adaptation: readiness, the cloud's info, the device bundle.
#[derive(Debug, Default)]
pub struct Published {
    ready: AtomicBool,
    info: RwLock<Option<Vec<u8>>>,
    bundle: RwLock<Option<BundleFiles>>,
}

/// A published bundle: the manifest's bytes and every file by name.
type BundleFiles = (Vec<u8>, BTreeMap<String, Vec<u8>>);

impl Published {
    /// Publishes the cloud's info (JSON) and its device bundle, and becomes ready.
    pub fn ready(&self, info: Vec<u8>, bundle: &Bundle) {
        let mut files: BTreeMap<String, Vec<u8>> =
            bundle.files().into_iter().map(|(name, bytes)| (name.to_string(), bytes)).collect();
        if let Some(signature) = bundle.signature() {
            files.insert(mmpg::bundle::SIGNATURE.into(), signature.to_vec());
        }
        if let Ok(mut slot) = self.bundle.write() {
            *slot = Some((bundle.manifest_bytes().to_vec(), files));
        }
        if let Ok(mut slot) = self.info.write() {
            *slot = Some(info);
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
        let shared = Arc::new(Shared {
            queue,
            metrics: metrics.clone(),
            published,
            request_timeout: settings.request_timeout,
            guard: settings.guard.clone(),
        });
        let app = router(shared, settings.body_limit);
        let (stop, stopped) = oneshot::channel();
        let tls = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let timeout = settings.request_timeout;
        let thread = std::thread::Builder::new()
            .name("mmpg-http-accept".into())
            .spawn(move || runtime.block_on(accept_loop(listener, app, tls, timeout, stopped)))
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

async fn adapt(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(Identity(identity)): Extension<Identity>,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    s.metrics.received(body.len());
    if !s.published.is_ready() {
        s.metrics.outcome("not_ready");
        return not_ready();
    }
    let address = peer.to_string();
    if let Some(guard) = &s.guard {
        let claimed = Header::peek(&body).ok().map(|h| h.device);
        if let Err(denial) = guard.admit(identity.as_deref(), claimed, &address) {
            s.metrics.outcome(denial.label());
            return denied(&denial, identity.as_deref());
        }
    }
    let (reply, replied) = oneshot::channel();
    let delivery = Delivery { peer: Peer { identity: identity.map(DeviceId), address }, bytes: body.to_vec(), reply };
    match s.queue.try_send(delivery) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            s.metrics.outcome("busy");
            let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "the cloud is at capacity; retry later");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
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
            Some(bytes) => octets(StatusCode::OK, bytes.clone()),
            None => plain(StatusCode::NOT_FOUND, format!("no file `{file}` in the bundle")),
        },
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.published.is_ready() { plain(StatusCode::OK, "ready") } else { not_ready() }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    timeout: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that sends its headers too slowly is cut off, not waited for.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
    // An HTTP/2 peer that stops answering pings is dropped.
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(timeout).keep_alive_timeout(timeout);
    let builder = Arc::new(builder);
    // Connections beyond this are closed at once, so that a flood of idle sockets cannot take
    // every file descriptor the process has.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's header timeout starts with the first byte: a client that sends nothing at
            // all is cut off here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            let service = move |identity: Identity| {
                hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request.extensions_mut().insert(identity.clone());
                    tower::ServiceExt::oneshot(app.clone(), request)
                })
            };
            match tls {
                None => {
                    let service = service(Identity(None));
                    let _ = watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await;
                }
                Some(tls) => {
                    // Under mutual TLS a client without a valid certificate fails right here.
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, tls.accept(stream)).await else { return };
                    let identity =
                        stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(device_identity);
                    let service = service(Identity(identity));
                    let _ = watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(timeout, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn server() -> (CloudServer, HttpEndpoint) {
        let settings = ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            body_limit: 1 << 20,
            request_timeout: Duration::from_millis(300),
            queue: 4,
            guard: None,
        };
        CloudServer::start(settings, Arc::new(Published::default())).expect("server starts")
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
}
