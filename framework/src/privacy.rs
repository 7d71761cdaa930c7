//! Private summaries: the Gaussian mechanism on a device's upload, calibrated exactly, and the
//! accounting of a device's uploads (#16).
//!
//! **Adjacency.** Two windows are neighbours when they differ in one clip (its frames and its
//! question). The summary's shape — K anchors, Kt text anchors, frames and clips — is fixed by the
//! settings and the window size and is public.
//!
//! **Mechanism.** Every anchor row (standardised frame features, and question embeddings) is
//! clipped to L2 norm `C`; the moments are recomputed from the window's clipped rows, as the mean
//! and the second moment. One clip's change can replace every anchor (the selection depends on the
//! whole window) and moves the moments by one clip's share, so the L2 sensitivities are
//! `2C·√K` (anchors), `2C·√Kt` (text anchors), `2C·T/N` (mean) and `√2·C²·T/N` (second moment:
//! for non-negative vectors `‖a − b‖² ≤ ‖a‖² + ‖b‖²`), with N frames, T frames per clip. Each of the
//! B blocks gets Gaussian noise of standard deviation `σ_b = Δ_b·√B/μ`, so the whole upload is a
//! Gaussian mechanism of sensitivity-to-noise ratio `μ = √(Σ_b (Δ_b/σ_b)²)`.
//!
//! **Calibration.** The analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8): noise
//! with ratio μ is (ε, δ)-DP exactly when `Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) ≤ δ`; the largest
//! such μ is found by bisection. Unlike the classical `σ = Δ·√(2 ln(1.25/δ))/ε`, it holds for every
//! ε and is never noisier.
//!
//! **Accounting.** A mechanism with ratio μ is μ-Gaussian DP (Dong, Roth & Su, JRSS-B 2022,
//! Corollary 2.13), and r of them compose to exactly `√(Σ μ_i²)`-GDP (their Corollary 3.3), which
//! converts back to (ε, δ) by the same formula: [`PrivacyAccountant`].
//!
//! Noise is drawn from the operating system's generator ([`NoiseSource::Os`], the default) unless
//! a simulation asks for seeded noise: a cloud that knows the seed could subtract seeded noise.

use rand::SeedableRng as _;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorReasoner, AnchorSummary, Quantisation, QuantisedTensor};
use crate::settings::Check;
use crate::tensor::HostTensor;
use crate::{AnchorError, seed};

/// Why a summary could not be made private.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// The settings are outside their ranges (see [`SummaryPrivacy::check`]).
    #[error("privacy settings: {0}")]
    Settings(String),
    /// The summary or the window is not what the mechanism expects.
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed: {0}")]
    Entropy(String),
}

/// Where the mechanism's noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSource {
    /// The operating system's generator: what a deployed device must use.
    #[default]
    Os,
    /// Drawn from the upload's seed, so a simulation reproduces: never for a deployed device.
    Seeded,
}

/// `[anchor.settings.privacy]`: the Gaussian mechanism on each upload. Only `epsilon` is
/// required. In a configuration it must be a table (serde alone would also take an array of the
/// values in field order).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SummaryPrivacy {
    /// ε of each upload.
    pub epsilon: f64,
    /// δ of each upload.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// L2 bound C of every anchor row, in standard deviations of the cloud's reference (frame
    /// anchors) and in the embedding's own units (text anchors).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Where the noise comes from.
    #[serde(default)]
    pub noise: NoiseSource,
}

/// The fields of [`SummaryPrivacy`] as serde derives them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, remote = "SummaryPrivacy")]
struct Fields {
    epsilon: f64,
    #[serde(default = "default_delta")]
    delta: f64,
    #[serde(default = "default_clip")]
    clip: f64,
    #[serde(default)]
    noise: NoiseSource,
}

impl<'de> Deserialize<'de> for SummaryPrivacy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Binary encodings (the plugin ABI) carry the struct as serialised; text ones must give
        // a table.
        if !deserializer.is_human_readable() {
            return Fields::deserialize(deserializer);
        }
        struct Table;
        impl<'de> serde::de::Visitor<'de> for Table {
            type Value = SummaryPrivacy;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table with `epsilon` (and optionally `delta`, `clip`, `noise`)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<SummaryPrivacy, A::Error> {
                Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(Table)
    }
}

fn default_delta() -> f64 {
    1e-5
}

fn default_clip() -> f64 {
    8.0
}

/// What one private upload costs, stated with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyCost {
    /// ε of this upload.
    pub epsilon: f64,
    /// δ of this upload.
    pub delta: f64,
    /// Its Gaussian-DP parameter μ (sensitivity over noise), what the accountant composes.
    pub mu: f64,
}

impl PrivacyCost {
    /// Whether a cost received from a peer is one a mechanism could state: finite, ε and μ
    /// positive, δ in (0, 1).
    pub fn is_valid(&self) -> bool {
        self.epsilon.is_finite()
            && self.epsilon > 0.0
            && self.mu.is_finite()
            && self.mu > 0.0
            && self.delta > 0.0
            && self.delta < 1.0
    }
}

impl SummaryPrivacy {
    /// Declares the valid ranges, each key under `prefix` (`privacy.`): ε in [0.01, 10⁴], δ in
    /// [10⁻¹², 0.1], C in (0, 10⁶].
    pub fn check(&self, check: &mut Check, prefix: &str) {
        check.real(&format!("{prefix}epsilon"), self.epsilon, 0.01..=1e4);
        check.real(&format!("{prefix}delta"), self.delta, 1e-12..=0.1);
        check.positive(&format!("{prefix}clip"), self.clip, 1e6);
    }

    fn checked(&self) -> Result<(), PrivacyError> {
        let mut check = Check::new();
        self.check(&mut check, "");
        match check.into_errors().into_iter().next() {
            Some(e) => Err(PrivacyError::Settings(e.to_string())),
            None => Ok(()),
        }
    }

    /// Makes the summary of a window private as a device of `reasoner` sends it: `features` the
    /// window's `[N, d]` frame features, `clips` its clips, standardised with `reference`; the
    /// public shape from [`PublicShape::of`]. See [`SummaryPrivacy::privatise`].
    ///
    /// # Errors
    /// As [`SummaryPrivacy::privatise`].
    pub fn apply(
        &self,
        reasoner: &dyn AnchorReasoner,
        summary: &mut AnchorSummary,
        features: &HostTensor,
        reference: &crate::FeatureStats,
        clips: usize,
        seed: u64,
    ) -> Result<PrivacyCost, PrivacyError> {
        let frames = features.shape().first().copied().unwrap_or(0);
        let shape = PublicShape::of(reasoner, frames, clips, summary);
        self.privatise(summary, &reference.standardise(features)?, shape, seed)
    }

    /// μ of each upload: the largest ratio whose mechanism is (ε, δ)-DP.
    pub fn mu(&self) -> f64 {
        gaussian_mu(self.epsilon, self.delta)
    }

    /// Makes `summary` private in place: its anchors and text anchors clipped to C, padded with
    /// zero rows to the public counts of `shape` (so that how many the selection found, which
    /// depends on the window, is not disclosed) and noised; its moments replaced by noised
    /// moments of `standardised` (the window's `[N, d]` standardised frame features, from
    /// `shape.clips` clips, which the summary was made from) clipped to C; each block re-encoded
    /// in its own quantisation. `seed` draws the noise under [`NoiseSource::Seeded`].
    ///
    /// # Errors
    /// [`PrivacyError::Settings`] for settings out of range, [`PrivacyError::Anchor`] for a
    /// window that does not match the summary, a non-finite feature, more anchors than the
    /// public counts or anchors that do not decode, [`PrivacyError::Entropy`] if the operating
    /// system's generator fails.
    pub fn privatise(
        &self,
        summary: &mut AnchorSummary,
        standardised: &HostTensor,
        shape: PublicShape,
        seed: u64,
    ) -> Result<PrivacyCost, PrivacyError> {
        self.checked()?;
        let d = summary.dim();
        let rows: Vec<&[f32]> = standardised
            .rows()
            .filter(|_| standardised.shape().get(1) == Some(&d))
            .ok_or_else(|| AnchorError::FeatureShape { expected_dim: d, found: standardised.shape().to_vec() })?
            .collect();
        let n = rows.len();
        if n == 0 {
            return Err(AnchorError::Empty.into());
        }
        if let Some(i) = standardised.values().iter().position(|v| !v.is_finite()) {
            return Err(AnchorError::NonFiniteFeature { row: i / d.max(1), column: i % d.max(1) }.into());
        }
        let c = self.clip;
        // Frames one clip contributes, at most (a window's clips have equal frame counts).
        let per_clip = n.div_ceil(shape.clips.clamp(1, n)) as f64;
        let anchors = padded(summary.decoded_anchors()?, shape.anchors)?;
        let text = summary.decoded_text_anchors()?.map(|t| padded(t, shape.text_anchors)).transpose()?;
        let (k, kt) = (anchors.shape()[0], text.as_ref().map_or(0, |t| t.shape()[0]));
        let mut sensitivities = vec![
            2.0 * c * (k as f64).sqrt(),
            2.0 * c * per_clip / n as f64,
            std::f64::consts::SQRT_2 * c * c * per_clip / n as f64,
        ];
        if kt > 0 {
            sensitivities.push(2.0 * c * (kt as f64).sqrt());
        }
        let mu = self.mu();
        let blocks = (sensitivities.len() as f64).sqrt();
        let sigma: Vec<f64> = sensitivities.iter().map(|s| s * blocks / mu).collect();
        let mut rng = match self.noise {
            NoiseSource::Seeded => ChaCha20Rng::seed_from_u64(seed::derive(seed, 0x0050_5256)),
            NoiseSource::Os => {
                let mut bytes = [0u8; 32];
                getrandom::getrandom(&mut bytes).map_err(|e| PrivacyError::Entropy(e.to_string()))?;
                ChaCha20Rng::from_seed(bytes)
            }
        };
        let mut noise = |values: &mut [f32], sigma: f64| -> Result<(), PrivacyError> {
            // Never fails open: a block without its noise would leave unprotected.
            let normal = Normal::new(0.0, sigma)
                .map_err(|e| PrivacyError::Settings(format!("noise of standard deviation {sigma}: {e}")))?;
            for v in values {
                *v = (f64::from(*v) + normal.sample(&mut rng)) as f32;
            }
            Ok(())
        };

        let mut frame = clipped(anchors, c)?;
        noise(&mut frame, sigma[0])?;
        summary.anchors = encode(vec![k, d], frame, summary.anchors.quantisation())?;
        if let (Some(text), Some(encoded)) = (text, summary.text_anchors.as_mut()) {
            let e = text.shape()[1];
            let mut values = clipped(text, c)?;
            noise(&mut values, sigma[3])?;
            *encoded = encode(vec![kt, e], values, encoded.quantisation())?;
        }
        let (mut mean, mut second) = (vec![0f32; d], vec![0f32; d]);
        for row in &rows {
            let scale = clip_factor(row, c);
            for (j, v) in row.iter().enumerate() {
                let x = v * scale;
                mean[j] += x / n as f32;
                second[j] += x * x / n as f32;
            }
        }
        noise(&mut mean, sigma[1])?;
        noise(&mut second, sigma[2])?;
        // Post-processing: a variance is at least the floor the reference's std has (1e-4²).
        summary.var = mean.iter().zip(&second).map(|(m, s)| (s - m * m).max(1e-8)).collect();
        summary.mean = mean;
        let cost = PrivacyCost { epsilon: self.epsilon, delta: self.delta, mu };
        summary.privacy = Some(cost);
        Ok(cost)
    }
}

/// What a private summary's shape discloses, fixed by the settings and the window size rather
/// than by its content: the window's clips, and how many frame and text anchors it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicShape {
    /// Clips in the window.
    pub clips: usize,
    /// Frame anchors uploaded; a selection that found fewer is padded with zero rows.
    pub anchors: usize,
    /// Text anchors uploaded (when any are); padded likewise.
    pub text_anchors: usize,
}

impl PublicShape {
    /// The shape `reasoner` gives every summary of a window of `clips` clips and `frames` frames:
    /// its fixed anchor counts ([`AnchorReasoner::anchor_count`]), else `summary`'s own.
    pub fn of(reasoner: &dyn AnchorReasoner, frames: usize, clips: usize, summary: &AnchorSummary) -> Self {
        let own_text = summary.text_anchors.as_ref().map_or(0, |t| t.shape().first().copied().unwrap_or(0));
        Self {
            clips,
            anchors: reasoner.anchor_count(frames).unwrap_or_else(|| summary.anchor_count()),
            text_anchors: match summary.text_anchors {
                None => 0,
                Some(_) => reasoner.anchor_count(clips).map_or(own_text, |k| k.min(reasoner.text_anchor_count())),
            },
        }
    }
}

/// `matrix` `[k, e]` with zero rows appended up to `rows`; more than `rows` is an error.
fn padded(matrix: HostTensor, rows: usize) -> Result<HostTensor, AnchorError> {
    let (k, e) = match matrix.shape() {
        [k, e] => (*k, *e),
        other => return Err(AnchorError::TextShape(other.to_vec())),
    };
    if k > rows {
        return Err(AnchorError::Selection { index: k - 1, rows });
    }
    let mut values = matrix.into_values();
    values.resize(rows * e, 0.0);
    Ok(HostTensor::new(vec![rows, e], values)?)
}

fn encode(shape: Vec<usize>, values: Vec<f32>, quantisation: Quantisation) -> Result<QuantisedTensor, AnchorError> {
    Ok(QuantisedTensor::quantise(&HostTensor::new(shape, values)?, quantisation)?)
}

/// The factor that brings `row` to L2 norm at most `bound` (1 when it is already within).
pub fn clip_factor(row: &[f32], bound: f64) -> f32 {
    let norm = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
    if norm > bound { (bound / norm) as f32 } else { 1.0 }
}

/// The rows of a `[K, e]` matrix, each clipped to L2 norm `bound`, flattened.
fn clipped(matrix: HostTensor, bound: f64) -> Result<Vec<f32>, AnchorError> {
    let shape = matrix.shape().to_vec();
    let rows = matrix.rows().ok_or(AnchorError::TextShape(shape))?;
    Ok(rows.flat_map(|row| row.iter().map(move |v| v * clip_factor(row, bound)).collect::<Vec<f32>>()).collect())
}

/// The standard normal distribution function Φ.
fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// ln Φ(x), accurate where Φ(x) underflows (Mills' ratio below x = −30, four terms: the
/// series then ends on a negative term, so it never overstates Φ — the safe side for δ).
fn ln_phi(x: f64) -> f64 {
    if x > -30.0 {
        return phi(x).ln();
    }
    let x2 = x * x;
    -x2 / 2.0 - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        + (1.0 - 1.0 / x2 + 3.0 / (x2 * x2) - 15.0 / (x2 * x2 * x2)).ln()
}

/// The δ at which a Gaussian mechanism of sensitivity-to-noise ratio `mu` (μ-GDP) is ε-DP:
/// `Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)` (Balle & Wang 2018, Theorem 8). Increasing in μ,
/// decreasing in ε; 0 for μ ≤ 0.
pub fn gaussian_delta(mu: f64, epsilon: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    let a = phi(-epsilon / mu + mu / 2.0);
    let b = (epsilon + ln_phi(-epsilon / mu - mu / 2.0)).exp();
    (a - b).max(0.0)
}

/// The largest μ whose Gaussian mechanism is (ε, δ)-DP, to 1e-12 relative (bisection on the
/// safe side: `gaussian_delta(μ, ε) ≤ δ` always holds for the value returned).
pub fn gaussian_mu(epsilon: f64, delta: f64) -> f64 {
    let (mut lo, mut hi) = (1e-9, 1.0);
    while gaussian_delta(hi, epsilon) <= delta && hi < 1e9 {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        if gaussian_delta(mid, epsilon) <= delta {
            lo = mid
        } else {
            hi = mid
        }
        if hi / lo < 1.0 + 1e-12 {
            break;
        }
    }
    lo
}

/// The smallest ε at which a μ-GDP mechanism is (ε, δ)-DP (bisection on the safe side).
pub fn gaussian_epsilon(mu: f64, delta: f64) -> f64 {
    if gaussian_delta(mu, 0.0) <= delta {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    while gaussian_delta(mu, hi) > delta {
        if hi >= 1e12 {
            return f64::INFINITY;
        }
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gaussian_delta(mu, mid) <= delta {
            hi = mid
        } else {
            lo = mid
        }
        if hi - lo <= 1e-12 * hi {
            break;
        }
    }
    hi
}

/// A device's privacy spent over its uploads: Gaussian-DP composition, exact for Gaussian
/// mechanisms (Dong, Roth & Su 2022, Corollary 3.3). Serialises, so that a device process keeps
/// its ledger across restarts ([`PrivacyAccountant::from_json`] validates what it reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyAccountant {
    mu_squared: f64,
    uploads: u64,
    delta: f64,
    last_epsilon: f64,
}

/// What a device has spent, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// Private uploads made.
    pub uploads: u64,
    /// ε of the last upload.
    pub epsilon_per_upload: f64,
    /// δ, per upload and in total.
    pub delta: f64,
    /// ε of all the uploads together, at the same δ.
    pub epsilon_total: f64,
}

impl PrivacyAccountant {
    /// Records one upload's cost.
    pub fn record(&mut self, cost: PrivacyCost) {
        self.mu_squared += cost.mu * cost.mu;
        self.uploads += 1;
        // The total is stated at the largest δ any upload used.
        self.delta = self.delta.max(cost.delta);
        self.last_epsilon = cost.epsilon;
    }

    /// A ledger written by `serde_json`, checked: μ² finite and non-negative, δ in [0, 1), and
    /// an empty ledger exactly when no upload was recorded.
    ///
    /// # Errors
    /// What is wrong with the text, for a person.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let a: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let valid = a.mu_squared.is_finite()
            && a.mu_squared >= 0.0
            && (0.0..1.0).contains(&a.delta)
            && a.last_epsilon.is_finite()
            && a.last_epsilon >= 0.0
            && (a.uploads == 0) == (a.mu_squared == 0.0)
            && (a.uploads == 0 || (a.delta > 0.0 && a.last_epsilon > 0.0));
        if valid { Ok(a) } else { Err(format!("not a privacy ledger: {a:?}")) }
    }

    /// What the uploads recorded so far cost together; `None` before the first.
    pub fn spent(&self) -> Option<PrivacySpent> {
        (self.uploads > 0).then(|| PrivacySpent {
            uploads: self.uploads,
            epsilon_per_upload: self.last_epsilon,
            delta: self.delta,
            epsilon_total: gaussian_epsilon(self.mu_squared.sqrt(), self.delta),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn privacy(epsilon: f64) -> SummaryPrivacy {
        SummaryPrivacy { epsilon, delta: 1e-5, clip: 3.0, noise: NoiseSource::Seeded }
    }

    fn summary(rows: &HostTensor, k: usize, clips: u32, q: Quantisation) -> AnchorSummary {
        let d = rows.shape()[1];
        let anchors = HostTensor::new(vec![k, d], rows.values()[..k * d].to_vec()).expect("fits");
        AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, q).expect("finite"),
            mean: vec![0.0; d],
            var: vec![1.0; d],
            frames: rows.shape()[0] as u32,
            clips,
            text_anchors: None,
            privacy: None,
        }
    }

    /// `p` on `s`, whose public shape is its own counts.
    fn as_built(
        p: &SummaryPrivacy,
        s: &mut AnchorSummary,
        rows: &HostTensor,
        seed: u64,
    ) -> Result<PrivacyCost, PrivacyError> {
        let public = PublicShape { clips: s.clips as usize, anchors: s.anchor_count(), text_anchors: 0 };
        p.privatise(s, rows, public, seed)
    }

    #[test]
    fn fewer_anchors_than_the_public_count_are_padded_and_more_are_refused() {
        let rows = HostTensor::new(vec![4, 2], vec![1.0; 8]).expect("fits");
        let mut s = summary(&rows, 2, 4, Quantisation::F32);
        let public = PublicShape { clips: 4, anchors: 3, text_anchors: 0 };
        privacy(10.0).privatise(&mut s, &rows, public, 1).expect("private");
        assert_eq!(s.anchor_count(), 3);
        let mut s = summary(&rows, 2, 4, Quantisation::F32);
        let too_few = PublicShape { anchors: 1, ..public };
        assert!(privacy(10.0).privatise(&mut s, &rows, too_few, 1).is_err());
        let nan = HostTensor::new(vec![4, 2], vec![f32::NAN; 8]).expect("fits");
        let mut s = summary(&rows, 2, 4, Quantisation::F32);
        assert!(matches!(
            privacy(10.0).privatise(&mut s, &nan, public, 1),
            Err(PrivacyError::Anchor(AnchorError::NonFiniteFeature { .. }))
        ));
    }

    #[test]
    fn the_gaussian_tail_never_overstates_phi_where_the_series_takes_over() {
        // Past −30 the series stays within 1e-9 of the direct value, and below it.
        for x in [-30.5, -33.0, -37.0] {
            let (series, direct) = (ln_phi(x), phi(x).ln());
            assert!(series <= direct + 1e-12 && direct - series < 1e-9, "{x}: {series} vs {direct}");
        }
        assert_eq!(gaussian_epsilon(1e9, 1e-5), f64::INFINITY);
    }

    #[test]
    fn the_classical_calibration_is_never_tighter_than_the_exact_one() {
        // Dwork & Roth, Theorem A.1: σ = Δ·√(2 ln(1.25/δ))/ε suffices for ε < 1.
        for epsilon in [0.1, 0.5, 0.9] {
            for delta in [1e-3, 1e-5, 1e-9] {
                let classical_mu = epsilon / (2.0 * (1.25f64 / delta).ln()).sqrt();
                assert!(gaussian_mu(epsilon, delta) >= classical_mu, "ε {epsilon}, δ {delta}");
                assert!(gaussian_delta(classical_mu, epsilon) <= delta);
            }
        }
    }

    #[test]
    fn a_published_value_is_reproduced() {
        // μ = 1 GDP is (ε, δ)-DP at ε = 1 with δ = Φ(−1/2) − e·Φ(−3/2) ≈ 0.1269 (Dong et al., Fig. 1).
        assert!((gaussian_delta(1.0, 1.0) - 0.126_936).abs() < 1e-5, "{}", gaussian_delta(1.0, 1.0));
    }

    #[test]
    fn seeded_noise_reproduces_and_os_noise_does_not() {
        let rows = HostTensor::new(vec![6, 2], (0..12).map(|v| v as f32 / 4.0).collect()).expect("fits");
        let run = |p: SummaryPrivacy| {
            let mut s = summary(&rows, 2, 3, Quantisation::F32);
            as_built(&p, &mut s, &rows, 9).expect("private");
            s
        };
        assert_eq!(run(privacy(1.0)), run(privacy(1.0)));
        let os = SummaryPrivacy { noise: NoiseSource::Os, ..privacy(1.0) };
        assert_ne!(run(os), run(os));
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let rows = HostTensor::new(vec![2, 2], vec![1.0; 4]).expect("fits");
        for bad in [
            SummaryPrivacy { epsilon: 0.0, ..privacy(1.0) },
            SummaryPrivacy { delta: 0.5, ..privacy(1.0) },
            SummaryPrivacy { clip: f64::NAN, ..privacy(1.0) },
        ] {
            let mut s = summary(&rows, 1, 1, Quantisation::F32);
            assert!(matches!(as_built(&bad, &mut s, &rows, 0), Err(PrivacyError::Settings(_))), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn the_noise_ratio_is_exactly_what_the_stated_epsilon_and_delta_allow(
            epsilon in 0.01f64..100.0, log_delta in -12f64..-1.0,
        ) {
            let delta = 10f64.powf(log_delta);
            let mu = gaussian_mu(epsilon, delta);
            // Private at the stated (ε, δ) ...
            prop_assert!(gaussian_delta(mu, epsilon) <= delta);
            // ... and no noisier than needed: 0.1% less noise would break the statement.
            prop_assert!(gaussian_delta(mu * 1.001, epsilon) > delta);
            // The accountant's inverse gives back the stated ε.
            let back = gaussian_epsilon(mu, delta);
            prop_assert!((back - epsilon).abs() <= 1e-6 * epsilon.max(1.0), "{back} vs {epsilon}");
        }

        #[test]
        fn uploads_compose_as_one_mechanism_of_root_sum_square_ratio(
            epsilon in 0.1f64..20.0, uploads in 1u64..50,
        ) {
            let cost = PrivacyCost { epsilon, delta: 1e-5, mu: gaussian_mu(epsilon, 1e-5) };
            let mut accountant = PrivacyAccountant::default();
            let mut previous = 0.0;
            for _ in 0..uploads {
                accountant.record(cost);
                let spent = accountant.spent().expect("recorded");
                prop_assert!(spent.epsilon_total >= previous);
                previous = spent.epsilon_total;
            }
            let spent = accountant.spent().expect("recorded");
            let expected = gaussian_epsilon(cost.mu * (uploads as f64).sqrt(), 1e-5);
            prop_assert!((spent.epsilon_total - expected).abs() <= 1e-9 * expected.max(1.0));
            // Never worse than adding the ε's up (basic composition).
            prop_assert!(spent.epsilon_total <= epsilon * uploads as f64 * (1.0 + 1e-9));
        }

        #[test]
        fn clipped_moments_move_by_at_most_their_stated_sensitivity(
            clips in 1usize..6, per_clip in 1usize..4, d in 1usize..5, changed in 0usize..6,
            a in prop::collection::vec(-20f32..20f32, 120), b in prop::collection::vec(-20f32..20f32, 12),
        ) {
            // Two windows that differ in one clip's frames: the mean moves ≤ 2C·T/N, the second
            // moment ≤ √2·C²·T/N.
            let (n, c) = (clips * per_clip, 3.0f64);
            let changed = changed % clips;
            let window = a[..n * d].to_vec();
            let mut other = window.clone();
            for f in 0..per_clip {
                let row = changed * per_clip + f;
                other[row * d..(row + 1) * d].copy_from_slice(&b[f * d..(f + 1) * d]);
            }
            let moments = |values: &[f32]| {
                let (mut m, mut s) = (vec![0f64; d], vec![0f64; d]);
                for row in values.chunks(d) {
                    let k = f64::from(clip_factor(row, c));
                    for (j, v) in row.iter().enumerate() {
                        m[j] += f64::from(*v) * k / n as f64;
                        s[j] += (f64::from(*v) * k).powi(2) / n as f64;
                    }
                }
                (m, s)
            };
            let ((m1, s1), (m2, s2)) = (moments(&window), moments(&other));
            let l2 = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
            let share = per_clip as f64 / n as f64;
            prop_assert!(l2(&m1, &m2) <= 2.0 * c * share * (1.0 + 1e-5));
            prop_assert!(l2(&s1, &s2) <= std::f64::consts::SQRT_2 * c * c * share * (1.0 + 1e-5));
        }

        #[test]
        fn a_private_summary_keeps_its_shape_and_encoding_and_states_its_cost(
            n in 2usize..20, d in 1usize..6, k in 1usize..4, epsilon in 0.5f64..50.0, seed in any::<u64>(),
            q in prop_oneof![Just(Quantisation::F32), Just(Quantisation::F16), Just(Quantisation::Int8)],
            values in prop::collection::vec(-30f32..30f32, 120),
        ) {
            let k = k.min(n);
            let rows = HostTensor::new(vec![n, d], values[..n * d].to_vec()).expect("fits");
            let mut s = summary(&rows, k, n as u32, q);
            let cost = as_built(&privacy(epsilon), &mut s, &rows, seed).expect("private");
            let decoded = s.decoded_anchors().expect("decodes");
            prop_assert_eq!(decoded.shape(), &[k, d]);
            prop_assert_eq!(s.anchors.quantisation(), q);
            prop_assert!(s.var.iter().all(|v| *v > 0.0 && v.is_finite()) && s.mean.iter().all(|v| v.is_finite()));
            prop_assert_eq!(s.privacy, Some(cost));
            prop_assert!(cost.is_valid() && (cost.mu - gaussian_mu(epsilon, 1e-5)).abs() < 1e-12);
        }
    }

    #[test]
    fn settings_are_a_table_and_only_epsilon_is_required() {
        let table: SummaryPrivacy = toml::from_str("epsilon = 4.0").expect("a table");
        assert_eq!(table, SummaryPrivacy { epsilon: 4.0, delta: 1e-5, clip: 8.0, noise: NoiseSource::Os });
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            privacy: SummaryPrivacy,
        }
        let err = toml::from_str::<Outer>("privacy = [4.0]").expect_err("an array is not a table");
        assert!(err.to_string().contains("a table with `epsilon`"), "{err}");
        assert!(toml::from_str::<SummaryPrivacy>("epsilon = 4.0\nsigma = 1.0").is_err());
        // The plugin ABI's binary encoding carries the struct as serialised.
        let bytes = postcard::to_stdvec(&table).expect("encodes");
        assert_eq!(postcard::from_bytes::<SummaryPrivacy>(&bytes).expect("decodes"), table);
    }

    #[test]
    fn a_ledger_survives_a_round_trip_and_a_tampered_one_is_refused() {
        let mut a = PrivacyAccountant::default();
        a.record(PrivacyCost { epsilon: 1.0, delta: 1e-5, mu: gaussian_mu(1.0, 1e-5) });
        let text = serde_json::to_string(&a).expect("serialises");
        assert_eq!(PrivacyAccountant::from_json(&text), Ok(a));
        for bad in [
            r#"{"mu_squared":-1.0,"uploads":1,"delta":1e-5,"last_epsilon":1.0}"#,
            r#"{"mu_squared":0.0,"uploads":3,"delta":1e-5,"last_epsilon":1.0}"#,
            r#"{"mu_squared":0.5,"uploads":1,"delta":2.0,"last_epsilon":1.0}"#,
            r#"{"mu_squared":0.5}"#,
            r#"{"mu_squared":0.5,"uploads":1,"delta":0.0,"last_epsilon":1.0}"#,
        ] {
            assert!(PrivacyAccountant::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_drawn_noise_has_the_calibrated_scale() {
        // 2,000 anchor values, all zero: what comes back is the noise itself. One block of
        // anchors (K = 1000, d = 2), the moments of 1000 zero rows: σ_anchors = 2C·√K·√3/μ.
        let (k, d) = (1000, 2);
        let rows = HostTensor::new(vec![k, d], vec![0.0; k * d]).expect("fits");
        let mut s = summary(&rows, k, k as u32, Quantisation::F32);
        let p = privacy(50.0);
        as_built(&p, &mut s, &rows, 3).expect("private");
        let expected = 2.0 * p.clip * (k as f64).sqrt() * 3f64.sqrt() / p.mu();
        let noise = s.decoded_anchors().expect("decodes").into_values();
        let sd = (noise.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
        assert!((sd / expected - 1.0).abs() < 0.05, "drawn sd {sd}, calibrated {expected}");
    }
}
