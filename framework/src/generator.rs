//! The cloud-side parameter generator and what it is trained with.

use crate::anchor::{AnchorError, AnchorReasoner, AnchorSummary};
use crate::data::DomainSpec;
use crate::model::{CloudModel, ModelError, TrainingPlan};
use crate::slots::{GeneratedParams, SlotSchema};
use crate::source::{DataError, DataSource};
use crate::{Progress, TrainingLog};

/// Why generation or training failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum GeneratorError {
    /// A summary from a device is malformed or has the wrong dimension.
    #[error("summary rejected: {0}")]
    Summary(#[from] AnchorError),
    /// A summary's feature dimension differs from the generator's.
    #[error("summary has feature dimension {found}, the generator expects {expected}")]
    Dimension {
        /// Generator's feature dimension.
        expected: usize,
        /// Summary's.
        found: usize,
    },
    /// The model failed during training.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The data source failed during training.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be read or written.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The generator returned something other than one parameter set per summary.
    #[error("generator output: {0}")]
    Output(String),
    /// The generator's training loss, or its trained parameters, became NaN or infinite.
    #[error("generator training diverged: the loss became {loss} at step {step}")]
    Diverged {
        /// 1-based step at which it was seen (the last step when only the parameters are).
        step: usize,
        /// The loss value seen (NaN when the parameters diverged after a finite loss).
        loss: f64,
    },
    /// A plugin library's generator failed at the boundary (it panicked, or its answer did
    /// not decode); the message names the plugin and its library.
    #[error("{0}")]
    Plugin(String),
    /// The generator does not offer this capability.
    #[error("`{generator}` does not support {capability}")]
    Unsupported {
        /// Generator name.
        generator: String,
        /// What was asked.
        capability: std::borrow::Cow<'static, str>,
    },
}

/// Everything episodic generator training needs: the frozen cloud model (differentiable with
/// respect to slot values), the labelled source domains, and the same anchor reasoner the
/// devices run, so training sees exactly what devices send.
pub struct GeneratorTraining<'a> {
    /// The pretrained cloud model.
    pub model: &'a dyn CloudModel,
    /// Labelled source data.
    pub data: &'a dyn DataSource,
    /// Source domains to sample episodes from.
    pub domains: &'a [DomainSpec],
    /// The device-side reasoner.
    pub reasoner: &'a dyn AnchorReasoner,
    /// Clips per unlabelled window.
    pub window_clips: usize,
    /// Steps, batch, learning rate, seed.
    pub plan: TrainingPlan,
    /// Progress sink.
    pub progress: &'a dyn Progress,
}

impl std::fmt::Debug for GeneratorTraining<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratorTraining")
            .field("domains", &self.domains.len())
            .field("window_clips", &self.window_clips)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// The cloud's Fast Domain Adaptor role: anchor summaries in, slot values out, many devices at
/// once. Only `generate_batch` and `schema` are required. `Sync`: a serving cloud answers
/// concurrent requests from one trained copy.
pub trait ParameterGenerator: Send + Sync {
    /// The slot schema the generator produces values for.
    fn schema(&self) -> &SlotSchema;

    /// Parameters for each summary, in order. Deterministic: serving uses no sampling.
    fn generate_batch(&self, summaries: &[AnchorSummary]) -> Result<Vec<GeneratedParams>, GeneratorError>;

    /// Trains on source domains.
    fn train(&mut self, _ctx: &GeneratorTraining<'_>) -> Result<TrainingLog, GeneratorError> {
        Err(GeneratorError::Unsupported { generator: self.name().into(), capability: "training".into() })
    }

    /// Trainable parameters on the cloud side.
    fn parameter_count(&self) -> usize {
        0
    }

    /// A display name.
    fn name(&self) -> &str {
        "generator"
    }

    /// Serialises the trained generator.
    fn save(&self) -> Result<Vec<u8>, GeneratorError> {
        Err(GeneratorError::Unsupported { generator: self.name().into(), capability: "checkpoints".into() })
    }

    /// Restores a generator written by [`ParameterGenerator::save`].
    fn load(&mut self, _bytes: &[u8]) -> Result<(), GeneratorError> {
        Err(GeneratorError::Unsupported { generator: self.name().into(), capability: "checkpoints".into() })
    }

    /// Parameters for one summary.
    ///
    /// # Errors
    /// [`GeneratorError::Output`] when [`generate_batch`](Self::generate_batch) answers one summary
    /// with other than exactly one parameter set: the generator's fault, not the device's summary.
    fn generate(&self, summary: &AnchorSummary) -> Result<GeneratedParams, GeneratorError> {
        let mut out = self.generate_batch(std::slice::from_ref(summary))?;
        match (out.pop(), out.is_empty()) {
            (Some(params), true) => Ok(params),
            (None, _) => Err(GeneratorError::Output("no parameter set for one summary".into())),
            (Some(_), false) => {
                Err(GeneratorError::Output(format!("{} parameter sets for one summary", out.len() + 1)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anchor::{Quantisation, QuantisedTensor};
    use crate::slots::SlotSpec;
    use crate::tensor::HostTensor;

    /// Answers every batch with `n` copies of empty parameters.
    struct Answers(SlotSchema, usize);

    impl ParameterGenerator for Answers {
        fn schema(&self) -> &SlotSchema {
            &self.0
        }

        fn generate_batch(&self, _summaries: &[AnchorSummary]) -> Result<Vec<GeneratedParams>, GeneratorError> {
            let params = GeneratedParams { schema_hash: self.0.hash(), tensors: Default::default() };
            Ok(vec![params; self.1])
        }
    }

    #[test]
    fn one_summary_gets_exactly_one_parameter_set_or_the_generator_is_at_fault() {
        let schema = SlotSchema::new(vec![SlotSpec::f32("s", vec![1])]).expect("schema");
        let anchors = HostTensor::new(vec![1, 1], vec![0.5]).expect("fits");
        let summary = AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, Quantisation::F32).expect("finite"),
            mean: vec![0.0],
            var: vec![1.0],
            frames: 1,
            clips: 1,
            text_anchors: None,
            privacy: None,
        };
        assert!(Answers(schema.clone(), 1).generate(&summary).is_ok());
        for n in [0, 2] {
            let err = Answers(schema.clone(), n).generate(&summary).expect_err("not one");
            // Not the device's summary: the generator's output.
            assert!(matches!(err, GeneratorError::Output(_)), "{n}: {err:?}");
        }
    }
}
