//! Seeds: every random choice in a run derives from the deployment seed through these helpers.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The generator used everywhere: ChaCha8 is portable and stable across platforms and versions.
pub type Rng = ChaCha8Rng;

/// Mixes a seed with a stream id (SplitMix64 finaliser), so that derived streams are independent.
pub fn derive(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a seed from a seed and a label (device names, purposes).
pub fn derive_str(seed: u64, label: &str) -> u64 {
    label.bytes().fold(derive(seed, 0x6d6d_7067), |acc, b| derive(acc, u64::from(b)))
}

/// A generator for `(seed, stream)`.
pub fn rng(seed: u64, stream: u64) -> Rng {
    Rng::seed_from_u64(derive(seed, stream))
}
