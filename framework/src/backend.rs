//! Backend providers: build the Burn device that `[backend]` names, or say clearly why not.

use crate::BurnDevice;

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// One backend family (CPU, wgpu, CUDA, LibTorch). Required: the kind, its cargo feature,
/// whether it is compiled in, and device construction; probing and training devices are
/// provided.
pub trait BackendProvider: Send + Sync {
    /// Kind as written in `[backend] kind = "…"`.
    fn kind(&self) -> &'static str;

    /// The cargo feature of `mmpg-cli` that compiles it in.
    fn cargo_feature(&self) -> &'static str;

    /// Whether this binary contains the backend.
    fn compiled_in(&self) -> bool;

    /// One line on what the backend is.
    fn summary(&self) -> &'static str;

    /// Builds the device with the given index. Called only when compiled in.
    fn make_device(&self, index: usize) -> Result<BurnDevice, BackendError>;

    /// Checks that the device can be used here and describes it.
    fn probe(&self, index: usize) -> Result<String, BackendError> {
        self.device(index).map(|d| format!("{d:?}"))
    }

    /// The inference device, or why it cannot be had.
    fn device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        if !self.compiled_in() {
            return Err(BackendError::NotCompiledIn { kind: self.kind().into(), feature: self.cargo_feature().into() });
        }
        self.make_device(index)
    }

    /// The same device with automatic differentiation, for cloud-side training.
    fn training_device(&self, index: usize) -> Result<BurnDevice, BackendError> {
        Ok(BurnDevice::autodiff(self.device(index)?))
    }
}
