//! Whole deployments through the runtime.

mod common;

use mmpg::runtime;
use mmpg::{Deployment, NoProgress};

#[test]
fn adaptation_beats_the_static_model_on_a_strongly_shifted_device() {
    let text = common::tiny_deployment(
        7,
        500,
        150,
        r#"{ kind = "brightness", severity = 5 }, { kind = "brightness+contrast", severity = 3 }, { kind = "clean" }"#,
    );
    let registry = common::registry();
    let deployment = Deployment::parse(&text, "tiny.toml", &registry).expect("valid deployment");
    let report = runtime::run(&deployment, &registry, &NoProgress).expect("runs");
    let strong = &report.devices[0];
    assert_eq!(strong.shift, "brightness@5");
    assert!(strong.error.is_none(), "{:?}", strong.error);
    assert!(
        strong.adapted_accuracy > strong.static_accuracy + 0.10,
        "static {:.3} adapted {:.3}",
        strong.static_accuracy,
        strong.adapted_accuracy
    );
    assert!(report.fleet.shifted_adapted_accuracy > report.fleet.shifted_static_accuracy);
    // Communication is accounted: something went each way, and less than the raw window up.
    assert!(strong.bytes_up > 0 && strong.bytes_down > 0);
    assert!(strong.bytes_up < strong.raw_window_bytes);
    // Retrieval is scored before and after adaptation, within range.
    let (before, after) = (strong.static_retrieval.expect("lmm embeds"), strong.adapted_retrieval.expect("lmm embeds"));
    assert!(before.r1 <= before.r5 && after.r5 <= after.r10 && after.median_rank >= 1.0);
    // Generator training decreased its loss.
    let log = report.cloud.generator.as_ref().expect("trained");
    assert!(log.tail_mean(15) < log.head_mean(15), "{} !< {}", log.tail_mean(15), log.head_mean(15));
}

#[test]
fn a_run_is_reproducible_from_its_seed() {
    let registry = common::registry();
    let run = |seed: u64| {
        let text = common::tiny_deployment(
            seed,
            12,
            4,
            r#"{ kind = "noise", severity = 4 }, { kind = "clean", class_mix_alpha = 0.3 }"#,
        );
        let d = Deployment::parse(&text, "det.toml", &registry).expect("valid");
        let r = runtime::run(&d, &registry, &NoProgress).expect("runs");
        let per_device: Vec<_> =
            r.devices.iter().map(|d| (d.static_accuracy, d.adapted_accuracy, d.bytes_up, d.bytes_down)).collect();
        (per_device, r.cloud.pretrain.map(|l| l.losses), r.cloud.generator.map(|l| l.losses))
    };
    let first = run(3);
    assert_eq!(first, run(3));
    assert_ne!(first.1, run(4).1);
}
