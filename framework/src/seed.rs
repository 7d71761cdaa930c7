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

static BURN_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `build` with Burn's CPU random generator (see [`crate::modules::init_device`]) seeded
/// to `seed`, holding a process-wide lock.
///
/// Burn's initialisers draw from one generator per process; seeding it right before each
/// plugin is built, under a lock, makes every initialisation a function of the deployment seed
/// even when several runs share a process (as tests do). Burn draws lazily, so `build` must
/// materialise its parameters ([`crate::modules::materialise`]) before returning.
pub fn with_burn_seed<T>(seed: u64, build: impl FnOnce() -> T) -> T {
    use burn::tensor::backend::Backend as _;
    let _guard = BURN_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    crate::Backend::seed(&crate::modules::init_device(), seed);
    build()
}
