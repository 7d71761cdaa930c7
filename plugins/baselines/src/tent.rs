//! TENT: test-time entropy minimisation (Wang, Shelhamer, Liu, Olshausen and Darrell, "Tent:
//! Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021).
//!
//! The paper's update (§3): normalisation statistics are re-estimated on the test batch, and the
//! normalisation layers' channel-wise affine parameters (scale γ, shift β) take one gradient step
//! per test batch on the mean Shannon entropy of the model's predictions, `H(ŷ) = −Σ_c ŷ_c log ŷ_c`.
//! No labels; the device backpropagates. Its defaults: Adam at 1e-3 (CIFAR-10/100-C, batch 128),
//! SGD with momentum at 2.5e-4 (ImageNet-C, batch 64), one step per batch, online.
//!
//! Here the batches are the device's unlabelled window, in `batch`-clip steps for `epochs` passes;
//! the statistics are re-estimated through [`StatisticsRecalibration`](mmpg::StatisticsRecalibration)
//! and the affine parameters are what the model calls [`TuneScope::Affine`] (the `lmm`'s FiLM slot:
//! a per-channel scale and shift after its first layer).

use mmpg::seed;
use mmpg::{
    AdaptError, AdaptInput, AdaptOutcome, Check, Clip, DeviceAdapter, DeviceModel, ModelError, PluginError, Settings,
    TuneScope,
};
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

/// Settings of `tent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TentSettings {
    /// Adam learning rate of the affine parameters.
    pub learning_rate: f64,
    /// Window clips per gradient step.
    pub batch: usize,
    /// Passes over the window (1: every clip is seen once, as online TENT sees a stream).
    pub epochs: usize,
    /// Re-estimate the normalisation statistics on the window before the steps, as TENT's
    /// batch normalisation in training mode does.
    pub recalibrate: bool,
}

impl Default for TentSettings {
    fn default() -> Self {
        Self { learning_rate: 1e-3, batch: 16, epochs: 1, recalibrate: true }
    }
}

impl Settings for TentSettings {
    fn check(&self, check: &mut Check) {
        check.positive("learning_rate", self.learning_rate, 10.0);
        check.within("batch", self.batch, 1..=4096);
        check.within("epochs", self.epochs, 1..=MAX_EPOCHS);
    }
}

/// Most passes over the window: a bound on the steps one adaptation takes.
pub const MAX_EPOCHS: usize = 64;

/// TENT as a device-side adapter.
#[derive(Debug, Clone)]
pub struct Tent {
    settings: TentSettings,
}

impl Tent {
    /// Checks the settings.
    pub fn new(settings: TentSettings) -> Result<Self, PluginError> {
        if settings.batch == 0 || settings.epochs == 0 || settings.epochs > MAX_EPOCHS {
            return Err(PluginError::Build(format!("`batch` must be at least 1 and `epochs` 1..={MAX_EPOCHS}")));
        }
        if !(settings.learning_rate.is_finite() && settings.learning_rate > 0.0) {
            return Err(PluginError::Build(format!(
                "`learning_rate` must be positive, found {}",
                settings.learning_rate
            )));
        }
        Ok(Self { settings })
    }

    /// Gradient steps one adaptation takes on a window of `clips`.
    pub fn steps(&self, clips: usize) -> usize {
        clips.div_ceil(self.settings.batch) * self.settings.epochs
    }
}

impl DeviceAdapter for Tent {
    fn label(&self) -> String {
        "TENT".into()
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let s = &self.settings;
        if input.window.is_empty() {
            return Err(AdaptError::Input("TENT needs an unlabelled window".into()));
        }
        let name = model.name().to_string();
        // Checked before anything changes: a model without the capability is left as it came.
        if model.as_entropy_minimisation().is_none() {
            return Err(ModelError::unsupported(&name, "entropy minimisation (TENT)").into());
        }
        let mut recalibrated = 0;
        if s.recalibrate {
            recalibrated = model
                .as_recalibration()
                .ok_or_else(|| ModelError::unsupported(&name, "statistics recalibration"))?
                .recalibrate_statistics(input.window)?;
        }
        let mut tuner = model
            .as_entropy_minimisation()
            .ok_or_else(|| ModelError::unsupported(&name, "entropy minimisation (TENT)"))?
            .entropy_tuner(TuneScope::Affine, s.learning_rate)?;
        let mut rng = seed::rng(input.seed, 0x7E47);
        let mut order: Vec<Clip> = input.window.to_vec();
        let mut entropies = Vec::with_capacity(self.steps(order.len()));
        for _ in 0..s.epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(s.batch) {
                entropies.push(tuner.step(batch)?);
            }
        }
        let adapted = tuner.snapshot()?;
        // Entropy can fall to zero by blowing the affine parameters up: answers that are no
        // longer finite are a divergence, and the device keeps what it had.
        let logits = adapted.answer_logits(input.window)?;
        if !logits.is_finite() {
            let last = entropies.last().copied().unwrap_or(f64::NAN);
            return Err(ModelError::Diverged { step: entropies.len(), loss: last }.into());
        }
        *model = adapted;
        let trainable = tuner.trainable_parameters();
        let first = entropies.first().copied().unwrap_or(f64::NAN);
        let last = entropies.last().copied().unwrap_or(f64::NAN);
        Ok(AdaptOutcome {
            trainable_parameters: trainable,
            changed_parameters: trainable + recalibrated,
            // Each step is one forward (and backward) pass over its batch; recalibration one more.
            forward_passes: entropies.len() + usize::from(s.recalibrate),
            detail: vec![
                ("steps".into(), entropies.len() as f64),
                ("entropy_first_step".into(), first),
                ("entropy_last_step".into(), last),
            ],
            curves: vec![("entropy per step".into(), entropies)],
            ..AdaptOutcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_clip_is_seen_once_per_epoch(clips in 1usize..500, batch in 1usize..64, epochs in 1usize..5) {
            let tent = Tent::new(TentSettings { batch, epochs, ..TentSettings::default() }).expect("valid");
            let steps = tent.steps(clips);
            prop_assert!(steps * batch >= clips * epochs);
            prop_assert!((steps - epochs) * batch < clips * epochs);
        }
    }

    #[test]
    fn refuses_nonsense_settings() {
        assert!(Tent::new(TentSettings { batch: 0, ..TentSettings::default() }).is_err());
        assert!(Tent::new(TentSettings { epochs: 0, ..TentSettings::default() }).is_err());
        assert!(Tent::new(TentSettings { learning_rate: f64::NAN, ..TentSettings::default() }).is_err());
    }
}
