//! `herding`: an anchor reasoner by **kernel herding** (Chen, Welling & Smola, "Super-Samples
//! from Kernel Herding", UAI 2010), written outside mmpg and loaded at run time.
//!
//! Kernel herding picks the points whose empirical distribution best matches the window's in
//! maximum mean discrepancy (MMD) under a Gaussian kernel: anchor `t + 1` is the frame
//! maximising `mean_j k(x, x_j) − 1/(t+1) · Σ_{s≤t} k(x, a_s)`, i.e. dense regions first, then
//! regions the anchors so far leave uncovered. Unlike k-center, outliers are not favoured.
//! Cost: O(n² d) for the `n × n` kernel matrix of an `[n, d]` window.
//!
//! The crate is built as a `cdylib` and exports its factory with [`mmpg::export_plugins!`].

use mmpg::{
    AnchorError, AnchorReasoner, Build, BuildContext, Check, Factory, HostTensor, Plugin, PluginError, Quantisation,
    Settings, SettingsSpec, parse_settings,
};
use serde::{Deserialize, Serialize};

/// Settings of the `herding` reasoner (`[anchor.settings]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HerdingSettings {
    /// Number of anchors K.
    pub k: usize,
    /// Gaussian kernel bandwidth σ in standardised units; 0 takes the median pairwise distance
    /// of the window (the median heuristic).
    pub bandwidth: f64,
    /// Upload encoding of the anchors.
    pub quantisation: Quantisation,
    /// Text-side anchors (question embeddings), herded the same way; at most `k`.
    pub text_k: usize,
}

impl Default for HerdingSettings {
    fn default() -> Self {
        Self { k: 8, bandwidth: 0.0, quantisation: Quantisation::F16, text_k: 4 }
    }
}

impl Settings for HerdingSettings {
    fn check(&self, check: &mut Check) {
        check.within("k", self.k, 1..=4096);
        check.real("bandwidth", self.bandwidth, 0.0..=1e6);
        check.within("text_k", self.text_k, 0..=4096);
    }
}

/// The reasoner.
#[derive(Debug, Clone)]
pub struct Herding {
    settings: HerdingSettings,
}

impl Herding {
    /// A reasoner with these settings.
    pub fn new(settings: HerdingSettings) -> Self {
        Self { settings }
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

/// Kernel herding over the rows of `[n, d]` features: `min(k, n)` distinct row indices, in
/// the order picked. `bandwidth` 0 uses the median heuristic. Deterministic: ties go to the
/// lowest index.
pub fn herd(features: &HostTensor, k: usize, bandwidth: f64) -> Vec<usize> {
    let Some(rows) = features.rows() else { return Vec::new() };
    let rows: Vec<&[f32]> = rows.collect();
    let n = rows.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let mut d2 = vec![0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            let d = squared_distance(rows[i], rows[j]);
            d2[i * n + j] = d;
            d2[j * n + i] = d;
        }
    }
    let sigma2 = if bandwidth > 0.0 { bandwidth * bandwidth } else { median_heuristic(&d2, n) };
    let kernel: Vec<f64> = d2.iter().map(|d| (-d / (2.0 * sigma2)).exp()).collect();
    let density: Vec<f64> = (0..n).map(|i| kernel[i * n..(i + 1) * n].iter().sum::<f64>() / n as f64).collect();
    let mut covered = vec![0f64; n];
    let mut picked: Vec<usize> = Vec::with_capacity(k.min(n));
    while picked.len() < k.min(n) {
        let t = picked.len() as f64;
        let score = |i: usize| density[i] - covered[i] / (t + 1.0);
        let best = (0..n).filter(|i| !picked.contains(i)).fold(None, |best: Option<usize>, i| match best {
            Some(b) if score(b) >= score(i) => Some(b),
            _ => Some(i),
        });
        let Some(best) = best else { break };
        picked.push(best);
        for (i, c) in covered.iter_mut().enumerate() {
            *c += kernel[i * n + best];
        }
    }
    picked
}

/// Squared median pairwise distance (off-diagonal), or 1 when every frame is identical.
fn median_heuristic(d2: &[f64], n: usize) -> f64 {
    let mut off: Vec<f64> =
        (0..n).flat_map(|i| ((i + 1)..n).map(move |j| (i, j))).map(|(i, j)| d2[i * n + j]).collect();
    if off.is_empty() {
        return 1.0;
    }
    let mid = off.len() / 2;
    let (_, median, _) = off.select_nth_unstable_by(mid, f64::total_cmp);
    if *median > 0.0 { *median } else { 1.0 }
}

impl AnchorReasoner for Herding {
    fn select(&self, standardised: &HostTensor, _seed: u64) -> Result<Vec<usize>, AnchorError> {
        if standardised.shape().first().copied().unwrap_or(0) == 0 {
            return Err(AnchorError::Empty);
        }
        Ok(herd(standardised, self.settings.k, self.settings.bandwidth))
    }

    fn quantisation(&self) -> Quantisation {
        self.settings.quantisation
    }

    fn text_anchor_count(&self) -> usize {
        self.settings.text_k.min(self.settings.k)
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn AnchorReasoner>, PluginError> {
    Ok(Box::new(Herding::new(parse_settings(settings)?)))
}

/// The `herding` factory.
pub const HERDING: Factory<dyn AnchorReasoner, BuildContext> = Factory {
    name: "herding",
    summary: "kernel herding (Chen, Welling & Smola 2010): anchors whose distribution matches the window in MMD",
    settings: SettingsSpec::of::<HerdingSettings>(),
    build: Build::Static(build),
};

mmpg::export_plugins!(Plugin::AnchorReasoner(HERDING));

#[cfg(test)]
mod tests {
    use super::*;
    use mmpg::FeatureStats;
    use proptest::prelude::*;

    fn tensor(rows: &[Vec<f32>]) -> HostTensor {
        let d = rows.first().map_or(0, Vec::len);
        HostTensor::new(vec![rows.len(), d], rows.concat()).expect("rectangular")
    }

    /// MMD² between the window and a subset of its rows, Gaussian kernel of variance `s2`.
    fn mmd2(rows: &[Vec<f32>], subset: &[usize], s2: f64) -> f64 {
        let k = |a: &[f32], b: &[f32]| (-squared_distance(a, b) / (2.0 * s2)).exp();
        let mean = |xs: &[&[f32]], ys: &[&[f32]]| {
            xs.iter().flat_map(|x| ys.iter().map(move |y| k(x, y))).sum::<f64>() / (xs.len() * ys.len()) as f64
        };
        let all: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let sub: Vec<&[f32]> = subset.iter().map(|i| rows[*i].as_slice()).collect();
        mean(&all, &all) - 2.0 * mean(&all, &sub) + mean(&sub, &sub)
    }

    #[test]
    fn the_first_anchor_is_the_densest_frame_not_the_outlier() {
        let rows = vec![vec![0.0, 0.0], vec![0.1, 0.0], vec![0.0, 0.1], vec![9.0, 9.0]];
        let picked = herd(&tensor(&rows), 1, 1.0);
        assert!(picked[0] < 3, "{picked:?}");
    }

    #[test]
    fn two_clusters_get_one_anchor_each_before_a_second_in_either() {
        let rows = vec![vec![0.0, 0.0], vec![0.2, 0.0], vec![0.0, 0.2], vec![5.0, 5.0], vec![5.2, 5.0], vec![5.0, 5.2]];
        let picked = herd(&tensor(&rows), 2, 1.0);
        assert_eq!(picked.iter().filter(|i| **i < 3).count(), 1, "{picked:?}");
    }

    #[test]
    fn settings_ranges_are_checked_with_their_keys() {
        let table: toml::Table = toml::from_str("k = 0\nbandwidth = -1.0").expect("toml");
        let errors = SettingsSpec::of::<HerdingSettings>().check(&table).expect_err("both out of range");
        let keys: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(keys, ["k", "bandwidth"]);
    }

    #[test]
    fn summaries_carry_k_quantised_anchors() {
        let rows: Vec<Vec<f32>> = (0..20).map(|i| vec![i as f32, (i % 3) as f32]).collect();
        let features = tensor(&rows);
        let reference = FeatureStats::of_rows(&features).expect("2-D");
        let reasoner = Herding::new(HerdingSettings { k: 5, ..HerdingSettings::default() });
        let summary = reasoner.summarise(&features, &reference, 4, 7).expect("summary");
        assert_eq!(summary.anchor_count(), 5);
        assert_eq!(summary.anchors.quantisation(), Quantisation::F16);
    }

    fn window() -> impl Strategy<Value = Vec<Vec<f32>>> {
        (1usize..24, 1usize..6).prop_flat_map(|(n, d)| prop::collection::vec(prop::collection::vec(-4f32..4f32, d), n))
    }

    proptest! {
        #[test]
        fn picks_min_k_n_distinct_rows_in_range(rows in window(), k in 1usize..32) {
            let picked = herd(&tensor(&rows), k, 0.0);
            prop_assert_eq!(picked.len(), k.min(rows.len()));
            let mut sorted = picked.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), picked.len());
            prop_assert!(picked.iter().all(|i| *i < rows.len()));
        }

        #[test]
        fn herding_is_deterministic(rows in window(), k in 1usize..8) {
            prop_assert_eq!(herd(&tensor(&rows), k, 0.0), herd(&tensor(&rows), k, 0.0));
        }

        #[test]
        fn the_densest_frame_comes_first_and_beats_the_mean_random_pick(rows in window()) {
            // The first herded anchor minimises MMD among single frames (it maximises mean
            // kernel similarity), so it is at least as good as the average single frame.
            let s2: f64 = 1.0;
            let picked = herd(&tensor(&rows), 1, s2.sqrt());
            let first = mmd2(&rows, &picked, s2);
            let average = (0..rows.len()).map(|i| mmd2(&rows, &[i], s2)).sum::<f64>() / rows.len() as f64;
            prop_assert!(first <= average + 1e-9, "{first} > {average}");
        }
    }
}
