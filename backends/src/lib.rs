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
pub static WGPU: NotCompiled =
    NotCompiled { kind: "wgpu", feature: "wgpu", summary: "WebGPU via wgpu (not compiled in)" };
/// NVIDIA CUDA.
#[cfg(not(feature = "cuda"))]
pub static CUDA: NotCompiled = NotCompiled { kind: "cuda", feature: "cuda", summary: "NVIDIA CUDA (not compiled in)" };
/// NVIDIA CUDA.
#[cfg(feature = "cuda")]
pub static CUDA: Cuda = Cuda;

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
/// present; that panic becomes a typed "unavailable" error instead of ending the process.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn smoke_test(kind: &str, device: &BurnDevice) -> Result<(), BackendError> {
    use burn::tensor::Tensor;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<mmpg::Backend, 1>::ones([4], device).sum().into_scalar()
    }));
    std::panic::set_hook(quiet);
    let unavailable = |reason: String| BackendError::Unavailable { kind: kind.into(), reason };
    match result {
        Ok(sum) if (sum - 4.0).abs() < 1e-6 => Ok(()),
        Ok(sum) => Err(unavailable(format!("a test sum of four ones gave {sum}"))),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the runtime panicked".into());
            let first = message.lines().next().unwrap_or_default();
            Err(unavailable(format!("no usable device or driver (the runtime failed: {first})")))
        }
    }
}
/// LibTorch through burn-tch.
pub static TCH: NotCompiled =
    NotCompiled { kind: "tch", feature: "tch", summary: "LibTorch via burn-tch (not compiled in)" };

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
