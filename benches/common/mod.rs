//! Shared by the criterion benches: deterministic features and an untrained FDA for a model.

#![allow(dead_code)]

use mmpg::registry::{BuildContext, GeneratorContext};
use mmpg::{CloudModel, DeviceDescriptor, HostTensor};

/// `[n, d]` features in [-1, 1), the same for every run.
pub fn features(n: usize, d: usize) -> HostTensor {
    let values = (0..n * d).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
    HostTensor::new(vec![n, d], values).expect("fits")
}

/// An FDA (default settings, on the CPU) for `cloud`'s slots.
pub fn generator(cloud: &dyn CloudModel) -> mmpg_fda::Fda {
    let ctx = GeneratorContext {
        base: BuildContext { seed: 1, device: DeviceDescriptor::cpu().training() },
        schema: cloud.schema().clone(),
        base_params: cloud.base_params(),
        feature_dim: cloud.feature_dim(),
        text_dim: cloud.text_dim(),
    };
    mmpg_fda::Fda::new(Default::default(), &ctx).expect("generator")
}
