//! `mmpg`: run, validate and inspect cloud-device deployments. A thin layer over the library
//! crates; every plugin crate is linked here so its factories register.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mmpg::report::RunReport;
use mmpg::runtime::{self, RunError};
use mmpg::{Deployment, Progress, Registry};

mod cloud;
mod device;
mod fleet;
mod load;
mod mqtt;
mod plots;
mod provision;

// Counts heap bytes so `mmpg bench` can report each device adaptation's peak memory.
#[global_allocator]
static ALLOCATOR: mmpg::memory::PeakAllocator = mmpg::memory::PeakAllocator;

// Linking a plugin crate is what makes its `inventory::submit!` count.
use mmpg_adr as _;
use mmpg_backends as _;
use mmpg_baselines as _;
use mmpg_fashion as _;
use mmpg_fda as _;
use mmpg_http as _;
use mmpg_lmm as _;
use mmpg_minilm as _;
use mmpg_synthetic as _;
use mmpg_videoqa as _;

#[derive(Parser)]
#[command(
    name = "mmpg",
    version,
    about = "Cloud-device multi-modal parameter generation: backprop-free on-device adaptation"
)]
struct Cli {
    /// Load a plugin library (a cdylib built with `mmpg::export_plugins!`) before anything
    /// else; repeatable. Deployments pin theirs with `[[plugins]] path, sha256` instead.
    #[arg(long = "plugin", value_name = "LIBRARY", global = true)]
    plugins: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the cloud, adapt every device of a deployment, print the table, write the JSON report.
    Run {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Overrides `[report] json`.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Run the method and every baseline and ablation of `[bench]` on the same devices; write
    /// report.md, report.json and PNG plots.
    Bench {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Overrides `[bench] out`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a deployment file and list every problem with its line and key path.
    Validate {
        /// Deployment TOML file.
        deployment: PathBuf,
    },
    /// Write the device bundle of a deployment's trained cloud (training or loading it first):
    /// the device model's weights, reference statistics, slot schema and a manifest.
    Export {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write (or extend) the deployment's keys and certificates: a CA, the cloud's server
    /// certificate and Ed25519 signing key, a client certificate per device; or revoke a device.
    Provision {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Folder to write (default: `[security] dir`, else `pki`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also issue certificates for this many `mmpg load` devices (`load-00000`, …; at most
        /// 100,000).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        load: u32,
        /// Revoke this device: the cloud refuses it from its next request, without a restart.
        #[arg(long, value_name = "DEVICE")]
        revoke: Option<String>,
        /// Also issue a certificate for this device id, one the deployment does not list (e.g. a
        /// `mmpg device --clips` camera). Repeatable.
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
    },
    /// The cloud as a service.
    Cloud {
        #[command(subcommand)]
        command: CloudCommand,
    },
    /// One device as its own process: serve its clips, adapt through the cloud every
    /// `adapt_every` clips, keep its last good parameters.
    Device {
        /// The device's name (`[[device]] name`, or `device-NN` for `[fleet]` devices).
        #[arg(long)]
        id: String,
        /// Deployment TOML file.
        deployment: PathBuf,
        /// The cloud's URL (default: `[serve] url`, or `http(s)://<[serve] listen>`).
        #[arg(long)]
        cloud: Option<String>,
        /// Adaptations to make before exiting; 0 serves until SIGTERM.
        #[arg(long, default_value_t = 0)]
        rounds: u64,
        /// State folder (default: `[fleet] state`/<id>).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Serve the clips in this folder (one `.safetensors` file per clip, as `mmpg clips`
        /// writes them; cycled) instead of the data source's for the device's domain.
        #[arg(long, conflicts_with = "video")]
        clips: Option<PathBuf>,
        #[command(flatten)]
        video: VideoArgs,
        /// Start from this bundle (a folder `mmpg export` wrote) instead of fetching the cloud's.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The device's startup kit from `mmpg provision` (default: `[security] dir`/devices/<id>).
        #[arg(long)]
        kit: Option<PathBuf>,
        /// Under the mqtt transport: the broker (overrides `[transport.settings] broker`).
        #[arg(long)]
        broker: Option<String>,
    },
    /// Write clips of a device's domain as files (one `.safetensors` per clip: `frames`
    /// `[T, C, H, W]`, question, caption and answer in the metadata), what `mmpg device --clips`
    /// serves.
    Clips {
        /// The device whose domain to draw from.
        #[arg(long)]
        id: String,
        /// Deployment TOML file.
        deployment: PathBuf,
        /// How many clips (with --video: at most, and at most 256 MiB of frames).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
        /// Folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Strip the answers (an unlabelled recording).
        #[arg(long)]
        unlabelled: bool,
        #[command(flatten)]
        video: VideoArgs,
    },
    /// Start the cloud and every device of a deployment as processes on loopback (or devices
    /// only, against `--cloud`); print the same table and JSON report as `mmpg run`.
    Fleet {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Devices only, against the cloud at this URL.
        #[arg(long)]
        cloud: Option<String>,
        /// Adaptations per device.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
        /// JSON report path (default: reports/<deployment>-fleet.json).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Longest the fleet may take, in seconds.
        #[arg(long, default_value_t = 1800)]
        deadline: u64,
        /// Cloud processes to start: under the mqtt transport, workers in one shared
        /// subscription (each summary goes to one of them).
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Load a serving cloud: N concurrent devices, each sending real summaries as fast as
    /// replies come; report throughput, latency percentiles, errors and batch sizes.
    Load {
        /// Deployment TOML file (its devices' windows give the summaries).
        deployment: PathBuf,
        /// The cloud's URL (default: `[serve] url`).
        #[arg(long)]
        cloud: Option<String>,
        /// Concurrent devices (one keep-alive connection each).
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Duration of the load, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Also write one summary envelope here (for external load tools such as wrk).
        #[arg(long)]
        save_envelope: Option<PathBuf>,
        /// JSON report path.
        #[arg(long)]
        report: Option<PathBuf>,
        /// `http` or `mqtt` (default: the deployment's `[transport]`; over mqtt every device is
        /// its own broker connection, the bundle and metrics still come from `--cloud`).
        #[arg(long)]
        transport: Option<String>,
        /// Under mqtt: the broker (overrides `[transport.settings] broker`).
        #[arg(long)]
        broker: Option<String>,
    },
    /// List the registered plugins by kind, with their settings, defaults and origin (built in,
    /// or the library's path and sha256); with a deployment, its `[[plugins]]` libraries too.
    Plugins {
        /// Deployment TOML file whose `[[plugins]]` to load.
        deployment: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CloudCommand {
    /// Train the cloud (or load its checkpoint), then serve HTTP(S) until SIGTERM:
    /// `POST /v1/adapt`, `GET /v1/hello`, `GET /v1/bundle`, `/healthz`, `/readyz`, `/metrics`.
    Serve {
        /// Deployment TOML file.
        deployment: PathBuf,
        /// Overrides `[serve] listen` (port 0: any free port; the URL is printed).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Under the mqtt transport: the broker (overrides `[transport.settings] broker`).
        #[arg(long)]
        broker: Option<String>,
    },
}

/// Exit code of a usage or configuration problem.
const EXIT_CONFIG: u8 = 2;

/// A video file as a device's input (`mmpg device --video`, `mmpg clips --video`).
#[derive(Debug, clap::Args)]
struct VideoArgs {
    /// Read clips from this video file (any container and codec FFmpeg decodes: MP4/H.264,
    /// AVI, …) instead of the data source: T frames per clip, `--frame-stride` source frames
    /// apart, each scaled to the task's frame shape. Such clips carry no labels.
    #[arg(long, value_name = "FILE")]
    video: Option<PathBuf>,
    /// With --video: source frames between two frames of a clip.
    #[arg(long, default_value_t = 4, requires = "video", value_parser = clap::value_parser!(u32).range(1..=1000))]
    frame_stride: u32,
    /// With --video: the question every clip asks (default: the question of a clip the
    /// deployment's data source draws).
    #[arg(long, requires = "video", value_parser = parse_question)]
    question: Option<String>,
    /// With --video: corrupt every frame, e.g. `fog@4` (a kind of the CIFAR-10-C suite of
    /// `mmpg_fashion::corruptions`, severity 1–5; square frames only), seeded per clip.
    #[arg(long, requires = "video", value_name = "KIND@SEVERITY", value_parser = parse_corruption)]
    corruption: Option<(String, u8)>,
}

fn parse_question(text: &str) -> Result<String, String> {
    match text.trim().is_empty() || text.len() > mmpg::clip_file::MAX_TEXT {
        true => Err(format!("a question is 1..={} bytes, not blank", mmpg::clip_file::MAX_TEXT)),
        false => Ok(text.to_string()),
    }
}

fn parse_corruption(text: &str) -> Result<(String, u8), String> {
    let (kind, severity) = text.split_once('@').ok_or("expected KIND@SEVERITY, e.g. fog@4")?;
    if !mmpg_fashion::corruptions::KINDS.contains(&kind) {
        return Err(format!("unknown kind `{kind}`; known: {}", mmpg_fashion::corruptions::KINDS.join(", ")));
    }
    match severity.parse::<u8>() {
        Ok(s @ 1..=5) => Ok((kind.to_string(), s)),
        _ => Err(format!("severity `{severity}`: expected 1 to 5")),
    }
}

impl VideoArgs {
    fn input(self) -> Option<device::VideoInput> {
        let (stride, question, corruption) = (self.frame_stride as usize, self.question, self.corruption);
        self.video.map(|path| device::VideoInput { path, stride, question, corruption })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut registry = match Registry::with_static_plugins() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for path in &cli.plugins {
        if let Err(e) = registry.load_library(path, None) {
            eprintln!("error: --plugin: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    match cli.command {
        Command::Plugins { deployment } => {
            if let Some(path) = deployment
                && let Err(errors) = Deployment::load_plugins(&path, &mut registry)
            {
                eprintln!("{errors}");
                return ExitCode::from(EXIT_CONFIG);
            }
            print_plugins(&registry);
            ExitCode::SUCCESS
        }
        Command::Validate { deployment } => match open(&deployment, &mut registry) {
            Ok(d) => {
                println!("{}: ok ({} devices)", deployment.display(), d.device_domains().len());
                // Not an error: `mmpg provision` reads this same file to make the kit.
                if let Some(security) = d.secured()
                    && !security.kit().ca_cert().exists()
                {
                    println!(
                        "note: no kit in {} yet: `mmpg provision {}` makes it (cloud serve and devices need it)",
                        security.dir.display(),
                        deployment.display()
                    );
                }
                // Seeded noise reproduces a simulation; a deployed device must not use it.
                let seeded = d.anchor.settings.get("privacy").and_then(|p| p.get("noise")).and_then(|n| n.as_str())
                    == Some("seeded");
                if seeded && d.secured().is_some() {
                    println!(
                        "warning: anchor.settings.privacy.noise = \"seeded\" in a deployment with [security]: whoever \
                         knows the seed can subtract the noise; deployed devices should use \"os\" (the default)"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { deployment, report } => exit_code(run(&deployment, report, &mut registry)),
        Command::Bench { deployment, out } => exit_code(bench(&deployment, out, &mut registry)),
        Command::Export { deployment, out } => exit_code(export(&deployment, &out, &mut registry)),
        Command::Cloud { command: CloudCommand::Serve { deployment, listen, broker } } => {
            exit_code(cloud::serve(&deployment, listen, broker.as_deref(), &mut registry, &Bars::default()))
        }
        Command::Provision { deployment, out, load, revoke, devices } => {
            let options = provision::ProvisionOptions { out, load: load as usize, revoke, devices };
            exit_code(provision::run(&deployment, &options, &mut registry))
        }
        Command::Device { id, deployment, cloud, rounds, state, clips, video, bundle, kit, broker } => {
            let video = video.input();
            let options = device::DeviceOptions { id, cloud, rounds, state, clips, video, bundle, kit, broker };
            exit_code(device::run(&deployment, &options, &mut registry))
        }
        Command::Clips { id, deployment, count, out, unlabelled, video } => {
            let video = video.input();
            exit_code(device::write_clips(
                &deployment,
                &id,
                count as usize,
                &out,
                unlabelled,
                video.as_ref(),
                &mut registry,
            ))
        }
        Command::Fleet { deployment, cloud, rounds, report, deadline, workers } => {
            let deadline = std::time::Duration::from_secs(deadline);
            let options = fleet::FleetOptions { cloud, rounds, report, deadline, workers };
            exit_code(fleet::run(&deployment, &options, &cli.plugins, &mut registry))
        }
        Command::Load { deployment, cloud, devices, seconds, save_envelope, report, transport, broker } => {
            let options = load::LoadOptions { cloud, devices, seconds, save_envelope, report, transport, broker };
            exit_code(load::run(&deployment, &options, &mut registry))
        }
    }
}

/// Opens a deployment (loading its `[[plugins]]`) and warns about every unpinned library.
pub(crate) fn open(path: &Path, registry: &mut Registry) -> Result<Deployment, mmpg::ConfigErrors> {
    let deployment = Deployment::open(path, registry)?;
    // What the mqtt transport's settings cannot know alone: under [security] only TLS.
    if let Ok(Some(settings)) = mqtt::settings(&deployment)
        && let Some(url) = settings.broker.as_deref().and_then(|u| mmpg_mqtt::BrokerUrl::parse(u).ok())
        && deployment.secured().is_some()
        && !url.tls
    {
        let message =
            format!("{url}: [security] allows only mqtts:// (TLS); set `insecure = true` to allow plain MQTT");
        return Err(mmpg::ConfigErrors(vec![deployment.error_at("transport.settings.broker", message)]));
    }
    for library in registry.libraries().filter(|l| !l.pinned) {
        eprintln!(
            "warning: plugin library {} is not pinned (sha256 {}): pin it in a [[plugins]] entry with `sha256 = \"{}\"`",
            library.path.display(),
            library.sha256,
            library.sha256
        );
    }
    Ok(deployment)
}

/// Exit code 2 for problems with the deployment or the machine, 1 for failures while running.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    let Err(e) = result else { return ExitCode::SUCCESS };
    let config_problem = e.downcast_ref::<RunError>().is_some_and(|r| {
        matches!(r, RunError::Config(_) | RunError::Backend(_) | RunError::Registry(_) | RunError::Plugin { .. })
    });
    // Run errors carry their own context; anyhow's chain would repeat it.
    match e.downcast_ref::<RunError>() {
        Some(run_error) => eprintln!("error: {run_error}"),
        None => eprintln!("error: {e:#}"),
    }
    if config_problem { ExitCode::from(EXIT_CONFIG) } else { ExitCode::FAILURE }
}

fn export(path: &Path, out: &Path, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = open(path, registry).map_err(RunError::Config)?;
    let composer = runtime::Composer::new(&deployment, registry)?;
    let data = composer.data_source()?;
    let cloud = runtime::train_cloud(&composer, data.as_ref(), &Bars::default())?;
    let mut bundle = mmpg::deploy::export_bundle(&composer, &cloud)?;
    // Under [security] devices accept only a bundle the cloud signed (manifest.sig).
    if let Some(security) = deployment.secured() {
        let path = security.kit().signing_key();
        let signer = mmpg::security::CloudSigner::read(&path).with_context(|| {
            format!("reading the signing key {} (run `mmpg provision {}` first)", path.display(), deployment.file())
        })?;
        bundle = bundle.signed(&signer);
        println!("signed: {} (Ed25519 key {})", mmpg::bundle::SIGNATURE, signer.public().fingerprint());
    }
    bundle.write(out)?;
    println!(
        "bundle: {} (slot schema {}, training {})",
        out.display(),
        bundle.manifest.schema_hash,
        bundle.manifest.training
    );
    for (name, hash) in &bundle.manifest.files {
        println!("  {name:<24} sha256 {hash}");
    }
    Ok(())
}

pub(crate) fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn bench(path: &Path, out_override: Option<PathBuf>, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = open(path, registry).map_err(RunError::Config)?;
    let out = out_override.or_else(|| deployment.bench.out.clone()).unwrap_or_else(|| {
        PathBuf::from("reports")
            .join(format!("{}-bench", path.file_stem().and_then(|s| s.to_str()).unwrap_or("deployment")))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let progress = Bars::default();
    let report = mmpg_bench::bench(&deployment, registry, &progress)?;
    let markdown = report.markdown();
    let md_path = out.join("report.md");
    std::fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = out.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{markdown}");
    match plots::draw_all(&report, &out) {
        Ok(files) => {
            for f in files {
                println!("plot: {}", f.display());
            }
        }
        // The tables are written; a missing font costs only the pictures.
        Err(e) => eprintln!("warning: plots not drawn: {e}"),
    }
    println!("report: {} and {}", md_path.display(), json_path.display());
    Ok(())
}

fn run(path: &Path, report_override: Option<PathBuf>, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = open(path, registry).map_err(RunError::Config)?;
    let progress = Bars::default();
    let report = runtime::run(&deployment, registry, &progress)?;
    print_table(&report);
    let out = report_override.or_else(|| deployment.report.json.clone()).unwrap_or_else(|| {
        PathBuf::from("reports").join(format!("{}.json", path.file_stem().and_then(|s| s.to_str()).unwrap_or("run")))
    });
    create_parent(&out)?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}

fn shift_label(d: &mmpg::report::DeviceReport) -> String {
    match d.class_mix_alpha {
        Some(a) => format!("{} α={a}", d.shift),
        None => d.shift.clone(),
    }
}

pub(crate) fn print_table(report: &RunReport) {
    // Wide enough for the longest shift (e.g. `brightness@3+contrast@3`), never narrower than 22.
    let w = report.devices.iter().map(|d| shift_label(d).chars().count()).max().unwrap_or(0).max(22);
    println!();
    println!(
        "{:<12} {:<w$} {:>7} {:>8} {:>7} {:>7} {:>13} {:>8} {:>9} {:>10} {:>9}  note",
        "device",
        "shift",
        "scored",
        "static",
        "adapted",
        "gain pt",
        "R@5 s→a",
        "up B",
        "down B",
        "raw win B",
        "adapt ms"
    );
    for d in &report.devices {
        let shift = shift_label(d);
        let r5 = match (d.static_retrieval, d.adapted_retrieval) {
            (Some(s), Some(a)) => format!("{:.0}%→{:.0}%", 100.0 * s.r5, 100.0 * a.r5),
            _ => "-".into(),
        };
        println!(
            "{:<12} {:<w$} {:>7} {:>7} {:>8} {:>7}  {:>12} {:>8} {:>9} {:>10} {:>9.2}  {}",
            d.device,
            shift,
            d.scored_clips,
            percent(d.static_accuracy),
            percent(d.adapted_accuracy),
            points(d.adapted_accuracy - d.static_accuracy),
            r5,
            d.bytes_up,
            d.bytes_down,
            d.raw_window_bytes,
            d.adaptation_ms,
            d.error.as_deref().or(d.warning.as_deref()).unwrap_or("")
        );
    }
    let f = &report.fleet;
    println!();
    println!(
        "shifted devices ({}): static {} → adapted {} ({} points); all devices ({}): {} → {}",
        f.shifted_devices,
        percent(f.shifted_static_accuracy),
        percent(f.shifted_adapted_accuracy),
        points(f.shifted_adapted_accuracy - f.shifted_static_accuracy),
        f.devices,
        percent(f.static_accuracy),
        percent(f.adapted_accuracy)
    );
    if let Some(p) = report.devices.iter().find_map(|d| d.privacy) {
        println!(
            "private summaries (Gaussian mechanism): ε {} per upload at δ {:e}; each device made {} upload(s), ε {:.3} in all",
            p.epsilon_per_upload, p.delta, p.uploads, p.epsilon_total
        );
    }
    if let (Some(s), Some(a)) = (f.static_retrieval, f.adapted_retrieval) {
        println!(
            "retrieval (text → video, all devices): R@1 {:.1}% → {:.1}%, R@5 {:.1}% → {:.1}%, R@10 {:.1}% → {:.1}%, median rank {:.1} → {:.1}",
            100.0 * s.r1,
            100.0 * a.r1,
            100.0 * s.r5,
            100.0 * a.r5,
            100.0 * s.r10,
            100.0 * a.r10,
            s.median_rank,
            a.median_rank
        );
    }
    let c = &report.cloud;
    // A fleet of processes has no one generation time: the cloud's /metrics has its histogram.
    let generation = if c.generation_ms.is_finite() {
        format!("fleet generation {:.1} ms", c.generation_ms)
    } else {
        "generation per request in the cloud's /metrics".into()
    };
    println!(
        "cloud{}: model {} params, generator {} params, {} dynamic params per device, {} source domains; {generation}; run {:.1} s",
        if c.from_checkpoint { " (loaded from its checkpoint, not trained)" } else { "" },
        c.model_parameters,
        c.generator_parameters,
        c.slot_parameters,
        c.source_domains,
        report.seconds
    );
}

/// An accuracy as a percentage; "n/a" when there is none (no scored clips).
fn percent(x: f64) -> String {
    if x.is_finite() { format!("{:.1}%", 100.0 * x) } else { "n/a".into() }
}

/// A difference of accuracies in points; "n/a" when either is missing.
fn points(x: f64) -> String {
    if x.is_finite() { format!("{:+.1}", 100.0 * x) } else { "n/a".into() }
}

fn print_plugins(registry: &Registry) {
    let mut kind = None;
    for plugin in registry.plugins() {
        if kind != Some(plugin.kind()) {
            kind = Some(plugin.kind());
            println!("{}:", plugin.kind());
        }
        println!("  {:<12} {}", plugin.name(), plugin.summary());
        match registry.origin(plugin.kind(), plugin.name()) {
            None => println!("  {:<12}   origin: built in", ""),
            Some(library) => {
                let pin = if library.pinned { "pinned" } else { "not pinned" };
                println!("  {:<12}   origin: {} (sha256 {}, {pin})", "", library.path.display(), library.sha256);
                let backends =
                    if library.backends.is_empty() { "none (host only)".into() } else { library.backends.join(", ") };
                println!(
                    "  {:<12}   built against mmpg {}, {}, backends {backends}",
                    "", library.mmpg_version, library.target
                );
            }
        }
        if let Some(settings) = plugin.settings() {
            for (key, value) in settings.defaults() {
                println!("  {:<12}   {key} = {value}", "");
            }
        }
    }
}

/// Progress bars on the terminal (hidden when stderr is not one).
#[derive(Default)]
struct Bars(Mutex<Option<ProgressBar>>);

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total).with_message(phase.to_string());
        if let Ok(style) = ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {elapsed} {prefix}") {
            bar.set_style(style.progress_chars("=> "));
        }
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(bar);
        }
    }

    fn step(&self, status: Option<String>) {
        if let Ok(slot) = self.0.lock()
            && let Some(bar) = slot.as_ref()
        {
            if let Some(s) = status {
                bar.set_prefix(s);
            }
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(bar) = slot.take()
        {
            let msg = format!("{} done in {:.1}s", bar.message(), bar.elapsed().as_secs_f64());
            bar.finish_and_clear();
            eprintln!("{msg}");
        }
    }
}
