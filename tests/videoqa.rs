//! A deployment over the MSRVTT-QA format: annotation JSON, per-video feature files, devices by
//! video category — on fixtures in exactly that format, written here.

mod common;

use std::path::Path;

use mmpg::HostTensor;

/// 24 videos over `categories` whose features carry their category (so QA is learnable), 6
/// answers, `frames` feature rows each.
fn write_fixture(dir: &Path, categories_used: &[u32], frames: usize) {
    let features = dir.join("features");
    std::fs::create_dir_all(&features).expect("mkdir");
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut categories = serde_json::Map::new();
    for v in 0..24u32 {
        let category = categories_used[v as usize % categories_used.len()];
        categories.insert(v.to_string(), serde_json::json!(category));
        let answer = ["man", "car", "cook", "dog", "piano", "ball"][(v % 6) as usize];
        let values: Vec<f32> =
            (0..frames * 6).map(|i| if i % 6 == (v % 6) as usize { 1.0 } else { 0.05 * category as f32 }).collect();
        if v % 2 == 0 {
            let t = HostTensor::new(vec![frames, 6], values).expect("shape");
            let bytes = mmpg::wire::encode_f32_tensors(&std::collections::BTreeMap::from([("features".into(), t)]), []);
            std::fs::write(features.join(format!("video{v}.safetensors")), bytes).expect("write");
        } else if v % 4 == 1 {
            std::fs::write(features.join(format!("video{v}.npy")), mmpg_videoqa::encode_npy(&[frames, 6], &values))
                .expect("write");
        } else {
            std::fs::write(features.join(format!("video{v}.npy")), big_endian_f64_fortran_npy(frames, 6, &values))
                .expect("write");
        }
        for k in 0..4 {
            // The released files spell one answer in several ways; the benchmarks score them as one.
            let answer = match k {
                1 => answer.to_uppercase(),
                2 => format!(" {answer}  "),
                _ => answer.to_string(),
            };
            let qa =
                serde_json::json!({"question": format!("what is in the video {k}"), "answer": answer, "video_id": v});
            if k < 2 { train.push(qa) } else { test.push(qa) }
        }
    }
    std::fs::write(dir.join("train_qa.json"), serde_json::to_vec(&train).expect("json")).expect("write");
    std::fs::write(dir.join("test_qa.json"), serde_json::to_vec(&test).expect("json")).expect("write");
    std::fs::write(dir.join("categories.json"), serde_json::to_vec(&categories).expect("json")).expect("write");
}

/// `.npy` bytes of a row-major `rows × cols` array stored as NumPy stores
/// `np.asfortranarray(a.astype('>f8'))`: big-endian float64, one column after another.
fn big_endian_f64_fortran_npy(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> =
        (0..cols).flat_map(|c| (0..rows).flat_map(move |r| f64::from(values[r * cols + c]).to_be_bytes())).collect();
    mmpg_videoqa::encode_npy_as(">f8", true, &[rows, cols], &data)
}

fn videoqa_toml(root: &std::path::Display<'_>) -> String {
    format!(
        r#"
seed = 1
[data]
plugin = "videoqa"
[data.settings]
annotations = "{root}"
features = "{root}/features"
frames = 4
top_answers = 6
categories = "{root}/categories.json"
devices = {{ kitchen = [1], garage = [2] }}
[cloud.training]
pretrain_steps = 300
generator_steps = 6
source_domains = 3
[fleet]
window_clips = 8
eval_clips = 48
[[device]]
name = "kitchen"
kind = "clean"
[[device]]
name = "garage"
kind = "clean"
"#
    )
}

#[test]
fn a_video_id_naming_a_file_outside_the_features_folder_stops_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path(), &[1, 2], 8);
    // A file the id would reach, were it joined to the features folder.
    std::fs::write(dir.path().join("stolen.npy"), mmpg_videoqa::encode_npy(&[8, 6], &[0.5; 48])).expect("write");
    let test_path = dir.path().join("test_qa.json");
    let mut test: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&test_path).expect("read")).expect("json");
    test.push(serde_json::json!({"question": "what is hidden", "answer": "man", "video_id": "../stolen"}));
    std::fs::write(&test_path, serde_json::to_vec(&test).expect("json")).expect("write");
    let registry = common::registry();
    // Without a prefix (MSVD names feature files by bare id) the id alone would be the path.
    let text =
        videoqa_toml(&dir.path().display()).replace("[data.settings]\n", "[data.settings]\nvideo_prefix = \"\"\n");
    let deployment = mmpg::Deployment::parse(&text, "videoqa.toml", &registry).expect("valid");
    let err = mmpg::runtime::run(&deployment, &registry, &mmpg::NoProgress).expect_err("refused").to_string();
    assert!(err.contains("test_qa.json") && err.contains("\"../stolen\"") && err.contains("path separator"), "{err}");
}

#[test]
fn a_videoqa_deployment_trains_adapts_and_scores_devices_by_category() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path(), &[1, 2], 8);
    let text = videoqa_toml(&dir.path().display());
    let registry = common::registry();
    let deployment = mmpg::Deployment::parse(&text, "videoqa.toml", &registry).expect("valid");
    let report = mmpg::runtime::run(&deployment, &registry, &mmpg::NoProgress).expect("runs");
    assert_eq!(report.cloud.source_domains, 3, "all videos and one domain per category");
    assert_eq!(report.devices.len(), 2);
    for d in &report.devices {
        assert!(d.error.is_none(), "{:?}", d.error);
        assert!(d.shifted, "a device that sees some categories is a shifted device");
        assert!(d.bytes_up > 0 && d.bytes_down > 0);
        // Features name the answer: even a short pretraining beats chance (1/6) clearly.
        assert!(d.static_accuracy > 0.4, "{}: {}", d.device, d.static_accuracy);
    }
}

/// The shipped example, on fixture files placed in exactly its layout (only the training is
/// shortened): its paths, device groups and text encoder fit together.
#[test]
fn the_msrvtt_example_runs_on_data_in_its_layout() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(repo.join("examples/msrvtt-qa.toml")).expect("example");
    let mut table: toml::Table = toml::from_str(&example).expect("toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |relative: &toml::Value| {
        toml::Value::String(dir.path().join(relative.as_str().expect("path")).display().to_string())
    };
    let settings = table["data"]["settings"].as_table().expect("settings").clone();
    let used: Vec<u32> = settings["devices"]
        .as_table()
        .expect("devices")
        .values()
        .flat_map(|cats| cats.as_array().expect("list").iter().map(|c| c.as_integer().expect("int") as u32))
        .collect();
    write_fixture(&dir.path().join(settings["annotations"].as_str().expect("path")), &used, 16);
    let shorter: toml::Table = toml::from_str(&format!(
        r#"
[data.settings]
annotations = {}
features = {}
categories = {}
[text]
cache = {}
settings = {{ dir = {} }}
[cloud]
checkpoint = {}
[cloud.training]
pretrain_steps = 200
generator_steps = 4
source_domains = 4
[fleet]
eval_clips = 32
window_clips = 8
"#,
        at(&settings["annotations"]),
        at(&settings["features"]),
        at(&settings["categories"]),
        at(&table["text"]["cache"]),
        toml::Value::String(repo.join("data/all-minilm-l6-v2").display().to_string()),
        at(&table["cloud"]["checkpoint"]),
    ))
    .expect("override");
    table = mmpg::config::merge_tables(&table, &shorter);
    let registry = common::registry();
    let deployment = mmpg::Deployment::parse(&table.to_string(), "msrvtt-qa.toml", &registry).expect("valid");
    let report = mmpg::runtime::run(&deployment, &registry, &mmpg::NoProgress).expect("runs");
    let names: Vec<&str> = report.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["living-room-tv", "game-console", "kitchen-tablet", "car-dashcam"]);
    for d in &report.devices {
        assert!(d.error.is_none(), "{}: {:?}", d.device, d.error);
        assert!(d.bytes_up > 0 && d.bytes_down > 0);
    }
}

/// Without the dataset, the example names what to place where, in one line, exit code 2.
#[test]
fn the_msrvtt_example_without_data_says_what_to_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("examples/msrvtt-qa.toml");
    // The text encoder is present (validate checks it first); only the video-QA data is missing.
    std::fs::create_dir_all(dir.path().join("data")).expect("data folder");
    std::os::unix::fs::symlink(root.join("data/all-minilm-l6-v2"), dir.path().join("data/all-minilm-l6-v2"))
        .expect("link the text encoder");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpg"))
        .arg("run")
        .arg(&example)
        .current_dir(dir.path())
        .output()
        .expect("mmpg runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("place train_qa.json and test_qa.json in data/msrvtt-qa"), "{stderr}");
}

/// As in the released MSRVTT-QA and MSVD-QA, the fixture's training and test questions are about
/// different videos here; the cloud then sees no video a device streams or is scored on.
#[test]
fn the_cloud_trains_on_no_video_of_a_device_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path(), &[1, 2], 8);
    for (file, keep) in [("train_qa.json", 0..12), ("test_qa.json", 12..24)] {
        let path = dir.path().join(file);
        let mut qa: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        qa.retain(|q| q["video_id"].as_u64().is_some_and(|v| keep.contains(&v)));
        std::fs::write(&path, serde_json::to_vec(&qa).expect("json")).expect("write");
    }
    let text = videoqa_toml(&dir.path().display())
        .replace("pretrain_steps = 300", "pretrain_steps = 10")
        .replace("[cloud.training]", "[cloud.settings]\nreset = true\nreset_episodes = 4\n[cloud.training]");
    common::assert_the_cloud_never_sees_device_pools(&text, 40);
}
