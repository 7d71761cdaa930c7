//! The fleet over a real Mosquitto: cloud workers as separate processes in one shared
//! subscription, devices as separate processes. Every process (broker included) is killed by pid
//! when its test ends; every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::process::{cloud_with, device, events, free_port, wait_for};
use mmpg::report::DeviceReport;
use mmpg_mqtt::mosquitto::Mosquitto;

/// The deployment tests' two devices (`common::process::deployment`) over the broker at
/// `broker` (none: `--broker` names it), adapting every 8 clips at a camera's pace, retrying a
/// request after 2 s up to 8 times; `extra` is appended.
fn deployment(dir: &Path, broker: Option<u16>, extra: &str) -> std::path::PathBuf {
    let broker = broker.map(|port| format!("broker = \"mqtt://127.0.0.1:{port}\"")).unwrap_or_default();
    let transport =
        format!("[transport]\nplugin = \"mqtt\"\n[transport.settings]\nname = \"kill-test\"\n{broker}\n{extra}");
    let path = common::process::deployment(dir, free_port(), "adapt_every = 8\nclip_interval_ms = 25", &transport);
    let text = std::fs::read_to_string(&path).expect("deployment");
    let text = text
        .replace("request_timeout_ms = 1500", "request_timeout_ms = 2000")
        .replace("max_attempts = 2", "max_attempts = 8");
    std::fs::write(&path, text).expect("deployment written");
    path
}

/// Waits (bounded) until any of `states`' logs satisfies `done`.
fn wait_for_any(states: &[std::path::PathBuf], what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !states.iter().any(|s| done(&events(s))) {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sequences a device's log says it requested and installed.
fn requested_and_adapted(state: &Path) -> (Vec<u64>, Vec<u64>) {
    let of = |kind: &str| -> Vec<u64> {
        events(state).iter().filter(|e| e["event"] == kind).filter_map(|e| e["sequence"].as_u64()).collect()
    };
    (of("request"), of("adapted"))
}

#[test]
fn a_killed_worker_loses_no_adaptation_and_none_is_made_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker =
        Mosquitto::start(&dir.path().join("broker"), None).expect("mosquitto starts (scripts/test installs it)");
    let file = deployment(dir.path(), Some(broker.port()), "");
    let (port_1, port_2) = (free_port(), free_port());
    let listen = |port: u16| format!("127.0.0.1:{port}");
    // The first worker trains and writes the checkpoint; the second loads it.
    let mut first = cloud_with(&file, dir.path(), 1, &["--listen", &listen(port_1)]);
    let mut second = cloud_with(&file, dir.path(), 2, &["--listen", &listen(port_2)]);
    let log = std::fs::read_to_string(dir.path().join("cloud-2.log")).expect("cloud log");
    assert!(log.contains("shared subscription $share/mmpg-cloud/mmpg/kill-test/summary/+"), "{log}");

    // The bundle comes from the first worker over HTTP; adaptation goes through the broker.
    let rounds = 6;
    let bundle_from = format!("http://{}", listen(port_1));
    let ids = ["device-00", "device-01"];
    let mut devices: Vec<_> = ids.iter().map(|id| device(&file, id, rounds, &["--cloud", &bundle_from])).collect();
    let states: Vec<_> = ids.iter().map(|id| dir.path().join("state").join(id)).collect();
    for state in &states {
        wait_for(state, "a first adaptation", |e| e.iter().any(|e| e["event"] == "adapted"));
    }

    // One worker hangs (SIGSTOP: still connected, so the broker goes on handing it summaries)
    // until a device has timed out on a request it holds; then it is killed (SIGKILL) with
    // whatever it held. The devices' retries reach the other worker.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let timed_out = |e: &[serde_json::Value]| e.iter().any(|e| e["event"] == "failure" && e["kind"] == "timeout");
    wait_for_any(&states, "a request timed out at the hung worker", timed_out);
    first.0.kill().expect("SIGKILL");
    first.wait(Duration::from_secs(10));
    for (id, dev) in ids.iter().zip(&mut devices) {
        assert!(dev.wait(Duration::from_secs(120)).success(), "{id} finished its rounds");
    }
    second.sigterm();
    assert!(second.wait(Duration::from_secs(30)).success());

    for (id, state) in ids.iter().zip(&states) {
        let (requested, adapted) = requested_and_adapted(state);
        let distinct: BTreeSet<u64> = adapted.iter().copied().collect();
        // Every window's request was adapted, exactly once: none lost, none installed twice.
        assert_eq!(adapted.len() as u64, rounds, "{id}: {adapted:?}");
        assert_eq!(distinct.len(), adapted.len(), "{id} installed a sequence twice: {adapted:?}");
        assert_eq!(distinct, requested.iter().copied().collect(), "{id}: every request adapted");
        let report: DeviceReport =
            serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
        // The only failures on record are the timeouts the hung worker caused, each retried.
        let failures = report.error.unwrap_or_default();
        let only_timeouts = failures
            .strip_prefix(r#"failures: {"timeout": "#)
            .and_then(|rest| rest.strip_suffix('}'))
            .is_some_and(|n| n.parse::<u64>().is_ok());
        assert!(failures.is_empty() || only_timeouts, "{id}: {failures}");
        assert!(report.bytes_down > 0, "{id} received parameters over MQTT");
    }
    // The second worker answered after the first was gone.
    let log = std::fs::read_to_string(dir.path().join("cloud-2.log")).expect("cloud log");
    assert!(log.contains("stopped after"), "{log}");
}

#[test]
fn a_revoked_device_is_told_so_by_the_worker_at_once_over_a_secured_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = deployment(dir.path(), None, &format!("[security]\ndir = \"{}/pki\"", dir.path().display()));
    let out = common::process::mmpg().arg("provision").arg(&file).output().expect("provision");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("broker (mqtt): password file"), "{stdout}");
    let kit = mmpg::security::Kit::new(&dir.path().join("pki"));
    let secured = mmpg_mqtt::mosquitto::Secured {
        cert: kit.server_cert(),
        key: kit.server_key(),
        files: mmpg_mqtt::credentials::BrokerFiles::of(&kit),
    };
    let broker = Mosquitto::start(&dir.path().join("broker"), Some(&secured)).expect("mosquitto starts");
    let url = format!("mqtts://127.0.0.1:{}", broker.port());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut worker = cloud_with(&file, dir.path(), 1, &["--listen", &listen, "--broker", &url]);
    // A device joining the workers' shared group by its configured name (with its own password)
    // would be handed its share of everyone's summaries, which the broker then drops: the
    // workers' group carries the kit's secret, so this thief is in a group of its own.
    let password = mmpg_mqtt::credentials::read_password(
        &mmpg::security::DeviceKit::new(&kit.device_dir("device-00")).broker_password(),
    )
    .expect("password");
    let thief_settings = mmpg_mqtt::BrokerSettings {
        tls: Some(mmpg_mqtt::tls::client_config(&kit.ca_cert()).expect("CA")),
        credentials: Some(mmpg_mqtt::Credentials { username: "device-00".into(), password }),
        ..mmpg_mqtt::BrokerSettings::plain("127.0.0.1", broker.port())
    };
    let _thief =
        mmpg_mqtt::MqttEndpoint::connect(&thief_settings, &mmpg_mqtt::Topics::new("kill-test"), "mmpg-cloud", "thief")
            .expect("Mosquitto grants the subscription (and delivers nothing)");
    let cloud = format!("https://{listen}");
    let run = |id: &str| {
        let mut dev = device(&file, id, 1, &["--cloud", &cloud, "--broker", &url]);
        assert!(dev.wait(Duration::from_secs(120)).success(), "{id} exits 0");
    };
    let state = |id: &str| dir.path().join("state").join(id);
    for id in ["device-00", "device-01"] {
        run(id);
        assert_eq!(requested_and_adapted(&state(id)).1.len(), 1, "{id} adapted over TLS with its password");
        let log = events(&state(id));
        assert!(!log.iter().any(|e| e["event"] == "failure"), "nothing swallowed by the thief: {log:#?}");
    }
    // Revoked after the broker read its password file: the broker still lets it in, the worker
    // does not — and says so in a signed reply, so the device does not wait out its timeouts.
    let out =
        common::process::mmpg().arg("provision").arg(&file).args(["--revoke", "device-01"]).output().expect("revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run("device-01");
    let log = events(&state("device-01"));
    let refused: Vec<_> = log.iter().filter(|e| e["event"] == "failure").collect();
    assert!(
        refused.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("revoked"))),
        "the worker's signed refusal names the revocation: {log:#?}"
    );
    assert!(!refused.iter().any(|e| e["kind"] == "timeout"), "told at once, not left to time out: {log:#?}");
    assert_eq!(requested_and_adapted(&state("device-01")).1.len(), 1, "no adaptation after the revocation");
    worker.sigterm();
    assert!(worker.wait(Duration::from_secs(30)).success());
}
