//! `lmm`: the Lightweight Multi-modal Model.
//!
//! Frames → small conv encoder (its first layer modulated by the `frame_film` slot) → per-frame
//! features f_t → temporal pooling ([mean; last − first] → linear) → video vector v. Question →
//! hashed bag of words → embedding → q. Fusion `[v; q] → h` and the QA head `h → answers` are
//! dynamic slots; video and caption projections give the retrieval space.
//!
//! The forward pass is functional in the slot values: the cloud feeds generated tensors (with
//! gradients back to the generator), the device feeds its installed values.

pub mod efficientnet;
pub mod encoder;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::avg_pool2d;
use burn::tensor::{Int, Tensor, TensorData};
use mmpg::seed;
use mmpg::{
    Activations, Build, Check, Clip, CloudModel, DataSource, DeviceDescriptor, DeviceModel, DomainSpec,
    EntropyMinimisation, Factory, FeatureAlignment, FeatureStats, FineTunable, FineTuner, GeneratedParams, HostTensor,
    LinearHead, LinearQaHead, ModelContext, ModelError, ObjectiveGradient, Plugin, PluginError, Progress,
    RetrievalEmbeddings, Served, Settings, SettingsSpec, SlotGradient, SlotSchema, SlotSpec, SlotValues, Split,
    StaticPlugin, StatisticsRecalibration, TaskSpec, TextSource, TrainingLog, TrainingPlan, TuneScope, ValidatedParams,
    parse_settings,
};
use mmpg_backends::modules::{
    all_finite, inference_device, init_device, materialise, parameters, read_checkpoint, relocate, restore,
    write_checkpoint,
};
use mmpg_backends::{Backend, BurnDevice, HostTensorBurn as _};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

/// The backend every tensor here lives on.
type DB = Backend;

/// Settings of the `lmm` model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmmSettings {
    /// Channels of the first conv layer (and of the FiLM slot).
    pub conv1_channels: usize,
    /// Channels of the second conv layer.
    pub conv2_channels: usize,
    /// Frame feature dimension d (what ADR summarises).
    pub feature_dim: usize,
    /// Width of the fusion layer.
    pub hidden: usize,
    /// Hash buckets of the question bag of words.
    pub text_buckets: usize,
    /// Dimension of the retrieval space.
    pub retrieval_dim: usize,
    /// Weight of the InfoNCE retrieval loss in pretraining.
    pub retrieval_weight: f64,
    /// Source clips used to compute the reference feature statistics.
    pub reference_clips: usize,
    /// A pretrained frame encoder (EfficientNet-Lite0) in place of the small conv encoder: its
    /// pooled features go through one linear layer, FiLM-modulated by the `frame_film` slot.
    pub encoder: Option<encoder::EncoderSettings>,
}

impl Default for LmmSettings {
    fn default() -> Self {
        Self {
            conv1_channels: 16,
            conv2_channels: 32,
            feature_dim: 64,
            hidden: 64,
            text_buckets: 256,
            retrieval_dim: 32,
            retrieval_weight: 0.5,
            reference_clips: 256,
            encoder: None,
        }
    }
}

impl Settings for LmmSettings {
    fn check(&self, check: &mut Check) {
        // A lightweight model: beyond these the generator's per-slot bases alone outgrow memory.
        check.within("conv1_channels", self.conv1_channels, 1..=256);
        check.within("conv2_channels", self.conv2_channels, 1..=256);
        check.within("feature_dim", self.feature_dim, 1..=1024);
        check.within("hidden", self.hidden, 1..=1024);
        check.within("text_buckets", self.text_buckets, 1..=65_536);
        check.within("retrieval_dim", self.retrieval_dim, 1..=1024);
        check.real("retrieval_weight", self.retrieval_weight, 0.0..=100.0);
        check.within("reference_clips", self.reference_clips, 1..=10_000);
        if let Some(e) = &self.encoder {
            check.within("encoder.resolution", e.resolution, 16..=512);
            check.within("encoder.memo_mib", e.memo_mib, 0..=1 << 20);
            // What loading would refuse, from the checkpoint's metadata (its tensors are not read).
            if let Err(problem) = efficientnet::check_weights(&e.weights) {
                check.fail("encoder.weights", problem.to_string());
            }
        }
    }
}

const FILM: &str = "frame_film";
const FUSION_W: &str = "fusion.weight";
const FUSION_B: &str = "fusion.bias";
const HEAD_W: &str = "qa_head.weight";
const HEAD_B: &str = "qa_head.bias";

/// The network: the static part as modules, θ0 as flat parameters.
#[derive(Module, Debug)]
pub struct LmmNet<B: burn::tensor::backend::Backend> {
    /// Image frames: two conv layers (the first modulated by the FiLM slot).
    conv1: Option<Conv2d<B>>,
    conv2: Option<Conv2d<B>>,
    /// Pre-extracted frame features (`[d, 1, 1]` frames): one linear layer, FiLM-modulated.
    feature_in: Option<Linear<B>>,
    /// The pretrained encoder's last stage and head, frozen, when the FiLM slot modulates the
    /// map entering it (the frames are then those maps).
    tail: Option<efficientnet::EfficientNetTail<B>>,
    frame_proj: Linear<B>,
    temporal: Linear<B>,
    text_embedding: Param<Tensor<B, 2>>,
    video_proj: Linear<B>,
    text_proj: Linear<B>,
    base_film: Param<Tensor<B, 1>>,
    base_fusion_w: Param<Tensor<B, 1>>,
    base_fusion_b: Param<Tensor<B, 1>>,
    base_head_w: Param<Tensor<B, 1>>,
    base_head_b: Param<Tensor<B, 1>>,
}

/// Model geometry, derived from settings and task.
#[derive(Debug, Clone)]
struct Geometry {
    settings: LmmSettings,
    frames: usize,
    frame_shape: [usize; 3],
    answers: usize,
    /// A frozen text encoder replacing the bag of words, when the deployment has one.
    text: Option<Arc<TextSource>>,
    /// A frozen pretrained frame encoder, when the settings name one.
    frames_encoder: Option<Arc<encoder::FrameEncoder>>,
}

impl Geometry {
    fn new(settings: LmmSettings, task: &TaskSpec) -> Result<Self, ModelError> {
        let [c, h, w] = task.frame_shape;
        if settings.encoder.is_some() && !((c == 1 || c == 3) && h >= 1 && w >= 1) {
            return Err(ModelError::Input(format!(
                "the pretrained encoder reads grey [1, H, W] or RGB [3, H, W] frames; task has {:?}",
                task.frame_shape
            )));
        }
        let image = h >= 4 && w >= 4 && h % 4 == 0 && w % 4 == 0;
        let features = h == 1 && w == 1;
        if c == 0 || !(image || features || settings.encoder.is_some()) {
            return Err(ModelError::Input(format!(
                "frames must be images [C, H, W] with H, W multiples of 4, or features [d, 1, 1]; task has {:?}",
                task.frame_shape
            )));
        }
        for (name, v) in [
            ("conv1_channels", settings.conv1_channels),
            ("conv2_channels", settings.conv2_channels),
            ("feature_dim", settings.feature_dim),
            ("hidden", settings.hidden),
            ("text_buckets", settings.text_buckets),
            ("retrieval_dim", settings.retrieval_dim),
        ] {
            if v == 0 {
                return Err(ModelError::Input(format!("`{name}` must be at least 1")));
            }
        }
        Ok(Self {
            settings,
            frames: task.frames_per_clip,
            frame_shape: task.frame_shape,
            answers: task.answers.len(),
            text: None,
            frames_encoder: None,
        })
    }

    /// Width of a text input: the encoder's embedding, or the bag-of-words buckets.
    fn text_inputs(&self) -> usize {
        self.text.as_ref().map_or(self.settings.text_buckets, |t| t.dim())
    }

    /// Channels the FiLM slot modulates: the first conv layer's or the first linear layer's,
    /// or the pretrained map's when it sits inside the encoder.
    fn film_channels(&self) -> usize {
        self.frames_encoder.as_ref().and_then(|e| e.film_channels()).unwrap_or(self.settings.conv1_channels)
    }

    fn schema(&self) -> SlotSchema {
        let s = &self.settings;
        SlotSchema::new(vec![
            SlotSpec::f32(FILM, vec![2, self.film_channels()]),
            SlotSpec::f32(FUSION_W, vec![2 * s.feature_dim, s.hidden]),
            SlotSpec::f32(FUSION_B, vec![s.hidden]),
            SlotSpec::f32(HEAD_W, vec![s.hidden, self.answers]),
            SlotSpec::f32(HEAD_B, vec![self.answers]),
        ])
        .expect("slot names are distinct constants and every size is checked non-zero")
    }

    fn init<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> LmmNet<B> {
        let s = &self.settings;
        let [c, h, w] = self.frame_shape;
        let encoded = self.frames_encoder.as_ref().map(|e| e.dim());
        let features = (h == 1 && w == 1) || encoded.is_some();
        let c = encoded.unwrap_or(c);
        let pooled = if features { s.conv1_channels } else { s.conv2_channels * (h / 4) * (w / 4) };
        let conv = |input: usize, output: usize| {
            Conv2dConfig::new([input, output], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device)
        };
        let uniform = |n: usize, fan_in: usize| {
            let bound = (1.0 / fan_in as f64).sqrt();
            Param::from_tensor(Tensor::<B, 1>::random([n], burn::tensor::Distribution::Uniform(-bound, bound), device))
        };
        LmmNet {
            conv1: (!features).then(|| conv(c, s.conv1_channels)),
            conv2: (!features).then(|| conv(s.conv1_channels, s.conv2_channels)),
            feature_in: features.then(|| LinearConfig::new(c, s.conv1_channels).init(device)),
            tail: None,
            frame_proj: LinearConfig::new(pooled, s.feature_dim).init(device),
            temporal: LinearConfig::new(2 * s.feature_dim, s.feature_dim).init(device),
            // A learned bag-of-words embedding, or a learned projection of the frozen encoder's
            // (unit-norm) sentence embeddings.
            text_embedding: Param::from_tensor(Tensor::random(
                [self.text_inputs(), s.feature_dim],
                burn::tensor::Distribution::Normal(0.0, if self.text.is_some() { 2.0 } else { 1.0 }),
                device,
            )),
            video_proj: LinearConfig::new(s.feature_dim, s.retrieval_dim).init(device),
            text_proj: LinearConfig::new(s.feature_dim, s.retrieval_dim).init(device),
            base_film: Param::from_tensor(Tensor::zeros([2 * self.film_channels()], device)),
            base_fusion_w: uniform(2 * s.feature_dim * s.hidden, 2 * s.feature_dim),
            base_fusion_b: Param::from_tensor(Tensor::zeros([s.hidden], device)),
            base_head_w: uniform(s.hidden * self.answers, s.hidden),
            base_head_b: Param::from_tensor(Tensor::zeros([self.answers], device)),
        }
    }
}

/// Slot values as tensors, in forward-pass form.
#[derive(Debug, Clone)]
struct Slots<B: burn::tensor::backend::Backend> {
    film: Tensor<B, 1>,
    fusion_w: Tensor<B, 1>,
    fusion_b: Tensor<B, 1>,
    head_w: Tensor<B, 1>,
    head_b: Tensor<B, 1>,
}

impl<B: burn::tensor::backend::Backend> LmmNet<B> {
    fn base_slots(&self) -> Slots<B> {
        Slots {
            film: self.base_film.val(),
            fusion_w: self.base_fusion_w.val(),
            fusion_b: self.base_fusion_b.val(),
            head_w: self.base_head_w.val(),
            head_b: self.base_head_b.val(),
        }
    }

    /// `[N·T, C, H, W]` → `[N·T, d]`.
    fn frame_features(&self, frames: Tensor<B, 4>, film: Tensor<B, 1>) -> Tensor<B, 2> {
        let c1 = film.dims()[0] / 2;
        let log_gamma = film.clone().slice(0..c1);
        let beta = film.slice(c1..2 * c1);
        let [n, c, _, _] = frames.dims();
        let pooled = match (&self.conv1, &self.conv2, &self.feature_in) {
            (Some(conv1), Some(conv2), _) => {
                let x = conv1.forward(frames);
                let x = relu(x * log_gamma.reshape([1, c1, 1, 1]).exp() + beta.reshape([1, c1, 1, 1]));
                let x = avg_pool2d(x, [2, 2], [2, 2], [0, 0], true, false);
                let x = relu(conv2.forward(x));
                let x = avg_pool2d(x, [2, 2], [2, 2], [0, 0], true, false);
                let [n, c, h, w] = x.dims();
                x.reshape([n, c * h * w])
            }
            (_, _, Some(feature_in)) => match &self.tail {
                // FiLM on the pretrained map, then the network's last stage and head.
                Some(tail) => {
                    let x = frames * log_gamma.reshape([1, c1, 1, 1]).exp() + beta.reshape([1, c1, 1, 1]);
                    relu(feature_in.forward(tail.features(x)))
                }
                None => {
                    let x = feature_in.forward(frames.reshape([n, c]));
                    relu(x * log_gamma.reshape([1, c1]).exp() + beta.reshape([1, c1]))
                }
            },
            _ => unreachable!("Geometry::init builds the conv pair or the feature layer"),
        };
        relu(self.frame_proj.forward(pooled))
    }

    /// Frame features `[N·T, d]` → video vectors `[N, d]`.
    fn video(&self, features: Tensor<B, 2>, frames: usize) -> Tensor<B, 2> {
        let [nt, d] = features.dims();
        let n = nt / frames;
        let per_clip = features.reshape([n, frames, d]);
        let mean = per_clip.clone().mean_dim(1).reshape([n, d]);
        let first = per_clip.clone().slice([0..n, 0..1, 0..d]).reshape([n, d]);
        let last = per_clip.slice([0..n, frames - 1..frames, 0..d]).reshape([n, d]);
        relu(self.temporal.forward(Tensor::cat(vec![mean, last - first], 1)))
    }

    fn text(&self, bags: Tensor<B, 2>) -> Tensor<B, 2> {
        bags.matmul(self.text_embedding.val())
    }

    /// The fused representation the QA head reads, `[N, hidden]`.
    fn hidden(&self, v: Tensor<B, 2>, q: Tensor<B, 2>, slots: &Slots<B>) -> Tensor<B, 2> {
        let d2 = v.dims()[1] + q.dims()[1];
        let hidden = slots.fusion_b.dims()[0];
        relu(
            Tensor::cat(vec![v, q], 1).matmul(slots.fusion_w.clone().reshape([d2, hidden]))
                + slots.fusion_b.clone().reshape([1, hidden]),
        )
    }

    fn logits(&self, v: Tensor<B, 2>, q: Tensor<B, 2>, slots: &Slots<B>) -> Tensor<B, 2> {
        let hidden = slots.fusion_b.dims()[0];
        let answers = slots.head_b.dims()[0];
        self.hidden(v, q, slots).matmul(slots.head_w.clone().reshape([hidden, answers]))
            + slots.head_b.clone().reshape([1, answers])
    }

    /// The weighted objectives of `x` with `slots` installed, from one pass of the video branch:
    /// the mean QA cross-entropy (which needs `x.answers`) and the symmetric InfoNCE between video
    /// and caption projections. A zero weight skips its term, so retrieval alone needs no labels.
    fn objectives(
        &self,
        x: Inputs<B>,
        slots: &Slots<B>,
        frames: usize,
        weights: Weights,
        device: &B::Device,
    ) -> Result<Objectives<B>, ModelError> {
        let v = self.video(self.frame_features(x.frames, slots.film.clone()), frames);
        let task = match weights.task > 0.0 {
            true => {
                let targets =
                    x.answers.ok_or_else(|| ModelError::Training("the task loss needs labelled clips".into()))?;
                let logits = self.logits(v.clone(), self.text(x.questions), slots);
                Some(CrossEntropyLossConfig::new().init(device).forward(logits, targets))
            }
            false => None,
        };
        let retrieval = (weights.retrieval > 0.0)
            .then(|| info_nce(self.video_proj.forward(v), self.text_proj.forward(self.text(x.captions)), device));
        Ok(Objectives { task, retrieval, weights })
    }
}

/// Weights of the task and retrieval objectives; a zero weight skips its term.
#[derive(Debug, Clone, Copy)]
struct Weights {
    task: f64,
    retrieval: f64,
}

impl Weights {
    const TASK: Self = Self { task: 1.0, retrieval: 0.0 };
    const RETRIEVAL: Self = Self { task: 0.0, retrieval: 1.0 };
}

/// The terms [`LmmNet::objectives`] computed, each unweighted.
struct Objectives<B: burn::tensor::backend::Backend> {
    task: Option<Tensor<B, 1>>,
    retrieval: Option<Tensor<B, 1>>,
    weights: Weights,
}

impl<B: burn::tensor::backend::Backend> Objectives<B> {
    /// `task·w_task + retrieval·w_retrieval` over the terms computed.
    fn total(&self) -> Result<Tensor<B, 1>, ModelError> {
        let task = self.task.clone().map(|t| t * self.weights.task);
        let retrieval = self.retrieval.clone().map(|r| r * self.weights.retrieval);
        match (task, retrieval) {
            (Some(t), Some(r)) => Ok(t + r),
            (Some(t), None) => Ok(t),
            (None, Some(r)) => Ok(r),
            (None, None) => Err(ModelError::Training("an objective with no term".into())),
        }
    }
}

fn scalar(t: &Option<Tensor<DB, 1>>) -> Option<f64> {
    t.as_ref().map(|t| f64::from(t.clone().into_scalar()))
}

/// Hashed bag of words: lower-cased alphanumeric tokens, FNV-1a into `buckets`, mean-normalised.
pub fn bag_of_words(text: &str, buckets: usize) -> Vec<f32> {
    let mut bag = vec![0f32; buckets];
    let tokens: Vec<String> =
        text.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase).collect();
    for token in &tokens {
        let h = token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        bag[(h % buckets as u64) as usize] += 1.0 / tokens.len() as f32;
    }
    bag
}

/// Clips as tensors.
struct Inputs<B: burn::tensor::backend::Backend> {
    frames: Tensor<B, 4>,
    questions: Tensor<B, 2>,
    captions: Tensor<B, 2>,
    answers: Option<Tensor<B, 1, Int>>,
}

fn inputs<B: burn::tensor::backend::Backend>(
    geo: &Geometry,
    clips: &[Clip],
    device: &B::Device,
) -> Result<Inputs<B>, ModelError> {
    if clips.is_empty() {
        return Err(ModelError::Input("no clips".into()));
    }
    let [c, h, w] = geo.frame_shape;
    let expected = [geo.frames, c, h, w];
    let mut frames = Vec::with_capacity(clips.len() * geo.frames * c * h * w);
    for (i, clip) in clips.iter().enumerate() {
        if clip.frames.shape() != expected {
            return Err(ModelError::Input(format!(
                "clip {i} has frames {:?}, the model expects {expected:?}",
                clip.frames.shape()
            )));
        }
        frames.extend_from_slice(clip.frames.values());
    }
    let n = clips.len() * geo.frames;
    let frames = match &geo.frames_encoder {
        // Frames become their pretrained features, `[d, 1, 1]` each: the feature path follows.
        Some(encoder) => {
            let features = encoder.encode(&frames, n, [c, h, w]).map_err(ModelError::Input)?;
            let [d, fh, fw] = encoder.output_shape();
            Tensor::from_data(TensorData::new(features, [n, d, fh, fw]), device)
        }
        None => Tensor::from_data(TensorData::new(frames, [n, c, h, w]), device),
    };
    let buckets = geo.settings.text_buckets;
    let bag = |f: fn(&Clip) -> &str| -> Result<Tensor<B, 2>, ModelError> {
        let (values, width) = match &geo.text {
            Some(encoder) => {
                let texts: Vec<&str> = clips.iter().map(f).collect();
                let embedded = encoder.embed(&texts).map_err(|e| ModelError::Input(format!("text encoder: {e}")))?;
                (embedded.into_values(), encoder.dim())
            }
            None => (clips.iter().flat_map(|c| bag_of_words(f(c), buckets)).collect(), buckets),
        };
        Ok(Tensor::from_data(TensorData::new(values, [clips.len(), width]), device))
    };
    let answers = clips
        .iter()
        .map(|c| c.answer.filter(|a| *a < geo.answers).map(|a| a as i64))
        .collect::<Option<Vec<i64>>>()
        .map(|a| Tensor::from_data(TensorData::new(a, [clips.len()]), device));
    Ok(Inputs { frames, questions: bag(|c| c.question.as_str())?, captions: bag(|c| c.caption.as_str())?, answers })
}

/// Symmetric InfoNCE between a batch's `[n, r]` video and caption projections: cosine
/// similarities at temperature 0.1, each clip's caption its video's positive and the batch's
/// others its negatives (Oord et al. 2018; CLIP's symmetric form, Radford et al. 2021).
fn info_nce<B: burn::tensor::backend::Backend>(
    video: Tensor<B, 2>,
    text: Tensor<B, 2>,
    device: &B::Device,
) -> Tensor<B, 1> {
    let n = video.dims()[0];
    let ce = CrossEntropyLossConfig::new().init(device);
    let sim = l2_normalise(video).matmul(l2_normalise(text).transpose()) * 10.0;
    let diag = Tensor::<B, 1, Int>::arange(0..n as i64, device);
    (ce.forward(sim.clone(), diag.clone()) + ce.forward(sim.transpose(), diag)) * 0.5
}

fn l2_normalise<B: burn::tensor::backend::Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
    x / norm
}

/// Flat slot tensors by slot name.
type SlotMap = BTreeMap<String, Tensor<DB, 1>>;

fn slots_from_map(map: &SlotMap) -> Result<Slots<DB>, ModelError> {
    let get = |name: &str| map.get(name).cloned().ok_or_else(|| ModelError::Input(format!("slot `{name}` missing")));
    Ok(Slots {
        film: get(FILM)?,
        fusion_w: get(FUSION_W)?,
        fusion_b: get(FUSION_B)?,
        head_w: get(HEAD_W)?,
        head_b: get(HEAD_B)?,
    })
}

fn slots_to_params(schema: &SlotSchema, slots: &Slots<DB>) -> GeneratedParams {
    let flat = [
        (FILM, &slots.film),
        (FUSION_W, &slots.fusion_w),
        (FUSION_B, &slots.fusion_b),
        (HEAD_W, &slots.head_w),
        (HEAD_B, &slots.head_b),
    ];
    let tensors = flat
        .iter()
        .map(|(name, t)| {
            let host = HostTensor::from_burn((*t).clone());
            let shape = schema.get(name).map(|s| s.shape.clone()).unwrap_or_else(|| vec![host.len()]);
            let values = host.into_values();
            (name.to_string(), HostTensor::new(shape, values).expect("slot tensors are built from the schema's shapes"))
        })
        .collect();
    GeneratedParams { schema_hash: schema.hash(), tensors }
}

/// The cloud-side LMM.
#[derive(Debug)]
pub struct LmmCloud {
    geo: Geometry,
    schema: SlotSchema,
    net: LmmNet<DB>,
    device: BurnDevice,
    reference: Option<FeatureStats>,
}

impl LmmCloud {
    /// A freshly initialised model on `device` (an autodiff device to train).
    pub fn new(settings: LmmSettings, task: &TaskSpec, device: &BurnDevice) -> Result<Self, ModelError> {
        Self::with_text(settings, task, None, device)
    }

    /// A freshly initialised model whose questions and captions go through `text` (a frozen
    /// encoder) instead of the bag of words.
    pub fn with_text(
        settings: LmmSettings,
        task: &TaskSpec,
        text: Option<Arc<TextSource>>,
        device: &BurnDevice,
    ) -> Result<Self, ModelError> {
        let mut geo = Geometry::new(settings, task)?;
        geo.text = text;
        geo.frames_encoder = match &geo.settings.encoder {
            Some(e) => Some(Arc::new(
                encoder::FrameEncoder::load(e.clone(), &inference_device(device))
                    .map_err(|e| ModelError::Input(e.to_string()))?,
            )),
            None => None,
        };
        // Drawn on the CPU generator, then moved: one seed, one initial model on every backend.
        let mut net = relocate(materialise(geo.init(&init_device())), device);
        // Pretrained and frozen: pretraining trains only what follows it.
        net.tail = geo.frames_encoder.as_ref().and_then(|e| e.tail()).map(|t| relocate(t, device).no_grad());
        Ok(Self { schema: geo.schema(), net, geo, device: device.clone(), reference: None })
    }

    fn sample_batch(
        data: &dyn DataSource,
        domains: &[DomainSpec],
        batch: usize,
        rng: &mut seed::Rng,
    ) -> Result<Vec<Clip>, ModelError> {
        // A few domains per batch keep each step's gradient representative of the mixture.
        let groups = 4.min(batch).max(1);
        let mut clips = Vec::with_capacity(batch);
        for g in 0..groups {
            let domain = &domains[rng.random_range(0..domains.len())];
            let take = batch / groups + usize::from(g < batch % groups);
            clips.extend(
                data.clips(domain, Split::Train, take, rng.random())
                    .map_err(|e| ModelError::Training(e.to_string()))?,
            );
        }
        Ok(clips)
    }
}

impl LmmCloud {
    /// The device-side model on `device`, with θ0 installed.
    pub fn device_copy(&self, device: &BurnDevice) -> LmmDevice {
        let net = relocate(self.net.clone(), device);
        let base = net.base_slots();
        LmmDevice {
            geo: self.geo.clone(),
            schema: self.schema.clone(),
            current: slots_to_params(&self.schema, &base),
            net,
            device: device.clone(),
            slots: base,
            reference: self.reference_stats(),
            alignment: None,
        }
    }

    fn valid_net(&self) -> LmmNet<DB> {
        relocate(self.net.clone(), &inference_device(&self.device))
    }

    /// Host slot values as flat tensors on `device`, each checked against its slot's size.
    fn slot_tensors(&self, slots: &SlotValues, device: &BurnDevice) -> Result<SlotMap, ModelError> {
        self.schema
            .slots()
            .iter()
            .map(|spec| {
                let host =
                    slots.get(&spec.name).ok_or_else(|| ModelError::Input(format!("slot `{}` missing", spec.name)))?;
                if host.len() != spec.numel() {
                    return Err(ModelError::Input(format!(
                        "slot `{}` has {} values, its shape {:?} holds {}",
                        spec.name,
                        host.len(),
                        spec.shape,
                        spec.numel()
                    )));
                }
                let flat = TensorData::new(host.values().to_vec(), [host.len()]);
                Ok((spec.name.clone(), Tensor::from_data(flat, device)))
            })
            .collect()
    }

    /// The weighted objective of `clips` at `slots` and its gradient with respect to them, the
    /// static part frozen: one graph, so the two terms share the video branch's forward pass.
    fn vjp(&self, slots: &SlotValues, clips: &[Clip], weights: Weights) -> Result<ObjectiveGradient, ModelError> {
        // Leaves of a graph of their own: the generator's graph never reaches this model.
        let leaves: SlotMap =
            self.slot_tensors(slots, &self.device)?.into_iter().map(|(k, t)| (k, t.require_grad())).collect();
        let net = Module::<DB>::no_grad(self.net.clone());
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        let objectives = net.objectives(x, &slots_from_map(&leaves)?, self.geo.frames, weights, &self.device)?;
        let grads = objectives.total()?.backward();
        let mut gradients = BTreeMap::new();
        for spec in self.schema.slots() {
            let leaf = &leaves[&spec.name];
            let flat =
                leaf.grad(&grads).map_or_else(|| vec![0.0; spec.numel()], |g| HostTensor::from_burn(g).into_values());
            let g = HostTensor::new(spec.shape.clone(), flat).map_err(|e| ModelError::Training(e.to_string()))?;
            gradients.insert(spec.name.clone(), g);
        }
        let task = scalar(&objectives.task).unwrap_or(0.0);
        Ok(ObjectiveGradient { task, retrieval: scalar(&objectives.retrieval), gradients })
    }
}

impl CloudModel for LmmCloud {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn feature_dim(&self) -> usize {
        self.geo.settings.feature_dim
    }

    fn pretrain(
        &mut self,
        data: &dyn DataSource,
        domains: &[DomainSpec],
        plan: &TrainingPlan,
        progress: &dyn Progress,
    ) -> Result<TrainingLog, ModelError> {
        if domains.is_empty() {
            return Err(ModelError::Training("no source domains".into()));
        }
        let started = Instant::now();
        let mut rng = seed::rng(plan.seed, 1);
        let mut optim = AdamConfig::new().init::<DB, LmmNet<DB>>();
        let mut losses = Vec::with_capacity(plan.steps);
        let mut net = self.net.clone();
        progress.start("cloud: pretrain device model", plan.steps as u64);
        for step in 1..=plan.steps {
            let clips = Self::sample_batch(data, domains, plan.batch, &mut rng)?;
            let x = inputs::<DB>(&self.geo, &clips, &self.device)?;
            let weights = Weights { task: 1.0, retrieval: self.geo.settings.retrieval_weight };
            let loss = net.objectives(x, &net.base_slots(), self.geo.frames, weights, &self.device)?.total()?;
            let value = f64::from(loss.clone().into_scalar());
            if mmpg::loss_diverged(losses.first().copied().unwrap_or(value), value) {
                return Err(ModelError::Diverged { step, loss: value });
            }
            let grads = GradientsParams::from_grads::<DB, LmmNet<DB>>(loss.backward(), &net);
            net = optim.step(plan.learning_rate, net, grads);
            losses.push(value);
            progress.step(Some(format!("loss {value:.3}")));
        }
        progress.finish();
        // The last step's update can overflow after a finite loss.
        if !all_finite(&net) {
            return Err(ModelError::Diverged { step: plan.steps, loss: f64::NAN });
        }
        self.net = net;
        // Reference statistics of source features, shipped to devices.
        let per_domain = (self.geo.settings.reference_clips / domains.len()).max(1);
        let mut clips = Vec::new();
        for (i, d) in domains.iter().enumerate() {
            clips.extend(
                data.clips(d, Split::Train, per_domain, seed::derive(plan.seed, 0x0052_4546 + i as u64))
                    .map_err(|e| ModelError::Training(e.to_string()))?,
            );
        }
        self.reference = FeatureStats::of_rows(&self.frame_features(&clips)?);
        Ok(TrainingLog {
            phase: "pretrain".into(),
            losses,
            final_terms: Vec::new(),
            term_curves: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn base_params(&self) -> GeneratedParams {
        slots_to_params(&self.schema, &self.valid_net().base_slots())
    }

    fn reference_stats(&self) -> FeatureStats {
        self.reference
            .clone()
            .unwrap_or_else(|| FeatureStats { mean: vec![0.0; self.feature_dim()], std: vec![1.0; self.feature_dim()] })
    }

    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let net = self.valid_net();
        let device = inference_device(&self.device);
        let x = inputs::<DB>(&self.geo, clips, &device)?;
        Ok(HostTensor::from_burn(net.frame_features(x.frames, net.base_film.val())))
    }

    fn text_dim(&self) -> Option<usize> {
        Some(self.geo.settings.feature_dim)
    }

    fn text_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let net = self.valid_net();
        let x = inputs::<DB>(&self.geo, clips, &inference_device(&self.device))?;
        Ok(HostTensor::from_burn(net.text(x.questions)))
    }

    fn task_vjp(&self, slots: &SlotValues, clips: &[Clip]) -> Result<SlotGradient, ModelError> {
        let o = self.vjp(slots, clips, Weights::TASK)?;
        Ok(SlotGradient { loss: o.task, gradients: o.gradients })
    }

    fn retrieval_vjp(&self, slots: &SlotValues, clips: &[Clip]) -> Result<Option<SlotGradient>, ModelError> {
        let o = self.vjp(slots, clips, Weights::RETRIEVAL)?;
        Ok(o.retrieval.map(|loss| SlotGradient { loss, gradients: o.gradients }))
    }

    fn objective_vjp(
        &self,
        slots: &SlotValues,
        clips: &[Clip],
        retrieval_weight: f64,
    ) -> Result<ObjectiveGradient, ModelError> {
        self.vjp(slots, clips, Weights { task: 1.0, retrieval: retrieval_weight.max(0.0) })
    }

    fn task_loss(&self, slots: &SlotValues, clips: &[Clip]) -> Result<f64, ModelError> {
        let device = inference_device(&self.device);
        let slots = slots_from_map(&self.slot_tensors(slots, &device)?)?;
        let x = inputs::<DB>(&self.geo, clips, &device)?;
        let objectives = self.valid_net().objectives(x, &slots, self.geo.frames, Weights::TASK, &device)?;
        scalar(&objectives.task).ok_or_else(|| ModelError::Training("the task loss was not computed".into()))
    }

    fn parameter_count(&self) -> usize {
        Module::<DB>::num_params(&self.net)
    }

    fn save(&self) -> Result<Vec<u8>, ModelError> {
        let mut tensors = parameters(&self.net);
        let reference = self.reference_stats();
        let d = reference.dim();
        for (name, values) in [("reference.mean", reference.mean), ("reference.std", reference.std)] {
            let t = HostTensor::new(vec![d], values).map_err(|e| ModelError::Checkpoint(e.to_string()))?;
            tensors.insert(name.into(), t);
        }
        write_checkpoint("lmm", &self.schema, &tensors).map_err(|e| ModelError::Checkpoint(e.to_string()))
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let bad = |e: String| ModelError::Checkpoint(e);
        let mut tensors = read_checkpoint("lmm", &self.schema, bytes).map_err(|e| bad(e.to_string()))?;
        let d = self.feature_dim();
        let mut take = |name: &str| -> Result<Vec<f32>, ModelError> {
            let t = tensors.remove(name).ok_or_else(|| bad(format!("`{name}` is missing")))?;
            if t.shape() != [d] || !t.is_finite() {
                return Err(bad(format!("`{name}` must be {d} finite values")));
            }
            Ok(t.into_values())
        };
        let reference = FeatureStats { mean: take("reference.mean")?, std: take("reference.std")? };
        if reference.std.iter().any(|s| *s <= 0.0) {
            return Err(bad("`reference.std` must be positive".into()));
        }
        self.net = restore(self.net.clone(), &tensors, &self.device).map_err(|e| bad(e.to_string()))?;
        self.reference = Some(reference);
        Ok(())
    }

    fn export(&self, device: &DeviceDescriptor) -> Result<Box<dyn DeviceModel>, ModelError> {
        Ok(Box::new(self.device_copy(&mmpg_backends::device(&device.inference())?)))
    }
}

/// The LMM as a device serves it.
#[derive(Debug)]
pub struct LmmDevice {
    geo: Geometry,
    schema: SlotSchema,
    net: LmmNet<DB>,
    device: BurnDevice,
    slots: Slots<DB>,
    current: GeneratedParams,
    /// Source statistics of frame features, the target of statistics recalibration.
    reference: FeatureStats,
    /// Per-dimension `(scale, shift)` of served frame features, once recalibrated.
    alignment: Option<(Tensor<DB, 1>, Tensor<DB, 1>)>,
}

impl LmmDevice {
    /// Frame features as served: with the installed FiLM slot and any recalibration.
    fn served_features(&self, frames: Tensor<DB, 4>) -> Tensor<DB, 2> {
        let features = self.net.frame_features(frames, self.slots.film.clone());
        match &self.alignment {
            Some((scale, shift)) => {
                let d = scale.dims()[0];
                features * scale.clone().reshape([1, d]) + shift.clone().reshape([1, d])
            }
            None => features,
        }
    }

    /// Whether the installed FiLM slot holds θ0's values.
    fn film_is_base(&self) -> bool {
        let base = HostTensor::from_burn(self.net.base_film.val());
        self.current.tensors.get(FILM).is_some_and(|installed| installed.values() == base.values())
    }

    fn video_and_question(&self, x: Inputs<DB>) -> (Tensor<DB, 2>, Tensor<DB, 2>) {
        (self.net.video(self.served_features(x.frames), self.geo.frames), self.net.text(x.questions))
    }
}

impl DeviceModel for LmmDevice {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn name(&self) -> &str {
        "lmm"
    }

    fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let (v, q) = self.video_and_question(inputs::<DB>(&self.geo, clips, &self.device)?);
        Ok(HostTensor::from_burn(self.net.logits(v, q, &self.slots)))
    }

    fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        Ok(HostTensor::from_burn(self.net.frame_features(x.frames, self.net.base_film.val())))
    }

    fn text_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        Ok(HostTensor::from_burn(self.net.text(x.questions)))
    }

    fn serve(&self, clips: &[Clip]) -> Result<Served, ModelError> {
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        let base = self.net.frame_features(x.frames.clone(), self.net.base_film.val());
        // θ0's FiLM installed and no recalibration: the served features are the base ones, one
        // pass. Otherwise the frame branch runs again under the installed FiLM.
        let served = match self.alignment.is_none() && self.film_is_base() {
            true => base.clone(),
            false => self.served_features(x.frames),
        };
        let q = self.net.text(x.questions);
        let logits = self.net.logits(self.net.video(served, self.geo.frames), q.clone(), &self.slots);
        Ok(Served {
            logits: HostTensor::from_burn(logits),
            frame_features: HostTensor::from_burn(base),
            text_features: Some(HostTensor::from_burn(q)),
        })
    }

    fn retrieval_embeddings(&self, clips: &[Clip]) -> Result<RetrievalEmbeddings, ModelError> {
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        let v = self.net.video(self.served_features(x.frames), self.geo.frames);
        Ok(RetrievalEmbeddings {
            video: HostTensor::from_burn(l2_normalise(self.net.video_proj.forward(v))),
            text: HostTensor::from_burn(l2_normalise(self.net.text_proj.forward(self.net.text(x.captions)))),
        })
    }

    fn current_params(&self) -> GeneratedParams {
        self.current.clone()
    }

    fn as_fine_tunable(&self) -> Option<&dyn FineTunable> {
        Some(self)
    }

    fn as_recalibration(&mut self) -> Option<&mut dyn StatisticsRecalibration> {
        Some(self)
    }

    fn as_linear_head(&self) -> Option<&dyn LinearQaHead> {
        Some(self)
    }

    fn as_entropy_minimisation(&self) -> Option<&dyn EntropyMinimisation> {
        Some(self)
    }

    fn as_feature_alignment(&mut self) -> Option<&mut dyn FeatureAlignment> {
        Some(self)
    }

    fn install(&mut self, params: &ValidatedParams) -> Result<(), ModelError> {
        // Build every tensor first; only then replace, so a failure changes nothing.
        let mut built = BTreeMap::new();
        for spec in self.schema.slots() {
            let host =
                params.slot(&spec.name).ok_or_else(|| ModelError::Input(format!("slot `{}` missing", spec.name)))?;
            // Slots run flat through the forward pass, which reshapes them.
            let flat = TensorData::new(host.values().to_vec(), [host.len()]);
            built.insert(spec.name.clone(), Tensor::<DB, 1>::from_data(flat, &self.device));
        }
        self.slots = slots_from_map(&built)?;
        self.current = params.params().clone();
        Ok(())
    }
}

impl FineTunable for LmmDevice {
    fn fine_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError> {
        Ok(Box::new(LmmTuner::new(self, scope, learning_rate, TuneObjective::CrossEntropy)?))
    }
}

impl EntropyMinimisation for LmmDevice {
    fn entropy_tuner(&self, scope: TuneScope, learning_rate: f64) -> Result<Box<dyn FineTuner>, ModelError> {
        Ok(Box::new(LmmTuner::new(self, scope, learning_rate, TuneObjective::Entropy)?))
    }
}

impl FeatureAlignment for LmmDevice {
    fn activations(&self, clips: &[Clip]) -> Result<Activations, ModelError> {
        let x = inputs::<DB>(&self.geo, clips, &self.device)?;
        let features = self.served_features(x.frames);
        let v = self.net.video(features.clone(), self.geo.frames);
        let logits = self.net.logits(v, self.net.text(x.questions), &self.slots);
        Ok(Activations { features: HostTensor::from_burn(features), logits: HostTensor::from_burn(logits) })
    }

    fn source_statistics(&self) -> Result<FeatureStats, ModelError> {
        Ok(self.reference.clone())
    }

    fn set_feature_alignment(&mut self, alignment: Option<(Vec<f32>, Vec<f32>)>) -> Result<usize, ModelError> {
        let Some((scale, shift)) = alignment else {
            self.alignment = None;
            return Ok(0);
        };
        let d = self.geo.settings.feature_dim;
        if scale.len() != d || shift.len() != d {
            return Err(ModelError::Input(format!(
                "an alignment needs {d} scales and {d} shifts, found {} and {}",
                scale.len(),
                shift.len()
            )));
        }
        if scale.iter().chain(&shift).any(|v| !v.is_finite()) {
            return Err(ModelError::Input("an alignment's values must be finite".into()));
        }
        let tensor = |v: Vec<f32>| Tensor::<DB, 1>::from_data(TensorData::new(v, [d]), &self.device);
        self.alignment = Some((tensor(scale), tensor(shift)));
        Ok(2 * d)
    }
}

impl StatisticsRecalibration for LmmDevice {
    fn recalibrate_statistics(&mut self, unlabelled: &[Clip]) -> Result<usize, ModelError> {
        let x = inputs::<DB>(&self.geo, unlabelled, &self.device)?;
        let features = HostTensor::from_burn(self.net.frame_features(x.frames, self.slots.film.clone()));
        let target = FeatureStats::of_rows(&features)
            .ok_or_else(|| ModelError::Input("recalibration needs at least one frame".into()))?;
        // Map the device's feature moments onto the source's, dimension by dimension; a
        // dimension (almost) constant on the device keeps its scale and is only re-centred.
        let (mut scale, mut shift) = (Vec::new(), Vec::new());
        for j in 0..target.dim() {
            let s = if target.std[j] > 1e-4 { self.reference.std[j] / target.std[j] } else { 1.0 };
            scale.push(s);
            shift.push(self.reference.mean[j] - target.mean[j] * s);
        }
        self.set_feature_alignment(Some((scale, shift)))
    }
}

impl LinearQaHead for LmmDevice {
    fn qa_head(&self) -> LinearHead {
        LinearHead { weight_slot: HEAD_W.into(), bias_slot: HEAD_B.into() }
    }

    fn qa_representations(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
        let (v, q) = self.video_and_question(inputs::<DB>(&self.geo, clips, &self.device)?);
        Ok(HostTensor::from_burn(self.net.hidden(v, q, &self.slots)))
    }
}

/// What an [`LmmTuner`] step descends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TuneObjective {
    /// The QA cross-entropy of labelled clips (FTA).
    CrossEntropy,
    /// The mean entropy of the answers to unlabelled clips (TENT).
    Entropy,
}

/// On-device training of an [`LmmDevice`]: Adam on the QA loss, or on the answers' entropy. The
/// slot values train as the network's base parameters; what `scope` excludes is frozen (no
/// gradient, never updated).
struct LmmTuner {
    geo: Geometry,
    schema: SlotSchema,
    /// The device model's network, kept for the parts a snapshot must not change.
    original: LmmNet<DB>,
    /// The network under training, on the autodiff device, θ0 replaced by the installed slots.
    net: LmmNet<DB>,
    optim: burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, LmmNet<DB>, DB>,
    learning_rate: f64,
    objective: TuneObjective,
    trainable: usize,
    device: BurnDevice,
    train_device: BurnDevice,
    reference: FeatureStats,
    alignment: Option<(Tensor<DB, 1>, Tensor<DB, 1>)>,
}

impl std::fmt::Debug for LmmTuner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmmTuner").field("trainable", &self.trainable).finish_non_exhaustive()
    }
}

impl LmmTuner {
    fn new(
        device_model: &LmmDevice,
        scope: TuneScope,
        learning_rate: f64,
        objective: TuneObjective,
    ) -> Result<Self, ModelError> {
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(ModelError::Training(format!("learning rate must be positive, found {learning_rate}")));
        }
        let train_device = BurnDevice::autodiff(inference_device(&device_model.device));
        let mut net = relocate(device_model.net.clone(), &train_device);
        let param = |t: &Tensor<DB, 1>| Param::from_tensor(relocate_tensor(t, &train_device)).set_require_grad(true);
        let slots = &device_model.slots;
        net.base_film = param(&slots.film);
        net.base_fusion_w = param(&slots.fusion_w);
        net.base_fusion_b = param(&slots.fusion_b);
        net.base_head_w = param(&slots.head_w);
        net.base_head_b = param(&slots.head_b);
        // QA labels never reach the retrieval projections: they stay frozen in every scope.
        net.video_proj = net.video_proj.no_grad();
        net.text_proj = net.text_proj.no_grad();
        if scope == TuneScope::Affine {
            // FiLM's per-channel scale and shift only.
            net.base_fusion_w = net.base_fusion_w.set_require_grad(false);
            net.base_fusion_b = net.base_fusion_b.set_require_grad(false);
            net.base_head_w = net.base_head_w.set_require_grad(false);
            net.base_head_b = net.base_head_b.set_require_grad(false);
        }
        if scope != TuneScope::All {
            net.tail = net.tail.map(Module::no_grad);
            net.conv1 = net.conv1.no_grad();
            net.conv2 = net.conv2.no_grad();
            net.feature_in = net.feature_in.no_grad();
            net.frame_proj = net.frame_proj.no_grad();
            net.temporal = net.temporal.no_grad();
            net.text_embedding = net.text_embedding.set_require_grad(false);
        }
        let trainable = match scope {
            TuneScope::Slots => device_model.schema.numel(),
            TuneScope::Affine => device_model.schema.get(FILM).map_or(0, SlotSpec::numel),
            TuneScope::All => {
                Module::<DB>::num_params(&net)
                    - Module::<DB>::num_params(&net.video_proj)
                    - Module::<DB>::num_params(&net.text_proj)
            }
        };
        Ok(Self {
            geo: device_model.geo.clone(),
            schema: device_model.schema.clone(),
            original: device_model.net.clone(),
            net,
            optim: AdamConfig::new().init::<DB, LmmNet<DB>>(),
            learning_rate,
            objective,
            trainable,
            device: device_model.device.clone(),
            train_device,
            reference: device_model.reference.clone(),
            alignment: device_model.alignment.clone(),
        })
    }
}

/// `tensor`'s values on `device` (Dispatch cannot move tensors between autodiff and plain devices).
fn relocate_tensor(tensor: &Tensor<DB, 1>, device: &BurnDevice) -> Tensor<DB, 1> {
    Tensor::from_data(tensor.to_data(), device)
}

impl FineTuner for LmmTuner {
    fn trainable_parameters(&self) -> usize {
        self.trainable
    }

    fn step(&mut self, batch: &[Clip]) -> Result<f64, ModelError> {
        let x = inputs::<DB>(&self.geo, batch, &self.train_device)?;
        let targets = match self.objective {
            TuneObjective::CrossEntropy => {
                Some(x.answers.ok_or_else(|| ModelError::Training("fine-tuning needs labelled clips".into()))?)
            }
            TuneObjective::Entropy => None,
        };
        let net = &self.net;
        let mut features = net.frame_features(x.frames, net.base_film.val());
        if let Some((scale, shift)) = &self.alignment {
            let d = scale.dims()[0];
            features = features * relocate_tensor(scale, &self.train_device).reshape([1, d])
                + relocate_tensor(shift, &self.train_device).reshape([1, d]);
        }
        let v = net.video(features, self.geo.frames);
        let logits = net.logits(v, net.text(x.questions), &net.base_slots());
        let loss = match targets {
            Some(targets) => CrossEntropyLossConfig::new().init(&self.train_device).forward(logits, targets),
            // Mean Shannon entropy of the answer distributions, in nats.
            None => {
                let log_p = log_softmax(logits, 1);
                (log_p.clone().exp() * log_p).sum_dim(1).mean().neg()
            }
        };
        let value = f64::from(loss.clone().into_scalar());
        if !value.is_finite() {
            return Err(ModelError::Training(format!("loss became {value}")));
        }
        let grads = GradientsParams::from_grads::<DB, LmmNet<DB>>(loss.backward(), &self.net);
        self.net = self.optim.step(self.learning_rate, self.net.clone(), grads);
        Ok(value)
    }

    fn snapshot(&self) -> Result<Box<dyn DeviceModel>, ModelError> {
        Ok(Box::new(self.snapshot_device()))
    }
}

impl LmmTuner {
    fn snapshot_device(&self) -> LmmDevice {
        let mut net = relocate(self.net.clone(), &self.device);
        let slots = net.base_slots();
        // θ0 stays the exported one: summaries keep describing the data, not the fine-tuning.
        net.base_film = self.original.base_film.clone();
        net.base_fusion_w = self.original.base_fusion_w.clone();
        net.base_fusion_b = self.original.base_fusion_b.clone();
        net.base_head_w = self.original.base_head_w.clone();
        net.base_head_b = self.original.base_head_b.clone();
        LmmDevice {
            geo: self.geo.clone(),
            schema: self.schema.clone(),
            current: slots_to_params(&self.schema, &slots),
            slots,
            net,
            device: self.device.clone(),
            reference: self.reference.clone(),
            alignment: self.alignment.clone(),
        }
    }
}

fn build(settings: &toml::Table, ctx: &ModelContext) -> Result<Box<dyn CloudModel>, PluginError> {
    let settings: LmmSettings = parse_settings(settings)?;
    let device = mmpg_backends::device(&ctx.base.device)?;
    let model = mmpg_backends::with_burn_seed(ctx.base.seed, || {
        LmmCloud::with_text(settings, &ctx.task, ctx.text.clone(), &device)
    })
    .map_err(|e| PluginError::Build(e.to_string()))?;
    Ok(Box::new(model))
}

/// The `lmm` factory: linked statically through inventory, and exported as a plugin
/// library by `plugins/lmm/cdylib`.
pub const LMM: Factory<dyn CloudModel, ModelContext> = Factory {
    name: "lmm",
    summary: "lightweight multi-modal model: conv frame encoder + temporal pooling + text bag, fusion and QA head as dynamic slots",
    settings: SettingsSpec::of::<LmmSettings>(),
    build: Build::Static(build),
};

inventory::submit! { StaticPlugin(Plugin::Model(LMM)) }

#[cfg(test)]
mod tests {
    use super::*;
    use mmpg_backends::modules::init_device;

    fn task() -> TaskSpec {
        TaskSpec { answers: (0..5).map(|i| format!("a{i}")).collect(), frames_per_clip: 2, frame_shape: [3, 8, 8] }
    }

    fn clips(n: usize, seed: u64) -> Vec<Clip> {
        let mut rng = seed::rng(seed, 0);
        (0..n)
            .map(|i| Clip {
                frames: HostTensor::new(vec![2, 3, 8, 8], (0..384).map(|_| rng.random::<f32>()).collect())
                    .expect("shape"),
                question: format!("what is shown {}", i % 3),
                caption: format!("caption {}", i % 4),
                answer: Some(i % 5),
                provenance: Vec::new(),
            })
            .collect()
    }

    fn small() -> LmmSettings {
        LmmSettings {
            conv1_channels: 4,
            conv2_channels: 4,
            feature_dim: 8,
            hidden: 8,
            text_buckets: 16,
            ..Default::default()
        }
    }

    /// Every parameter of the device's network and its installed slots, by name.
    /// Every parameter's values by name (slots prefixed `slot:`).
    type State = BTreeMap<String, Vec<f32>>;

    fn state(device: &LmmDevice) -> State {
        let mut out: BTreeMap<String, Vec<f32>> =
            parameters(&device.net).into_iter().map(|(k, v)| (k, v.into_values())).collect();
        for (name, t) in &device.current_params().tensors {
            out.insert(format!("slot:{name}"), t.values().to_vec());
        }
        out
    }

    fn tune(scope: TuneScope) -> (State, State, usize, usize) {
        tune_on(scope, TuneObjective::CrossEntropy).0
    }

    /// Three steps of `objective` over `scope`; with the step values.
    fn tune_on(scope: TuneScope, objective: TuneObjective) -> ((State, State, usize, usize), Vec<f64>) {
        let cloud =
            mmpg_backends::with_burn_seed(3, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
        let device = cloud.device_copy(&mmpg_backends::modules::inference_device(&init_device()));
        let mut tuner = LmmTuner::new(&device, scope, 1e-2, objective).expect("a positive learning rate");
        let batch = match objective {
            TuneObjective::CrossEntropy => clips(6, 1),
            TuneObjective::Entropy => clips(6, 1).iter().map(Clip::unlabelled).collect(),
        };
        let values: Vec<f64> = (0..3).map(|_| tuner.step(&batch).expect("step")).collect();
        let total = Module::<DB>::num_params(&device.net);
        ((state(&device), state(&tuner.snapshot_device()), tuner.trainable_parameters(), total), values)
    }

    #[test]
    fn entropy_minimisation_on_the_affine_scope_trains_film_alone_and_lowers_entropy() {
        let ((before, after, trainable, _), entropies) = tune_on(TuneScope::Affine, TuneObjective::Entropy);
        assert_eq!(changed(&before, &after), vec![format!("slot:{FILM}")]);
        assert_eq!(trainable, 2 * small().conv1_channels);
        assert!(entropies.iter().all(|e| e.is_finite() && *e >= 0.0), "{entropies:?}");
        assert!(entropies[2] < entropies[0], "entropy did not fall: {entropies:?}");
    }

    #[test]
    fn a_feature_alignment_shifts_served_features_and_refuses_bad_lengths() {
        let cloud =
            mmpg_backends::with_burn_seed(4, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
        let mut device = cloud.device_copy(&mmpg_backends::modules::inference_device(&init_device()));
        let batch = clips(3, 2);
        let before = device.activations(&batch).expect("activations");
        assert_eq!(before.features.shape(), &[6, 8]);
        assert_eq!(before.logits, device.answer_logits(&batch).expect("logits"));
        assert_eq!(device.source_statistics().expect("statistics").dim(), 8);
        assert_eq!(device.set_feature_alignment(Some((vec![1.0; 8], vec![0.5; 8]))).expect("set"), 16);
        let shifted = device.activations(&batch).expect("activations");
        for (a, b) in shifted.features.values().iter().zip(before.features.values()) {
            assert!((a - b - 0.5).abs() < 1e-5);
        }
        assert!(device.set_feature_alignment(Some((vec![1.0; 7], vec![0.0; 8]))).is_err());
        assert!(device.set_feature_alignment(Some((vec![f32::NAN; 8], vec![0.0; 8]))).is_err());
        // A refused alignment leaves the previous one.
        assert_eq!(device.activations(&batch).expect("activations"), shifted);
        device.set_feature_alignment(None).expect("removed");
        assert_eq!(device.activations(&batch).expect("activations"), before);
    }

    fn changed(before: &State, after: &State) -> Vec<String> {
        before.iter().filter(|(k, v)| after.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn slot_fine_tuning_changes_only_the_slots() {
        let (before, after, trainable, _) = tune(TuneScope::Slots);
        let changed = changed(&before, &after);
        assert!(!changed.is_empty());
        assert!(changed.iter().all(|k| k.starts_with("slot:")), "changed outside the slots: {changed:?}");
        let schema = LmmCloud::new(small(), &task(), &init_device()).expect("model").schema().clone();
        assert_eq!(trainable, schema.numel());
    }

    #[test]
    fn full_fine_tuning_changes_the_qa_path_and_not_the_retrieval_projections() {
        let (before, after, trainable, total) = tune(TuneScope::All);
        let changed = changed(&before, &after);
        for part in ["conv1.weight", "conv2.weight", "frame_proj.weight", "temporal.weight", "text_embedding"] {
            assert!(changed.iter().any(|k| k == part), "`{part}` did not train: {changed:?}");
        }
        assert!(changed.iter().all(|k| !k.starts_with("video_proj") && !k.starts_with("text_proj")));
        // θ0 stays as exported: summaries keep describing the data.
        assert!(changed.iter().all(|k| !k.starts_with("base_")), "{changed:?}");
        assert!(trainable < total && trainable > total / 2, "{trainable} of {total}");
    }

    #[test]
    fn pre_extracted_features_run_through_a_film_modulated_linear_encoder() {
        let features_task = TaskSpec { frame_shape: [12, 1, 1], ..task() };
        let cloud =
            mmpg_backends::with_burn_seed(5, || LmmCloud::new(small(), &features_task, &init_device())).expect("model");
        let device = cloud.device_copy(&mmpg_backends::modules::inference_device(&init_device()));
        let mut rng = seed::rng(6, 0);
        let clips: Vec<Clip> = (0..4)
            .map(|i| Clip {
                frames: HostTensor::new(vec![2, 12, 1, 1], (0..24).map(|_| rng.random::<f32>()).collect())
                    .expect("shape"),
                question: "what happens".into(),
                caption: format!("caption {i}"),
                answer: Some(i % 5),
                provenance: Vec::new(),
            })
            .collect();
        assert_eq!(device.answer_logits(&clips).expect("forward").shape(), &[4, 5]);
        assert_eq!(device.frame_features(&clips).expect("features").shape(), &[8, 8]);
        let mut tuner = device.fine_tuner(TuneScope::Slots, 1e-2).expect("tuner");
        assert!(tuner.step(&clips).expect("step").is_finite());
        // Image frames of another shape are refused, not misread.
        assert!(device.answer_logits(&super::tests::clips(1, 0)).is_err());
        let bad = TaskSpec { frame_shape: [3, 2, 2], ..task() };
        assert!(LmmCloud::new(small(), &bad, &init_device()).is_err());
    }

    #[test]
    fn recalibration_matches_the_reference_moments_on_the_window() {
        let cloud =
            mmpg_backends::with_burn_seed(4, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
        let mut device = cloud.device_copy(&mmpg_backends::modules::inference_device(&init_device()));
        let window = clips(8, 2);
        assert_eq!(device.recalibrate_statistics(&window).expect("recalibrate"), 16);
        let x = inputs::<DB>(&device.geo, &window, &device.device).expect("inputs");
        let served = FeatureStats::of_rows(&HostTensor::from_burn(device.served_features(x.frames))).expect("stats");
        for j in 0..served.dim() {
            assert!((served.mean[j] - device.reference.mean[j]).abs() < 1e-3, "mean {j}");
        }
    }

    /// A loss and its gradient at some slot values.
    type Objective<'a> = dyn Fn(&SlotValues) -> SlotGradient + 'a;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

        /// The vector-Jacobian products (task and retrieval) are their losses' derivatives: along
        /// a random direction v, ⟨∂L/∂θ, v⟩ matches the central difference
        /// (L(θ + εv) − L(θ − εv)) / 2ε wherever the loss is smooth around θ, and the task loss
        /// it reports is the forward-only `task_loss`.
        #[test]
        fn task_vjp_matches_central_differences(seed in 0u64..1000) {
            let cloud = mmpg_backends::with_burn_seed(seed, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
            let batch = clips(6, seed);
            let theta: SlotValues = cloud.base_params().tensors;
            let mut rng = seed::rng(seed, 1);
            let direction: SlotValues = theta
                .iter()
                .map(|(k, t)| {
                    let v = (0..t.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    (k.clone(), HostTensor::new(t.shape().to_vec(), v).expect("shape"))
                })
                .collect();
            let moved = |eps: f32| -> SlotValues {
                theta
                    .iter()
                    .map(|(k, t)| {
                        let v = t.values().iter().zip(direction[k].values()).map(|(a, d)| a + eps * d).collect();
                        (k.clone(), HostTensor::new(t.shape().to_vec(), v).expect("shape"))
                    })
                    .collect()
            };
            let forward = cloud.task_loss(&theta, &batch).expect("loss");
            let task = |s: &SlotValues| cloud.task_vjp(s, &batch).expect("vjp");
            let retrieval =
                |s: &SlotValues| cloud.retrieval_vjp(s, &batch).expect("vjp").expect("the lmm has a retrieval space");
            let objectives: [(&str, &Objective<'_>); 2] = [("task", &task), ("retrieval", &retrieval)];
            for (name, vjp_of) in objectives {
                let vjp = vjp_of(&theta);
                if name == "task" {
                    proptest::prop_assert!((vjp.loss - forward).abs() < 1e-5, "{} vs {}", vjp.loss, forward);
                } else {
                    // Only the FiLM slot reaches the video embedding; fusion and head do not.
                    let silent = vjp.gradients.iter().filter(|(k, _)| k.as_str() != FILM);
                    proptest::prop_assert!(silent.clone().all(|(_, g)| g.values().iter().all(|v| *v == 0.0)));
                }
                let analytic: f64 = vjp
                    .gradients
                    .iter()
                    .map(|(k, g)| g.values().iter().zip(direction[k].values()).map(|(a, b)| f64::from(a * b)).sum::<f64>())
                    .sum();
                let numeric = |eps: f32| (vjp_of(&moved(eps)).loss - vjp_of(&moved(-eps)).loss) / (2.0 * f64::from(eps));
                let (wide, narrow) = (numeric(4e-4), numeric(2e-4));
                // ReLU and max pooling have kinks: where one lies within a step of θ, the two central
                // differences disagree and no derivative exists there to check.
                proptest::prop_assume!((wide - narrow).abs() <= 1e-3 + 0.02 * narrow.abs());
                let numeric = narrow;
                proptest::prop_assert!(
                    (analytic - numeric).abs() <= 3e-3 + 0.05 * numeric.abs(),
                    "{name}: analytic {analytic} vs numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn serving_returns_the_answers_and_the_base_features_whatever_film_is_installed() {
        let cloud =
            mmpg_backends::with_burn_seed(2, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
        let mut device = cloud.device_copy(&mmpg_backends::modules::inference_device(&init_device()));
        let batch = clips(3, 4);
        let close = |a: &HostTensor, b: &HostTensor| {
            a.shape() == b.shape() && a.values().iter().zip(b.values()).all(|(x, y)| (x - y).abs() <= 1e-5)
        };
        let base_features = device.frame_features(&batch).expect("features");
        for film_shift in [0.0f32, 0.3] {
            let mut params = device.current_params();
            if let Some(film) = params.tensors.get_mut(FILM) {
                let shifted = film.values().iter().map(|v| v + film_shift).collect();
                *film = HostTensor::new(film.shape().to_vec(), shifted).expect("shape");
            }
            device.apply(params).expect("installs");
            assert_eq!(device.film_is_base(), film_shift == 0.0);
            let served = device.serve(&batch).expect("served");
            assert!(close(&served.logits, &device.answer_logits(&batch).expect("logits")), "film + {film_shift}");
            assert!(close(&served.frame_features, &base_features), "film + {film_shift}");
            let text = served.text_features.expect("the lmm embeds questions");
            assert!(close(&text, &device.text_features(&batch).expect("text")));
        }
    }

    #[test]
    fn task_vjp_refuses_missing_and_mis_sized_slots() {
        let cloud =
            mmpg_backends::with_burn_seed(1, || LmmCloud::new(small(), &task(), &init_device())).expect("model");
        let batch = clips(2, 1);
        let mut theta: SlotValues = cloud.base_params().tensors;
        theta.insert(HEAD_B.into(), HostTensor::new(vec![2], vec![0.0, 0.0]).expect("shape"));
        let err = cloud.task_vjp(&theta, &batch).expect_err("mis-sized");
        assert!(err.to_string().contains("slot `qa_head.bias` has 2 values"), "{err}");
        theta.remove(HEAD_B);
        let err = cloud.task_vjp(&theta, &batch).expect_err("missing");
        assert_eq!(err.to_string(), "bad input: slot `qa_head.bias` missing");
    }
}
