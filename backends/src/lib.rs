//! Burn for mmpg plugins. The framework speaks plain data; a plugin computing with Burn uses
//! this crate to turn the [`DeviceDescriptor`] it is given into a Burn device ([`device`]), to
//! move [`HostTensor`]s in and out of Burn ([`HostTensorBurn`]), to seed Burn's initialisers
//! ([`with_burn_seed`]) and to handle modules and checkpoints ([`modules`]).
//!
//! It also registers one backend provider per Burn backend family, chosen at run time by
//! `[backend] kind = "…"`. A family that this binary was built without still registers, so
//! asking for it gives a clear error naming the cargo feature instead of "unknown backend".

use std::collections::BTreeSet;
use std::sync::Mutex;

use burn::tensor::{Tensor, TensorData};
use mmpg::{BackendError, BackendProvider, DeviceDescriptor, HostTensor, Plugin, RankMismatch, StaticPlugin};

pub mod modules;

/// Re-exported so plugin crates use the exact Burn these helpers were built with.
pub use burn;

/// The Burn backend every plugin computes with: Burn's run-time dispatch over the backends
/// compiled in. Autodiff is a property of the device ([`BurnDevice::autodiff`]).
pub type Backend = burn::Dispatch;

/// A device of [`Backend`].
pub type BurnDevice = burn::DispatchDevice;

/// The backend families compiled into this build (what a plugin library built with this crate
/// declares in `mmpg::export_plugins!(backends = …)`).
pub fn compiled() -> Vec<&'static str> {
    let mut kinds = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        kinds.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        kinds.push("cuda");
    }
    if cfg!(feature = "tch") {
        kinds.push("tch");
    }
    kinds
}

/// The Burn device a descriptor names, built by its family (checked once per process with a
/// real computation), with automatic differentiation when the descriptor asks for it.
///
/// # Errors
/// [`BackendError::Unavailable`] for an unknown kind or an unusable device,
/// [`BackendError::NotCompiledIn`] for a family this build lacks.
pub fn device(descriptor: &DeviceDescriptor) -> Result<BurnDevice, BackendError> {
    let family = FAMILIES.iter().find(|f| f.kind == descriptor.kind).ok_or_else(|| BackendError::Unavailable {
        kind: descriptor.kind.clone(),
        reason: format!("no such backend; known: {}", FAMILIES.iter().map(|f| f.kind).collect::<Vec<_>>().join(", ")),
    })?;
    let device = family.burn_device(descriptor.index)?;
    Ok(if descriptor.autodiff { BurnDevice::autodiff(device) } else { device })
}

/// Moving [`HostTensor`]s into and out of Burn.
pub trait HostTensorBurn: Sized {
    /// The values on `device` as a tensor of rank `D`.
    ///
    /// # Errors
    /// [`RankMismatch`] when the tensor's rank is not `D`.
    fn to_burn<const D: usize>(&self, device: &BurnDevice) -> Result<Tensor<Backend, D>, RankMismatch>;

    /// A Burn tensor read back to the host.
    fn from_burn<const D: usize>(tensor: Tensor<Backend, D>) -> Self;
}

impl HostTensorBurn for HostTensor {
    fn to_burn<const D: usize>(&self, device: &BurnDevice) -> Result<Tensor<Backend, D>, RankMismatch> {
        if self.shape().len() != D {
            return Err(RankMismatch { expected: D, shape: self.shape().to_vec() });
        }
        let data = TensorData::new(self.values().to_vec(), self.shape().to_vec());
        Ok(Tensor::from_data(data, device))
    }

    fn from_burn<const D: usize>(tensor: Tensor<Backend, D>) -> Self {
        let shape = tensor.dims().to_vec();
        let data = tensor.into_data().convert::<f32>();
        let values = data.into_vec::<f32>().expect("`convert::<f32>` guarantees the element type");
        HostTensor::new(shape, values).expect("a Burn tensor's values fill its dims")
    }
}

static BURN_RNG: Mutex<()> = Mutex::new(());

/// Runs `build` with Burn's CPU random generator (see [`modules::init_device`]) seeded to
/// `seed`, holding a process-wide lock.
///
/// Burn's initialisers draw from one generator per process; seeding it right before each
/// plugin is built, under a lock, makes every initialisation a function of the deployment seed
/// even when several runs share a process (as tests do). Burn draws lazily, so `build` must
/// materialise its parameters ([`modules::materialise`]) before returning.
pub fn with_burn_seed<T>(seed: u64, build: impl FnOnce() -> T) -> T {
    use burn::tensor::backend::Backend as _;
    let _guard = BURN_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Backend::seed(&modules::init_device(), seed);
    build()
}

/// Builds the device with a given index, or says why it cannot be had.
type MakeDevice = fn(usize) -> Result<BurnDevice, BackendError>;

/// One backend family: its kind, the cargo feature that compiles it in, and — when this binary
/// contains it — how to build its devices. A family this build lacks still registers, so that
/// asking for it names the feature to rebuild with.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    kind: &'static str,
    feature: &'static str,
    summary: &'static str,
    make: Option<MakeDevice>,
}

impl Family {
    /// The family's device `index`, without automatic differentiation.
    fn burn_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        match self.make {
            Some(make) => make(index),
            None => Err(BackendError::NotCompiledIn { kind: self.kind.into(), feature: self.feature.into() }),
        }
    }
}

impl BackendProvider for Family {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn cargo_feature(&self) -> &'static str {
        self.feature
    }

    fn compiled_in(&self) -> bool {
        self.make.is_some()
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn describe(&self, index: usize) -> Result<String, BackendError> {
        self.burn_device(index).map(|d| format!("{d:?}"))
    }
}

/// Every family, in the order `mmpg plugins` lists them.
const FAMILIES: [&Family; 4] = [&CPU, &WGPU, &CUDA, &TCH];

/// Burn's pure-Rust CPU backend (`flex`), multi-threaded, no system dependencies.
pub static CPU: Family = Family {
    kind: "cpu",
    feature: "cpu",
    summary: "Burn flex: pure-Rust CPU backend (always available)",
    make: Some(cpu_device),
};

/// WebGPU through Burn's wgpu runtime: Vulkan, Metal or DX12, whichever the machine has; on a
/// machine without a GPU, Mesa's software Vulkan driver (lavapipe). Kernels are compiled on
/// first use, so the first call of each operation is slow.
pub static WGPU: Family = Family {
    kind: "wgpu",
    feature: "wgpu",
    summary: if cfg!(feature = "wgpu") {
        "WebGPU via wgpu (Vulkan/Metal/DX12; Mesa lavapipe on CPU-only machines)"
    } else {
        "WebGPU via wgpu (not compiled in)"
    },
    #[cfg(feature = "wgpu")]
    make: Some(wgpu_device),
    #[cfg(not(feature = "wgpu"))]
    make: None,
};

/// NVIDIA CUDA through Burn's CubeCL runtime. Needs no CUDA toolkit to build; at run time it
/// loads the driver and NVRTC. Without nvcc at build time cudarc targets the newest CUDA API
/// (13.x, driver >= 580); set `CUDARC_CUDA_VERSION=12080` when building for CUDA 12.8 drivers.
pub static CUDA: Family = Family {
    kind: "cuda",
    feature: "cuda",
    summary: if cfg!(feature = "cuda") {
        "NVIDIA CUDA via CubeCL (driver and NVRTC loaded at run time)"
    } else {
        "NVIDIA CUDA (not compiled in)"
    },
    #[cfg(feature = "cuda")]
    make: Some(cuda_device),
    #[cfg(not(feature = "cuda"))]
    make: None,
};

/// LibTorch through burn-tch. Built against the LibTorch of a Python venv's `torch` package
/// (`scripts/with-libtorch.sh`), never downloaded.
pub static TCH: Family = Family {
    kind: "tch",
    feature: "tch",
    summary: if cfg!(feature = "tch") {
        "LibTorch via burn-tch (torch's own CPU or CUDA kernels)"
    } else {
        "LibTorch via burn-tch (not compiled in)"
    },
    #[cfg(feature = "tch")]
    make: Some(tch_device),
    #[cfg(not(feature = "tch"))]
    make: None,
};

fn cpu_device(index: usize) -> Result<BurnDevice, BackendError> {
    if index != 0 {
        return Err(BackendError::Unavailable {
            kind: "cpu".into(),
            reason: format!("the CPU backend has one device (index 0), asked for {index}"),
        });
    }
    Ok(BurnDevice::Flex(Default::default()))
}

/// Device 0 is the adapter wgpu ranks best (`CUBECL_WGPU_DEFAULT_DEVICE`, e.g. `Cpu` or
/// `DiscreteGpu(1)`, overrides it); device `k >= 1` is the discrete GPU `k - 1`.
#[cfg(feature = "wgpu")]
fn wgpu_device(index: usize) -> Result<BurnDevice, BackendError> {
    use burn::backend::wgpu::WgpuDevice;
    let device = BurnDevice::Wgpu(match index {
        0 => WgpuDevice::DefaultDevice,
        k => WgpuDevice::DiscreteGpu(k - 1),
    });
    smoke_test("wgpu", &device).map_err(|e| match e {
        BackendError::Unavailable { kind, reason } => BackendError::Unavailable {
            kind,
            reason: format!(
                "{reason}; wgpu needs a Vulkan, Metal or DX12 driver (without a GPU, Mesa's lavapipe: \
                 `apt-get install mesa-vulkan-drivers libvulkan1`)"
            ),
        },
        other => other,
    })?;
    Ok(device)
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<BurnDevice, BackendError> {
    let device = BurnDevice::Cuda(burn::backend::cuda::CudaDevice::new(index));
    smoke_test("cuda", &device)?;
    Ok(device)
}

/// Device 0 is LibTorch's CPU; device `k >= 1` is CUDA device `k - 1` (a CUDA build of torch).
#[cfg(feature = "tch")]
fn tch_device(index: usize) -> Result<BurnDevice, BackendError> {
    use burn::backend::libtorch::LibTorchDevice;
    let device = BurnDevice::LibTorch(match index {
        0 => LibTorchDevice::Cpu,
        k => LibTorchDevice::Cuda(k - 1),
    });
    smoke_test("tch", &device)?;
    Ok(device)
}

/// Runs one tiny computation on `device`. GPU runtimes panic when no driver or device is
/// present — sometimes in their own server thread, leaving only a closed channel in ours — so
/// every panic message raised meanwhile is kept, and the first one, the cause, becomes a typed
/// "unavailable" error instead of ending the process.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
fn smoke_test(kind: &str, device: &BurnDevice) -> Result<(), BackendError> {
    // Every plugin builds its device from a descriptor; one check per device is enough.
    static PASSED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let key = format!("{device:?}");
    if PASSED.lock().is_ok_and(|passed| passed.contains(&key)) {
        return Ok(());
    }
    first_computation(kind, device)?;
    if let Ok(mut passed) = PASSED.lock() {
        passed.insert(key);
    }
    Ok(())
}

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
fn first_computation(kind: &str, device: &BurnDevice) -> Result<(), BackendError> {
    use std::sync::Arc;
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let previous = std::panic::take_hook();
    let sink = Arc::clone(&messages);
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut kept) = sink.lock() {
            kept.push(panic_text(info.payload()));
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<Backend, 1>::ones([4], device).sum().into_scalar()
    }));
    std::panic::set_hook(previous);
    let unavailable = |reason: String| BackendError::Unavailable { kind: kind.into(), reason };
    match result {
        Ok(sum) if (sum - 4.0).abs() < 1e-6 => Ok(()),
        Ok(sum) => Err(unavailable(format!("a test sum of four ones gave {sum}"))),
        Err(payload) => {
            let first = messages.lock().ok().and_then(|kept| kept.first().cloned());
            let message = first.unwrap_or_else(|| panic_text(payload.as_ref()));
            // Runtimes list every library name they tried; the first words say what failed.
            let line = message.lines().next().unwrap_or_default();
            let cause = match line.char_indices().nth(160) {
                Some((cut, _)) => format!("{}…", &line[..cut]),
                None => line.to_string(),
            };
            Err(unavailable(format!("no usable device or driver (the runtime failed: {cause})")))
        }
    }
}

/// The text of a panic payload (`panic!` gives a `String` or a `&str`).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the runtime panicked".into())
}

inventory::submit! { StaticPlugin(Plugin::Backend(&CPU)) }
inventory::submit! { StaticPlugin(Plugin::Backend(&WGPU)) }
inventory::submit! { StaticPlugin(Plugin::Backend(&CUDA)) }
inventory::submit! { StaticPlugin(Plugin::Backend(&TCH)) }

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backends_name_their_feature() {
        let err = CUDA.probe(0).expect_err("not compiled in");
        assert_eq!(err.to_string(), "backend `cuda` is not compiled in: rebuild with `--features cuda`");
    }

    #[test]
    fn cpu_has_exactly_one_device() {
        assert!(CPU.probe(0).is_ok());
        assert!(matches!(CPU.probe(1), Err(BackendError::Unavailable { .. })));
    }

    #[test]
    fn descriptors_become_devices_or_say_why_not() {
        let cpu = DeviceDescriptor::cpu();
        assert!(matches!(device(&cpu), Ok(BurnDevice::Flex(_))));
        assert!(matches!(device(&cpu.training()), Ok(BurnDevice::Autodiff(_))));
        let unknown = DeviceDescriptor { kind: "tpu".into(), ..cpu };
        let err = device(&unknown).expect_err("unknown kind");
        assert_eq!(
            err.to_string(),
            "backend `tpu` is not available on this machine: no such backend; known: cpu, wgpu, cuda, tch"
        );
    }

    #[test]
    fn a_wrong_rank_is_reported_as_such() {
        let t = HostTensor::new(vec![3, 4], vec![0.0; 12]).expect("fits");
        let err = t.to_burn::<1>(&BurnDevice::Flex(Default::default())).expect_err("rank 2, not 1");
        assert_eq!(err.to_string(), "expected a rank-1 tensor, found shape [3, 4]");
    }

    #[test]
    fn host_tensors_round_trip_through_burn() {
        let t = HostTensor::new(vec![2, 3], (0..6).map(|i| i as f32 * 0.5).collect()).expect("fits");
        let back = HostTensor::from_burn(t.to_burn::<2>(&BurnDevice::Flex(Default::default())).expect("rank 2"));
        assert_eq!(back, t);
    }
}
