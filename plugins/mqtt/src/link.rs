//! Both ends over a broker: a device's link and a cloud worker's endpoint, each one rumqttc
//! client (MQTT v5, clean start) on its own network thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use mmpg::DeviceId;
use mmpg::transport::{CloudEndpoint, DeviceLink, Peer, Request, TransportError};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{Client, Connection, ConnectionError, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use crate::chunk::{Reassembler, split};
use crate::{BrokerSettings, MAX_MESSAGE, MAX_PACKET, REASSEMBLY_TIMEOUT, Topics};

/// A message that arrived: its topic and payload.
type Message = (String, Vec<u8>);

/// One client connection: publishes, and hands what arrives on its subscription to a channel.
struct Session {
    client: Client,
    messages: Receiver<Message>,
    stop: Arc<AtomicBool>,
    max_packet: usize,
    /// Numbers the chunked messages this session sends.
    sent: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Connects as `client_id`, subscribes to `filter` (again after every reconnect: with a
    /// clean start the broker forgets subscriptions, and rumqttc does not renew them), and
    /// returns once the broker has granted the subscription.
    fn open(settings: &BrokerSettings, client_id: &str, filter: String) -> Result<Self, TransportError> {
        let options = client_options(settings, client_id, settings.credentials.as_ref(), crate::MAX_INFLIGHT);
        let (client, connection) = Client::new(options, 64);
        let (messages_tx, messages) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_client, thread_stop) = (client.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("mqtt {client_id}"))
            .spawn(move || run(connection, &thread_client, &filter, &messages_tx, &ready_tx, &thread_stop))
            .map_err(|e| TransportError::Closed(format!("cannot start the MQTT thread: {e}")))?;
        let max_packet = settings.max_packet.min(MAX_PACKET as usize);
        let session = Self { client, messages, stop, max_packet, sent: AtomicU64::new(0) };
        let address = settings.url();
        match ready.recv_timeout(settings.connect_timeout) {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(e.at(&address)),
            Err(_) => Err(TransportError::Unreachable(format!(
                "MQTT broker {address}: no subscription granted within {:?}",
                settings.connect_timeout
            ))),
        }
    }

    /// Publishes `bytes` to `topic`, in chunks if the PUBLISH packet would exceed the packet
    /// limit (which counts MQTT's own header and the topic too).
    fn publish(&self, topic: &str, bytes: &[u8]) -> Result<(), TransportError> {
        let id = self.sent.fetch_add(1, Ordering::Relaxed);
        let payload_limit = self.max_packet.saturating_sub(publish_overhead(topic));
        let packets = split(bytes, id, payload_limit).map_err(|e| TransportError::Protocol(e.to_string()))?;
        for packet in packets {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, packet)
                .map_err(|e| TransportError::Closed(format!("MQTT publish: {e}")))?;
        }
        Ok(())
    }
}

/// How every mmpg client connects: MQTT v5 with a clean start (nothing is queued for it while it
/// is away), a 30 s keep-alive, packets up to [`MAX_PACKET`], at most `inflight` QoS 1 publishes
/// awaiting their PUBACK, TLS and `credentials` as given.
pub(crate) fn client_options(
    settings: &BrokerSettings,
    client_id: &str,
    credentials: Option<&crate::Credentials>,
    inflight: u16,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, settings.host.clone(), settings.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    options.set_max_packet_size(Some(MAX_PACKET));
    options.set_outgoing_inflight_upper_limit(inflight);
    if let Some(tls) = &settings.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
    }
    if let Some(c) = credentials {
        options.set_credentials(c.username.clone(), c.password.clone());
    }
    options
}

/// Bytes a QoS 1 PUBLISH to `topic` adds to its payload in MQTT v5: the fixed header (at most 5
/// bytes), the topic's length and bytes, the packet id, and an empty property length.
pub fn publish_overhead(topic: &str) -> usize {
    publish_overhead_of(topic.len())
}

/// [`publish_overhead`] of a topic of `topic_len` bytes.
pub const fn publish_overhead_of(topic_len: usize) -> usize {
    5 + 2 + topic_len + 2 + 1
}

/// A client id no other client can guess and take over (a broker drops the older of two
/// connections with one id): `prefix` and 64 random bits.
fn unguessable(prefix: &str) -> Result<String, TransportError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| TransportError::Closed(format!("no randomness for a client id: {e}")))?;
    Ok(format!("{prefix}-{:016x}", u64::from_le_bytes(bytes)))
}

impl Drop for Session {
    fn drop(&mut self) {
        // The thread ends at its next event; the broker learns at once.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}

/// Why a session could not start.
enum Failure {
    /// The network (refused, reset, timed out): worth trying again.
    Network(String),
    /// The broker's certificate was not trusted: trying again will not help.
    Tls(String),
    /// The broker refused this client (its MQTT v5 reason): not without new credentials or
    /// rights.
    Refused(String),
}

impl Failure {
    fn of(error: &ConnectionError) -> Self {
        match error {
            ConnectionError::Tls(e) => Failure::Tls(e.to_string()),
            ConnectionError::ConnectionRefused(code) => {
                Failure::Refused(format!("the connection was refused: {code:?}"))
            }
            e => Failure::Network(e.to_string()),
        }
    }

    fn at(self, address: &str) -> TransportError {
        match self {
            Failure::Network(e) => TransportError::Unreachable(format!("MQTT broker {address}: {e}")),
            Failure::Tls(e) => TransportError::Tls(format!("MQTT broker {address}: {e}")),
            Failure::Refused(why) => TransportError::Denied(format!("MQTT broker {address}: {why}")),
        }
    }
}

/// The network thread: drives the connection, renews the subscription after each connect, and
/// forwards what arrives until stopped.
fn run(
    mut connection: Connection,
    client: &Client,
    filter: &str,
    messages: &Sender<Message>,
    ready: &Sender<Result<(), Failure>>,
    stop: &AtomicBool,
) {
    for event in connection.iter() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                    let _ = ready.send(Err(Failure::Network(format!("subscribing to {filter}: {e}"))));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack.return_codes.iter().find(|c| !matches!(c, SubscribeReasonCode::Success(_)));
                let _ = ready.send(match refused {
                    None => Ok(()),
                    Some(code) => Err(Failure::Refused(format!("the subscription to {filter} was refused: {code:?}"))),
                });
            }
            // A retained message is one somebody left on the broker, not a live request or reply:
            // replayed to every worker that subscribes, it would be served again and again.
            Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {}
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if messages.send((topic, p.payload.to_vec())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let failure = Failure::of(&e);
                // Refused credentials or rights (a revoked device): trying again will not help,
                // and would only fill the broker's log. The session ends; its owner may open
                // another later.
                let permanent = matches!(failure, Failure::Refused(..) | Failure::Tls(_));
                let _ = ready.send(Err(failure));
                if permanent {
                    return;
                }
                // rumqttc reconnects on the next poll; not in a tight loop.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// A device's link through the broker: publishes its summary, waits for its parameters.
#[derive(Debug)]
pub struct MqttLink {
    session: Session,
    summary: String,
    params: String,
    reassembler: Reassembler,
}

impl MqttLink {
    /// Connects `device` to the broker (client id `mmpg-device-<id>`) and subscribes to its
    /// parameters topic.
    ///
    /// # Errors
    /// [`TransportError::Unreachable`] when the broker does not accept the connection or the
    /// subscription within `settings.connect_timeout`.
    pub fn connect(settings: &BrokerSettings, topics: &Topics, device: &DeviceId) -> Result<Self, TransportError> {
        let params = topics.params(device);
        let client_id = unguessable(&format!("mmpg-device-{}", crate::topics::level(device)))?;
        let session = Session::open(settings, &client_id, params.clone())?;
        let reassembler = Reassembler::new(MAX_MESSAGE, REASSEMBLY_TIMEOUT);
        Ok(Self { session, summary: topics.summary(device), params, reassembler })
    }
}

impl DeviceLink for MqttLink {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        // What arrived after an earlier request gave up is not this request's reply.
        while self.session.messages.try_recv().is_ok() {}
        let deadline = Instant::now() + timeout;
        self.session.publish(&self.summary, &request)?;
        let mut refused = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.session.messages.recv_timeout(left) {
                // A malformed chunk is dropped; the reply's own chunks may still complete it. If
                // none does, the timeout names the chunk at fault.
                Ok((topic, bytes)) if topic == self.params => match self.reassembler.push(&bytes, Instant::now()) {
                    Ok(Some(message)) => return Ok(message),
                    Ok(None) => {}
                    Err(e) => refused = Some(e),
                },
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(match refused {
                        Some(e) => TransportError::Protocol(format!("the cloud's reply, within {timeout:?}: {e}")),
                        None => TransportError::Timeout(timeout),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Closed("the MQTT connection's thread stopped".into()));
                }
            }
        }
    }
}

/// A device's link that connects to the broker when first used, and again after its connection
/// has ended for good (the broker refused it, or its network thread stopped): a device starts
/// and serves whether or not the broker is there, and a refusal (a revoked device) costs one
/// connection attempt per request instead of a reconnection loop.
#[derive(Debug)]
pub struct ReconnectingLink {
    settings: BrokerSettings,
    topics: Topics,
    device: DeviceId,
    link: Option<MqttLink>,
}

impl ReconnectingLink {
    /// A link for `device` that has not connected yet.
    pub fn new(settings: BrokerSettings, topics: Topics, device: DeviceId) -> Self {
        Self { settings, topics, device, link: None }
    }
}

impl DeviceLink for ReconnectingLink {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let link = match &mut self.link {
            Some(link) => link,
            None => self.link.insert(MqttLink::connect(&self.settings, &self.topics, &self.device)?),
        };
        let result = link.exchange(request, timeout);
        if matches!(result, Err(TransportError::Closed(_))) {
            self.link = None;
        }
        result
    }
}

/// Most senders a worker holds chunked messages of at once.
pub const MAX_SENDERS_IN_REASSEMBLY: usize = 4096;
/// Most bytes of chunked messages a worker holds at once, all senders together.
pub const MAX_REASSEMBLY_BYTES: usize = 256 << 20;

/// A cloud worker's endpoint: one member of the shared subscription `group`, so the broker
/// gives each summary to one worker.
///
/// What it holds is bounded per sender (one message of at most [`MAX_MESSAGE`] in reassembly)
/// and in total ([`MAX_SENDERS_IN_REASSEMBLY`], [`MAX_REASSEMBLY_BYTES`]); a chunk refused — its
/// header malformed, its message over a bound — is answered (the device learns why at once, not
/// by timing out) and said on stderr (at most [`REFUSAL_LINES_PER_S`] lines a second, the rest
/// counted).
///
/// The device a request comes from is read from its topic; it is an authenticated identity only
/// where the broker's ACL lets a device publish to its own summary topic alone.
#[derive(Debug)]
pub struct MqttEndpoint {
    session: Session,
    topics: Topics,
    waiting: HashMap<u64, DeviceId>,
    next_ticket: u64,
    /// Chunked summaries in reassembly, by device.
    partial: HashMap<DeviceId, Reassembler>,
    /// Bytes `partial` holds.
    buffered: usize,
    gate: Option<Gate>,
    refuse: Option<Refuser>,
    /// Refused chunks, and the stderr lines this second: (second's start, lines, left out).
    refused_chunks: u64,
    said: (Instant, u32, u64),
}

/// An unsigned error envelope refusing `device`'s message at the transport: sequence 0, so it
/// answers no request of the device's but ends the one outstanding, saying why
/// ([`mmpg::DeviceNode::accept`]).
pub fn refusal(device: &DeviceId, reason: &str) -> Vec<u8> {
    mmpg::wire::Envelope::error(device.clone(), 0, mmpg::SchemaHash(0), reason).encode().unwrap_or_default()
}

/// Lines a worker writes a second about refused chunks.
pub const REFUSAL_LINES_PER_S: u32 = 10;

/// The reply refusing a device's chunked message at the transport, saying why.
type Refuse = dyn Fn(&DeviceId, &str) -> Vec<u8> + Send;

/// Makes the reply refusing a chunked message.
struct Refuser(Box<Refuse>);

impl std::fmt::Debug for Refuser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refuser")
    }
}

/// Whether a request (its sender, its bytes) may be served at all; if not, the reply that says
/// why.
type Admit = dyn Fn(&Peer, &[u8]) -> Result<(), Vec<u8>> + Send;

/// Decides, before a request is handed on, whether its sender may be served at all.
struct Gate(Box<Admit>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl MqttEndpoint {
    /// Connects worker `worker` of shared-subscription `group`.
    ///
    /// # Errors
    /// As [`MqttLink::connect`]; a broker without shared subscriptions refuses the subscription.
    pub fn connect(
        settings: &BrokerSettings,
        topics: &Topics,
        group: &str,
        worker: &str,
    ) -> Result<Self, TransportError> {
        let client_id = unguessable(&format!("mmpg-cloud-{}", crate::topics::level(&DeviceId(worker.into()))))?;
        let session = Session::open(settings, &client_id, topics.shared_summaries(group))?;
        Ok(Self {
            session,
            topics: topics.clone(),
            waiting: HashMap::new(),
            next_ticket: 0,
            partial: HashMap::new(),
            buffered: 0,
            gate: None,
            refuse: None,
            refused_chunks: 0,
            said: (Instant::now(), 0, 0),
        })
    }

    /// The same endpoint answering a refused chunk with `refuse`'s reply (the cloud's signed
    /// error envelope) instead of an unsigned one.
    pub fn refusing(self, refuse: impl Fn(&DeviceId, &str) -> Vec<u8> + Send + 'static) -> Self {
        Self { refuse: Some(Refuser(Box::new(refuse))), ..self }
    }

    /// Chunks refused so far.
    pub fn refused_chunks(&self) -> u64 {
        self.refused_chunks
    }

    /// Takes one packet of `device`'s: the whole message when it is one (or completes one).
    /// A refused chunk is answered and said here.
    fn reassemble(&mut self, device: &DeviceId, packet: &[u8]) -> Option<Vec<u8>> {
        let now = Instant::now();
        if !packet.starts_with(crate::chunk::CHUNK_MAGIC) {
            return Some(packet.to_vec());
        }
        if !self.partial.contains_key(device) && self.partial.len() >= MAX_SENDERS_IN_REASSEMBLY {
            let before = self.partial.len();
            self.partial.retain(|_, r| !r.is_idle(now));
            self.buffered = self.partial.values().map(Reassembler::held).sum();
            if self.partial.len() >= MAX_SENDERS_IN_REASSEMBLY {
                let reason = format!("the cloud holds chunked messages of {before} devices; retry later");
                self.refuse_chunk(device, &reason, now);
                return None;
            }
        }
        let reassembler =
            self.partial.entry(device.clone()).or_insert_with(|| Reassembler::new(MAX_MESSAGE, REASSEMBLY_TIMEOUT));
        let before = reassembler.held();
        let pushed = reassembler.push(packet, now);
        let after = reassembler.held();
        self.buffered = self.buffered.saturating_sub(before) + after;
        let result = match pushed {
            Ok(message) if self.buffered > MAX_REASSEMBLY_BYTES => {
                drop(message);
                Err(format!("the cloud holds {MAX_REASSEMBLY_BYTES} bytes of chunked messages; retry later"))
            }
            Ok(message) => Ok(message),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(message) => {
                if message.is_some() && after == 0 {
                    self.partial.remove(device);
                }
                message
            }
            Err(reason) => {
                // What it held of this device's message is given up with the refusal.
                if let Some(r) = self.partial.remove(device) {
                    self.buffered = self.buffered.saturating_sub(r.held());
                }
                self.refuse_chunk(device, &reason, now);
                None
            }
        }
    }

    fn refuse_chunk(&mut self, device: &DeviceId, reason: &str, now: Instant) {
        self.refused_chunks += 1;
        if now.saturating_duration_since(self.said.0) >= Duration::from_secs(1) {
            if self.said.2 > 0 {
                eprintln!("mmpg cloud (mqtt): {} more refused chunks not shown", self.said.2);
            }
            self.said = (now, 0, 0);
        }
        if self.said.1 < REFUSAL_LINES_PER_S {
            self.said.1 += 1;
            eprintln!("mmpg cloud (mqtt): device `{device}`: chunk refused: {reason}");
        } else {
            self.said.2 += 1;
        }
        let reason = format!("chunk refused: {reason}");
        let reply = match &self.refuse {
            Some(refuse) => (refuse.0)(device, &reason),
            None => refusal(device, &reason),
        };
        // A reply the broker cannot take is that device's loss.
        let _ = self.session.publish(&self.topics.params(device), &reply);
    }

    /// The same endpoint handing on only requests `admit` accepts (a cloud's revocation list
    /// and rate limits); for the others `admit` returns the reply that says why (the cloud's
    /// signed error envelope), which goes straight back to the device.
    pub fn admitting(self, admit: impl Fn(&Peer, &[u8]) -> Result<(), Vec<u8>> + Send + 'static) -> Self {
        Self { gate: Some(Gate(Box::new(admit))), ..self }
    }
}

impl CloudEndpoint for MqttEndpoint {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<Request>, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.session.messages.recv_timeout(left) {
                Ok((topic, bytes)) => {
                    // Anything not a summary topic of this deployment is not a request.
                    let Some(device) = self.topics.device_of_summary(&topic) else { continue };
                    // A partial chunked message is not a request yet; a refused one never is.
                    let Some(bytes) = self.reassemble(&device, &bytes) else { continue };
                    let peer = Peer { identity: Some(device.clone()), address: format!("mqtt {topic}") };
                    if let Some(Err(refusal)) = self.gate.as_ref().map(|gate| (gate.0)(&peer, &bytes)) {
                        // A reply the broker cannot take is that device's loss.
                        let _ = self.session.publish(&self.topics.params(&device), &refusal);
                        continue;
                    }
                    self.next_ticket += 1;
                    self.waiting.insert(self.next_ticket, device);
                    return Ok(Some(Request { ticket: self.next_ticket, peer, bytes }));
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Closed("the MQTT connection's thread stopped".into()));
                }
            }
        }
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), TransportError> {
        match self.waiting.remove(&ticket) {
            Some(device) => self.session.publish(&self.topics.params(&device), &bytes),
            None => Ok(()),
        }
    }
}
