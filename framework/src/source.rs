//! Data sources: each device's stream and the cloud's labelled source domains.

use crate::data::{Clip, DomainSpec, Shift, Split, TaskSpec};
use crate::seed;

/// Why data could not be produced.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum DataError {
    /// A shift kind this source does not implement.
    #[error("unknown shift kind `{kind}`; this data source supports: {supported}")]
    UnknownShift {
        /// Requested kind.
        kind: String,
        /// Comma-separated supported kinds.
        supported: String,
    },
    /// Severity outside 1..=5.
    #[error("severity must be 1..=5, found {0}")]
    Severity(u8),
    /// Data is missing on disk; names the command that installs it.
    #[error("{what} is missing: run `{install}`")]
    Missing {
        /// What is missing.
        what: String,
        /// The command that installs it.
        install: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Produces labelled and unlabelled clips for any domain. Required: the task, the shift kinds
/// and clip generation; source-domain sampling and shift checks are provided.
pub trait DataSource: Send + Sync {
    /// The answer vocabulary and clip geometry.
    fn task(&self) -> &TaskSpec;

    /// Shift kinds this source can apply.
    fn shift_kinds(&self) -> &[&'static str];

    /// `count` clips of `domain` from `split`, deterministic in `(domain.seed, split, seed)`.
    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError>;

    /// Shift kinds the cloud's source domains may use (default: every kind). A subset holds
    /// whole kinds out for the test devices.
    fn source_kinds(&self) -> &[&'static str] {
        self.shift_kinds()
    }

    /// Whether `domain` differs from the source distribution (the bench's figures are over
    /// these devices): any shift or label shift; sources with other kinds of domains (e.g.
    /// video categories) say so here.
    fn is_shifted(&self, domain: &DomainSpec) -> bool {
        !domain.shifts.is_empty() || domain.class_mix_alpha.is_some()
    }

    /// Number of phrasing families for questions (language shift).
    fn phrasings(&self) -> u32 {
        1
    }

    /// Checks a shift before any data is produced.
    fn check_shift(&self, shift: &Shift) -> Result<(), DataError> {
        if !(1..=5).contains(&shift.severity) {
            return Err(DataError::Severity(shift.severity));
        }
        if !self.shift_kinds().contains(&shift.kind.as_str()) {
            return Err(DataError::UnknownShift { kind: shift.kind.clone(), supported: self.shift_kinds().join(", ") });
        }
        Ok(())
    }

    /// `count` labelled source domains for cloud training: one clean domain, then random
    /// kind × severity combinations (single shifts, some pairs) with random class mixes and
    /// phrasings. Combinations listed in `held_out` (the fleet's) are never drawn, so test
    /// devices see shift combinations the cloud never trained on.
    fn source_domains(&self, count: usize, seed: u64, held_out: &[DomainSpec]) -> Vec<DomainSpec> {
        use rand::Rng as _;
        let mut rng = seed::rng(seed, 0x0053_4f55_5243);
        let kinds = self.source_kinds();
        let held: Vec<String> = held_out.iter().map(DomainSpec::shift_label).collect();
        let mut out = vec![DomainSpec::clean("source-00-clean", seed::derive(seed, 0))];
        // A source without shift kinds has one source domain: its clean data.
        if kinds.is_empty() {
            return out;
        }
        let mut attempts = 0;
        while out.len() < count && attempts < count * 100 {
            attempts += 1;
            // Unshifted frames under a label or language shift: a device can be in
            // distribution visually and still not look like the pretraining mix, and the
            // generator must learn what (not) to change for it.
            if rng.random_bool(CLEAN_SOURCE_SHARE) {
                let domain = DomainSpec {
                    name: format!("source-{:02}-clean", out.len()),
                    shifts: Vec::new(),
                    class_mix_alpha: Some([0.1, 0.3, 1.0][rng.random_range(0..3)]),
                    phrasing: rng.random_range(0..self.phrasings().max(1)),
                    seed: rng.random(),
                };
                out.push(domain);
                continue;
            }
            let mut shifts = vec![Shift {
                kind: kinds[rng.random_range(0..kinds.len())].to_string(),
                severity: rng.random_range(1..=5),
            }];
            if kinds.len() > 1 && rng.random_bool(0.3) {
                let second = kinds[rng.random_range(0..kinds.len())];
                if second != shifts[0].kind {
                    shifts.push(Shift { kind: second.to_string(), severity: rng.random_range(1..=5) });
                }
            }
            let mut domain = DomainSpec {
                name: String::new(),
                shifts,
                class_mix_alpha: if rng.random_bool(0.5) {
                    Some([0.3, 1.0, 3.0][rng.random_range(0..3)])
                } else {
                    None
                },
                phrasing: rng.random_range(0..self.phrasings().max(1)),
                seed: rng.random(),
            };
            if held.contains(&domain.shift_label()) {
                continue;
            }
            domain.name = format!("source-{:02}-{}", out.len(), domain.shift_label());
            out.push(domain);
        }
        out
    }
}

/// Share of the source domains after the first that keep clean frames under a label (and
/// language) shift.
pub const CLEAN_SOURCE_SHARE: f64 = 0.125;

/// Index drawn with probability proportional to `weights` (the last index if rounding leaves
/// the draw past the end).
pub fn weighted_pick(weights: &[f64], rng: &mut seed::Rng) -> usize {
    use rand::Rng as _;
    let total: f64 = weights.iter().sum();
    let mut x = rng.random_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

/// A class mix of `n` classes drawn from Dirichlet(α) (normalised Gamma(α, 1) draws), with a
/// floor that keeps every class possible.
pub fn dirichlet(alpha: f64, n: usize, rng: &mut seed::Rng) -> Vec<f64> {
    use rand_distr::Distribution as _;
    let gamma = rand_distr::Gamma::new(alpha, 1.0).ok();
    let raw: Vec<f64> = (0..n).map(|_| gamma.map_or(1.0, |g| g.sample(rng)).max(1e-3)).collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of clean data only.
    struct Plain(TaskSpec);

    impl DataSource for Plain {
        fn task(&self) -> &TaskSpec {
            &self.0
        }

        fn shift_kinds(&self) -> &[&'static str] {
            &[]
        }

        fn clips(&self, _: &DomainSpec, _: Split, _: usize, _: u64) -> Result<Vec<Clip>, DataError> {
            Ok(Vec::new())
        }
    }

    /// A source with two shift kinds and two phrasings.
    struct Shifty(TaskSpec);

    impl DataSource for Shifty {
        fn task(&self) -> &TaskSpec {
            &self.0
        }

        fn shift_kinds(&self) -> &[&'static str] {
            &["fog", "blur"]
        }

        fn phrasings(&self) -> u32 {
            2
        }

        fn clips(&self, _: &DomainSpec, _: Split, _: usize, _: u64) -> Result<Vec<Clip>, DataError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn source_domains_start_at_the_reference_and_include_clean_frames_under_label_shift() {
        let source = Shifty(TaskSpec { answers: vec!["a".into()], frames_per_clip: 1, frame_shape: [1, 4, 4] });
        let held =
            [DomainSpec { shifts: vec![Shift { kind: "fog".into(), severity: 2 }], ..DomainSpec::clean("d", 1) }];
        let domains = source.source_domains(64, 5, &held);
        assert_eq!(domains.len(), 64);
        assert!(domains[0].shifts.is_empty() && domains[0].class_mix_alpha.is_none(), "the reference comes first");
        let clean: Vec<&DomainSpec> = domains[1..].iter().filter(|d| d.shifts.is_empty()).collect();
        assert!(!clean.is_empty() && clean.len() < domains.len() / 2, "{} clean domains", clean.len());
        assert!(
            clean.iter().all(|d| d.class_mix_alpha.is_some()),
            "beyond the reference, clean frames come label-shifted"
        );
        assert!(domains.iter().all(|d| d.shift_label() != "fog@2"), "held-out shifts are never drawn");
        let names: std::collections::BTreeSet<&str> = domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), domains.len(), "names are unique");
    }

    #[test]
    fn a_source_without_shift_kinds_has_only_its_clean_domain() {
        let source = Plain(TaskSpec { answers: vec!["a".into()], frames_per_clip: 1, frame_shape: [1, 4, 4] });
        let domains = source.source_domains(8, 3, &[]);
        assert_eq!(domains.len(), 1);
        assert!(domains[0].shifts.is_empty());
    }
}
