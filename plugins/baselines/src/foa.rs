//! FOA: test-time adaptation with only forward passes (Niu, Miao, Chen, Wu and Zhao, "Test-Time
//! Model Adaptation with Only Forward Passes", ICML 2024).
//!
//! The paper (§3, Eqs. 5–9) searches a small parameter vector — prompts prepended to a ViT's input
//! — with CMA-ES, one generation per test batch, with the fitness
//!
//! `F(p) = Σ_{x ∈ B} H(ŷ(x; p)) + λ · |B|/64 · Σ_d [(σ_d(B; p) − σ_d^S)² + (μ_d(B; p) − μ_d^S)²]`,
//!
//! the batch's prediction entropy plus the distance of its activation statistics from the
//! source's (λ = 0.4 on ImageNet-C); the previous best candidate competes in every generation. It
//! then shifts the activations the head reads back toward the source, `e + γ(μ^S − μ(t))` with
//! γ = 1 (Eq. 7). CMA-ES's population is its default `4 + ⌊3 ln n⌋` for `n` searched values.
//! No labels, no backpropagation, no weight the paper's model was trained with changes.
//!
//! Here the searched vector is a part of the model's own dynamic slots (`slots`: the `lmm`'s FiLM
//! slot by default), starting from the installed values; the statistics are those of the frame
//! features the device serves, against the source statistics the cloud measured (the reference a
//! device holds in its bundle); the batches are the device's unlabelled window, `batch` clips per
//! generation for `epochs` passes; the shift uses the window's mean under the chosen candidate.
//! CMA-ES itself is the `cmaes` crate.

use std::cell::{Cell, RefCell};

use mmpg::seed;
use mmpg::{
    AdaptError, AdaptInput, AdaptOutcome, Check, Clip, DeviceAdapter, DeviceModel, FeatureStats, GeneratedParams,
    HostTensor, ModelError, PluginError, Settings, SlotSchema,
};
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

/// Settings of `foa`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoaSettings {
    /// Dynamic slots CMA-ES searches, their values concatenated.
    pub slots: Vec<String>,
    /// λ: weight of the activation-statistics distance against the entropy.
    pub fitness_lambda: f64,
    /// CMA-ES population per generation (0: the default `4 + ⌊3 ln n⌋`).
    pub population: usize,
    /// CMA-ES's initial step size σ₀ around the installed values.
    pub step_size: f64,
    /// Window clips per generation.
    pub batch: usize,
    /// Passes over the window.
    pub epochs: usize,
    /// γ of the back-to-source activation shift (0: no shift).
    pub shift: f64,
}

impl Default for FoaSettings {
    fn default() -> Self {
        Self {
            slots: vec!["frame_film".into()],
            fitness_lambda: 0.4,
            population: 0,
            step_size: 0.1,
            batch: 8,
            epochs: 4,
            shift: 1.0,
        }
    }
}

/// Most values CMA-ES searches: its covariance is n × n and decomposed every few generations.
pub const MAX_SEARCHED: usize = 2048;
/// Largest population: with [`MAX_EPOCHS`], a bound on the forward passes one adaptation runs
/// (at most `(population + 1) · epochs · ⌈window / batch⌉`).
pub const MAX_POPULATION: usize = 256;
/// Most passes over the window.
pub const MAX_EPOCHS: usize = 64;

impl Settings for FoaSettings {
    fn check(&self, check: &mut Check) {
        if self.slots.is_empty() {
            check.fail("slots", "name at least one slot to search");
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if self.slots[..i].contains(slot) {
                check.fail("slots", format!("`{slot}` is named twice"));
            }
        }
        if self.population == 1 {
            check.fail("population", "CMA-ES needs at least 2 candidates a generation (0: its default)");
        }
        check.real("fitness_lambda", self.fitness_lambda, 0.0..=1e6);
        check.within("population", self.population, 0..=MAX_POPULATION);
        check.positive("step_size", self.step_size, 100.0);
        check.within("batch", self.batch, 1..=4096);
        check.within("epochs", self.epochs, 1..=MAX_EPOCHS);
        check.real("shift", self.shift, 0.0..=10.0);
    }
}

/// FOA as a device-side adapter.
#[derive(Debug, Clone)]
pub struct Foa {
    settings: FoaSettings,
}

/// Fitness of a candidate whose slots were refused or whose forward pass failed: worse than any
/// finite entropy and distance, so CMA-ES moves away from it.
const REFUSED: f64 = 1e30;

/// The paper's fitness (Eq. 5) of one batch's activations.
pub fn fitness(features: &HostTensor, logits: &HostTensor, source: &FeatureStats, lambda: f64) -> Option<f64> {
    let stats = FeatureStats::of_rows(features)?;
    if stats.dim() != source.dim() {
        return None;
    }
    let distance: f64 = (0..stats.dim())
        .map(|j| {
            let dm = f64::from(stats.mean[j] - source.mean[j]);
            let ds = f64::from(stats.std[j] - source.std[j]);
            dm * dm + ds * ds
        })
        .sum();
    let mut entropy = 0.0;
    let mut clips = 0usize;
    for row in logits.rows()? {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = row.iter().map(|l| f64::from(l - max).exp()).collect();
        let z: f64 = exp.iter().sum();
        entropy -= exp.iter().map(|e| e / z).filter(|p| *p > 0.0).map(|p| p * p.ln()).sum::<f64>();
        clips += 1;
    }
    let value = entropy + lambda * distance * clips as f64 / 64.0;
    value.is_finite().then_some(value)
}

/// What CMA-ES evaluates: candidates written into the searched slots of the installed values.
struct Search<'m> {
    model: &'m mut Box<dyn DeviceModel>,
    base: GeneratedParams,
    slots: Vec<String>,
    source: FeatureStats,
    lambda: f64,
    evaluations: usize,
    refused: usize,
    /// The first failure that was not the candidate's fault (the model cannot run at all).
    error: Option<AdaptError>,
}

impl Search<'_> {
    fn params(&self, x: &[f64]) -> Result<GeneratedParams, AdaptError> {
        let mut params = self.base.clone();
        let mut at = 0;
        for name in &self.slots {
            let tensor =
                params.tensors.get_mut(name).ok_or_else(|| AdaptError::Input(format!("FOA: no slot `{name}`")))?;
            let n = tensor.len();
            let values: Vec<f32> = x[at..at + n].iter().map(|v| *v as f32).collect();
            *tensor = HostTensor::new(tensor.shape().to_vec(), values)
                .map_err(|e| AdaptError::Input(format!("FOA: slot `{name}`: {e}")))?;
            at += n;
        }
        Ok(params)
    }

    fn install(&mut self, x: &[f64]) -> Result<(), AdaptError> {
        let params = self.params(x)?;
        self.model.apply(params)?;
        Ok(())
    }

    /// The fitness of `x` on `batch`; a candidate the model refuses scores [`REFUSED`].
    fn evaluate(&mut self, x: &[f64], batch: &[Clip]) -> f64 {
        self.evaluations += 1;
        if let Err(e) = self.install(x) {
            self.refused += 1;
            if !matches!(e, AdaptError::Model(ModelError::Params(_))) && self.error.is_none() {
                self.error = Some(e);
            }
            return REFUSED;
        }
        let activations = match self.model.as_feature_alignment() {
            Some(a) => a.activations(batch),
            None => Err(ModelError::unsupported("model", "feature alignment")),
        };
        match activations.map(|a| fitness(&a.features, &a.logits, &self.source, self.lambda)) {
            Ok(Some(f)) => f,
            Ok(None) => {
                self.refused += 1;
                REFUSED
            }
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(e.into());
                }
                REFUSED
            }
        }
    }
}

impl Foa {
    /// Checks the settings.
    pub fn new(settings: FoaSettings) -> Result<Self, PluginError> {
        let bad = |m: String| Err(PluginError::Build(m));
        if settings.slots.is_empty() {
            return bad("`slots` must name at least one slot".into());
        }
        if settings.batch == 0 || settings.epochs == 0 {
            return bad("`batch` and `epochs` must be at least 1".into());
        }
        if settings.population == 1 || settings.population > MAX_POPULATION || settings.epochs > MAX_EPOCHS {
            return bad(format!(
                "`population` must be 0 (CMA-ES's default) or 2..={MAX_POPULATION}, `epochs` 1..={MAX_EPOCHS}"
            ));
        }
        for (i, slot) in settings.slots.iter().enumerate() {
            if settings.slots[..i].contains(slot) {
                return bad(format!("`slots` names `{slot}` twice"));
            }
        }
        if !(settings.step_size.is_finite() && settings.step_size > 0.0) {
            return bad(format!("`step_size` must be positive, found {}", settings.step_size));
        }
        if !(settings.fitness_lambda.is_finite() && settings.fitness_lambda >= 0.0) {
            return bad(format!("`fitness_lambda` must be ≥ 0, found {}", settings.fitness_lambda));
        }
        if !(settings.shift.is_finite() && settings.shift >= 0.0) {
            return bad(format!("`shift` must be ≥ 0, found {}", settings.shift));
        }
        Ok(Self { settings })
    }
}

impl DeviceAdapter for Foa {
    fn label(&self) -> String {
        "FOA".into()
    }

    fn check_schema(&self, schema: &SlotSchema) -> Result<(), AdaptError> {
        let mut searched = 0;
        for slot in &self.settings.slots {
            let spec = schema.get(slot).ok_or_else(|| {
                let known: Vec<&str> = schema.slots().iter().map(|s| s.name.as_str()).collect();
                AdaptError::Input(format!("FOA: the model has no slot `{slot}`; its slots: {}", known.join(", ")))
            })?;
            searched += spec.numel();
        }
        if searched > MAX_SEARCHED {
            return Err(AdaptError::Input(format!(
                "FOA searches at most {MAX_SEARCHED} values; slots {:?} hold {searched}",
                self.settings.slots
            )));
        }
        Ok(())
    }

    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError> {
        let s = &self.settings;
        if input.window.is_empty() {
            return Err(AdaptError::Input("FOA needs an unlabelled window".into()));
        }
        let name = model.name().to_string();
        let source = model
            .as_feature_alignment()
            .ok_or_else(|| ModelError::unsupported(&name, "feature alignment (FOA)"))?
            .source_statistics()?;
        let base = model.current_params();
        let mut x0 = Vec::new();
        for slot in &s.slots {
            let t = base.tensors.get(slot).ok_or_else(|| {
                let known: Vec<&str> = base.tensors.keys().map(String::as_str).collect();
                AdaptError::Input(format!("FOA: the model has no slot `{slot}`; its slots: {}", known.join(", ")))
            })?;
            x0.extend(t.values().iter().map(|v| f64::from(*v)));
        }
        if x0.is_empty() || x0.len() > MAX_SEARCHED {
            return Err(AdaptError::Input(format!(
                "FOA searches 1 to {MAX_SEARCHED} values; slots {:?} hold {}",
                s.slots,
                x0.len()
            )));
        }
        let mut rng = seed::rng(input.seed, 0xF0A);
        let mut batches: Vec<Vec<Clip>> = Vec::new();
        for _ in 0..s.epochs {
            let mut order = input.window.to_vec();
            order.shuffle(&mut rng);
            batches.extend(order.chunks(s.batch).map(<[Clip]>::to_vec));
        }

        let search = RefCell::new(Search {
            model,
            base,
            slots: s.slots.clone(),
            source,
            lambda: s.fitness_lambda,
            evaluations: 0,
            refused: 0,
            error: None,
        });
        let current = Cell::new(0usize);
        // The generation's best, to set against the previous best on the same batch.
        let generation_best: RefCell<(f64, Vec<f64>)> = RefCell::new((f64::INFINITY, Vec::new()));
        let mut best = (search.borrow_mut().evaluate(&x0, &batches[0]), x0.clone());
        let start_fitness = best.0;
        let mut generations = 0usize;
        {
            let objective = |x: &cmaes::DVector<f64>| {
                let values: Vec<f64> = x.iter().copied().collect();
                let f = search.borrow_mut().evaluate(&values, &batches[current.get()]);
                let mut gb = generation_best.borrow_mut();
                if f < gb.0 {
                    *gb = (f, values);
                }
                f
            };
            let mut options = cmaes::CMAESOptions::new(x0.clone(), s.step_size).seed(seed::derive(input.seed, 0xC3A));
            if s.population > 0 {
                options = options.population_size(s.population);
            }
            let mut cma = options.build(objective).map_err(|e| AdaptError::Input(format!("FOA: CMA-ES: {e:?}")))?;
            for (b, batch) in batches.iter().enumerate() {
                current.set(b);
                *generation_best.borrow_mut() = (f64::INFINITY, Vec::new());
                let stop = cma.next();
                generations += 1;
                // The previous best competes on this batch too (the paper's elitism).
                let kept = search.borrow_mut().evaluate(&best.1, batch);
                let (f, x) = generation_best.borrow().clone();
                best = if f < kept && !x.is_empty() { (f, x) } else { (kept, best.1) };
                if search.borrow().error.is_some() || stop.is_some() {
                    break;
                }
            }
        }
        let mut search = search.into_inner();
        if let Some(e) = search.error.take() {
            return Err(e);
        }
        if best.0 >= REFUSED {
            return Err(AdaptError::Input("FOA: the model refused every candidate".into()));
        }
        search.install(&best.1)?;
        let (evaluations, refused) = (search.evaluations, search.refused);
        let searched = best.1.len();
        let model = search.model;
        let align = model.as_feature_alignment().ok_or_else(|| ModelError::unsupported(&name, "feature alignment"))?;
        let mut shifted = 0;
        if s.shift > 0.0 {
            let window = align.activations(input.window)?;
            let stats = FeatureStats::of_rows(&window.features)
                .ok_or_else(|| AdaptError::Input("FOA: the window has no frame features".into()))?;
            let source = align.source_statistics()?;
            let shift: Vec<f32> =
                (0..stats.dim()).map(|j| (s.shift * f64::from(source.mean[j] - stats.mean[j])) as f32).collect();
            shifted = align.set_feature_alignment(Some((vec![1.0; shift.len()], shift)))?;
        }
        Ok(AdaptOutcome {
            changed_parameters: searched + shifted,
            forward_passes: evaluations + usize::from(s.shift > 0.0),
            detail: vec![
                ("generations".into(), generations as f64),
                ("evaluations".into(), evaluations as f64),
                ("refused_candidates".into(), refused as f64),
                ("fitness_start".into(), start_fitness),
                ("fitness_best".into(), best.0),
            ],
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
        fn fitness_is_entropy_plus_weighted_distance(
            n in 1usize..6,
            d in 1usize..5,
            k in 2usize..6,
            lambda in 0.0f64..10.0,
            seed in any::<u64>(),
        ) {
            let mut random = uniform(seed, 0);
            let mut draw = |len: usize| random(len, 2.0);
            let features = tensor(vec![n, d], draw(n * d));
            let logits = tensor(vec![n, k], draw(n * k));
            let source = FeatureStats { mean: draw(d), std: draw(d).into_iter().map(|v| v.abs() + 0.1).collect() };
            let f = fitness(&features, &logits, &source, lambda).expect("finite");
            let entropy_only = fitness(&features, &logits, &source, 0.0).expect("finite");
            // Entropy is between 0 and n·ln k; the distance term only adds.
            prop_assert!(entropy_only >= -1e-9 && entropy_only <= n as f64 * (k as f64).ln() + 1e-6);
            prop_assert!(f >= entropy_only - 1e-9);
            // Features equal to the source mean with the source spread cost nothing beyond the entropy.
            let at_source = FeatureStats::of_rows(&features).expect("stats");
            let same = fitness(&features, &logits, &at_source, lambda).expect("finite");
            prop_assert!((same - entropy_only).abs() < 1e-6);
        }
    }

    #[test]
    fn slots_are_checked_against_the_models_schema_before_any_device() {
        use mmpg::SlotSpec;
        let schema =
            SlotSchema::new(vec![SlotSpec::f32("frame_film", vec![2, 16]), SlotSpec::f32("head", vec![64, 64])])
                .expect("schema");
        let foa = |slots: &[&str]| {
            let slots = slots.iter().map(|s| s.to_string()).collect();
            Foa::new(FoaSettings { slots, ..FoaSettings::default() }).expect("valid").check_schema(&schema)
        };
        assert!(foa(&["frame_film"]).is_ok());
        let err = foa(&["nope"]).expect_err("unknown slot").to_string();
        assert!(err.contains("no slot `nope`") && err.contains("frame_film, head"), "{err}");
        let err = foa(&["frame_film", "head"]).expect_err("too many values").to_string();
        assert!(err.contains("4128"), "{err}");
    }

    #[test]
    fn mismatched_statistics_have_no_fitness() {
        let source = FeatureStats { mean: vec![0.0; 3], std: vec![1.0; 3] };
        let features = tensor(vec![2, 2], vec![0.0; 4]);
        assert!(fitness(&features, &tensor(vec![2, 2], vec![0.0; 4]), &source, 1.0).is_none());
    }

    #[test]
    fn refuses_nonsense_settings() {
        assert!(Foa::new(FoaSettings { slots: Vec::new(), ..FoaSettings::default() }).is_err());
        assert!(Foa::new(FoaSettings { batch: 0, ..FoaSettings::default() }).is_err());
        assert!(Foa::new(FoaSettings { step_size: 0.0, ..FoaSettings::default() }).is_err());
        assert!(Foa::new(FoaSettings { shift: f64::INFINITY, ..FoaSettings::default() }).is_err());
        assert!(Foa::new(FoaSettings { population: 1, ..FoaSettings::default() }).is_err());
        let twice = vec!["frame_film".to_string(), "frame_film".to_string()];
        assert!(Foa::new(FoaSettings { slots: twice, ..FoaSettings::default() }).is_err());
    }
}
