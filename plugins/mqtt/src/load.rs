//! A load generator over the broker: N devices, each its own MQTT connection (rumqttc's async
//! client on one runtime), first all connected and subscribed, then each publishing summary
//! envelopes as fast as its replies come, for a fixed time. Bytes are counted as MQTT packets
//! (PUBLISH and PUBACK both ways, framing included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmpg::DeviceId;
use mmpg::load::{LoadReport, WireBytes, load_device};
use mmpg::slots::SchemaHash;
use mmpg::wire::{Envelope, MAX_SEQUENCE, MessageKind};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;

use crate::chunk::{Reassembler, split};
use crate::link::client_options;
use crate::{BrokerSettings, Credentials, MAX_MESSAGE, MqttError, REASSEMBLY_TIMEOUT, Topics};

/// A PUBACK without properties: fixed header, packet id (MQTT v5 omits a success reason code).
const PUBACK_BYTES: u64 = 4;

/// What to load and for how long.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// The broker (TLS, limits); each device's credentials come from `credentials`.
    pub broker: BrokerSettings,
    /// The deployment's topics.
    pub topics: Topics,
    /// Concurrent devices (`load-00000`, …).
    pub devices: usize,
    /// How long to send, once every device is connected.
    pub duration: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Device `i`'s user name and password, where the broker asks for them.
    pub credentials: Option<Arc<Vec<Credentials>>>,
    /// Connections being set up at once (TLS handshakes and password checks are the broker's
    /// costliest work).
    pub connect_concurrency: usize,
}

/// One device's results.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<f64>,
    errors: BTreeMap<String, u64>,
    wire: WireBytes,
}

impl Tally {
    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// A connected device: its client, what arrives on its params topic, and how many bytes came.
struct Connected {
    client: AsyncClient,
    replies: mpsc::UnboundedReceiver<Vec<u8>>,
    received: Arc<std::sync::atomic::AtomicU64>,
}

/// Connects device `i` and subscribes to its params topic; `None` (with the failure counted)
/// if the broker does not grant it within the timeout.
async fn connect(settings: &LoadSettings, i: usize, tally: &mut Tally) -> Option<Connected> {
    let id = DeviceId(load_device(i));
    let b = &settings.broker;
    let credentials = settings.credentials.as_ref().and_then(|all| all.get(i));
    // One request at a time: a few publishes in flight suffice (see MAX_INFLIGHT).
    let options = client_options(b, &format!("mmpg-load-{}", crate::topics::level(&id)), credentials, 16);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (replies_tx, replies) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = received.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    counted.fetch_add(p.size() as u64 + PUBACK_BYTES, std::sync::atomic::Ordering::Relaxed);
                    if replies_tx.send(p.payload.to_vec()).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let granted = ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                    let _ = ready_tx.send(if granted { Ok(()) } else { Err("subscribe-refused".to_string()) });
                }
                Ok(_) => {}
                Err(e) => {
                    // The failure's kind, as the report counts it.
                    let kind = match &e {
                        rumqttc::v5::ConnectionError::ConnectionRefused(code) => format!("connect-refused-{code:?}"),
                        rumqttc::v5::ConnectionError::Tls(_) => "connect-tls".to_string(),
                        _ => "connect".to_string(),
                    };
                    let refused = matches!(e, rumqttc::v5::ConnectionError::ConnectionRefused(_));
                    let _ = ready_tx.send(Err(kind));
                    if refused {
                        return;
                    }
                    // The client is gone (the device finished) or the connection failed.
                    if matches!(e, rumqttc::v5::ConnectionError::RequestsDone) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    let params = settings.topics.params(&id);
    if client.subscribe(params, QoS::AtLeastOnce).await.is_err() {
        tally.error("connect");
        return None;
    }
    match tokio::time::timeout(b.connect_timeout, ready.recv()).await {
        Ok(Some(Ok(()))) => Some(Connected { client, replies, received }),
        Ok(Some(Err(kind))) => {
            tally.error(&kind);
            None
        }
        Ok(None) => {
            tally.error("connect");
            None
        }
        Err(_) => {
            tally.error("connect-timeout");
            None
        }
    }
}

/// One device's load: envelopes with its id and increasing sequences (after the last the cloud
/// remembers), until `until`.
async fn device(
    settings: Arc<LoadSettings>,
    i: usize,
    mut link: Connected,
    template: (SchemaHash, Vec<u8>),
    until: Instant,
    mut tally: Tally,
) -> Tally {
    let id = DeviceId(load_device(i));
    let summary_topic = settings.topics.summary(&id);
    let mut reassembler = Reassembler::new(MAX_MESSAGE, REASSEMBLY_TIMEOUT);
    let mut sequence = 0u64;
    let mut message_id = 0u64;
    while Instant::now() < until {
        let Some(next) = sequence.checked_add(1).filter(|s| *s < MAX_SEQUENCE) else {
            tally.error("sequence-exhausted");
            break;
        };
        sequence = next;
        let Ok(body) = Envelope::new(MessageKind::Summary, template.0, id.clone(), sequence, template.1.clone())
            .and_then(|e| e.encode())
        else {
            tally.error("encode");
            break;
        };
        message_id += 1;
        let limit = settings.broker.max_packet.saturating_sub(crate::link::publish_overhead(&summary_topic));
        let Ok(packets) = split(&body, message_id, limit) else {
            tally.error("chunk");
            break;
        };
        // Anything still queued belongs to an earlier request that gave up.
        while link.replies.try_recv().is_ok() {}
        let t0 = Instant::now();
        let mut sent = true;
        for packet in packets {
            let size = Publish::new(summary_topic.as_str(), QoS::AtLeastOnce, packet.clone(), None).size() as u64;
            tally.wire.up += size + PUBACK_BYTES;
            tally.wire.payload += packet.len() as u64;
            if link.client.publish(summary_topic.as_str(), QoS::AtLeastOnce, false, packet).await.is_err() {
                sent = false;
                break;
            }
        }
        if !sent {
            tally.error("publish");
            break;
        }
        let deadline = tokio::time::Instant::now() + settings.timeout;
        let outcome = loop {
            match tokio::time::timeout_at(deadline, link.replies.recv()).await {
                Ok(Some(bytes)) => {
                    tally.wire.payload += bytes.len() as u64;
                    let Ok(Some(message)) = reassembler.push(&bytes, Instant::now()) else { continue };
                    let envelope = mmpg::wire::unchecked_envelope(&message).and_then(|b| Envelope::decode(b).ok());
                    match envelope {
                        // A late answer to an earlier request that gave up: not this one's.
                        Some(e) if e.sequence != sequence => {}
                        other => break Some(other),
                    }
                }
                Ok(None) => {
                    tally.error("closed");
                    return tally;
                }
                Err(_) => break None,
            }
        };
        let Some(reply) = outcome else {
            tally.error("timeout");
            continue;
        };
        match reply {
            Some(e) if e.kind == MessageKind::Params => {
                tally.latencies.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            // A cloud remembering this device's later sequences (an earlier load): number after
            // them, as a device does.
            Some(e) if e.last_accepted().is_some_and(|l| l >= sequence && l + 1 < MAX_SEQUENCE) => {
                sequence = e.last_accepted().unwrap_or(sequence);
            }
            Some(e) if e.kind == MessageKind::Error => tally.error("refused"),
            _ => tally.error("malformed"),
        }
    }
    tally.wire.down += link.received.load(std::sync::atomic::Ordering::Relaxed);
    let _ = link.client.disconnect().await;
    tally
}

/// Runs the load: connects every device (at most `connect_concurrency` at a time), then device
/// `i` sends `templates[i % len]` (schema hash, summary payload) until the duration is over.
///
/// # Errors
/// [`MqttError::Settings`] without templates, [`MqttError::Broker`] when the runtime cannot start.
pub fn run(settings: LoadSettings, templates: &[(SchemaHash, Vec<u8>)]) -> Result<LoadReport, MqttError> {
    if templates.is_empty() {
        return Err(MqttError::Settings("no summaries to send".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| MqttError::Broker(format!("the load's runtime: {e}")))?;
    let settings = Arc::new(settings);
    let connecting = Instant::now();
    let (report, tallies) = runtime.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(settings.connect_concurrency.max(1)));
        let connects: Vec<_> = (0..settings.devices)
            .map(|i| {
                let (settings, gate) = (settings.clone(), gate.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let mut tally = Tally::default();
                    let link = connect(&settings, i, &mut tally).await;
                    (link, tally)
                })
            })
            .collect();
        let mut links = Vec::with_capacity(settings.devices);
        for c in connects {
            links.push(c.await.unwrap_or_else(|_| {
                let mut tally = Tally::default();
                tally.error("task-panicked");
                (None, tally)
            }));
        }
        let connect_seconds = connecting.elapsed().as_secs_f64();
        let started = Instant::now();
        let until = started + settings.duration;
        let loads: Vec<_> = links
            .into_iter()
            .enumerate()
            .map(|(i, (link, tally))| {
                let (settings, template) = (settings.clone(), templates[i % templates.len()].clone());
                tokio::spawn(async move {
                    match link {
                        Some(link) => device(settings, i, link, template, until, tally).await,
                        None => tally,
                    }
                })
            })
            .collect();
        let mut tallies = Vec::with_capacity(loads.len());
        for l in loads {
            tallies.push(l.await.unwrap_or_else(|_| {
                let mut tally = Tally::default();
                tally.error("task-panicked");
                tally
            }));
        }
        ((connect_seconds, started.elapsed().as_secs_f64()), tallies)
    });
    let (connect_seconds, seconds) = report;
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut wire = WireBytes::default();
    for t in tallies {
        latencies.extend(t.latencies);
        for (k, n) in t.errors {
            *errors.entry(k).or_default() += n;
        }
        wire.up += t.wire.up;
        wire.down += t.wire.down;
        wire.payload += t.wire.payload;
    }
    let mut report = LoadReport::of(settings.devices, settings.duration.as_secs_f64(), latencies, errors);
    report.seconds = seconds;
    report.connect_seconds = Some(connect_seconds);
    report.wire = Some(wire);
    Ok(report)
}
