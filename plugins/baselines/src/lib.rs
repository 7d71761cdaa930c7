//! `baselines`: the device-side adaptation methods CDC is measured against, in the same
//! harness and on the same devices.
//!
//! - `static`: no adaptation.
//! - `fta`: on-device fine-tuning with L labelled clips of the device's own domain (Adam on
//!   the QA loss), the slots only or every parameter, early-stopped on a held-out part of the L.
//! - `feature-stats`: backprop-free re-estimation of normalisation statistics on the unlabelled
//!   window (AdaBN-style).
//! - `t3a`: backprop-free classifier adjustment (Iwasawa & Matsuo, 2021): class prototypes from
//!   the window's confident pseudo-labelled representations replace the QA head.
//! - `tent`: entropy minimisation on the affine parameters by gradient (Wang et al., ICLR 2021).
//! - `foa`: CMA-ES on a few slot values with an entropy and activation-statistics fitness, and a
//!   back-to-source shift; forward passes only (Niu et al., ICML 2024).
//! - `lame`: Laplacian-regularised adjustment of each served batch's predictions; no parameter
//!   changes (Boudiaf et al., CVPR 2022).

pub mod foa;
pub mod lame;
pub mod tent;

/// What the adapters' unit tests share.
#[cfg(test)]
mod test_support {
    use mmpg::HostTensor;
    use rand::Rng as _;

    /// A tensor of `shape` holding `values`.
    pub fn tensor(shape: Vec<usize>, values: Vec<f32>) -> HostTensor {
        HostTensor::new(shape, values).expect("shape fits")
    }

    /// A draw of `len` values uniform in `[-scale, scale)`, from `seed`'s stream `stream`.
    pub fn uniform(seed: u64, stream: u64) -> impl FnMut(usize, f32) -> Vec<f32> {
        let mut rng = mmpg::seed::rng(seed, stream);
        move |len, scale| (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }
}

pub use foa::{Foa, FoaSettings};
pub use lame::{Lame, LameModel, LameSettings};
pub use tent::{Tent, TentSettings};

use mmpg::seed;
use mmpg::{
    AdaptError, AdaptInput, AdaptOutcome, Build, BuildContext, Check, Clip, DeviceAdapter, DeviceModel, Factory,
    HostTensor, ModelError, Plugin, PluginError, Settings, SettingsSpec, StaticPlugin, TuneScope, parse_settings,
};
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

pub use mmpg::NoSettings;

/// No adaptation: the model the cloud exported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Static;

impl DeviceAdapter for Static {
    fn label(&self) -> String {
        "static".into()
    }

    fn adapt(&self, _model: &mut Box<dyn DeviceModel>, _input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        Ok(AdaptOutcome::default())
    }
}

/// Settings of `fta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FtaSettings {
    /// L: labelled clips of the device's domain (training and held-out together).
    pub labels: usize,
    /// What trains: `slots` (what the cloud would generate) or `all`.
    pub scope: TuneScope,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Upper bound on epochs over the training part.
    pub max_epochs: usize,
    /// Epochs without a better held-out loss before stopping.
    pub patience: usize,
    /// Clips per step.
    pub batch: usize,
    /// Part of the L held out for early stopping (at least one clip when L ≥ 2).
    pub held_out_fraction: f64,
}

impl Default for FtaSettings {
    fn default() -> Self {
        Self {
            labels: 16,
            scope: TuneScope::Slots,
            learning_rate: 3e-3,
            max_epochs: 40,
            patience: 5,
            batch: 16,
            held_out_fraction: 0.25,
        }
    }
}

impl Settings for FtaSettings {
    fn check(&self, check: &mut Check) {
        check.within("labels", self.labels, 1..=100_000);
        check.positive("learning_rate", self.learning_rate, 10.0);
        check.within("max_epochs", self.max_epochs, 1..=100_000);
        check.within("patience", self.patience, 1..=100_000);
        check.within("batch", self.batch, 1..=4096);
        // At least one clip trains: the held-out part stays below the whole.
        check.real("held_out_fraction", self.held_out_fraction, 0.0..=0.95);
    }
}

/// Name of FTA's curve of the held-out loss per epoch (epoch 0: the model as it came).
pub const HELD_OUT_LOSS: &str = "held-out loss";

/// On-device fine-tuning with labels.
#[derive(Debug, Clone)]
pub struct Fta {
    settings: FtaSettings,
}

impl Fta {
    /// Checks the settings.
    pub fn new(settings: FtaSettings) -> Result<Self, PluginError> {
        if settings.labels == 0 || settings.batch == 0 || settings.max_epochs == 0 {
            return Err(PluginError::Build("`labels`, `batch` and `max_epochs` must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&settings.held_out_fraction) {
            return Err(PluginError::Build(format!(
                "`held_out_fraction` must be in [0, 1), found {}",
                settings.held_out_fraction
            )));
        }
        Ok(Self { settings })
    }

    /// How many of the L clips are held out.
    fn held_out_count(&self) -> usize {
        let l = self.settings.labels;
        if l < 2 { 0 } else { ((l as f64 * self.settings.held_out_fraction).round() as usize).clamp(1, l - 1) }
    }
}

/// Mean cross-entropy of labelled clips under `model`.
fn mean_cross_entropy(model: &dyn DeviceModel, clips: &[Clip]) -> Result<f64, AdaptError> {
    let logits = model.answer_logits(clips)?;
    let rows = logits.rows().ok_or_else(|| AdaptError::Input("logits are not 2-D".into()))?;
    let (mut total, mut n) = (0.0, 0usize);
    for (row, clip) in rows.zip(clips) {
        let Some(answer) = clip.answer.filter(|a| *a < row.len()) else { continue };
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
        total += log_sum - f64::from(row[answer]);
        n += 1;
    }
    if n == 0 { Err(AdaptError::Input("no labelled clips to score".into())) } else { Ok(total / n as f64) }
}

impl DeviceAdapter for Fta {
    fn label(&self) -> String {
        format!("FTA@{} ({})", self.settings.labels, self.settings.scope)
    }

    fn labels_needed(&self) -> usize {
        self.settings.labels
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let s = &self.settings;
        if input.labelled.len() < s.labels {
            return Err(AdaptError::Input(format!("needs {} labelled clips, got {}", s.labels, input.labelled.len())));
        }
        let mut rng = seed::rng(input.seed, 0xF7A);
        let mut order: Vec<usize> = (0..s.labels).collect();
        order.shuffle(&mut rng);
        let held = self.held_out_count();
        let held_out: Vec<Clip> = order[..held].iter().map(|i| input.labelled[*i].clone()).collect();
        let mut train: Vec<Clip> = order[held..].iter().map(|i| input.labelled[*i].clone()).collect();

        let mut tuner = model
            .as_fine_tunable()
            .ok_or_else(|| ModelError::unsupported(model.name(), "on-device fine-tuning"))?
            .fine_tuner(s.scope, s.learning_rate)?;
        // Epoch 0 is the model as it came: early stopping can keep it.
        let mut best = None;
        let mut best_loss =
            if held_out.is_empty() { f64::INFINITY } else { mean_cross_entropy(model.as_ref(), &held_out)? };
        let mut curve = if held_out.is_empty() { Vec::new() } else { vec![best_loss] };
        let (mut best_epoch, mut epochs, mut steps, mut stale) = (0usize, 0usize, 0usize, 0usize);
        while epochs < s.max_epochs && stale < s.patience.max(1) {
            epochs += 1;
            train.shuffle(&mut rng);
            for batch in train.chunks(s.batch) {
                tuner.step(batch)?;
                steps += 1;
            }
            let snapshot = tuner.snapshot()?;
            // Without held-out clips there is nothing to stop on: the last epoch is kept.
            let loss =
                if held_out.is_empty() { f64::NEG_INFINITY } else { mean_cross_entropy(snapshot.as_ref(), &held_out)? };
            if !held_out.is_empty() {
                curve.push(loss);
            }
            if loss < best_loss {
                (best_loss, best_epoch, stale) = (loss, epochs, 0);
                best = Some(snapshot);
            } else {
                stale += 1;
            }
        }
        if let Some(best) = best {
            *model = best;
        }
        let trainable = tuner.trainable_parameters();
        Ok(AdaptOutcome {
            trainable_parameters: trainable,
            changed_parameters: if best_epoch == 0 { 0 } else { trainable },
            labels_used: s.labels,
            // Each step one pass over its batch, each epoch one over the held-out clips.
            forward_passes: steps + epochs * usize::from(held > 0),
            detail: vec![
                ("epochs".into(), epochs as f64),
                ("steps".into(), steps as f64),
                ("best_epoch".into(), best_epoch as f64),
                ("held_out_clips".into(), held as f64),
                ("best_held_out_loss".into(), best_loss),
            ],
            curves: vec![(HELD_OUT_LOSS.into(), curve)],
        })
    }
}

/// Backprop-free statistics recalibration on the unlabelled window.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeatureStats;

impl DeviceAdapter for FeatureStats {
    fn label(&self) -> String {
        "BN / feature stats".into()
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let name = model.name().to_string();
        let replaced = model
            .as_recalibration()
            .ok_or_else(|| ModelError::unsupported(&name, "statistics recalibration"))?
            .recalibrate_statistics(input.window)?;
        Ok(AdaptOutcome { changed_parameters: replaced, ..AdaptOutcome::default() })
    }
}

/// Settings of `t3a`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct T3aSettings {
    /// Supports kept per class, lowest prediction entropy first (0 keeps all).
    pub filter_k: usize,
}

impl Default for T3aSettings {
    fn default() -> Self {
        Self { filter_k: 20 }
    }
}

impl Settings for T3aSettings {
    fn check(&self, check: &mut Check) {
        check.within("filter_k", self.filter_k, 0..=1_000_000);
    }
}

/// Test-time classifier adjustment.
#[derive(Debug, Clone)]
pub struct T3a {
    settings: T3aSettings,
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// Softmax entropy of one logit row and its argmax.
fn entropy_and_label(logits: &[f32]) -> (f32, usize) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let entropy = -exp.iter().map(|e| e / sum).filter(|p| *p > 0.0).map(|p| p * p.ln()).sum::<f32>();
    (entropy, mmpg::model::argmax(logits))
}

impl T3a {
    /// The adjusted head `[h, classes]` from representations `z` `[n, h]` and the head `(w, b)`.
    pub fn prototypes(&self, z: &HostTensor, w: &HostTensor, b: &HostTensor) -> Result<Vec<f32>, AdaptError> {
        let bad = |what: &str| AdaptError::Input(format!("T3A: {what}"));
        let [h, classes] = w.shape() else { return Err(bad("the head weight is not 2-D")) };
        let (h, classes) = (*h, *classes);
        if b.len() != classes || z.shape().len() != 2 || z.shape()[1] != h {
            return Err(bad("representations, weight and bias disagree in shape"));
        }
        let logits_of = |x: &[f32]| -> Vec<f32> {
            (0..classes)
                .map(|c| b.values()[c] + (0..h).map(|j| x[j] * w.values()[j * classes + c]).sum::<f32>())
                .collect()
        };
        // Supports start from the classifier's own weight vectors, labelled (like any support)
        // by the classifier's prediction on them (T3A's warm-up).
        let mut supports: Vec<Vec<(f32, Vec<f32>)>> = vec![Vec::new(); classes];
        for c in 0..classes {
            let column: Vec<f32> = (0..h).map(|j| w.values()[j * classes + c]).collect();
            let (entropy, label) = entropy_and_label(&logits_of(&column));
            supports[label].push((entropy, normalised(&column)));
        }
        for row in z.rows().into_iter().flatten() {
            let (entropy, label) = entropy_and_label(&logits_of(row));
            supports[label].push((entropy, normalised(row)));
        }
        let mut head = vec![0f32; h * classes];
        for (c, class_supports) in supports.iter_mut().enumerate() {
            class_supports.sort_by(|a, b| a.0.total_cmp(&b.0));
            if self.settings.filter_k > 0 {
                class_supports.truncate(self.settings.filter_k);
            }
            let mut prototype = vec![0f32; h];
            for (_, s) in class_supports.iter() {
                prototype.iter_mut().zip(s).for_each(|(p, v)| *p += v);
            }
            for (j, v) in normalised(&prototype).into_iter().enumerate() {
                head[j * classes + c] = v;
            }
        }
        Ok(head)
    }
}

impl DeviceAdapter for T3a {
    fn label(&self) -> String {
        "T3A".into()
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let linear = model.as_linear_head().ok_or_else(|| ModelError::unsupported(model.name(), "a linear QA head"))?;
        let (head, z) = (linear.qa_head(), linear.qa_representations(input.window)?);
        let mut params = model.current_params();
        let missing = |slot: &str| AdaptError::Input(format!("T3A: the model has no slot `{slot}`"));
        let w = params.tensors.get(&head.weight_slot).ok_or_else(|| missing(&head.weight_slot))?.clone();
        let b = params.tensors.get(&head.bias_slot).ok_or_else(|| missing(&head.bias_slot))?.clone();
        let weight = self.prototypes(&z, &w, &b)?;
        let changed = weight.len() + b.len();
        let shape_error = |_| AdaptError::Input("T3A: head shape".into());
        params.tensors.insert(head.weight_slot, HostTensor::new(w.shape().to_vec(), weight).map_err(shape_error)?);
        params
            .tensors
            .insert(head.bias_slot, HostTensor::new(b.shape().to_vec(), vec![0.0; b.len()]).map_err(shape_error)?);
        model.apply(params)?;
        Ok(AdaptOutcome { changed_parameters: changed, ..AdaptOutcome::default() })
    }
}

fn build_tent(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    Ok(Box::new(Tent::new(parse_settings(settings)?)?))
}

fn build_foa(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    Ok(Box::new(Foa::new(parse_settings(settings)?)?))
}

fn build_lame(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    Ok(Box::new(Lame::new(parse_settings(settings)?)?))
}

fn build_static(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    let _: NoSettings = parse_settings(settings)?;
    Ok(Box::new(Static))
}

fn build_fta(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    Ok(Box::new(Fta::new(parse_settings(settings)?)?))
}

fn build_feature_stats(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    let _: NoSettings = parse_settings(settings)?;
    Ok(Box::new(FeatureStats))
}

fn build_t3a(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DeviceAdapter>, PluginError> {
    Ok(Box::new(T3a { settings: parse_settings(settings)? }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "static",
        summary: "no adaptation: the model as the cloud exported it",
        settings: SettingsSpec::of::<NoSettings>(),
        build: Build::Static(build_static),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "fta",
        summary: "on-device fine-tuning with L labels (slots or all parameters), early-stopped on held-out labels",
        settings: SettingsSpec::of::<FtaSettings>(),
        build: Build::Static(build_fta),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "feature-stats",
        summary: "backprop-free recalibration of normalisation statistics on the unlabelled window (AdaBN-style)",
        settings: SettingsSpec::of::<NoSettings>(),
        build: Build::Static(build_feature_stats),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "t3a",
        summary: "T3A: backprop-free classifier adjustment from pseudo-labelled window prototypes",
        settings: SettingsSpec::of::<T3aSettings>(),
        build: Build::Static(build_t3a),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "tent",
        summary: "TENT: gradient steps on the answers' entropy over the affine parameters, on the unlabelled window",
        settings: SettingsSpec::of::<TentSettings>(),
        build: Build::Static(build_tent),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "foa",
        summary: "FOA: forward-only CMA-ES on slot values (entropy + activation statistics) and a back-to-source shift",
        settings: SettingsSpec::of::<FoaSettings>(),
        build: Build::Static(build_foa),
    }))
}

inventory::submit! {
    StaticPlugin(Plugin::Adapter(Factory {
        name: "lame",
        summary: "LAME: Laplacian-regularised adjustment of each served batch's predictions, no parameter changes",
        settings: SettingsSpec::of::<LameSettings>(),
        build: Build::Static(build_lame),
    }))
}

#[cfg(test)]
mod tests {
    use super::test_support::{tensor, uniform};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn t3a_prototypes_are_unit_columns_of_the_head_shape(
            h in 1usize..6,
            classes in 2usize..6,
            n in 0usize..12,
            seed in any::<u64>(),
        ) {
            let mut random = uniform(seed, 0);
            let mut draw = |len: usize| random(len, 1.0);
            let w = tensor(vec![h, classes], draw(h * classes));
            let b = tensor(vec![classes], draw(classes));
            let z = tensor(vec![n, h], draw(n * h));
            let head = T3a { settings: T3aSettings::default() }.prototypes(&z, &w, &b).expect("prototypes");
            prop_assert_eq!(head.len(), h * classes);
            for c in 0..classes {
                let norm = (0..h).map(|j| head[j * classes + c].powi(2)).sum::<f32>().sqrt();
                // A class with no support at all keeps a zero column.
                prop_assert!(norm < 1e-6 || (norm - 1.0).abs() < 1e-4, "column {c} has norm {norm}");
            }
        }

        #[test]
        fn fta_holds_out_part_of_its_labels_and_trains_on_the_rest(labels in 1usize..200, fraction in 0.0f64..0.9) {
            let fta = Fta::new(FtaSettings { labels, held_out_fraction: fraction, ..FtaSettings::default() }).expect("valid");
            let held = fta.held_out_count();
            if labels < 2 {
                prop_assert_eq!(held, 0);
            } else {
                prop_assert!(held >= 1 && held < labels);
            }
        }
    }

    #[test]
    fn t3a_refuses_mismatched_shapes() {
        let w = tensor(vec![3, 2], vec![0.0; 6]);
        let err = T3a { settings: T3aSettings::default() }
            .prototypes(&tensor(vec![1, 4], vec![0.0; 4]), &w, &tensor(vec![2], vec![0.0; 2]))
            .expect_err("h differs");
        assert!(err.to_string().contains("disagree"), "{err}");
    }

    #[test]
    fn cross_entropy_of_a_confident_right_answer_is_small() {
        struct Fixed;
        impl DeviceModel for Fixed {
            fn schema(&self) -> &mmpg::SlotSchema {
                unreachable!("not used")
            }
            fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, mmpg::ModelError> {
                Ok(tensor(vec![clips.len(), 3], clips.iter().flat_map(|_| [10.0, 0.0, 0.0]).collect()))
            }
            fn frame_features(&self, _: &[Clip]) -> Result<HostTensor, mmpg::ModelError> {
                unreachable!("not used")
            }
            fn current_params(&self) -> mmpg::GeneratedParams {
                unreachable!("not used")
            }
            fn install(&mut self, _: &mmpg::ValidatedParams) -> Result<(), mmpg::ModelError> {
                unreachable!("not used")
            }
        }
        let clip = |answer| Clip {
            frames: HostTensor::zeros(vec![1]),
            question: String::new(),
            caption: String::new(),
            answer: Some(answer),
            provenance: Vec::new(),
        };
        let right = mean_cross_entropy(&Fixed, &[clip(0)]).expect("scored");
        let wrong = mean_cross_entropy(&Fixed, &[clip(1)]).expect("scored");
        assert!(right < 1e-3 && (wrong - 10.0).abs() < 1e-3, "{right} {wrong}");
        assert!(mean_cross_entropy(&Fixed, &[Clip { answer: None, ..clip(0) }]).is_err());
    }

    #[test]
    fn fta_refuses_nonsense_settings() {
        assert!(Fta::new(FtaSettings { labels: 0, ..FtaSettings::default() }).is_err());
        assert!(Fta::new(FtaSettings { held_out_fraction: 1.0, ..FtaSettings::default() }).is_err());
    }
}
