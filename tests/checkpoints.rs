//! The cloud loads a checkpoint of the very same training instead of training again; anything
//! else in the folder is retrained over or refused with the file named, never trusted.

mod common;

use mmpg::runtime::{self, RunError};
use mmpg::{CloudModel, DataSource, Deployment, NoProgress};
use mmpg_backends::BurnDevice;
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};
use proptest::prelude::*;

fn deployment(dir: &std::path::Path, generator_steps: usize) -> Deployment {
    let text = format!(
        "{}\n[cloud]\ncheckpoint = {:?}\n",
        common::tiny_deployment(5, 15, generator_steps, r#"{ kind = "contrast", severity = 4 }"#),
        dir.display().to_string()
    );
    Deployment::parse(&text, "ckpt.toml", &common::registry()).expect("valid")
}

fn accuracies(r: &mmpg::report::RunReport) -> Vec<(f64, f64)> {
    r.devices.iter().map(|d| (d.static_accuracy, d.adapted_accuracy)).collect()
}

#[test]
fn a_second_run_loads_the_checkpoint_and_reproduces_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = common::registry();
    let first = runtime::run(&deployment(dir.path(), 4), &registry, &NoProgress).expect("trains");
    assert!(!first.cloud.from_checkpoint);
    assert!(dir.path().join("model.safetensors").exists() && dir.path().join("generator.safetensors").exists());
    let second = runtime::run(&deployment(dir.path(), 4), &registry, &NoProgress).expect("loads");
    assert!(second.cloud.from_checkpoint);
    assert!(second.cloud.pretrain.is_none() && second.cloud.generator.is_none());
    assert_eq!(accuracies(&first), accuracies(&second));
    // Another training schedule is another training: the stale checkpoint is replaced.
    let third = runtime::run(&deployment(dir.path(), 5), &registry, &NoProgress).expect("retrains");
    assert!(!third.cloud.from_checkpoint);
}

#[test]
fn a_corrupt_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = common::registry();
    runtime::run(&deployment(dir.path(), 3), &registry, &NoProgress).expect("trains");
    let model = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&model).expect("written");
    let keep = bytes.len() / 2;
    bytes.truncate(keep);
    std::fs::write(&model, bytes).expect("rewrite");
    match runtime::run(&deployment(dir.path(), 3), &registry, &NoProgress) {
        Err(RunError::Checkpoint { path, message }) => {
            assert!(path.ends_with("model.safetensors"), "{path}: {message}");
        }
        other => panic!("expected a checkpoint error, got {:?}", other.map(|r| r.cloud.from_checkpoint)),
    }
}

fn model() -> LmmCloud {
    let data = Synthetic::new(SyntheticSettings::default()).expect("valid");
    LmmCloud::new(LmmSettings::default(), data.task(), &BurnDevice::autodiff(BurnDevice::Flex(Default::default())))
        .expect("model")
}

#[test]
fn a_checkpoint_of_another_geometry_is_refused_and_changes_nothing() {
    let data = Synthetic::new(SyntheticSettings::default()).expect("valid");
    let wider = LmmCloud::new(
        LmmSettings { hidden: 32, ..LmmSettings::default() },
        data.task(),
        &BurnDevice::autodiff(BurnDevice::Flex(Default::default())),
    )
    .expect("model");
    let mut m = model();
    let before = m.save().expect("saves");
    assert!(m.load(&wider.save().expect("saves")).is_err());
    assert!(m.save().expect("saves") == before, "a refused checkpoint changed the model");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn loading_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), flip in any::<prop::sample::Index>()) {
        let mut m = model();
        prop_assert!(m.load(&bytes).is_err());
        // A real checkpoint with one byte changed either loads (a value changed) or is refused.
        let mut real = m.save().expect("saves");
        let at = flip.index(real.len());
        real[at] ^= 0x5a;
        let _ = m.load(&real);
    }
}

/// The fingerprint of a deployment whose fleet (or `hold_out`) is `shifts`.
fn fingerprint(fleet: &str, hold_out: Option<&str>) -> String {
    let hold_out = hold_out.map(|h| format!("hold_out = [{h}]\n")).unwrap_or_default();
    let text = format!("seed = 3\n[cloud.training]\npretrain_steps = 5\n{hold_out}[fleet]\nshifts = [{fleet}]\n");
    Deployment::parse(&text, "f.toml", &common::registry()).expect("valid").training_fingerprint()
}

#[test]
fn the_training_fingerprint_covers_the_set_of_held_out_shifts_only() {
    let (a, b, c) = (
        r#"{ kind = "contrast", severity = 4 }"#,
        r#"{ kind = "blur", severity = 2, name = "cam" }"#,
        r#"{ kind = "noise", severity = 5 }"#,
    );
    let base = fingerprint(&format!("{a}, {b}"), None);
    // Reordered, renamed, or a second device with a held-out shift: the same training.
    assert_eq!(fingerprint(&format!("{b}, {a}, {a}"), None), base);
    assert_eq!(fingerprint(&format!("{a}, {}", r#"{ kind = "blur", severity = 2 }"#), None), base);
    // A device with a new shift changes what training must hold out.
    assert_ne!(fingerprint(&format!("{a}, {b}, {c}"), None), base);
    // A cloud that states what it holds out does not depend on the fleet.
    let stated = fingerprint(c, Some(&format!("{a}, {b}")));
    assert_eq!(stated, base);
    assert_eq!(fingerprint(&format!("{c}, {c}, {a}"), Some(&format!("{a}, {b}"))), stated);
}

#[test]
fn how_parameters_travel_does_not_change_the_training_and_private_summaries_do() {
    let with = |extra: &str| {
        let text = format!("seed = 3\n[fleet]\ndevices = 2\n[cloud.training]\npretrain_steps = 5\n{extra}");
        Deployment::parse(&text, "f.toml", &common::registry()).expect("valid").training_fingerprint()
    };
    let base = with("");
    assert_eq!(with("[cloud]\ndownload = \"f32\"\n"), base);
    // What the generator trains on does: private summaries are what it learns from then.
    let private = with("[anchor.settings.privacy]\nepsilon = 2.0\n");
    assert_ne!(private, base);
    // Where devices draw their noise does not: the generator always trains with seeded noise.
    assert_eq!(with("[anchor.settings.privacy]\nepsilon = 2.0\nnoise = \"seeded\"\n"), private);
    assert_ne!(with("[anchor.settings]\nk = 3\n"), base);
}
