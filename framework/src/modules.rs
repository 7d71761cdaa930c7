//! Helpers for Burn modules that plugins share.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

use crate::{Backend, BurnDevice};

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
/// [`crate::seed::with_burn_seed`] calls this so the draws happen while the seeded generator
/// is held, not later at a time that depends on other threads.
pub fn materialise<M: Module<Backend>>(module: M) -> M {
    module.map(&mut Materialise)
}
