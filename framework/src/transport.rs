//! The two ends a cloud-device exchange needs, in the shape of a client/server protocol: a
//! device's [`DeviceLink`] sends one request and waits for its reply; the cloud's
//! [`CloudEndpoint`] receives requests from many devices and replies to each. A [`Transport`]
//! (a plugin) makes both ends; [`Metered`] counts the bytes of any link.
//!
//! The in-process transport carries bytes over channels inside one process (`mmpg run`,
//! `mmpg bench`); HTTP(S) (`mmpg cloud serve`, `mmpg device`) implements the same ends.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::DeviceId;
use crate::security::CloudKey;
use crate::wire::{Envelope, WireError};

/// Why a transport call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// The bytes received are not a valid message.
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    /// The message is larger than the transport carries.
    #[error("message of {size} bytes exceeds the transport's limit of {limit}")]
    TooLarge {
        /// Message size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer could not be reached (connection refused, reset, DNS).
    #[error("cannot reach {0}")]
    Unreachable(String),
    /// The peer's identity could not be verified (its certificate is not trusted, expired, or for
    /// another name). Trying again will not help.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer answered with a failure status (HTTP 4xx/5xx); `status` is the protocol's code.
    #[error("the cloud answered {status}: {message}")]
    Status {
        /// Protocol status code (e.g. HTTP 503).
        status: u16,
        /// The body or reason phrase.
        message: String,
    },
    /// The peer or link is gone.
    #[error("link closed: {0}")]
    Closed(String),
    /// A broker or gateway in between refused this client (bad credentials, not authorised,
    /// banned): trying again will not help until its credentials or rights change.
    #[error("refused: {0}")]
    Denied(String),
    /// The peer answered something the protocol does not allow (not an error worth retrying).
    #[error("the cloud's answer is not valid: {0}")]
    Protocol(String),
}

impl TransportError {
    /// A short name of the failure's kind, for counters and logs (`timeout`, `unreachable`,
    /// `status-503`, …).
    pub fn kind(&self) -> String {
        match self {
            TransportError::Wire(WireError::Signature(_) | WireError::Unsigned) => "bad-signature".into(),
            TransportError::Wire(_) => "malformed".into(),
            TransportError::TooLarge { .. } => "too-large".into(),
            TransportError::Timeout(_) => "timeout".into(),
            TransportError::Unreachable(_) => "unreachable".into(),
            TransportError::Tls(_) => "tls".into(),
            TransportError::Status { status, .. } => format!("status-{status}"),
            TransportError::Closed(_) => "closed".into(),
            TransportError::Protocol(_) => "protocol".into(),
            TransportError::Denied(_) => "denied".into(),
        }
    }

    /// Whether trying again later may succeed (the network or the cloud's load), as opposed to a
    /// request the cloud will refuse however often it is sent.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Timeout(_) | TransportError::Unreachable(_) | TransportError::Closed(_) => true,
            TransportError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            TransportError::Wire(_)
            | TransportError::TooLarge { .. }
            | TransportError::Tls(_)
            | TransportError::Protocol(_)
            | TransportError::Denied(_) => false,
        }
    }
}

/// Bytes and messages moved per device and direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Bytes device → cloud.
    pub bytes_up: u64,
    /// Bytes cloud → device.
    pub bytes_down: u64,
    /// Messages device → cloud.
    pub messages_up: u64,
    /// Messages cloud → device.
    pub messages_down: u64,
}

/// A device's end: one request out, its reply back. Required: the byte exchange; envelope
/// encoding and decoding are provided.
pub trait DeviceLink: Send {
    /// Sends `request` and waits at most `timeout` for the reply's bytes.
    ///
    /// # Errors
    /// [`TransportError::Timeout`] when no reply came in time; the others as the link meets them.
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError>;

    /// Encodes `envelope`, exchanges it and decodes the reply (which the caller still validates:
    /// it comes from the network).
    fn request(&mut self, envelope: &Envelope, timeout: Duration) -> Result<Envelope, TransportError> {
        let reply = self.exchange(envelope.encode()?, timeout)?;
        Ok(Envelope::decode(&reply)?)
    }
}

/// Who sent a request, as far as the transport can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The device identity the transport authenticated (a link bound to one device, a client
    /// certificate), if any; the cloud refuses an envelope claiming another.
    pub identity: Option<DeviceId>,
    /// The address, for logs (`in-process`, `127.0.0.1:53122`).
    pub address: String,
}

/// A request waiting at the cloud for its reply.
#[derive(Debug)]
pub struct Request {
    /// What the endpoint needs to route the reply back.
    pub ticket: u64,
    /// The sender.
    pub peer: Peer,
    /// The request's bytes, untrusted.
    pub bytes: Vec<u8>,
}

/// The cloud's end: requests from many devices, one reply each.
pub trait CloudEndpoint: Send {
    /// The next request from any device, waiting at most `timeout`; `None` when none came.
    ///
    /// # Errors
    /// [`TransportError::Closed`] once no request can arrive any more.
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError>;

    /// Sends the reply to the request with `ticket`. A device that has gone is not an error of
    /// the cloud's: such replies are dropped.
    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError>;
}

/// Makes the two ends of one protocol: the plugin kind `[transport]` chooses.
pub trait Transport: Send {
    /// The cloud's end. Links made after it reach it.
    fn endpoint(&mut self) -> Result<Box<dyn CloudEndpoint>, TransportError>;

    /// The end of the device `device`.
    fn link(&mut self, device: &DeviceId) -> Result<Box<dyn DeviceLink>, TransportError>;
}

/// Counts what crosses any link: wraps it, and is a link itself.
#[derive(Debug)]
pub struct Metered<L> {
    inner: L,
    traffic: Traffic,
}

impl<L: DeviceLink> Metered<L> {
    /// Counts `inner`'s traffic from now on.
    pub fn new(inner: L) -> Self {
        Self { inner, traffic: Traffic::default() }
    }

    /// What has crossed so far: every request sent, every reply received (including error
    /// replies; requests that failed to send are not counted).
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }
}

impl<L: DeviceLink> DeviceLink for Metered<L> {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let size = request.len() as u64;
        let result = self.inner.exchange(request, timeout);
        // A timed-out request still left the device.
        if !matches!(
            result,
            Err(TransportError::TooLarge { .. } | TransportError::Unreachable(_) | TransportError::Tls(_))
        ) {
            self.traffic.bytes_up += size;
            self.traffic.messages_up += 1;
        }
        if let Ok(reply) = &result {
            self.traffic.bytes_down += reply.len() as u64;
            self.traffic.messages_down += 1;
        }
        result
    }
}

/// A device link that passes on only replies the cloud signed: each reply's signature is
/// verified (`verify_strict`, [`wire::open_signed`](crate::wire::open_signed)) before anything
/// reads the envelope, which goes on without it; a bad one is
/// [`TransportError::Wire`]`(`[`WireError::Signature`]`)`, kind `bad-signature`. With no key (a
/// deployment without `[security]`) replies pass as they are. Put it outside [`Metered`] so the
/// bytes counted are those on the wire.
#[derive(Debug)]
pub struct Verified<L> {
    inner: L,
    key: Option<CloudKey>,
    last_signed: Option<Vec<u8>>,
}

impl<L: DeviceLink> Verified<L> {
    /// Checks `inner`'s replies with `key`.
    pub fn new(inner: L, key: Option<CloudKey>) -> Self {
        Self { inner, key, last_signed: None }
    }

    /// The link it checks.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// The last reply that verified, as it arrived (signature and all): what a device saves, so
    /// that what it restores later is checked with the cloud's key again. `None` without a key.
    pub fn take_signed(&mut self) -> Option<Vec<u8>> {
        self.last_signed.take()
    }
}

impl<L: DeviceLink> DeviceLink for Verified<L> {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let reply = self.inner.exchange(request, timeout)?;
        self.last_signed = None;
        match &self.key {
            None => Ok(reply),
            Some(key) => {
                let envelope = crate::wire::open_signed(&reply, key)?.to_vec();
                self.last_signed = Some(reply);
                Ok(envelope)
            }
        }
    }
}

impl DeviceLink for Box<dyn DeviceLink> {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        (**self).exchange(request, timeout)
    }
}

/// Two cloud endpoints served as one: requests from either, each reply routed back through the
/// endpoint its request came from (a cloud worker taking adaptation requests over a broker and
/// over HTTP at once). Neither starves the other: they are asked in turn, and while both are
/// idle each is waited on for at most [`Merged::SLICE`] at a time.
#[derive(Debug)]
pub struct Merged<A, B> {
    a: A,
    b: B,
    /// Our ticket → (from `a`?, its ticket there).
    routes: std::collections::HashMap<u64, (bool, u64)>,
    next_ticket: u64,
    a_first: bool,
    closed: (bool, bool),
}

impl<A: CloudEndpoint, B: CloudEndpoint> Merged<A, B> {
    /// The longest one endpoint is waited on while the other may have a request.
    pub const SLICE: Duration = Duration::from_millis(2);

    /// Serves `a` and `b` as one endpoint.
    pub fn new(a: A, b: B) -> Self {
        Self { a, b, routes: Default::default(), next_ticket: 0, a_first: true, closed: (false, false) }
    }

    /// Asks one endpoint, waiting at most `wait`; a closed one is remembered and skipped.
    fn ask(&mut self, from_a: bool, wait: Duration) -> Result<Option<Request>, TransportError> {
        let (endpoint, closed): (&mut dyn CloudEndpoint, &mut bool) =
            if from_a { (&mut self.a, &mut self.closed.0) } else { (&mut self.b, &mut self.closed.1) };
        if *closed {
            return Ok(None);
        }
        match endpoint.next_request(wait) {
            Ok(Some(mut request)) => {
                self.next_ticket += 1;
                self.routes.insert(self.next_ticket, (from_a, request.ticket));
                request.ticket = self.next_ticket;
                Ok(Some(request))
            }
            Ok(None) => Ok(None),
            Err(TransportError::Closed(_)) => {
                *closed = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl<A: CloudEndpoint, B: CloudEndpoint> CloudEndpoint for Merged<A, B> {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.closed == (true, true) {
                return Err(TransportError::Closed("both endpoints closed".into()));
            }
            let first = self.a_first;
            self.a_first = !first;
            for from_a in [first, !first] {
                if let Some(request) = self.ask(from_a, Duration::ZERO)? {
                    return Ok(Some(request));
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Both idle: wait a slice on one (alternating), then look at both again.
            let wait = if self.closed.0 || self.closed.1 { left } else { left.min(Self::SLICE) };
            let from_a = if self.closed.0 {
                false
            } else if self.closed.1 {
                true
            } else {
                first
            };
            if let Some(request) = self.ask(from_a, wait)? {
                return Ok(Some(request));
            }
        }
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError> {
        match self.routes.remove(&ticket) {
            Some((true, inner)) => self.a.reply(inner, bytes),
            Some((false, inner)) => self.b.reply(inner, bytes),
            None => Ok(()),
        }
    }
}

impl CloudEndpoint for Box<dyn CloudEndpoint> {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError> {
        (**self).next_request(timeout)
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError> {
        (**self).reply(ticket, bytes)
    }
}

/// What crosses the in-process channel: the request and where its reply goes.
type Delivery = (Request, Sender<Result<Vec<u8>, TransportError>>);

/// Channels inside one process. For simulation and tests: nothing leaves the process, but every
/// byte is encoded, counted and decoded exactly as over a network, and cloud and devices share
/// nothing else.
#[derive(Debug, Default)]
pub struct InProcess {
    hub: Option<SyncSender<Delivery>>,
    max_message: Option<usize>,
}

impl InProcess {
    /// A transport with no message size limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport that refuses messages above `limit` bytes, like a broker would.
    pub fn with_limit(limit: usize) -> Self {
        Self { hub: None, max_message: Some(limit) }
    }
}

/// Requests waiting in the in-process channel before senders block.
const IN_PROCESS_QUEUE: usize = 4096;

impl Transport for InProcess {
    fn endpoint(&mut self) -> Result<Box<dyn CloudEndpoint>, TransportError> {
        let (tx, rx) = mpsc::sync_channel(IN_PROCESS_QUEUE);
        self.hub = Some(tx);
        Ok(Box::new(InProcessEndpoint {
            requests: Arc::new(Mutex::new(rx)),
            waiting: Default::default(),
            next_ticket: 0,
            max_message: self.max_message,
        }))
    }

    fn link(&mut self, device: &DeviceId) -> Result<Box<dyn DeviceLink>, TransportError> {
        let hub = self.hub.clone().ok_or_else(|| TransportError::Closed("no cloud endpoint yet".into()))?;
        Ok(Box::new(InProcessLink { device: device.clone(), hub, max_message: self.max_message }))
    }
}

fn check_size(size: usize, limit: Option<usize>) -> Result<(), TransportError> {
    match limit {
        Some(limit) if size > limit => Err(TransportError::TooLarge { size, limit }),
        _ => Ok(()),
    }
}

#[derive(Debug)]
struct InProcessLink {
    device: DeviceId,
    hub: SyncSender<Delivery>,
    max_message: Option<usize>,
}

impl DeviceLink for InProcessLink {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        check_size(request.len(), self.max_message)?;
        let (reply_tx, reply_rx) = mpsc::channel();
        let peer = Peer { identity: Some(self.device.clone()), address: "in-process".into() };
        self.hub
            .send((Request { ticket: 0, peer, bytes: request }, reply_tx))
            .map_err(|_| TransportError::Closed("the cloud endpoint is gone".into()))?;
        match reply_rx.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => Err(TransportError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                Err(TransportError::Closed("the cloud dropped the request unanswered".into()))
            }
        }
    }
}

#[derive(Debug)]
struct InProcessEndpoint {
    requests: Arc<Mutex<Receiver<Delivery>>>,
    waiting: std::collections::HashMap<u64, Sender<Result<Vec<u8>, TransportError>>>,
    next_ticket: u64,
    max_message: Option<usize>,
}

impl CloudEndpoint for InProcessEndpoint {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError> {
        let received = {
            let rx = self.requests.lock().map_err(|_| TransportError::Closed("endpoint poisoned".into()))?;
            rx.recv_timeout(timeout)
        };
        match received {
            Ok((mut request, reply)) => {
                self.next_ticket += 1;
                request.ticket = self.next_ticket;
                self.waiting.insert(request.ticket, reply);
                Ok(Some(request))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Closed("every device link is gone".into())),
        }
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError> {
        let Some(reply) = self.waiting.remove(&ticket) else { return Ok(()) };
        // Over the limit, the device learns why instead of waiting for its timeout.
        let message = check_size(bytes.len(), self.max_message).map(|()| bytes);
        let refused = message.as_ref().err().cloned();
        let _ = reply.send(message);
        refused.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SchemaHash;
    use crate::wire::MessageKind;

    #[test]
    fn a_merged_endpoint_answers_each_request_through_the_endpoint_it_came_from() {
        let (mut one, mut two) = (InProcess::new(), InProcess::new());
        let mut merged = Merged::new(one.endpoint().expect("endpoint"), two.endpoint().expect("endpoint"));
        let links = [one.link(&DeviceId("a".into())).expect("link"), two.link(&DeviceId("b".into())).expect("link")];
        let asking: Vec<_> = links
            .into_iter()
            .enumerate()
            .map(|(i, mut link)| std::thread::spawn(move || link.exchange(vec![i as u8], Duration::from_secs(10))))
            .collect();
        for _ in 0..2 {
            let request = loop {
                if let Some(r) = merged.next_request(Duration::from_millis(100)).expect("serves") {
                    break r;
                }
            };
            let mut reply = request.peer.identity.map(|d| d.0.into_bytes()).unwrap_or_default();
            reply.extend(&request.bytes);
            merged.reply(request.ticket, reply).expect("replied");
        }
        let replies: Vec<Vec<u8>> = asking.into_iter().map(|t| t.join().expect("thread").expect("reply")).collect();
        assert_eq!(replies, [b"a\x00".to_vec(), b"b\x01".to_vec()]);
    }

    fn envelope(device: &str) -> Envelope {
        Envelope {
            kind: MessageKind::Params,
            schema_hash: SchemaHash(1),
            device: DeviceId(device.into()),
            sequence: 0,
            nonce: 0,
            payload: vec![],
        }
    }

    /// Answers every request by echoing it, on its own thread, until the links are gone.
    fn echo(mut endpoint: Box<dyn CloudEndpoint>) -> std::thread::JoinHandle<Vec<Peer>> {
        std::thread::spawn(move || {
            let mut peers = Vec::new();
            while let Ok(next) = endpoint.next_request(Duration::from_secs(5)) {
                let Some(request) = next else { break };
                peers.push(request.peer.clone());
                let _ = endpoint.reply(request.ticket, request.bytes);
            }
            peers
        })
    }

    #[test]
    fn in_process_links_reach_the_endpoint_and_are_metered() {
        let mut t = InProcess::new();
        let cloud = echo(t.endpoint().expect("endpoint"));
        let a = envelope("a");
        let mut link = Metered::new(t.link(&a.device).expect("link"));
        let reply = link.request(&a, Duration::from_secs(5)).expect("reply");
        assert_eq!(reply, a);
        let size = a.encode().expect("encodes").len() as u64;
        assert_eq!((link.traffic().bytes_up, link.traffic().bytes_down), (size, size));
        drop((link, t));
        let peers = cloud.join().expect("echo thread");
        assert_eq!(peers, vec![Peer { identity: Some(a.device), address: "in-process".into() }]);
    }

    #[test]
    fn messages_over_the_limit_are_refused_and_not_counted() {
        let mut t = InProcess::with_limit(8);
        let _endpoint = t.endpoint().expect("endpoint");
        let mut link = Metered::new(t.link(&DeviceId("a".into())).expect("link"));
        let sent = link.request(&envelope("a"), Duration::from_secs(1));
        assert!(matches!(sent, Err(TransportError::TooLarge { .. })));
        assert_eq!(link.traffic(), &Traffic::default());
    }

    #[test]
    fn an_unanswered_request_times_out() {
        let mut t = InProcess::new();
        let _endpoint = t.endpoint().expect("endpoint");
        let mut link = t.link(&DeviceId("a".into())).expect("link");
        let sent = link.exchange(vec![1, 2, 3], Duration::from_millis(20));
        assert!(matches!(sent, Err(TransportError::Timeout(_))));
        assert!(sent.expect_err("timed out").is_transient());
    }

    #[test]
    fn garbage_replies_are_a_wire_error() {
        let mut t = InProcess::new();
        let mut endpoint = t.endpoint().expect("endpoint");
        let cloud = std::thread::spawn(move || {
            if let Ok(Some(r)) = endpoint.next_request(Duration::from_secs(5)) {
                let _ = endpoint.reply(r.ticket, vec![1, 2, 3]);
            }
        });
        let mut link = t.link(&DeviceId("x".into())).expect("link");
        assert!(matches!(link.request(&envelope("x"), Duration::from_secs(5)), Err(TransportError::Wire(_))));
        cloud.join().expect("cloud thread");
    }

    #[test]
    fn a_link_without_an_endpoint_is_closed() {
        assert!(matches!(InProcess::new().link(&DeviceId("a".into())), Err(TransportError::Closed(_))));
    }
}
