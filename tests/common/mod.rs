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
