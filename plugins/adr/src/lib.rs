//! `adr`: the AnchorFrame Distribution Reasoner. Picks K anchor frames that cover the
//! standardised feature distribution of the device's recent window (k-center greedy by
//! default) and uploads them quantised, beside the window's moments.

use mmpg::privacy::SummaryPrivacy;
use mmpg::seed;
use mmpg::{
    AnchorError, AnchorReasoner, Build, BuildContext, Check, Factory, HostTensor, Plugin, PluginError, Quantisation,
    Settings, SettingsSpec, StaticPlugin, parse_settings,
};
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

/// How anchors are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Greedy farthest-point selection: each new anchor is the frame farthest from all
    /// anchors so far, starting from the frame nearest the window mean.
    KCenter,
    /// k-means++ seeding refined by Lloyd iterations; each anchor is the frame nearest a
    /// centroid (anchors stay real frames).
    #[serde(rename = "k-means++")]
    KmeansPlusPlus,
    /// K frames uniformly at random (ablation: the cheapest choice).
    Random,
    /// Every frame (ablation: the most expensive upload).
    All,
}

/// Settings of the `adr` reasoner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdrSettings {
    /// Number of anchors K.
    pub k: usize,
    /// Selection strategy.
    pub strategy: Strategy,
    /// Upload encoding of the anchors. f16 saturates standardised values beyond ±65504 (a
    /// dimension the reference barely varies in, shifted on the device) instead of failing;
    /// `AnchorSummary::saturation` counts them.
    pub quantisation: Quantisation,
    /// Text-side anchors: question embeddings of the window picked by the same strategy (at
    /// most `k`; 0 sends none).
    pub text_k: usize,
    /// `[anchor.settings.privacy]`: the Gaussian mechanism on every upload (ε, δ, clip bound,
    /// noise source; see `mmpg::privacy`). Absent: summaries are sent as computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<SummaryPrivacy>,
}

impl Default for AdrSettings {
    fn default() -> Self {
        Self { k: 8, strategy: Strategy::KCenter, quantisation: Quantisation::F16, text_k: 4, privacy: None }
    }
}

impl Settings for AdrSettings {
    fn check(&self, check: &mut Check) {
        check.within("k", self.k, 1..=4096);
        // More than k is allowed and means k: a K sweep keeps one text_k for every K.
        check.within("text_k", self.text_k, 0..=4096);
        if let Some(privacy) = &self.privacy {
            privacy.check(check, "privacy.");
        }
    }
}

/// The reasoner.
#[derive(Debug, Clone)]
pub struct Adr {
    settings: AdrSettings,
}

impl Adr {
    /// A reasoner with these settings; K must be at least 1.
    pub fn new(settings: AdrSettings) -> Result<Self, PluginError> {
        if settings.k == 0 {
            return Err(PluginError::Build("`k` must be at least 1".into()));
        }
        Ok(Self { settings })
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Greedy k-center over the rows of `[n, d]` features; returns `min(k, n)` distinct rows.
pub fn k_center(features: &HostTensor, k: usize) -> Vec<usize> {
    let Some(rows) = features.rows() else { return Vec::new() };
    let rows: Vec<&[f32]> = rows.collect();
    let n = rows.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let d = rows[0].len();
    let mean: Vec<f32> = (0..d).map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / n as f32).collect();
    let first = (0..n)
        .min_by(|a, b| squared_distance(rows[*a], &mean).total_cmp(&squared_distance(rows[*b], &mean)))
        .unwrap_or(0);
    let mut chosen = vec![first];
    let mut nearest: Vec<f32> = rows.iter().map(|r| squared_distance(r, rows[first])).collect();
    while chosen.len() < k.min(n) {
        // Ties go to the lowest index, so selection is deterministic.
        let (next, dist) = nearest
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bd), (i, d)| if *d > bd { (i, *d) } else { (bi, bd) });
        if dist <= 0.0 {
            break; // every remaining frame duplicates an anchor
        }
        chosen.push(next);
        for (i, r) in rows.iter().enumerate() {
            nearest[i] = nearest[i].min(squared_distance(r, rows[next]));
        }
    }
    chosen
}

/// k-means++ over the rows of `[n, d]` features with `iterations` Lloyd steps; returns the
/// distinct rows nearest the centroids (at most `k`), deterministic in `seed`.
pub fn k_means_plus_plus(features: &HostTensor, k: usize, iterations: usize, seed: u64) -> Vec<usize> {
    use rand::Rng as _;
    let Some(rows) = features.rows() else { return Vec::new() };
    let rows: Vec<&[f32]> = rows.collect();
    let n = rows.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let mut rng = seed::rng(seed, 0x4b4d_4541);
    // Seeding: each next centre drawn with probability proportional to its squared distance.
    let mut centres: Vec<Vec<f32>> = vec![rows[rng.random_range(0..n)].to_vec()];
    let mut nearest: Vec<f32> = rows.iter().map(|r| squared_distance(r, &centres[0])).collect();
    while centres.len() < k.min(n) {
        let total: f32 = nearest.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut x = rng.random_range(0.0..total);
        let next = nearest.iter().position(|d| {
            x -= d;
            x < 0.0
        });
        let next = next.unwrap_or(n - 1);
        centres.push(rows[next].to_vec());
        for (i, r) in rows.iter().enumerate() {
            nearest[i] = nearest[i].min(squared_distance(r, rows[next]));
        }
    }
    // Lloyd refinement.
    let assign = |centres: &[Vec<f32>]| -> Vec<usize> {
        rows.iter()
            .map(|r| {
                (0..centres.len())
                    .min_by(|a, b| squared_distance(r, &centres[*a]).total_cmp(&squared_distance(r, &centres[*b])))
                    .unwrap_or(0)
            })
            .collect()
    };
    for _ in 0..iterations {
        let labels = assign(&centres);
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&[f32]> = rows.iter().zip(&labels).filter(|(_, l)| **l == c).map(|(r, _)| *r).collect();
            if members.is_empty() {
                continue;
            }
            for (j, value) in centre.iter_mut().enumerate() {
                *value = members.iter().map(|m| m[j]).sum::<f32>() / members.len() as f32;
            }
        }
    }
    // The frame nearest each centroid, without repeats.
    let mut picked: Vec<usize> = Vec::with_capacity(centres.len());
    for centre in &centres {
        let best = (0..n)
            .filter(|i| !picked.contains(i))
            .min_by(|a, b| squared_distance(rows[*a], centre).total_cmp(&squared_distance(rows[*b], centre)));
        if let Some(best) = best {
            picked.push(best);
        }
    }
    picked
}

impl AnchorReasoner for Adr {
    fn select(&self, standardised: &HostTensor, seed: u64) -> Result<Vec<usize>, AnchorError> {
        let n = standardised.shape().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(AnchorError::Empty);
        }
        let k = self.settings.k.min(n);
        Ok(match self.settings.strategy {
            Strategy::KCenter => k_center(standardised, k),
            Strategy::KmeansPlusPlus => k_means_plus_plus(standardised, k, 10, seed),
            Strategy::Random => {
                let mut picked = sample(&mut seed::rng(seed, 0x5241_4e44), n, k).into_vec();
                picked.sort_unstable();
                picked
            }
            Strategy::All => (0..n).collect(),
        })
    }

    fn quantisation(&self) -> Quantisation {
        self.settings.quantisation
    }

    fn text_anchor_count(&self) -> usize {
        self.settings.text_k.min(self.settings.k)
    }

    fn privacy(&self) -> Option<SummaryPrivacy> {
        self.settings.privacy
    }

    fn anchor_count(&self, frames: usize) -> Option<usize> {
        Some(match self.settings.strategy {
            Strategy::All => frames,
            _ => self.settings.k.min(frames),
        })
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn AnchorReasoner>, PluginError> {
    Ok(Box::new(Adr::new(parse_settings(settings)?)?))
}

/// The `adr` factory: linked statically through inventory, and exported as a plugin library
/// by `plugins/adr/cdylib`.
pub const ADR: Factory<dyn AnchorReasoner, BuildContext> = Factory {
    name: "adr",
    summary: "AnchorFrame Distribution Reasoner: k-center greedy (or k-means++, random, all) anchors, standardised, quantised",
    settings: SettingsSpec::of::<AdrSettings>(),
    build: Build::Static(build),
};

inventory::submit! { StaticPlugin(Plugin::AnchorReasoner(ADR)) }

#[cfg(test)]
mod tests {
    use super::*;
    use mmpg::wire::Envelope;
    use mmpg::{DeviceId, FeatureStats, SchemaHash};
    use proptest::prelude::{Just, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};

    fn features(n: usize, d: usize, values: Vec<f32>) -> HostTensor {
        HostTensor::new(vec![n, d], values).expect("fits")
    }

    /// Three tight clusters of five frames each (rows 0–4, 5–9, 10–14).
    fn three_clusters() -> HostTensor {
        let mut v = Vec::new();
        for c in [0.0f32, 10.0, 20.0] {
            for j in 0..5 {
                v.extend([c + j as f32 * 0.01, -c]);
            }
        }
        features(15, 2, v)
    }

    /// Which clusters the picked rows fall in, sorted.
    fn clusters_of(picked: &[usize]) -> Vec<usize> {
        let mut clusters: Vec<usize> = picked.iter().map(|i| i / 5).collect();
        clusters.sort_unstable();
        clusters
    }

    #[test]
    fn k_center_covers_separated_clusters() {
        assert_eq!(clusters_of(&k_center(&three_clusters(), 3)), [0, 1, 2]);
    }

    #[test]
    fn k_means_plus_plus_covers_separated_clusters() {
        for seed in 0..8 {
            assert_eq!(clusters_of(&k_means_plus_plus(&three_clusters(), 3, 10, seed)), [0, 1, 2], "seed {seed}");
        }
    }

    #[test]
    fn summaries_standardise_against_the_reference() {
        let adr = Adr::new(AdrSettings {
            k: 2,
            strategy: Strategy::KCenter,
            quantisation: Quantisation::F32,
            text_k: 0,
            privacy: None,
        })
        .expect("valid");
        let reference = FeatureStats { mean: vec![1.0, 1.0], std: vec![2.0, 2.0] };
        let s = adr.summarise(&features(2, 2, vec![1.0, 1.0, 5.0, 5.0]), &reference, 1, 0).expect("summary");
        let anchors = s.decoded_anchors().expect("decodes");
        assert_eq!(anchors.shape(), &[2, 2]);
        assert_eq!(s.mean, vec![1.0, 1.0]);
    }

    #[test]
    fn a_silent_reference_dimension_shifted_on_a_device_saturates_f16_instead_of_failing() {
        // The cloud's source features never vary in dimension 1: its std is floored at 1e-4.
        let source = features(4, 3, vec![0.1, 5.0, -1.0, 0.3, 5.0, 0.0, -0.2, 5.0, 1.0, 0.4, 5.0, 0.5]);
        let reference = FeatureStats::of_rows(&source).expect("rows");
        assert_eq!(reference.std[1], 1e-4);
        // On this device that dimension sits ~10 higher: ~1e5 standard deviations, past f16's 65504.
        let window =
            features(5, 3, vec![0.0, 15.0, 0.0, 1.0, 15.2, -1.0, -1.0, 14.9, 0.5, 0.5, 15.1, 1.0, 0.2, 2.0, 0.2]);
        let adr = Adr::new(AdrSettings {
            k: 5,
            strategy: Strategy::All,
            quantisation: Quantisation::F16,
            text_k: 0,
            privacy: None,
        })
        .expect("valid");
        let summary = adr.summarise(&window, &reference, 2, 0).expect("a shifted device still summarises");
        let saturation = summary.saturation().expect("saturation is reported");
        // Rows 0–3 are beyond the range in dimension 1; row 4 ((2 − 5) / 1e-4 = −30000) is not.
        assert_eq!(saturation.values, 4);
        assert_eq!(saturation.to_string(), "4 anchor values saturated at ±65504 (f16)");

        // The cloud receives a finite summary, the saturated values at the bound.
        let envelope = Envelope::summary(DeviceId("cam-7".into()), 1, SchemaHash(1), &summary).expect("encodes");
        let received = Envelope::decode(&envelope.encode().expect("encodes"))
            .and_then(|e| e.to_summary())
            .expect("the cloud accepts the summary");
        let anchors = received.decoded_anchors().expect("decodes");
        assert!(anchors.is_finite() && received.mean.iter().chain(&received.var).all(|v| v.is_finite()));
        let column: Vec<f32> = anchors.rows().expect("matrix").map(|row| row[1]).collect();
        assert_eq!(column[..4], [65504.0; 4]);
        assert!((column[4] + 30_000.0).abs() < 30_000.0 * 2f32.powi(-10), "{}", column[4]);
        // Saturation is the device's to report: the wire does not carry it.
        assert_eq!(received.saturation(), None);
    }

    proptest! {
        #[test]
        fn text_anchors_are_rows_of_the_questions_and_at_most_text_k(
            n in 1usize..20, e in 1usize..5, k in 1usize..8, text_k in 0usize..10,
            values in prop::collection::vec(-3f32..3f32, 100),
        ) {
            let adr = Adr::new(AdrSettings { k, text_k, ..AdrSettings::default() }).expect("valid");
            let text = features(n, e, values[..n * e].to_vec());
            let picked = adr.summarise_text(&text, 3).expect("summarised");
            match picked {
                None => prop_assert_eq!(text_k, 0),
                Some(q) => {
                    let rows = q.dequantise().expect("decodes");
                    prop_assert!(rows.shape()[0] <= text_k.min(k).min(n) && rows.shape()[0] >= 1);
                    prop_assert_eq!(rows.shape()[1], e);
                    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
                    for row in rows.rows().into_iter().flatten() {
                        let found = text.rows().into_iter().flatten().any(|r| r.iter().zip(row).all(|(a, b)| f16(*a) == *b));
                        prop_assert!(found, "{row:?} is not a question row");
                    }
                }
            }
        }

        #[test]
        fn selections_are_distinct_in_range_and_at_most_k(
            n in 1usize..40, d in 1usize..6, k in 1usize..12, seed in any::<u64>(),
            strategy in prop_oneof![Just(Strategy::KCenter), Just(Strategy::KmeansPlusPlus), Just(Strategy::Random)],
            values in prop::collection::vec(-3f32..3f32, 240),
        ) {
            let adr = Adr::new(AdrSettings { k, strategy, quantisation: Quantisation::F16, text_k: 0, privacy: None }).expect("valid");
            let picked = adr.select(&features(n, d, values[..n * d].to_vec()), seed).expect("non-empty");
            prop_assert!(picked.len() <= k.min(n) && !picked.is_empty());
            prop_assert!(picked.iter().all(|i| *i < n));
            let mut dedup = picked.clone();
            dedup.sort_unstable();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), picked.len());
            prop_assert_eq!(adr.select(&features(n, d, values[..n * d].to_vec()), seed).expect("again"), picked);
        }
    }
}
