//! `minilm`: a frozen BERT sentence encoder in Burn — all-MiniLM-L6-v2 by default (6 layers,
//! hidden 384, 12 heads), weights from `model.safetensors`, the HF `tokenizers` crate for
//! WordPiece (padding off, truncation at `max_tokens`), mean pooling over real tokens, L2
//! normalisation. The same code loads 4-bit checkpoints (values `(nibble − 8) · scale` per
//! group of 32, as the `pocket-encoder` crate ships paraphrase-MiniLM-L3-v2).
//!
//! `scripts/fetch-data.sh` installs the model under `data/all-minilm-l6-v2/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use mmpg::{
    Build, BuildContext, Check, Factory, HostTensor, Plugin, PluginError, Settings, SettingsSpec, StaticPlugin,
    TextEncoder, TextError, parse_settings,
};
use mmpg_backends::{Backend, BurnDevice, HostTensorBurn as _};
use serde::{Deserialize, Serialize};

type DB = Backend;

/// The command that installs the default model, named when it is missing.
pub const INSTALL: &str = "scripts/fetch-data.sh";

/// Settings of the `minilm` text encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MiniLmSettings {
    /// Folder with `model.safetensors`, `tokenizer.json` and `config.json`.
    pub dir: PathBuf,
    /// Tokens per text, special tokens included (longer texts are truncated).
    pub max_tokens: usize,
}

impl Default for MiniLmSettings {
    fn default() -> Self {
        Self { dir: PathBuf::from("data/all-minilm-l6-v2"), max_tokens: 128 }
    }
}

impl Settings for MiniLmSettings {
    fn check(&self, check: &mut Check) {
        // The model's own position table bounds the tokens it can read; without its
        // config.json nothing can run, which validate reports here too.
        let path = self.dir.join("config.json");
        let positions = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<BertConfig>(&bytes) {
                Ok(config) => config.max_position_embeddings,
                Err(e) => return check.fail("dir", format!("{}: {e}", path.display())),
            },
            Err(_) => return check.fail("dir", format!("{} is missing: run `{INSTALL}`", path.display())),
        };
        // [CLS] and [SEP] take two tokens: at least one must be left for the text.
        check.within("max_tokens", self.max_tokens, 3..=positions.max(3));
    }
}

/// The BERT hyper-parameters read from `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Layer-norm ε.
    pub layer_norm_eps: f64,
    /// Positions.
    pub max_position_embeddings: usize,
}

/// Named f32 weights of a BERT checkpoint.
pub type Weights = BTreeMap<String, HostTensor>;

fn bad(message: impl Into<String>) -> TextError {
    TextError::Model(message.into())
}

/// Reads the F32 tensors of a safetensors checkpoint, and dequantises 4-bit pairs
/// `<name>.q4` (two values per byte, low nibble first) + `<name>.scales` (f16, one per 32
/// values) into `<name>` with the shape `shapes` gives. Other dtypes are skipped (e.g. the I64
/// `position_ids`).
pub fn read_weights(bytes: &[u8], shapes: &BTreeMap<String, Vec<usize>>) -> Result<Weights, TextError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("model.safetensors: {e}")))?;
    let mut out = Weights::new();
    for (name, view) in st.tensors() {
        if view.dtype() == safetensors::Dtype::F32 {
            let values: Vec<f32> = mmpg::tensor::f32s_from_le_bytes(view.data());
            let t = HostTensor::new(view.shape().to_vec(), values).map_err(|e| bad(format!("`{name}`: {e}")))?;
            out.insert(name, t);
        } else if let Some(base) = name.strip_suffix(".q4") {
            let shape = shapes.get(base).ok_or_else(|| bad(format!("no shape for 4-bit `{base}`")))?;
            let scales = st.tensor(&format!("{base}.scales")).map_err(|_| bad(format!("`{base}.scales` missing")))?;
            let scales: Vec<f32> =
                scales.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            let n: usize = shape.iter().product();
            let packed = view.data();
            if packed.len() * 2 < n || scales.len() * 32 < n {
                return Err(bad(format!("4-bit `{base}` is shorter than its shape {shape:?}")));
            }
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let nibble = (packed[i / 2] >> ((i % 2) * 4)) & 15;
                    (f32::from(nibble) - 8.0) * scales[i / 32]
                })
                .collect();
            out.insert(base.to_string(), HostTensor::new(shape.clone(), values).map_err(|e| bad(e.to_string()))?);
        }
    }
    Ok(out)
}

/// `x · W + b` with W stored as PyTorch does, `[out, in]`.
#[derive(Debug, Clone)]
struct Dense {
    weight: Tensor<DB, 2>,
    bias: Tensor<DB, 1>,
}

impl Dense {
    fn forward(&self, x: Tensor<DB, 3>) -> Tensor<DB, 3> {
        let [b, l, d] = x.dims();
        let out = self.bias.dims()[0];
        (x.reshape([b * l, d]).matmul(self.weight.clone()) + self.bias.clone().reshape([1, out])).reshape([b, l, out])
    }
}

#[derive(Debug, Clone)]
struct Norm {
    gamma: Tensor<DB, 1>,
    beta: Tensor<DB, 1>,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: Tensor<DB, 3>) -> Tensor<DB, 3> {
        let d = self.gamma.dims()[0];
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powf_scalar(2.0).mean_dim(2);
        centred / (var + self.eps).sqrt() * self.gamma.clone().reshape([1, 1, d]) + self.beta.clone().reshape([1, 1, d])
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// A frozen BERT encoder on the CPU device.
#[derive(Debug, Clone)]
pub struct Bert {
    config: BertConfig,
    word: Tensor<DB, 2>,
    position: Tensor<DB, 2>,
    token_type: Tensor<DB, 2>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    device: BurnDevice,
}

impl Bert {
    /// Builds the encoder from checkpoint weights, checking every name and shape.
    pub fn new(config: BertConfig, weights: &Weights, device: &BurnDevice) -> Result<Self, TextError> {
        let (h, f) = (config.hidden_size, config.intermediate_size);
        if config.num_attention_heads == 0 || h % config.num_attention_heads != 0 {
            return Err(bad(format!("hidden size {h} is not a multiple of {} heads", config.num_attention_heads)));
        }
        let tensor = |name: &str, shape: &[usize]| -> Result<HostTensor, TextError> {
            let t = weights.get(name).ok_or_else(|| bad(format!("weight `{name}` is missing")))?;
            if t.shape() != shape {
                return Err(bad(format!("weight `{name}` has shape {:?}, expected {shape:?}", t.shape())));
            }
            if !t.is_finite() {
                return Err(bad(format!("weight `{name}` holds non-finite values")));
            }
            Ok(t.clone())
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Tensor<DB, 2>, TextError> {
            let t = tensor(name, &[rows, cols])?;
            Ok(Tensor::from_data(TensorData::new(t.into_values(), [rows, cols]), device))
        };
        let vector = |name: &str, n: usize| -> Result<Tensor<DB, 1>, TextError> {
            Ok(Tensor::from_data(TensorData::new(tensor(name, &[n])?.into_values(), [n]), device))
        };
        // PyTorch stores [out, in]; the forward multiplies by [in, out].
        let dense = |prefix: &str, input: usize, out: usize| -> Result<Dense, TextError> {
            Ok(Dense {
                weight: matrix(&format!("{prefix}.weight"), out, input)?.transpose(),
                bias: vector(&format!("{prefix}.bias"), out)?,
            })
        };
        let norm = |prefix: &str| -> Result<Norm, TextError> {
            Ok(Norm {
                gamma: vector(&format!("{prefix}.weight"), h)?,
                beta: vector(&format!("{prefix}.bias"), h)?,
                eps: config.layer_norm_eps,
            })
        };
        let word_rows = weights
            .get("embeddings.word_embeddings.weight")
            .and_then(|t| t.shape().first().copied())
            .ok_or_else(|| bad("weight `embeddings.word_embeddings.weight` is missing"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: dense(&format!("{p}.attention.self.query"), h, h)?,
                    key: dense(&format!("{p}.attention.self.key"), h, h)?,
                    value: dense(&format!("{p}.attention.self.value"), h, h)?,
                    attention_out: dense(&format!("{p}.attention.output.dense"), h, h)?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: dense(&format!("{p}.intermediate.dense"), h, f)?,
                    output: dense(&format!("{p}.output.dense"), f, h)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<_, TextError>>()?;
        Ok(Self {
            word: matrix("embeddings.word_embeddings.weight", word_rows, h)?,
            position: matrix("embeddings.position_embeddings.weight", config.max_position_embeddings, h)?,
            token_type: matrix("embeddings.token_type_embeddings.weight", 2, h)?,
            embedding_norm: norm("embeddings.LayerNorm")?,
            layers,
            device: device.clone(),
            config,
        })
    }

    /// Mean-pooled, L2-normalised embeddings `[n, hidden]` of token sequences (ids below the
    /// vocabulary size; type ids 0). Sequences are padded to the longest and the padding masked.
    pub fn embed_ids(&self, sequences: &[Vec<u32>]) -> Result<HostTensor, TextError> {
        let h = self.config.hidden_size;
        let n = sequences.len();
        let len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if n == 0 || len == 0 {
            return Err(TextError::Input("nothing to embed".into()));
        }
        let vocab = self.word.dims()[0];
        if len > self.config.max_position_embeddings {
            return Err(TextError::Input(format!(
                "{len} tokens exceed {} positions",
                self.config.max_position_embeddings
            )));
        }
        if let Some(id) = sequences.iter().flatten().find(|id| **id as usize >= vocab) {
            return Err(TextError::Input(format!("token id {id} is outside the vocabulary of {vocab}")));
        }
        let ids: Vec<i64> =
            sequences.iter().flat_map(|s| (0..len).map(move |i| s.get(i).map_or(0, |id| i64::from(*id)))).collect();
        let mask: Vec<f32> =
            sequences.iter().flat_map(|s| (0..len).map(move |i| if i < s.len() { 1.0 } else { 0.0 })).collect();
        let ids = Tensor::<DB, 1, Int>::from_data(TensorData::new(ids, [n * len]), &self.device);
        let mask = Tensor::<DB, 2>::from_data(TensorData::new(mask, [n, len]), &self.device);

        let words = self.word.clone().select(0, ids).reshape([n, len, h]);
        let positions = self.position.clone().slice([0..len, 0..h]).reshape([1, len, h]);
        let types = self.token_type.clone().slice([0..1, 0..h]).reshape([1, 1, h]);
        let mut x = self.embedding_norm.forward(words + positions + types);

        let heads = self.config.num_attention_heads;
        let dh = h / heads;
        // Padding keys get a large negative score: no real token attends to them.
        let key_bias = ((mask.clone() - 1.0) * 1e4).reshape([n, 1, 1, len]);
        let split = |t: Tensor<DB, 3>| t.reshape([n, len, heads, dh]).swap_dims(1, 2);
        for layer in &self.layers {
            let q = split(layer.query.forward(x.clone()));
            let k = split(layer.key.forward(x.clone()));
            let v = split(layer.value.forward(x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt() + key_bias.clone();
            let context = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([n, len, h]);
            let attended = layer.attention_norm.forward(layer.attention_out.forward(context) + x);
            let hidden = layer.output.forward(gelu(layer.intermediate.forward(attended.clone())));
            x = layer.output_norm.forward(hidden + attended);
        }
        let weights = mask.clone().reshape([n, len, 1]);
        let pooled = (x * weights).sum_dim(1).reshape([n, h]) / mask.sum_dim(1).clamp_min(1.0);
        let norm = pooled.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-12);
        let out = HostTensor::from_burn(pooled / norm);
        if !out.is_finite() {
            return Err(TextError::Model("the encoder produced non-finite embeddings".into()));
        }
        Ok(out)
    }
}

/// A BERT with its tokenizer: the `minilm` text encoder.
#[derive(Debug)]
pub struct MiniLm {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    id: String,
}

fn read(path: &Path) -> Result<Vec<u8>, TextError> {
    std::fs::read(path).map_err(|_| bad(format!("{} is missing: run `{INSTALL}`", path.display())))
}

/// A tokenizer from `tokenizer.json` with padding off and truncation at `max_tokens`.
pub fn tokenizer(bytes: &[u8], max_tokens: usize) -> Result<tokenizers::Tokenizer, TextError> {
    let mut tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| bad(format!("tokenizer.json: {e}")))?;
    // tokenizer.json pads to 128: padded positions would enter the mean pooling.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| bad(format!("truncation: {e}")))?;
    Ok(tokenizer)
}

impl MiniLm {
    /// Loads `model.safetensors` (f32, or 4-bit with `shapes.json`), `tokenizer.json` and
    /// `config.json` from `settings.dir`.
    pub fn new(settings: &MiniLmSettings, device: &BurnDevice) -> Result<Self, TextError> {
        use sha2::{Digest, Sha256};
        let dir = &settings.dir;
        let config: BertConfig =
            serde_json::from_slice(&read(&dir.join("config.json"))?).map_err(|e| bad(format!("config.json: {e}")))?;
        let shapes: BTreeMap<String, Vec<usize>> = match std::fs::read(dir.join("shapes.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| bad(format!("shapes.json: {e}")))?,
            Err(_) => BTreeMap::new(),
        };
        let model = read(&dir.join("model.safetensors"))?;
        let tokenizer_bytes = read(&dir.join("tokenizer.json"))?;
        let id = Sha256::new().chain_update(&model).chain_update(&tokenizer_bytes).finalize();
        Ok(Self {
            bert: Bert::new(config, &read_weights(&model, &shapes)?, device)?,
            tokenizer: tokenizer(&tokenizer_bytes, settings.max_tokens)?,
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

impl TextEncoder for MiniLm {
    fn dim(&self) -> usize {
        self.bert.config.hidden_size
    }

    fn model_id(&self) -> String {
        self.id.clone()
    }

    fn embed(&self, texts: &[&str]) -> Result<HostTensor, TextError> {
        if texts.is_empty() {
            return HostTensor::new(vec![0, self.dim()], Vec::new()).map_err(|e| bad(e.to_string()));
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| TextError::Input(format!("tokenizing: {e}")))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        self.bert.embed_ids(&ids)
    }
}

fn build(settings: &toml::Table, ctx: &BuildContext) -> Result<Box<dyn TextEncoder>, PluginError> {
    let settings: MiniLmSettings = parse_settings(settings)?;
    let device = mmpg_backends::device(&ctx.device.inference())?;
    Ok(Box::new(MiniLm::new(&settings, &device).map_err(|e| PluginError::Build(e.to_string()))?))
}

inventory::submit! {
    StaticPlugin(Plugin::TextEncoder(Factory {
        name: "minilm",
        summary: "frozen BERT sentence encoder (all-MiniLM-L6-v2 by default): WordPiece, mean pooling, L2-normalised",
        settings: SettingsSpec::of::<MiniLmSettings>(),
        build: Build::Static(build),
    }))
}
