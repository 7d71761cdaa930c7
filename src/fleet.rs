//! `mmpg fleet`: the cloud and every device of a deployment as child processes on loopback,
//! and the same table and JSON report as `mmpg run`.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mmpg::Registry;
use mmpg::report::{DeviceReport, FleetSummary, RunReport};
use mmpg::runtime::{RunError, plugin_choices};
use mmpg_http::CloudClient;

/// A child process killed when dropped, so that no error path leaves one behind.
struct Guarded(Child);

impl Guarded {
    /// Asks the process to stop (SIGTERM) and waits for it up to `grace`, then kills it.
    fn terminate(&mut self, grace: Duration) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Options of `mmpg fleet`.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Devices only, against this cloud.
    pub cloud: Option<String>,
    /// Adaptations per device.
    pub rounds: u64,
    /// Overrides `[report] json`.
    pub report: Option<PathBuf>,
    /// Longest the whole fleet may take.
    pub deadline: Duration,
    /// Cloud processes to start (the mqtt transport's workers in one shared subscription; one
    /// over HTTP).
    pub workers: usize,
}

/// Starts `mmpg cloud serve` (on a free loopback port) and waits for its URL.
fn start_cloud(
    exe: &Path,
    deployment: &Path,
    plugins: &[PathBuf],
    broker: Option<&str>,
    deadline: Instant,
) -> anyhow::Result<(Guarded, String)> {
    let mut command = Command::new(exe);
    for p in plugins {
        command.arg("--plugin").arg(p);
    }
    command.args(["cloud", "serve", "--listen", "127.0.0.1:0"]).arg(deployment);
    if let Some(broker) = broker {
        command.args(["--broker", broker]);
    }
    let mut cloud = Guarded(command.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().context("starting the cloud")?);
    let stdout = cloud.0.stdout.take().context("the cloud's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix(crate::cloud::SERVING) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(url) => return Ok((cloud, url)),
            Err(_) => {
                if let Ok(Some(status)) = cloud.0.try_wait() {
                    bail!("the cloud exited before serving ({status}); its messages are above");
                }
                if Instant::now() > deadline {
                    bail!("the cloud did not start serving in time");
                }
            }
        }
    }
}

/// Starts a Mosquitto of the fleet's own in `[fleet] state`/broker: TLS with the kit's server
/// certificate, its password file and ACL under `[security]`; anonymous plain MQTT otherwise.
fn own_broker(deployment: &mmpg::Deployment) -> anyhow::Result<(mmpg_mqtt::mosquitto::Mosquitto, String)> {
    let dir = deployment.fleet.state.join("broker");
    let secured = deployment.secured().map(|security| {
        let kit = security.kit();
        mmpg_mqtt::mosquitto::Secured {
            cert: kit.server_cert(),
            key: kit.server_key(),
            files: mmpg_mqtt::credentials::BrokerFiles::of(&kit),
        }
    });
    let process = mmpg_mqtt::mosquitto::Mosquitto::start(&dir, secured.as_ref())?;
    let scheme = if secured.is_some() { "mqtts" } else { "mqtt" };
    let url = format!("{scheme}://127.0.0.1:{}", process.port());
    Ok((process, url))
}

/// Runs the fleet.
pub fn run(path: &Path, options: &FleetOptions, plugins: &[PathBuf], registry: &mut Registry) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + options.deadline;
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let exe = std::env::current_exe().context("locating the mmpg binary")?;
    crate::provision::complete_kit(&deployment)?;
    let mqtt = crate::mqtt::settings(&deployment)?;
    if mqtt.is_none() && options.workers > 1 {
        bail!("--workers {}: several cloud processes need the mqtt transport (a shared subscription)", options.workers);
    }
    // Under the mqtt transport without a broker URL: a Mosquitto of the fleet's own.
    let (_broker, broker_url) = match &mqtt {
        Some(settings) if settings.broker.is_none() => {
            let (process, url) = own_broker(&deployment)?;
            eprintln!(
                "mmpg fleet: started Mosquitto (pid {}) at {url}; its log: {}",
                process.pid(),
                process.log().display()
            );
            (Some(process), Some(url))
        }
        Some(settings) => (None, settings.broker.clone()),
        None => (None, None),
    };
    let mut clouds = Vec::new();
    let url = match &options.cloud {
        Some(url) => url.clone(),
        None => {
            let mut first = None;
            // One after another: a later worker loads the checkpoint the first one wrote.
            for _ in 0..options.workers.max(1) {
                let (child, url) = start_cloud(&exe, path, plugins, broker_url.as_deref(), deadline)?;
                clouds.push(child);
                first.get_or_insert(url);
            }
            first.context("no cloud started")?
        }
    };
    match &broker_url {
        Some(broker) => {
            eprintln!("mmpg fleet: {} cloud worker(s) on the broker {broker}; bundle from {url}", clouds.len())
        }
        None => eprintln!("mmpg fleet: cloud at {url}"),
    }
    // Under mutual TLS the fleet asks for the cloud's info as its first device.
    let first = deployment.device_domains().into_iter().next().map(|(_, d)| d.name);
    let client = CloudClient::new(&url, &deployment.client_trust(first.as_deref(), None))?;
    let info = client.hello(Duration::from_secs(10)).context("asking the cloud for its info")?;

    let domains = deployment.device_domains();
    let mut devices = Vec::with_capacity(domains.len());
    for (_, domain) in &domains {
        let state = deployment.fleet.state.join(mmpg::security::identity::encode(&domain.name));
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        // A report left by an earlier fleet must not pass for this one's.
        let _ = std::fs::remove_file(state.join("report.json"));
        let stderr = std::fs::File::create(state.join("stderr.log")).context("creating the device's stderr log")?;
        let mut command = Command::new(&exe);
        for p in plugins {
            command.arg("--plugin").arg(p);
        }
        command
            .args(["device", "--id", &domain.name, "--cloud", &url, "--rounds", &options.rounds.to_string(), "--state"])
            .arg(&state)
            .arg(path);
        if let Some(broker) = &broker_url {
            command.args(["--broker", broker]);
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        devices.push((domain.name.clone(), state, Guarded(command.spawn().context("starting a device")?)));
    }
    eprintln!("mmpg fleet: {} device processes started", devices.len());

    let mut reports = Vec::with_capacity(devices.len());
    for (name, state, mut child) in devices {
        let status = loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                child.terminate(Duration::from_secs(5));
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let report: Option<DeviceReport> =
            std::fs::read(state.join("report.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        match (status, report) {
            (Some(s), Some(r)) if s.success() => reports.push(r),
            (status, _) => {
                let log = state.join("stderr.log");
                let why = std::fs::read_to_string(&log).unwrap_or_default();
                let last = why.lines().last().unwrap_or("").to_string();
                let what = status.map_or("did not finish in time".to_string(), |s| format!("exited with {s}"));
                eprintln!("mmpg fleet: device {name} {what}: {last} (see {})", log.display());
                bail!("device {name} {what}");
            }
        }
    }
    for cloud in &mut clouds {
        cloud.terminate(Duration::from_secs(10));
    }
    let mut cloud_report = info.report;
    cloud_report.generation_ms = f64::NAN;
    let report = RunReport {
        deployment: deployment.file().to_string(),
        seed: deployment.seed,
        backend: match &broker_url {
            Some(broker) => {
                format!("devices {}, {} cloud worker(s) over MQTT {broker}", deployment.backend.kind, clouds.len())
            }
            None => format!("devices {}, cloud over {url}", deployment.backend.kind),
        },
        plugins: plugin_choices(&deployment),
        cloud: cloud_report,
        fleet: FleetSummary::of(&reports),
        devices: reports,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::print_table(&report);
    let out = options.report.clone().unwrap_or_else(|| {
        PathBuf::from("reports")
            .join(format!("{}-fleet.json", path.file_stem().and_then(|s| s.to_str()).unwrap_or("fleet")))
    });
    crate::create_parent(&out)?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}
