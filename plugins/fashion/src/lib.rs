//! `fashion`: video-QA clips of real Fashion-MNIST photos under the common-corruption suite.
//!
//! A clip is T real 28×28 photos drawn from the device's class mix (Dirichlet α); questions
//! come from six template families over the frames' labels (what is shown first / last, which
//! item appears most, how many times an item appears, is there an item, did one item come before
//! another), in the device's phrasing; answers come from the labels; captions describe the
//! sequence ("a sneaker, then two bags"). Training clips use the dataset's training images; a
//! device's stream and its held-out clips use the two halves of the test images. Shifts are the
//! corruptions of [`corruptions`] at severities 1–5.
//!
//! The data is Debian's `dataset-fashion-mnist`; `scripts/fetch-data.sh` installs and verifies it.

pub mod corruptions;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use mmpg::seed::{self, Rng};
use mmpg::source::{dirichlet, weighted_pick};
use mmpg::{
    Build, BuildContext, Check, Clip, DataError, DataSource, DomainSpec, Factory, HostTensor, Plugin, PluginError,
    Settings, SettingsSpec, Split, StaticPlugin, TaskSpec, parse_settings,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

/// Fashion-MNIST's classes, in label order.
pub const CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

const NUMBERS: [&str; 9] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"];

/// Question templates: `[family][phrasing]`; `{x}` and `{y}` are class names.
const TEMPLATES: [[&str; 3]; 6] = [
    ["what is shown first", "which item comes first in the clip", "name the first thing you see"],
    ["what is shown last", "which item comes last in the clip", "name the final thing you see"],
    ["which item appears most often", "what is seen the most times", "name the most frequent item"],
    ["how many times does a {x} appear", "count the appearances of a {x}", "in how many frames is there a {x}"],
    ["is there a {x}", "does a {x} appear in the clip", "can you see a {x}"],
    ["did a {x} come before a {y}", "was a {x} shown earlier than a {y}", "does a {x} precede a {y}"],
];

/// Settings of the `fashion` data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FashionSettings {
    /// Folder of the four `*-ubyte.gz` files.
    pub root: PathBuf,
    /// Frames per clip (T), 2..=8.
    pub frames: usize,
    /// Number of phrasing families (1..=3).
    pub phrasings: u32,
    /// Corruption kinds the cloud's source domains may use (empty: every kind). Listing a subset
    /// holds whole kinds out for the test devices.
    pub source_kinds: Vec<String>,
}

impl Default for FashionSettings {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/usr/share/datasets/fashion-mnist"),
            frames: 4,
            phrasings: 3,
            source_kinds: Vec::new(),
        }
    }
}

impl Settings for FashionSettings {
    fn check(&self, check: &mut Check) {
        check.within("frames", self.frames, 2..=8);
        check.within("phrasings", self.phrasings, 1..=3);
    }

    fn clip_bytes(&self) -> Option<u64> {
        // 28×28 grey frames as f32, plus question and caption text.
        Some(self.frames as u64 * 28 * 28 * 4 + 256)
    }
}

/// Images of one split, grouped by class.
#[derive(Debug, Clone)]
struct Pool {
    /// Row-major 28×28 bytes per image.
    images: Vec<[u8; 784]>,
    /// Indices into `images`, per class.
    by_class: Vec<Vec<usize>>,
    /// Provenance id of `images[0]`; the others follow in order.
    first_id: u64,
}

/// Provenance ids of the training file's photos start here, the test file's at [`TEST_FILE_IDS`]:
/// the id names the photo (file and index), whichever pool holds it.
const TRAIN_FILE_IDS: u64 = 0;
const TEST_FILE_IDS: u64 = 1 << 32;

impl Pool {
    fn new(images: Vec<[u8; 784]>, labels: &[u8], first_id: u64) -> Self {
        let mut by_class = vec![Vec::new(); CLASSES.len()];
        for (i, label) in labels.iter().enumerate() {
            by_class[usize::from(*label)].push(i);
        }
        Self { images, by_class, first_id }
    }
}

/// Why an IDX file could not be read. The caller adds the file's path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdxError {
    /// The bytes do not start like gzip.
    #[error("not gzip-compressed (no 1f 8b magic); the dataset ships gzipped IDX files")]
    NotGzip,
    /// Gzip data that does not decompress.
    #[error("corrupt or truncated gzip data: {0}")]
    Gzip(String),
    /// Decompresses past the bound on gzip bombs.
    #[error("decompresses to more than {0} bytes")]
    TooLarge(u64),
    /// Header or size disagree with the expected layout.
    #[error("{0}")]
    Layout(String),
}

/// Largest decompressed IDX file read (the training images are 47 MB): a bound on gzip bombs.
const MAX_IDX_BYTES: u64 = 256 << 20;

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
    gunzip_at_most(bytes, MAX_IDX_BYTES)
}

/// Decompresses every member: `gzip` and `pigz` write a file compressed in parts, or appended
/// to, as members one after the other, and a reader that stops after the first drops the rest.
fn gunzip_at_most(bytes: &[u8], limit: u64) -> Result<Vec<u8>, IdxError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(IdxError::NotGzip);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| IdxError::Gzip(e.to_string()))?;
    if out.len() as u64 > limit {
        return Err(IdxError::TooLarge(limit));
    }
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize) -> Result<usize, IdxError> {
    let b = bytes.get(at..at + 4).ok_or_else(|| IdxError::Layout("header is truncated".into()))?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Parses gzipped IDX images (`0x00000803`, n × 28 × 28 unsigned bytes).
pub fn parse_images(gz: &[u8]) -> Result<Vec<[u8; 784]>, IdxError> {
    let raw = gunzip(gz)?;
    if be_u32(&raw, 0)? != 0x0803 {
        return Err(IdxError::Layout("not an IDX image file (magic 0x00000803)".into()));
    }
    let (n, rows, cols) = (be_u32(&raw, 4)?, be_u32(&raw, 8)?, be_u32(&raw, 12)?);
    if (rows, cols) != (28, 28) {
        return Err(IdxError::Layout(format!("images are {rows}×{cols}, expected 28×28")));
    }
    let body = &raw[16..];
    let needed = n.saturating_mul(784);
    if body.len() != needed {
        return Err(IdxError::Layout(format!("{n} images need {needed} bytes, found {}", body.len())));
    }
    Ok(body
        .chunks_exact(784)
        .map(|c| {
            let mut image = [0u8; 784];
            image.copy_from_slice(c);
            image
        })
        .collect())
}

/// Parses gzipped IDX labels (`0x00000801`, n bytes, each below 10).
pub fn parse_labels(gz: &[u8]) -> Result<Vec<u8>, IdxError> {
    let raw = gunzip(gz)?;
    if be_u32(&raw, 0)? != 0x0801 {
        return Err(IdxError::Layout("not an IDX label file (magic 0x00000801)".into()));
    }
    let n = be_u32(&raw, 4)?;
    let body = &raw[8..];
    if body.len() != n {
        return Err(IdxError::Layout(format!("{n} labels declared, {} present", body.len())));
    }
    if let Some(bad) = body.iter().find(|l| usize::from(**l) >= CLASSES.len()) {
        return Err(IdxError::Layout(format!("label {bad} is not a Fashion-MNIST class")));
    }
    Ok(body.to_vec())
}

/// The Fashion-MNIST clip source.
#[derive(Debug, Clone)]
pub struct Fashion {
    settings: FashionSettings,
    task: TaskSpec,
    train: Pool,
    stream: Pool,
    test: Pool,
    source_kinds: Vec<&'static str>,
}

/// The command that installs the data, named in every "missing" error.
pub const INSTALL: &str = "scripts/fetch-data.sh";

fn read_split(root: &Path, prefix: &str) -> Result<(Vec<[u8; 784]>, Vec<u8>), DataError> {
    let read = |path: &Path| -> Result<Vec<u8>, DataError> {
        std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                DataError::Missing { what: format!("Fashion-MNIST ({})", path.display()), install: INSTALL.into() }
            }
            _ => DataError::Other(format!("{}: {e}", path.display())),
        })
    };
    let bad = |path: &Path, e: IdxError| DataError::Other(format!("{}: {e}", path.display()));
    let images_path = root.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = root.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let images = parse_images(&read(&images_path)?).map_err(|e| bad(&images_path, e))?;
    let labels = parse_labels(&read(&labels_path)?).map_err(|e| bad(&labels_path, e))?;
    if images.len() != labels.len() {
        return Err(DataError::Other(format!(
            "{} holds {} images but {} holds {} labels",
            images_path.display(),
            images.len(),
            labels_path.display(),
            labels.len()
        )));
    }
    Ok((images, labels))
}

impl Fashion {
    /// Reads the dataset from `settings.root`.
    pub fn new(settings: FashionSettings) -> Result<Self, DataError> {
        let (train_images, train_labels) = read_split(&settings.root, "train")?;
        let (test_images, test_labels) = read_split(&settings.root, "t10k")?;
        let half = test_images.len() / 2;
        Self::from_pools(
            settings,
            Pool::new(train_images, &train_labels, TRAIN_FILE_IDS),
            Pool::new(test_images[..half].to_vec(), &test_labels[..half], TEST_FILE_IDS),
            Pool::new(test_images[half..].to_vec(), &test_labels[half..], TEST_FILE_IDS + half as u64),
        )
    }

    fn from_pools(settings: FashionSettings, train: Pool, stream: Pool, test: Pool) -> Result<Self, DataError> {
        if !(2..=8).contains(&settings.frames) || !(1..=3).contains(&settings.phrasings) {
            return Err(DataError::Other(format!(
                "need 2 <= frames <= 8 and 1 <= phrasings <= 3; got frames {}, phrasings {}",
                settings.frames, settings.phrasings
            )));
        }
        for pool in [&train, &stream, &test] {
            if let Some(c) = pool.by_class.iter().position(Vec::is_empty) {
                return Err(DataError::Other(format!("a split has no image of class `{}`", CLASSES[c])));
            }
        }
        let source_kinds = if settings.source_kinds.is_empty() {
            corruptions::KINDS.to_vec()
        } else {
            settings
                .source_kinds
                .iter()
                .map(|k| {
                    corruptions::KINDS.iter().copied().find(|known| known == k).ok_or_else(|| DataError::UnknownShift {
                        kind: k.clone(),
                        supported: corruptions::KINDS.join(", "),
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let mut answers: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
        answers.extend(NUMBERS[..=settings.frames].iter().map(|n| n.to_string()));
        answers.extend(["yes".to_string(), "no".to_string()]);
        let task = TaskSpec { answers, frames_per_clip: settings.frames, frame_shape: [1, 28, 28] };
        Ok(Self { settings, task, train, stream, test, source_kinds })
    }

    fn answer(&self, word: &str) -> usize {
        self.task.answers.iter().position(|a| a == word).expect("answers are built from the same words")
    }

    fn class_mix(domain: &DomainSpec) -> Vec<f64> {
        match domain.class_mix_alpha {
            Some(alpha) => dirichlet(alpha, CLASSES.len(), &mut seed::rng(domain.seed, 0x004d_4958)),
            None => vec![1.0; CLASSES.len()],
        }
    }

    fn clip(&self, domain: &DomainSpec, pool: &Pool, mix: &[f64], rng: &mut Rng) -> Result<Clip, DataError> {
        let t = self.settings.frames;
        let labels: Vec<usize> = (0..t).map(|_| weighted_pick(mix, rng)).collect();
        let mut values = Vec::with_capacity(t * 784);
        let mut provenance = Vec::with_capacity(t);
        for &label in &labels {
            let candidates = &pool.by_class[label];
            let index = candidates[rng.random_range(0..candidates.len())];
            provenance.push(pool.first_id + index as u64);
            let image = &pool.images[index];
            let mut frame: Vec<f32> = image.iter().map(|p| f32::from(*p) / 255.0).collect();
            for shift in &domain.shifts {
                corruptions::corrupt(&mut frame, 28, &shift.kind, shift.severity, rng)
                    .map_err(|e| DataError::Other(e.to_string()))?;
            }
            values.extend(frame);
        }
        let phrasing = (domain.phrasing as usize) % (self.settings.phrasings as usize);
        let (question, answer) = self.question(&labels, phrasing, rng);
        Ok(Clip {
            frames: HostTensor::new(vec![t, 1, 28, 28], values).expect("T frames of 28×28 were pushed"),
            question,
            caption: caption(&labels),
            answer: Some(answer),
            provenance,
        })
    }

    fn question(&self, labels: &[usize], phrasing: usize, rng: &mut Rng) -> (String, usize) {
        let mut distinct: Vec<usize> = Vec::new();
        for l in labels {
            if !distinct.contains(l) {
                distinct.push(*l);
            }
        }
        // "Did X come before Y" needs two different items; other clips ask a presence question.
        let mut family = rng.random_range(0..TEMPLATES.len());
        if family == 5 && distinct.len() < 2 {
            family = 4;
        }
        let count = |c: usize| labels.iter().filter(|l| **l == c).count();
        let fill =
            |x: usize, y: usize| TEMPLATES[family][phrasing].replace("{x}", CLASSES[x]).replace("{y}", CLASSES[y]);
        let yes_no = |b: bool| self.answer(if b { "yes" } else { "no" });
        match family {
            0 => (fill(0, 0), labels[0]),
            1 => (fill(0, 0), labels[labels.len() - 1]),
            // Ties go to the item seen first among the most frequent.
            2 => (
                fill(0, 0),
                *distinct.iter().max_by_key(|c| (count(**c), usize::MAX - first(labels, **c))).unwrap_or(&0),
            ),
            3 => {
                let x = if rng.random_bool(0.7) {
                    labels[rng.random_range(0..labels.len())]
                } else {
                    rng.random_range(0..CLASSES.len())
                };
                (fill(x, x), self.answer(NUMBERS[count(x)]))
            }
            4 => {
                let x = if rng.random_bool(0.5) {
                    labels[rng.random_range(0..labels.len())]
                } else {
                    rng.random_range(0..CLASSES.len())
                };
                (fill(x, x), yes_no(count(x) > 0))
            }
            _ => {
                let i = rng.random_range(0..distinct.len());
                let j = (i + rng.random_range(1..distinct.len())) % distinct.len();
                let (x, y) = (distinct[i], distinct[j]);
                (fill(x, y), yes_no(first(labels, x) < first(labels, y)))
            }
        }
    }
}

fn first(labels: &[usize], class: usize) -> usize {
    labels.iter().position(|l| *l == class).unwrap_or(usize::MAX)
}

fn plural(name: &str) -> String {
    match name {
        "dress" => "dresses".into(),
        "trouser" => "trousers".into(),
        other => format!("{other}s"),
    }
}

/// "a sneaker, then two bags, then an ankle boot": runs of equal labels in order.
pub fn caption(labels: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for l in labels {
        match runs.last_mut() {
            Some((c, n)) if c == l => *n += 1,
            _ => runs.push((*l, 1)),
        }
    }
    let phrase = |(c, n): &(usize, usize)| {
        let name = CLASSES[*c];
        if *n == 1 {
            let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            format!("{article} {name}")
        } else {
            format!("{} {}", NUMBERS[*n], plural(name))
        }
    };
    runs.iter().map(phrase).collect::<Vec<_>>().join(", then ")
}

impl DataSource for Fashion {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn shift_kinds(&self) -> &[&'static str] {
        &corruptions::KINDS
    }

    fn source_kinds(&self) -> &[&'static str] {
        &self.source_kinds
    }

    fn phrasings(&self) -> u32 {
        self.settings.phrasings
    }

    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError> {
        for shift in &domain.shifts {
            self.check_shift(shift)?;
        }
        let pool = match split {
            Split::Train => &self.train,
            Split::Stream => &self.stream,
            Split::Test => &self.test,
        };
        let mix = Self::class_mix(domain);
        let mut rng = seed::rng(seed::derive(domain.seed, split.stream_id()), seed);
        (0..count).map(|_| self.clip(domain, pool, &mix, &mut rng)).collect()
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DataSource>, PluginError> {
    Ok(Box::new(Fashion::new(parse_settings(settings)?)?))
}

inventory::submit! {
    StaticPlugin(Plugin::DataSource(Factory {
        name: "fashion",
        summary: "clips of real Fashion-MNIST photos with label questions, under the CIFAR-10-C corruption suite",
        settings: SettingsSpec::of::<FashionSettings>(),
        build: Build::Static(build),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny stand-in dataset: every class has a few flat images of its own grey level.
    fn source(frames: usize) -> Fashion {
        let pool = |first_id| {
            let images: Vec<[u8; 784]> = (0..30).map(|i| [(i % 10 * 25) as u8; 784]).collect();
            let labels: Vec<u8> = (0..30).map(|i| (i % 10) as u8).collect();
            Pool::new(images, &labels, first_id)
        };
        let settings = FashionSettings { frames, ..FashionSettings::default() };
        Fashion::from_pools(settings, pool(0), pool(100), pool(200)).expect("valid")
    }

    #[test]
    fn each_frame_names_its_photo_and_splits_share_none() {
        let src = source(4);
        let domain = DomainSpec { class_mix_alpha: Some(0.5), ..DomainSpec::clean("d", 3) };
        let ids = |split| -> std::collections::BTreeSet<u64> {
            let clips = src.clips(&domain, split, 40, 1).expect("clips");
            assert!(clips.iter().all(|c| c.provenance.len() == 4), "one id per frame");
            clips.iter().flat_map(|c| c.provenance.iter().copied()).collect()
        };
        let (train, stream, test) = (ids(Split::Train), ids(Split::Stream), ids(Split::Test));
        assert!(train.iter().all(|id| *id < 30) && stream.iter().all(|id| (100..130).contains(id)), "{train:?}");
        assert!(test.iter().all(|id| (200..230).contains(id)), "{test:?}");
    }

    #[test]
    fn captions_group_runs() {
        assert_eq!(caption(&[7, 8, 8]), "a sneaker, then two bags");
        assert_eq!(caption(&[9, 0, 0, 0]), "an ankle boot, then three t-shirts");
        assert_eq!(caption(&[3, 3]), "two dresses");
    }

    #[test]
    fn missing_data_names_the_install_command() {
        let err = Fashion::new(FashionSettings { root: "/nonexistent".into(), ..FashionSettings::default() })
            .expect_err("no data there");
        assert!(err.to_string().contains("run `scripts/fetch-data.sh`"), "{err}");
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).expect("in memory");
        e.finish().expect("in memory")
    }

    #[test]
    fn a_gzip_file_of_several_members_is_read_whole() {
        // As `cat a.gz b.gz` or a parallel compressor writes it: header and first image in one
        // member, the second image in another.
        let mut first = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
        first.extend([7u8; 784]);
        let mut file = gz(&first);
        file.extend(gz(&[9u8; 784]));
        let images = parse_images(&file).expect("both members");
        assert_eq!(images.len(), 2);
        assert!(images[0].iter().all(|p| *p == 7) && images[1].iter().all(|p| *p == 9));
        let mut labels = gz(&[0, 0, 8, 1, 0, 0, 0, 3, 1]);
        labels.extend(gz(&[2]));
        labels.extend(gz(&[3]));
        assert_eq!(parse_labels(&labels).expect("three members"), vec![1, 2, 3]);
    }

    #[test]
    fn the_decompressed_size_bound_covers_all_members_together() {
        let member = gz(&[0u8; 600]);
        let mut two = member.clone();
        two.extend(&member);
        assert_eq!(gunzip_at_most(&member, 1000).expect("one member fits").len(), 600);
        assert_eq!(gunzip_at_most(&two, 1000), Err(IdxError::TooLarge(1000)));
        assert_eq!(gunzip_at_most(&two, 1200).expect("exactly at the bound").len(), 1200);
    }

    #[test]
    fn a_corrupt_file_is_named_with_its_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), b"<html>404</html>").expect("write");
        let err = Fashion::new(FashionSettings { root: dir.path().to_path_buf(), ..FashionSettings::default() })
            .expect_err("not gzip")
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte.gz: not gzip-compressed"), "{err}");
        let images = gz(&[0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28]);
        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), images).expect("write");
        std::fs::create_dir(dir.path().join("train-labels-idx1-ubyte.gz")).expect("a folder where a file belongs");
        let err = Fashion::new(FashionSettings { root: dir.path().to_path_buf(), ..FashionSettings::default() })
            .expect_err("unreadable")
            .to_string();
        assert!(err.contains("train-labels-idx1-ubyte.gz: ") && !err.contains("is missing"), "{err}");
    }

    #[test]
    fn idx_parsers_refuse_malformed_files() {
        assert_eq!(parse_images(b"not gzip"), Err(IdxError::NotGzip));
        let truncated = gz(&[0, 0, 8, 1, 0, 0, 0, 2, 3, 9]);
        let err = parse_labels(&truncated[..truncated.len() - 6]).expect_err("cut short");
        assert!(matches!(err, IdxError::Gzip(_)), "{err}");
        assert!(parse_images(&gz(&[0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28])).is_err(), "truncated body");
        assert!(parse_labels(&gz(&[0, 0, 8, 1, 0, 0, 0, 1, 12])).is_err(), "label 12");
        assert_eq!(parse_labels(&gz(&[0, 0, 8, 1, 0, 0, 0, 2, 3, 9])).expect("valid"), vec![3, 9]);
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
        images.extend([7u8; 784]);
        assert_eq!(parse_images(&gz(&images)).expect("valid").len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn answers_follow_from_the_frames_labels(seed in any::<u64>(), frames in 2usize..6, phrasing in 0u32..3) {
            let src = source(frames);
            let domain = DomainSpec { phrasing, ..DomainSpec::clean("d", seed) };
            for clip in src.clips(&domain, Split::Test, 16, 1).expect("clips") {
                // Frames are flat images whose grey level encodes the class.
                let labels: Vec<usize> = clip.frames.values().chunks(784).map(|f| (f[0] * 255.0 / 25.0).round() as usize).collect();
                let answer = clip.answer.expect("labelled");
                prop_assert!(answer < src.task().answers.len());
                let word = src.task().answers[answer].as_str();
                let q = &clip.question;
                if q.contains("first") && !q.contains("before") {
                    prop_assert_eq!(word, CLASSES[labels[0]]);
                } else if q.contains("last") || q.contains("final") {
                    prop_assert_eq!(word, CLASSES[labels[frames - 1]]);
                }
                prop_assert_eq!(clip.caption.clone(), caption(&labels));
            }
        }

        #[test]
        fn clips_are_deterministic_per_seed(seed in any::<u64>(), k in 0usize..corruptions::KINDS.len(), severity in 1u8..=5) {
            let src = source(3);
            let domain = DomainSpec {
                shifts: vec![mmpg::Shift { kind: corruptions::KINDS[k].into(), severity }],
                ..DomainSpec::clean("d", seed)
            };
            let a = src.clips(&domain, Split::Stream, 3, 5).expect("clips");
            prop_assert_eq!(&a, &src.clips(&domain, Split::Stream, 3, 5).expect("again"));
            prop_assert!(a.iter().all(|c| c.frames.values().iter().all(|v| (0.0..=1.0).contains(v))));
        }
    }
}
