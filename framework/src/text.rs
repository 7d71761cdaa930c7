//! Text encoders: frozen sentence embedders (e.g. all-MiniLM-L6-v2) that turn questions and
//! captions into vectors, with an on-disk cache keyed by content hash.

use std::path::Path;

use crate::tensor::HostTensor;

/// Why texts could not be embedded.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum TextError {
    /// The model files are missing or malformed.
    #[error("{0}")]
    Model(String),
    /// A text could not be tokenised or embedded.
    #[error("{0}")]
    Input(String),
    /// The cache folder could not be used.
    #[error("cache {path}: {message}")]
    Cache {
        /// Folder or file.
        path: String,
        /// Cause.
        message: String,
    },
}

/// A frozen sentence encoder. Required: the dimension, an identity and `embed`; the cached
/// variant is provided.
pub trait TextEncoder: Send + Sync {
    /// Embedding dimension e.
    fn dim(&self) -> usize;

    /// Identity of the weights and tokenizer (a hash), so cached embeddings of another model
    /// are never reused.
    fn model_id(&self) -> String;

    /// `[n, e]` embeddings of `texts`, row-aligned.
    fn embed(&self, texts: &[&str]) -> Result<HostTensor, TextError>;

    /// As [`TextEncoder::embed`], reusing embeddings stored under `cache`: one file per text,
    /// named by the SHA-256 of everything that changes an embedding — the model's identity
    /// ([`TextEncoder::model_id`]: weights and tokenizer), `settings` (the canonical text of the
    /// encoder's settings, e.g. its truncation) and the text. Cached files are validated (length,
    /// finiteness); an invalid one is recomputed and rewritten.
    fn embed_cached(&self, texts: &[&str], cache: &Path, settings: &str) -> Result<HostTensor, TextError> {
        use sha2::{Digest, Sha256};
        let e = self.dim();
        let cache_error = |path: &Path, err: std::io::Error| TextError::Cache {
            path: path.display().to_string(),
            message: err.to_string(),
        };
        std::fs::create_dir_all(cache).map_err(|err| cache_error(cache, err))?;
        let id = self.model_id();
        let file_of = |text: &str| {
            let digest = Sha256::new()
                .chain_update(id.as_bytes())
                .chain_update([0])
                .chain_update(settings.as_bytes())
                .chain_update([0])
                .chain_update(text.as_bytes())
                .finalize();
            cache.join(format!("{}.f32", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
        };
        let read = |path: &Path| -> Option<Vec<f32>> {
            let bytes = std::fs::read(path).ok()?;
            (bytes.len() == 4 * e).then_some(())?;
            let values: Vec<f32> = crate::tensor::f32s_from_le_bytes(&bytes);
            values.iter().all(|v| v.is_finite()).then_some(values)
        };
        let mut rows: Vec<Option<Vec<f32>>> = texts.iter().map(|t| read(&file_of(t))).collect();
        let missing: Vec<usize> = (0..texts.len()).filter(|i| rows[*i].is_none()).collect();
        if !missing.is_empty() {
            let fresh = self.embed(&missing.iter().map(|i| texts[*i]).collect::<Vec<_>>())?;
            for (row, i) in fresh.rows().into_iter().flatten().zip(&missing) {
                let path = file_of(texts[*i]);
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(&path, bytes).map_err(|err| cache_error(&path, err))?;
                rows[*i] = Some(row.to_vec());
            }
        }
        let values: Vec<f32> = rows.into_iter().flat_map(Option::unwrap_or_default).collect();
        HostTensor::new(vec![texts.len(), e], values).map_err(|err| TextError::Model(err.to_string()))
    }
}

/// A text encoder as models use it: embeddings memoised in memory (templated questions repeat)
/// and, when `cache` is set, on disk across runs.
pub struct TextSource {
    encoder: Box<dyn TextEncoder>,
    cache: Option<std::path::PathBuf>,
    settings: String,
    memo: std::sync::Mutex<std::collections::HashMap<String, Vec<f32>>>,
}

impl std::fmt::Debug for TextSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextSource").field("dim", &self.encoder.dim()).field("cache", &self.cache).finish()
    }
}

impl TextSource {
    /// Wraps an encoder, with an optional on-disk cache folder. `settings` is the canonical text
    /// of the encoder's settings: part of every cache key (see [`TextEncoder::embed_cached`]).
    pub fn new(encoder: Box<dyn TextEncoder>, cache: Option<std::path::PathBuf>, settings: String) -> Self {
        Self { encoder, cache, settings, memo: Default::default() }
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.encoder.dim()
    }

    /// `[n, e]` embeddings of `texts`.
    pub fn embed(&self, texts: &[&str]) -> Result<HostTensor, TextError> {
        let e = self.dim();
        let mut memo = self.memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut missing: Vec<&str> = texts.iter().copied().filter(|t| !memo.contains_key(*t)).collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let fresh = match &self.cache {
                Some(dir) => self.encoder.embed_cached(&missing, dir, &self.settings)?,
                None => self.encoder.embed(&missing)?,
            };
            for (text, row) in missing.iter().zip(fresh.rows().into_iter().flatten()) {
                memo.insert((*text).to_string(), row.to_vec());
            }
        }
        let values: Vec<f32> = texts.iter().flat_map(|t| memo.get(*t).cloned().unwrap_or_default()).collect();
        HostTensor::new(vec![texts.len(), e], values).map_err(|err| TextError::Model(err.to_string()))
    }
}
