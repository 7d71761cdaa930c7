//! Dynamic slots: the named parameter tensors of a device model whose values come from the cloud.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tensor::HostTensor;

/// Element type a slot is stored in on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            DType::F32 => "f32",
        }
    }
}

/// One dynamic slot: a name, a shape and an element type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlotSpec {
    /// Unique name within the model, e.g. `fusion.weight`.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

impl SlotSpec {
    /// A new f32 slot.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>) -> Self {
        Self { name: name.into(), shape, dtype: DType::F32 }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A stable 64-bit fingerprint of a slot schema, carried by every message so that a device never
/// installs parameters generated for a different model layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SchemaHash(pub u64);

impl fmt::Display for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The ordered set of dynamic slots of a device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSchema {
    slots: Vec<SlotSpec>,
}

/// Why a schema could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Two slots share a name.
    #[error("slot `{0}` is declared twice")]
    DuplicateSlot(String),
    /// A slot has a zero-sized dimension.
    #[error("slot `{0}` has an empty shape")]
    EmptySlot(String),
}

impl SlotSchema {
    /// Builds a schema, rejecting duplicate names and empty shapes.
    pub fn new(slots: Vec<SlotSpec>) -> Result<Self, SchemaError> {
        let mut seen = std::collections::BTreeSet::new();
        for slot in &slots {
            if !seen.insert(slot.name.as_str()) {
                return Err(SchemaError::DuplicateSlot(slot.name.clone()));
            }
            if slot.numel() == 0 {
                return Err(SchemaError::EmptySlot(slot.name.clone()));
            }
        }
        Ok(Self { slots })
    }

    /// The slots, in declaration order.
    pub fn slots(&self) -> &[SlotSpec] {
        &self.slots
    }

    /// Looks a slot up by name.
    pub fn get(&self, name: &str) -> Option<&SlotSpec> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Total number of dynamic parameters.
    pub fn numel(&self) -> usize {
        self.slots.iter().map(SlotSpec::numel).sum()
    }

    /// Bytes of one full set of slot values in their device dtype.
    pub fn byte_size(&self) -> usize {
        self.slots.iter().map(|s| s.numel() * s.dtype.size()).sum()
    }

    /// The schema's fingerprint: SHA-256 over a canonical text of names, dtypes and shapes in
    /// declaration order, truncated to 64 bits. Independent of Rust's hasher, so stable across
    /// builds, platforms and languages.
    pub fn hash(&self) -> SchemaHash {
        let mut hasher = Sha256::new();
        hasher.update(b"mmpg-slot-schema-v1\n");
        for slot in &self.slots {
            let dims: Vec<String> = slot.shape.iter().map(usize::to_string).collect();
            hasher.update(format!("{}:{}:{}\n", slot.name, slot.dtype.tag(), dims.join("x")));
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        SchemaHash(u64::from_be_bytes(first))
    }

    /// Checks generated parameters against this schema: same hash, every slot present exactly
    /// once with its shape, every value finite. Only a [`ValidatedParams`] can be installed.
    pub fn validate(&self, params: GeneratedParams) -> Result<ValidatedParams, ParamsError> {
        let expected = self.hash();
        if params.schema_hash != expected {
            return Err(ParamsError::SchemaMismatch { expected, found: params.schema_hash });
        }
        if let Some(unknown) = params.tensors.keys().find(|name| self.get(name).is_none()) {
            return Err(ParamsError::UnknownSlot(unknown.clone()));
        }
        for slot in &self.slots {
            let tensor = params.tensors.get(&slot.name).ok_or_else(|| ParamsError::MissingSlot(slot.name.clone()))?;
            if tensor.shape() != slot.shape.as_slice() {
                return Err(ParamsError::WrongShape {
                    slot: slot.name.clone(),
                    expected: slot.shape.clone(),
                    found: tensor.shape().to_vec(),
                });
            }
            if let Some(index) = tensor.values().iter().position(|v| !v.is_finite()) {
                return Err(ParamsError::NonFinite { slot: slot.name.clone(), index });
            }
            // No trained model holds such values (checkpoints refuse them too): a peer sending them
            // would silence the model as surely as a NaN.
            let limit = crate::checkpoint::MAX_PARAMETER;
            if let Some(index) = tensor.values().iter().position(|v| v.abs() > limit) {
                return Err(ParamsError::OutOfRange { slot: slot.name.clone(), index, limit });
            }
        }
        Ok(ValidatedParams(params))
    }
}

/// Parameter values for the dynamic slots of one device, keyed by slot name, stamped with the
/// schema they were generated for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedParams {
    /// Schema the values were generated for.
    pub schema_hash: SchemaHash,
    /// One tensor per slot name.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl GeneratedParams {
    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(HostTensor::len).sum()
    }
}

/// Parameters that passed [`SlotSchema::validate`]; the only form a model installs.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedParams(GeneratedParams);

impl ValidatedParams {
    /// The validated parameters.
    pub fn params(&self) -> &GeneratedParams {
        &self.0
    }

    /// The tensor of a slot; present for every slot of the schema that validated it.
    pub fn slot(&self, name: &str) -> Option<&HostTensor> {
        self.0.tensors.get(name)
    }

    /// Unwraps the parameters.
    pub fn into_inner(self) -> GeneratedParams {
        self.0
    }
}

/// Why parameters were refused. The device keeps its previous parameters on every one of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum ParamsError {
    /// Generated for another model layout.
    #[error("parameters are for schema {found}, this model has schema {expected}")]
    SchemaMismatch {
        /// The model's schema hash.
        expected: SchemaHash,
        /// The hash the parameters carry.
        found: SchemaHash,
    },
    /// A slot of the schema is absent.
    #[error("slot `{0}` is missing")]
    MissingSlot(String),
    /// A tensor names no slot of the schema.
    #[error("`{0}` is not a slot of this model")]
    UnknownSlot(String),
    /// A tensor has the wrong shape.
    #[error("slot `{slot}` expects shape {expected:?}, found {found:?}")]
    WrongShape {
        /// Slot name.
        slot: String,
        /// Declared shape.
        expected: Vec<usize>,
        /// Received shape.
        found: Vec<usize>,
    },
    /// A value is NaN or infinite.
    #[error("slot `{slot}` holds a non-finite value at index {index}")]
    NonFinite {
        /// Slot name.
        slot: String,
        /// Flat index of the first bad value.
        index: usize,
    },
    /// A value is finite but beyond what any trained model holds.
    #[error("slot `{slot}` holds a value beyond ±{limit:e} at index {index}")]
    OutOfRange {
        /// Slot name.
        slot: String,
        /// Flat index of the first such value.
        index: usize,
        /// The bound.
        limit: f32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema() -> SlotSchema {
        SlotSchema::new(vec![SlotSpec::f32("a", vec![2, 3]), SlotSpec::f32("b", vec![4])]).expect("valid schema")
    }

    fn params_for(schema: &SlotSchema, fill: f32) -> GeneratedParams {
        GeneratedParams {
            schema_hash: schema.hash(),
            tensors: schema
                .slots()
                .iter()
                .map(|s| {
                    let t = HostTensor::new(s.shape.clone(), vec![fill; s.numel()]).expect("fits");
                    (s.name.clone(), t)
                })
                .collect(),
        }
    }

    #[test]
    fn schema_hash_is_pinned() {
        // A change of this value breaks every deployed device: bump the version tag instead.
        // The literal is SHA-256("mmpg-slot-schema-v1\na:f32:2x3\nb:f32:4\n")[..8], big-endian.
        assert_eq!(schema().hash(), SchemaHash(0x0ffc_49dd_4dc5_c2f6));
        assert_eq!(schema().hash().to_string(), "0ffc49dd4dc5c2f6");
        assert_ne!(schema().hash(), SlotSchema::new(vec![SlotSpec::f32("a", vec![3, 2])]).expect("ok").hash());
    }

    #[test]
    fn duplicate_slot_names_are_rejected() {
        let err = SlotSchema::new(vec![SlotSpec::f32("a", vec![1]), SlotSpec::f32("a", vec![2])]);
        assert_eq!(err, Err(SchemaError::DuplicateSlot("a".into())));
    }

    #[test]
    fn validate_accepts_matching_params() {
        let s = schema();
        assert!(s.validate(params_for(&s, 0.5)).is_ok());
    }

    #[test]
    fn validate_names_the_bad_slot() {
        let s = schema();
        let mut p = params_for(&s, 0.5);
        p.tensors.insert("b".into(), HostTensor::new(vec![5], vec![0.0; 5]).expect("fits"));
        assert!(matches!(s.validate(p), Err(ParamsError::WrongShape { slot, .. }) if slot == "b"));
        let mut p = params_for(&s, 0.5);
        p.tensors.remove("a");
        assert_eq!(s.validate(p), Err(ParamsError::MissingSlot("a".into())));
        let mut p = params_for(&s, 0.5);
        p.tensors.insert("zzz".into(), HostTensor::zeros(vec![1]));
        assert_eq!(s.validate(p), Err(ParamsError::UnknownSlot("zzz".into())));
    }

    fn arb_schema() -> impl Strategy<Value = SlotSchema> {
        prop::collection::btree_map("[a-z]{1,8}", prop::collection::vec(1usize..6, 1..4), 1..6).prop_map(|m| {
            SlotSchema::new(m.into_iter().map(|(n, s)| SlotSpec::f32(n, s)).collect()).expect("unique names from a map")
        })
    }

    proptest! {
        #[test]
        fn schema_hash_is_a_function_of_the_layout(s in arb_schema()) {
            let rebuilt = SlotSchema::new(s.slots().to_vec()).expect("same slots");
            prop_assert_eq!(s.hash(), rebuilt.hash());
        }

        #[test]
        fn schema_hash_changes_with_any_shape(s in arb_schema(), which in any::<prop::sample::Index>()) {
            let mut slots = s.slots().to_vec();
            let i = which.index(slots.len());
            slots[i].shape.push(2);
            let changed = SlotSchema::new(slots).expect("same names");
            prop_assert_ne!(s.hash(), changed.hash());
        }

        #[test]
        fn validate_rejects_any_non_finite_value(
            s in arb_schema(),
            which in any::<prop::sample::Index>(),
            pos in any::<prop::sample::Index>(),
            bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ) {
            let mut p = params_for(&s, 0.25);
            let name = s.slots()[which.index(s.slots().len())].name.clone();
            let t = p.tensors.get_mut(&name).expect("present");
            let mut values = t.values().to_vec();
            let at = pos.index(values.len());
            values[at] = bad;
            *t = HostTensor::new(t.shape().to_vec(), values).expect("same shape");
            prop_assert_eq!(s.validate(p), Err(ParamsError::NonFinite { slot: name, index: at }));
        }
    }
}
