//! The Lightweight Multi-modal Model, as the device serves it and as the cloud trains it.

use std::collections::BTreeMap;

use crate::anchor::FeatureStats;
use crate::backend::{BackendError, DeviceDescriptor};
use crate::data::{Clip, DomainSpec};
use crate::slots::{GeneratedParams, ParamsError, SlotSchema, ValidatedParams};
use crate::source::DataSource;
use crate::tensor::HostTensor;
use crate::{Progress, TrainingLog};

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ModelError {
    /// Input clips disagree with the model's expected frame shape.
    #[error("bad input: {0}")]
    Input(String),
    /// Parameters were refused; the model keeps its previous ones.
    #[error("parameters refused: {0}")]
    Params(#[from] ParamsError),
    /// A checkpoint could not be read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Training failed.
    #[error("training: {0}")]
    Training(String),
    /// The training loss, or the trained parameters, became NaN or infinite.
    #[error("training diverged: the loss became {loss} at step {step}")]
    Diverged {
        /// 1-based step at which it was seen (the last step when only the parameters are).
        step: usize,
        /// The loss value seen (NaN when the parameters diverged after a finite loss).
        loss: f64,
    },
    /// The device it was asked to run on cannot be used.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A plugin library's model failed at the boundary (it panicked, or its answer did not
    /// decode); the message names the plugin and its library.
    #[error("{0}")]
    Plugin(String),
    /// The model does not offer this capability.
    #[error("`{model}` does not support {capability}")]
    Unsupported {
        /// Model name.
        model: String,
        /// What was asked.
        capability: std::borrow::Cow<'static, str>,
    },
}

impl ModelError {
    /// `model` does not offer `capability`.
    pub fn unsupported(model: &str, capability: &'static str) -> Self {
        Self::Unsupported { model: model.into(), capability: capability.into() }
    }
}

/// Video and text embeddings in the joint retrieval space, row-aligned with the input clips.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrievalEmbeddings {
    /// `[n, e]` L2-normalised video embeddings.
    pub video: HostTensor,
    /// `[n, e]` L2-normalised caption embeddings.
    pub text: HostTensor,
}

/// What serving clips computes: the answers, and what a summary of those clips needs, so that
/// adaptation reuses the serving pass instead of running a second one (#16).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Served {
    /// `[n, answers]` QA logits, as [`DeviceModel::answer_logits`].
    pub logits: HostTensor,
    /// `[n·T, d]` frame features under the base slot values, as [`DeviceModel::frame_features`].
    pub frame_features: HostTensor,
    /// `[n, e]` question embeddings, as [`DeviceModel::text_features`]; `None` when the model
    /// does not embed questions.
    pub text_features: Option<HostTensor>,
}

/// The model a device serves. Forward only: no method here computes a gradient.
///
/// Implementors provide forward passes, their dynamic-slot schema and an all-or-nothing
/// `install`; validation before install, answering and scoring are provided.
pub trait DeviceModel: Send {
    /// The dynamic slots this model takes from the cloud.
    fn schema(&self) -> &SlotSchema;

    /// QA logits over the answer vocabulary, `[n, answers]`.
    fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError>;

    /// Per-frame features `[n·T, d]` computed with the model's *base* slot values, so that a
    /// summary describes the data, not the adaptation currently installed.
    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError>;

    /// The slot values currently installed.
    fn current_params(&self) -> GeneratedParams;

    /// Installs validated values. Must change nothing if it fails.
    fn install(&mut self, params: &ValidatedParams) -> Result<(), ModelError>;

    /// Question embeddings `[n, e]` of `clips` (what text-side anchors summarise).
    fn text_features(&self, _clips: &[Clip]) -> Result<HostTensor, ModelError> {
        Err(ModelError::Unsupported { model: self.name().into(), capability: "text features".into() })
    }

    /// Joint-space embeddings for retrieval.
    fn retrieval_embeddings(&self, _clips: &[Clip]) -> Result<RetrievalEmbeddings, ModelError> {
        Err(ModelError::Unsupported { model: self.name().into(), capability: "retrieval".into() })
    }

    /// A display name.
    fn name(&self) -> &str {
        "device model"
    }

    /// On-device fine-tuning with labels, when the model offers it (what the FTA baseline
    /// needs and the method avoids).
    fn as_fine_tunable(&self) -> Option<&dyn FineTunable> {
        None
    }

    /// Re-estimation of normalisation statistics on unlabelled clips, when offered.
    fn as_recalibration(&mut self) -> Option<&mut dyn StatisticsRecalibration> {
        None
    }

    /// A linear QA head over readable representations, when offered (T3A, LAME).
    fn as_linear_head(&self) -> Option<&dyn LinearQaHead> {
        None
    }

    /// Gradient descent on the entropy of its own predictions over unlabelled clips, when
    /// offered (TENT).
    fn as_entropy_minimisation(&self) -> Option<&dyn EntropyMinimisation> {
        None
    }

    /// Served frame activations, their source statistics and a shift on them, when offered
    /// (FOA).
    fn as_feature_alignment(&mut self) -> Option<&mut dyn FeatureAlignment> {
        None
    }

    /// Validates parameters from a peer against the schema and installs them; on any error the
    /// previous parameters stay in place.
    fn apply(&mut self, params: GeneratedParams) -> Result<(), ModelError> {
        let validated = self.schema().validate(params)?;
        self.install(&validated)
    }

    /// Answers `clips` and keeps what summarising them needs ([`Served`]). Provided: the three
    /// forward passes one after another; models override it to share them (the `lmm` computes
    /// one pass while its base slot values are installed).
    fn serve(&self, clips: &[Clip]) -> Result<Served, ModelError> {
        let text_features = match self.text_features(clips) {
            Ok(t) => Some(t),
            Err(ModelError::Unsupported { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Served { logits: self.answer_logits(clips)?, frame_features: self.frame_features(clips)?, text_features })
    }

    /// Predicted answer index per clip.
    fn answers(&self, clips: &[Clip]) -> Result<Vec<usize>, ModelError> {
        let logits = self.answer_logits(clips)?;
        let rows = logits.rows().ok_or_else(|| ModelError::Input("logits are not 2-D".into()))?;
        Ok(rows.map(argmax).collect())
    }

    /// Mean Shannon entropy, in nats, of the answer distribution (the softmax of the QA logits)
    /// over `clips`: how unsure the model is, measurable without labels (0 = certain; ln of the
    /// vocabulary size = uniform). NaN for no clips.
    fn answer_entropy(&self, clips: &[Clip]) -> Result<f64, ModelError> {
        if clips.is_empty() {
            return Ok(f64::NAN);
        }
        let logits = self.answer_logits(clips)?;
        let rows = logits.rows().ok_or_else(|| ModelError::Input("logits are not 2-D".into()))?;
        let (mut total, mut n) = (0.0, 0usize);
        for row in rows {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = row.iter().map(|l| f64::from(l - max).exp()).collect();
            let z: f64 = exp.iter().sum();
            total -= exp.iter().map(|e| e / z).filter(|p| *p > 0.0).map(|p| p * p.ln()).sum::<f64>();
            n += 1;
        }
        Ok(if n == 0 { f64::NAN } else { total / n as f64 })
    }

    /// Fraction of labelled clips answered correctly (unlabelled clips are skipped); NaN when no
    /// clip is labelled, since no accuracy exists then (reports show it as "n/a").
    fn accuracy(&self, clips: &[Clip]) -> Result<f64, ModelError> {
        // Without a labelled clip there is nothing to score, and nothing to run.
        if clips.iter().all(|c| c.answer.is_none()) {
            return Ok(f64::NAN);
        }
        Ok(accuracy_of(clips, &self.answers(clips)?))
    }
}

/// Fraction of the labelled `clips` that `answers` (one per clip) gets right; NaN when none is
/// labelled. [`DeviceModel::accuracy`] scores with it, and so does whoever already holds the
/// answers.
pub fn accuracy_of(clips: &[Clip], answers: &[usize]) -> f64 {
    let (right, total) = clips
        .iter()
        .zip(answers)
        .filter_map(|(clip, p)| clip.answer.map(|a| a == *p))
        .fold((0usize, 0usize), |(r, t), ok| (r + usize::from(ok), t + 1));
    if total == 0 { f64::NAN } else { right as f64 / total as f64 }
}

/// Which parameters on-device fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TuneScope {
    /// The dynamic slots only — what the cloud would otherwise generate.
    Slots,
    /// Every parameter of the model.
    All,
    /// The channel-wise affine parameters (scale and shift) of the model's normalisation or
    /// modulation layers: what TENT trains (Wang et al., ICLR 2021, §3). In the `lmm`, its FiLM
    /// slot.
    Affine,
}

impl std::fmt::Display for TuneScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TuneScope::Slots => "slots",
            TuneScope::All => "all",
            TuneScope::Affine => "affine",
        })
    }
}

/// A model under on-device training (see [`DeviceModel::fine_tuner`]).
pub trait FineTuner: Send {
    /// Number of parameters the optimiser updates.
    fn trainable_parameters(&self) -> usize;

    /// One optimiser step on labelled `batch`; returns the loss before the step.
    fn step(&mut self, batch: &[Clip]) -> Result<f64, ModelError>;

    /// A servable copy of the model as it is now.
    fn snapshot(&self) -> Result<Box<dyn DeviceModel>, ModelError>;
}

/// A model that can start on-device backprop (see [`DeviceModel::as_fine_tunable`]).
pub trait FineTunable {
    /// Starts on-device training from the current state, training what `scope` names with
    /// Adam at `learning_rate`.
    ///
    /// # Errors
    /// [`ModelError::Training`] for a learning rate that is not positive and finite.
    fn fine_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError>;
}

/// A model that descends the entropy of its own answers on unlabelled clips (see
/// [`DeviceModel::as_entropy_minimisation`]): TENT's objective (Wang et al., ICLR 2021, §3).
pub trait EntropyMinimisation {
    /// Starts on-device training from the current state whose [`FineTuner::step`] takes
    /// unlabelled clips and minimises the mean Shannon entropy (nats) of their answer
    /// distributions, training what `scope` names with Adam at `learning_rate`; `step` returns
    /// the batch's entropy before the update.
    ///
    /// # Errors
    /// [`ModelError::Training`] for a learning rate that is not positive and finite;
    /// [`ModelError::Unsupported`] for a scope the model cannot train this way.
    fn entropy_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError>;
}

/// Frame features and QA logits of a batch, from one forward pass under the installed slots
/// (see [`FeatureAlignment::activations`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    /// `[n·T, d]` frame features as served: installed slots and any alignment applied.
    pub features: HostTensor,
    /// `[n, answers]` QA logits computed from them.
    pub logits: HostTensor,
}

/// A model whose served frame features a forward-only method can measure against the source and
/// steer (see [`DeviceModel::as_feature_alignment`]): FOA's fitness and its back-to-source shift
/// (Niu et al., ICML 2024, Eqs. 5 and 7).
pub trait FeatureAlignment {
    /// The activations of `clips` under the installed slots, one forward pass.
    fn activations(&self, clips: &[Clip]) -> Result<Activations, ModelError>;

    /// Per-dimension statistics of the frame features on the cloud's source domains (the
    /// reference the device's bundle carries).
    ///
    /// # Errors
    /// Whatever keeps the model from answering (a plugin library failing at the boundary):
    /// never made-up statistics.
    fn source_statistics(&self) -> Result<FeatureStats, ModelError>;

    /// Replaces the per-dimension map `x·scale + shift` applied to served frame features
    /// (`[d]` each; `None` removes it); returns how many values it set.
    ///
    /// # Errors
    /// [`ModelError::Input`] when a vector's length is not `d` or a value is not finite; the
    /// previous map stays.
    fn set_feature_alignment(&mut self, alignment: Option<(Vec<f32>, Vec<f32>)>) -> Result<usize, ModelError>;
}

/// A model whose normalisation statistics can be re-estimated on unlabelled target clips
/// (AdaBN-style, no gradient; see [`DeviceModel::as_recalibration`]).
pub trait StatisticsRecalibration {
    /// Re-estimates the statistics on `unlabelled`; returns how many values were replaced.
    fn recalibrate_statistics(&mut self, unlabelled: &[Clip]) -> Result<usize, ModelError>;
}

/// A model whose QA logits are a linear head over representations it can return, the head's
/// weights being slots (see [`DeviceModel::as_linear_head`]): logits =
/// `qa_representations(clips) · weight + bias`.
pub trait LinearQaHead {
    /// The head's slot names.
    fn qa_head(&self) -> LinearHead;

    /// The representations `[n, h]` the head reads.
    fn qa_representations(&self, clips: &[Clip]) -> Result<HostTensor, ModelError>;
}

/// The slot names of a linear head `logits = x · weight + bias`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinearHead {
    /// `[h, classes]` weight slot.
    pub weight_slot: String,
    /// `[classes]` bias slot.
    pub bias_slot: String,
}

/// Index of the largest value (first on ties; 0 for an empty row).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

/// Slot values by slot name, each shaped as its [`SlotSpec`](crate::SlotSpec) says.
pub type SlotValues = BTreeMap<String, HostTensor>;

/// A labelled batch's task loss and its gradient with respect to the slot values: the
/// vector-Jacobian product `∂loss/∂θ` a [`CloudModel`] offers so that a parameter generator can
/// train through it without sharing its autodiff graph (see [`CloudModel::task_vjp`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotGradient {
    /// Mean QA cross-entropy of the batch, in nats.
    pub loss: f64,
    /// `∂loss/∂θ_s` for every slot `s`, shaped as the slot.
    pub gradients: SlotValues,
}

/// The episodic objective `task + γ·retrieval` at some slot values and its gradient with respect
/// to them (see [`CloudModel::objective_vjp`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObjectiveGradient {
    /// Mean QA cross-entropy of the batch, in nats.
    pub task: f64,
    /// Symmetric InfoNCE of the batch, in nats: `None` when γ = 0 or the model has no retrieval
    /// space.
    pub retrieval: Option<f64>,
    /// `∂(task + γ·retrieval)/∂θ_s` for every slot `s`, shaped as the slot.
    pub gradients: SlotValues,
}

/// Schedule of a training phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingPlan {
    /// Optimiser steps.
    pub steps: usize,
    /// Labelled clips per step (per domain for episodic training).
    pub batch: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Seed of the phase.
    pub seed: u64,
}

/// The model as the cloud holds it: trainable on labelled source domains, differentiable with
/// respect to its dynamic slots, and exportable to devices. `Sync` because a generator trains
/// through it from wherever it runs, including inside a plugin library.
pub trait CloudModel: Send + Sync {
    /// The dynamic slots.
    fn schema(&self) -> &SlotSchema;

    /// Dimension d of the frame features ADR summarises.
    fn feature_dim(&self) -> usize;

    /// Supervised training of every parameter (static part and base slot values θ0) on
    /// labelled clips of the source domains.
    fn pretrain(
        &mut self,
        data: &dyn DataSource,
        domains: &[DomainSpec],
        plan: &TrainingPlan,
        progress: &dyn Progress,
    ) -> Result<TrainingLog, ModelError>;

    /// The base slot values θ0.
    fn base_params(&self) -> GeneratedParams;

    /// Mean and std of source frame features, shipped to devices for standardisation.
    fn reference_stats(&self) -> FeatureStats;

    /// Frame features `[n·T, d]` as a device computes them.
    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError>;

    /// Dimension e of question embeddings, when the model offers [`CloudModel::text_features`].
    fn text_dim(&self) -> Option<usize> {
        None
    }

    /// Question embeddings `[n, e]` as a device computes them.
    fn text_features(&self, _clips: &[Clip]) -> Result<HostTensor, ModelError> {
        Err(ModelError::Unsupported { model: "cloud model".into(), capability: "text features".into() })
    }

    /// Mean QA cross-entropy of labelled `clips` with the given slot values, and its gradient
    /// with respect to those values (the static part is frozen): a vector-Jacobian product at
    /// the output cotangent 1.
    ///
    /// A generator producing θ = g_φ(summary) continues backpropagation inside its own graph
    /// through the surrogate `Σ_s sum(θ_s · stopgrad(∂L/∂θ_s))`, whose gradient with respect to φ
    /// is the chain rule's `(∂L/∂θ)·(∂θ/∂φ)`. Every slot of [`CloudModel::schema`] must be present
    /// with the slot's element count; errors are [`ModelError::Input`] (a missing or mis-sized
    /// slot) and [`ModelError::Training`] (an unlabelled clip).
    fn task_vjp(&self, slots: &SlotValues, clips: &[Clip]) -> Result<SlotGradient, ModelError>;

    /// The loss of [`CloudModel::task_vjp`] alone. Models may override it with a forward pass
    /// that builds no graph.
    fn task_loss(&self, slots: &SlotValues, clips: &[Clip]) -> Result<f64, ModelError> {
        Ok(self.task_vjp(slots, clips)?.loss)
    }

    /// The retrieval objective, when the model has a video–text space: symmetric InfoNCE between
    /// the video and caption embeddings of `clips` (each clip's caption its video's positive, the
    /// batch's others its negatives) with the given slot values, and its gradient with respect to
    /// them, a vector-Jacobian product as in [`CloudModel::task_vjp`] (slots that do not reach the
    /// embeddings get zeros). `None` (the default): the model has no retrieval space. A batch of
    /// one clip has no negatives; errors as [`CloudModel::task_vjp`].
    fn retrieval_vjp(&self, _slots: &SlotValues, _clips: &[Clip]) -> Result<Option<SlotGradient>, ModelError> {
        Ok(None)
    }

    /// The generator's episodic objective `task + γ·retrieval` (γ = `retrieval_weight` ≥ 0) of
    /// labelled `clips` and its gradient with respect to the slot values: the sum of
    /// [`CloudModel::task_vjp`] and γ·[`CloudModel::retrieval_vjp`], the retrieval term omitted at
    /// γ = 0 or when the model has none. Models override it to share one forward pass between the
    /// two terms; errors as [`CloudModel::task_vjp`].
    fn objective_vjp(
        &self,
        slots: &SlotValues,
        clips: &[Clip],
        retrieval_weight: f64,
    ) -> Result<ObjectiveGradient, ModelError> {
        let task = self.task_vjp(slots, clips)?;
        let retrieval = if retrieval_weight > 0.0 { self.retrieval_vjp(slots, clips)? } else { None };
        let mut gradients = task.gradients;
        if let Some(r) = &retrieval {
            for (name, g) in &mut gradients {
                let rg = r.gradients.get(name).filter(|rg| rg.len() == g.len()).ok_or_else(|| {
                    ModelError::Training(format!("the retrieval gradient of slot `{name}` is missing or mis-sized"))
                })?;
                let sum = g.values().iter().zip(rg.values()).map(|(a, b)| a + retrieval_weight as f32 * b).collect();
                *g = HostTensor::new(g.shape().to_vec(), sum).map_err(|e| ModelError::Training(e.to_string()))?;
            }
        }
        Ok(ObjectiveGradient { task: task.loss, retrieval: retrieval.map(|r| r.loss), gradients })
    }

    /// Number of trainable parameters in the cloud model (static part and θ0).
    fn parameter_count(&self) -> usize;

    /// A device-side copy of the trained model on `device` (an inference device), with θ0
    /// installed.
    fn export(&self, device: &DeviceDescriptor) -> Result<Box<dyn DeviceModel>, ModelError>;

    /// Serialises the trained model.
    fn save(&self) -> Result<Vec<u8>, ModelError> {
        Err(ModelError::Unsupported { model: "cloud model".into(), capability: "checkpoints".into() })
    }

    /// Restores a model written by [`CloudModel::save`]; bytes are validated, never trusted.
    fn load(&mut self, _bytes: &[u8]) -> Result<(), ModelError> {
        Err(ModelError::Unsupported { model: "cloud model".into(), capability: "checkpoints".into() })
    }
}
