//! One conformance suite for every compiled backend: each check compares the backend named by
//! `MMPG_CONFORMANCE_BACKEND` (default `cpu`) with the CPU backend. CI runs it on `cpu`;
//! `scripts/gpu-check.sh` runs the same binary on `cuda`.
//!
//! Tolerances: forward passes 1e-4 absolute (f32 kernels differ in summation order), training
//! losses 1e-3 relative over five steps, adapted accuracy 5 points after a short training.

mod common;

use mmpg::runtime;
use mmpg::wire::Envelope;
use mmpg::{
    AnchorReasoner, BuildContext, Clip, CloudModel, DataSource, Deployment, DeviceDescriptor, DeviceId, DomainSpec,
    GeneratorContext, HostTensor, NoProgress, ParameterGenerator, Shift, Split, TrainingPlan,
};
use mmpg_adr::{Adr, AdrSettings};
use mmpg_backends::with_burn_seed;
use mmpg_fda::{Fda, FdaSettings};
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};

fn backend_kind() -> String {
    std::env::var("MMPG_CONFORMANCE_BACKEND").unwrap_or_else(|_| "cpu".into())
}

fn target() -> DeviceDescriptor {
    let kind = backend_kind();
    let provider = common::registry().backend(&kind).expect("registered backend");
    provider.descriptor(0, false).unwrap_or_else(|e| panic!("backend `{kind}` cannot run here: {e}"))
}

fn cpu() -> DeviceDescriptor {
    DeviceDescriptor::cpu()
}

fn data() -> Synthetic {
    Synthetic::new(SyntheticSettings::default()).expect("valid settings")
}

fn clips(n: usize) -> Vec<Clip> {
    let domain = DomainSpec { shifts: vec![Shift { kind: "blur".into(), severity: 3 }], ..DomainSpec::clean("c", 9) };
    data().clips(&domain, Split::Test, n, 1).expect("clips")
}

fn model_on(device: &DeviceDescriptor) -> LmmCloud {
    let device = mmpg_backends::device(&device.training()).expect("usable device");
    with_burn_seed(42, || LmmCloud::new(LmmSettings::default(), data().task(), &device)).expect("model")
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.values().iter().zip(b.values()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn lmm_forward_matches_cpu() {
    let cloud = model_on(&cpu());
    let reference = cloud.export(&cpu()).expect("cpu export");
    let other = cloud.export(&target()).expect("target export");
    let c = clips(8);
    let logits = max_abs_diff(&reference.answer_logits(&c).expect("cpu"), &other.answer_logits(&c).expect("target"));
    let features =
        max_abs_diff(&reference.frame_features(&c).expect("cpu"), &other.frame_features(&c).expect("target"));
    eprintln!("[{}] lmm logits max |Δ| = {logits:e}, features max |Δ| = {features:e}", backend_kind());
    assert!(logits <= 1e-4 && features <= 1e-4);
}

#[test]
fn fda_generation_matches_cpu() {
    let cloud = model_on(&cpu());
    let generator_on = |device: &DeviceDescriptor| {
        let ctx = GeneratorContext {
            base: BuildContext { seed: 5, device: device.training() },
            schema: cloud.schema().clone(),
            base_params: cloud.base_params(),
            feature_dim: cloud.feature_dim(),
            text_dim: cloud.text_dim(),
        };
        with_burn_seed(5, || Fda::new(FdaSettings::default(), &ctx)).expect("generator")
    };
    let features = cloud.frame_features(&clips(4)).expect("features");
    let summary = Adr::new(AdrSettings::default())
        .expect("valid")
        .summarise(&features, &cloud.reference_stats(), 4, 0)
        .expect("summary");
    let a = generator_on(&cpu()).generate(&summary).expect("cpu generation");
    let b = generator_on(&target()).generate(&summary).expect("target generation");
    let worst = a.tensors.iter().map(|(name, t)| max_abs_diff(t, &b.tensors[name])).fold(0.0, f32::max);
    eprintln!("[{}] fda generated params max |Δ| = {worst:e}", backend_kind());
    assert!(worst <= 1e-4);
}

#[test]
fn apply_is_bit_exact_on_the_backend() {
    let mut device_model = model_on(&cpu()).export(&target()).expect("export");
    let mut params = device_model.current_params();
    for t in params.tensors.values_mut() {
        let values = t.values().iter().enumerate().map(|(i, v)| v + (i % 5) as f32 * 1e-3).collect();
        *t = HostTensor::new(t.shape().to_vec(), values).expect("same shape");
    }
    let wire = Envelope::params(DeviceId("d".into()), 1, &params).and_then(|e| e.encode()).expect("encodes");
    device_model.apply(Envelope::decode(&wire).and_then(|e| e.to_params()).expect("decodes")).expect("applies");
    let bits = |p: &mmpg::GeneratedParams| -> Vec<u32> {
        p.tensors.values().flat_map(|t| t.values().iter().map(|v| v.to_bits())).collect()
    };
    assert_eq!(bits(&device_model.current_params()), bits(&params));
}

#[test]
fn training_steps_give_the_same_loss_curve() {
    let plan = TrainingPlan { steps: 5, batch: 16, learning_rate: 3e-3, seed: 3 };
    let domains = [DomainSpec::clean("train", 2)];
    let curve = |device: &DeviceDescriptor| {
        let mut m = model_on(device);
        m.pretrain(&data(), &domains, &plan, &NoProgress).expect("trains").losses
    };
    let (a, b) = (curve(&cpu()), curve(&target()));
    eprintln!("[{}] pretrain losses cpu {a:?} vs {b:?}", backend_kind());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{x} vs {y}");
    }
}

#[test]
fn a_tiny_deployment_adapts_alike() {
    let registry = common::registry();
    let run = |backend: &str| {
        let text = format!(
            "{}\n[backend]\n{backend}\n",
            common::tiny_deployment(11, 60, 10, r#"{ kind = "brightness", severity = 4 }"#)
        );
        let d = Deployment::parse(&text, "conformance.toml", &registry).expect("valid");
        let r = runtime::run(&d, &registry, &NoProgress).expect("runs");
        (r.devices[0].static_accuracy, r.devices[0].adapted_accuracy)
    };
    let kind = backend_kind();
    let a = run("kind = \"cpu\"");
    // A mixed deployment: the cloud trains and generates on this backend, the devices serve on
    // the CPU; only backend-agnostic tensors cross between them. (Devices serving and installing
    // on the backend are the tests above: a whole second deployment on lavapipe took 4 minutes.)
    let mixed = run(&format!("kind = \"cpu\"\ncloud = \"{kind}\""));
    eprintln!("[{kind}] tiny deployment (static, adapted): cpu {a:?}, cloud on {kind} {mixed:?}");
    assert!((a.0 - mixed.0).abs() <= 0.05 && (a.1 - mixed.1).abs() <= 0.05, "{a:?} vs {mixed:?}");
}

#[test]
fn initial_models_are_identical_across_backends() {
    // Parameters are drawn on the CPU generator whatever the backend, so a seed means one model.
    let a = model_on(&cpu()).base_params();
    let b = model_on(&target()).base_params();
    assert_eq!(a, b);
}
