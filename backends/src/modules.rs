//! Helpers for Burn modules that plugins share: devices for initialisation and inference,
//! moving modules between devices, and reading and restoring their parameters by path.
//! Checkpoint encoding itself is backend-free ([`mmpg::checkpoint`], re-exported here).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

use mmpg::HostTensor;
pub use mmpg::checkpoint::{CheckpointError, MAX_PARAMETER, read_checkpoint, write_checkpoint};

use crate::{Backend, BurnDevice, HostTensorBurn as _};

/// The device without automatic differentiation: where inference copies live.
pub fn inference_device(device: &BurnDevice) -> BurnDevice {
    match device {
        BurnDevice::Autodiff(inner) => (**inner).clone(),
        other => other.clone(),
    }
}

struct Relocate<'a> {
    device: &'a BurnDevice,
}

impl ModuleMapper<Backend> for Relocate<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Backend, D>>) -> Param<Tensor<Backend, D>> {
        let (id, tensor, _) = param.consume();
        // Trainable exactly on autodiff devices; `Dispatch` would otherwise wrap a plain
        // parameter into an autodiff tensor on access.
        let trainable = matches!(self.device, BurnDevice::Autodiff(_));
        Param::initialized(id, Tensor::from_data(tensor.into_data(), self.device)).set_require_grad(trainable)
    }
}

/// Where parameters are drawn: Burn's CPU generator, so that one seed gives the same initial
/// model on every backend (plugins initialise here, then [`relocate`] to their device).
pub fn init_device() -> BurnDevice {
    BurnDevice::autodiff(BurnDevice::Flex(Default::default()))
}

/// A copy of `module` on `device` through host memory, with no gradient history; its
/// parameters are trainable when `device` is an autodiff device.
///
/// Burn 0.21's `Dispatch` panics when `to_device` moves a tensor between an autodiff and a
/// plain device; copying the values works for every pair of devices (cloud training device to
/// device inference, and across backends in mixed deployments).
pub fn relocate<M: Module<Backend>>(module: M, device: &BurnDevice) -> M {
    module.map(&mut Relocate { device })
}

struct Materialise;

impl ModuleMapper<Backend> for Materialise {}

/// Forces every lazily initialised parameter of `module` to draw its values now.
///
/// Burn initialises parameters on first use; a plugin built inside
/// [`crate::with_burn_seed`] calls this so the draws happen while the seeded generator
/// is held, not later at a time that depends on other threads.
pub fn materialise<M: Module<Backend>>(module: M) -> M {
    module.map(&mut Materialise)
}

/// Tracks the dotted path of the parameter being visited.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    fn join(&self) -> String {
        self.0.join(".")
    }
}

struct Collect {
    path: PathStack,
    tensors: std::collections::BTreeMap<String, HostTensor>,
}

impl burn::module::ModuleVisitor<Backend> for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Backend, D>>) {
        self.tensors.insert(self.path.join(), HostTensor::from_burn(param.val()));
    }
}

/// Every float parameter of `module`, keyed by its dotted path (`conv1.weight`).
pub fn parameters<M: Module<Backend>>(module: &M) -> std::collections::BTreeMap<String, HostTensor> {
    let mut collect = Collect { path: PathStack::default(), tensors: Default::default() };
    module.visit(&mut collect);
    collect.tensors
}

struct Restore<'a> {
    path: PathStack,
    values: &'a std::collections::BTreeMap<String, HostTensor>,
    device: &'a BurnDevice,
    error: Option<CheckpointError>,
}

impl ModuleMapper<Backend> for Restore<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Backend, D>>) -> Param<Tensor<Backend, D>> {
        let name = self.path.join();
        let (id, tensor, mapper) = param.consume();
        let expected = tensor.dims().to_vec();
        let replacement = match self.values.get(&name) {
            None => Err(CheckpointError::Missing(name)),
            Some(t) if t.shape() != expected.as_slice() => {
                Err(CheckpointError::Shape { name, expected, found: t.shape().to_vec() })
            }
            Some(t) if !mmpg::checkpoint::usable(t) => Err(CheckpointError::NonFinite(name)),
            Some(t) => t.to_burn::<D>(self.device).map_err(|e| CheckpointError::Format(e.to_string())),
        };
        match replacement {
            Ok(value) if self.error.is_none() => {
                let trainable = matches!(self.device, BurnDevice::Autodiff(_));
                Param::from_mapped_value(id, value.set_require_grad(trainable), mapper)
            }
            Ok(_) => Param::from_mapped_value(id, tensor, mapper),
            Err(e) => {
                self.error.get_or_insert(e);
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}

/// `module` with every float parameter replaced by the value of the same path in `values`,
/// checked for presence, shape and finiteness. On any error only the error comes back, so
/// nothing half-loaded escapes (callers pass a clone and keep their module).
pub fn restore<M: Module<Backend>>(
    module: M,
    values: &std::collections::BTreeMap<String, HostTensor>,
    device: &BurnDevice,
) -> Result<M, CheckpointError> {
    let mut restore = Restore { path: PathStack::default(), values, device, error: None };
    let restored = module.map(&mut restore);
    match restore.error {
        Some(e) => Err(e),
        None => Ok(restored),
    }
}

/// Whether every float parameter of `module` is finite and within ±[`MAX_PARAMETER`]: trained
/// weights are checked before they are served or saved.
pub fn all_finite<M: Module<Backend>>(module: &M) -> bool {
    parameters(module).values().all(mmpg::checkpoint::usable)
}
