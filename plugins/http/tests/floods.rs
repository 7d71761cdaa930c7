//! Issue 28, kind 1: one peer's resources are bounded and its trouble is its own. One device
//! (`mallory`, a valid certificate) floods the cloud's server over mutual TLS — idle
//! connections, unfinished bodies over HTTP/1.1 and HTTP/2, a storm of impersonations — while
//! an honest device keeps being answered, and the process's memory stays within the per-peer
//! bound the documentation states (`Limits::per_peer_bytes`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmpg::DeviceId;
use mmpg::bundle::{Bundle, PluginEntry};
use mmpg::security::{AuditLog, DeviceKit, Guard, Kit, Revocations};
use mmpg::slots::SchemaHash;
use mmpg::transport::{CloudEndpoint as _, DeviceLink as _};
use mmpg::wire::Envelope;
use mmpg_http::{CloudClient, CloudServer, Limits, Published, ServerSettings};

const BODY_LIMIT: usize = 1 << 20;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn envelope(device: &str, sequence: u64) -> Vec<u8> {
    Envelope::error(DeviceId(device.into()), sequence, SchemaHash(7), "a request").encode().expect("encodes")
}

fn tls_config(kit: &Kit, device: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let dk = DeviceKit::new(&kit.device_dir(device));
    let mut config =
        mmpg_http::tls::client_config(&kit.ca_cert(), Some((dk.cert().as_path(), dk.key().as_path()))).expect("tls");
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A TLS connection that completed its handshake as `device` (HTTP/1.1 by ALPN).
fn handshake(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut connection = rustls::ClientConnection::new(config.clone(), name).expect("client");
    let mut tcp = TcpStream::connect(address).expect("connects");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp).expect("handshake");
    }
    rustls::StreamOwned::new(connection, tcp)
}

/// Whether the server has closed `stream` (an EOF or an error within `wait`).
fn closed(stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, wait: Duration) -> bool {
    stream.sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn one_device_flooding_leaves_others_answered_and_memory_within_its_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kit = Kit::new(&dir.path().join("pki"));
    mmpg::security::provision(&kit, &["127.0.0.1".into()], &["honest".into(), "mallory".into()]).expect("kit");
    let tls = mmpg_http::tls::server_config(&kit.server_cert(), &kit.server_key(), Some(&kit.ca_cert())).expect("tls");
    let guard = Guard::new(
        Revocations::open(&kit.revoked()).expect("list"),
        AuditLog::open(&kit.audit()).expect("audit"),
        1000.0,
        1000,
    );
    let idle = Duration::from_secs(2);
    let limits = Limits::new(BODY_LIMIT, idle);
    let settings = ServerSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls: Some(Arc::new(tls)),
        body_limit: BODY_LIMIT,
        request_timeout: idle,
        queue: 64,
        guard: Some(Arc::new(guard)),
        limits,
    };
    let published = Arc::new(Published::default());
    let schema = mmpg::SlotSchema::new(vec![mmpg::SlotSpec::f32("w", vec![1])]).expect("schema");
    let entry = |p: &str| PluginEntry { plugin: p.into(), settings: mmpg::toml::Table::new() };
    let reference = mmpg::FeatureStats { mean: vec![0.0], std: vec![1.0] };
    published.ready(b"{}".to_vec(), &Bundle::new(vec![1], reference, schema, (entry("m"), entry("a")), "t".into()));
    let (server, mut endpoint) = CloudServer::start(settings, published).expect("starts");
    let address = server.address();
    // The cloud node's place: answers every request with its own bytes.
    let node = std::thread::spawn(move || {
        while let Ok(next) = endpoint.next_request(Duration::from_millis(50)) {
            if let Some(request) = next {
                let _ = endpoint.reply(request.ticket, request.bytes);
            }
        }
    });

    let honest_kit = DeviceKit::new(&kit.device_dir("honest"));
    let trust = mmpg::config::ClientTrust {
        ca: Some(kit.ca_cert()),
        identity: Some((honest_kit.cert(), honest_kit.key())),
        cloud_key: None,
    };
    let url = format!("https://{address}");
    let mut sequence = 0;
    let mut honest_adapts = || {
        let mut honest = CloudClient::new(&url, &trust).expect("client");
        sequence += 1;
        let request = envelope("honest", sequence);
        let reply = honest.exchange(request.clone(), Duration::from_secs(20));
        assert_eq!(reply.as_ref().ok(), Some(&request), "the honest device is answered: {reply:?}");
    };
    honest_adapts();
    let baseline = rss_bytes();
    let mut peak = baseline;
    let per_peer = limits.per_peer_bytes(BODY_LIMIT);

    // 1. Idle connections after the handshake (hyper#3178): all but the peer's share are closed
    //    at once, and the rest when they have been idle for `idle`.
    let h1 = tls_config(&kit, "mallory", b"http/1.1");
    let mut idle_ones: Vec<_> = (0..200).map(|_| handshake(address, &h1)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let open = idle_ones.iter_mut().map(|s| closed(s, Duration::from_millis(20))).filter(|c| !c).count();
    assert!(open <= limits.connections_per_peer, "{open} idle connections of one peer held");
    honest_adapts();
    peak = peak.max(rss_bytes());
    let started = Instant::now();
    let still = idle_ones.iter_mut().map(|s| closed(s, idle * 3)).filter(|c| !c).count();
    assert_eq!(still, 0, "idle connections closed after {:?}", started.elapsed());
    drop(idle_ones);

    // 2. Unfinished bodies over HTTP/1.1: at most the peer's requests in flight; the others are
    //    refused at once, before their bodies are read.
    let mut unfinished = Vec::new();
    let mut refused = 0;
    for i in 0..limits.connections_per_peer {
        let mut stream = handshake(address, &h1);
        let head = format!(
            "POST /v1/adapt HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            BODY_LIMIT
        );
        stream.write_all(head.as_bytes()).expect("head");
        stream.write_all(&envelope("mallory", 1000 + i as u64)).expect("a start");
        stream.flush().expect("flush");
        stream.sock.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let mut answer = [0u8; 12];
        if stream.read_exact(&mut answer).is_ok() {
            assert_eq!(&answer, b"HTTP/1.1 429", "refused as over its requests in flight");
            refused += 1;
        }
        unfinished.push(stream);
    }
    assert_eq!(refused, limits.connections_per_peer - limits.requests_per_peer);
    honest_adapts();
    peak = peak.max(rss_bytes());
    drop(unfinished);

    // 3. Unfinished bodies over HTTP/2 (the example: 150 streams of 1 MB on one
    //    connection): at most the peer's requests in flight hold bodies.
    let h2 = tls_config(&kit, "mallory", b"h2");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let statuses = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("connects");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(h2).connect(name, tcp).await.expect("handshake");
        let (mut client, connection) = h2::client::handshake(tls).await.expect("h2");
        tokio::spawn(connection);
        let mut held = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..150u64 {
            let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_millis(500), client.clone().ready()).await else {
                // The server's stream limit: the client waits for a free stream.
                break;
            };
            client = ready;
            let request = http::Request::post("https://127.0.0.1/v1/adapt")
                .header("content-length", BODY_LIMIT.to_string())
                .body(())
                .expect("request");
            let Ok((response, mut body)) = client.send_request(request, false) else { break };
            let mut start = envelope("mallory", 5000 + i);
            start.resize(64 * 1024, 0);
            let _ = body.send_data(start.into(), false);
            held.push((response, body));
        }
        for (response, _) in &mut held {
            let status = tokio::time::timeout(Duration::from_millis(300), response).await;
            statuses.push(match status {
                Ok(Ok(r)) => r.status().as_u16(),
                _ => 0,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        (statuses, held.len())
    });
    let (statuses, streams) = statuses;
    // Unanswered: the peer's requests in flight, and streams the client holds back itself under
    // the server's limit of concurrent streams (never sent). Every other stream is refused at
    // once, its body unread.
    let pending = statuses.iter().filter(|s| **s == 0).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(streams, 150);
    assert!(pending <= limits.requests_per_peer + 16, "{pending} of {streams} HTTP/2 requests held: {statuses:?}");
    assert!(refused >= streams - pending - limits.requests_per_peer, "{statuses:?}");
    honest_adapts();
    peak = peak.max(rss_bytes());
    drop(runtime);

    // 4. A refusal storm: impersonations, audited throttled and counted.
    let mut mallory = {
        let dk = DeviceKit::new(&kit.device_dir("mallory"));
        let trust = mmpg::config::ClientTrust {
            ca: Some(kit.ca_cert()),
            identity: Some((dk.cert(), dk.key())),
            cloud_key: None,
        };
        CloudClient::new(&url, &trust).expect("client")
    };
    for i in 0..300 {
        let reply = mallory.exchange(envelope(&format!("victim-{i}"), 1), Duration::from_secs(20));
        assert!(matches!(reply, Err(mmpg::TransportError::Status { status: 403, .. })), "{reply:?}");
    }
    let lines = AuditLog::read(&kit.audit()).expect("audit").into_iter().filter(|e| e.event == "refused").count();
    assert!(lines <= 5, "{lines} audit lines for 300 refusals");
    honest_adapts();
    peak = peak.max(rss_bytes());

    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "floods: memory grew {:.1} MiB over {:.1} MiB at the start; one peer's bound {:.1} MiB",
        grew as f64 / 1048576.0,
        baseline as f64 / 1048576.0,
        per_peer as f64 / 1048576.0
    );
    // The bound plus room for the runtime's own allocations (thread stacks, TLS sessions).
    assert!(grew <= per_peer + (16 << 20), "memory grew {grew} bytes, over {per_peer} + 16 MiB");
    server.shutdown();
    let _ = node.join();
}
