//! The `minilm` text encoder on the real models `scripts/fetch-data.sh` installs: the external
//! check against pocket-encoder's PyTorch reference embeddings, and all-MiniLM-L6-v2 itself.

mod common;

use std::path::PathBuf;

use mmpg::TextEncoder;
use mmpg_backends::BurnDevice;
use mmpg_minilm::{MiniLm, MiniLmSettings};

fn encoder(dir: &str) -> MiniLm {
    encoder_with(dir, MiniLmSettings::default().max_tokens)
}

fn encoder_with(dir: &str, max_tokens: usize) -> MiniLm {
    let settings = MiniLmSettings { dir: PathBuf::from(dir), max_tokens };
    MiniLm::new(&settings, &BurnDevice::Flex(Default::default()))
        .unwrap_or_else(|e| panic!("{e} (the tests read real models; `scripts/fetch-data.sh` installs them)"))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn the_bert_code_matches_pytorch_reference_embeddings_of_pocket_encoder() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read("data/pocket-encoder/reference.json").expect("reference.json"))
            .expect("json");
    let texts: Vec<&str> = reference["texts"].as_array().expect("texts").iter().filter_map(|t| t.as_str()).collect();
    let expected: Vec<Vec<f32>> = reference["embeddings"]
        .as_array()
        .expect("embeddings")
        .iter()
        .map(|row| row.as_array().expect("row").iter().filter_map(|v| v.as_f64()).map(|v| v as f32).collect())
        .collect();
    let got = encoder("data/pocket-encoder").embed(&texts).expect("embeds");
    for (i, (row, want)) in got.rows().expect("2-D").zip(&expected).enumerate() {
        let c = cosine(row, want);
        println!("pocket-encoder reference {i} ({:?}): cosine {c:.5}", texts[i]);
        // The checkpoint is 4-bit; pocket-encoder's own test bounds the drift at 0.95.
        assert!(c > 0.95, "cosine {c} to the PyTorch reference");
    }
}

#[test]
fn all_minilm_embeds_paraphrases_closer_than_unrelated_sentences() {
    let encoder = encoder("data/all-minilm-l6-v2");
    assert_eq!(encoder.dim(), 384);
    let texts = [
        "how many bags are there",
        "count the bags in the clip",
        "a volcano erupts at night",
        "is there a sneaker",
        "can you see a sneaker",
    ];
    let e = encoder.embed(&texts).expect("embeds");
    let rows: Vec<&[f32]> = e.rows().expect("2-D").collect();
    for row in &rows {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let (para, unrelated) = (cosine(rows[0], rows[1]), cosine(rows[0], rows[2]));
    println!("paraphrase {para:.3}, unrelated {unrelated:.3}, second paraphrase {:.3}", cosine(rows[3], rows[4]));
    assert!(para > unrelated + 0.2, "{para} vs {unrelated}");
    assert!(cosine(rows[3], rows[4]) > cosine(rows[3], rows[2]) + 0.2);
    // A batch pads to its longest text: each text embeds as it does alone.
    let alone = encoder.embed(&[texts[2]]).expect("alone");
    assert!(cosine(alone.values(), rows[2]) > 0.9999);
}

#[test]
fn cached_embeddings_are_reused_and_corrupt_files_recomputed() {
    let encoder = encoder("data/all-minilm-l6-v2");
    let dir = tempfile::tempdir().expect("tempdir");
    let texts = ["what is shown first", "is there a bag"];
    let fresh = encoder.embed_cached(&texts, dir.path(), "max_tokens = 128").expect("computed");
    let files: Vec<_> = std::fs::read_dir(dir.path()).expect("cache").flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 2);
    assert_eq!(encoder.embed_cached(&texts, dir.path(), "max_tokens = 128").expect("cached"), fresh);
    std::fs::write(&files[0], b"garbage").expect("corrupt");
    assert_eq!(encoder.embed_cached(&texts, dir.path(), "max_tokens = 128").expect("recomputed"), fresh);
}

#[test]
fn the_cache_is_keyed_by_the_encoders_settings() {
    // Issue 10: an embedding cached at 128 tokens was served for a run at 3.
    let registry = common::registry();
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "what colour is the shape that moves from the left to the right of the frame";
    let deployment = |max_tokens: usize| {
        let text = format!(
            "{}\n[text]\nplugin = \"minilm\"\ncache = \"{}\"\n[text.settings]\nmax_tokens = {max_tokens}\n",
            common::tiny_deployment(2, 1, 1, r#"{ kind = "clean" }"#),
            dir.path().display()
        );
        mmpg::Deployment::parse(&text, "text.toml", &registry).expect("valid")
    };
    let embed = |max_tokens: usize| {
        let d = deployment(max_tokens);
        let composer = mmpg::runtime::Composer::new(&d, &registry).expect("composer");
        let source = composer.text_source().expect("builds").expect("configured");
        source.embed(&[long]).expect("embeds")
    };
    let full = embed(128);
    let cut = embed(3);
    assert_ne!(full, cut, "a 3-token embedding must not come from the 128-token cache");
    assert_eq!(std::fs::read_dir(dir.path()).expect("cache").count(), 2);
    // Uncached, the same truncation gives the same embedding the cache served.
    let plain = encoder_with("data/all-minilm-l6-v2", 3);
    assert_eq!(plain.embed(&[long]).expect("embeds"), cut);
}

#[test]
fn a_deployment_with_a_text_encoder_runs_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}\n[text]\nplugin = \"minilm\"\ncache = \"{}\"\n",
        common::tiny_deployment(2, 20, 4, r#"{ kind = "blur", severity = 4 }, { kind = "clean", phrasing = 1 }"#),
        dir.path().join("cache").display()
    );
    let registry = common::registry();
    let deployment = mmpg::Deployment::parse(&text, "text.toml", &registry).expect("valid");
    let report = mmpg::runtime::run(&deployment, &registry, &mmpg::NoProgress).expect("runs");
    assert_eq!(report.devices.len(), 2);
    assert!(report.devices.iter().all(|d| d.error.is_none() && d.adapted_accuracy.is_finite()));
    // The model reads 384-wide sentence embeddings: its text projection is 384 × feature_dim.
    let bag_of_words = {
        let plain = common::tiny_deployment(2, 20, 4, r#"{ kind = "blur", severity = 4 }"#);
        let d = mmpg::Deployment::parse(&plain, "plain.toml", &registry).expect("valid");
        mmpg::runtime::run(&d, &registry, &mmpg::NoProgress).expect("runs").cloud.model_parameters
    };
    assert_eq!(report.cloud.model_parameters, bag_of_words + (384 - 256) * 64);
    assert!(std::fs::read_dir(dir.path().join("cache")).expect("cache written").count() > 0);
}
