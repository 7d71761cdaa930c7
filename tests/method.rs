//! The method's invariants: generation is a function of the seed and the summary, and the
//! variational terms move the way their weights ask under training.

mod common;

use mmpg::runtime::Composer;
use mmpg::{
    AnchorSummary, Deployment, FeatureStats, GeneratedParams, GeneratorTraining, HostTensor, NoProgress,
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
        anchors: QuantisedTensor::quantise(&anchors, Quantisation::F32),
        mean: stats.mean,
        var: stats.std.iter().map(|s| s * s).collect(),
        frames: k as u32,
        clips: 1,
        text_anchors: None,
    }
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
    /// An untrained generator for the same trained model, to load checkpoints into.
    blank: Box<dyn ParameterGenerator>,
    log: TrainingLog,
    theta0: GeneratedParams,
    feature_dim: usize,
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
    let blank = composer.generator(model.as_ref()).expect("generator");
    Trained { generator, blank, log, theta0: model.base_params(), feature_dim: model.feature_dim() }
}

#[test]
fn kl_and_reconstruction_fall_when_weighted_and_the_objective_falls() {
    let log = train("beta = 1.0\nlambda = 1.0", 40);
    let (head, tail) = (..10, 30..);
    for term in ["kl", "reconstruction"] {
        let c = curve(&log, term);
        assert!(mean(&c[tail.clone()]) < mean(&c[head]), "{term}: {:?}", c);
    }
    assert!(log.tail_mean(10) < log.head_mean(10), "loss {:?}", log.losses);
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
fn the_reset_gate_only_ever_swaps_the_change_for_theta0_and_survives_a_checkpoint() {
    // The gate is fitted after training, so the same seed trains the same generator either way.
    let plain = trained("", 20);
    let Trained { generator: gated, blank: mut restored, .. } = trained("reset = true\nreset_episodes = 24", 20);
    let (theta0, d) = (&plain.theta0, plain.feature_dim);
    let summaries: Vec<AnchorSummary> = [0.05f32, 0.5, 1.0, 3.0, 10.0]
        .iter()
        .map(|scale| {
            let values: Vec<f32> = (0..d * 4).map(|i| scale * (((i * 37) % 11) as f32 / 5.0 - 1.0)).collect();
            summary(&values, d)
        })
        .collect();
    let mut resets = 0;
    for s in &summaries {
        let adapted = plain.generator.generate(s).expect("plain");
        let served = gated.generate(s).expect("gated");
        if served != adapted {
            let off = max_difference(&served, theta0);
            assert!(
                off == 0.0,
                "a gated generation is Δ(z) or exactly θ0; it is {off} from θ0 and {} from Δ(z)",
                max_difference(&served, &adapted)
            );
            resets += 1;
        }
    }
    eprintln!("reset gate sent θ0 for {resets} of {} summaries", summaries.len());
    restored.load(&gated.save().expect("save")).expect("load");
    for s in &summaries {
        assert_eq!(restored.generate(s).expect("restored"), gated.generate(s).expect("gated"));
    }
}
