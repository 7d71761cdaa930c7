//! Which input resolution for the pretrained frame encoder: for each candidate, the serving time
//! per frame of EfficientNet-Lite0 on this machine and the accuracy of a linear probe on its
//! pooled features of clean Fashion-MNIST photos (a softmax regression trained on training
//! photos, scored on test photos). Not a test: a measurement that chose `resolution` in
//! examples/fashion-lite0.toml.
//!
//!     cargo run --release --example encoder_resolution [-- TRAIN TEST RESOLUTION...]
//!
//! Defaults: 2,000 training and 1,000 test photos; resolutions 32 48 64 96 128.

use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use mmpg_backends::{Backend, BurnDevice};
use mmpg_lmm::encoder::{EncoderSettings, FrameEncoder};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Softmax regression on standardised features.
#[derive(Module, Debug)]
struct Probe<B: burn::tensor::backend::Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Param<Tensor<B, 1>>,
}

fn photos(prefix: &str, n: usize) -> anyhow::Result<(Vec<f32>, Vec<i64>)> {
    let images = mmpg_fashion::parse_images(&std::fs::read(format!("{FASHION}/{prefix}-images-idx3-ubyte.gz"))?)?;
    let labels = mmpg_fashion::parse_labels(&std::fs::read(format!("{FASHION}/{prefix}-labels-idx1-ubyte.gz"))?)?;
    let n = n.min(images.len());
    let pixels = images[..n].iter().flat_map(|im| im.iter().map(|p| f32::from(*p) / 255.0)).collect();
    Ok((pixels, labels[..n].iter().map(|l| i64::from(*l)).collect()))
}

/// Features of `n` photos and the milliseconds per frame it took, in batches of 32.
fn encode(encoder: &FrameEncoder, pixels: &[f32], n: usize) -> anyhow::Result<(Vec<f32>, f64)> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(n * encoder.dim());
    for chunk in pixels.chunks(32 * 784) {
        out.extend(encoder.encode(chunk, chunk.len() / 784, [1, 28, 28]).map_err(anyhow::Error::msg)?);
    }
    Ok((out, t0.elapsed().as_secs_f64() * 1e3 / n as f64))
}

fn probe_accuracy(train: (&[f32], &[i64]), test: (&[f32], &[i64]), d: usize) -> f64 {
    let device = BurnDevice::autodiff(BurnDevice::Flex(Default::default()));
    let (n, m) = (train.1.len(), test.1.len());
    // Standardise with the training features' moments.
    let mut mean = vec![0f32; d];
    let mut std = vec![0f32; d];
    for row in train.0.chunks(d) {
        row.iter().zip(&mut mean).for_each(|(v, s)| *s += v / n as f32);
    }
    for row in train.0.chunks(d) {
        row.iter().zip(&mean).zip(&mut std).for_each(|((v, mu), s)| *s += (v - mu).powi(2) / n as f32);
    }
    let norm = |x: &[f32]| -> Vec<f32> {
        x.chunks(d)
            .flat_map(|r| {
                r.iter().enumerate().map(|(j, v)| (v - mean[j]) / std[j].sqrt().max(1e-4)).collect::<Vec<_>>()
            })
            .collect()
    };
    let x = Tensor::<Backend, 2>::from_data(TensorData::new(norm(train.0), [n, d]), &device);
    let y = Tensor::<Backend, 1, Int>::from_data(TensorData::new(train.1.to_vec(), [n]), &device);
    let mut probe = Probe::<Backend> {
        weight: Param::from_tensor(Tensor::zeros([d, 10], &device)),
        bias: Param::from_tensor(Tensor::zeros([10], &device)),
    };
    let mut optim = AdamConfig::new().with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(1e-4))).init();
    let loss = CrossEntropyLossConfig::new().init(&device);
    for _ in 0..300 {
        let logits = x.clone().matmul(probe.weight.val()) + probe.bias.val().reshape([1, 10]);
        let l = loss.forward(logits, y.clone());
        let grads = GradientsParams::from_grads(l.backward(), &probe);
        probe = optim.step(1e-2, probe, grads);
    }
    let xt = Tensor::<Backend, 2>::from_data(TensorData::new(norm(test.0), [m, d]), &device);
    let logits = xt.matmul(probe.weight.val()) + probe.bias.val().reshape([1, 10]);
    let predicted: Vec<i64> = logits.argmax(1).into_data().convert::<i64>().to_vec().unwrap_or_default();
    predicted.iter().zip(test.1).filter(|(p, y)| p == y).count() as f64 / m as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (n_train, n_test) = (args.first().copied().unwrap_or(2000), args.get(1).copied().unwrap_or(1000));
    let resolutions = if args.len() > 2 { args[2..].to_vec() } else { vec![32, 48, 64, 96, 128] };
    let (train_pixels, train_labels) = photos("train", n_train)?;
    let (test_pixels, test_labels) = photos("t10k", n_test)?;
    let device = BurnDevice::Flex(Default::default());
    println!("| resolution | serving ms/frame (batches of 32) | linear probe, clean test photos |");
    println!("|---:|---:|---:|");
    for r in resolutions {
        let encoder =
            FrameEncoder::load(EncoderSettings { resolution: r, memo_mib: 0, ..Default::default() }, &device)?;
        let (train, _) = encode(&encoder, &train_pixels, train_labels.len())?;
        let (test, ms) = encode(&encoder, &test_pixels, test_labels.len())?;
        let accuracy = probe_accuracy((&train, &train_labels), (&test, &test_labels), encoder.dim());
        println!("| {r} | {ms:.2} | {:.1}% |", accuracy * 100.0);
    }
    Ok(())
}
