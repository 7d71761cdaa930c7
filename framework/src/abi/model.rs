//! The model across the boundary: a library's cloud model (and the device models and
//! fine-tuners it makes) served and proxied, and the host's cloud model lent to a library's
//! generator training through it.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::ffi::{self, Remote};
use super::host::{LentData, LentProgress, RemoteData, RemoteProgress};
use super::proxy::Proxy;
use super::serve::{Outcome, Serve, with, with_object};
use crate::anchor::FeatureStats;
use crate::backend::DeviceDescriptor;
use crate::data::{Clip, DomainSpec};
use crate::model::{
    Activations, CloudModel, DeviceModel, EntropyMinimisation, FeatureAlignment, FineTunable, FineTuner, LinearHead,
    LinearQaHead, ModelError, ObjectiveGradient, RetrievalEmbeddings, Served, SlotGradient, SlotValues,
    StatisticsRecalibration, TrainingPlan, TuneScope,
};
use crate::slots::{GeneratedParams, SlotSchema, ValidatedParams};
use crate::source::DataSource;
use crate::tensor::HostTensor;
use crate::{Progress, TrainingLog};

/// Cloud model methods.
mod cloud {
    /// `()` → `(SlotSchema, usize, Option<usize>)`: schema, feature dim, text dim.
    pub const DESCRIBE: u32 = 1;
    /// `(Vec<DomainSpec>, TrainingPlan)`, args `[data, progress]` → `TrainingLog`.
    pub const PRETRAIN: u32 = 2;
    /// `()` → `GeneratedParams`.
    pub const BASE_PARAMS: u32 = 3;
    /// `()` → `FeatureStats`.
    pub const REFERENCE_STATS: u32 = 4;
    /// `Vec<Clip>` → `HostTensor`.
    pub const FRAME_FEATURES: u32 = 5;
    /// `Vec<Clip>` → `HostTensor`.
    pub const TEXT_FEATURES: u32 = 6;
    /// `(SlotValues, Vec<Clip>)` → `SlotGradient`.
    pub const TASK_VJP: u32 = 7;
    /// `(SlotValues, Vec<Clip>)` → `f64`.
    pub const TASK_LOSS: u32 = 8;
    /// `()` → `usize`.
    pub const PARAMETER_COUNT: u32 = 9;
    /// `DeviceDescriptor` → a device model object.
    pub const EXPORT: u32 = 10;
    /// `()` → `Vec<u8>`.
    pub const SAVE: u32 = 11;
    /// `Vec<u8>` → `()`.
    pub const LOAD: u32 = 12;
    /// `(SlotValues, Vec<Clip>)` → `Option<SlotGradient>`.
    pub const RETRIEVAL_VJP: u32 = 13;
    /// `(SlotValues, Vec<Clip>, f64)` → `ObjectiveGradient`.
    pub const OBJECTIVE_VJP: u32 = 14;
}

fn lock<T: ?Sized>(m: &Mutex<Box<T>>) -> MutexGuard<'_, Box<T>> {
    // A panic inside a call is caught at the boundary and reported; the object stays usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The methods that read a cloud model.
fn serve_cloud(m: &dyn CloudModel, method: u32, input: &[u8]) -> Outcome {
    match method {
        cloud::DESCRIBE => Outcome::value((m.schema(), m.feature_dim(), m.text_dim())),
        cloud::BASE_PARAMS => Outcome::value(m.base_params()),
        cloud::REFERENCE_STATS => Outcome::value(m.reference_stats()),
        cloud::FRAME_FEATURES => with(input, |clips: Vec<Clip>| m.frame_features(&clips)),
        cloud::TEXT_FEATURES => with(input, |clips: Vec<Clip>| m.text_features(&clips)),
        cloud::TASK_VJP => with(input, |(slots, clips): (SlotValues, Vec<Clip>)| m.task_vjp(&slots, &clips)),
        cloud::TASK_LOSS => with(input, |(slots, clips): (SlotValues, Vec<Clip>)| m.task_loss(&slots, &clips)),
        cloud::RETRIEVAL_VJP => with(input, |(slots, clips): (SlotValues, Vec<Clip>)| m.retrieval_vjp(&slots, &clips)),
        cloud::OBJECTIVE_VJP => {
            with(input, |(slots, clips, weight): (SlotValues, Vec<Clip>, f64)| m.objective_vjp(&slots, &clips, weight))
        }
        cloud::PARAMETER_COUNT => Outcome::value(m.parameter_count()),
        cloud::EXPORT => with_object(input, |device: DeviceDescriptor| {
            m.export(&device).map(|d| Box::new(OwnedDevice(Mutex::new(d))) as Box<dyn Serve>)
        }),
        cloud::SAVE => Outcome::of(m.save()),
        other => Outcome::unknown(other),
    }
}

/// A library's cloud model, served.
pub(crate) struct OwnedCloud(pub(crate) Mutex<Box<dyn CloudModel>>);

impl Serve for OwnedCloud {
    fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome {
        let mut model = lock(&self.0);
        match method {
            cloud::PRETRAIN => {
                let mut args = args.into_iter();
                let (Some(data), Some(progress)) = (args.next(), args.next()) else {
                    return Outcome::missing_argument("data source and progress");
                };
                let data = match RemoteData::new(Proxy::new(data, "the host's data source")) {
                    Ok(d) => d,
                    Err(e) => return Outcome::of::<(), ModelError>(Err(ModelError::Training(e.to_string()))),
                };
                let progress = RemoteProgress(Proxy::new(progress, "the host's progress"));
                with(input, |(domains, plan): (Vec<DomainSpec>, TrainingPlan)| {
                    model.pretrain(&data, &domains, &plan, &progress)
                })
            }
            cloud::LOAD => with(input, |bytes: Vec<u8>| model.load(&bytes)),
            other => serve_cloud(model.as_ref(), other, input),
        }
    }
}

/// The host's cloud model, lent into a library's generator training (read-only).
pub(crate) struct LentCloud<'a>(pub(crate) &'a dyn CloudModel);

impl Serve for LentCloud<'_> {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        match method {
            cloud::PRETRAIN | cloud::LOAD => Outcome::unknown(method),
            other => serve_cloud(self.0, other, input),
        }
    }
}

/// A cloud model on the other side of the boundary.
pub(crate) struct RemoteCloud {
    proxy: Proxy,
    schema: SlotSchema,
    feature_dim: usize,
    text_dim: Option<usize>,
}

impl RemoteCloud {
    pub(crate) fn new(proxy: Proxy) -> Result<Self, ModelError> {
        let (schema, feature_dim, text_dim) = proxy.call::<_, _, ModelError>(cloud::DESCRIBE, &())?;
        Ok(Self { proxy, schema, feature_dim, text_dim })
    }
}

impl CloudModel for RemoteCloud {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn pretrain(
        &mut self,
        data: &dyn DataSource,
        domains: &[DomainSpec],
        plan: &TrainingPlan,
        progress: &dyn Progress,
    ) -> Result<TrainingLog, ModelError> {
        ffi::with_lent(&[&LentData(data), &LentProgress(progress)], |args| {
            self.proxy.call_with(cloud::PRETRAIN, &(domains, plan), args)
        })
    }

    fn base_params(&self) -> GeneratedParams {
        // The trait cannot fail here: at the boundary, fall back to zeros of the schema
        // (a later validation or the report shows the failure).
        self.proxy.call::<_, _, ModelError>(cloud::BASE_PARAMS, &()).unwrap_or_else(|_| zeros(&self.schema))
    }

    fn reference_stats(&self) -> FeatureStats {
        self.proxy
            .call::<_, _, ModelError>(cloud::REFERENCE_STATS, &())
            .unwrap_or_else(|_| FeatureStats { mean: vec![0.0; self.feature_dim], std: vec![1.0; self.feature_dim] })
    }

    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(cloud::FRAME_FEATURES, clips)
    }

    fn text_dim(&self) -> Option<usize> {
        self.text_dim
    }

    fn text_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(cloud::TEXT_FEATURES, clips)
    }

    fn task_vjp(&self, slots: &SlotValues, clips: &[Clip]) -> Result<SlotGradient, ModelError> {
        self.proxy.call(cloud::TASK_VJP, &(slots, clips))
    }

    fn task_loss(&self, slots: &SlotValues, clips: &[Clip]) -> Result<f64, ModelError> {
        self.proxy.call(cloud::TASK_LOSS, &(slots, clips))
    }

    fn retrieval_vjp(&self, slots: &SlotValues, clips: &[Clip]) -> Result<Option<SlotGradient>, ModelError> {
        self.proxy.call(cloud::RETRIEVAL_VJP, &(slots, clips))
    }

    fn objective_vjp(
        &self,
        slots: &SlotValues,
        clips: &[Clip],
        retrieval_weight: f64,
    ) -> Result<ObjectiveGradient, ModelError> {
        self.proxy.call(cloud::OBJECTIVE_VJP, &(slots, clips, retrieval_weight))
    }

    fn parameter_count(&self) -> usize {
        self.proxy.call::<_, _, ModelError>(cloud::PARAMETER_COUNT, &()).unwrap_or(0)
    }

    fn export(&self, device: &DeviceDescriptor) -> Result<Box<dyn DeviceModel>, ModelError> {
        let remote = self.proxy.call_object::<_, ModelError>(cloud::EXPORT, device, Vec::new())?;
        Ok(Box::new(RemoteDevice::new(Proxy::new(remote, self.proxy.label()))?))
    }

    fn save(&self) -> Result<Vec<u8>, ModelError> {
        self.proxy.call(cloud::SAVE, &())
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        self.proxy.call(cloud::LOAD, bytes)
    }
}

fn zeros(schema: &SlotSchema) -> GeneratedParams {
    GeneratedParams {
        schema_hash: schema.hash(),
        tensors: schema.slots().iter().map(|s| (s.name.clone(), HostTensor::zeros(s.shape.clone()))).collect(),
    }
}

/// Device model methods.
mod device {
    /// `()` → `(SlotSchema, String, bool, bool, Option<LinearHead>)`: schema, name, fine-tunable,
    /// recalibration, linear QA head.
    pub const DESCRIBE: u32 = 1;
    /// `Vec<Clip>` → `HostTensor`.
    pub const ANSWER_LOGITS: u32 = 2;
    /// `Vec<Clip>` → `HostTensor`.
    pub const FRAME_FEATURES: u32 = 3;
    /// `()` → `GeneratedParams`.
    pub const CURRENT_PARAMS: u32 = 4;
    /// `GeneratedParams` (validated again by the library against its schema) → `()`.
    pub const INSTALL: u32 = 5;
    /// `Vec<Clip>` → `HostTensor`.
    pub const TEXT_FEATURES: u32 = 6;
    /// `Vec<Clip>` → `RetrievalEmbeddings`.
    pub const RETRIEVAL: u32 = 7;
    /// `(TuneScope, f64)` → a fine-tuner object.
    pub const FINE_TUNER: u32 = 8;
    /// `Vec<Clip>` → `usize`.
    pub const RECALIBRATE: u32 = 9;
    /// `Vec<Clip>` → `HostTensor`.
    pub const QA_REPRESENTATIONS: u32 = 10;
    /// `Vec<Clip>` → `Served`.
    pub const SERVE: u32 = 11;
    /// `()` → `(bool, Option<FeatureStats>)`: entropy minimisation; feature alignment, with its
    /// source statistics (ABI 4).
    pub const CAPABILITIES: u32 = 12;
    /// `(TuneScope, f64)` → an entropy-minimising fine-tuner object.
    pub const ENTROPY_TUNER: u32 = 13;
    /// `Vec<Clip>` → `(HostTensor, HostTensor)`: served frame features and logits.
    pub const ACTIVATIONS: u32 = 14;
    /// `Option<(Vec<f32>, Vec<f32>)>` → `usize`.
    pub const SET_ALIGNMENT: u32 = 15;
}

/// A library's device model, served.
pub(crate) struct OwnedDevice(pub(crate) Mutex<Box<dyn DeviceModel>>);

impl Serve for OwnedDevice {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        let mut m = lock(&self.0);
        let unsupported = |m: &dyn DeviceModel, what: &'static str| ModelError::unsupported(m.name(), what);
        match method {
            device::DESCRIBE => {
                let recalibration = m.as_recalibration().is_some();
                Outcome::value((
                    m.schema(),
                    m.name(),
                    m.as_fine_tunable().is_some(),
                    recalibration,
                    m.as_linear_head().map(LinearQaHead::qa_head),
                ))
            }
            device::ANSWER_LOGITS => with(input, |clips: Vec<Clip>| m.answer_logits(&clips)),
            device::FRAME_FEATURES => with(input, |clips: Vec<Clip>| m.frame_features(&clips)),
            device::CURRENT_PARAMS => Outcome::value(m.current_params()),
            device::INSTALL => with(input, |params: GeneratedParams| {
                let validated = m.schema().validate(params)?;
                m.install(&validated)
            }),
            device::TEXT_FEATURES => with(input, |clips: Vec<Clip>| m.text_features(&clips)),
            device::RETRIEVAL => with(input, |clips: Vec<Clip>| m.retrieval_embeddings(&clips)),
            device::SERVE => with(input, |clips: Vec<Clip>| m.serve(&clips)),
            device::FINE_TUNER => with_object(input, |(scope, rate): (TuneScope, f64)| {
                let tunable = m.as_fine_tunable().ok_or_else(|| unsupported(m.as_ref(), "fine-tuning"))?;
                let tuner = tunable.fine_tuner(scope, rate)?;
                Ok::<_, ModelError>(Box::new(OwnedTuner(Mutex::new(tuner))) as Box<dyn Serve>)
            }),
            device::RECALIBRATE => with(input, |clips: Vec<Clip>| {
                let name = m.name().to_string();
                let r =
                    m.as_recalibration().ok_or_else(|| ModelError::unsupported(&name, "statistics recalibration"))?;
                r.recalibrate_statistics(&clips)
            }),
            device::QA_REPRESENTATIONS => with(input, |clips: Vec<Clip>| {
                let head = m.as_linear_head().ok_or_else(|| unsupported(m.as_ref(), "a linear QA head"))?;
                head.qa_representations(&clips)
            }),
            device::CAPABILITIES => with(input, |(): ()| {
                let entropy = m.as_entropy_minimisation().is_some();
                let statistics = m.as_feature_alignment().map(|a| a.source_statistics()).transpose()?;
                Ok::<_, ModelError>((entropy, statistics))
            }),
            device::ENTROPY_TUNER => with_object(input, |(scope, rate): (TuneScope, f64)| {
                let minimisation =
                    m.as_entropy_minimisation().ok_or_else(|| unsupported(m.as_ref(), "entropy minimisation"))?;
                let tuner = minimisation.entropy_tuner(scope, rate)?;
                Ok::<_, ModelError>(Box::new(OwnedTuner(Mutex::new(tuner))) as Box<dyn Serve>)
            }),
            device::ACTIVATIONS => with(input, |clips: Vec<Clip>| {
                let name = m.name().to_string();
                let a = m.as_feature_alignment().ok_or_else(|| ModelError::unsupported(&name, "feature alignment"))?;
                a.activations(&clips).map(|a| (a.features, a.logits))
            }),
            device::SET_ALIGNMENT => with(input, |alignment: Option<(Vec<f32>, Vec<f32>)>| {
                let name = m.name().to_string();
                let a = m.as_feature_alignment().ok_or_else(|| ModelError::unsupported(&name, "feature alignment"))?;
                a.set_feature_alignment(alignment)
            }),
            other => Outcome::unknown(other),
        }
    }
}

/// A device model on the other side of the boundary, with the capabilities it reported.
pub(crate) struct RemoteDevice {
    proxy: Proxy,
    schema: SlotSchema,
    name: String,
    fine_tunable: bool,
    recalibration: bool,
    head: Option<LinearHead>,
    entropy_minimisation: bool,
    /// The source statistics of a model offering feature alignment, read once with the
    /// capabilities.
    source_statistics: Option<FeatureStats>,
}

impl RemoteDevice {
    fn new(proxy: Proxy) -> Result<Self, ModelError> {
        let (schema, name, fine_tunable, recalibration, head) =
            proxy.call::<_, _, ModelError>(device::DESCRIBE, &())?;
        let (entropy_minimisation, source_statistics) =
            proxy.call::<_, (bool, Option<FeatureStats>), ModelError>(device::CAPABILITIES, &())?;
        Ok(Self { proxy, schema, name, fine_tunable, recalibration, head, entropy_minimisation, source_statistics })
    }
}

impl DeviceModel for RemoteDevice {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(device::ANSWER_LOGITS, clips)
    }

    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(device::FRAME_FEATURES, clips)
    }

    fn current_params(&self) -> GeneratedParams {
        self.proxy.call::<_, _, ModelError>(device::CURRENT_PARAMS, &()).unwrap_or_else(|_| zeros(&self.schema))
    }

    fn install(&mut self, params: &ValidatedParams) -> Result<(), ModelError> {
        self.proxy.call(device::INSTALL, params.params())
    }

    fn text_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(device::TEXT_FEATURES, clips)
    }

    fn retrieval_embeddings(&self, clips: &[Clip]) -> Result<RetrievalEmbeddings, ModelError> {
        self.proxy.call(device::RETRIEVAL, clips)
    }

    fn serve(&self, clips: &[Clip]) -> Result<Served, ModelError> {
        self.proxy.call(device::SERVE, clips)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn as_fine_tunable(&self) -> Option<&dyn FineTunable> {
        self.fine_tunable.then_some(self as &dyn FineTunable)
    }

    fn as_recalibration(&mut self) -> Option<&mut dyn StatisticsRecalibration> {
        if self.recalibration { Some(self as &mut dyn StatisticsRecalibration) } else { None }
    }

    fn as_linear_head(&self) -> Option<&dyn LinearQaHead> {
        self.head.is_some().then_some(self as &dyn LinearQaHead)
    }

    fn as_entropy_minimisation(&self) -> Option<&dyn EntropyMinimisation> {
        self.entropy_minimisation.then_some(self as &dyn EntropyMinimisation)
    }

    fn as_feature_alignment(&mut self) -> Option<&mut dyn FeatureAlignment> {
        if self.source_statistics.is_some() { Some(self as &mut dyn FeatureAlignment) } else { None }
    }
}

impl EntropyMinimisation for RemoteDevice {
    fn entropy_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError> {
        self.tuner(device::ENTROPY_TUNER, scope, learning_rate)
    }
}

impl FeatureAlignment for RemoteDevice {
    fn activations(&self, clips: &[Clip]) -> Result<Activations, ModelError> {
        let (features, logits) =
            self.proxy.call::<_, (HostTensor, HostTensor), ModelError>(device::ACTIVATIONS, clips)?;
        Ok(Activations { features, logits })
    }

    fn source_statistics(&self) -> Result<FeatureStats, ModelError> {
        self.source_statistics.clone().ok_or_else(|| ModelError::unsupported(&self.name, "feature alignment"))
    }

    fn set_feature_alignment(&mut self, alignment: Option<(Vec<f32>, Vec<f32>)>) -> Result<usize, ModelError> {
        self.proxy.call(device::SET_ALIGNMENT, &alignment)
    }
}

impl RemoteDevice {
    /// A tuner the library's model makes through `method` (fine-tuning or entropy minimisation).
    fn tuner(&self, method: u32, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError> {
        let remote = self.proxy.call_object::<_, ModelError>(method, &(scope, learning_rate), Vec::new())?;
        Ok(Box::new(RemoteTuner(Proxy::new(remote, self.proxy.label()))))
    }
}

impl FineTunable for RemoteDevice {
    fn fine_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError> {
        self.tuner(device::FINE_TUNER, scope, learning_rate)
    }
}

impl StatisticsRecalibration for RemoteDevice {
    fn recalibrate_statistics(&mut self, unlabelled: &[Clip]) -> Result<usize, ModelError> {
        self.proxy.call(device::RECALIBRATE, unlabelled)
    }
}

impl LinearQaHead for RemoteDevice {
    fn qa_head(&self) -> LinearHead {
        self.head.clone().unwrap_or(LinearHead { weight_slot: String::new(), bias_slot: String::new() })
    }

    fn qa_representations(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        self.proxy.call(device::QA_REPRESENTATIONS, clips)
    }
}

/// Fine-tuner methods.
mod tuner {
    /// `()` → `usize`.
    pub const TRAINABLE: u32 = 1;
    /// `Vec<Clip>` → `f64`.
    pub const STEP: u32 = 2;
    /// `()` → a device model object.
    pub const SNAPSHOT: u32 = 3;
}

/// A library's fine-tuner, served.
struct OwnedTuner(Mutex<Box<dyn FineTuner>>);

impl Serve for OwnedTuner {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        let mut t = lock(&self.0);
        match method {
            tuner::TRAINABLE => Outcome::value(t.trainable_parameters()),
            tuner::STEP => with(input, |batch: Vec<Clip>| t.step(&batch)),
            tuner::SNAPSHOT => {
                Outcome::object(t.snapshot().map(|d| Box::new(OwnedDevice(Mutex::new(d))) as Box<dyn Serve>))
            }
            other => Outcome::unknown(other),
        }
    }
}

/// A fine-tuner on the other side of the boundary.
struct RemoteTuner(Proxy);

impl FineTuner for RemoteTuner {
    fn trainable_parameters(&self) -> usize {
        self.0.call::<_, _, ModelError>(tuner::TRAINABLE, &()).unwrap_or(0)
    }

    fn step(&mut self, batch: &[Clip]) -> Result<f64, ModelError> {
        self.0.call(tuner::STEP, batch)
    }

    fn snapshot(&self) -> Result<Box<dyn DeviceModel>, ModelError> {
        let remote = self.0.call_object::<_, ModelError>(tuner::SNAPSHOT, &(), Vec::new())?;
        Ok(Box::new(RemoteDevice::new(Proxy::new(remote, self.0.label()))?))
    }
}
