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

/// A deployment of two devices over the broker at `broker`, adapting every 8 clips at a
/// camera's pace, retrying a request after 2 s.
fn deployment(dir: &Path, broker: u16) -> std::path::PathBuf {
    let d = dir.display();
    let text = format!(
        r#"
seed = 5
[cloud]
checkpoint = "{d}/checkpoint"
[cloud.training]
pretrain_steps = 15
generator_steps = 4
source_domains = 16
[fleet]
window_clips = 16
eval_clips = 160
adapt_every = 8
clip_interval_ms = 25
request_timeout_ms = 2000
max_attempts = 8
state = "{d}/state"
shifts = [{{ kind = "contrast", severity = 4 }}, {{ kind = "brightness", severity = 4 }}]
[transport]
plugin = "mqtt"
[transport.settings]
name = "kill-test"
broker = "mqtt://127.0.0.1:{broker}"
"#
    );
    let path = dir.join("deployment.toml");
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
    let file = deployment(dir.path(), broker.port());
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
