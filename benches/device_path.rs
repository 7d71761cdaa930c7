//! What a device spends per adaptation: anchor selection, summary encoding, parameter
//! validation + install, and the forward pass it serves. `cargo bench --bench device_path`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mmpg::wire::Envelope;
use mmpg::{
    AnchorReasoner, BurnDevice, CloudModel, DataSource, DeviceId, DomainSpec, FeatureStats, HostTensor, Quantisation,
    Split,
};
use mmpg_adr::{Adr, AdrSettings, Strategy};
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};

fn features(n: usize, d: usize) -> HostTensor {
    let values = (0..n * d).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
    HostTensor::new(vec![n, d], values).expect("fits")
}

fn anchor_selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("adr_summarise");
    let adr = Adr::new(AdrSettings { k: 8, strategy: Strategy::KCenter, quantisation: Quantisation::F16 })
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
    let mut model = cloud.export(&cpu).expect("export");
    let clips = data.clips(&DomainSpec::clean("bench", 1), Split::Test, 16, 0).expect("clips");
    let params = model.current_params();
    let wire = Envelope::params(DeviceId("bench".into()), 1, &params).encode();
    c.bench_function("apply_from_wire", |b| {
        b.iter(|| {
            let p = Envelope::decode(&wire).and_then(|e| e.to_params()).expect("decodes");
            model.apply(p).expect("applies")
        })
    });
    c.bench_function("lmm_forward_16_clips", |b| b.iter(|| model.answer_logits(&clips).expect("forward")));
    c.bench_function("lmm_frame_features_16_clips", |b| b.iter(|| model.frame_features(&clips).expect("features")));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = anchor_selection, device_model
}
criterion_main!(benches);
