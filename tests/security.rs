//! Attacks on a deployment with `[security]`, each against real processes on loopback: the
//! refusal, its audit line, and honest devices adapting all the same. Every process is killed (by
//! pid) when its test ends, every wait is bounded.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{cloud, count, deployment, device, free_port, mmpg};
use mmpg::bundle::Bundle;
use mmpg::config::ClientTrust;
use mmpg::security::{AuditLog, DeviceKit, Kit};
use mmpg::transport::CloudEndpoint as _;
use mmpg::transport::{DeviceLink as _, TransportError};
use mmpg::wire::{Envelope, MessageKind};
use mmpg::{DeviceId, SchemaHash};
use mmpg_http::{CloudClient, CloudServer, Published, ServerSettings};

fn provision(file: &Path, extra: &[&str]) -> String {
    let out = mmpg().arg("provision").arg(file).args(extra).output().expect("provision");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client presenting `device`'s certificate from `kit` (none when `device` is `None`).
fn client(url: &str, kit: &Kit, ca: &Path, device: Option<&str>) -> CloudClient {
    let identity = device.map(|d| {
        let own = DeviceKit::new(&kit.device_dir(d));
        (own.cert(), own.key())
    });
    CloudClient::new(url, &ClientTrust { ca: Some(ca.to_path_buf()), identity, cloud_key: None }).expect("client")
}

/// A summary envelope naming `device` (its payload is not a summary: the gate looks at the
/// header only, and the cloud node refuses the rest).
fn envelope(device: &str, sequence: u64, payload: usize) -> Vec<u8> {
    Envelope::new(MessageKind::Summary, SchemaHash(1), DeviceId(device.into()), sequence, vec![7; payload])
        .and_then(|e| e.encode())
        .expect("encodes")
}

fn status(result: Result<Vec<u8>, TransportError>) -> u16 {
    match result {
        Err(TransportError::Status { status, .. }) => status,
        other => panic!("expected a refusal status, got {other:?}"),
    }
}

fn refusals(kit: &Kit, reason: &str) -> Vec<mmpg::security::AuditEvent> {
    AuditLog::read(&kit.audit())
        .expect("audit log")
        .into_iter()
        .filter(|e| e.event == "refused" && e.reason.starts_with(reason))
        .collect()
}

#[test]
fn mutual_tls_refuses_strangers_impostors_revoked_and_greedy_devices_and_honest_ones_adapt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let port = free_port();
    let security = format!("request_timeout_ms = 2000\n[security]\ndir = \"{d}/pki\"\nrate_per_s = 0.01\nburst = 3");
    let file = deployment(dir.path(), port, "adapt_every = 4", &security);

    // Without its kit the cloud does not start, and says what to run.
    let out = mmpg().args(["cloud", "serve"]).arg(&file).output().expect("cloud");
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("mmpg provision"), "{message}");

    let printed = provision(&file, &[]);
    assert!(printed.contains("2 issued"), "{printed}");
    let stranger_kit = dir.path().join("other");
    provision(&file, &["--out", &stranger_kit.display().to_string()]);
    let kit = Kit::new(&dir.path().join("pki"));
    let stranger = Kit::new(&stranger_kit);

    let _cloud = cloud(&file, dir.path(), 1);
    let url = format!("https://127.0.0.1:{port}");
    let ca = kit.ca_cert();

    // An honest device adapts over mutual TLS.
    let honest = dir.path().join("state/device-00");
    let mut dev = device(&file, "device-00", 1, &[]);
    assert!(dev.wait(Duration::from_secs(120)).success());
    assert_eq!(count(&honest, "adapted"), 1);

    // No client certificate, or one from another CA: refused at the handshake.
    let anonymous = client(&url, &kit, &ca, None).hello(Duration::from_secs(10));
    assert!(anonymous.is_err(), "{anonymous:?}");
    let foreign = client(&url, &stranger, &ca, Some("device-01")).hello(Duration::from_secs(10));
    assert!(foreign.is_err(), "{foreign:?}");

    // device-01's certificate sending device-00's id: impersonation, 403 and audited.
    let mut one = client(&url, &kit, &ca, Some("device-01"));
    assert_eq!(status(one.exchange(envelope("device-00", 1, 16), Duration::from_secs(10))), 403);
    let impersonations = refusals(&kit, "impersonation");
    assert_eq!(impersonations.len(), 1);
    assert_eq!(impersonations[0].device.as_deref(), Some("device-01"));
    assert!(impersonations[0].peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:")));

    // Its own id is admitted (the cloud node then refuses the fake summary: 422), until the
    // bucket of 3 is empty: 429.
    let mut statuses = Vec::new();
    for sequence in 1..=4 {
        let reply = one.exchange(envelope("device-01", sequence, 16), Duration::from_secs(10));
        statuses.push(if reply.is_ok() { 422 } else { status(reply) });
    }
    // The rate is checked before the body is read, so the impersonation above spent one of
    // the bucket's 3 tokens too.
    assert_eq!(statuses, [422, 422, 429, 429]);
    assert_eq!(refusals(&kit, "rate_limited").len(), 1);

    // A body over the limit: 413, before anything reads it.
    let big = envelope("device-01", 9, 2 << 20);
    assert_eq!(status(one.exchange(big, Duration::from_secs(10))), 413);

    // Revoked while the cloud runs: refused from the next request on, no restart.
    let printed = provision(&file, &["--revoke", "device-01"]);
    assert!(printed.contains("revoked device-01"), "{printed}");
    assert_eq!(status(one.exchange(envelope("device-01", 10, 16), Duration::from_secs(10))), 403);
    // Nor may it read the cloud's info or its bundle any more.
    assert!(matches!(one.hello(Duration::from_secs(10)), Err(TransportError::Status { status: 403, .. })));
    // Two refusals of one device for one reason within a second: one audit line, the other
    // counted (throttled per peer and reason, so a refusal storm cannot fill the disk).
    assert_eq!(refusals(&kit, "revoked").len(), 1);

    // Issue 28: the list edited by hand, a byte-order mark before an id (it was skipped, and the
    // device kept full access). Now the line is an error naming it: the running cloud keeps the
    // previous list (device-01 stays revoked) and says so in its metrics; validate refuses it.
    let revoked = kit.revoked();
    let previous = std::fs::read_to_string(&revoked).expect("list");
    std::fs::write(&revoked, format!("{previous}\u{feff}device-00\n")).expect("edited");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(status(one.exchange(envelope("device-01", 11, 16), Duration::from_secs(10))), 403);
    let metrics = client(&url, &kit, &ca, Some("device-00")).metrics(Duration::from_secs(10)).expect("metrics");
    assert!(metrics.contains("mmpg_revocation_list_valid 0"), "{metrics}");
    let out = mmpg().arg("validate").arg(&file).output().expect("validate");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("revoked.txt:3"), "{said}");
    std::fs::write(&revoked, &previous).expect("restored");
    std::thread::sleep(Duration::from_millis(1100));
    let metrics = client(&url, &kit, &ca, Some("device-00")).metrics(Duration::from_secs(10)).expect("metrics");
    assert!(metrics.contains("mmpg_revocation_list_valid 1"), "{metrics}");

    // A client that sends one byte per second is cut off by the server's timeout (2 s).
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    slow.set_read_timeout(Some(Duration::from_millis(1000))).expect("timeout");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(30) {
        if slow.write_all(&[0x16]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match slow.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the server closed the trickling connection");

    // After all that, the honest device adapts again.
    let mut dev = device(&file, "device-00", 1, &[]);
    assert!(dev.wait(Duration::from_secs(120)).success());
    assert_eq!(count(&honest, "adapted"), 2);
}

#[test]
fn provisioning_again_keeps_every_key_and_insecure_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let file = deployment(dir.path(), free_port(), "", &format!("[security]\ndir = \"{d}/pki\""));
    provision(&file, &[]);
    let kit = Kit::new(&dir.path().join("pki"));
    let key = std::fs::read(DeviceKit::new(&kit.device_dir("device-00")).key()).expect("key");
    let printed = provision(&file, &["--load", "2"]);
    assert!(printed.contains("2 issued, 2 kept"), "{printed}");
    assert_eq!(std::fs::read(DeviceKit::new(&kit.device_dir("device-00")).key()).expect("key"), key);
    assert!(DeviceKit::new(&kit.device_dir("load-00001")).cert().exists());
    let out = mmpg().arg("provision").arg(&file).args(["--revoke", "nobody"]).output().expect("provision");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never provisioned"));

    let insecure = deployment(dir.path(), free_port(), "", "[security]\ninsecure = true");
    let _cloud = cloud(&insecure, dir.path(), 2);
    let log = std::fs::read_to_string(dir.path().join("cloud-2.log")).expect("cloud log");
    assert!(log.contains("WARNING") && log.contains("insecure"), "{log}");
}

/// How the man in the middle spoils the real cloud's replies.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// One bit of the parameters' payload.
    Payload,
    /// One bit of the envelope's header (its schema hash).
    Header,
    /// The signature stripped: an unsigned envelope.
    Unsigned,
    /// The first reply, sent again for every later request.
    Replay,
}

#[test]
fn tampered_unsigned_and_replayed_parameters_are_refused_and_the_last_good_ones_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let port = free_port();
    let file = deployment(dir.path(), port, "adapt_every = 4", &format!("[security]\ndir = \"{d}/pki\""));
    provision(&file, &[]);
    let kit = Kit::new(&dir.path().join("pki"));
    let bundle = dir.path().join("bundle");
    let out = mmpg().arg("export").arg(&file).arg("--out").arg(&bundle).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A bundle whose signature is gone, or whose manifest was altered after signing, is refused
    // before the device does anything else.
    for spoil in ["unsigned", "altered"] {
        let spoiled = dir.path().join(format!("bundle-{spoil}"));
        std::fs::create_dir_all(&spoiled).expect("folder");
        for entry in std::fs::read_dir(&bundle).expect("bundle") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), spoiled.join(entry.file_name())).expect("copied");
        }
        if spoil == "unsigned" {
            std::fs::remove_file(spoiled.join("manifest.sig")).expect("removed");
        } else {
            let path = spoiled.join("manifest.json");
            let text = std::fs::read_to_string(&path).expect("manifest");
            std::fs::write(&path, text.replacen("\"training\": \"", "\"training\": \"0", 1)).expect("altered");
        }
        let state = dir.path().join(format!("state-{spoil}")).display().to_string();
        let out = mmpg()
            .args(["device", "--id", "device-00", "--rounds", "1", "--state", &state, "--bundle"])
            .arg(&spoiled)
            .arg(&file)
            .output()
            .expect("device");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("manifest.sig"), "{spoil}: {stderr}");
    }
    let mut real_cloud = cloud(&file, dir.path(), 1);
    let real = format!("https://127.0.0.1:{port}");
    let recorded = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));

    for (i, tamper) in [Tamper::Payload, Tamper::Header, Tamper::Unsigned, Tamper::Replay].into_iter().enumerate() {
        // The man in the middle speaks to the cloud as device-00 and to the device as the cloud,
        // over TLS with the cloud's own server key: it holds both kits (the worst case) — all but
        // the signing key.
        let upstream = client(&real, &kit, &kit.ca_cert(), Some("device-00"));
        let info = serde_json::to_vec(&upstream.hello(Duration::from_secs(10)).expect("info")).expect("json");
        let published = Arc::new(Published::default());
        published.ready(info, &Bundle::open(&bundle, None).expect("bundle"));
        let tls = mmpg_http::tls::server_config(&kit.server_cert(), &kit.server_key(), None).expect("tls");
        let settings = ServerSettings {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: Some(Arc::new(tls)),
            body_limit: 1 << 20,
            request_timeout: Duration::from_secs(30),
            queue: 16,
            guard: None,
            limits: mmpg_http::Limits::new(1 << 20, Duration::from_secs(30)),
        };
        let (middle, mut endpoint) = CloudServer::start(settings, published).expect("starts");
        let url = format!("https://{}", middle.address());
        let recorded = recorded.clone();
        std::thread::spawn(move || {
            let mut upstream = upstream;
            let mut first = None::<Vec<u8>>;
            while let Ok(next) = endpoint.next_request(Duration::from_millis(100)) {
                let Some(request) = next else { continue };
                recorded.lock().expect("lock").get_or_insert_with(|| request.bytes.clone());
                let reply = upstream.exchange(request.bytes, Duration::from_secs(20)).expect("the real cloud");
                let offset = mmpg::wire::SIGNED_OVERHEAD;
                let mut spoiled = reply.clone();
                match tamper {
                    Tamper::Payload => *spoiled.last_mut().expect("bytes") ^= 0x10,
                    Tamper::Header => spoiled[offset + 8] ^= 0x01,
                    Tamper::Unsigned => spoiled = reply[offset..].to_vec(),
                    Tamper::Replay => spoiled = first.get_or_insert(reply).clone(),
                }
                let _ = endpoint.reply(request.ticket, spoiled);
            }
        });
        let state = dir.path().join(format!("{tamper:?}"));
        let _ = std::fs::create_dir_all(state.join("bundle"));
        for entry in std::fs::read_dir(&bundle).expect("bundle") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), state.join("bundle").join(entry.file_name())).expect("copied");
        }
        // Each run numbers its requests after the last one's, as one device would: the cloud
        // refuses a sequence it has answered.
        mmpg::state::write_sealed(&state.join("sequence"), (i * 10).to_string().as_bytes()).expect("sequence");
        let state_arg = state.display().to_string();
        let mut dev = device(&file, "device-00", 2, &["--cloud", &url, "--state", &state_arg]);
        assert!(dev.wait(Duration::from_secs(120)).success(), "{tamper:?}");
        middle.shutdown();
        let report: mmpg::report::DeviceReport =
            serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
        let log = common::process::events(&state);
        let failures: Vec<_> = log.iter().filter(|e| e["event"] == "failure").map(|e| e["kind"].clone()).collect();
        match tamper {
            Tamper::Replay => {
                // The first reply answered its request; sent again, it answers none.
                assert_eq!(count(&state, "adapted"), 1, "{log:#?}");
                assert_eq!(failures, ["stale"], "{log:#?}");
            }
            _ => {
                assert_eq!(count(&state, "adapted"), 0, "{tamper:?}: {log:#?}");
                assert_eq!(failures, ["bad-signature", "bad-signature"], "{tamper:?}: {log:#?}");
                assert_eq!(report.adapted_accuracy, report.static_accuracy, "{tamper:?}: parameters kept");
                assert!(!state.join("params.envelope").exists(), "{tamper:?}: nothing persisted");
            }
        }
    }
    // A summary the man in the middle recorded, replayed to the cloud as its device: refused
    // (signed, naming the last sequence accepted), audited — and still refused after a restart.
    let old = recorded.lock().expect("lock").clone().expect("a recorded request");
    let key = mmpg::security::CloudKey::read(&kit.signing_public()).expect("key");
    for restarted in [false, true] {
        if restarted {
            drop(real_cloud);
            real_cloud = cloud(&file, dir.path(), 2);
        }
        let mut replayer = client(&real, &kit, &kit.ca_cert(), Some("device-00"));
        let reply = replayer.exchange(old.clone(), Duration::from_secs(20)).expect("an error envelope");
        let reply = Envelope::decode(mmpg::wire::open_signed(&reply, &key).expect("signed")).expect("envelope");
        let sent = Envelope::decode(&old).expect("request");
        assert_eq!((reply.kind, reply.sequence, reply.nonce), (MessageKind::Error, sent.sequence, sent.nonce));
        assert!(reply.last_accepted().is_some_and(|last| last > sent.sequence), "{reply:?} restarted {restarted}");
    }
    assert_eq!(refusals(&kit, "replayed").len(), 2);
    let _cloud = real_cloud;

    // Plain HTTP is not an option under [security]: refused before anything is fetched.
    let out = mmpg()
        .args(["device", "--id", "device-00", "--rounds", "1", "--cloud", "http://127.0.0.1:9"])
        .arg(&file)
        .output()
        .expect("device");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only https://"));

    // And straight from the cloud, signed replies are installed. This device starts without state
    // (sequence 1): the cloud's refusal names the last sequence it accepted, and the device asks
    // again after it.
    let mut dev = device(&file, "device-00", 1, &[]);
    assert!(dev.wait(Duration::from_secs(120)).success());
    let state = dir.path().join("state/device-00");
    assert_eq!((count(&state, "resync"), count(&state, "adapted")), (1, 1));

    // Issue 28: a counter far ahead of the cloud's (a flipped high bit) is refused naming where
    // to continue, and the device resynchronises; a counter damaged at rest is caught by its
    // seal and dropped, and the cloud's refusal of the stale request sets the device right.
    for (how, bytes) in
        [("far ahead", mmpg::state::seal((1u64 << 40).to_string().as_bytes())), ("damaged", b"99999999999999".to_vec())]
    {
        std::fs::write(state.join("sequence"), bytes).expect("sequence");
        let before = (count(&state, "resync"), count(&state, "adapted"));
        let mut dev = device(&file, "device-00", 1, &[]);
        assert!(dev.wait(Duration::from_secs(120)).success(), "{how}");
        assert_eq!(count(&state, "adapted"), before.1 + 1, "{how}");
        if how == "far ahead" {
            assert_eq!(count(&state, "resync"), before.0 + 1, "{how}");
        } else {
            let log = common::process::events(&state);
            let caught = log.iter().any(|e| {
                e["kind"] == "restore" && e["message"].as_str().is_some_and(|m| m.contains("fails its checksum"))
            });
            assert!(caught, "{log:#?}");
        }
    }

    // Saved parameters changed at rest, their checksum recomputed: the cloud's signature, saved
    // with them, no longer verifies, and the device does not restore them.
    let saved = state.join("params.envelope");
    let bytes = std::fs::read(&saved).expect("saved parameters");
    let (envelope, _) = bytes.split_at(bytes.len() - 64);
    let mut envelope = envelope.to_vec();
    *envelope.last_mut().expect("bytes") ^= 0x01;
    let sum = mmpg::bundle::sha256_hex(&envelope);
    envelope.extend_from_slice(sum.as_bytes());
    std::fs::write(&saved, envelope).expect("altered");
    let mut dev = device(&file, "device-00", 1, &[]);
    assert!(dev.wait(Duration::from_secs(120)).success());
    let log = common::process::events(&state);
    assert!(
        log.iter().any(|e| e["kind"] == "restore" && e["message"].as_str().is_some_and(|m| m.contains("signature"))),
        "{log:#?}"
    );
}
