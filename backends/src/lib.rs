//! Backend providers for mmpg: one per Burn backend family, chosen at run time by
//! `[backend] kind = "…"`. A family that this binary was built without still registers, so
//! asking for it gives a clear error naming the cargo feature instead of "unknown backend".

use mmpg::{BackendError, BackendProvider, BurnDevice, Plugin, StaticPlugin};

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

    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        match self.make {
            Some(make) => make(index),
            None => Err(BackendError::NotCompiledIn { kind: self.kind.into(), feature: self.feature.into() }),
        }
    }
}

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
        let err = CUDA.device(0).expect_err("not compiled in");
        assert_eq!(err.to_string(), "backend `cuda` is not compiled in: rebuild with `--features cuda`");
    }

    #[test]
    fn cpu_has_exactly_one_device() {
        assert!(CPU.device(0).is_ok());
        assert!(matches!(CPU.device(1), Err(BackendError::Unavailable { .. })));
    }
}
