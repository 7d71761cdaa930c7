//! The real Fashion-MNIST data as `scripts/fetch-data.sh` installs it.

mod common;

use mmpg::{DataSource, DomainSpec, Shift, Split};
use mmpg_fashion::{CLASSES, Fashion, FashionSettings};

#[test]
fn the_installed_dataset_gives_labelled_clips_of_real_photos() {
    let source = Fashion::new(FashionSettings::default())
        .unwrap_or_else(|e| panic!("{e} (the tests read the real dataset; `scripts/fetch-data.sh` installs it)"));
    assert_eq!(source.task().frame_shape, [1, 28, 28]);
    let domain = DomainSpec {
        shifts: vec![Shift { kind: "fog".into(), severity: 3 }],
        class_mix_alpha: Some(0.5),
        ..DomainSpec::clean("real", 4)
    };
    for split in [Split::Train, Split::Stream, Split::Test] {
        let clips = source.clips(&domain, split, 8, 1).expect("clips");
        for clip in &clips {
            let values = clip.frames.values();
            assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
            // Real photos: varied pixels, not a constant frame.
            let mean = values.iter().sum::<f32>() / values.len() as f32;
            assert!(values.iter().any(|v| (v - mean).abs() > 0.2), "flat frames");
            assert!(clip.answer.is_some_and(|a| a < source.task().answers.len()));
            assert!(CLASSES.iter().any(|c| clip.caption.contains(c)), "{}", clip.caption);
        }
    }
}

#[test]
fn a_missing_dataset_is_one_line_naming_the_install_command_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("nodata.toml");
    std::fs::write(&config, "[data]\nplugin = \"fashion\"\n[data.settings]\nroot = \"/nonexistent/fashion\"\n[fleet]\nshifts = [{ kind = \"fog\", severity = 2 }]\n")
        .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpg"))
        .args(["run", config.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is missing: run `scripts/fetch-data.sh`"), "{stderr}");
}

/// The leak #16 closed: the FDA's episodes drew their windows from the stream pool (half the test
/// photos), which is where devices' windows come from.
#[test]
fn the_cloud_trains_on_no_photo_of_a_device_pool() {
    common::assert_the_cloud_never_sees_device_pools(
        r#"
seed = 3
[data]
plugin = "fashion"
[data.settings]
frames = 4
[cloud.settings]
reset = true
reset_episodes = 4
clean_fraction = 0.5
[cloud.training]
pretrain_steps = 10
generator_steps = 10
source_domains = 8
[fleet]
window_clips = 32
eval_clips = 64
shifts = [{ kind = "fog", severity = 3 }, { kind = "clean" }, { kind = "pixelate", severity = 4, class_mix_alpha = 0.5 }]
"#,
        200,
    );
}
