//! `videoqa`: the MSRVTT-QA / MSVD-QA format with pre-extracted frame features.
//!
//! Annotations are the released JSON lists (`train_qa.json`, `test_qa.json`) of
//! `{"question", "answer", "video_id"}` objects (`video_id` a number or a string). Open-ended QA
//! is scored as classification over the `top_answers` most frequent training answers (1000, as
//! commonly scored; ties broken alphabetically): training questions with another answer are
//! skipped, test questions with another answer are kept unlabelled (unscored). Each video's
//! frame features are a `[T, d]` float tensor (16, 32 or 64 bits) in
//! `<features>/<video_prefix><id>.safetensors` (tensor `features`) or `.npy`; clips take `frames`
//! of them, evenly spaced. Answers are compared as the benchmarks score them: lower-case, with
//! whitespace trimmed and collapsed. The QA annotations carry no captions, so a clip's question
//! stands in for its caption in retrieval.
//!
//! Devices are defined by a mapping from device names to video categories (`devices`, with
//! `categories` mapping videos to categories, e.g. MSRVTT's 20); the cloud's source domains are
//! one per category. A device's stream and its scored clips are the two halves of the test set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mmpg::seed;
use mmpg::{
    Build, BuildContext, Check, Clip, DataError, DataSource, DomainSpec, Factory, HostTensor, Plugin, PluginError,
    Settings, SettingsSpec, Split, StaticPlugin, TaskSpec, parse_settings,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

mod features;

pub use features::{FeaturesError, encode_npy, encode_npy_as, parse_npy, parse_safetensors_features};

/// Settings of the `videoqa` data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoQaSettings {
    /// Folder of `train_qa.json` and `test_qa.json`.
    pub annotations: PathBuf,
    /// Folder of per-video `[T, d]` features (`.safetensors` with tensor `features`, or `.npy`).
    pub features: PathBuf,
    /// File-name prefix of a video's features (`video` + `7010` for MSRVTT).
    pub video_prefix: String,
    /// Frames per clip, evenly spaced over the video's features.
    pub frames: usize,
    /// Answer vocabulary size: the most frequent training answers.
    pub top_answers: usize,
    /// JSON object mapping video ids to category numbers (optional).
    pub categories: Option<PathBuf>,
    /// Device name → the categories of the videos it sees (devices not listed see all).
    pub devices: BTreeMap<String, Vec<u32>>,
}

impl Default for VideoQaSettings {
    fn default() -> Self {
        Self {
            annotations: PathBuf::from("data/msrvtt-qa"),
            features: PathBuf::from("data/msrvtt-qa/features"),
            video_prefix: "video".into(),
            frames: 16,
            top_answers: 1000,
            categories: None,
            devices: BTreeMap::new(),
        }
    }
}

impl Settings for VideoQaSettings {
    fn check(&self, check: &mut Check) {
        check.within("frames", self.frames, 1..=256);
        check.within("top_answers", self.top_answers, 1..=100_000);
        // The prefix becomes part of a file name inside `features`: it may not leave the folder.
        let p = &self.video_prefix;
        if p.contains(['/', '\\', '\0']) || p.contains("..") {
            check.fail("video_prefix", format!("`{p}` must be a plain file-name prefix (no path separators or `..`)"));
        }
    }
}

/// A video id as the annotation files write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
enum VideoId {
    Number(u64),
    Text(String),
}

impl VideoId {
    fn key(&self) -> String {
        match self {
            VideoId::Number(n) => n.to_string(),
            VideoId::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Annotation {
    question: String,
    answer: String,
    video_id: VideoId,
}

/// One question about one video, its answer index if in the vocabulary.
#[derive(Debug, Clone)]
struct Entry {
    question: String,
    answer: Option<usize>,
    video: String,
    category: Option<u32>,
}

/// The `videoqa` data source.
pub struct VideoQa {
    settings: VideoQaSettings,
    task: TaskSpec,
    train: Vec<Entry>,
    test: Vec<Entry>,
    features: Mutex<HashMap<String, Arc<HostTensor>>>,
    dim: usize,
}

impl std::fmt::Debug for VideoQa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoQa").field("train", &self.train.len()).field("test", &self.test.len()).finish()
    }
}

fn other(message: String) -> DataError {
    DataError::Other(message)
}

/// An answer as MSRVTT-QA and MSVD-QA are scored: "Man" and " man " are one answer.
pub fn normalise_answer(answer: &str) -> String {
    answer.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Refuses a video id that could name a file outside the features folder: it becomes part of a
/// file name there.
fn check_video_id(id: &str, file: &Path) -> Result<(), DataError> {
    let problem = if id.is_empty() {
        Some("is empty")
    } else if id.contains(['/', '\\']) {
        Some("holds a path separator")
    } else if id.contains("..") {
        Some("holds a parent reference `..`")
    } else if id.contains('\0') {
        Some("holds a NUL byte")
    } else if (cfg!(windows) && id.contains(':'))
        || !matches!(Path::new(id).components().collect::<Vec<_>>()[..], [std::path::Component::Normal(_)])
    {
        // A drive prefix, `.`, or anything else this platform reads as other than one name.
        Some("is not a plain file name")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(other(format!(
            "{}: video_id {id:?} {problem}; video ids must be plain names inside the features folder",
            file.display()
        ))),
        None => Ok(()),
    }
}

/// An annotation file's entries, with answers normalised and video ids checked.
fn read_annotations(path: &Path) -> Result<Vec<Annotation>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| other(format!("{}: {e}", path.display())))?;
    let mut annotations: Vec<Annotation> = serde_json::from_slice(&bytes)
        .map_err(|e| other(format!("{}: not a list of question/answer/video_id: {e}", path.display())))?;
    for a in &mut annotations {
        check_video_id(&a.video_id.key(), path)?;
        a.answer = normalise_answer(&a.answer);
    }
    Ok(annotations)
}

/// The `k` most frequent answers, ties broken alphabetically.
pub fn answer_vocabulary<'a>(answers: impl Iterator<Item = &'a str>, k: usize) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in answers {
        *counts.entry(a).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ranked.into_iter().take(k).map(|(a, _)| a.to_string()).collect()
}

impl VideoQa {
    /// Reads the annotations and the first video's features (for d); other features on demand.
    pub fn new(settings: VideoQaSettings) -> Result<Self, DataError> {
        if settings.frames == 0 || settings.top_answers == 0 {
            return Err(other("`frames` and `top_answers` must be at least 1".into()));
        }
        let missing = |path: &Path| DataError::Missing {
            what: format!("video-QA annotations ({})", path.display()),
            install: format!("place train_qa.json and test_qa.json in {}", settings.annotations.display()),
        };
        let train_path = settings.annotations.join("train_qa.json");
        let test_path = settings.annotations.join("test_qa.json");
        for path in [&train_path, &test_path] {
            if !path.exists() {
                return Err(missing(path));
            }
        }
        let train_raw = read_annotations(&train_path)?;
        let test_raw = read_annotations(&test_path)?;
        let categories: HashMap<String, u32> = match &settings.categories {
            None => HashMap::new(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| other(format!("{}: {e}", path.display())))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| other(format!("{}: not an object of video id → category: {e}", path.display())))?
            }
        };
        // Answers were normalised on reading, so the vocabulary and the scoring agree.
        let answers = answer_vocabulary(train_raw.iter().map(|a| a.answer.as_str()), settings.top_answers);
        let index: HashMap<&str, usize> = answers.iter().enumerate().map(|(i, a)| (a.as_str(), i)).collect();
        let entry = |a: &Annotation| Entry {
            question: a.question.clone(),
            answer: index.get(a.answer.as_str()).copied(),
            video: a.video_id.key(),
            category: categories.get(&a.video_id.key()).copied(),
        };
        let train: Vec<Entry> = train_raw.iter().map(entry).filter(|e| e.answer.is_some()).collect();
        let test: Vec<Entry> = test_raw.iter().map(entry).collect();
        if train.is_empty() || test.len() < 2 {
            return Err(other("need at least one training question and two test questions".into()));
        }
        let mut source = Self {
            task: TaskSpec { answers: Vec::new(), frames_per_clip: settings.frames, frame_shape: [1, 1, 1] },
            settings,
            train,
            test,
            features: Mutex::new(HashMap::new()),
            dim: 0,
        };
        let first = source.train[0].video.clone();
        source.dim = source.load_features(&first)?.shape()[1];
        source.task = TaskSpec { answers, frames_per_clip: source.settings.frames, frame_shape: [source.dim, 1, 1] };
        Ok(source)
    }

    /// A video's `[T, d]` features, read once and validated.
    fn load_features(&self, video: &str) -> Result<Arc<HostTensor>, DataError> {
        if let Some(t) = self.features.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(video) {
            return Ok(t.clone());
        }
        let stem = format!("{}{video}", self.settings.video_prefix);
        let st_path = self.settings.features.join(format!("{stem}.safetensors"));
        let npy_path = self.settings.features.join(format!("{stem}.npy"));
        // Only an absent file falls through to the other format; any other failure is reported.
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(other(format!("{}: {e}", path.display()))),
        };
        let parsed = |path: &Path, result: Result<HostTensor, FeaturesError>| {
            result.map_err(|e| other(format!("{}: {e}", path.display())))
        };
        let (path, tensor) = if let Some(bytes) = read(&st_path)? {
            let tensor = parsed(&st_path, parse_safetensors_features(&bytes))?;
            (st_path, tensor)
        } else if let Some(bytes) = read(&npy_path)? {
            let tensor = parsed(&npy_path, parse_npy(&bytes))?;
            (npy_path, tensor)
        } else {
            return Err(DataError::Missing {
                what: format!("features of video `{video}` ({} or .npy)", st_path.display()),
                install: format!("extract [T, d] frame features into {}", self.settings.features.display()),
            });
        };
        let shape = tensor.shape().to_vec();
        let expected_dim = if self.dim == 0 { shape.get(1).copied().unwrap_or(0) } else { self.dim };
        if shape.len() != 2 || shape[0] < self.settings.frames || shape[1] != expected_dim || expected_dim == 0 {
            return Err(other(format!(
                "{}: features must be [T ≥ {}, {}], found {shape:?}",
                path.display(),
                self.settings.frames,
                if expected_dim == 0 { "d".to_string() } else { expected_dim.to_string() }
            )));
        }
        if !tensor.is_finite() {
            return Err(other(format!("{}: features hold non-finite values", path.display())));
        }
        let tensor = Arc::new(tensor);
        self.features
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(video.to_string(), tensor.clone());
        Ok(tensor)
    }

    /// Categories a domain sees: a `category-K` source domain sees K; a mapped device its list.
    fn categories_of(&self, domain: &DomainSpec) -> Option<Vec<u32>> {
        if let Some(k) = domain.name.strip_prefix("category-").and_then(|k| k.parse().ok()) {
            return Some(vec![k]);
        }
        self.settings.devices.get(&domain.name).cloned()
    }

    fn clip(&self, entry: &Entry) -> Result<Clip, DataError> {
        let features = self.load_features(&entry.video)?;
        let [t, d] = [features.shape()[0], features.shape()[1]];
        let frames = self.settings.frames;
        let values: Vec<f32> = (0..frames)
            .flat_map(|i| {
                let row = if frames == 1 { 0 } else { i * (t - 1) / (frames - 1) };
                features.values()[row * d..(row + 1) * d].to_vec()
            })
            .collect();
        Ok(Clip {
            frames: HostTensor::new(vec![frames, d, 1, 1], values).expect("frames × d values were gathered"),
            question: entry.question.clone(),
            caption: entry.question.clone(),
            answer: entry.answer,
            // The video is the source material: its frames are what a summary carries.
            provenance: vec![mmpg::provenance_id(entry.video.bytes())],
        })
    }
}

impl DataSource for VideoQa {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn shift_kinds(&self) -> &[&'static str] {
        &[]
    }

    fn is_shifted(&self, domain: &DomainSpec) -> bool {
        // A device that sees only some categories sees another distribution than the cloud's.
        self.categories_of(domain).is_some() || !domain.shifts.is_empty() || domain.class_mix_alpha.is_some()
    }

    fn source_domains(&self, count: usize, seed: u64, _held_out: &[DomainSpec]) -> Vec<DomainSpec> {
        let mut categories: Vec<u32> = self.train.iter().filter_map(|e| e.category).collect();
        categories.sort_unstable();
        categories.dedup();
        let mut out = vec![DomainSpec::clean("all-videos", seed::derive(seed, 0))];
        out.extend(
            categories
                .iter()
                .map(|c| DomainSpec::clean(format!("category-{c}"), seed::derive(seed, u64::from(*c) + 1))),
        );
        out.truncate(count.max(1));
        out
    }

    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError> {
        for shift in &domain.shifts {
            self.check_shift(shift)?;
        }
        let wanted = self.categories_of(domain);
        let in_domain = |e: &&Entry| wanted.as_ref().is_none_or(|w| e.category.is_some_and(|c| w.contains(&c)));
        // The stream and the scored clips are the two halves of the test questions.
        let pool: Vec<&Entry> = match split {
            Split::Train => self.train.iter().filter(in_domain).collect(),
            Split::Stream => self.test.iter().step_by(2).filter(in_domain).collect(),
            Split::Test => self.test.iter().skip(1).step_by(2).filter(in_domain).collect(),
        };
        if pool.is_empty() {
            return Err(other(format!("device `{}` has no {split:?} questions in its categories", domain.name)));
        }
        let mut rng = seed::rng(seed::derive(domain.seed, split.stream_id()), seed);
        (0..count).map(|_| self.clip(pool[rng.random_range(0..pool.len())])).collect()
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn DataSource>, PluginError> {
    Ok(Box::new(VideoQa::new(parse_settings(settings)?)?))
}

inventory::submit! {
    StaticPlugin(Plugin::DataSource(Factory {
        name: "videoqa",
        summary: "MSRVTT-QA / MSVD-QA annotations with pre-extracted [T, d] frame features; devices by video category",
        settings: SettingsSpec::of::<VideoQaSettings>(),
        build: Build::Static(build),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
        encode_npy(shape, values)
    }

    /// A fixture in the released format: 6 videos in 2 categories, features of 8 × 5, half as
    /// safetensors and half as .npy.
    fn fixture(dir: &Path) -> VideoQaSettings {
        let features = dir.join("features");
        std::fs::create_dir_all(&features).expect("mkdir");
        for v in 0..6u32 {
            let values: Vec<f32> = (0..40).map(|i| (v * 100 + i) as f32 / 100.0).collect();
            let t = HostTensor::new(vec![8, 5], values.clone()).expect("shape");
            if v % 2 == 0 {
                let tensors = BTreeMap::from([("features".to_string(), t)]);
                std::fs::write(
                    features.join(format!("video{v}.safetensors")),
                    mmpg::wire::encode_f32_tensors(&tensors, []),
                )
                .expect("write");
            } else {
                std::fs::write(features.join(format!("video{v}.npy")), npy(&[8, 5], &values)).expect("write");
            }
        }
        let qa = |entries: &[(&str, &str, u32)]| {
            serde_json::to_vec(
                &entries
                    .iter()
                    .enumerate()
                    .map(|(id, (q, a, v))| serde_json::json!({"question": q, "answer": a, "video_id": v, "id": id}))
                    .collect::<Vec<_>>(),
            )
            .expect("json")
        };
        std::fs::write(
            dir.join("train_qa.json"),
            qa(&[
                ("what is a man doing", "cook", 0),
                ("who sings", "man", 1),
                ("what is shown", "car", 2),
                ("who talks", "man", 3),
                ("what is he doing", "cook", 4),
                ("what plays", "piano", 5),
            ]),
        )
        .expect("write");
        std::fs::write(
            dir.join("test_qa.json"),
            qa(&[
                ("what is cooked", "cook", 0),
                ("who is there", "man", 1),
                ("what drives", "car", 2),
                ("who dances", "woman", 3),
                ("what is made", "cook", 4),
                ("what rings", "bell", 5),
            ]),
        )
        .expect("write");
        std::fs::write(dir.join("categories.json"), br#"{"0": 1, "1": 2, "2": 1, "3": 2, "4": 1, "5": 2}"#)
            .expect("write");
        VideoQaSettings {
            annotations: dir.to_path_buf(),
            features,
            frames: 4,
            top_answers: 2,
            categories: Some(dir.join("categories.json")),
            devices: BTreeMap::from([("kitchen".to_string(), vec![1])]),
            ..VideoQaSettings::default()
        }
    }

    #[test]
    fn the_vocabulary_is_the_most_frequent_training_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = VideoQa::new(fixture(dir.path())).expect("loads");
        // cook ×2 and man ×2 beat car and piano; the tie between them goes alphabetically.
        assert_eq!(source.task().answers, ["cook", "man"]);
        assert_eq!(source.task().frame_shape, [5, 1, 1]);
        assert_eq!(source.train.len(), 4, "training questions outside the vocabulary are skipped");
        assert!(source.test.iter().any(|e| e.answer.is_none()), "test questions outside it stay unscored");
    }

    #[test]
    fn clips_take_evenly_spaced_feature_rows_from_either_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = VideoQa::new(fixture(dir.path())).expect("loads");
        for video in ["0", "1"] {
            let entry = Entry { question: "q".into(), answer: Some(0), video: video.into(), category: None };
            let clip = source.clip(&entry).expect("clip");
            assert_eq!(clip.frames.shape(), &[4, 5, 1, 1]);
            let v: f32 = video.parse().expect("digit");
            // Rows 0, 2, 4, 7 of 8; row r starts at value (v·100 + 5r) / 100.
            let firsts: Vec<f32> = clip.frames.values().chunks(5).map(|r| r[0]).collect();
            let expected: Vec<f32> = [0.0f32, 2.0, 4.0, 7.0].iter().map(|r| (v * 100.0 + 5.0 * r) / 100.0).collect();
            assert_eq!(firsts, expected);
        }
    }

    #[test]
    fn devices_see_their_categories_and_sources_are_one_per_category() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = VideoQa::new(fixture(dir.path())).expect("loads");
        let kitchen = DomainSpec::clean("kitchen", 1);
        for clip in source.clips(&kitchen, Split::Train, 10, 0).expect("clips") {
            assert!(clip.question.contains("doing") || clip.question.contains("shown"), "{}", clip.question);
        }
        let names: Vec<String> = source.source_domains(8, 0, &[]).into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["all-videos", "category-1", "category-2"]);
        let shifted = DomainSpec { shifts: vec![mmpg::Shift { kind: "fog".into(), severity: 2 }], ..kitchen };
        assert!(matches!(source.clips(&shifted, Split::Test, 1, 0), Err(DataError::UnknownShift { .. })));
    }

    #[test]
    fn missing_and_malformed_inputs_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = fixture(dir.path());
        let err =
            VideoQa::new(VideoQaSettings { annotations: "/nonexistent".into(), ..settings.clone() }).expect_err("none");
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
        // Features shorter than the clip, or of another width, are refused with their file.
        std::fs::write(settings.features.join("video3.npy"), npy(&[2, 5], &[0.0; 10])).expect("write");
        let source = VideoQa::new(settings.clone()).expect("loads");
        let entry = Entry { question: "q".into(), answer: None, video: "3".into(), category: None };
        let err = source.clip(&entry).expect_err("too short");
        assert!(err.to_string().contains("video3.npy") && err.to_string().contains("[T ≥ 4, 5]"), "{err}");
        std::fs::remove_file(settings.features.join("video3.npy")).expect("rm");
        assert!(matches!(source.clip(&entry), Err(DataError::Missing { .. })));
    }

    /// Rewrites one annotation file of the fixture with `entries` of (question, answer, video_id).
    fn write_annotations(path: &Path, entries: &[(&str, &str, serde_json::Value)]) {
        let list: Vec<serde_json::Value> =
            entries.iter().map(|(q, a, v)| serde_json::json!({"question": q, "answer": a, "video_id": v})).collect();
        std::fs::write(path, serde_json::to_vec(&list).expect("json")).expect("write");
    }

    #[test]
    fn video_ids_that_leave_the_features_folder_are_refused_with_their_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = fixture(dir.path());
        // A file the ids below would reach if they were joined to the features folder.
        std::fs::write(dir.path().join("secret.npy"), npy(&[8, 5], &[0.0; 40])).expect("write");
        let outside = dir.path().join("secret").display().to_string();
        for (id, problem) in [
            ("../secret", "holds a path separator"),
            (outside.as_str(), "holds a path separator"),
            ("..\\secret", "holds a path separator"),
            ("..", "holds a parent reference `..`"),
            ("", "is empty"),
            ("video\0", "holds a NUL byte"),
            (".", "is not a plain file name"),
        ] {
            for file in ["train_qa.json", "test_qa.json"] {
                let fixture_dir = tempfile::tempdir().expect("tempdir");
                let settings = VideoQaSettings { annotations: fixture_dir.path().to_path_buf(), ..settings.clone() };
                let good = [("q", "cook", serde_json::json!(0)), ("q", "man", serde_json::json!(1))];
                write_annotations(&fixture_dir.path().join("train_qa.json"), &good);
                write_annotations(&fixture_dir.path().join("test_qa.json"), &good);
                let mut entries = good.to_vec();
                entries.push(("what is hidden", "cook", serde_json::json!(id)));
                write_annotations(&fixture_dir.path().join(file), &entries);
                let settings = VideoQaSettings { video_prefix: String::new(), ..settings };
                let err = VideoQa::new(settings).expect_err(id).to_string();
                assert!(
                    err.contains(file) && err.contains(&format!("{id:?}")) && err.contains(problem),
                    "{id:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn answers_are_one_answer_whatever_their_case_and_spacing() {
        assert_eq!(normalise_answer("  Man "), "man");
        assert_eq!(normalise_answer("Ice\tCream  cone"), "ice cream cone");
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = fixture(dir.path());
        let v = |n: u32| serde_json::json!(n);
        write_annotations(
            &dir.path().join("train_qa.json"),
            &[
                ("a", "Man", v(0)),
                ("b", " man ", v(1)),
                ("c", "cook", v(2)),
                ("d", "Ice  Cream", v(3)),
                ("e", "ice cream", v(4)),
            ],
        );
        write_annotations(&dir.path().join("test_qa.json"), &[("f", "MAN", v(0)), ("g", "Ice Cream ", v(1))]);
        let source = VideoQa::new(settings).expect("loads");
        // "Man" and " man " count as two votes for one answer, ahead of "cook".
        assert_eq!(source.task().answers, ["ice cream", "man"]);
        assert_eq!(source.train.len(), 4);
        let man = source.task().answers.iter().position(|a| a == "man");
        assert_eq!(source.test[0].answer, man, "a test answer in another case is scored");
        assert_eq!(source.test[1].answer, Some(0));
    }

    #[test]
    fn features_of_any_float_width_and_extra_tensors_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = fixture(dir.path());
        let values: Vec<f32> = (0..40).map(|i| i as f32 / 4.0).collect();
        let half: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let times: Vec<u8> = (0..8i64).flat_map(|t| t.to_le_bytes()).collect();
        let views = [
            (
                "features",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![8, 5], &half).expect("view"),
            ),
            ("times", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![8], &times).expect("view")),
        ];
        std::fs::write(settings.features.join("video2.safetensors"), safetensors::serialize(views, None).expect("st"))
            .expect("write");
        let source = VideoQa::new(settings).expect("loads");
        let entry = Entry { question: "q".into(), answer: None, video: "2".into(), category: None };
        let clip = source.clip(&entry).expect("float16 features with a second tensor");
        assert_eq!(&clip.frames.values()[..5], &values[..5]);
    }
}
