//! The method's invariants: generation is a function of the seed and the summary, and the
//! variational terms move the way their weights ask under training.

mod common;

use mmpg::runtime::Composer;
use mmpg::{
    AnchorSummary, CloudModel, Deployment, FeatureStats, GeneratedParams, GeneratorTraining, HostTensor, NoProgress,
    ParameterGenerator, Quantisation, QuantisedTensor, TrainingLog, TrainingPlan,
};
use proptest::prelude::*;

fn deployment(extra: &str) -> Deployment {
    let text = format!("{}\n{extra}", common::tiny_deployment(5, 30, 0, r#"{ kind = "contrast", severity = 4 }"#));
    Deployment::parse(&text, "method.toml", &common::registry()).expect("valid deployment")
}

fn summary(values: &[f32], d: usize) -> AnchorSummary {
    let k = values.len() / d;
    let anchors = HostTensor::new(vec![k, d], values[..k * d].to_vec()).expect("shape");
    let stats = FeatureStats::of_rows(&anchors).expect("rows");
    AnchorSummary {
        anchors: QuantisedTensor::quantise(&anchors, Quantisation::F32).expect("finite"),
        mean: stats.mean,
        var: stats.std.iter().map(|s| s * s).collect(),
        frames: u32::try_from(k).expect("small"),
        clips: 1,
        text_anchors: None,
        privacy: None,
    }
}

/// A summary whose moments are `mean` and `var` in every dimension (the reference statistics
/// are 0 and 1), with anchors that are not all zero.
fn summary_with_moments(d: usize, mean: f32, var: f32) -> AnchorSummary {
    let values: Vec<f32> = (0..d * 4).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
    AnchorSummary { mean: vec![mean; d], var: vec![var; d], ..summary(&values, d) }
}

/// A generator built from the deployment's seed on an untrained model (cheap to build twice).
fn fresh_generator(deployment: &Deployment) -> (Box<dyn ParameterGenerator>, usize) {
    let registry = common::registry();
    let composer = Composer::new(deployment, &registry).expect("composer");
    let data = composer.data_source().expect("data");
    let model = composer.cloud_model(data.as_ref()).expect("model");
    (composer.generator(model.as_ref()).expect("generator"), model.feature_dim())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn generation_is_deterministic_for_a_seed_and_a_summary(values in prop::collection::vec(-3f32..3.0, 64 * 4)) {
        let deployment = deployment("");
        let (first, d) = fresh_generator(&deployment);
        let (second, _) = fresh_generator(&deployment);
        let s = summary(&values, d);
        let a = first.generate(&s).expect("generate");
        prop_assert_eq!(&a, &first.generate(&s).expect("again"));
        prop_assert_eq!(&a, &second.generate(&s).expect("rebuilt"));
        // Batched generation gives each device what it would get alone.
        let batch = first.generate_batch(&[s.clone(), summary(&values[d..], d), s]).expect("batch");
        prop_assert_eq!(&batch[0], &a);
        prop_assert_eq!(&batch[2], &a);
    }
}

fn curve<'a>(log: &'a TrainingLog, term: &str) -> &'a [f64] {
    &log.term_curves.iter().find(|(name, _)| name == term).expect("term recorded").1
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Trains the generator for a few steps on a fixed small problem.
fn train(settings: &str, steps: usize) -> TrainingLog {
    trained(settings, steps).log
}

/// A generator trained on a fixed small problem, with what the tests compare it against.
struct Trained {
    generator: Box<dyn ParameterGenerator>,
    deployment: Deployment,
    model: Box<dyn CloudModel>,
    log: TrainingLog,
    theta0: GeneratedParams,
    feature_dim: usize,
}

impl Trained {
    /// An untrained generator for the same trained model, to load checkpoints into.
    fn blank(&self) -> Box<dyn ParameterGenerator> {
        let registry = common::registry();
        let composer = Composer::new(&self.deployment, &registry).expect("composer");
        composer.generator(self.model.as_ref()).expect("generator")
    }

    /// A copy of the trained generator whose reset gate is `logit = weight · shift + bias` (Δ(z)
    /// served when the logit is ≥ 0), set through its checkpoint: the gate's one way in besides
    /// fitting.
    fn with_gate(&self, weight: [f32; 2], bias: f32) -> Box<dyn ParameterGenerator> {
        let bytes = self.generator.save().expect("save");
        let metadata = mmpg::wire::read_metadata(&bytes).expect("metadata");
        let mut tensors = mmpg::wire::decode_f32_tensors(&bytes).expect("tensors");
        let gate: Vec<String> = tensors.keys().filter(|k| k.starts_with("reset.")).cloned().collect();
        assert_eq!(gate.len(), 2, "a linear gate has a weight and a bias: {gate:?}");
        for name in gate {
            let value = match tensors[&name].shape() {
                [2, 1] => HostTensor::new(vec![2, 1], weight.to_vec()),
                [1] => HostTensor::new(vec![1], vec![bias]),
                other => panic!("gate tensor `{name}` has shape {other:?}"),
            };
            tensors.insert(name, value.expect("shape"));
        }
        let mut generator = self.blank();
        generator.load(&mmpg::wire::encode_f32_tensors(&tensors, metadata)).expect("load");
        generator
    }
}

/// A generator trained for a few steps on a fixed small problem.
fn trained(settings: &str, steps: usize) -> Trained {
    let deployment = deployment(&format!("[cloud.settings]\n{settings}"));
    let registry = common::registry();
    let composer = Composer::new(&deployment, &registry).expect("composer");
    let data = composer.data_source().expect("data");
    let mut model = composer.cloud_model(data.as_ref()).expect("model");
    let sources = data.source_domains(4, 9, &[]);
    let plan = TrainingPlan { steps: 30, batch: 16, learning_rate: 3e-3, seed: 1 };
    model.pretrain(data.as_ref(), &sources[..1], &plan, &NoProgress).expect("pretrain");
    let mut generator = composer.generator(model.as_ref()).expect("generator");
    let reasoner = composer.anchor_reasoner().expect("reasoner");
    let log = generator
        .train(&GeneratorTraining {
            model: model.as_ref(),
            data: data.as_ref(),
            domains: &sources,
            reasoner: reasoner.as_ref(),
            window_clips: 8,
            plan: TrainingPlan { steps, batch: 8, learning_rate: 3e-3, seed: 2 },
            progress: &NoProgress,
        })
        .expect("train");
    let (theta0, feature_dim) = (model.base_params(), model.feature_dim());
    drop(composer);
    Trained { generator, deployment, model, log, theta0, feature_dim }
}

#[test]
fn kl_and_reconstruction_fall_when_weighted_and_the_objective_falls() {
    let log = train("beta = 1.0\nlambda = 1.0", 80);
    let (head, tail) = (..10, 70..);
    for term in ["kl", "reconstruction"] {
        let c = curve(&log, term);
        assert!(mean(&c[tail.clone()]) < mean(&c[head]), "{term}: {:?}", c);
    }
    assert!(log.tail_mean(10) < log.head_mean(10), "loss {:?}", log.losses);
}

#[test]
fn the_retrieval_term_falls_when_weighted_and_is_absent_at_zero() {
    let log = train("retrieval = 5.0", 40);
    let c = curve(&log, "retrieval");
    assert!(c.iter().all(|v| v.is_finite() && *v > 0.0), "InfoNCE of a batch is positive: {c:?}");
    assert!(mean(&c[30..]) < mean(&c[..10]), "retrieval: {c:?}");
    let off = train("retrieval = 0.0", 3);
    assert!(curve(&off, "retrieval").iter().all(|v| *v == 0.0), "γ = 0 asks the model for nothing");
}

#[test]
fn low_rank_changes_need_fewer_cloud_parameters() {
    let (basis, _) = fresh_generator(&deployment(""));
    let (low_rank, _) = fresh_generator(&deployment("[cloud.settings]\ndelta = \"low-rank\"\nrank = 4"));
    assert!(
        low_rank.parameter_count() * 3 < basis.parameter_count(),
        "{} vs {}",
        low_rank.parameter_count(),
        basis.parameter_count()
    );
    // Untrained, U(z) ≈ 0: generation starts from θ0, the static model, as the basis form does.
    let deployment = deployment("[cloud.settings]\ndelta = \"low-rank\"\nrank = 4");
    let registry = common::registry();
    let composer = Composer::new(&deployment, &registry).expect("composer");
    let data = composer.data_source().expect("data");
    let model = composer.cloud_model(data.as_ref()).expect("model");
    let theta0 = model.base_params();
    let values: Vec<f32> = (0..64 * 4).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
    let generated = low_rank.generate(&summary(&values, model.feature_dim())).expect("generates");
    for (name, t) in &generated.tensors {
        let max_change =
            t.values().iter().zip(theta0.tensors[name].values()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_change < 0.05, "`{name}` starts {max_change} away from θ0");
    }
}

/// The largest absolute difference between two sets of slot values.
fn max_difference(a: &GeneratedParams, b: &GeneratedParams) -> f32 {
    a.tensors
        .iter()
        .flat_map(|(name, t)| t.values().iter().zip(b.tensors[name].values()).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn the_reset_gate_sends_theta0_in_distribution_and_delta_far_away_and_survives_a_checkpoint() {
    let gated = trained("reset = true\nreset_episodes = 24", 20);
    let (theta0, d) = (&gated.theta0, gated.feature_dim);
    // At the reference statistics both shift features are 0; a mean of 3 makes the first ln 10.
    let (near, far) = (summary_with_moments(d, 0.0, 1.0), summary_with_moments(d, 3.0, 1.0));
    // A gate that never resets serves Δ(z): the trained generator's own change.
    let never = gated.with_gate([0.0, 0.0], 1.0);
    for s in [&near, &far] {
        let adapted = never.generate(s).expect("Δ(z)");
        assert!(max_difference(&adapted, theta0) > 0.0, "trained Δ(z) must move θ for the gate to matter");
    }
    // A gate that resets at the reference (logit −1 there) and not 3 away (logit 4·ln 10 − 1).
    let pinned = gated.with_gate([4.0, 4.0], -1.0);
    assert_eq!(&pinned.generate(&near).expect("near"), theta0, "in distribution the gate must send θ0 exactly");
    let served = pinned.generate(&far).expect("far");
    assert_eq!(served, never.generate(&far).expect("Δ(z)"), "far away the gate must keep Δ(z)");
    assert!(max_difference(&served, theta0) > 0.0);
    // Batched, each summary gets what it gets alone.
    let batch = pinned.generate_batch(&[far.clone(), near.clone()]).expect("batch");
    assert_eq!((&batch[0], &batch[1]), (&served, theta0));

    // The fitted gate only ever swaps Δ(z) for θ0 exactly, and its checkpoint restores it.
    let summaries: Vec<AnchorSummary> = [0.05f32, 0.5, 1.0, 3.0, 10.0]
        .iter()
        .map(|scale| {
            let values: Vec<f32> = (0..d * 4).map(|i| scale * (((i * 37) % 11) as f32 / 5.0 - 1.0)).collect();
            summary(&values, d)
        })
        .chain([near, far])
        .collect();
    let mut restored = gated.blank();
    restored.load(&gated.generator.save().expect("save")).expect("load");
    for s in &summaries {
        let served = gated.generator.generate(s).expect("gated");
        if served != never.generate(s).expect("Δ(z)") {
            assert_eq!(&served, theta0, "a gated generation is Δ(z) or exactly θ0");
        }
        assert_eq!(restored.generate(s).expect("restored"), served);
    }
}

#[test]
fn the_cloud_trains_on_no_scene_of_a_device_pool() {
    let text = format!(
        "{}\n[cloud.settings]\nreset = true\nreset_episodes = 4\nclean_fraction = 0.5\n",
        common::tiny_deployment(5, 10, 10, r#"{ kind = "contrast", severity = 4 }, { kind = "clean" }"#)
    );
    common::assert_the_cloud_never_sees_device_pools(&text, 100);
}

#[test]
fn the_trained_generator_stays_near_theta0_on_reference_windows_and_keeps_its_reference_in_the_checkpoint() {
    // The defaults: Δ decoded relative to the reference latent, the stay penalty on in-distribution episodes.
    let t = trained("", 40);
    let registry = common::registry();
    let composer = Composer::new(&t.deployment, &registry).expect("composer");
    let data = composer.data_source().expect("data");
    let reasoner = composer.anchor_reasoner().expect("reasoner");
    let reference_domain = &data.source_domains(4, 9, &[])[0];
    let shifted = mmpg::DomainSpec {
        shifts: vec![mmpg::Shift { kind: "contrast".into(), severity: 5 }],
        ..mmpg::DomainSpec::clean("shifted", 77)
    };
    let mean_change = |domain: &mmpg::DomainSpec| -> f64 {
        let changes: Vec<f64> = (0..4u64)
            .map(|seed| {
                let window = data.clips(domain, mmpg::Split::Train, 8, 100 + seed).expect("clips");
                let features = t.model.frame_features(&window).expect("features");
                let s = reasoner.summarise(&features, &t.model.reference_stats(), window.len(), seed).expect("summary");
                let generated = t.generator.generate(&s).expect("generates");
                let (sum, n) = generated.tensors.iter().fold((0.0, 0usize), |(sum, n), (name, v)| {
                    let d: f64 = v
                        .values()
                        .iter()
                        .zip(t.theta0.tensors[name].values())
                        .map(|(a, b)| f64::from((a - b).abs()))
                        .sum();
                    (sum + d, n + v.len())
                });
                sum / n as f64
            })
            .collect();
        mean(&changes)
    };
    let (at_reference, away) = (mean_change(reference_domain), mean_change(&shifted));
    assert!(at_reference < away, "mean |Δ| at the reference {at_reference} vs shifted {away}");

    // The reference latent is learnt, saved and restored.
    let saved = t.generator.save().expect("save");
    let tensors = mmpg::wire::decode_f32_tensors(&saved).expect("tensors");
    let reference = tensors.get("reference").expect("the checkpoint keeps the reference latent");
    assert!(reference.values().iter().any(|v| *v != 0.0), "a trained reference latent is not the initial zeros");
    let mut restored = t.blank();
    restored.load(&saved).expect("load");
    let s = summary_with_moments(t.feature_dim, 0.5, 1.5);
    assert_eq!(restored.generate(&s).expect("restored"), t.generator.generate(&s).expect("trained"));

    // A generator set up without it refuses the checkpoint, naming the setting, rather than
    // dropping the reference silently.
    let (mut other, _) = fresh_generator(&deployment("[cloud.settings]\nzero_at_reference = false"));
    let error = other.load(&saved).expect_err("a checkpoint of another decoding");
    assert!(error.to_string().contains("zero_at_reference"), "{error}");
}
