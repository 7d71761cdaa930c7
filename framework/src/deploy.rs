//! Cloud and device as separate programs: what the cloud exports for devices (a [`Bundle`]),
//! how a device starts from one, and what the cloud says about itself ([`CloudInfo`]).

use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, BundleError, PluginEntry};
use crate::data::{DeviceId, DomainSpec};
use crate::model::CloudModel;
use crate::node::DeviceNode;
use crate::registry::{ModelContext, PluginKind};
use crate::runtime::{Composer, RunError, TrainedCloud};
use crate::source::DataSource;

/// The bundle of a trained cloud: the device model, reference statistics, schema and the
/// plugins (with settings) that read them.
///
/// # Errors
/// [`RunError::Model`] when the model cannot be saved.
pub fn export_bundle(composer: &Composer<'_>, cloud: &TrainedCloud) -> Result<Bundle, RunError> {
    let deployment = composer.deployment;
    let entry =
        |c: &crate::config::PluginChoice| PluginEntry { plugin: c.plugin.clone(), settings: c.settings.clone() };
    Ok(Bundle::new(
        cloud.model.save()?,
        cloud.model.reference_stats(),
        cloud.model.schema().clone(),
        (entry(&deployment.model), entry(&deployment.anchor)),
        deployment.training_fingerprint(),
    ))
}

/// A device bundle that does not fit the deployment or the plugins here.
fn bundle_error(error: impl std::fmt::Display) -> RunError {
    RunError::Bundle(error.to_string())
}

/// A device node built from `bundle` alone (never from training state): the bundle's model
/// plugin reads its weights, the model is exported to the deployment's inference device, and
/// the bundle's anchor reasoner settings build its reasoner.
///
/// # Errors
/// [`RunError::Bundle`] when the bundle's plugins are not registered here or its weights or
/// schema do not fit them; the plugin's own errors otherwise.
pub fn device_from_bundle(
    composer: &Composer<'_>,
    data: &dyn DataSource,
    bundle: &Bundle,
    id: DeviceId,
) -> Result<DeviceNode, RunError> {
    let registry = composer.registry;
    let manifest = &bundle.manifest;
    let named = |kind: PluginKind, entry: &PluginEntry| {
        registry.get(kind, &entry.plugin).map_err(|e| bundle_error(format!("the bundle's {kind}: {e}")))
    };
    named(PluginKind::Model, &manifest.model)?;
    named(PluginKind::AnchorReasoner, &manifest.anchor)?;
    let factory = registry.model(&manifest.model.plugin)?;
    let ctx = ModelContext {
        base: crate::BuildContext {
            seed: crate::seed::derive_str(composer.deployment.seed, "model"),
            device: composer.training_device.clone(),
        },
        task: data.task().clone(),
        text: composer.text_source()?,
    };
    let mut model: Box<dyn CloudModel> = factory
        .build(&manifest.model.settings, &ctx)
        .map_err(|e| bundle_error(format!("model `{}`: {e}", manifest.model.plugin)))?;
    model.load(&bundle.model).map_err(|e| bundle_error(format!("{}: {e}", crate::bundle::MODEL)))?;
    if model.schema() != &bundle.schema {
        return Err(bundle_error(format!(
            "{}: the model `{}` builds has slot schema {}, the bundle's is {}",
            crate::bundle::SCHEMA,
            manifest.model.plugin,
            model.schema().hash(),
            bundle.schema.hash()
        )));
    }
    let device_model = model.export(&composer.device)?;
    let reasoner = registry
        .anchor_reasoner(&manifest.anchor.plugin)?
        .build(
            &manifest.anchor.settings,
            &crate::BuildContext {
                seed: crate::seed::derive_str(composer.deployment.seed, "anchor"),
                device: composer.device.clone(),
            },
        )
        .map_err(|e| bundle_error(format!("anchor reasoner `{}`: {e}", manifest.anchor.plugin)))?;
    Ok(DeviceNode::new(id, device_model, reasoner, bundle.reference.clone()))
}

/// The domain of the device `id` of a deployment: its `[[device]]` or `[fleet]` entry.
///
/// # Errors
/// [`RunError::Config`] naming the devices there are.
pub fn device_domain(composer: &Composer<'_>, id: &str) -> Result<DomainSpec, RunError> {
    let domains = composer.deployment.device_domains();
    domains.iter().find(|(_, d)| d.name == id).map(|(_, d)| d.clone()).ok_or_else(|| {
        let names: Vec<&str> = domains.iter().map(|(_, d)| d.name.as_str()).collect();
        let message = format!("no device `{id}` in this deployment; its devices are: {}", names.join(", "));
        RunError::Config(crate::ConfigErrors(vec![composer.deployment.error_at("fleet", message)]))
    })
}

/// What a serving cloud says about itself (`GET /v1/hello`): versions, what it serves, and
/// the sizes a run report shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudInfo {
    /// mmpg version.
    pub mmpg_version: String,
    /// Wire version it speaks.
    pub wire_version: u8,
    /// Slot schema hash (hex) it generates for.
    pub schema_hash: String,
    /// Fingerprint of its training.
    pub training: String,
    /// The run report's cloud part (generation time 0: it is measured per request).
    pub report: crate::report::CloudReport,
}

impl CloudInfo {
    /// The info of a trained cloud.
    pub fn of(composer: &Composer<'_>, cloud: &TrainedCloud) -> Self {
        Self {
            mmpg_version: crate::abi::MMPG_VERSION.into(),
            wire_version: crate::wire::WIRE_VERSION,
            schema_hash: cloud.model.schema().hash().to_string(),
            training: composer.deployment.training_fingerprint(),
            report: crate::runtime::cloud_report(cloud, 0.0),
        }
    }
}

impl From<BundleError> for RunError {
    fn from(e: BundleError) -> Self {
        bundle_error(e)
    }
}
