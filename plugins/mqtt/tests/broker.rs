//! The MQTT transport against a real Mosquitto (Debian's `mosquitto`, which `scripts/test`
//! installs): each test starts its own broker on a free loopback port with a generated config,
//! never the system service, and kills it (by pid) when it ends. Every wait is bounded.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mmpg::DeviceId;
use mmpg::transport::{CloudEndpoint, DeviceLink, TransportError};
use mmpg_mqtt::{BrokerSettings, MqttEndpoint, MqttLink, Topics};

/// A broker killed and reaped when dropped.
struct Broker {
    child: Child,
    settings: BrokerSettings,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is not installed: `scripts/test` installs it (apt package `mosquitto`)")
}

fn broker() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = dir.path().join("mosquitto.conf");
    std::fs::write(&config, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"))
        .expect("config");
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log");
    let child = Command::new(mosquitto())
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mosquitto starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port} within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let settings = BrokerSettings {
        host: "127.0.0.1".into(),
        port,
        connect_timeout: Duration::from_secs(10),
        max_packet: mmpg_mqtt::MAX_PACKET as usize,
    };
    Broker { child, settings, _dir: dir }
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
