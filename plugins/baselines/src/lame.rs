//! LAME: Laplacian-regularised maximum-likelihood estimation (Boudiaf, Mueller, Ben Ayed and
//! Bertinetto, "Parameter-free Online Test-time Adaptation", CVPR 2022).
//!
//! No parameter changes: for each batch the model serves, LAME replaces its predicted
//! distributions `p` by the assignments `z` minimising (§3, Eq. 4)
//!
//! `Σ_i KL(z_i ‖ p_i) − λ Σ_{i,j} w_ij z_iᵀ z_j`,
//!
//! where `w` is a k-nearest-neighbour affinity over the batch's L2-normalised penultimate
//! features (k = 5, the paper's default for most models) and λ = 1. Its concave-convex bound
//! optimisation iterates `z_i ← softmax(log p_i + λ Σ_j w_ij z_j)` until the bound's value
//! changes by less than 1e-8 of itself, at most 100 times. Cheap, backprop-free, and robust to a
//! batch that holds few classes.
//!
//! Here the features are the representations the model's linear QA head reads
//! ([`LinearQaHead`](mmpg::LinearQaHead)); every call that answers a batch of clips is one LAME
//! batch.

use mmpg::{
    AdaptError, AdaptInput, AdaptOutcome, Check, Clip, DeviceAdapter, DeviceModel, FineTunable, GeneratedParams,
    HostTensor, LinearQaHead, ModelError, PluginError, RetrievalEmbeddings, Settings, SlotSchema, ValidatedParams,
};
use serde::{Deserialize, Serialize};

/// Settings of `lame`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LameSettings {
    /// Neighbours each clip's affinity row holds.
    pub k: usize,
    /// λ: weight of the Laplacian term.
    pub lambda: f64,
    /// Bound-optimisation iterations at most.
    pub max_steps: usize,
}

impl Default for LameSettings {
    fn default() -> Self {
        Self { k: 5, lambda: 1.0, max_steps: 100 }
    }
}

impl Settings for LameSettings {
    fn check(&self, check: &mut Check) {
        check.within("k", self.k, 1..=1024);
        check.real("lambda", self.lambda, 0.0..=100.0);
        check.within("max_steps", self.max_steps, 1..=100_000);
    }
}

/// The assignments `z` `[n, classes]` LAME computes from logits `[n, classes]` and features
/// `[n, h]`, row-major, and the iterations it ran. A batch of one clip keeps its softmax.
pub fn assignments(logits: &HostTensor, features: &HostTensor, s: &LameSettings) -> Result<(Vec<f32>, usize), String> {
    let (&[n, classes], &[nf, h]) = (logits.shape(), features.shape()) else {
        return Err("LAME: logits and features must be 2-D".into());
    };
    if n != nf {
        return Err(format!("LAME: {n} logit rows but {nf} feature rows"));
    }
    let p: Vec<f64> = logits.values().chunks(classes.max(1)).flat_map(softmax).collect();
    let unary_log: Vec<f64> = p.iter().map(|v| (v + 1e-10).ln()).collect();
    // L2-normalised features; k nearest others of each clip (Euclidean, which on unit vectors
    // orders as cosine similarity does).
    let unit: Vec<Vec<f64>> = features
        .values()
        .chunks(h.max(1))
        .map(|row| {
            let norm = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt().max(1e-12);
            row.iter().map(|v| f64::from(*v) / norm).collect()
        })
        .collect();
    let k = s.k.min(n.saturating_sub(1));
    let neighbours: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            let mut others: Vec<(f64, usize)> = (0..n)
                .filter(|j| *j != i)
                .map(|j| (unit[i].iter().zip(&unit[j]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>(), j))
                .collect();
            others.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            others.into_iter().take(k).map(|(_, j)| j).collect()
        })
        .collect();
    let mut z = p.clone();
    let mut previous = f64::INFINITY;
    let mut steps = 0;
    while k > 0 && steps < s.max_steps {
        steps += 1;
        let mut pairwise = vec![0f64; n * classes];
        for (i, row) in neighbours.iter().enumerate() {
            for j in row {
                for c in 0..classes {
                    pairwise[i * classes + c] += s.lambda * z[j * classes + c];
                }
            }
        }
        let exponent: Vec<f64> = unary_log.iter().zip(&pairwise).map(|(u, w)| u + w).collect();
        z = exponent.chunks(classes).flat_map(softmax_f64).collect();
        // The bound's value: Σ z·(−log p) − z·pairwise + z·log z.
        let energy: f64 =
            (0..n * classes).map(|i| z[i] * (-unary_log[i]) - z[i] * pairwise[i] + z[i] * z[i].max(1e-20).ln()).sum();
        if !energy.is_finite() {
            return Err("LAME: the bound became non-finite".into());
        }
        if steps > 1 && (energy - previous).abs() <= 1e-8 * previous.abs() {
            break;
        }
        previous = energy;
    }
    Ok((z.into_iter().map(|v| v as f32).collect(), steps))
}

fn softmax(row: &[f32]) -> Vec<f64> {
    softmax_f64(&row.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())
}

fn softmax_f64(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let z: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / z).collect()
}

/// A served model whose answers go through LAME, batch by batch.
pub struct LameModel {
    inner: Box<dyn DeviceModel>,
    settings: LameSettings,
}

impl std::fmt::Debug for LameModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LameModel").field("inner", &self.inner.name()).field("settings", &self.settings).finish()
    }
}

impl LameModel {
    /// `inner`'s answers adjusted by LAME; `inner` must offer a linear QA head.
    pub fn new(
        inner: Box<dyn DeviceModel>,
        settings: LameSettings,
    ) -> Result<Self, (Box<dyn DeviceModel>, ModelError)> {
        if inner.as_linear_head().is_none() {
            let e = ModelError::unsupported(inner.name(), "a linear QA head (LAME's features)");
            return Err((inner, e));
        }
        Ok(Self { inner, settings })
    }

    /// LAME's assignments as logits (their logarithms), with the iterations run.
    fn adjusted(&self, clips: &[Clip]) -> Result<(HostTensor, usize), ModelError> {
        let logits = self.inner.answer_logits(clips)?;
        let head = self.inner.as_linear_head().ok_or_else(|| ModelError::unsupported(self.inner.name(), "LAME"))?;
        let features = head.qa_representations(clips)?;
        let (z, steps) = assignments(&logits, &features, &self.settings).map_err(ModelError::Input)?;
        let log_z = z.into_iter().map(|v| v.max(1e-30).ln()).collect();
        let adjusted = HostTensor::new(logits.shape().to_vec(), log_z).map_err(|e| ModelError::Input(e.to_string()))?;
        Ok((adjusted, steps))
    }
}

impl DeviceModel for LameModel {
    fn schema(&self) -> &SlotSchema {
        self.inner.schema()
    }

    fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        Ok(self.adjusted(clips)?.0)
    }

    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.inner.frame_features(clips)
    }

    fn current_params(&self) -> GeneratedParams {
        self.inner.current_params()
    }

    fn install(&mut self, params: &ValidatedParams) -> Result<(), ModelError> {
        self.inner.install(params)
    }

    fn text_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.inner.text_features(clips)
    }

    fn retrieval_embeddings(&self, clips: &[Clip]) -> Result<RetrievalEmbeddings, ModelError> {
        self.inner.retrieval_embeddings(clips)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn as_fine_tunable(&self) -> Option<&dyn FineTunable> {
        None
    }

    fn as_linear_head(&self) -> Option<&dyn LinearQaHead> {
        self.inner.as_linear_head()
    }
}

/// LAME as a device-side adapter: the device's model is wrapped so that every batch it answers
/// is adjusted. Adapting runs LAME once on the window, which is what it costs per served batch.
#[derive(Debug, Clone)]
pub struct Lame {
    settings: LameSettings,
}

impl Lame {
    /// Checks the settings.
    pub fn new(settings: LameSettings) -> Result<Self, PluginError> {
        if settings.k == 0 || settings.max_steps == 0 {
            return Err(PluginError::Build("`k` and `max_steps` must be at least 1".into()));
        }
        if !(settings.lambda.is_finite() && settings.lambda >= 0.0) {
            return Err(PluginError::Build(format!("`lambda` must be ≥ 0, found {}", settings.lambda)));
        }
        Ok(Self { settings })
    }
}

/// What stands in a device's place for the instant its model is moved into a wrapper.
struct Moved(SlotSchema);

impl DeviceModel for Moved {
    fn schema(&self) -> &SlotSchema {
        &self.0
    }
    fn answer_logits(&self, _: &[Clip]) -> Result<HostTensor, ModelError> {
        Err(ModelError::Input("the model was moved".into()))
    }
    fn frame_features(&self, _: &[Clip]) -> Result<HostTensor, ModelError> {
        Err(ModelError::Input("the model was moved".into()))
    }
    fn current_params(&self) -> GeneratedParams {
        GeneratedParams { schema_hash: self.0.hash(), tensors: Default::default() }
    }
    fn install(&mut self, _: &ValidatedParams) -> Result<(), ModelError> {
        Err(ModelError::Input("the model was moved".into()))
    }
}

impl DeviceAdapter for Lame {
    fn label(&self) -> String {
        "LAME".into()
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let schema = model.schema().clone();
        let inner = std::mem::replace(model, Box::new(Moved(schema)));
        let wrapped = match LameModel::new(inner, self.settings.clone()) {
            Ok(w) => w,
            Err((inner, e)) => {
                *model = inner;
                return Err(e.into());
            }
        };
        // One LAME batch over the window: its cost per served batch, and a check that it runs.
        let outcome = if input.window.is_empty() { Ok(0) } else { wrapped.adjusted(input.window).map(|(_, s)| s) };
        *model = Box::new(wrapped);
        let steps = outcome?;
        Ok(AdaptOutcome {
            forward_passes: if input.window.is_empty() { 0 } else { 2 },
            detail: vec![("bound_steps_on_window".into(), steps as f64)],
            ..AdaptOutcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{tensor, uniform};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn assignments_are_distributions(n in 1usize..12, classes in 2usize..6, h in 1usize..5, seed in any::<u64>()) {
            let mut random = uniform(seed, 0);
            let mut draw = |len: usize| random(len, 3.0);
            let logits = tensor(vec![n, classes], draw(n * classes));
            let features = tensor(vec![n, h], draw(n * h));
            let (z, steps) = assignments(&logits, &features, &LameSettings::default()).expect("runs");
            prop_assert!(steps <= 100);
            for row in z.chunks(classes) {
                let sum: f32 = row.iter().sum();
                prop_assert!((sum - 1.0).abs() < 1e-4 && row.iter().all(|v| *v >= 0.0));
            }
        }

        #[test]
        fn without_the_laplacian_term_predictions_stay(n in 2usize..10, classes in 2usize..5, seed in any::<u64>()) {
            let mut random = uniform(seed, 1);
            let mut draw = |len: usize| random(len, 3.0);
            let logits = tensor(vec![n, classes], draw(n * classes));
            let features = tensor(vec![n, 3], draw(n * 3));
            let s = LameSettings { lambda: 0.0, ..LameSettings::default() };
            let (z, _) = assignments(&logits, &features, &s).expect("runs");
            for (row, l) in z.chunks(classes).zip(logits.values().chunks(classes)) {
                prop_assert_eq!(mmpg::model::argmax(row), mmpg::model::argmax(l));
            }
        }
    }

    #[test]
    fn an_uncertain_clip_follows_its_confident_neighbours() {
        // Clips 0–2 sit together and are sure of class 0; clip 3 sits with them but leans to class 1.
        let logits = tensor(vec![4, 2], vec![4.0, 0.0, 4.0, 0.0, 4.0, 0.0, 0.0, 0.3]);
        let features = tensor(vec![4, 2], vec![1.0, 0.0, 1.0, 0.01, 1.0, -0.01, 1.0, 0.02]);
        let s = LameSettings { k: 3, ..LameSettings::default() };
        let (z, _) = assignments(&logits, &features, &s).expect("runs");
        assert!(z[6] > z[7], "clip 3 moved to class 0: {z:?}");
    }

    #[test]
    fn shapes_must_agree() {
        let err =
            assignments(&tensor(vec![2, 2], vec![0.0; 4]), &tensor(vec![3, 1], vec![0.0; 3]), &LameSettings::default())
                .expect_err("rows differ");
        assert!(err.contains("rows"), "{err}");
    }
}
