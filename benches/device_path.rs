//! What each side spends per adaptation, in one run so the ratios are measured together:
//! anchor selection, parameter validation + install (with the bytes copied), the forward pass a
//! device serves, one on-device fine-tuning step (what FTA repeats), and the cloud's batched
//! generation. `cargo bench --bench device_path`.

mod common;
use common::features;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mmpg::DeviceDescriptor;
use mmpg::wire::Envelope;
use mmpg::{
    AnchorReasoner, CloudModel, DataSource, DeviceId, DomainSpec, FeatureStats, Quantisation, Split, TuneScope,
};
use mmpg_adr::{Adr, AdrSettings, Strategy};
use mmpg_backends::BurnDevice;
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};

fn anchor_selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("adr_summarise");
    let adr = Adr::new(AdrSettings {
        k: 8,
        strategy: Strategy::KCenter,
        quantisation: Quantisation::F16,
        text_k: 0,
        privacy: None,
    })
    .expect("valid settings");
    for n in [64, 256, 1024] {
        let f = features(n, 64);
        let reference = FeatureStats { mean: vec![0.0; 64], std: vec![1.0; 64] };
        group.bench_with_input(BenchmarkId::from_parameter(n), &f, |b, f| {
            b.iter(|| adr.summarise(f, &reference, n / 4, 0).expect("summary"))
        });
    }
    group.finish();
}

fn device_model(c: &mut Criterion) {
    let data = Synthetic::new(SyntheticSettings::default()).expect("valid settings");
    let cpu = BurnDevice::Flex(Default::default());
    let cloud =
        LmmCloud::new(LmmSettings::default(), data.task(), &BurnDevice::autodiff(cpu.clone())).expect("model builds");
    let mut model = cloud.export(&DeviceDescriptor::cpu()).expect("export");
    let clips = data.clips(&DomainSpec::clean("bench", 1), Split::Test, 16, 0).expect("clips");
    let params = model.current_params();
    let wire = Envelope::params(DeviceId("bench".into()), 1, &params)
        .and_then(|e| e.encode())
        .expect("the model's own params encode");
    let mut apply = c.benchmark_group("apply_from_wire");
    apply.throughput(Throughput::Bytes(wire.len() as u64));
    apply.bench_function("all_slots", |b| {
        b.iter(|| {
            let p = Envelope::decode(&wire).and_then(|e| e.to_params()).expect("decodes");
            model.apply(p).expect("applies")
        })
    });
    apply.finish();
    c.bench_function("lmm_forward_16_clips", |b| b.iter(|| model.answer_logits(&clips).expect("forward")));
    c.bench_function("lmm_frame_features_16_clips", |b| b.iter(|| model.frame_features(&clips).expect("features")));

    // One FTA step on 16 labelled clips: FTA's device time is epochs × steps × this.
    for scope in [TuneScope::Slots, TuneScope::All] {
        let mut tuner =
            model.as_fine_tunable().expect("the LMM fine-tunes").fine_tuner(scope, 1e-3).expect("the LMM fine-tunes");
        c.bench_function(&format!("fta_step_16_clips_{scope}"), |b| b.iter(|| tuner.step(&clips).expect("step")));
    }

    // The cloud: generation for a batch of devices (FDA on the CPU).
    let generator = common::generator(&cloud);
    let adr = Adr::new(AdrSettings::default()).expect("valid settings");
    let reference = FeatureStats { mean: vec![0.0; 64], std: vec![1.0; 64] };
    let mut group = c.benchmark_group("fda_generate_batch");
    for devices in [1usize, 8, 64] {
        let summaries: Vec<_> = (0..devices)
            .map(|i| adr.summarise(&features(64 + i, 64), &reference, 16, i as u64).expect("summary"))
            .collect();
        group.throughput(Throughput::Elements(devices as u64));
        group.bench_with_input(BenchmarkId::from_parameter(devices), &summaries, |b, s| {
            b.iter(|| mmpg::ParameterGenerator::generate_batch(&generator, s).expect("generates"))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = anchor_selection, device_model
}
criterion_main!(benches);
