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
    // A 4 MiB model: responses share it, never copy it.
    let model = vec![7u8; 4 << 20];
    published.ready(b"{}".to_vec(), &Bundle::new(model, reference, schema, (entry("m"), entry("a")), "t".into()));
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
    // Every connection is made first, then every request starts at once, then the answers are
    // read: a refusal comes at once (429), an admitted request waits for its body until the
    // request timeout (408).
    let mut unfinished: Vec<_> = (0..limits.connections_per_peer).map(|_| handshake(address, &h1)).collect();
    for (i, stream) in unfinished.iter_mut().enumerate() {
        let head = format!(
            "POST /v1/adapt HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            BODY_LIMIT
        );
        stream.write_all(head.as_bytes()).expect("head");
        stream.write_all(&envelope("mallory", 1000 + i as u64)).expect("a start");
        stream.flush().expect("flush");
    }
    honest_adapts();
    peak = peak.max(rss_bytes());
    let mut refused = 0;
    for stream in &mut unfinished {
        stream.sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).expect("an answer");
        if &answer == b"HTTP/1.1 429" {
            refused += 1;
        } else {
            assert_eq!(&answer, b"HTTP/1.1 408", "admitted, its body never finished");
        }
    }
    // Exactly the others, unless the first admitted ones had already timed out (a slow machine).
    let others = limits.connections_per_peer - limits.requests_per_peer;
    assert!((others - limits.requests_per_peer..=others).contains(&refused), "{refused} refused");
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
        // All awaited at once, each up to well past the request timeout: a refusal is a 429 at
        // once, an admitted request's unfinished body a 408 at the request timeout.
        let streams = held.len();
        let waits: Vec<_> = held
            .into_iter()
            .map(|(response, body)| {
                tokio::spawn(async move {
                    let status = tokio::time::timeout(Duration::from_secs(20), response).await;
                    drop(body);
                    status.ok().and_then(Result::ok).map_or(0, |r| r.status().as_u16())
                })
            })
            .collect();
        for wait in waits {
            statuses.push(wait.await.unwrap_or(0));
        }
        (statuses, streams)
    });
    let (statuses, streams) = statuses;
    // Admitted (their bodies read until the request timeout: 408) at most the peer's requests in
    // flight at a time; every other stream refused at once, its body unread.
    // (A stream the server resets under its own stream limit counts as refused: status 0.)
    let admitted = statuses.iter().filter(|s| **s == 408).count();
    let refused = statuses.iter().filter(|s| matches!(**s, 429 | 0)).count();
    assert_eq!(streams, 150);
    assert_eq!(admitted + refused, streams, "{statuses:?}");
    assert!((1..=2 * limits.requests_per_peer).contains(&admitted), "{statuses:?}");
    honest_adapts();
    peak = peak.max(rss_bytes());
    drop(runtime);

    // 4. Responses never read (the hostile review's example: HTTP/2 streams asking for the model
    //    under a window of 0 held 77 MB and their connections forever): every route counts
    //    against the device's requests in flight, the bundle is shared, and a connection whose
    //    responses make no progress for twice the idle time is closed.
    let h2 = tls_config(&kit, "mallory", b"h2");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (statuses, closed_after) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("connects");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(h2).connect(name, tcp).await.expect("handshake");
        let (mut client, connection) =
            h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tls).await.expect("h2");
        let driver = tokio::spawn(connection);
        let started = Instant::now();
        let mut responses = Vec::new();
        for _ in 0..16 {
            client = tokio::time::timeout(Duration::from_secs(20), client.ready())
                .await
                .expect("a stream within 20 s")
                .expect("ready");
            let request =
                http::Request::get("https://127.0.0.1/v1/bundle/model.safetensors").body(()).expect("request");
            let (response, _) = client.send_request(request, true).expect("sent");
            responses.push(response);
        }
        let mut statuses = Vec::new();
        // Held, never read: their bodies stay in flight.
        let mut held = Vec::new();
        for response in responses {
            let status = tokio::time::timeout(Duration::from_secs(5), response).await;
            let response = status.ok().and_then(Result::ok);
            statuses.push(response.as_ref().map_or(0, |r| r.status().as_u16()));
            held.push(response);
        }
        let closed = tokio::time::timeout(idle * 4, driver).await.is_ok();
        drop(held);
        (statuses, closed.then(|| started.elapsed()))
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, limits.requests_per_peer, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 16 - limits.requests_per_peer, "{statuses:?}");
    // Stuck for twice the idle time (4 s), then closed; not before (responses in flight).
    let closed_after = closed_after.expect("a connection whose responses never move is closed");
    assert!(closed_after >= 2 * idle, "closed after {closed_after:?}");
    honest_adapts();
    peak = peak.max(rss_bytes());
    drop(runtime);

    // 5. A refusal storm: impersonations, audited throttled and counted.
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
