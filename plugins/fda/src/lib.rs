//! `fda`: the Fast Domain Adaptor. A variational parameter generator:
//! set encoder over the anchors (DeepSets, permutation-invariant) with the window moments →
//! μ_z, log σ²_z → z (μ_z when serving) → per-slot decoder θ = θ0 + b·tanh(W (z − z_ref)), bounded
//! (`+ c` and z alone with `zero_at_reference = false`).
//! A reconstruction head predicts the window's standardised statistics from z.
//! Loss = task loss with the generated slots + γ·retrieval (the model's InfoNCE, when it has a
//! video–text space) + β·KL(q(z|anchors) ‖ N(0, I)) + λ·reconstruction + η·mean (Δ/b)² on
//! episodes whose frames are in distribution (unshifted source domains, any class mix).
//!
//! Staying at θ0 where nothing shifted (on by default): Δ is decoded relative to the reference
//! latent, `raw(z) − raw(z_ref)`, `z_ref` the mean latent of windows from the first source
//! domain (the reference: the pretraining one under `pretrain_on = "clean"`), so a window whose
//! latent is z_ref gets θ0 exactly and windows of that domain a change near 0; and at least a
//! quarter of the episodes have in-distribution frames, where the η term asks for no change.
//!
//! Reset (optional, `reset = true`): after training, the cloud fits a logistic gate on how far
//! a window's moments are from the reference (two numbers every summary already carries),
//! labelled by whether the generated slots beat θ0 on labelled source clips. Serving, a window
//! the gate judges in-distribution gets θ0 back — adaptation never drifts on clean streams.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{relu, tanh};
use burn::tensor::{Tensor, TensorData};
use mmpg::privacy::{NoiseSource, SummaryPrivacy};
use mmpg::seed;
use mmpg::{
    AnchorSummary, Build, Check, Factory, GeneratedParams, GeneratorContext, GeneratorError, GeneratorTraining,
    HostTensor, ParameterGenerator, Plugin, PluginError, Settings, SettingsSpec, SlotSchema, SlotValues, Split,
    StaticPlugin, TrainingLog, parse_settings,
};
use mmpg_backends::modules::{
    CheckpointError, all_finite, inference_device, init_device, materialise, parameters, read_checkpoint, relocate,
    restore, write_checkpoint,
};
use mmpg_backends::{Backend, BurnDevice, HostTensorBurn as _};
use rand::Rng as _;
use rand_distr_free::standard_normal;
use serde::{Deserialize, Serialize};

/// The backend every tensor here lives on.
type DB = Backend;

/// Settings of the `fda` generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FdaSettings {
    /// Latent dimension of z.
    pub latent: usize,
    /// Width of the set encoder.
    pub hidden: usize,
    /// Default bound b of every slot's change: |θ − θ0| ≤ b.
    pub delta_bound: f64,
    /// Per-slot bounds overriding `delta_bound`, by slot name.
    pub slot_bounds: BTreeMap<String, f64>,
    /// β: weight of the KL term (0 disables it).
    pub beta: f64,
    /// λ: weight of the reconstruction term (0 disables it).
    pub lambda: f64,
    /// γ: weight of the retrieval term, the model's InfoNCE between the video and caption
    /// projections of the episode's labelled batch through the slots that reach them (0 disables
    /// it; a model without a retrieval space has none).
    pub retrieval: f64,
    /// Source domains (episodes) per training step.
    pub episodes_per_step: usize,
    /// Share of episodes drawn from unshifted source domains: in-distribution windows teach the
    /// generator to leave θ0 alone (0: every source domain equally likely).
    pub clean_fraction: f64,
    /// η: weight of `mean (Δ/b)²` on episodes from unshifted source domains — in-distribution
    /// frames, whatever their class mix, teach the generator to send θ0 (0 disables it).
    pub stay: f64,
    /// How the decoder forms Δ(z): `basis` (Δ = W z + c, a learned basis per slot) or
    /// `low-rank` (matrix slots get Δ = U(z) V(z)ᵀ of rank `rank`; far fewer cloud parameters).
    pub delta: DeltaForm,
    /// Rank of `low-rank` changes.
    pub rank: usize,
    /// Decode changes relative to the reference: `raw(z) − raw(z_ref)`, `z_ref` the latent of
    /// windows from the reference domain (the pretraining one), so a window like those gets θ0
    /// exactly and the change grows with the window's distance from them.
    pub zero_at_reference: bool,
    /// Fit the reset gate after training: windows it judges in-distribution get θ0.
    pub reset: bool,
    /// Episodes that label the reset gate (half from unshifted source domains when there are any).
    pub reset_episodes: usize,
}

/// The form of the decoded change of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaForm {
    /// Δ = W z + c.
    Basis,
    /// Δ = U(z) V(z)ᵀ for matrix slots (vectors keep the basis form).
    LowRank,
}

impl Default for FdaSettings {
    fn default() -> Self {
        Self {
            latent: 16,
            hidden: 64,
            delta_bound: 0.5,
            slot_bounds: BTreeMap::from([("frame_film".to_string(), 2.0)]),
            beta: 0.01,
            lambda: 0.1,
            retrieval: 0.5,
            episodes_per_step: 4,
            clean_fraction: 0.25,
            stay: 1.0,
            delta: DeltaForm::Basis,
            rank: 4,
            zero_at_reference: true,
            reset: false,
            reset_episodes: 128,
        }
    }
}

impl Settings for FdaSettings {
    fn check(&self, check: &mut Check) {
        // Each slot's basis holds latent × slot values: the latent stays small.
        check.within("latent", self.latent, 1..=256);
        check.within("hidden", self.hidden, 1..=1024);
        check.positive("delta_bound", self.delta_bound, 100.0);
        for (slot, bound) in &self.slot_bounds {
            check.positive(&format!("slot_bounds.{slot}"), *bound, 100.0);
        }
        check.real("beta", self.beta, 0.0..=1000.0);
        check.real("lambda", self.lambda, 0.0..=1000.0);
        check.real("retrieval", self.retrieval, 0.0..=1000.0);
        check.within("episodes_per_step", self.episodes_per_step, 1..=256);
        check.real("clean_fraction", self.clean_fraction, 0.0..=1.0);
        check.real("stay", self.stay, 0.0..=1000.0);
        check.within("rank", self.rank, 1..=256);
        check.within("reset_episodes", self.reset_episodes, 2..=100_000);
    }
}

/// The generator network.
#[derive(Module, Debug)]
pub struct FdaNet<B: burn::tensor::backend::Backend> {
    phi1: Linear<B>,
    phi2: Linear<B>,
    /// The text-side set encoder, when the model embeds questions.
    text_phi1: Option<Linear<B>>,
    text_phi2: Option<Linear<B>>,
    rho: Linear<B>,
    mu: Linear<B>,
    logvar: Linear<B>,
    /// Per slot: z → Δ (basis form) or z → U (low-rank form).
    decoders: Vec<Linear<B>>,
    /// Per low-rank slot, in slot order: z → V.
    factors: Vec<Linear<B>>,
    recon: Linear<B>,
    /// The reset gate: shift features → logit that Δ(z) beats θ0 (`reset = true` only).
    reset: Option<Linear<B>>,
    /// `[1, z]`: the reference windows' latent, fixed after training (`zero_at_reference` only).
    reference: Option<burn::module::Param<Tensor<B, 2>>>,
}

/// Number of shift features the reset gate reads.
const SHIFT_FEATURES: usize = 2;

/// How far a window's standardised moments are from the reference (0 for a window exactly like
/// it): ln(1 + mean of the squared means), ln(1 + mean of the squared log variance ratios). The
/// ratios are damped (+0.1) so that features silent in the reference (variance ≈ 0 either way)
/// do not swamp the others.
fn shift_features(summary: &AnchorSummary) -> [f64; SHIFT_FEATURES] {
    let d = summary.mean.len().max(1) as f64;
    let mean = summary.mean.iter().map(|m| f64::from(*m).powi(2)).sum::<f64>() / d;
    let var = summary.var.iter().map(|v| ((f64::from(*v) + 0.1) / 1.1).ln().powi(2)).sum::<f64>() / d;
    [mean.ln_1p(), var.ln_1p()]
}

/// Whether `domain` is the source distribution once its class mix and phrasing are set aside:
/// clean frames under a label or language shift count, a video category (a content shift the
/// source names through [`mmpg::DataSource::is_shifted`]) does not.
fn frames_in_distribution(data: &dyn mmpg::DataSource, domain: &mmpg::DomainSpec) -> bool {
    !data.is_shifted(&mmpg::DomainSpec { class_mix_alpha: None, phrasing: 0, ..domain.clone() })
}

/// An episode's source domain: an unshifted one with probability `clean_fraction` (when there
/// are any), otherwise any source domain.
fn pick_domain<'a>(
    domains: &'a [mmpg::DomainSpec],
    clean: &[&'a mmpg::DomainSpec],
    clean_fraction: f64,
    rng: &mut seed::Rng,
) -> &'a mmpg::DomainSpec {
    if !clean.is_empty() && rng.random_bool(clean_fraction) {
        clean[rng.random_range(0..clean.len())]
    } else {
        &domains[rng.random_range(0..domains.len())]
    }
}

/// Logistic regression by Newton's method with a small ridge: weights then bias.
fn fit_logistic(xs: &[[f64; SHIFT_FEATURES]], ys: &[bool]) -> [f64; SHIFT_FEATURES + 1] {
    const P: usize = SHIFT_FEATURES + 1;
    let mut w = [0.0; P];
    for _ in 0..50 {
        let mut grad = [0.0; P];
        let mut hess = [[0.0; P]; P];
        for (x, y) in xs.iter().zip(ys) {
            let row: [f64; P] = std::array::from_fn(|i| if i < SHIFT_FEATURES { x[i] } else { 1.0 });
            let z: f64 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
            let p = 1.0 / (1.0 + (-z).exp());
            for i in 0..P {
                grad[i] += (p - f64::from(u8::from(*y))) * row[i];
                for j in 0..P {
                    hess[i][j] += p * (1.0 - p) * row[i] * row[j];
                }
            }
        }
        for i in 0..P {
            grad[i] += 1e-3 * w[i];
            hess[i][i] += 1e-3;
        }
        let Some(step) = solve(hess, grad) else { break };
        for i in 0..P {
            w[i] -= step[i];
        }
        if step.iter().all(|s| s.abs() < 1e-9) {
            break;
        }
    }
    w
}

/// Solves a small linear system by Gaussian elimination with partial pivoting.
fn solve<const P: usize>(mut a: [[f64; P]; P], mut b: [f64; P]) -> Option<[f64; P]> {
    for col in 0..P {
        let pivot = (col..P).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..P {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; P];
    for row in (0..P).rev() {
        let rest: f64 = (row + 1..P).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// `Some((rows, cols, rank))` for a slot decoded in low-rank form.
type Layout = Option<(usize, usize, usize)>;

/// A summary's anchors, decoded and checked.
#[derive(Clone)]
struct Decoded {
    anchors: HostTensor,
    text: Option<HostTensor>,
}

/// Encoder outputs for a batch of summaries.
struct Encoded<B: burn::tensor::backend::Backend> {
    mu: Tensor<B, 2>,
    logvar: Tensor<B, 2>,
    /// `[S, 2d]`: the summaries' mean and log-variance, the reconstruction target.
    stats: Tensor<B, 2>,
}

impl<B: burn::tensor::backend::Backend> FdaNet<B> {
    fn encode(&self, summaries: &[(Decoded, &AnchorSummary)], device: &B::Device) -> Encoded<B> {
        let set = |rows: &HostTensor, phi1: &Linear<B>, phi2: &Linear<B>| {
            let [k, d] = [rows.shape()[0], rows.shape()[1]];
            let a = Tensor::<B, 2>::from_data(TensorData::new(rows.values().to_vec(), [k, d]), device);
            relu(phi2.forward(relu(phi1.forward(a)))).mean_dim(0)
        };
        // Summaries of one shape (the usual case: every device runs the same reasoner) are
        // pooled in one batched pass; a mixed batch falls back to one pass per summary.
        let batched = |rows: &[&HostTensor], phi1: &Linear<B>, phi2: &Linear<B>| -> Option<Tensor<B, 2>> {
            let shape = rows.first()?.shape();
            if rows.iter().any(|r| r.shape() != shape) || shape.len() != 2 {
                return None;
            }
            let [s, k, d] = [rows.len(), shape[0], shape[1]];
            let values: Vec<f32> = rows.iter().flat_map(|r| r.values().iter().copied()).collect();
            let a = Tensor::<B, 3>::from_data(TensorData::new(values, [s, k, d]), device);
            let pooled = relu(phi2.forward(relu(phi1.forward(a)))).mean_dim(1);
            let h = pooled.dims()[2];
            Some(pooled.reshape([s, h]))
        };
        let anchors: Vec<&HostTensor> = summaries.iter().map(|(decoded, _)| &decoded.anchors).collect();
        let frames = batched(&anchors, &self.phi1, &self.phi2)
            .unwrap_or_else(|| Tensor::cat(anchors.iter().map(|a| set(a, &self.phi1, &self.phi2)).collect(), 0));
        let pooled = match (&self.text_phi1, &self.text_phi2) {
            (Some(t1), Some(t2)) => {
                let texts: Option<Vec<&HostTensor>> =
                    summaries.iter().map(|(decoded, _)| decoded.text.as_ref()).collect();
                let text = texts.and_then(|t| batched(&t, t1, t2)).unwrap_or_else(|| {
                    // A summary without text anchors pools to zeros: the branch is silent.
                    let each = summaries.iter().map(|(decoded, _)| match &decoded.text {
                        Some(text) => set(text, t1, t2),
                        None => Tensor::zeros([1, t2.weight.dims()[1]], device),
                    });
                    Tensor::cat(each.collect(), 0)
                });
                Tensor::cat(vec![frames, text], 1)
            }
            _ => frames,
        };
        let stats_values: Vec<f32> = summaries
            .iter()
            .flat_map(|(_, s)| s.mean.iter().copied().chain(s.var.iter().map(|v| (v + 1e-4).ln())).collect::<Vec<_>>())
            .collect();
        let d2 = summaries.first().map_or(0, |(_, s)| 2 * s.dim());
        let stats = Tensor::<B, 2>::from_data(TensorData::new(stats_values, [summaries.len(), d2]), device);
        let h = relu(self.rho.forward(Tensor::cat(vec![pooled, stats.clone()], 1)));
        Encoded { mu: self.mu.forward(h.clone()), logvar: self.logvar.forward(h).clamp(-8.0, 8.0), stats }
    }

    /// `[S, z]` → one `[S, numel]` change per slot, bounded by `bounds`: `tanh(raw) · bound`;
    /// relative to `z_ref` (`[1, z]`) when given.
    fn deltas(
        &self,
        z: Tensor<B, 2>,
        z_ref: Option<Tensor<B, 2>>,
        bounds: &[f64],
        layouts: &[Layout],
    ) -> Vec<Tensor<B, 2>> {
        self.relative_raw_deltas(z, z_ref, layouts).into_iter().zip(bounds).map(|(raw, b)| tanh(raw) * *b).collect()
    }

    /// `raw(z) − raw(z_ref)` per slot (`raw(z)` without a reference).
    fn relative_raw_deltas(
        &self,
        z: Tensor<B, 2>,
        z_ref: Option<Tensor<B, 2>>,
        layouts: &[Layout],
    ) -> Vec<Tensor<B, 2>> {
        let Some(z_ref) = z_ref else { return self.raw_deltas(z, layouts) };
        let s = z.dims()[0];
        self.raw_deltas(Tensor::cat(vec![z, z_ref], 0), layouts)
            .into_iter()
            .map(|raw| {
                let n = raw.dims()[1];
                raw.clone().slice([0..s, 0..n]) - raw.slice([s..s + 1, 0..n])
            })
            .collect()
    }

    /// The stored reference latent, when there is one.
    fn reference_latent(&self) -> Option<Tensor<B, 2>> {
        self.reference.as_ref().map(|r| r.val())
    }

    /// The changes before their bound: `[S, z]` → one `[S, numel]` per slot.
    fn raw_deltas(&self, z: Tensor<B, 2>, layouts: &[Layout]) -> Vec<Tensor<B, 2>> {
        let mut factors = self.factors.iter();
        let s = z.dims()[0];
        self.decoders
            .iter()
            .zip(layouts)
            .map(|(dec, layout)| match layout {
                Some((m, n, r)) => {
                    let v_dec = factors.next().expect("the net has one factor decoder per low-rank slot");
                    let u = dec.forward(z.clone()).reshape([s, *m, *r]);
                    let v = v_dec.forward(z.clone()).reshape([s, *n, *r]);
                    u.matmul(v.swap_dims(1, 2)).reshape([s, m * n])
                }
                None => dec.forward(z.clone()),
            })
            .collect()
    }
}

/// `tanh` through one `exp`. Serving bounds every generated value with it, and glibc's `tanhf`
/// (through `expm1f`) took 40% of a serving cloud's time; this is within 2.4e-7 of it in absolute
/// terms, which is what matters for a bounded change added to θ0 (tested below).
pub fn fast_tanh(x: f32) -> f32 {
    // Beyond 9, tanh is ±1 in f32.
    if x.abs() > 9.0 {
        return x.signum();
    }
    let e = (2.0 * x).exp();
    (e - 1.0) / (e + 1.0)
}

/// Reference-domain windows whose mean latent is `z_ref` (`zero_at_reference`).
const REFERENCE_WINDOWS: usize = 8;

/// `[1, z]`: the mean encoder latent of the reference windows.
fn reference_latent(
    net: &FdaNet<DB>,
    (decoded, summaries): &(Vec<Decoded>, Vec<AnchorSummary>),
    device: &BurnDevice,
) -> Tensor<DB, 2> {
    let pairs: Vec<(Decoded, &AnchorSummary)> = decoded.iter().cloned().zip(summaries).collect();
    net.encode(&pairs, device).mu.mean_dim(0)
}

/// Names of the loss terms, in the order training records them.
const TERMS: [&str; 5] = ["task", "retrieval", "kl", "reconstruction", "stay"];

/// The model's losses of a step's episodes with the generated slots, and the surrogate whose
/// gradient is theirs (see [`Fda::objective_through_vjp`]).
struct Objective {
    task: f64,
    retrieval: f64,
    surrogate: Tensor<DB, 1>,
}

/// The FDA generator.
#[derive(Debug)]
pub struct Fda {
    settings: FdaSettings,
    schema: SlotSchema,
    base: Vec<HostTensor>,
    bounds: Vec<f64>,
    layouts: Vec<Layout>,
    feature_dim: usize,
    text_dim: Option<usize>,
    net: FdaNet<DB>,
    /// `net` on the inference device, made on the first generation after each training or
    /// load: serving neither clones nor moves the network per request.
    serving: std::sync::OnceLock<FdaNet<DB>>,
    device: BurnDevice,
    seed: u64,
}

impl Fda {
    /// A generator for `ctx`'s schema, initialised so that it first reproduces θ0.
    pub fn new(settings: FdaSettings, ctx: &GeneratorContext) -> Result<Self, PluginError> {
        if settings.latent == 0 || settings.hidden == 0 || settings.episodes_per_step == 0 || settings.rank == 0 {
            return Err(PluginError::Build(
                "`latent`, `hidden`, `episodes_per_step` and `rank` must be at least 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&settings.clean_fraction) {
            return Err(PluginError::Build(format!(
                "`clean_fraction` must be in [0, 1], found {}",
                settings.clean_fraction
            )));
        }
        if let Some(name) = settings.slot_bounds.keys().find(|n| ctx.schema.get(n).is_none()) {
            return Err(PluginError::Build(format!("slot_bounds names `{name}`, which is not a slot of the model")));
        }
        let mut all_bounds = std::iter::once(settings.delta_bound).chain(settings.slot_bounds.values().copied());
        if let Some(b) = all_bounds.find(|b| !(b.is_finite() && *b > 0.0)) {
            return Err(PluginError::Build(format!("delta bounds must be positive and finite, found {b}")));
        }
        let base: Vec<HostTensor> = ctx
            .schema
            .slots()
            .iter()
            .map(|s| {
                ctx.base_params
                    .tensors
                    .get(&s.name)
                    .cloned()
                    .ok_or_else(|| PluginError::Build(format!("base value of slot `{}` missing", s.name)))
            })
            .collect::<Result<_, _>>()?;
        let bounds = ctx
            .schema
            .slots()
            .iter()
            .map(|s| *settings.slot_bounds.get(&s.name).unwrap_or(&settings.delta_bound))
            .collect();
        let layouts: Vec<Layout> = ctx
            .schema
            .slots()
            .iter()
            .map(|s| match (settings.delta, s.shape.as_slice()) {
                (DeltaForm::LowRank, [m, n]) if settings.rank < (*m).min(*n) => Some((*m, *n, settings.rank)),
                _ => None,
            })
            .collect();
        // Drawn on the CPU generator, then moved: one seed, one initial model on every backend.
        let device = &init_device();
        let (d, e, z) = (ctx.feature_dim, settings.hidden, settings.latent);
        // Small initial weights on Δ (or on U): training starts from θ ≈ θ0, the static model.
        let small = |out: usize| {
            LinearConfig::new(z, out)
                .with_initializer(burn::nn::Initializer::Uniform { min: -1e-3, max: 1e-3 })
                .init(device)
        };
        let net = FdaNet {
            phi1: LinearConfig::new(d, e).init(device),
            phi2: LinearConfig::new(e, e).init(device),
            text_phi1: ctx.text_dim.map(|t| LinearConfig::new(t, e).init(device)),
            text_phi2: ctx.text_dim.map(|_| LinearConfig::new(e, e).init(device)),
            rho: LinearConfig::new(e + 2 * d + ctx.text_dim.map_or(0, |_| e), e).init(device),
            mu: LinearConfig::new(e, z).init(device),
            logvar: LinearConfig::new(e, z).init(device),
            decoders: ctx
                .schema
                .slots()
                .iter()
                .zip(&layouts)
                .map(|(s, layout)| small(layout.map_or(s.numel(), |(m, _, r)| m * r)))
                .collect(),
            factors: layouts.iter().flatten().map(|(_, n, r)| LinearConfig::new(z, n * r).init(device)).collect(),
            recon: LinearConfig::new(z, 2 * d).init(device),
            // Zero weights: until fitted the gate says 0.5, which keeps Δ.
            reset: settings.reset.then(|| {
                LinearConfig::new(SHIFT_FEATURES, 1).with_initializer(burn::nn::Initializer::Zeros).init(device)
            }),
            reference: settings
                .zero_at_reference
                .then(|| burn::module::Param::from_tensor(Tensor::zeros([1, z], device)).set_require_grad(false)),
        };
        let device = mmpg_backends::device(&ctx.base.device)?;
        Ok(Self {
            settings,
            schema: ctx.schema.clone(),
            base,
            bounds,
            layouts,
            feature_dim: d,
            text_dim: ctx.text_dim,
            net: relocate(materialise(net), &device),
            serving: std::sync::OnceLock::new(),
            device,
            seed: ctx.base.seed,
        })
    }

    fn check(&self, summaries: &[AnchorSummary]) -> Result<Vec<Decoded>, GeneratorError> {
        summaries
            .iter()
            .map(|s| {
                if s.dim() != self.feature_dim {
                    return Err(GeneratorError::Dimension { expected: self.feature_dim, found: s.dim() });
                }
                let anchors = s.decoded_anchors()?;
                // Text anchors are read only by a generator with a text branch of their width.
                let text = match (s.decoded_text_anchors()?, self.text_dim) {
                    (Some(text), Some(e)) if text.shape()[1] == e => Some(text),
                    (Some(text), Some(e)) => {
                        return Err(GeneratorError::Dimension { expected: e, found: text.shape()[1] });
                    }
                    _ => None,
                };
                Ok(Decoded { anchors, text })
            })
            .collect()
    }

    /// An episode's window from `domain`, summarised exactly as a device does (text-side
    /// anchors included). Drawn from the training split, as everything the cloud learns from:
    /// the stream and test splits are the devices' pools (for `fashion` the test photos, for
    /// `videoqa` the test questions), and a generator trained on them would be scored on what it
    /// had seen.
    fn episode_summary(
        &self,
        ctx: &GeneratorTraining<'_>,
        domain: &mmpg::DomainSpec,
        reference: &mmpg::FeatureStats,
        rng: &mut seed::Rng,
    ) -> Result<AnchorSummary, GeneratorError> {
        let window = ctx.data.clips(domain, Split::Train, ctx.window_clips, rng.random())?;
        let features = ctx.model.frame_features(&window)?;
        let mut summary = ctx.reasoner.summarise(&features, reference, window.len(), rng.random())?;
        if self.text_dim.is_some() && ctx.reasoner.text_anchor_count() > 0 {
            summary.text_anchors = ctx.reasoner.summarise_text(&ctx.model.text_features(&window)?, rng.random())?;
        }
        if let Some(privacy) = ctx.reasoner.privacy() {
            // Trained on what devices send: the same mechanism, its noise drawn from the
            // training's seed so that training reproduces.
            let seeded = SummaryPrivacy { noise: NoiseSource::Seeded, ..privacy };
            seeded
                .apply(ctx.reasoner, &mut summary, &features, reference, window.len(), rng.random())
                .map_err(|e| GeneratorError::Output(format!("private episode summary: {e}")))?;
        }
        Ok(summary)
    }

    /// Per summary: whether its generated Δ is served (false: the reset gate sends θ0).
    fn keeps_delta(&self, summaries: &[AnchorSummary]) -> Vec<bool> {
        let Some(gate) = &self.net.reset else { return vec![true; summaries.len()] };
        let weights = HostTensor::from_burn(gate.weight.val());
        let bias = gate.bias.as_ref().map_or(0.0, |b| f64::from(HostTensor::from_burn(b.val()).values()[0]));
        summaries
            .iter()
            .map(|s| {
                let x = shift_features(s);
                let logit: f64 = x.iter().zip(weights.values()).map(|(a, w)| a * f64::from(*w)).sum::<f64>() + bias;
                logit >= 0.0
            })
            .collect()
    }

    /// Labels `reset_episodes` windows by whether the trained generator's slots beat θ0 on
    /// labelled clips of the same domain, and fits the reset gate on their shift features.
    fn fit_reset(
        &self,
        ctx: &GeneratorTraining<'_>,
        net: FdaNet<DB>,
        reference: &mmpg::FeatureStats,
        clean: &[&mmpg::DomainSpec],
        rng: &mut seed::Rng,
    ) -> Result<FdaNet<DB>, GeneratorError> {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        let no_delta = vec![None; self.base.len()];
        let static_slots = self.slot_values(&no_delta, 0)?;
        ctx.progress.start("cloud: fit reset gate", self.settings.reset_episodes as u64);
        for _ in 0..self.settings.reset_episodes {
            let domain = pick_domain(ctx.domains, clean, 0.5, rng);
            let summary = self.episode_summary(ctx, domain, reference, rng)?;
            let clips = ctx.data.clips(domain, Split::Train, ctx.plan.batch, rng.random())?;
            let anchors = self.check(std::slice::from_ref(&summary))?;
            let pairs: Vec<(Decoded, &AnchorSummary)> = anchors.into_iter().zip([&summary]).collect();
            let deltas =
                net.deltas(net.encode(&pairs, &self.device).mu, net.reference_latent(), &self.bounds, &self.layouts);
            let deltas: Vec<Option<HostTensor>> = deltas.into_iter().map(|d| Some(HostTensor::from_burn(d))).collect();
            let with_delta = ctx.model.task_loss(&self.slot_values(&deltas, 0)?, &clips)?;
            let without = ctx.model.task_loss(&static_slots, &clips)?;
            xs.push(shift_features(&summary));
            ys.push(with_delta < without);
            ctx.progress.step(None);
        }
        ctx.progress.finish();
        let fitted = fit_logistic(&xs, &ys);
        let device = &self.device;
        let weight = Tensor::<DB, 2>::from_data(
            TensorData::new(fitted[..SHIFT_FEATURES].iter().map(|w| *w as f32).collect(), [SHIFT_FEATURES, 1]),
            device,
        );
        let bias = Tensor::<DB, 1>::from_data(TensorData::new(vec![fitted[SHIFT_FEATURES] as f32], [1]), device);
        let gate = Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: Some(burn::module::Param::from_tensor(bias)),
        };
        Ok(FdaNet { reset: Some(gate), ..net })
    }

    /// `mean over episodes and values of m_e (Δ_e/b)²`, `m_e` 1 for an episode from an unshifted
    /// source domain and 0 otherwise.
    fn stay_penalty(&self, deltas: &[Tensor<DB, 2>], unshifted: &[f32]) -> Tensor<DB, 1> {
        let s = unshifted.len();
        let mask = Tensor::<DB, 2>::from_data(TensorData::new(unshifted.to_vec(), [s, 1]), &self.device);
        let slots = deltas.len().max(1) as f64;
        deltas
            .iter()
            .zip(&self.bounds)
            .map(|(d, b)| ((d.clone() / *b).powf_scalar(2.0).mean_dim(1) * mask.clone()).mean() / slots)
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| Tensor::zeros([1], &self.device))
    }

    /// Slot values θ0 + Δ for every slot, Δ taken from row `row` of its `[s, n]` host deltas
    /// (θ0 alone where a slot's delta is `None`).
    fn slot_values(&self, deltas: &[Option<HostTensor>], row: usize) -> Result<SlotValues, GeneratorError> {
        let mut values = SlotValues::new();
        for ((spec, base), delta) in self.schema.slots().iter().zip(&self.base).zip(deltas) {
            let n = spec.numel();
            let theta = match delta {
                Some(d) => {
                    let d = d.values().get(row * n..(row + 1) * n).ok_or_else(|| {
                        GeneratorError::Output(format!("slot `{}`: no delta row {row} of {n} values", spec.name))
                    })?;
                    base.values().iter().zip(d).map(|(b, d)| b + d).collect()
                }
                None => base.values().to_vec(),
            };
            let theta =
                HostTensor::new(spec.shape.clone(), theta).map_err(|e| GeneratorError::Output(e.to_string()))?;
            values.insert(spec.name.clone(), theta);
        }
        Ok(values)
    }

    /// The objective `L_e = task_e + γ·retrieval_e` of each episode through the model's
    /// vector-Jacobian product ([`mmpg::CloudModel::objective_vjp`]), and the surrogate
    /// `mean_e Σ_s sum(Δ_s[e] · stopgrad(∂L_e/∂θ_s))`, whose gradient with respect to the
    /// generator is the loss's: θ0 is a constant, so ∂θ/∂φ = ∂Δ/∂φ.
    fn objective_through_vjp(
        &self,
        model: &dyn mmpg::CloudModel,
        deltas: &[Tensor<DB, 2>],
        batches: &[Vec<mmpg::Clip>],
        step: usize,
    ) -> Result<Objective, GeneratorError> {
        let host: Vec<Option<HostTensor>> = deltas.iter().map(|d| Some(HostTensor::from_burn(d.clone()))).collect();
        let mut cotangents: Vec<Vec<f32>> = self.schema.slots().iter().map(|s| Vec::with_capacity(s.numel())).collect();
        let (mut task, mut retrieval) = (0.0, 0.0);
        let episodes = batches.len() as f64;
        for (e, clips) in batches.iter().enumerate() {
            let slots = self.slot_values(&host, e)?;
            let objective = model.objective_vjp(&slots, clips, self.settings.retrieval)?;
            task += objective.task / episodes;
            retrieval += objective.retrieval.unwrap_or(0.0) / episodes;
            for (spec, rows) in self.schema.slots().iter().zip(&mut cotangents) {
                let g = slot_gradient(&objective.gradients, spec, step)?;
                rows.extend(g.iter().map(|v| v / episodes as f32));
            }
        }
        let surrogate = deltas
            .iter()
            .zip(cotangents)
            .map(|(d, g)| {
                let dims = d.dims();
                (d.clone() * Tensor::<DB, 2>::from_data(TensorData::new(g, dims), &self.device)).sum()
            })
            .reduce(|a, b| a + b)
            .ok_or_else(|| GeneratorError::Output("the model has no slots".into()))?;
        Ok(Objective { task, retrieval, surrogate })
    }
}

/// The model's gradient of slot `spec` in `vjp`, checked: present, of the slot's size, finite.
fn slot_gradient<'a>(
    gradients: &'a mmpg::SlotValues,
    spec: &mmpg::SlotSpec,
    step: usize,
) -> Result<&'a [f32], GeneratorError> {
    let g = gradients.get(&spec.name).filter(|g| g.len() == spec.numel()).ok_or_else(|| {
        GeneratorError::Output(format!("the model's gradient of slot `{}` is missing or mis-sized", spec.name))
    })?;
    if g.is_finite() { Ok(g.values()) } else { Err(GeneratorError::Diverged { step, loss: f64::NAN }) }
}

/// Standard normal draws from a seeded generator (Box–Muller), so sampling is reproducible
/// on every backend.
mod rand_distr_free {
    use rand::Rng as _;

    pub fn standard_normal(rng: &mut mmpg::seed::Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                let u2: f64 = rng.random();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }
}

impl ParameterGenerator for Fda {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn name(&self) -> &str {
        "fda"
    }

    fn parameter_count(&self) -> usize {
        Module::<DB>::num_params(&self.net)
    }

    fn save(&self) -> Result<Vec<u8>, GeneratorError> {
        write_checkpoint("fda", &self.schema, &parameters(&self.net))
            .map_err(|e| GeneratorError::Checkpoint(e.to_string()))
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), GeneratorError> {
        let bad = |e: CheckpointError| GeneratorError::Checkpoint(e.to_string());
        let tensors = read_checkpoint("fda", &self.schema, bytes).map_err(bad)?;
        // A network without a part the checkpoint has would drop it silently: say which setting differs.
        for (setting, on, prefix) in [
            ("zero_at_reference", self.settings.zero_at_reference, "reference"),
            ("reset", self.settings.reset, "reset."),
        ] {
            let saved = tensors.keys().any(|k| k.starts_with(prefix));
            if saved != on {
                return Err(GeneratorError::Checkpoint(format!(
                    "the checkpoint was trained with `{setting} = {saved}`, this generator has `{setting} = {on}`"
                )));
            }
        }
        self.net = restore(self.net.clone(), &tensors, &self.device).map_err(bad)?;
        self.serving = std::sync::OnceLock::new();
        Ok(())
    }

    fn generate_batch(&self, summaries: &[AnchorSummary]) -> Result<Vec<GeneratedParams>, GeneratorError> {
        if summaries.is_empty() {
            return Ok(Vec::new());
        }
        let anchors = self.check(summaries)?;
        let device = inference_device(&self.device);
        let net = self.serving.get_or_init(|| relocate(self.net.clone(), &device));
        let pairs: Vec<(Decoded, &AnchorSummary)> = anchors.into_iter().zip(summaries).collect();
        let encoded = net.encode(&pairs, &device);
        // Bounded on the host: the same `tanh(raw) · bound` as training, with `fast_tanh`.
        let raw = net.relative_raw_deltas(encoded.mu, net.reference_latent(), &self.layouts);
        let keep = self.keeps_delta(summaries);
        let mut out: Vec<BTreeMap<String, HostTensor>> = vec![BTreeMap::new(); summaries.len()];
        for (((spec, base), raw), bound) in self.schema.slots().iter().zip(&self.base).zip(raw).zip(&self.bounds) {
            let raw = HostTensor::from_burn(raw);
            let bound = *bound as f32;
            for (i, row) in raw.rows().into_iter().flatten().enumerate() {
                let values = if keep[i] {
                    base.values().iter().zip(row).map(|(b, r)| b + fast_tanh(*r) * bound).collect()
                } else {
                    base.values().to_vec()
                };
                let t = HostTensor::new(spec.shape.clone(), values)
                    .expect("θ0 and each decoded row have the slot's element count");
                out[i].insert(spec.name.clone(), t);
            }
        }
        Ok(out.into_iter().map(|tensors| GeneratedParams { schema_hash: self.schema.hash(), tensors }).collect())
    }

    fn train(&mut self, ctx: &GeneratorTraining<'_>) -> Result<TrainingLog, GeneratorError> {
        if ctx.domains.is_empty() {
            return Err(GeneratorError::Data(mmpg::DataError::Other("no source domains".into())));
        }
        let started = Instant::now();
        let mut rng = seed::rng(ctx.plan.seed, self.seed);
        let reference = ctx.model.reference_stats();
        let mut optim = AdamConfig::new().init::<DB, FdaNet<DB>>();
        let mut net = self.net.clone();
        let (mut losses, mut terms) = (Vec::new(), Vec::new());
        let episodes = self.settings.episodes_per_step;
        let clean: Vec<&mmpg::DomainSpec> =
            ctx.domains.iter().filter(|d| frames_in_distribution(ctx.data, d)).collect();
        // The reference domain is the first source domain, the one the model was pretrained on
        // and its reference statistics come from; its windows are summarised once (the model
        // is fixed while the generator trains).
        let references = if self.settings.zero_at_reference {
            let mut summaries = Vec::with_capacity(REFERENCE_WINDOWS);
            for _ in 0..REFERENCE_WINDOWS {
                summaries.push(self.episode_summary(ctx, &ctx.domains[0], &reference, &mut rng)?);
            }
            let decoded = self.check(&summaries)?;
            Some((decoded, summaries))
        } else {
            None
        };
        ctx.progress.start("cloud: train generator (FDA)", ctx.plan.steps as u64);
        for step in 1..=ctx.plan.steps {
            let mut summaries = Vec::with_capacity(episodes);
            let mut batches = Vec::with_capacity(episodes);
            let mut unshifted = Vec::with_capacity(episodes);
            for _ in 0..episodes {
                let domain = pick_domain(ctx.domains, &clean, self.settings.clean_fraction, &mut rng);
                unshifted.push(if frames_in_distribution(ctx.data, domain) { 1.0f32 } else { 0.0 });
                summaries.push(self.episode_summary(ctx, domain, &reference, &mut rng)?);
                batches.push(ctx.data.clips(domain, Split::Train, ctx.plan.batch, rng.random())?);
            }
            let anchors = self.check(&summaries)?;
            let pairs: Vec<(Decoded, &AnchorSummary)> = anchors.into_iter().zip(&summaries).collect();
            let enc = net.encode(&pairs, &self.device);
            let [s, zdim] = enc.mu.dims();
            let eps = Tensor::<DB, 2>::from_data(
                TensorData::new(standard_normal(&mut rng, s * zdim), [s, zdim]),
                &self.device,
            );
            let z = enc.mu.clone() + (enc.logvar.clone() * 0.5).exp() * eps;
            let z_ref = references.as_ref().map(|r| reference_latent(&net, r, &self.device));
            let deltas = net.deltas(z.clone(), z_ref, &self.bounds, &self.layouts);
            let Objective { task, retrieval, surrogate } =
                self.objective_through_vjp(ctx.model, &deltas, &batches, step)?;
            let kl = ((enc.logvar.clone().exp() + enc.mu.clone().powf_scalar(2.0) - enc.logvar.clone() - 1.0)
                .sum_dim(1)
                * 0.5)
                .mean();
            let recon = (net.recon.forward(z) - enc.stats).powf_scalar(2.0).mean();
            let (kl_value, recon_value) = (f64::from(kl.clone().into_scalar()), f64::from(recon.clone().into_scalar()));
            let stay = self.stay_penalty(&deltas, &unshifted);
            let stay_value = f64::from(stay.clone().into_scalar());
            let value = task
                + retrieval * self.settings.retrieval
                + kl_value * self.settings.beta
                + recon_value * self.settings.lambda
                + stay_value * self.settings.stay;
            if mmpg::loss_diverged(losses.first().copied().unwrap_or(value), value) {
                return Err(GeneratorError::Diverged { step, loss: value });
            }
            terms.push([task, retrieval, kl_value, recon_value, stay_value]);
            let loss = surrogate + kl * self.settings.beta + recon * self.settings.lambda + stay * self.settings.stay;
            let grads = GradientsParams::from_grads::<DB, FdaNet<DB>>(loss.backward(), &net);
            net = optim.step(ctx.plan.learning_rate, net, grads);
            losses.push(value);
            ctx.progress.step(Some(format!("loss {value:.3}")));
        }
        ctx.progress.finish();
        // The last step's update can overflow after a finite loss.
        if !all_finite(&net) {
            return Err(GeneratorError::Diverged { step: ctx.plan.steps, loss: f64::NAN });
        }
        if let Some(references) = &references {
            let z_ref = reference_latent(&net, references, &self.device).detach();
            net.reference = Some(burn::module::Param::from_tensor(z_ref).set_require_grad(false));
        }
        if self.settings.reset {
            net = self.fit_reset(ctx, net, &reference, &clean, &mut rng)?;
        }
        self.net = net;
        self.serving = std::sync::OnceLock::new();
        let tail = (terms.len() / 10).max(1);
        let mean_of = |i: usize| terms.iter().rev().take(tail).map(|t| t[i]).sum::<f64>() / tail as f64;
        Ok(TrainingLog {
            phase: "generator".into(),
            losses,
            final_terms: if terms.is_empty() {
                Vec::new()
            } else {
                TERMS.iter().enumerate().map(|(i, name)| (name.to_string(), mean_of(i))).collect()
            },
            term_curves: TERMS
                .iter()
                .enumerate()
                .map(|(i, name)| (name.to_string(), terms.iter().map(|t| t[i]).collect()))
                .collect(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn build(settings: &toml::Table, ctx: &GeneratorContext) -> Result<Box<dyn ParameterGenerator>, PluginError> {
    let settings = parse_settings(settings)?;
    Ok(Box::new(mmpg_backends::with_burn_seed(ctx.base.seed, || Fda::new(settings, ctx))?))
}

/// The `fda` factory: linked statically through inventory, and exported as a plugin
/// library by `plugins/fda/cdylib`.
pub const FDA: Factory<dyn ParameterGenerator, GeneratorContext> = Factory {
    name: "fda",
    summary: "Fast Domain Adaptor: variational set encoder → z → bounded per-slot decoder θ0 + Δ(z)",
    settings: SettingsSpec::of::<FdaSettings>(),
    build: Build::Static(build),
};

inventory::submit! { StaticPlugin(Plugin::Generator(FDA)) }

#[cfg(test)]
mod tests {

    #[test]
    fn fast_tanh_is_within_its_stated_error_of_tanh() {
        let worst = (-2_000_000..=2_000_000)
            .map(|i| i as f32 * 1e-5)
            .chain([f32::MIN_POSITIVE, 9.0, 9.5, 30.0, -30.0, f32::MAX, f32::MIN])
            .map(|x| (fast_tanh(x) - x.tanh()).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 2.4e-7, "worst absolute error {worst}");
        assert_eq!((fast_tanh(0.0), fast_tanh(100.0), fast_tanh(-100.0)), (0.0, 1.0, -1.0));
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn solve_inverts_a_known_system() {
        let x = solve([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], [3.0, 5.0, 5.0]).expect("regular");
        for (got, want) in x.iter().zip([1.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        assert!(solve([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0]).is_none(), "a singular system has no answer");
    }

    #[test]
    fn the_gate_learns_that_far_windows_want_their_delta() {
        // Windows near the reference: Δ did not help; far ones: it did (with some label noise).
        let xs: Vec<[f64; 2]> = (0..40).map(|i| [f64::from(i) * 0.05, f64::from(i % 7) * 0.01]).collect();
        let ys: Vec<bool> = (0..40).map(|i| (i >= 12) != (i == 30)).collect();
        let w = fit_logistic(&xs, &ys);
        let logit = |x: [f64; 2]| w[0] * x[0] + w[1] * x[1] + w[2];
        assert!(logit([0.0, 0.0]) < 0.0, "{w:?}");
        assert!(logit([1.5, 0.0]) > 0.0, "{w:?}");
    }

    /// A generator for a two-slot schema (a vector and a 3×4 matrix) over 4-wide features.
    fn small_fda(settings: FdaSettings) -> Fda {
        let schema = SlotSchema::new(vec![mmpg::SlotSpec::f32("v", vec![5]), mmpg::SlotSpec::f32("m", vec![3, 4])])
            .expect("schema");
        let tensors = schema
            .slots()
            .iter()
            .map(|s| (s.name.clone(), HostTensor::new(s.shape.clone(), vec![0.25; s.numel()]).expect("shape")))
            .collect();
        let ctx = GeneratorContext {
            base: mmpg::BuildContext { seed: 3, device: mmpg::DeviceDescriptor::cpu().training() },
            base_params: GeneratedParams { schema_hash: schema.hash(), tensors },
            schema,
            feature_dim: 4,
            text_dim: None,
        };
        let settings = FdaSettings { slot_bounds: BTreeMap::from([("m".to_string(), 2.0)]), ..settings };
        mmpg_backends::with_burn_seed(3, || Fda::new(settings, &ctx)).expect("generator")
    }

    fn summary(shift: f32) -> AnchorSummary {
        let anchors: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() + shift).collect();
        AnchorSummary {
            anchors: mmpg::QuantisedTensor::quantise(
                &HostTensor::new(vec![3, 4], anchors).expect("shape"),
                mmpg::Quantisation::F32,
            )
            .expect("finite"),
            mean: vec![shift; 4],
            var: vec![1.0 + shift.abs(); 4],
            frames: 3,
            clips: 3,
            text_anchors: None,
            privacy: None,
        }
    }

    /// Makes the decoder's changes large, so that any Δ shows.
    fn widen_decoders(fda: &mut Fda) {
        let mut net = fda.net.clone();
        net.decoders = net
            .decoders
            .into_iter()
            .map(|d| {
                let w = d.weight.val();
                Linear { weight: burn::module::Param::from_tensor(w.ones_like()), bias: d.bias }
            })
            .collect();
        fda.net = net;
        fda.serving = std::sync::OnceLock::new();
    }

    #[test]
    fn a_window_at_the_reference_latent_gets_theta0_exactly_and_others_do_not() {
        for delta in [DeltaForm::Basis, DeltaForm::LowRank] {
            let mut fda = small_fda(FdaSettings { zero_at_reference: true, delta, rank: 1, ..FdaSettings::default() });
            widen_decoders(&mut fda);
            let at = summary(0.0);
            let decoded = fda.check(std::slice::from_ref(&at)).expect("valid");
            let z = fda.net.encode(&[(decoded[0].clone(), &at)], &fda.device).mu.detach();
            fda.net.reference = Some(burn::module::Param::from_tensor(z).set_require_grad(false));
            fda.serving = std::sync::OnceLock::new();
            let base: Vec<Vec<f32>> = fda.base.iter().map(|b| b.values().to_vec()).collect();
            let values = |p: &GeneratedParams| -> Vec<Vec<f32>> {
                fda.schema.slots().iter().map(|s| p.tensors[&s.name].values().to_vec()).collect()
            };
            assert_eq!(values(&fda.generate(&at).expect("generates")), base, "{delta:?}");
            assert_ne!(values(&fda.generate(&summary(2.0)).expect("generates")), base, "{delta:?}");

            // The reference latent travels with the checkpoint.
            let mut restored =
                small_fda(FdaSettings { zero_at_reference: true, delta, rank: 1, ..FdaSettings::default() });
            restored.load(&fda.save().expect("saves")).expect("loads");
            assert_eq!(values(&restored.generate(&at).expect("generates")), base, "{delta:?}");
        }
    }

    #[test]
    fn the_stay_penalty_is_the_mean_squared_bounded_change_of_unshifted_episodes_only() {
        let fda = small_fda(FdaSettings::default());
        let device = &fda.device;
        // Two episodes: Δ/b = 0.5 everywhere for the first, 1.0 for the second.
        let deltas: Vec<Tensor<DB, 2>> = fda
            .schema
            .slots()
            .iter()
            .zip(&fda.bounds)
            .map(|(s, b)| {
                let n = s.numel();
                let rows: Vec<f32> = [0.5, 1.0].iter().flat_map(|r| vec![(r * b) as f32; n]).collect();
                Tensor::from_data(TensorData::new(rows, [2, n]), device)
            })
            .collect();
        let value = |mask: [f32; 2]| f64::from(fda.stay_penalty(&deltas, &mask).into_scalar());
        assert!(value([0.0, 0.0]).abs() < 1e-12);
        // Mean over episodes (shifted ones count as 0) and over slots.
        assert!((value([1.0, 0.0]) - 0.25 / 2.0).abs() < 1e-6, "{}", value([1.0, 0.0]));
        assert!((value([0.0, 1.0]) - 1.0 / 2.0).abs() < 1e-6, "{}", value([0.0, 1.0]));
        assert!((value([1.0, 1.0]) - 1.25 / 2.0).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn shift_features_are_zero_at_the_reference_and_grow_away_from_it(
            shift in 0.0f32..3.0, scale in 1.0f32..4.0,
        ) {
            let summary = |mean: f32, var: f32| AnchorSummary {
                anchors: mmpg::QuantisedTensor::quantise(
                    &HostTensor::new(vec![1, 4], vec![0.0; 4]).expect("shape"),
                    mmpg::Quantisation::F32,
                )
                .expect("finite"),
                mean: vec![mean; 4],
                var: vec![var; 4],
                frames: 1,
                clips: 1,
                text_anchors: None,
                privacy: None,
            };
            let at = shift_features(&summary(0.0, 1.0));
            prop_assert!(at.iter().all(|v| v.abs() < 1e-9));
            let moved = shift_features(&summary(shift, 1.0));
            let widened = shift_features(&summary(0.0, scale));
            prop_assert!(moved[0] >= at[0] && widened[1] >= at[1]);
            prop_assert!(shift_features(&summary(shift + 0.5, 1.0))[0] > moved[0]);
        }
    }
}
