//! Cloud and devices as separate processes on loopback: the same results as one process, and
//! faults met by keeping the last good parameters. Every process is killed (by pid) when its
//! test ends, every wait is bounded.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use common::process::{cloud, count, deployment, device, events, fake_cloud, free_port, mmpg, wait_for};
use mmpg::report::{DeviceReport, RunReport};

#[test]
fn a_fleet_over_tls_gives_the_figures_of_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).expect("cert");
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).expect("cert written");
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).expect("key written");
    let d = dir.path().display();
    let tls = format!("tls = {{ cert = \"{d}/cert.pem\", key = \"{d}/key.pem\" }}");
    let file = deployment(dir.path(), free_port(), "", &tls);
    let run_json = dir.path().join("run.json");
    let fleet_json = dir.path().join("fleet.json");
    let status = mmpg().arg("run").arg(&file).arg("--report").arg(&run_json).output().expect("run");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status = mmpg()
        .arg("fleet")
        .arg(&file)
        .args(["--deadline", "300", "--report"])
        .arg(&fleet_json)
        .output()
        .expect("fleet");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let read = |p: &Path| -> RunReport { serde_json::from_slice(&std::fs::read(p).expect("report")).expect("json") };
    let (one, fleet) = (read(&run_json), read(&fleet_json));
    assert_eq!(fleet.devices.len(), 2);
    assert!(fleet.cloud.from_checkpoint, "the fleet's cloud loads the checkpoint the run wrote");
    for (a, b) in one.devices.iter().zip(&fleet.devices) {
        assert_eq!((a.device.as_str(), a.static_accuracy), (b.device.as_str(), b.static_accuracy));
        assert!((a.adapted_accuracy - b.adapted_accuracy).abs() < 1e-9, "{a:?}\n{b:?}");
        assert!(b.bytes_down > 0, "{} received parameters", b.device);
        assert_eq!((a.bytes_up, a.bytes_down), (b.bytes_up, b.bytes_down), "same envelopes on the wire");
        assert!(b.error.is_none(), "{:?}", b.error);
    }
}

#[test]
fn devices_survive_a_killed_cloud_and_a_killed_device_resumes_its_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = deployment(dir.path(), free_port(), "adapt_every = 8\nclip_interval_ms = 25", "");
    let state = dir.path().join("state/device-00");
    let mut first = cloud(&file, dir.path(), 1);
    let mut dev = device(&file, "device-00", 0, &[]);
    wait_for(&state, "a first adaptation", |e| e.iter().any(|e| e["event"] == "adapted"));

    // The cloud dies: the device keeps serving (its requests go on) and counts the failures.
    first.0.kill().expect("SIGKILL");
    first.wait(Duration::from_secs(10));
    let requests = count(&state, "request");
    wait_for(&state, "failures and further requests", |e| {
        e.iter().any(|e| e["event"] == "failure" && e["kind"] == "unreachable")
            && e.iter().filter(|e| e["event"] == "request").count() > requests + 1
    });
    assert!(dev.running(), "the device serves on without its cloud");

    // Restarted, the cloud loads its checkpoint and the device adapts again.
    let adapted = count(&state, "adapted");
    let mut second = cloud(&file, dir.path(), 2);
    let log = std::fs::read_to_string(dir.path().join("cloud-2.log")).expect("cloud log");
    assert!(log.contains("loaded from its checkpoint"), "{log}");
    wait_for(&state, "an adaptation after the restart", |e| {
        e.iter().filter(|e| e["event"] == "adapted").count() > adapted
    });

    // The device dies mid-stream; restarted while the cloud is down, it serves with what it had.
    dev.0.kill().expect("SIGKILL");
    dev.wait(Duration::from_secs(10));
    let last: f64 = events(&state)
        .iter()
        .rev()
        .find(|e| e["event"] == "adapted")
        .and_then(|e| e["accuracy"].as_f64())
        .expect("an adapted accuracy");
    second.0.kill().expect("SIGKILL");
    second.wait(Duration::from_secs(10));
    let starts = count(&state, "start");
    let mut again = device(&file, "device-00", 0, &[]);
    wait_for(&state, "the restarted device", |e| e.iter().filter(|e| e["event"] == "start").count() > starts);
    let start = events(&state).into_iter().rev().find(|e| e["event"] == "start").expect("start event");
    assert_eq!(start["restored"], true, "{start}");
    assert_eq!(start["accuracy"].as_f64(), Some(last), "it serves its last good parameters");
    again.sigterm();
    assert!(again.wait(Duration::from_secs(30)).success());
    let report: DeviceReport =
        serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
    assert_eq!(report.adapted_accuracy, last);
}

/// What the hostile cloud answers to `POST /v1/adapt`.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    Garbage,
    OtherSchema,
    Slow,
}

/// A cloud that answers every request badly, on `listener`, until the test ends.
fn hostile_cloud(listener: TcpListener, mode: Hostile) {
    fake_cloud(listener, move |body| match mode {
        Hostile::Garbage => (200, b"certainly not an envelope".to_vec()),
        Hostile::OtherSchema => {
            let request = mmpg::wire::Envelope::decode(&body).expect("a real request");
            let params = mmpg::wire::Envelope {
                kind: mmpg::wire::MessageKind::Params,
                schema_hash: mmpg::SchemaHash(request.schema_hash.0 ^ 1),
                ..request
            };
            (200, params.encode().expect("encodes"))
        }
        Hostile::Slow => {
            std::thread::sleep(Duration::from_secs(4));
            (200, Vec::new())
        }
    });
}

#[test]
fn a_hostile_cloud_is_refused_and_the_device_keeps_its_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = deployment(dir.path(), free_port(), "adapt_every = 4", "");
    let bundle = dir.path().join("bundle");
    let out = mmpg().arg("export").arg(&file).arg("--out").arg(&bundle).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (mode, kind) in
        [(Hostile::Garbage, "malformed"), (Hostile::OtherSchema, "wrong-schema"), (Hostile::Slow, "timeout")]
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        hostile_cloud(listener, mode);
        let state = dir.path().join(format!("{mode:?}"));
        std::fs::create_dir_all(state.join("bundle")).expect("state");
        for entry in std::fs::read_dir(&bundle).expect("bundle") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), state.join("bundle").join(entry.file_name())).expect("copied");
        }
        let state_arg = state.display().to_string();
        let mut dev = device(&file, "device-00", 1, &["--cloud", &url, "--state", &state_arg]);
        assert!(dev.wait(Duration::from_secs(120)).success(), "{mode:?}: {:#?}", events(&state));
        let log = events(&state);
        assert!(log.iter().any(|e| e["event"] == "failure" && e["kind"] == kind), "{mode:?}: {log:#?}");
        assert!(!log.iter().any(|e| e["event"] == "adapted"), "{mode:?}");
        let stop = log.iter().find(|e| e["event"] == "stop").expect("stop event");
        assert_eq!(stop["served"], 16, "{mode:?}: serving went on while the exchange failed");
        let report: DeviceReport =
            serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
        assert_eq!(report.adapted_accuracy, report.static_accuracy, "{mode:?}: parameters kept");
        assert!(report.error.is_some(), "{mode:?}");
        assert!(!state.join("params.envelope").exists(), "{mode:?}: nothing persisted");
    }
}

#[test]
fn a_device_outside_the_deployment_serves_and_adapts_on_a_folder_of_clips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = deployment(dir.path(), free_port(), "adapt_every = 4", "");
    let clips = dir.path().join("clips");
    let out = mmpg()
        .args(["clips", "--id", "device-00", "--count", "6", "--out"])
        .arg(&clips)
        .arg(&file)
        .output()
        .expect("clips");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(&clips).expect("folder").count(), 6);
    std::fs::write(clips.join("zz-broken.safetensors"), b"not a clip").expect("written");
    let state = dir.path().join("camera");
    let (clips_arg, state_arg) = (clips.display().to_string(), state.display().to_string());
    let refused = mmpg()
        .args(["device", "--id", "camera-7", "--rounds", "1", "--clips", &clips_arg, "--state", &state_arg])
        .arg(&file)
        .output()
        .expect("device");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("zz-broken.safetensors"), "the bad file is named: {message}");
    std::fs::remove_file(clips.join("zz-broken.safetensors")).expect("removed");

    let _cloud = cloud(&file, dir.path(), 1);
    let mut dev = device(&file, "camera-7", 2, &["--clips", &clips_arg, "--state", &state_arg]);
    assert!(dev.wait(Duration::from_secs(120)).success(), "{:#?}", events(&state));
    assert_eq!(count(&state, "adapted"), 2, "{:#?}", events(&state));
    let report: DeviceReport =
        serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
    assert_eq!(report.scored_clips, 6);
    assert!(report.shift.starts_with("clips from"), "{}", report.shift);
}

#[test]
fn a_device_serves_a_video_file_under_a_corruption_and_restarts_on_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = deployment(dir.path(), free_port(), "adapt_every = 4", "");
    let video = std::env::current_dir().expect("cwd").join("data/videos/bikes.mp4");
    let state = dir.path().join("camera");
    let (video_arg, state_arg) = (video.display().to_string(), state.display().to_string());
    let args = ["--video", &video_arg, "--corruption", "fog@4", "--frame-stride", "2", "--state", &state_arg];
    let _cloud = cloud(&file, dir.path(), 1);
    let mut dev = device(&file, "camera-7", 2, &args);
    assert!(dev.wait(Duration::from_secs(120)).success(), "{:#?}", events(&state));
    assert_eq!(count(&state, "adapted"), 2, "{:#?}", events(&state));
    let report: DeviceReport =
        serde_json::from_slice(&std::fs::read(state.join("report.json")).expect("report")).expect("json");
    // Unlabelled: no accuracy, but the answers' entropy before and after.
    assert_eq!(report.scored_clips, 0);
    assert!(report.static_accuracy.is_nan());
    assert!(report.static_entropy.is_some_and(f64::is_finite) && report.adapted_entropy.is_some_and(f64::is_finite));
    assert!(report.bytes_up > 0 && report.bytes_up < report.raw_window_bytes, "{report:?}");
    assert_eq!(report.shift, format!("video {video_arg} under fog@4"));
    // Restarted on its state folder, it restores its parameters (nothing to score them on) and
    // goes on adapting.
    let mut again = device(&file, "camera-7", 1, &args);
    assert!(again.wait(Duration::from_secs(120)).success(), "{:#?}", events(&state));
    assert!(events(&state).iter().any(|e| e["event"] == "restored"), "{:#?}", events(&state));
    assert_eq!(count(&state, "adapted"), 3, "{:#?}", events(&state));
}
