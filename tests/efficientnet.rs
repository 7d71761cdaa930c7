//! EfficientNet-Lite0 in Burn against an independent reference: a NumPy forward pass in float64
//! (`scripts/efficientnet-reference.py`, its own reader of the legacy `.pth`), whose pixels,
//! features and logits for three real photos are stored in
//! `tests/fixtures/efficientnet-lite0/reference.json` with their provenance. Then real photos
//! through Rust's own decoding get their ImageNet labels. Needs `scripts/fetch-data.sh`.

use std::path::Path;

use base64::Engine as _;
use burn::tensor::{Tensor, TensorData};
use mmpg_backends::{Backend, BurnDevice};
use mmpg_lmm::efficientnet::{CLASSES, DEFAULT_WEIGHTS, EfficientNetError, EfficientNetLite0, FEATURE_DIM};

/// Largest absolute difference allowed against the float64 reference (float32 through 16
/// blocks gives at most 1.3e-5 and 4.6e-5 on the fixture).
const FEATURE_TOLERANCE: f32 = 1e-4;
const LOGIT_TOLERANCE: f32 = 2e-4;
const OPENCV_DATA: &str = "/usr/share/doc/opencv-doc/examples/data";

fn device() -> BurnDevice {
    BurnDevice::Flex(Default::default())
}

fn network() -> EfficientNetLite0<Backend> {
    EfficientNetLite0::load(Path::new(DEFAULT_WEIGHTS), &device()).expect("weights: run scripts/fetch-data.sh")
}

/// `[n, 3, h, w]` on the 0–255 scale from HWC RGB bytes.
fn batch(images: &[(Vec<u8>, usize, usize)]) -> Tensor<Backend, 4> {
    let (_, h, w) = images[0];
    let mut values = Vec::with_capacity(images.len() * 3 * h * w);
    for (pixels, ..) in images {
        for c in 0..3 {
            values.extend((0..h * w).map(|i| f32::from(pixels[i * 3 + c])));
        }
    }
    Tensor::from_data(TensorData::new(values, [images.len(), 3, h, w]), &device())
}

fn values<const D: usize>(t: Tensor<Backend, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 tensor")
}

fn largest_difference(a: &[f32], b: &[f64]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (f64::from(*x) - y).abs() as f32).fold(0.0, f32::max)
}

fn top(logits: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    order.truncate(k);
    order
}

#[test]
fn features_and_logits_match_an_independent_numpy_forward_pass() {
    let text = std::fs::read_to_string("tests/fixtures/efficientnet-lite0/reference.json").expect("fixture");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let net = network();
    let mut worst = (0f32, 0f32);
    for image in reference["images"].as_array().expect("images") {
        let name = image["name"].as_str().expect("name");
        let (h, w) =
            (image["height"].as_u64().expect("height") as usize, image["width"].as_u64().expect("width") as usize);
        let pixels = base64::engine::general_purpose::STANDARD
            .decode(image["pixels_base64"].as_str().expect("pixels"))
            .expect("base64");
        assert_eq!(pixels.len(), h * w * 3, "{name}");
        let floats = |key: &str| -> Vec<f64> {
            image[key].as_array().expect(key).iter().map(|v| v.as_f64().expect("number")).collect()
        };
        let features = net.features(batch(&[(pixels, h, w)]));
        let logits = values(net.classify(features.clone()));
        let features = values(features);
        assert_eq!((features.len(), logits.len()), (FEATURE_DIM, CLASSES));
        let (df, dl) =
            (largest_difference(&features, &floats("features")), largest_difference(&logits, &floats("logits")));
        eprintln!("{name}: largest |Δ| features {df:.2e}, logits {dl:.2e}");
        assert!(df <= FEATURE_TOLERANCE, "{name}: features differ by {df}");
        assert!(dl <= LOGIT_TOLERANCE, "{name}: logits differ by {dl}");
        // The reference's top 3 (its 5th and 6th logits of one image are 2e-4 apart).
        let expected: Vec<usize> = image["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .take(3)
            .map(|v| v.as_u64().expect("index") as usize)
            .collect();
        assert_eq!(top(&logits, 3), expected, "{name}");
        worst = (worst.0.max(df), worst.1.max(dl));
    }
    eprintln!("largest |Δ| over the fixture: features {:.2e}, logits {:.2e}", worst.0, worst.1);
}

/// The 1000 ImageNet class names OpenCV's documentation ships (Debian `opencv-doc`).
fn class_names() -> Vec<String> {
    std::fs::read_to_string(format!("{OPENCV_DATA}/dnn/classification_classes_ILSVRC2012.txt"))
        .expect("opencv-doc: run scripts/fetch-data.sh")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn real_photos_get_their_imagenet_labels() {
    let names = class_names();
    assert_eq!(names.len(), CLASSES);
    let net = network();
    for (file, expected) in [("squirrel_cls.jpg", "fox squirrel"), ("orange.jpg", "orange"), ("baboon.jpg", "baboon")] {
        let photo = image::open(format!("{OPENCV_DATA}/{file}")).expect("photo").to_rgb8();
        let resized = image::imageops::resize(&photo, 224, 224, image::imageops::FilterType::Triangle);
        let logits = values(net.classify(net.features(batch(&[(resized.into_raw(), 224, 224)]))));
        let best = top(&logits, 1)[0];
        eprintln!("{file}: {best} {}", names[best]);
        assert!(names[best].starts_with(expected), "{file} is labelled {best} `{}`", names[best]);
    }
}

#[test]
fn any_resolution_gives_one_feature_per_image() {
    let net = network();
    for (h, w) in [(1, 1), (33, 47), (64, 64)] {
        let x = Tensor::<Backend, 4>::full([2, 3, h, w], 128.0, &device());
        let features = net.features(x);
        assert_eq!(features.dims(), [2, FEATURE_DIM], "{h}×{w}");
        assert!(values(features).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn bad_weight_files_are_named_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("absent.pth");
    match EfficientNetLite0::<Backend>::load(&missing, &device()) {
        Err(e @ EfficientNetError::Missing { .. }) => assert!(e.to_string().contains("scripts/fetch-data.sh"), "{e}"),
        other => panic!("expected Missing, got {other:?}"),
    }
    let text = dir.path().join("text.pth");
    std::fs::write(&text, "not a checkpoint").expect("write");
    assert!(matches!(EfficientNetLite0::<Backend>::load(&text, &device()), Err(EfficientNetError::Unreadable { .. })));
    // The real file cut short: its storages end early.
    let bytes = std::fs::read(DEFAULT_WEIGHTS).expect("weights");
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let err = EfficientNetLite0::<Backend>::load(&cut, &device()).expect_err("a file cut in half");
    assert!(err.to_string().contains("cut.pth"), "{err}");
    // Finite but absurd values in the middle of the file: refused by name, not left to diverge
    // in training.
    let mut huge = bytes.clone();
    for at in (8_000_000..9_000_000).step_by(4) {
        huge[at..at + 4].copy_from_slice(&3e38f32.to_le_bytes());
    }
    let path = dir.path().join("huge.pth");
    std::fs::write(&path, &huge).expect("write");
    let err = EfficientNetLite0::<Backend>::load(&path, &device()).expect_err("absurd weights");
    assert!(matches!(err, EfficientNetError::Tensor { .. }) && err.to_string().contains("huge.pth"), "{err}");
}

mod as_the_device_models_frame_encoder {
    use mmpg::{Clip, DeviceDescriptor, HostTensor, TaskSpec};
    use mmpg_lmm::encoder::{EncoderSettings, FilmAt, FrameEncoder};
    use mmpg_lmm::{LmmCloud, LmmSettings};

    use super::*;

    fn grey_frames(n: usize, seed: u32) -> Vec<f32> {
        (0..n * 28 * 28).map(|i| ((i as u32 * 7919 + seed * 104_729) % 251) as f32 / 250.0).collect()
    }

    #[test]
    fn features_are_memoised_by_frame_content() {
        let settings = EncoderSettings { resolution: 32, ..EncoderSettings::default() };
        let encoder = FrameEncoder::load(settings, &device()).expect("weights");
        let a = grey_frames(3, 1);
        let first = encoder.encode(&a, 3, [1, 28, 28]).expect("encode");
        assert_eq!(first.len(), 3 * FEATURE_DIM);
        // The same frames, in another batch and order, give the same rows.
        let mut b = a[28 * 28..].to_vec();
        b.extend_from_slice(&a[..28 * 28]);
        let again = encoder.encode(&b, 3, [1, 28, 28]).expect("encode");
        assert_eq!(&again[..2 * FEATURE_DIM], &first[FEATURE_DIM..]);
        assert_eq!(&again[2 * FEATURE_DIM..], &first[..FEATURE_DIM]);
        // Other frames, other features.
        let other = encoder.encode(&grey_frames(1, 7), 1, [1, 28, 28]).expect("encode");
        assert!(other[..] != first[..FEATURE_DIM]);
    }

    #[test]
    fn the_lmm_serves_through_the_pretrained_encoder() {
        for film_at in [FilmAt::Pooled, FilmAt::LastStage] {
            serves_with_film_at(film_at);
        }
    }

    fn serves_with_film_at(film_at: FilmAt) {
        let task = TaskSpec {
            answers: vec!["a".into(), "b".into(), "c".into()],
            frames_per_clip: 2,
            frame_shape: [1, 28, 28],
        };
        let settings = LmmSettings {
            encoder: Some(EncoderSettings { resolution: 64, film_at, ..EncoderSettings::default() }),
            ..LmmSettings::default()
        };
        let cloud = LmmCloud::new(settings, &task, &device()).expect("model");
        let clips: Vec<Clip> = (0..2)
            .map(|i| Clip {
                frames: HostTensor::new(vec![2, 1, 28, 28], grey_frames(2, i)).expect("frames"),
                question: "what is shown first".into(),
                caption: String::new(),
                answer: Some(1),
                provenance: Vec::new(),
            })
            .collect();
        let mut model = mmpg::CloudModel::export(&cloud, &DeviceDescriptor::cpu()).expect("device model");
        let logits = model.answer_logits(&clips).expect("logits");
        assert_eq!(logits.shape(), [2, 3]);
        assert!(logits.is_finite());
        // The FiLM slot modulates the pooled feature's linear layer (16 channels) or the
        // 192-channel map entering the last stage.
        let film = mmpg::CloudModel::schema(&cloud).get("frame_film").expect("film slot").shape.clone();
        let expected = if film_at == FilmAt::Pooled { vec![2, 16] } else { vec![2, 192] };
        assert_eq!(film, expected);
        // The model holds no pretrained weight (pooled) or only the last stage and head.
        let params = mmpg::CloudModel::parameter_count(&cloud);
        assert!(
            if film_at == FilmAt::Pooled { params < 200_000 } else { params > 700_000 && params < 1_200_000 },
            "{params}"
        );
        // A FiLM slot installed changes the answers: it reaches the network.
        let mut values = model.current_params();
        let film = values.tensors.get_mut("frame_film").expect("film values");
        *film = HostTensor::new(film.shape().to_vec(), film.values().iter().map(|v| v + 0.5).collect()).expect("shape");
        let installed = model.schema().validate(values).expect("valid");
        model.install(&installed).expect("install");
        let after = model.answer_logits(&clips).expect("logits");
        assert!(after.values() != logits.values());
    }

    #[test]
    fn grey_or_rgb_frames_only() {
        let task = TaskSpec { answers: vec!["a".into()], frames_per_clip: 2, frame_shape: [2, 28, 28] };
        let settings = LmmSettings { encoder: Some(EncoderSettings::default()), ..LmmSettings::default() };
        let err = LmmCloud::new(settings, &task, &device()).expect_err("two channels");
        assert!(err.to_string().contains("grey"), "{err}");
    }
}

mod common;

/// The example deployment with its `weights = …` line replaced.
fn example_with(weights_line: &str) -> String {
    std::fs::read_to_string("examples/fashion-lite0.toml")
        .expect("example")
        .replace("weights = \"data/efficientnet-lite0/efficientnet-lite0.pth\"", weights_line)
}

#[test]
fn validate_names_missing_weights_and_bad_settings() {
    let text = std::fs::read_to_string("examples/fashion-lite0.toml")
        .expect("example")
        .replace("data/efficientnet-lite0/efficientnet-lite0.pth", "nowhere/lite0.pth")
        .replace("resolution = 64", "resolution = 8")
        .replace("film_at = \"pooled\"", "film_at = \"middle\"");
    let registry = common::registry();
    let errors = mmpg::Deployment::parse(&text, "lite0.toml", &registry).expect_err("refused").to_string();
    assert!(errors.contains("film_at") || errors.contains("middle"), "{errors}");
    let text = text.replace("film_at = \"middle\"", "film_at = \"last-stage\"");
    let errors = mmpg::Deployment::parse(&text, "lite0.toml", &registry).expect_err("refused").to_string();
    assert!(errors.contains("lite0.toml:") && errors.contains("encoder.weights"), "{errors}");
    assert!(errors.contains("nowhere/lite0.pth") && errors.contains("scripts/fetch-data.sh"), "{errors}");
    assert!(errors.contains("encoder.resolution"), "{errors}");
    // A file that is not the network's checkpoint is caught by validate, not at training.
    let text = example_with("weights = \"README.md\"");
    let errors = mmpg::Deployment::parse(&text, "lite0.toml", &registry).expect_err("refused").to_string();
    assert!(errors.contains("README.md: not a readable PyTorch checkpoint"), "{errors}");
    let text = example_with("weights = \"data\"");
    let errors = mmpg::Deployment::parse(&text, "lite0.toml", &registry).expect_err("refused").to_string();
    assert!(errors.contains("data: not a regular file"), "{errors}");
    // The example itself is valid.
    let example = std::fs::read_to_string("examples/fashion-lite0.toml").expect("example");
    mmpg::Deployment::parse(&example, "examples/fashion-lite0.toml", &registry).expect("valid");
}
