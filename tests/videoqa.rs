//! A deployment over the MSRVTT-QA format: annotation JSON, per-video feature files, devices by
//! video category — on fixtures in exactly that format, written here.

mod common;

use std::path::Path;

use mmpg::HostTensor;

/// 24 videos in 2 categories whose features carry their category (so QA is learnable), 6
/// answers; questions name the category's objects.
fn write_fixture(dir: &Path) {
    let features = dir.join("features");
    std::fs::create_dir_all(&features).expect("mkdir");
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut categories = serde_json::Map::new();
    for v in 0..24u32 {
        let category = 1 + v % 2;
        categories.insert(v.to_string(), serde_json::json!(category));
        let answer = ["man", "car", "cook", "dog", "piano", "ball"][(v % 6) as usize];
        let values: Vec<f32> =
            (0..8 * 6).map(|i| if i % 6 == (v % 6) as usize { 1.0 } else { 0.1 * category as f32 }).collect();
        if v % 2 == 0 {
            let t = HostTensor::new(vec![8, 6], values).expect("shape");
            let bytes = mmpg::wire::encode_f32_tensors(&std::collections::BTreeMap::from([("features".into(), t)]), []);
            std::fs::write(features.join(format!("video{v}.safetensors")), bytes).expect("write");
        } else {
            std::fs::write(features.join(format!("video{v}.npy")), mmpg_videoqa::encode_npy(&[8, 6], &values))
                .expect("write");
        }
        for k in 0..4 {
            let qa =
                serde_json::json!({"question": format!("what is in the video {k}"), "answer": answer, "video_id": v});
            if k < 2 { train.push(qa) } else { test.push(qa) }
        }
    }
    std::fs::write(dir.join("train_qa.json"), serde_json::to_vec(&train).expect("json")).expect("write");
    std::fs::write(dir.join("test_qa.json"), serde_json::to_vec(&test).expect("json")).expect("write");
    std::fs::write(dir.join("categories.json"), serde_json::to_vec(&categories).expect("json")).expect("write");
}

#[test]
fn a_videoqa_deployment_trains_adapts_and_scores_devices_by_category() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path());
    let root = dir.path().display();
    let text = format!(
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
    );
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
