//! Backend providers for mmpg: one per Burn backend family, chosen at run time by
//! `[backend] kind = "…"`. A family that this binary was built without still registers, so
//! asking for it gives a clear error naming the cargo feature instead of "unknown backend".

use mmpg::{BackendError, BackendProvider, BurnDevice, Plugin, StaticPlugin};

/// Burn's pure-Rust CPU backend (`flex`), multi-threaded, no system dependencies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl BackendProvider for Cpu {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn cargo_feature(&self) -> &'static str {
        "cpu"
    }

    fn compiled_in(&self) -> bool {
        true
    }

    fn summary(&self) -> &'static str {
        "Burn flex: pure-Rust CPU backend (always available)"
    }

    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        if index != 0 {
            return Err(BackendError::Unavailable {
                kind: self.kind().into(),
                reason: format!("the CPU backend has one device (index 0), asked for {index}"),
            });
        }
        Ok(BurnDevice::Flex(Default::default()))
    }
}

/// A backend family this build does not contain. It registers under its kind so that asking
/// for it names the feature to rebuild with.
#[derive(Debug, Clone, Copy)]
pub struct NotCompiled {
    kind: &'static str,
    feature: &'static str,
    summary: &'static str,
}

impl BackendProvider for NotCompiled {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn cargo_feature(&self) -> &'static str {
        self.feature
    }

    fn compiled_in(&self) -> bool {
        false
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn make_device(&self, _index: usize) -> Result<BurnDevice, BackendError> {
        Err(BackendError::NotCompiledIn { kind: self.kind.into(), feature: self.feature.into() })
    }
}

/// The CPU provider.
pub static CPU: Cpu = Cpu;

/// WebGPU through wgpu (Vulkan, Metal, DX12; lavapipe on CPU-only machines).
#[cfg(not(feature = "wgpu"))]
pub static WGPU: NotCompiled =
    NotCompiled { kind: "wgpu", feature: "wgpu", summary: "WebGPU via wgpu (not compiled in)" };
/// WebGPU through wgpu (Vulkan, Metal, DX12; lavapipe on CPU-only machines).
#[cfg(feature = "wgpu")]
pub static WGPU: Wgpu = Wgpu;

/// NVIDIA CUDA.
#[cfg(not(feature = "cuda"))]
pub static CUDA: NotCompiled = NotCompiled { kind: "cuda", feature: "cuda", summary: "NVIDIA CUDA (not compiled in)" };
/// NVIDIA CUDA.
#[cfg(feature = "cuda")]
pub static CUDA: Cuda = Cuda;

/// LibTorch through burn-tch.
#[cfg(not(feature = "tch"))]
pub static TCH: NotCompiled =
    NotCompiled { kind: "tch", feature: "tch", summary: "LibTorch via burn-tch (not compiled in)" };
/// LibTorch through burn-tch.
#[cfg(feature = "tch")]
pub static TCH: Tch = Tch;

/// WebGPU through Burn's wgpu runtime: Vulkan, Metal or DX12, whichever the machine has; on a
/// machine without a GPU, Mesa's software Vulkan driver (lavapipe). Kernels are compiled on
/// first use, so the first call of each operation is slow.
///
/// Device 0 is the adapter wgpu ranks best (`CUBECL_WGPU_DEFAULT_DEVICE`, e.g. `Cpu` or
/// `DiscreteGpu(1)`, overrides it); device `k >= 1` is the discrete GPU `k - 1`.
#[cfg(feature = "wgpu")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Wgpu;

#[cfg(feature = "wgpu")]
impl BackendProvider for Wgpu {
    fn kind(&self) -> &'static str {
        "wgpu"
    }

    fn cargo_feature(&self) -> &'static str {
        "wgpu"
    }

    fn compiled_in(&self) -> bool {
        true
    }

    fn summary(&self) -> &'static str {
        "WebGPU via wgpu (Vulkan/Metal/DX12; Mesa lavapipe on CPU-only machines)"
    }

    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        use burn::backend::wgpu::WgpuDevice;
        let device = match index {
            0 => WgpuDevice::DefaultDevice,
            k => WgpuDevice::DiscreteGpu(k - 1),
        };
        let device = BurnDevice::Wgpu(device);
        smoke_test(self.kind(), &device).map_err(|e| match e {
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
}

/// LibTorch through burn-tch. Built against the LibTorch of a Python venv's `torch` package
/// (`scripts/with-libtorch.sh`), never downloaded. Device 0 is LibTorch's CPU; device
/// `k >= 1` is CUDA device `k - 1` (a CUDA build of torch).
#[cfg(feature = "tch")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Tch;

#[cfg(feature = "tch")]
impl BackendProvider for Tch {
    fn kind(&self) -> &'static str {
        "tch"
    }

    fn cargo_feature(&self) -> &'static str {
        "tch"
    }

    fn compiled_in(&self) -> bool {
        true
    }

    fn summary(&self) -> &'static str {
        "LibTorch via burn-tch (torch's own CPU or CUDA kernels)"
    }

    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        use burn::backend::libtorch::LibTorchDevice;
        let device = match index {
            0 => LibTorchDevice::Cpu,
            k => LibTorchDevice::Cuda(k - 1),
        };
        let device = BurnDevice::LibTorch(device);
        smoke_test(self.kind(), &device)?;
        Ok(device)
    }
}

/// NVIDIA CUDA through Burn's CubeCL runtime. Needs no CUDA toolkit to build; at run time it
/// loads the driver and NVRTC. Without nvcc at build time cudarc targets the newest CUDA API
/// (13.x, driver >= 580); set `CUDARC_CUDA_VERSION=12080` when building for CUDA 12.8 drivers.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Cuda;

#[cfg(feature = "cuda")]
impl BackendProvider for Cuda {
    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn cargo_feature(&self) -> &'static str {
        "cuda"
    }

    fn compiled_in(&self) -> bool {
        true
    }

    fn summary(&self) -> &'static str {
        "NVIDIA CUDA via CubeCL (driver and NVRTC loaded at run time)"
    }

    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        let device = BurnDevice::Cuda(burn::backend::cuda::CudaDevice::new(index));
        smoke_test(self.kind(), &device)?;
        Ok(device)
    }
}

/// Runs one tiny computation on `device`. GPU runtimes panic when no driver or device is
/// present — sometimes in their own server thread, leaving only a closed channel in ours — so
/// every panic message raised meanwhile is kept, and the first one, the cause, becomes a typed
/// "unavailable" error instead of ending the process.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
fn smoke_test(kind: &str, device: &BurnDevice) -> Result<(), BackendError> {
    use burn::tensor::Tensor;
    use std::sync::{Arc, Mutex};
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let previous = std::panic::take_hook();
    let sink = Arc::clone(&messages);
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut kept) = sink.lock() {
            kept.push(panic_text(info.payload()));
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<mmpg::Backend, 1>::ones([4], device).sum().into_scalar()
    }));
    std::panic::set_hook(previous);
    let unavailable = |reason: String| BackendError::Unavailable { kind: kind.into(), reason };
    match result {
        Ok(sum) if (sum - 4.0).abs() < 1e-6 => Ok(()),
        Ok(sum) => Err(unavailable(format!("a test sum of four ones gave {sum}"))),
        Err(payload) => {
            let first = messages.lock().ok().and_then(|kept| kept.first().cloned());
            let message = first.unwrap_or_else(|| panic_text(payload.as_ref()));
            let line = message.lines().next().unwrap_or_default();
            Err(unavailable(format!("no usable device or driver (the runtime failed: {line})")))
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
        let err = CUDA.device(0).expect_err("not compiled in");
        assert_eq!(err.to_string(), "backend `cuda` is not compiled in: rebuild with `--features cuda`");
    }

    #[test]
    fn cpu_has_exactly_one_device() {
        assert!(CPU.device(0).is_ok());
        assert!(matches!(CPU.device(1), Err(BackendError::Unavailable { .. })));
    }
}
