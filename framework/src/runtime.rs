//! The runtime: composes a deployment from the registry and runs it — the cloud trains, every
//! device summarises its unlabelled window, the cloud generates parameters for the whole fleet
//! in one batch, every device validates and applies them, and both states are evaluated.

use std::time::Instant;

use crate::anchor::AnchorReasoner;
use crate::backend::BackendError;
use crate::backend::DeviceDescriptor;
use crate::config::{ConfigErrors, Deployment, PluginChoice, PretrainOn};
use crate::data::{Clip, DeviceId, DomainSpec, Split};
use crate::generator::{GeneratorError, GeneratorTraining, ParameterGenerator};
use crate::metrics::{self, RetrievalMetrics};
use crate::model::{CloudModel, DeviceModel, ModelError, TrainingPlan};
use crate::node::{BatchPolicy, CloudNode, DeviceNode, Refusal};
use crate::registry::{BuildContext, GeneratorContext, ModelContext, PluginError, PluginKind, Registry, RegistryError};
use crate::report::{CloudReport, DeviceReport, FleetSummary, RunReport};
use crate::source::{DataError, DataSource};
use crate::transport::{DeviceLink, Metered, Transport, TransportError};
use crate::{Progress, seed};

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The deployment is inconsistent with the plugins it names.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The backend cannot be used.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A plugin is not registered.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A plugin could not be built.
    #[error("{kind} `{name}`: {error}")]
    Plugin {
        /// Kind.
        kind: PluginKind,
        /// Name.
        name: String,
        /// Cause.
        error: PluginError,
    },
    /// The data source failed.
    #[error("data: {0}")]
    Data(#[from] DataError),
    /// The cloud model failed.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The generator failed.
    #[error("generator: {0}")]
    Generator(#[from] GeneratorError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A device bundle was refused or does not fit this deployment.
    #[error("bundle: {0}")]
    Bundle(String),
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// File.
        path: String,
        /// Cause.
        message: String,
    },
}

fn plugin_error(kind: PluginKind, choice: &str) -> impl FnOnce(PluginError) -> RunError + '_ {
    move |error| RunError::Plugin { kind, name: choice.to_string(), error }
}

/// A device of the simulated fleet: its node, its data and (as it goes) its report.
pub struct FleetDevice {
    /// The device itself: id, model, anchor reasoner, request state.
    pub node: DeviceNode,
    /// The domain its data comes from.
    pub domain: DomainSpec,
    /// Labelled clips it is scored on (labels never reach the device's adaptation).
    pub eval: Vec<Clip>,
    /// Its unlabelled window, what the summary describes.
    pub window: Vec<Clip>,
    /// Its row of the report.
    pub report: DeviceReport,
}

impl std::fmt::Debug for FleetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetDevice")
            .field("node", &self.node)
            .field("domain", &self.domain)
            .field("eval", &self.eval.len())
            .field("window", &self.window.len())
            .finish_non_exhaustive()
    }
}

impl FleetDevice {
    /// The same device and data with a fresh copy of the cloud's model and a fresh reasoner:
    /// every method of a bench starts from the same state.
    pub fn fresh(&self, model: &dyn CloudModel, composer: &Composer<'_>) -> Result<Self, RunError> {
        Ok(Self {
            node: DeviceNode::new(
                self.node.id.clone(),
                model.export(&composer.device)?,
                composer.anchor_reasoner()?,
                self.node.reference().clone(),
            ),
            domain: self.domain.clone(),
            eval: self.eval.clone(),
            window: self.window.clone(),
            report: self.report.clone(),
        })
    }
}

/// Builds every plugin a deployment names. Exposed so tools (benches, tests) can compose a
/// deployment's parts without running it whole.
#[derive(Debug)]
pub struct Composer<'a> {
    /// The deployment.
    pub deployment: &'a Deployment,
    /// Where plugins come from.
    pub registry: &'a Registry,
    /// The devices' inference device (`[backend] kind`).
    pub device: DeviceDescriptor,
    /// The cloud's training device (`[backend] cloud`, autodiff).
    pub training_device: DeviceDescriptor,
}

impl<'a> Composer<'a> {
    /// Resolves the backend of the deployment.
    pub fn new(deployment: &'a Deployment, registry: &'a Registry) -> Result<Self, RunError> {
        let backend = &deployment.backend;
        let device = registry.backend(&backend.kind)?.descriptor(backend.device, false)?;
        let cloud_kind = backend.cloud.as_deref().unwrap_or(&backend.kind);
        let cloud_index = backend.cloud_device.unwrap_or(backend.device);
        let training_device = registry.backend(cloud_kind)?.descriptor(cloud_index, true)?;
        Ok(Self { deployment, registry, device, training_device })
    }

    fn context(&self, purpose: &str, device: &DeviceDescriptor) -> BuildContext {
        BuildContext { seed: seed::derive_str(self.deployment.seed, purpose), device: device.clone() }
    }

    /// The data source; also checks every device's shifts against it.
    pub fn data_source(&self) -> Result<Box<dyn DataSource>, RunError> {
        let choice = &self.deployment.data;
        let factory = self.registry.data_source(&choice.plugin)?;
        let data = factory
            .build(&choice.settings, &self.context("data", &self.device))
            .map_err(plugin_error(PluginKind::DataSource, &choice.plugin))?;
        let mut errors = Vec::new();
        let held_out = self.deployment.cloud.training.hold_out.is_some().then(|| self.deployment.held_out_domains());
        let held_out =
            held_out.into_iter().flatten().enumerate().map(|(i, d)| (format!("cloud.training.hold_out[{i}]"), d));
        for (path, domain) in self.deployment.device_domains().into_iter().chain(held_out) {
            for shift in &domain.shifts {
                if let Err(e) = data.check_shift(shift) {
                    errors.push(self.deployment.error_at(&format!("{path}.kind"), e.to_string()));
                }
            }
        }
        if errors.is_empty() { Ok(data) } else { Err(ConfigErrors(errors).into()) }
    }

    /// The cloud model, on the training device.
    pub fn cloud_model(&self, data: &dyn DataSource) -> Result<Box<dyn CloudModel>, RunError> {
        let choice = &self.deployment.model;
        let factory = self.registry.model(&choice.plugin)?;
        let ctx = ModelContext {
            base: self.context("model", &self.training_device),
            task: data.task().clone(),
            text: self.text_source()?,
        };
        factory.build(&choice.settings, &ctx).map_err(plugin_error(PluginKind::Model, &choice.plugin))
    }

    /// The deployment's text encoder (`[text]`), built once per call.
    pub fn text_source(&self) -> Result<Option<std::sync::Arc<crate::TextSource>>, RunError> {
        let Some(choice) = &self.deployment.text else { return Ok(None) };
        let factory = self.registry.text_encoder(&choice.plugin)?;
        let encoder = factory
            .build(&choice.settings, &self.context("text", &self.device))
            .map_err(plugin_error(PluginKind::TextEncoder, &choice.plugin))?;
        // Plugin name and settings key the cache: embeddings at one truncation are never served
        // for another.
        let settings = format!("{}\n{}", choice.plugin, serde_json::json!(choice.settings));
        Ok(Some(std::sync::Arc::new(crate::TextSource::new(encoder, choice.cache.clone(), settings))))
    }

    /// An anchor reasoner (one per device, one for the cloud's training episodes).
    pub fn anchor_reasoner(&self) -> Result<Box<dyn AnchorReasoner>, RunError> {
        let choice = &self.deployment.anchor;
        let factory = self.registry.anchor_reasoner(&choice.plugin)?;
        factory
            .build(&choice.settings, &self.context("anchor", &self.device))
            .map_err(plugin_error(PluginKind::AnchorReasoner, &choice.plugin))
    }

    /// The generator for a trained model.
    pub fn generator(&self, model: &dyn CloudModel) -> Result<Box<dyn ParameterGenerator>, RunError> {
        let cloud = &self.deployment.cloud;
        let factory = self.registry.generator(&cloud.generator)?;
        let ctx = GeneratorContext {
            base: self.context("generator", &self.training_device),
            schema: model.schema().clone(),
            base_params: model.base_params(),
            feature_dim: model.feature_dim(),
            text_dim: model.text_dim(),
        };
        factory.build(&cloud.settings, &ctx).map_err(plugin_error(PluginKind::Generator, &cloud.generator))
    }

    /// The transport.
    pub fn transport(&self) -> Result<Box<dyn Transport>, RunError> {
        let PluginChoice { plugin, settings } = &self.deployment.transport;
        let factory = self.registry.transport(plugin)?;
        factory
            .build(settings, &self.context("transport", &self.device))
            .map_err(plugin_error(PluginKind::Transport, plugin))
    }
}

/// The cloud after training or loading a checkpoint.
pub struct TrainedCloud {
    /// The pretrained model.
    pub model: Box<dyn CloudModel>,
    /// The trained generator.
    pub generator: Box<dyn ParameterGenerator>,
    /// The source domains it trained on.
    pub sources: Vec<DomainSpec>,
    /// The model's training log (`None` when loaded from a checkpoint).
    pub pretrain: Option<crate::TrainingLog>,
    /// The generator's training log (`None` when loaded from a checkpoint).
    pub generator_log: Option<crate::TrainingLog>,
    /// Whether both came from a checkpoint.
    pub from_checkpoint: bool,
}

impl std::fmt::Debug for TrainedCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainedCloud")
            .field("generator", &self.generator.name())
            .field("sources", &self.sources.len())
            .field("from_checkpoint", &self.from_checkpoint)
            .finish_non_exhaustive()
    }
}

/// Source domains of a deployment: disjoint from every held-out device's (and stream stage's) shifts.
pub fn source_domains(deployment: &Deployment, data: &dyn DataSource) -> Vec<DomainSpec> {
    let mut held_out = deployment.held_out_domains();
    held_out.extend(deployment.stream_domains());
    let training = &deployment.cloud.training;
    data.source_domains(training.source_domains, seed::derive_str(deployment.seed, "sources"), &held_out)
}

/// Cloud: loads a checkpoint of this very training, or trains the device model and then the
/// generator on episodes through the same ADR (and writes the checkpoint).
pub fn train_cloud(
    composer: &Composer<'_>,
    data: &dyn DataSource,
    progress: &dyn Progress,
) -> Result<TrainedCloud, RunError> {
    let deployment = composer.deployment;
    let sources = source_domains(deployment, data);
    let training = &deployment.cloud.training;
    let mut model = composer.cloud_model(data)?;
    let store = deployment.cloud.checkpoint.as_deref().map(CheckpointDir);
    let fingerprint = deployment.training_fingerprint();
    if let Some(dir) = &store
        && let Some((model_bytes, generator_bytes)) = dir.read(&fingerprint)?
    {
        model.load(&model_bytes).map_err(|e| checkpoint_error(&dir.display(), MODEL_FILE, e))?;
        let mut generator = composer.generator(model.as_ref())?;
        generator.load(&generator_bytes).map_err(|e| checkpoint_error(&dir.display(), GENERATOR_FILE, e))?;
        return Ok(TrainedCloud {
            model,
            generator,
            sources,
            pretrain: None,
            generator_log: None,
            from_checkpoint: true,
        });
    }
    let pretrain_domains = match training.pretrain_on {
        PretrainOn::Clean => &sources[..1],
        PretrainOn::Sources => &sources[..],
    };
    let pretrain =
        model.pretrain(data, pretrain_domains, &plan(deployment, "pretrain"), progress).map_err(|e| match e {
            ModelError::Diverged { step, loss } => diverged(deployment, "pretrain", step, loss),
            e => e.into(),
        })?;
    let (generator, generator_log) = train_generator(composer, model.as_ref(), data, &sources, progress)?;
    if let Some(dir) = &store {
        dir.write(&fingerprint, &model.save()?, &generator.save()?)?;
    }
    Ok(TrainedCloud {
        model,
        generator,
        sources,
        pretrain: Some(pretrain),
        generator_log: Some(generator_log),
        from_checkpoint: false,
    })
}

/// The schedule of a cloud training phase (`pretrain` or `generator`) from `[cloud.training]`.
fn plan(deployment: &Deployment, phase: &str) -> TrainingPlan {
    let t = &deployment.cloud.training;
    let (steps, batch, learning_rate) = match phase {
        "pretrain" => (t.pretrain_steps, t.pretrain_batch, t.pretrain_learning_rate),
        _ => (t.generator_steps, t.generator_batch, t.generator_learning_rate),
    };
    TrainingPlan { steps, batch, learning_rate, seed: seed::derive_str(deployment.seed, phase) }
}

/// A training that diverged, as an error located at the setting most likely responsible: the
/// phase's learning rate. Nothing of that training is kept or written.
fn diverged(deployment: &Deployment, phase: &str, step: usize, loss: f64) -> RunError {
    let key = format!("cloud.training.{phase}_learning_rate");
    let rate = plan(deployment, phase).learning_rate;
    let message = format!(
        "{phase} training diverged: the loss or the parameters exploded (loss {loss}) at step {step}; \
         nothing was saved. \
         Lower `{phase}_learning_rate` (now {rate})"
    );
    RunError::Config(ConfigErrors(vec![deployment.error_at(&key, message)]))
}

/// Builds and trains the deployment's generator for a trained `model`.
pub fn train_generator(
    composer: &Composer<'_>,
    model: &dyn CloudModel,
    data: &dyn DataSource,
    sources: &[DomainSpec],
    progress: &dyn Progress,
) -> Result<(Box<dyn ParameterGenerator>, crate::TrainingLog), RunError> {
    let deployment = composer.deployment;
    let mut generator = composer.generator(model)?;
    let cloud_reasoner = composer.anchor_reasoner()?;
    let log = generator
        .train(&GeneratorTraining {
            model,
            data,
            domains: sources,
            reasoner: cloud_reasoner.as_ref(),
            window_clips: deployment.fleet.window_clips,
            plan: plan(deployment, "generator"),
            progress,
        })
        .map_err(|e| match e {
            GeneratorError::Diverged { step, loss } => diverged(deployment, "generator", step, loss),
            e => e.into(),
        })?;
    Ok((generator, log))
}

/// A device whose data cannot be drawn, as an error at the key that defines the device.
pub fn located_at<'a>(deployment: &'a Deployment, path: &'a str) -> impl FnOnce(RunError) -> RunError + 'a {
    move |e| match e {
        RunError::Data(e) => RunError::Config(ConfigErrors(vec![deployment.error_at(path, e.to_string())])),
        e => e,
    }
}

/// One device's data drawn and its static model scored.
pub fn fleet_device(
    composer: &Composer<'_>,
    data: &dyn DataSource,
    model: &dyn CloudModel,
    domain: &DomainSpec,
    eval_clips: usize,
) -> Result<FleetDevice, RunError> {
    let device_model = model.export(&composer.device)?;
    let drawn = draw_device(composer, data, domain, device_model.as_ref(), eval_clips)?;
    Ok(FleetDevice {
        node: DeviceNode::new(
            DeviceId(domain.name.clone()),
            device_model,
            composer.anchor_reasoner()?,
            model.reference_stats(),
        ),
        domain: domain.clone(),
        eval: drawn.eval,
        window: drawn.window,
        report: drawn.report,
    })
}

/// A device's first unlabelled window, its labelled held-out clips, and its report row with the
/// static model scored on them.
#[derive(Debug, Clone)]
pub struct DrawnDevice {
    /// `[fleet] window_clips` clips of its stream, answers stripped.
    pub window: Vec<Clip>,
    /// `eval_clips` labelled held-out clips.
    pub eval: Vec<Clip>,
    /// Its row, static accuracy and retrieval filled in (adapted = static until it adapts).
    pub report: DeviceReport,
}

/// Draws `domain`'s window and held-out clips and scores `model` (the static model) on them.
pub fn draw_device(
    composer: &Composer<'_>,
    data: &dyn DataSource,
    domain: &DomainSpec,
    model: &dyn DeviceModel,
    eval_clips: usize,
) -> Result<DrawnDevice, RunError> {
    let window: Vec<Clip> = data
        .clips(domain, Split::Stream, composer.deployment.fleet.window_clips, domain.seed)?
        .iter()
        .map(Clip::unlabelled)
        .collect();
    let eval = data.clips(domain, Split::Test, eval_clips, domain.seed)?;
    score_device(domain, data.is_shifted(domain), data.task(), model, window, eval)
}

/// A device's report row with `model` (the static model) scored on `eval` (NaN accuracy when
/// no clip is labelled), for its `window`.
pub fn score_device(
    domain: &DomainSpec,
    shifted: bool,
    task: &crate::TaskSpec,
    model: &dyn DeviceModel,
    window: Vec<Clip>,
    eval: Vec<Clip>,
) -> Result<DrawnDevice, RunError> {
    let static_accuracy = if eval.is_empty() { f64::NAN } else { model.accuracy(&eval)? };
    let static_retrieval = if eval.is_empty() { None } else { score_retrieval(model, &eval) };
    let raw_window_bytes = (window.len() * task.raw_clip_bytes()) as u64;
    let report = DeviceReport {
        device: domain.name.clone(),
        shift: domain.shift_label(),
        severity: domain.max_severity(),
        class_mix_alpha: domain.class_mix_alpha,
        shifted,
        static_accuracy,
        adapted_accuracy: static_accuracy,
        scored_clips: eval.iter().filter(|c| c.answer.is_some()).count(),
        static_retrieval,
        adapted_retrieval: static_retrieval,
        bytes_up: 0,
        bytes_down: 0,
        raw_window_bytes,
        anchors: 0,
        adaptation_ms: 0.0,
        serving_ms: 0.0,
        adaptation_peak_bytes: None,
        error: None,
        warning: None,
        static_entropy: None,
        adapted_entropy: None,
        privacy: None,
    };
    Ok(DrawnDevice { window, eval, report })
}

/// How long a device of a simulated fleet waits for the cloud's reply. Generous: in one
/// process nothing is lost, so only a stuck generator would reach it.
const IN_PROCESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The cloud-device round for a fleet, with the cloud and every device as separate nodes over
/// `transport`: every device summarises its window and sends a request, the cloud answers the
/// requests (micro-batched: what arrives together is generated in one call), every device
/// validates and installs its reply and is scored. Returns the cloud's generation wall time in
/// ms; bytes are what each device's link carried.
pub fn adapt_fleet(
    fleet: &mut [FleetDevice],
    generator: &dyn ParameterGenerator,
    transport: &mut dyn Transport,
    download: crate::Quantisation,
    progress: &dyn Progress,
) -> Result<f64, RunError> {
    let cloud = CloudNode::new(generator, download);
    let mut endpoint = transport.endpoint()?;
    // Devices: summarise, each measured alone.
    let mut requests = Vec::with_capacity(fleet.len());
    for device in fleet.iter_mut() {
        // Serving the window: what the device computes to answer it, adapting or not. The
        // summary reuses its features, so adaptation's time is what it adds.
        let t0 = Instant::now();
        device.node.keep_served(device.window.len());
        let served = device.node.serve(&device.window);
        device.report.serving_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let seed = seed::derive(device.domain.seed, 0xADE + device.node.sequence() + 1);
        let (summary, peak) = crate::memory::peak_during(|| match served {
            Ok(_) => device.node.summarise_served(seed),
            Err(e) => Err(e.into()),
        });
        device.report.adaptation_ms += t0.elapsed().as_secs_f64() * 1e3;
        device.report.adaptation_peak_bytes = peak;
        let request = match summary {
            Ok(s) => {
                device.report.anchors = s.summary.anchor_count();
                device.report.warning = s.summary.saturation().map(|s| s.to_string());
                device.report.privacy = device.node.privacy_spent();
                device.node.request(&s.summary).map_err(|e| format!("upload: {e}"))
            }
            Err(e) => Err(format!("summarise: {e}")),
        };
        if let Err(e) = &request {
            device.report.error = Some(e.clone());
        }
        requests.push(request.ok());
    }
    let mut links = fleet
        .iter()
        .map(|d| transport.link(&d.node.id).map(Metered::new))
        .collect::<Result<Vec<_>, TransportError>>()?;

    // Network: every device's exchange at once; the cloud answers from its own thread.
    let policy = BatchPolicy { max_batch: requests.iter().flatten().count().max(1), max_wait: IN_PROCESS_TIMEOUT };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (replies, served) = std::thread::scope(|s| {
        let worker = s.spawn(|| cloud.serve(endpoint.as_mut(), &policy, &stop, &crate::node::NoObserver));
        let exchanges: Vec<_> = links
            .iter_mut()
            .zip(&requests)
            .map(|(link, request)| {
                request.as_ref().map(|envelope| s.spawn(move || link.request(envelope, IN_PROCESS_TIMEOUT)))
            })
            .collect();
        let replies: Vec<_> = exchanges
            .into_iter()
            .map(|h| h.map(|h| h.join().unwrap_or_else(|_| Err(TransportError::Closed("device link panicked".into())))))
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served = worker.join().unwrap_or_else(|_| Err(TransportError::Closed("the cloud panicked".into())));
        (replies, served)
    });
    let generation_ms = served?.generation_ms;

    // Devices: validate and install (a refusal keeps the previous parameters), evaluate.
    progress.start("fleet: adapt and evaluate", fleet.len() as u64);
    for ((device, reply), link) in fleet.iter_mut().zip(replies).zip(&links) {
        device.report.bytes_up = link.traffic().bytes_up;
        device.report.bytes_down = link.traffic().bytes_down;
        let Some(reply) = reply else {
            progress.step(Some(device.node.id.to_string()));
            continue;
        };
        let t0 = Instant::now();
        let (installed, peak) = crate::memory::peak_during(|| match reply {
            Ok(envelope) => device.node.accept(&envelope).map_err(|e| match e {
                Refusal::Cloud(reason) => reason,
                e => format!("apply: {e}"),
            }),
            Err(e) => Err(format!("exchange: {e}")),
        });
        device.report.adaptation_ms += t0.elapsed().as_secs_f64() * 1e3;
        device.report.adaptation_peak_bytes = device.report.adaptation_peak_bytes.max(peak);
        match installed {
            Ok(_) => match device.node.model.accuracy(&device.eval) {
                Ok(accuracy) => {
                    device.report.adapted_accuracy = accuracy;
                    device.report.adapted_retrieval = score_retrieval(device.node.model.as_ref(), &device.eval);
                }
                Err(e) => device.report.error = Some(format!("evaluate: {e}")),
            },
            Err(e) => device.report.error = Some(e),
        }
        progress.step(Some(device.node.id.to_string()));
    }
    progress.finish();
    Ok(generation_ms)
}

/// Why a window could not be summarised.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// Anchor reasoning failed.
    #[error(transparent)]
    Anchor(#[from] crate::AnchorError),
    /// The model failed to embed the window's questions.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The summary could not be made private.
    #[error(transparent)]
    Privacy(#[from] crate::privacy::PrivacyError),
}

/// A window's summary: frame anchors from `features`, and text-side anchors when the reasoner
/// sends them and the model embeds questions (an optional capability of both); made private
/// when the reasoner asks for it ([`AnchorReasoner::privacy`]).
pub fn summarise_window(
    model: &dyn DeviceModel,
    reasoner: &dyn AnchorReasoner,
    window: &[Clip],
    features: &crate::HostTensor,
    reference: &crate::FeatureStats,
    seed: u64,
) -> Result<crate::AnchorSummary, SummaryError> {
    let text = match reasoner.text_anchor_count() {
        0 => None,
        _ => match model.text_features(window) {
            Ok(text) => Some(text),
            Err(ModelError::Unsupported { .. }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    summarise_features(reasoner, features, text.as_ref(), window.len(), reference, seed)
}

/// The summary of a window of `clips` clips from features already computed (by serving it):
/// `[N, d]` frame features and, when the model embeds questions, `[clips, e]` question
/// embeddings. No forward pass.
pub fn summarise_features(
    reasoner: &dyn AnchorReasoner,
    features: &crate::HostTensor,
    text: Option<&crate::HostTensor>,
    clips: usize,
    reference: &crate::FeatureStats,
    seed: u64,
) -> Result<crate::AnchorSummary, SummaryError> {
    let mut summary = reasoner.summarise(features, reference, clips, seed)?;
    if let Some(text) = text.filter(|_| reasoner.text_anchor_count() > 0) {
        summary.text_anchors = reasoner.summarise_text(text, seed::derive(seed, 0x7E77))?;
    }
    if let Some(privacy) = reasoner.privacy() {
        privacy.apply(reasoner, &mut summary, features, reference, clips, seed::derive(seed, 0xD1FF))?;
    }
    Ok(summary)
}

/// Runs a deployment end to end.
pub fn run(deployment: &Deployment, registry: &Registry, progress: &dyn Progress) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let composer = Composer::new(deployment, registry)?;
    let data = composer.data_source()?;
    let mut transport = composer.transport()?;
    let cloud = train_cloud(&composer, data.as_ref(), progress)?;

    // Devices: export the model, draw the stream and the held-out clips, measure static.
    let fleet_domains = deployment.device_domains();
    progress.start("fleet: static evaluation", fleet_domains.len() as u64);
    let mut fleet = Vec::with_capacity(fleet_domains.len());
    for (path, domain) in &fleet_domains {
        fleet.push(
            fleet_device(&composer, data.as_ref(), cloud.model.as_ref(), domain, deployment.fleet.eval_clips)
                .map_err(located_at(deployment, path))?,
        );
        progress.step(Some(domain.name.clone()));
    }
    progress.finish();

    let generation_ms =
        adapt_fleet(&mut fleet, cloud.generator.as_ref(), transport.as_mut(), deployment.cloud.download, progress)?;
    let devices: Vec<DeviceReport> = fleet.into_iter().map(|d| d.report).collect();
    Ok(RunReport {
        deployment: deployment.file().to_string(),
        seed: deployment.seed,
        backend: format!("devices {}, cloud {}", composer.device, composer.training_device),
        plugins: plugin_choices(deployment),
        cloud: cloud_report(&cloud, generation_ms),
        fleet: FleetSummary::of(&devices),
        devices,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `kind = name` of every plugin a deployment composes.
pub fn plugin_choices(deployment: &Deployment) -> Vec<(String, String)> {
    [
        ("backend", deployment.backend.kind.as_str()),
        ("data source", deployment.data.plugin.as_str()),
        ("model", deployment.model.plugin.as_str()),
        ("anchor reasoner", deployment.anchor.plugin.as_str()),
        ("generator", deployment.cloud.generator.as_str()),
        ("transport", deployment.transport.plugin.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The cloud's part of a report: its sizes, training logs and generation time per fleet.
pub fn cloud_report(cloud: &TrainedCloud, generation_ms: f64) -> CloudReport {
    CloudReport {
        model_parameters: cloud.model.parameter_count(),
        generator_parameters: cloud.generator.parameter_count(),
        slot_parameters: cloud.model.schema().numel(),
        source_domains: cloud.sources.len(),
        from_checkpoint: cloud.from_checkpoint,
        pretrain: cloud.pretrain.clone(),
        generator: cloud.generator_log.clone(),
        generation_ms,
    }
}

/// The model's file in a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The generator's file in a checkpoint folder.
pub const GENERATOR_FILE: &str = "generator.safetensors";
const FINGERPRINT_FILE: &str = "fingerprint";

/// A checkpoint problem located at `dir/file`.
pub fn checkpoint_error(dir: &str, file: &str, error: impl std::fmt::Display) -> RunError {
    RunError::Checkpoint { path: format!("{dir}/{file}"), message: error.to_string() }
}

/// Largest checkpoint file read, in bytes.
pub const MAX_CHECKPOINT: u64 = 4 << 30;

/// The model's and the generator's checkpoint bytes.
type CheckpointBytes = (Vec<u8>, Vec<u8>);

/// A folder holding the cloud's trained model and generator, and the fingerprint of the
/// training that produced them.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointDir<'a>(pub &'a std::path::Path);

impl CheckpointDir<'_> {
    /// The folder, for messages.
    pub fn display(&self) -> String {
        self.0.display().to_string()
    }

    /// Both checkpoints, if the folder holds a checkpoint of the training with `fingerprint`.
    pub fn read(&self, fingerprint: &str) -> Result<Option<CheckpointBytes>, RunError> {
        // Checkpoints may come from an operator's copy: read as regular files (links only within
        // the folder), bounded.
        let links = crate::files::Links::Within(self.0);
        match crate::files::read_text(&self.0.join(FINGERPRINT_FILE), 4096, links) {
            Ok(found) if found.trim() == fingerprint => {}
            _ => return Ok(None),
        }
        let read = |file: &str| {
            crate::files::read(&self.0.join(file), MAX_CHECKPOINT, links)
                .map_err(|e| checkpoint_error(&self.display(), file, e))
        };
        Ok(Some((read(MODEL_FILE)?, read(GENERATOR_FILE)?)))
    }

    /// Writes both checkpoints and, last, the fingerprint.
    pub fn write(&self, fingerprint: &str, model: &[u8], generator: &[u8]) -> Result<(), RunError> {
        let dir = self.display();
        std::fs::create_dir_all(self.0).map_err(|e| checkpoint_error(&dir, "", e))?;
        // The fingerprint goes last: a folder interrupted mid-write is never taken as valid.
        let _ = std::fs::remove_file(self.0.join(FINGERPRINT_FILE));
        for (file, bytes) in
            [(MODEL_FILE, model), (GENERATOR_FILE, generator), (FINGERPRINT_FILE, fingerprint.as_bytes())]
        {
            std::fs::write(self.0.join(file), bytes).map_err(|e| checkpoint_error(&dir, file, e))?;
        }
        Ok(())
    }
}

/// Text → video retrieval on `clips`, for models that embed (an optional capability).
pub fn score_retrieval(model: &dyn DeviceModel, clips: &[Clip]) -> Option<RetrievalMetrics> {
    let embeddings = model.retrieval_embeddings(clips).ok()?;
    let captions: Vec<&str> = clips.iter().map(|c| c.caption.as_str()).collect();
    metrics::retrieval(&embeddings, &captions)
}
