//! `synthetic`: an embedded multi-device video-QA source that needs no download.
//!
//! Each clip shows one to three identical shapes of one colour moving together in one
//! direction. Questions ask for the colour, the shape, the direction or the count, phrased by
//! the domain's phrasing family; answers come from the generator's ground truth. Devices differ
//! by visual corruption (noise, brightness, contrast, blur at severities 1–5), class mix
//! (Dirichlet α over colours and shapes) and phrasing.

use mmpg::seed::{self, Rng};
use mmpg::source::{dirichlet, weighted_pick};
use mmpg::{
    Build, BuildContext, Check, Clip, DataError, DataSource, DomainSpec, Factory, HostTensor, Plugin, PluginError,
    Settings, SettingsSpec, Split, StaticPlugin, TaskSpec, parse_settings,
};
use rand::Rng as _;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

const COLOURS: [(&str, [f32; 3]); 4] = [
    ("red", [0.9, 0.15, 0.1]),
    ("green", [0.15, 0.8, 0.2]),
    ("blue", [0.15, 0.3, 0.95]),
    ("yellow", [0.9, 0.85, 0.15]),
];
const SHAPES: [&str; 3] = ["square", "circle", "triangle"];
const DIRECTIONS: [(&str, [i32; 2]); 4] = [("left", [-1, 0]), ("right", [1, 0]), ("up", [0, -1]), ("down", [0, 1])];
const COUNTS: [&str; 3] = ["one", "two", "three"];

/// Question templates: `[question type][phrasing family]`.
const QUESTIONS: [[&str; 3]; 4] = [
    ["what colour is the object", "which colour do the shapes have", "tell me the colour you see"],
    ["what shape is the object", "which kind of shape is shown", "name the form in the clip"],
    ["which way does it move", "in which direction do the shapes travel", "where is the motion heading"],
    ["how many objects are there", "count the shapes in the video", "what is the number of items"],
];

/// Shift kinds and their per-severity parameters (severity 1..=5).
const KINDS: [&str; 4] = ["noise", "brightness", "contrast", "blur"];
const NOISE_SIGMA: [f32; 5] = [0.08, 0.12, 0.18, 0.26, 0.38];
const BRIGHTNESS: [f32; 5] = [0.1, 0.2, 0.3, 0.4, 0.5];
const CONTRAST: [f32; 5] = [0.75, 0.5, 0.4, 0.3, 0.15];
const BLUR_SIGMA: [f32; 5] = [0.5, 0.75, 1.0, 1.5, 2.0];

/// Settings of the `synthetic` data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSettings {
    /// Frames per clip.
    pub frames: usize,
    /// Frame side in pixels.
    pub size: usize,
    /// Side of each shape in pixels.
    pub object_size: usize,
    /// Number of phrasing families (1..=3).
    pub phrasings: u32,
}

impl Default for SyntheticSettings {
    fn default() -> Self {
        Self { frames: 4, size: 16, object_size: 4, phrasings: 3 }
    }
}

impl Settings for SyntheticSettings {
    fn check(&self, check: &mut Check) {
        check.within("frames", self.frames, 2..=16);
        check.within("object_size", self.object_size, 3..=32);
        // Shapes travel one pixel per frame in each direction and must stay inside the frame.
        let travel = self.object_size.min(32) + 2 * self.frames.clamp(2, 16).saturating_sub(1) + 2;
        check.within("size", self.size, travel..=128);
        check.within("phrasings", self.phrasings, 1..=3);
    }

    fn clip_bytes(&self) -> Option<u64> {
        // RGB frames as f32, plus question and caption text.
        let pixels = (self.size as u64).saturating_mul(self.size as u64);
        Some((self.frames as u64).saturating_mul(3).saturating_mul(pixels).saturating_mul(4).saturating_add(256))
    }
}

/// The synthetic source.
#[derive(Debug, Clone)]
pub struct Synthetic {
    settings: SyntheticSettings,
    task: TaskSpec,
}

impl Synthetic {
    /// A source with the given settings.
    pub fn new(settings: SyntheticSettings) -> Result<Self, DataError> {
        let SyntheticSettings { frames, size, object_size, phrasings } = settings;
        let travel = object_size + 2 * frames.saturating_sub(1);
        if frames < 2 || size < travel + 2 || object_size < 3 {
            return Err(DataError::Other(format!(
                "need frames >= 2, object_size >= 3 and size >= object_size + 2·(frames−1) + 2 = {}; got frames {frames}, size {size}, object_size {object_size}",
                travel + 2
            )));
        }
        if !(1..=3).contains(&phrasings) {
            return Err(DataError::Other(format!("phrasings must be 1..=3, found {phrasings}")));
        }
        let answers = COLOURS
            .iter()
            .map(|c| c.0)
            .chain(SHAPES)
            .chain(DIRECTIONS.iter().map(|d| d.0))
            .chain(COUNTS)
            .map(String::from)
            .collect();
        Ok(Self { task: TaskSpec { answers, frames_per_clip: frames, frame_shape: [3, size, size] }, settings })
    }

    fn class_mix(&self, domain: &DomainSpec) -> (Vec<f64>, Vec<f64>) {
        let Some(alpha) = domain.class_mix_alpha else {
            return (vec![1.0; COLOURS.len()], vec![1.0; SHAPES.len()]);
        };
        let mut rng = seed::rng(domain.seed, 0x004d_4958);
        let colours = dirichlet(alpha, COLOURS.len(), &mut rng);
        (colours, dirichlet(alpha, SHAPES.len(), &mut rng))
    }

    fn clip(&self, domain: &DomainSpec, mix: &(Vec<f64>, Vec<f64>), rng: &mut Rng) -> Clip {
        let SyntheticSettings { frames, size, object_size, .. } = self.settings;
        let colour = weighted_pick(&mix.0, rng);
        let shape = weighted_pick(&mix.1, rng);
        let direction = rng.random_range(0..DIRECTIONS.len());
        let count = rng.random_range(0..COUNTS.len());
        let step = DIRECTIONS[direction].1;
        let travel = 2 * (frames - 1);
        // Start positions leave room for the whole motion inside the frame.
        let span = |d: i32| -> (usize, usize) {
            match d {
                -1 => (travel, size - object_size),
                1 => (0, size - object_size - travel),
                _ => (0, size - object_size),
            }
        };
        let starts: Vec<(usize, usize)> = (0..=count)
            .map(|_| {
                let (x0, x1) = span(step[0]);
                let (y0, y1) = span(step[1]);
                (rng.random_range(x0..=x1), rng.random_range(y0..=y1))
            })
            .collect();
        let rgb = COLOURS[colour].1;
        let plane = size * size;
        let mut values = vec![0f32; frames * 3 * plane];
        let texture: Vec<f32> = (0..plane).map(|_| rng.random_range(-0.03..0.03)).collect();
        // The clean scene is a function of these draws: equal ids, equal scene before any shift.
        let scene = [colour, shape, direction, count]
            .into_iter()
            .chain(starts.iter().flat_map(|&(x, y)| [x, y]))
            .flat_map(|v| (v as u64).to_le_bytes())
            .chain(texture.iter().flat_map(|t| t.to_le_bytes()));
        let provenance = vec![mmpg::provenance_id(scene)];
        for t in 0..frames {
            let frame = &mut values[t * 3 * plane..(t + 1) * 3 * plane];
            for c in 0..3 {
                for (i, tex) in texture.iter().enumerate() {
                    frame[c * plane + i] = 0.2 + tex;
                }
            }
            for &(x, y) in &starts {
                let ox = (x as i32 + step[0] * 2 * t as i32) as usize;
                let oy = (y as i32 + step[1] * 2 * t as i32) as usize;
                for dy in 0..object_size {
                    for dx in 0..object_size {
                        if covers(SHAPES[shape], dx, dy, object_size) {
                            let (px, py) = (ox + dx, oy + dy);
                            for c in 0..3 {
                                frame[c * plane + py * size + px] = rgb[c];
                            }
                        }
                    }
                }
            }
            for shift in &domain.shifts {
                corrupt(frame, size, &shift.kind, shift.severity, rng);
            }
            for v in frame.iter_mut() {
                *v = v.clamp(0.0, 1.0);
            }
        }
        let family = (domain.phrasing as usize) % (self.settings.phrasings as usize);
        let question_type = rng.random_range(0..QUESTIONS.len());
        let answer = match question_type {
            0 => colour,
            1 => COLOURS.len() + shape,
            2 => COLOURS.len() + SHAPES.len() + direction,
            _ => COLOURS.len() + SHAPES.len() + DIRECTIONS.len() + count,
        };
        let plural = if count == 0 { "" } else { "s" };
        Clip {
            frames: HostTensor::new(vec![frames, 3, size, size], values)
                .expect("the frame buffer is allocated with exactly this shape"),
            question: QUESTIONS[question_type][family].to_string(),
            caption: format!(
                "{} {} {}{plural} moving {}",
                COUNTS[count], COLOURS[colour].0, SHAPES[shape], DIRECTIONS[direction].0
            ),
            answer: Some(answer),
            provenance,
        }
    }
}

fn covers(shape: &str, dx: usize, dy: usize, n: usize) -> bool {
    let c = (n as f32 - 1.0) / 2.0;
    match shape {
        "circle" => {
            let (x, y) = (dx as f32 - c, dy as f32 - c);
            x * x + y * y <= (c + 0.5) * (c + 0.5)
        }
        // Apex up: row dy covers a centred run that widens downwards.
        "triangle" => (dx as f32 - c).abs() <= (dy as f32 + 1.0) / 2.0,
        _ => true,
    }
}

/// Applies one corruption to a `[3, size, size]` frame in place.
fn corrupt(frame: &mut [f32], size: usize, kind: &str, severity: u8, rng: &mut Rng) {
    let s = usize::from(severity.clamp(1, 5)) - 1;
    match kind {
        "noise" => {
            if let Ok(normal) = Normal::new(0.0, NOISE_SIGMA[s]) {
                for v in frame.iter_mut() {
                    *v += normal.sample(rng);
                }
            }
        }
        "brightness" => frame.iter_mut().for_each(|v| *v += BRIGHTNESS[s]),
        "contrast" => {
            let plane = size * size;
            for c in 0..3 {
                let ch = &mut frame[c * plane..(c + 1) * plane];
                let mean = ch.iter().sum::<f32>() / plane as f32;
                ch.iter_mut().for_each(|v| *v = (*v - mean) * CONTRAST[s] + mean);
            }
        }
        "blur" => gaussian_blur(frame, size, BLUR_SIGMA[s]),
        _ => {}
    }
}

fn gaussian_blur(frame: &mut [f32], size: usize, sigma: f32) {
    let radius = (2.0 * sigma).ceil() as i32;
    let kernel: Vec<f32> = (-radius..=radius).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = kernel.iter().sum();
    let plane = size * size;
    let at = |i: i32| i.clamp(0, size as i32 - 1) as usize;
    for ch in frame.chunks_exact_mut(plane) {
        let mut tmp = vec![0f32; plane];
        for y in 0..size {
            for x in 0..size {
                tmp[y * size + x] = (-radius..=radius)
                    .map(|k| ch[y * size + at(x as i32 + k)] * kernel[(k + radius) as usize])
                    .sum::<f32>()
                    / norm;
            }
        }
        for y in 0..size {
            for x in 0..size {
                ch[y * size + x] = (-radius..=radius)
                    .map(|k| tmp[at(y as i32 + k) * size + x] * kernel[(k + radius) as usize])
                    .sum::<f32>()
                    / norm;
            }
        }
    }
}

impl DataSource for Synthetic {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn shift_kinds(&self) -> &[&'static str] {
        &KINDS
    }

    fn phrasings(&self) -> u32 {
        self.settings.phrasings
    }

    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError> {
        for shift in &domain.shifts {
            self.check_shift(shift)?;
        }
        let mix = self.class_mix(domain);
        let mut rng = seed::rng(seed::derive(domain.seed, split.stream_id()), seed);
        Ok((0..count).map(|_| self.clip(domain, &mix, &mut rng)).collect())
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DataSource>, PluginError> {
    Ok(Box::new(Synthetic::new(parse_settings(settings)?)?))
}

inventory::submit! {
    StaticPlugin(Plugin::DataSource(Factory {
        name: "synthetic",
        summary: "procedural video-QA clips (shapes, colours, counts, motion) with per-device shifts; no download",
        settings: SettingsSpec::of::<SyntheticSettings>(),
        build: Build::Static(build),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmpg::Shift;
    use proptest::prelude::*;

    fn source() -> Synthetic {
        Synthetic::new(SyntheticSettings::default()).expect("default settings are valid")
    }

    fn domain(kind: &str, severity: u8) -> DomainSpec {
        DomainSpec { shifts: vec![Shift { kind: kind.into(), severity }], ..DomainSpec::clean("d", 3) }
    }

    #[test]
    fn every_answer_is_in_the_vocabulary_and_frames_in_range() {
        let s = source();
        for clip in s.clips(&domain("noise", 5), Split::Train, 50, 1).expect("clips") {
            assert!(clip.answer.expect("labelled") < s.task().answers.len());
            assert!(clip.frames.values().iter().all(|v| (0.0..=1.0).contains(v)));
            assert_eq!(clip.frames.shape(), &[4, 3, 16, 16]);
        }
    }

    #[test]
    fn unknown_shifts_are_refused_with_the_supported_list() {
        let err = source().clips(&domain("fog", 2), Split::Train, 1, 0).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown shift kind `fog`; this data source supports: noise, brightness, contrast, blur"
        );
    }

    #[test]
    fn splits_differ() {
        let s = source();
        let d = DomainSpec::clean("d", 1);
        let a = s.clips(&d, Split::Train, 4, 0).expect("clips");
        let b = s.clips(&d, Split::Test, 4, 0).expect("clips");
        assert_ne!(a, b);
    }

    #[test]
    fn label_shift_skews_the_class_mix() {
        let s = source();
        let d = DomainSpec { class_mix_alpha: Some(0.1), ..DomainSpec::clean("skewed", 11) };
        let (colours, _) = s.class_mix(&d);
        assert!(colours.iter().cloned().fold(0.0, f64::max) > 0.5, "{colours:?}");
    }

    proptest! {
        #[test]
        fn clips_are_deterministic_per_seed(seed in any::<u64>(), sev in 1u8..=5, k in 0usize..4) {
            let s = source();
            let d = domain(KINDS[k], sev);
            prop_assert_eq!(s.clips(&d, Split::Stream, 3, seed).expect("clips"), s.clips(&d, Split::Stream, 3, seed).expect("clips"));
        }

        #[test]
        fn distortion_grows_with_severity(seed in any::<u64>(), k in 0usize..4) {
            let s = source();
            let clean = s.clips(&DomainSpec::clean("d", 3), Split::Test, 4, seed).expect("clips");
            let mse = |sev: u8| -> f64 {
                let shifted = s.clips(&domain(KINDS[k], sev), Split::Test, 4, seed).expect("clips");
                clean.iter().zip(&shifted).map(|(a, b)| {
                    a.frames.values().iter().zip(b.frames.values()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>()
                }).sum()
            };
            prop_assert!(mse(1) < mse(5), "{}: {} !< {}", KINDS[k], mse(1), mse(5));
        }
    }
}
