//! The common-corruption suite of CIFAR-10-C (Hendrycks & Dietterich, 2019) for grey images in
//! [0, 1], at severities 1–5, with the published parameters for 32-pixel images (DESIGN.md §2).
//!
//! Every corruption is a pure function of the image, the severity and a seeded generator, and
//! returns values in [0, 1]. `saturate` changes colour saturation, which a grey image does not
//! have: it is left out of [`KINDS`] (a device asking for it gets the list of kinds). `elastic`
//! has no parameters in DESIGN.md; ours are stated at [`ELASTIC`].

use mmpg::seed::Rng;
use rand::Rng as _;
use rand_distr::{Distribution, Normal, Poisson};

/// The corruption kinds this suite implements.
pub const KINDS: [&str; 14] = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "fog",
    "contrast",
    "brightness",
    "jpeg",
    "pixelate",
    "elastic",
];

const GAUSSIAN_NOISE: [f32; 5] = [0.04, 0.06, 0.08, 0.09, 0.10];
const SHOT_NOISE: [f64; 5] = [500.0, 250.0, 100.0, 75.0, 50.0];
const IMPULSE: [f32; 5] = [0.01, 0.02, 0.03, 0.05, 0.07];
const SPECKLE: [f32; 5] = [0.06, 0.10, 0.12, 0.16, 0.20];
const GAUSSIAN_BLUR: [f32; 5] = [0.4, 0.6, 0.7, 0.8, 1.0];
/// (disk radius, anti-alias σ).
const DEFOCUS: [(f32, f32); 5] = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)];
/// (radius, σ), at a random angle within ±45°.
const MOTION: [(f32, f32); 5] = [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)];
/// Largest zoom; zooms run from 1 in steps of 0.01.
const ZOOM: [f32; 5] = [1.06, 1.11, 1.16, 1.21, 1.26];
/// (strength, wibble decay).
const FOG: [(f32, f32); 5] = [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)];
const CONTRAST: [f32; 5] = [0.75, 0.5, 0.4, 0.3, 0.15];
const BRIGHTNESS: [f32; 5] = [0.05, 0.1, 0.15, 0.2, 0.3];
const JPEG_QUALITY: [u8; 5] = [80, 65, 58, 50, 40];
const PIXELATE: [f32; 5] = [0.95, 0.9, 0.85, 0.75, 0.65];
/// Elastic (displacement α in pixels, smoothing σ in pixels): ours, growing with severity.
pub const ELASTIC: [(f32, f32); 5] = [(1.0, 3.0), (1.5, 3.0), (2.0, 2.5), (2.5, 2.5), (3.0, 2.0)];

/// Why a corruption could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CorruptionError {
    /// Not one of [`KINDS`].
    #[error("unknown corruption `{0}`")]
    Unknown(String),
    /// Severity outside 1..=5.
    #[error("severity must be 1..=5, found {0}")]
    Severity(u8),
    /// The pixels are not a `size × size` image.
    #[error("expected {expected} pixels, found {found}")]
    Size {
        /// size².
        expected: usize,
        /// Pixels given.
        found: usize,
    },
}

/// Corrupts a `size × size` grey image in place.
pub fn corrupt(image: &mut [f32], size: usize, kind: &str, severity: u8, rng: &mut Rng) -> Result<(), CorruptionError> {
    if !(1..=5).contains(&severity) {
        return Err(CorruptionError::Severity(severity));
    }
    if image.len() != size * size {
        return Err(CorruptionError::Size { expected: size * size, found: image.len() });
    }
    let s = usize::from(severity - 1);
    match kind {
        "gaussian_noise" => {
            let normal = Normal::new(0.0, GAUSSIAN_NOISE[s]).expect("positive σ");
            image.iter_mut().for_each(|p| *p += normal.sample(rng));
        }
        "shot_noise" => {
            let lambda = SHOT_NOISE[s];
            for p in image.iter_mut() {
                let rate = (f64::from(*p) * lambda).max(1e-9);
                let draw: f64 = Poisson::new(rate).map_or(0.0, |d| d.sample(rng));
                *p = (draw / lambda) as f32;
            }
        }
        "impulse_noise" => {
            for p in image.iter_mut() {
                if rng.random::<f32>() < IMPULSE[s] {
                    *p = if rng.random::<bool>() { 1.0 } else { 0.0 };
                }
            }
        }
        "speckle_noise" => {
            let normal = Normal::new(0.0, SPECKLE[s]).expect("positive σ");
            image.iter_mut().for_each(|p| *p += *p * normal.sample(rng));
        }
        "gaussian_blur" => gaussian_blur(image, size, GAUSSIAN_BLUR[s]),
        "defocus_blur" => {
            let (radius, alias) = DEFOCUS[s];
            convolve(image, size, &disk_kernel(radius));
            gaussian_blur(image, size, alias);
        }
        "motion_blur" => {
            let (radius, sigma) = MOTION[s];
            let angle = rng.random_range(-45f32..45.0).to_radians();
            motion_blur(image, size, radius, sigma, angle);
        }
        "zoom_blur" => zoom_blur(image, size, ZOOM[s]),
        "fog" => {
            let (strength, decay) = FOG[s];
            fog(image, size, strength, decay, rng);
        }
        "contrast" => {
            let mean = image.iter().sum::<f32>() / image.len() as f32;
            image.iter_mut().for_each(|p| *p = (*p - mean) * CONTRAST[s] + mean);
        }
        // On a grey image the HSV value channel is the pixel itself.
        "brightness" => image.iter_mut().for_each(|p| *p += BRIGHTNESS[s]),
        "jpeg" => jpeg(image, size, JPEG_QUALITY[s]),
        "pixelate" => pixelate(image, size, PIXELATE[s]),
        "elastic" => {
            let (alpha, sigma) = ELASTIC[s];
            elastic(image, size, alpha, sigma, rng);
        }
        other => return Err(CorruptionError::Unknown(other.to_string())),
    }
    image.iter_mut().for_each(|p| *p = if p.is_finite() { p.clamp(0.0, 1.0) } else { 0.0 });
    Ok(())
}

/// A square kernel, odd side, weights summing to 1.
#[derive(Debug, Clone)]
struct Kernel {
    side: usize,
    weights: Vec<f32>,
}

impl Kernel {
    fn normalised(side: usize, weights: Vec<f32>) -> Self {
        let sum: f32 = weights.iter().sum();
        Self { side, weights: weights.into_iter().map(|w| w / sum).collect() }
    }
}

/// A normalised 1-D Gaussian of σ, radius ⌈3σ⌉ (at least 1).
fn gaussian_taps(sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as i32;
    let taps: Vec<f32> = (-radius..=radius).map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// Gaussian blur of σ, separably (rows, then columns), edges reflected.
fn gaussian_blur(image: &mut [f32], size: usize, sigma: f32) {
    let taps = gaussian_taps(sigma);
    let r = (taps.len() / 2) as i64;
    let mut rows = vec![0f32; image.len()];
    for y in 0..size {
        for x in 0..size {
            rows[y * size + x] = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * image[y * size + reflect(x as i64 + k as i64 - r, size)])
                .sum();
        }
    }
    for y in 0..size {
        for x in 0..size {
            image[y * size + x] =
                taps.iter().enumerate().map(|(k, t)| t * rows[reflect(y as i64 + k as i64 - r, size) * size + x]).sum();
        }
    }
}

/// The disk of `radius` (CIFAR-10-C's defocus kernel: a 3×3 support below radius 1).
fn disk_kernel(radius: f32) -> Kernel {
    let r = radius.ceil().max(1.0) as i32;
    let side = (2 * r + 1) as usize;
    let weights = (-r..=r)
        .flat_map(|y| (-r..=r).map(move |x| if ((x * x + y * y) as f32) <= radius * radius { 1.0 } else { 0.0 }))
        .collect();
    Kernel::normalised(side, weights)
}

/// Reflect-101 index into `0..n`.
fn reflect(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

fn convolve(image: &mut [f32], size: usize, kernel: &Kernel) {
    let r = (kernel.side / 2) as i64;
    let src = image.to_vec();
    for y in 0..size {
        for x in 0..size {
            let mut acc = 0.0;
            for ky in 0..kernel.side {
                for kx in 0..kernel.side {
                    let sy = reflect(y as i64 + ky as i64 - r, size);
                    let sx = reflect(x as i64 + kx as i64 - r, size);
                    acc += kernel.weights[ky * kernel.side + kx] * src[sy * size + sx];
                }
            }
            image[y * size + x] = acc;
        }
    }
}

/// Bilinear sample at a real position, edges clamped.
fn sample(src: &[f32], size: usize, x: f32, y: f32) -> f32 {
    let max = (size - 1) as f32;
    let (x, y) = (x.clamp(0.0, max), y.clamp(0.0, max));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let top = src[y0 * size + x0] * (1.0 - fx) + src[y0 * size + x1] * fx;
    let bottom = src[y1 * size + x0] * (1.0 - fx) + src[y1 * size + x1] * fx;
    top * (1.0 - fy) + bottom * fy
}

/// One-sided blur along `angle`: the pixel and its predecessors up to `radius` away, weighted
/// by a Gaussian of σ (ImageMagick's motion blur, which CIFAR-10-C uses).
fn motion_blur(image: &mut [f32], size: usize, radius: f32, sigma: f32, angle: f32) {
    let src = image.to_vec();
    let steps = radius.ceil() as usize;
    let weights: Vec<f32> = (0..=steps).map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = weights.iter().sum();
    let (dx, dy) = (angle.cos(), angle.sin());
    for y in 0..size {
        for x in 0..size {
            let acc: f32 = weights
                .iter()
                .enumerate()
                .map(|(d, w)| w * sample(&src, size, x as f32 - dx * d as f32, y as f32 - dy * d as f32))
                .sum();
            image[y * size + x] = acc / total;
        }
    }
}

/// The mean of the image and its centre zooms by 1.01, 1.02, … up to `max_zoom`.
fn zoom_blur(image: &mut [f32], size: usize, max_zoom: f32) {
    let src = image.to_vec();
    let mut acc = src.clone();
    let centre = (size as f32 - 1.0) / 2.0;
    let zooms: Vec<f32> = (1..).map(|i| 1.0 + 0.01 * i as f32).take_while(|z| *z < max_zoom - 1e-4).collect();
    for zoom in &zooms {
        for y in 0..size {
            for x in 0..size {
                let sx = centre + (x as f32 - centre) / zoom;
                let sy = centre + (y as f32 - centre) / zoom;
                acc[y * size + x] += sample(&src, size, sx, sy);
            }
        }
    }
    let n = (zooms.len() + 1) as f32;
    image.iter_mut().zip(acc).for_each(|(p, a)| *p = a / n);
}

/// Diamond-square plasma fractal on a `map × map` grid (`map` a power of two), in [0, 1].
fn plasma_fractal(map: usize, decay: f32, rng: &mut Rng) -> Vec<f32> {
    let mut grid = vec![0f32; map * map];
    let mut step = map;
    let mut range = 100.0f32;
    let at = |y: usize, x: usize| (y % map) * map + (x % map);
    while step >= 2 {
        let half = step / 2;
        // Squares: centres from their four corners.
        for y in (0..map).step_by(step) {
            for x in (0..map).step_by(step) {
                let mean =
                    (grid[at(y, x)] + grid[at(y, x + step)] + grid[at(y + step, x)] + grid[at(y + step, x + step)])
                        / 4.0;
                grid[at(y + half, x + half)] = mean + rng.random_range(-range..range);
            }
        }
        // Diamonds: edge midpoints from their four neighbours.
        for y in (0..map).step_by(half) {
            let offset = if (y / half).is_multiple_of(2) { half } else { 0 };
            for x in (offset..map).step_by(step) {
                let mean = (grid[at(y + map - half, x)]
                    + grid[at(y + half, x)]
                    + grid[at(y, x + map - half)]
                    + grid[at(y, x + half)])
                    / 4.0;
                grid[at(y, x)] = mean + rng.random_range(-range..range);
            }
        }
        step = half;
        range /= decay;
    }
    let (lo, hi) = grid.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    grid.iter().map(|v| (v - lo) / (hi - lo).max(1e-12)).collect()
}

fn fog(image: &mut [f32], size: usize, strength: f32, decay: f32, rng: &mut Rng) {
    let map = size.next_power_of_two().max(2);
    let plasma = plasma_fractal(map, decay, rng);
    let max = image.iter().copied().fold(0f32, f32::max);
    for y in 0..size {
        for x in 0..size {
            let p = &mut image[y * size + x];
            *p = (*p + strength * plasma[y * map + x]) * max / (max + strength);
        }
    }
}

fn jpeg(image: &mut [f32], size: usize, quality: u8) {
    let side = u32::try_from(size).expect("image sides are small");
    let pixels: Vec<u8> = image.iter().map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mut encoded = Vec::new();
    let written = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, quality).encode(
        &pixels,
        side,
        side,
        image::ExtendedColorType::L8,
    );
    // Encoding an in-memory L8 image of matching size cannot fail; if it ever did, the image
    // stays uncorrupted rather than half-written.
    if written.is_err() {
        return;
    }
    if let Ok(decoded) = image::load_from_memory_with_format(&encoded, image::ImageFormat::Jpeg) {
        let grey = decoded.to_luma8();
        if grey.len() == image.len() {
            image.iter_mut().zip(grey.as_raw()).for_each(|(p, v)| *p = f32::from(*v) / 255.0);
        }
    }
}

/// Area-weighted (box) resampling weights from `from` to `to` samples: output `j` averages the
/// input over `[j·from/to, (j+1)·from/to)`, counting partly covered pixels by their overlap.
fn box_weights(from: usize, to: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = from as f32 / to as f32;
    (0..to)
        .map(|j| {
            let (lo, hi) = (j as f32 * scale, (j + 1) as f32 * scale);
            let mut w: Vec<(usize, f32)> = (lo.floor() as usize..(hi.ceil() as usize).min(from))
                .map(|i| (i, (hi.min(i as f32 + 1.0) - lo.max(i as f32)).max(0.0)))
                .filter(|(_, w)| *w > 0.0)
                .collect();
            let total: f32 = w.iter().map(|(_, v)| v).sum();
            w.iter_mut().for_each(|(_, v)| *v /= total);
            w
        })
        .collect()
}

/// Separable box resampling of a square image.
fn box_resize(src: &[f32], from: usize, to: usize) -> Vec<f32> {
    let weights = box_weights(from, to);
    let mut rows = vec![0f32; from * to];
    for y in 0..from {
        for (x, w) in weights.iter().enumerate() {
            rows[y * to + x] = w.iter().map(|(i, v)| v * src[y * from + i]).sum();
        }
    }
    let mut out = vec![0f32; to * to];
    for (y, w) in weights.iter().enumerate() {
        for x in 0..to {
            out[y * to + x] = w.iter().map(|(i, v)| v * rows[i * to + x]).sum();
        }
    }
    out
}

/// Box-resizes to `⌊factor · size⌋` and back, as CIFAR-10-C does with PIL's BOX filter.
fn pixelate(image: &mut [f32], size: usize, factor: f32) {
    let small = ((size as f32 * factor) as usize).clamp(1, size);
    let back = box_resize(&box_resize(image, size, small), small, size);
    image.copy_from_slice(&back);
}

/// Displaces every pixel by a smooth random field (uniform noise, Gaussian-smoothed, scaled to
/// `alpha` pixels at most) and resamples bilinearly.
fn elastic(image: &mut [f32], size: usize, alpha: f32, sigma: f32, rng: &mut Rng) {
    let mut field = || {
        let mut f: Vec<f32> = (0..size * size).map(|_| rng.random_range(-1f32..1.0)).collect();
        gaussian_blur(&mut f, size, sigma);
        let peak = f.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        f.into_iter().map(|v| v / peak * alpha).collect::<Vec<f32>>()
    };
    let (dx, dy) = (field(), field());
    let src = image.to_vec();
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            image[i] = sample(&src, size, x as f32 + dx[i], y as f32 + dy[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmpg::seed;
    use proptest::prelude::*;

    /// A structured test image: a bright blob on a ground of incommensurate waves (periodic
    /// stripes would alias with some pixelation factors and make distortion non-monotone).
    fn picture(size: usize) -> Vec<f32> {
        (0..size * size)
            .map(|i| {
                let (y, x) = ((i / size) as f32, (i % size) as f32);
                let c = (size as f32 - 1.0) / 2.0;
                let blob = if (x - c).powi(2) + (y - c).powi(2) < (size as f32 / 4.0).powi(2) { 0.35 } else { 0.0 };
                let waves = 0.12 * (0.9 * x + 0.4 * y).sin() + 0.08 * (0.23 * x * y / size as f32 + 1.3 * y).sin();
                0.3 + blob + waves
            })
            .collect()
    }

    fn mse(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32
    }

    /// Distortion of `kind` at `severity`, averaged over a few seeds.
    fn distortion(kind: &str, severity: u8) -> f32 {
        let clean = picture(28);
        (0..4)
            .map(|s| {
                let mut img = clean.clone();
                corrupt(&mut img, 28, kind, severity, &mut seed::rng(s, 0)).expect("valid kind");
                mse(&img, &clean)
            })
            .sum::<f32>()
            / 4.0
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn output_stays_in_the_unit_range_and_is_deterministic_per_seed(
            k in 0usize..KINDS.len(),
            severity in 1u8..=5,
            seed in any::<u64>(),
            pixels in prop::collection::vec(0f32..=1.0, 28 * 28),
        ) {
            let mut a = pixels.clone();
            let mut b = pixels;
            corrupt(&mut a, 28, KINDS[k], severity, &mut seed::rng(seed, 1)).expect("valid");
            corrupt(&mut b, 28, KINDS[k], severity, &mut seed::rng(seed, 1)).expect("valid");
            prop_assert!(a.iter().all(|p| (0.0..=1.0).contains(p)));
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn distortion_grows_with_severity() {
        for kind in KINDS {
            let d: Vec<f32> = (1..=5).map(|s| distortion(kind, s)).collect();
            assert!(d[0] > 0.0, "{kind} changes nothing at severity 1: {d:?}");
            assert!(d[0] <= d[2] * 1.05 && d[2] <= d[4] * 1.05, "{kind}: {d:?}");
        }
    }

    #[test]
    fn unknown_kinds_and_severities_are_refused() {
        let mut img = picture(8);
        let mut rng = seed::rng(0, 0);
        assert_eq!(corrupt(&mut img, 8, "saturate", 1, &mut rng), Err(CorruptionError::Unknown("saturate".into())));
        assert_eq!(corrupt(&mut img, 8, "fog", 6, &mut rng), Err(CorruptionError::Severity(6)));
        assert!(matches!(corrupt(&mut img, 9, "fog", 1, &mut rng), Err(CorruptionError::Size { .. })));
    }
}
