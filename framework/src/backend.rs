//! Backends as plain data: which device a plugin should compute on ([`DeviceDescriptor`]), and
//! the providers that say whether a backend family is compiled in and usable here. The framework
//! never holds a device; a plugin turns the descriptor into its own (Burn plugins:
//! `mmpg_backends::device`), so the boundary carries no backend type.

use serde::{Deserialize, Serialize};

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BackendError {
    /// The family exists but this binary was built without it.
    #[error("backend `{kind}` is not compiled in: rebuild with `--features {feature}`")]
    NotCompiledIn {
        /// Backend kind, as in TOML.
        kind: String,
        /// Cargo feature that enables it.
        feature: String,
    },
    /// Compiled in, but no usable device here.
    #[error("backend `{kind}` is not available on this machine: {reason}")]
    Unavailable {
        /// Backend kind.
        kind: String,
        /// What the probe found.
        reason: String,
    },
}

/// The device a plugin computes on: a backend kind, a device index within it, and whether the
/// plugin trains there (automatic differentiation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceDescriptor {
    /// Backend kind as in `[backend] kind = "…"`: `cpu`, `wgpu`, `cuda`, `tch`.
    pub kind: String,
    /// Device index within the kind (`[backend] device`).
    pub index: usize,
    /// Whether gradients are recorded there (the cloud's training device).
    pub autodiff: bool,
}

impl DeviceDescriptor {
    /// The CPU device, without automatic differentiation.
    pub fn cpu() -> Self {
        Self { kind: "cpu".into(), index: 0, autodiff: false }
    }

    /// The same device with automatic differentiation.
    pub fn training(&self) -> Self {
        Self { autodiff: true, ..self.clone() }
    }

    /// The same device without automatic differentiation.
    pub fn inference(&self) -> Self {
        Self { autodiff: false, ..self.clone() }
    }
}

impl std::fmt::Display for DeviceDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.index)?;
        if self.autodiff { f.write_str(" (autodiff)") } else { Ok(()) }
    }
}

/// One backend family (CPU, wgpu, CUDA, LibTorch). Required: the kind, its cargo feature,
/// whether it is compiled in, and a description of a usable device; probing and descriptors
/// are provided.
pub trait BackendProvider: Send + Sync {
    /// Kind as written in `[backend] kind = "…"`.
    fn kind(&self) -> &'static str;

    /// The cargo feature of `mmpg-cli` that compiles it in.
    fn cargo_feature(&self) -> &'static str;

    /// Whether this binary contains the backend.
    fn compiled_in(&self) -> bool;

    /// One line on what the backend is.
    fn summary(&self) -> &'static str;

    /// Checks that the device with this index works here (a real computation on it) and
    /// describes it. Called only when compiled in.
    fn describe(&self, index: usize) -> Result<String, BackendError>;

    /// The device's description, or why it cannot be had (not compiled in, or unusable).
    fn probe(&self, index: usize) -> Result<String, BackendError> {
        if !self.compiled_in() {
            return Err(BackendError::NotCompiledIn { kind: self.kind().into(), feature: self.cargo_feature().into() });
        }
        self.describe(index)
    }

    /// A descriptor of a device that [`BackendProvider::probe`] found usable.
    fn descriptor(&self, index: usize, autodiff: bool) -> Result<DeviceDescriptor, BackendError> {
        self.probe(index)?;
        Ok(DeviceDescriptor { kind: self.kind().into(), index, autodiff })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_print_kind_index_and_training() {
        let cpu = DeviceDescriptor::cpu();
        assert_eq!(cpu.to_string(), "cpu:0");
        assert_eq!(cpu.training().to_string(), "cpu:0 (autodiff)");
        assert_eq!(cpu.training().inference(), cpu);
    }
}
