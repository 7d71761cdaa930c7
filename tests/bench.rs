//! `mmpg bench` as a user runs it: one command, every method on the same devices, a Markdown
//! and JSON report and the plots.

use std::process::Command;

use mmpg_bench::{BenchReport, CDC, Family};

const TINY_BENCH: &str = r#"
seed = 3
[cloud.training]
pretrain_steps = 40
generator_steps = 12
source_domains = 8
[fleet]
window_clips = 8
eval_clips = 48
shifts = [
  { kind = "contrast", severity = 5 },
  { kind = "brightness", severity = 4 },
  { kind = "clean" },
]
[bench]
k_sweep = [2]
epsilon_sweep = [2.0]
generation_repeats = 20
stream_eval_clips = 32
stream = [{ kind = "blur", severity = 2 }, { kind = "blur", severity = 5 }]
# wgpu, when compiled in, is timed by the conformance suite, not here: its kernels JIT slowly.
backends = ["cpu", "tch"]
[[bench.baselines]]
plugin = "static"
[[bench.baselines]]
plugin = "fta"
settings = { labels = 4, max_epochs = 2 }
tune = { learning_rate = [0.0001, 0.01] }
oracle = true
[[bench.baselines]]
plugin = "fta"
name = "FTA all"
settings = { labels = 4, max_epochs = 2, scope = "all" }
[[bench.baselines]]
plugin = "feature-stats"
[[bench.baselines]]
plugin = "t3a"
[[bench.baselines]]
plugin = "tent"
settings = { batch = 4 }
tune = { learning_rate = [0.001, 0.01] }
[[bench.baselines]]
plugin = "foa"
settings = { batch = 4, epochs = 1 }
[[bench.baselines]]
plugin = "lame"
[[bench.baselines]]
plugin = "lame"
name = "CDC + LAME"
start = "cdc"
[[bench.variants]]
name = "β = 0"
generator = { beta = 0.0 }
[[bench.variants]]
name = "int8 (serve-time)"
anchor = { quantisation = "int8" }
retrain = false
"#;

#[test]
fn bench_writes_every_row_table_and_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tiny.toml");
    std::fs::write(&config, TINY_BENCH).expect("write config");
    let out_dir = dir.path().join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_mmpg"))
        .args(["bench", config.to_str().expect("utf-8"), "--out", out_dir.to_str().expect("utf-8")])
        .output()
        .expect("mmpg runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let markdown = std::fs::read_to_string(out_dir.join("report.md")).expect("report.md");
    for section in [
        "## Methods",
        "## Ablations",
        "## K sweep",
        "## Private summaries",
        "## Generation",
        "## Long stream",
        "## Targets",
    ] {
        assert!(markdown.contains(section), "{section} missing:\n{markdown}");
    }
    let report: BenchReport =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).expect("json")).expect("parses");
    for plot in [
        "accuracy_vs_severity.png",
        "accuracy_vs_upload.png",
        "accuracy_vs_epsilon.png",
        "fta_vs_labels.png",
        "fta_held_out_loss.png",
    ] {
        let bytes = std::fs::read(out_dir.join(plot)).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "{plot} is not a PNG ({stderr})");
    }

    let names: Vec<&str> = report.methods.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(
        names,
        [
            CDC,
            "static",
            "FTA@4 (slots)",
            "FTA@4 (slots), oracle (upper bound)",
            "FTA all",
            "BN / feature stats",
            "T3A",
            "TENT",
            "FOA",
            "LAME",
            "CDC + LAME"
        ]
    );
    let row = |name: &str| report.methods.iter().find(|m| m.method == name).expect("row");
    let (cdc, stat, fta, fta_all) = (row(CDC), row("static"), row("FTA@4 (slots)"), row("FTA all"));
    assert_eq!(report.devices, 3);
    assert_eq!(report.shifted_devices, 2);

    // Same devices for every method: the static row is the static model, device by device.
    for d in &stat.devices {
        assert_eq!(d.adapted_accuracy, d.static_accuracy);
    }
    for m in &report.methods {
        let statics: Vec<f64> = m.devices.iter().map(|d| d.static_accuracy).collect();
        assert_eq!(statics, stat.devices.iter().map(|d| d.static_accuracy).collect::<Vec<_>>(), "{}", m.method);
        assert_eq!(
            m.failures,
            0,
            "{}: {:?}",
            m.method,
            m.devices.iter().filter_map(|d| d.error.as_ref()).collect::<Vec<_>>()
        );
    }

    // Costs are what each method claims.
    assert_eq!(cdc.family, Family::Cdc);
    assert_eq!((cdc.device_trainable_parameters, cdc.labels_per_device), (0, 0));
    assert_eq!(cdc.cloud_trainable_parameters, report.cloud.generator_parameters);
    assert!(cdc.bytes_up > 0.0 && cdc.bytes_down > 0.0);
    assert_eq!((fta.labels_per_device, fta.bytes_up, fta.bytes_down), (4, 0.0, 0.0));
    assert_eq!(fta.device_trainable_parameters, report.cloud.slot_parameters);
    assert!(fta_all.device_trainable_parameters > fta.device_trainable_parameters);
    assert!(fta.device_peak_bytes.is_some_and(|b| b > 0), "the binary counts heap bytes");
    // FTA says how many devices it left at the initial weights, and shows one device's held-out
    // loss per epoch: epoch 0 and at most max_epochs = 2 more.
    let (unchanged, of) = fta.unchanged_devices.expect("a training baseline counts them");
    assert_eq!(of, 3);
    assert!(unchanged <= of);
    let (device, curves) = fta.example_curves.as_ref().expect("FTA's curves");
    assert_eq!(device, &stat.devices[0].device);
    let (name, loss) = &curves[0];
    assert_eq!(name, "held-out loss");
    assert!((2..=3).contains(&loss.len()) && loss.iter().all(|v| v.is_finite() && *v > 0.0), "{loss:?}");

    // FTA's learning rate is chosen on source domains, and the oracle row, choosing per device on
    // its own scored clips among the same candidates (its chosen runs seeded as the row's), is
    // never below the tuned row on any device.
    let tuning = fta.tuning.as_ref().expect("tuned on source domains");
    let labels: Vec<&str> = tuning.candidates.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(labels, ["learning_rate = 0.0001", "learning_rate = 0.01"]);
    assert!(labels.contains(&tuning.chosen.as_str()) && tuning.domains > 0, "{tuning:?}");
    let oracle = row("FTA@4 (slots), oracle (upper bound)");
    assert_eq!(oracle.family, Family::Oracle);
    assert_eq!(oracle.labels_per_device, 4);
    for (o, t) in oracle.devices.iter().zip(&fta.devices) {
        assert!(
            o.adapted_accuracy >= t.adapted_accuracy,
            "{}: {} < {}",
            o.device,
            o.adapted_accuracy,
            t.adapted_accuracy
        );
    }
    assert!(markdown.contains("an upper bound, not deployable"), "{markdown}");
    assert!(
        report.targets.iter().any(|t| t.name == "accuracy ≥ FTA@4 (slots), oracle (upper bound) (shifted devices)")
    );
    assert_eq!(stat.unchanged_devices, Some((3, 3)), "the static model changes nothing");

    // The label-free test-time adaptation methods (#30): no labels, TENT alone backpropagates
    // (over the FiLM slot), FOA searches it with forward passes only, LAME changes no parameter;
    // each says how many passes it ran, and a target sets CDC against each.
    let (tent, foa, lame, combined) = (row("TENT"), row("FOA"), row("LAME"), row("CDC + LAME"));
    for m in [tent, foa, lame, combined] {
        assert_eq!((m.labels_per_device, m.bytes_up == 0.0), (0, m.method != "CDC + LAME"), "{}", m.method);
        assert!(m.unchanged_devices.is_some_and(|(_, of)| of == 3), "{}", m.method);
    }
    let film = 2 * 16;
    assert_eq!(tent.device_trainable_parameters, film);
    assert_eq!(tent.forward_passes, Some(3.0), "2 steps of 4 window clips and one recalibration pass");
    assert!(tent.tuning.is_some());
    assert_eq!(foa.device_trainable_parameters, 0);
    assert!(foa.device_changed_parameters >= film && foa.forward_passes.is_some_and(|p| p > 2.0), "{foa:?}");
    assert_eq!((lame.device_trainable_parameters, lame.device_changed_parameters), (0, 0));
    // The combined row starts from the method's parameters: its bytes and cloud are CDC's.
    assert_eq!((combined.bytes_up, combined.bytes_down), (cdc.bytes_up, cdc.bytes_down));
    assert_eq!(combined.cloud_trainable_parameters, cdc.cloud_trainable_parameters);
    for name in ["TENT", "FOA", "LAME"] {
        let target = format!("accuracy ≥ {name} (label-free; shifted devices)");
        assert!(report.targets.iter().any(|t| t.name == target), "{target}");
    }
    assert!(report.targets.iter().any(|t| t.name == "device time adaptation adds ≤ 1/100 of FOA"));
    assert!(!report.targets.iter().any(|t| t.name.contains("CDC + LAME")), "the combined row is not a rival");
    assert!(markdown.contains("| backprop |") && markdown.contains("answer every scored clip as before"), "{markdown}");

    // Ablations: the retrained variant, the serve-time one, the K sweep.
    let ablations: Vec<&str> = report.ablations.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(ablations, ["β = 0", "int8 (serve-time)", "K = 2", "private summaries, ε = 2"]);
    assert!(report.ablations[1].bytes_up < cdc.bytes_up, "int8 anchors upload less than f16");
    assert_eq!(report.k_sweep.len(), 1);
    assert_eq!(report.k_sweep[0].0, 2);
    assert!(report.k_sweep[0].1 < cdc.bytes_up);
    // The ε sweep: every device made one private upload, so its total is the stated ε; the
    // main row made none.
    let private = &report.ablations[3];
    assert!(private.devices.iter().all(|d| d.privacy.is_some_and(|p| p.uploads == 1 && p.epsilon_per_upload == 2.0)));
    assert!(cdc.devices.iter().all(|d| d.privacy.is_none()));
    let point = report.epsilon_sweep.first().expect("one budget");
    assert_eq!((point.epsilon, point.delta), (2.0, 1e-5));
    assert!((point.epsilon_total - 2.0).abs() < 1e-6, "{point:?}");

    // The backend table: the backends named, in order; the CPU timed; a backend not compiled
    // into this build (tch never is outside scripts/with-libtorch.sh) says so.
    let kinds: Vec<&str> = report.backends.iter().map(|b| b.backend.as_str()).collect();
    assert_eq!(kinds, ["cpu", "tch"]);
    let cpu = &report.backends[0];
    assert!(cpu.unavailable.is_none());
    for figure in [cpu.forward_16_ms, cpu.generation_devices_per_s, cpu.train_step_ms] {
        assert!(figure.is_some_and(|v| v > 0.0), "{cpu:?}");
    }
    let tch = &report.backends[1];
    assert!(tch.unavailable.as_deref().is_some_and(|w| w.contains("--features tch")), "{:?}", tch.unavailable);
    assert!(markdown.contains("## Backends"));
    assert_eq!(report.stream.len(), 2);
    assert!(report.generation.p50_ms <= report.generation.p99_ms);
    assert!(report.generation.devices_per_second > 0.0);
    assert!(report.targets.iter().any(|t| t.name.starts_with("upload")));
    assert!(report.targets.iter().any(|t| t.name.starts_with("long stream")));
}
