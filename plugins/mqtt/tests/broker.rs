//! The MQTT transport against a real Mosquitto (Debian's `mosquitto`, which `scripts/test`
//! installs): each test starts its own broker on a free loopback port with a generated config,
//! never the system service, and kills it (by pid) when it ends. Every wait is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mmpg::DeviceId;
use mmpg::security::{DeviceKit, Kit};
use mmpg::transport::{CloudEndpoint, DeviceLink, TransportError};
use mmpg_mqtt::credentials::{CLOUD_USER, read_password, write_broker_files};
use mmpg_mqtt::mosquitto::{Mosquitto, Secured};
use mmpg_mqtt::{BrokerSettings, Credentials, MqttEndpoint, MqttLink, Topics};

/// A broker of the test's own and how to reach it.
struct Broker {
    settings: BrokerSettings,
    // Dropped (killed) before its folder.
    _process: Mosquitto,
    _dir: tempfile::TempDir,
}

fn broker() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Mosquitto::start(dir.path(), None).expect("mosquitto starts (scripts/test installs it)");
    let settings = BrokerSettings::plain("127.0.0.1", process.port());
    Broker { settings, _process: process, _dir: dir }
}

/// A cloud worker answering every request with `name`, the device the topic named and the
/// request's bytes, until `stop`.
fn worker(endpoint: MqttEndpoint, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut endpoint = endpoint;
        let mut answered = 0;
        while !stop.load(Ordering::Relaxed) {
            match endpoint.next_request(Duration::from_millis(50)) {
                Ok(Some(request)) => {
                    let device = request.peer.identity.map(|d| d.0).unwrap_or_default();
                    let mut reply = format!("{name}|{device}|").into_bytes();
                    reply.extend_from_slice(&request.bytes);
                    endpoint.reply(request.ticket, reply).expect("reply published");
                    answered += 1;
                }
                Ok(None) => {}
                Err(e) => panic!("worker {name}: {e}"),
            }
        }
        answered
    })
}

#[test]
fn devices_and_two_workers_in_a_shared_subscription_exchange_through_mosquitto() {
    let broker = broker();
    let topics = Topics::new("test");
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|name| {
            let endpoint = MqttEndpoint::connect(&broker.settings, &topics, "cloud", name).expect("worker connects");
            worker(endpoint, name, stop.clone())
        })
        .collect();
    // Ids that would be wildcards or level separators in a topic stay one level of their own.
    let ids = ["device-00", "a/b", "+", "#"];
    let mut links: Vec<MqttLink> = ids
        .iter()
        .map(|id| MqttLink::connect(&broker.settings, &topics, &DeviceId((*id).into())).expect("device connects"))
        .collect();
    let mut served_by = std::collections::BTreeMap::<String, u32>::new();
    for round in 0..5 {
        for (id, link) in ids.iter().zip(&mut links) {
            let request = format!("{id} round {round}").into_bytes();
            let reply = link.exchange(request.clone(), Duration::from_secs(10)).expect("a reply");
            let text = String::from_utf8(reply).expect("utf-8");
            let mut parts = text.splitn(3, '|');
            let (name, device, echoed) = (parts.next(), parts.next(), parts.next());
            assert_eq!((device, echoed.map(str::as_bytes)), (Some(*id), Some(request.as_slice())), "{text}");
            *served_by.entry(name.unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let answered: u32 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    // Each request went to exactly one worker of the group, and the broker used both.
    assert_eq!(answered, 20);
    assert_eq!(served_by.values().sum::<u32>(), 20);
    assert_eq!(served_by.len(), 2, "{served_by:?}");
}

#[test]
fn a_retained_summary_is_not_served_to_workers_that_subscribe_later() {
    let broker = broker();
    let topics = Topics::new("test");
    let device = DeviceId("left-behind".into());
    let reason = raw_publish_retained(&broker.settings, &topics.summary(&device), b"stale summary", true);
    // Acknowledged and kept (no one subscribes yet).
    assert!(matches!(reason.as_deref(), Some("Success" | "NoMatchingSubscribers")), "{reason:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = MqttEndpoint::connect(&broker.settings, &topics, "cloud", "late").expect("worker connects");
    let worker = worker(endpoint, "late", stop.clone());
    // A live request is served; the retained one never was.
    let mut link = MqttLink::connect(&broker.settings, &topics, &DeviceId("live".into())).expect("connects");
    assert_eq!(link.exchange(b"now".to_vec(), Duration::from_secs(10)).expect("a reply"), b"late|live|now".to_vec());
    stop.store(true, Ordering::Relaxed);
    assert_eq!(worker.join().expect("worker"), 1, "the retained summary was not served");
}

#[test]
fn messages_above_the_packet_limit_travel_as_chunks() {
    let broker = broker();
    let topics = Topics::new("test");
    // 64-byte packets: a 5,000-byte request and its longer reply in ~130 chunks each.
    let settings = BrokerSettings { max_packet: 64, ..broker.settings.clone() };
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = MqttEndpoint::connect(&settings, &topics, "cloud", "w").expect("worker connects");
    let worker = worker(endpoint, "w", stop.clone());
    let mut link = MqttLink::connect(&settings, &topics, &DeviceId("big".into())).expect("device connects");
    let request: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let reply = link.exchange(request.clone(), Duration::from_secs(20)).expect("a reply");
    assert_eq!(&reply[..6], b"w|big|");
    assert_eq!(&reply[6..], request.as_slice());
    stop.store(true, Ordering::Relaxed);
    assert_eq!(worker.join().expect("worker"), 1);
}

#[test]
fn without_a_worker_a_device_times_out_and_without_a_broker_it_is_unreachable() {
    let broker = broker();
    let topics = Topics::new("test");
    let mut link = MqttLink::connect(&broker.settings, &topics, &DeviceId("lonely".into())).expect("connects");
    assert!(matches!(link.exchange(b"x".to_vec(), Duration::from_millis(300)), Err(TransportError::Timeout(_))));
    let settings = BrokerSettings { connect_timeout: Duration::from_secs(2), ..broker.settings.clone() };
    drop(broker);
    let err = MqttLink::connect(&settings, &topics, &DeviceId("late".into())).expect_err("no broker");
    assert!(matches!(err, TransportError::Unreachable(_)), "{err}");
}

/// A broker secured with a provisioned kit: TLS with the kit's CA, its password file and ACL.
struct SecuredBroker {
    kit: Kit,
    topics: Topics,
    tls: BrokerSettings,
    _process: Mosquitto,
    _dir: tempfile::TempDir,
}

impl SecuredBroker {
    fn start(devices: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let kit = Kit::new(&dir.path().join("kit"));
        let devices: Vec<String> = devices.iter().map(|d| (*d).to_string()).collect();
        mmpg::security::provision(&kit, &["127.0.0.1".into()], &devices).expect("provisioned");
        let topics = Topics::new("secure");
        let files = write_broker_files(&kit, &topics, &devices, &Default::default()).expect("broker files");
        let secured = Secured { cert: kit.server_cert(), key: kit.server_key(), files };
        let process = Mosquitto::start(&dir.path().join("broker"), Some(&secured)).expect("mosquitto starts");
        let tls = BrokerSettings {
            tls: Some(mmpg_mqtt::tls::client_config(&kit.ca_cert()).expect("CA")),
            connect_timeout: Duration::from_secs(5),
            ..BrokerSettings::plain("127.0.0.1", process.port())
        };
        Self { kit, topics, tls, _process: process, _dir: dir }
    }

    fn as_device(&self, device: &str) -> BrokerSettings {
        let password = read_password(&DeviceKit::new(&self.kit.device_dir(device)).broker_password()).expect("pw");
        let username = mmpg_mqtt::topics::level(&DeviceId(device.into()));
        BrokerSettings { credentials: Some(Credentials { username, password }), ..self.tls.clone() }
    }

    fn as_cloud(&self) -> BrokerSettings {
        let password = read_password(&self.kit.cloud_broker_password()).expect("pw");
        BrokerSettings { credentials: Some(Credentials { username: CLOUD_USER.into(), password }), ..self.tls.clone() }
    }
}

#[test]
fn the_acl_keeps_each_device_to_its_own_topics_over_tls() {
    let broker = SecuredBroker::start(&["device-a", "device/b"]);
    let (a, b) = (DeviceId("device-a".into()), DeviceId("device/b".into()));
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = MqttEndpoint::connect(&broker.as_cloud(), &broker.topics, "cloud", "w").expect("the cloud connects");
    let worker = worker(endpoint, "w", stop.clone());

    // Device A subscribing to B's parameters is granted by Mosquitto, but nothing B receives is
    // delivered to it (the ACL's read check is made at delivery); its own publish as B (first
    // thing `exchange` does) is dropped.
    let mut spy = MqttLink::connect(&broker.as_device("device-a"), &broker.topics, &b).expect("connects");
    let spying = std::thread::spawn(move || spy.exchange(b"posing as b".to_vec(), Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(300));
    // Each device, with its own password over TLS, exchanges through the worker.
    for (device, id) in [(&a, "device-a"), (&b, "device/b")] {
        let mut link = MqttLink::connect(&broker.as_device(id), &broker.topics, device).expect("connects");
        let reply = link.exchange(b"hello".to_vec(), Duration::from_secs(10)).expect("a reply");
        assert_eq!(reply, format!("w|{id}|hello").into_bytes());
    }
    let spied = spying.join().expect("spy");
    assert!(matches!(spied, Err(TransportError::Timeout(_))), "A read B's parameters: {spied:?}");
    // Publishing as B is refused by the broker (MQTT v5 PUBACK reason).
    let reason = raw_publish(&broker.as_device("device-a"), &broker.topics.summary(&b), b"posing as b");
    assert_eq!(reason.as_deref(), Some("NotAuthorized"), "the broker refuses the publish");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(worker.join().expect("worker"), 2, "only the devices' own requests reached the worker");

    // A wrong password, no password, and a broker whose certificate the client does not trust.
    let wrong = BrokerSettings {
        credentials: Some(Credentials { username: "device-a".into(), password: "guess".into() }),
        ..broker.tls.clone()
    };
    let err = MqttLink::connect(&wrong, &broker.topics, &a).expect_err("wrong password");
    assert!(matches!(err, TransportError::Denied(_)), "{err}");
    let err = MqttLink::connect(&broker.tls, &broker.topics, &a).expect_err("anonymous");
    assert!(matches!(err, TransportError::Denied(_)), "{err}");
    let other = tempfile::tempdir().expect("tempdir");
    let other_kit = Kit::new(other.path());
    mmpg::security::provision(&other_kit, &["127.0.0.1".into()], &[]).expect("another CA");
    let untrusting = BrokerSettings {
        tls: Some(mmpg_mqtt::tls::client_config(&other_kit.ca_cert()).expect("CA")),
        ..broker.as_device("device-a")
    };
    let err = MqttLink::connect(&untrusting, &broker.topics, &a).expect_err("untrusted broker");
    assert!(matches!(err, TransportError::Tls(_)), "{err}");
}

/// Publishes one QoS 1 message as a bare rumqttc client and returns the broker's PUBACK reason.
fn raw_publish(settings: &BrokerSettings, topic: &str, payload: &[u8]) -> Option<String> {
    raw_publish_retained(settings, topic, payload, false)
}

/// As [`raw_publish`], with the retain flag as given.
fn raw_publish_retained(settings: &BrokerSettings, topic: &str, payload: &[u8], retain: bool) -> Option<String> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{Client, Event, MqttOptions};
    let mut options = MqttOptions::new("raw-publisher", settings.host.clone(), settings.port);
    if let Some(tls) = &settings.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    if let Some(c) = &settings.credentials {
        options.set_credentials(c.username.clone(), c.password.clone());
    }
    let (client, mut connection) = Client::new(options, 8);
    client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).expect("queued");
    for _ in 0..50 {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => return Some(format!("{:?}", ack.reason)),
            Ok(Err(_)) => return None,
            _ => {}
        }
    }
    None
}

/// Issue 28: a malformed chunk header got no reply and no log line, so its device only timed
/// out. The worker answers on the device's params topic, naming the header's fault.
#[test]
fn a_malformed_chunk_is_answered_naming_its_fault() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{Client, Event, MqttOptions};
    let broker = broker();
    let topics = Topics::new("test");
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = MqttEndpoint::connect(&broker.settings, &topics, "cloud", "w").expect("worker connects");
    let worker = worker(endpoint, "w", stop.clone());
    let device = DeviceId("victim".into());
    let (client, mut connection) =
        Client::new(MqttOptions::new("listener", broker.settings.host.clone(), broker.settings.port), 8);
    client.subscribe(topics.params(&device), QoS::AtLeastOnce).expect("queued");
    let mut subscribed = false;
    for _ in 0..50 {
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) = connection.recv_timeout(Duration::from_millis(200)) {
            subscribed = true;
            break;
        }
    }
    assert!(subscribed, "no SUBACK");
    // `MMPC`, then version 9 where 1 belongs, and a header cut short.
    let mut chunk = b"MMPC".to_vec();
    chunk.extend_from_slice(&[9, 0, 0, 0]);
    raw_publish_retained(&broker.settings, &topics.summary(&device), &chunk, false);
    let mut refusal = None;
    for _ in 0..100 {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) = connection.recv_timeout(Duration::from_millis(200)) {
            refusal = Some(p.payload.to_vec());
            break;
        }
    }
    let refusal = refusal.expect("the worker answered");
    let envelope = mmpg::wire::Envelope::decode(&refusal).expect("an envelope");
    let reason = envelope.to_error().expect("an error reply");
    assert_eq!((envelope.device, envelope.sequence), (device, 0));
    assert!(reason.contains("chunk refused: malformed chunk"), "{reason}");
    stop.store(true, Ordering::Relaxed);
    assert_eq!(worker.join().expect("worker"), 0, "a refused chunk is not a request");
}
