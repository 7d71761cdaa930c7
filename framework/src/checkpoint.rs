//! Checkpoints: a plugin's named parameters as safetensors, stamped with the plugin's name and
//! the slot schema it serves, refused when they hold values no trained model has.

/// Why a checkpoint could not be read or written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// Not valid safetensors, or a tensor is not F32.
    #[error("{0}")]
    Format(String),
    /// A parameter of the module is absent from the checkpoint.
    #[error("parameter `{0}` is missing")]
    Missing(String),
    /// A parameter has another shape than the module's.
    #[error("parameter `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        /// Parameter path.
        name: String,
        /// Module's shape.
        expected: Vec<usize>,
        /// Checkpoint's shape.
        found: Vec<usize>,
    },
    /// A value is NaN or infinite.
    #[error("parameter `{0}` holds non-finite values or values beyond ±{MAX_PARAMETER:e}")]
    NonFinite(String),
}

/// Encodes a plugin's parameters as a checkpoint stamped with the plugin's name and the slot
/// schema it serves.
///
/// # Errors
/// [`CheckpointError::NonFinite`] naming the first tensor holding NaN, infinity or a value beyond
/// ±[`MAX_PARAMETER`]: a diverged
/// model is never persisted (every later run would refuse it).
pub fn write_checkpoint(
    plugin: &str,
    schema: &crate::SlotSchema,
    tensors: &std::collections::BTreeMap<String, crate::HostTensor>,
) -> Result<Vec<u8>, CheckpointError> {
    if let Some((name, _)) = tensors.iter().find(|(_, t)| !usable(t)) {
        return Err(CheckpointError::NonFinite(name.clone()));
    }
    let metadata =
        [("mmpg.plugin".to_string(), plugin.to_string()), ("mmpg.schema".to_string(), schema.hash().to_string())];
    Ok(crate::wire::encode_f32_tensors(tensors, metadata))
}

/// Largest parameter magnitude a checkpoint may hold: trained weights of these models stay
/// many orders below it, and a model beyond it serves garbage with finite numbers.
pub const MAX_PARAMETER: f32 = 1e6;

/// Whether every value is finite and within ±[`MAX_PARAMETER`].
pub fn usable(t: &crate::HostTensor) -> bool {
    t.values().iter().all(|v| v.is_finite() && v.abs() <= MAX_PARAMETER)
}

/// Decodes a checkpoint written by [`write_checkpoint`] for the same plugin and schema.
pub fn read_checkpoint(
    plugin: &str,
    schema: &crate::SlotSchema,
    bytes: &[u8],
) -> Result<std::collections::BTreeMap<String, crate::HostTensor>, CheckpointError> {
    let format = |e: crate::wire::WireError| CheckpointError::Format(e.to_string());
    let meta = crate::wire::read_metadata(bytes).map_err(format)?;
    if meta.get("mmpg.plugin").map(String::as_str) != Some(plugin) {
        return Err(CheckpointError::Format(format!("not a checkpoint of `{plugin}`")));
    }
    if meta.get("mmpg.schema") != Some(&schema.hash().to_string()) {
        return Err(CheckpointError::Format(format!("written for another slot schema than {}", schema.hash())));
    }
    crate::wire::decode_f32_tensors(bytes).map_err(format)
}
