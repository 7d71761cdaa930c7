//! Shared by the integration tests: the registry with every plugin of this workspace linked.

#![allow(dead_code)]

pub mod process;

use mmpg::Registry;

// Linking the plugin crates is what registers their factories.
use mmpg_adr as _;
use mmpg_backends as _;
use mmpg_baselines as _;
use mmpg_fashion as _;
use mmpg_fda as _;
use mmpg_lmm as _;
use mmpg_minilm as _;
use mmpg_synthetic as _;
use mmpg_videoqa as _;

pub fn registry() -> Registry {
    Registry::with_static_plugins().expect("no duplicate plugins")
}

/// A deployment small enough for a debug-build test, with the given training schedule.
pub fn tiny_deployment(seed: u64, pretrain_steps: usize, generator_steps: usize, shifts: &str) -> String {
    format!(
        r#"
seed = {seed}
[cloud.training]
pretrain_steps = {pretrain_steps}
generator_steps = {generator_steps}
source_domains = 16
[fleet]
window_clips = 16
eval_clips = 160
shifts = [{shifts}]
"#
    )
}

/// A data source that remembers, for every clip it hands out, the split asked for and the clip's
/// provenance ids.
pub struct Recording<'a> {
    inner: &'a dyn mmpg::DataSource,
    drawn: std::sync::Mutex<Vec<(mmpg::Split, Vec<u64>)>>,
}

impl<'a> Recording<'a> {
    pub fn new(inner: &'a dyn mmpg::DataSource) -> Self {
        Self { inner, drawn: std::sync::Mutex::new(Vec::new()) }
    }

    pub fn drawn(&self) -> Vec<(mmpg::Split, Vec<u64>)> {
        self.drawn.lock().expect("no test thread panicked holding it").clone()
    }
}

impl mmpg::DataSource for Recording<'_> {
    fn task(&self) -> &mmpg::TaskSpec {
        self.inner.task()
    }
    fn shift_kinds(&self) -> &[&'static str] {
        self.inner.shift_kinds()
    }
    fn source_kinds(&self) -> &[&'static str] {
        self.inner.source_kinds()
    }
    fn is_shifted(&self, domain: &mmpg::DomainSpec) -> bool {
        self.inner.is_shifted(domain)
    }
    fn phrasings(&self) -> u32 {
        self.inner.phrasings()
    }
    fn check_shift(&self, shift: &mmpg::Shift) -> Result<(), mmpg::DataError> {
        self.inner.check_shift(shift)
    }
    fn source_domains(&self, count: usize, seed: u64, held_out: &[mmpg::DomainSpec]) -> Vec<mmpg::DomainSpec> {
        self.inner.source_domains(count, seed, held_out)
    }
    fn clips(
        &self,
        domain: &mmpg::DomainSpec,
        split: mmpg::Split,
        count: usize,
        seed: u64,
    ) -> Result<Vec<mmpg::Clip>, mmpg::DataError> {
        let clips = self.inner.clips(domain, split, count, seed)?;
        let mut drawn = self.drawn.lock().expect("no test thread panicked holding it");
        drawn.extend(clips.iter().map(|c| (split, c.provenance.clone())));
        Ok(clips)
    }
}

/// Trains the cloud of the deployment in `text` (pretraining, generator episodes, reset gate)
/// through a [`Recording`], then draws every device's stream and test pools (`per_pool` clips at
/// each of four seeds, the fleet's own seed first), and asserts that the cloud asked only for the
/// training split and that no source sample behind a cloud clip is behind a device's clip.
pub fn assert_the_cloud_never_sees_device_pools(text: &str, per_pool: usize) {
    use mmpg::Split;
    use std::collections::BTreeSet;
    let registry = registry();
    let deployment = mmpg::Deployment::parse(text, "clean-splits.toml", &registry).expect("valid deployment");
    let composer = mmpg::runtime::Composer::new(&deployment, &registry).expect("composer");
    let data = composer.data_source().expect("data source");
    let recording = Recording::new(data.as_ref());
    mmpg::runtime::train_cloud(&composer, &recording, &mmpg::NoProgress).expect("cloud trains");
    let drawn = recording.drawn();
    assert!(!drawn.is_empty(), "the cloud drew no clip");
    assert!(drawn.iter().all(|(_, ids)| !ids.is_empty()), "a clip without provenance proves nothing");
    let asked: BTreeSet<String> = drawn.iter().map(|(split, _)| format!("{split:?}")).collect();
    let cloud: BTreeSet<u64> = drawn.into_iter().flat_map(|(_, ids)| ids).collect();
    let mut devices = BTreeSet::new();
    for (_, domain) in deployment.device_domains() {
        for split in [Split::Stream, Split::Test] {
            for seed in [domain.seed, 1, 2, 3] {
                for clip in data.clips(&domain, split, per_pool, seed).expect("device clips") {
                    assert!(!clip.provenance.is_empty(), "a device clip without provenance");
                    devices.extend(clip.provenance);
                }
            }
        }
    }
    let shared: Vec<&u64> = cloud.intersection(&devices).take(5).collect();
    assert!(
        shared.is_empty(),
        "the cloud trained on source samples of the devices' pools (first ids {shared:?}; {} cloud ids, {} device ids)",
        cloud.len(),
        devices.len()
    );
    assert_eq!(asked, BTreeSet::from(["Train".to_string()]), "splits the cloud asked for");
}
