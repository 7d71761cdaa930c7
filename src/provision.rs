//! `mmpg provision`: a deployment's keys and certificates, and revocation.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use mmpg::Registry;
use mmpg::config::SecurityConfig;
use mmpg::runtime::RunError;
use mmpg::security::{Kit, provision, revoke};

/// What `mmpg provision` was asked.
#[derive(Debug)]
pub struct ProvisionOptions {
    /// The kit's folder (default: `[security] dir`).
    pub out: Option<PathBuf>,
    /// Also issue certificates for `mmpg load`'s devices `load-00000`… (this many).
    pub load: usize,
    /// Revoke this device instead of provisioning.
    pub revoke: Option<String>,
    /// Devices to issue certificates for besides the deployment's.
    pub devices: Vec<String>,
}

/// Provisions (or revokes in) the deployment at `path`'s kit.
pub fn run(path: &Path, options: &ProvisionOptions, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let security = deployment.security.clone().unwrap_or_default();
    let kit = Kit::new(options.out.as_deref().unwrap_or(&security.dir));
    if let Some(device) = &options.revoke {
        let newly = revoke(&kit, device)?;
        let already = if newly { "" } else { " (it already was)" };
        println!(
            "revoked {device}{already}: {} lists it; a running cloud refuses it from its next request",
            kit.revoked().display()
        );
        if let Some(mqtt) = crate::mqtt::settings(&deployment)? {
            let files = crate::mqtt::provision_broker(&mqtt, &kit)?;
            println!(
                "the broker's password file {} no longer lists it: reload the broker (Mosquitto: kill -HUP <pid>) \
                 and it refuses the device's next connection",
                files.passwords.display()
            );
        }
        return Ok(());
    }
    if deployment.security.is_none() {
        eprintln!("note: {} has no [security] table; the cloud uses this kit once it has one", deployment.file());
    }
    let mut devices: Vec<String> = deployment.device_domains().into_iter().map(|(_, d)| d.name).collect();
    devices.extend((0..options.load).map(mmpg::load::load_device));
    devices.extend(options.devices.iter().cloned());
    let done = provision(&kit, &security.server_names, &devices)
        .with_context(|| format!("provisioning {}", kit.root().display()))?;
    print!("{}", summary(&kit, &security, &done));
    if let Some(mqtt) = crate::mqtt::settings(&deployment)? {
        let files = crate::mqtt::provision_broker(&mqtt, &kit)?;
        println!(
            "broker (mqtt): password file {} and ACL {} (each device publishes only its own summary topic and reads \
             only its own params topic); devices/<id>/broker-password is each device's; a running broker reads new \
             devices once reloaded (Mosquitto: kill -HUP <pid>)",
            files.passwords.display(),
            files.acl.display()
        );
    }
    Ok(())
}

/// For `mmpg fleet`, the one-command demo on loopback: provisions what the deployment's kit
/// lacks (nothing is re-keyed), and says so when it made anything.
pub fn complete_kit(deployment: &mmpg::Deployment) -> anyhow::Result<()> {
    let Some(security) = deployment.secured() else { return Ok(()) };
    let kit = security.kit();
    let devices: Vec<String> = deployment.device_domains().into_iter().map(|(_, domain)| domain.name).collect();
    let done = provision(&kit, &security.server_names, &devices)
        .with_context(|| format!("provisioning {}", kit.root().display()))?;
    if let Some(mqtt) = crate::mqtt::settings(deployment)? {
        crate::mqtt::provision_broker(&mqtt, &kit)?;
    }
    if done.new_ca || done.new_server_cert || done.new_signing_key || !done.created.is_empty() {
        eprintln!("mmpg fleet: provisioned what the kit lacked:");
        eprint!("{}", summary(&kit, security, &done));
    }
    Ok(())
}

fn summary(kit: &Kit, security: &SecurityConfig, done: &mmpg::security::Provisioned) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let state = |new: bool| if new { "created" } else { "kept" };
    let _ = writeln!(out, "kit: {}", kit.root().display());
    let _ = writeln!(out, "  CA                 {} ({})", kit.ca_cert().display(), state(done.new_ca));
    let _ = writeln!(
        out,
        "  cloud certificate  {} ({}; {})",
        kit.server_cert().display(),
        if done.new_server_cert { "issued" } else { "kept" },
        security.server_names.join(", ")
    );
    let _ = writeln!(
        out,
        "  signing key        {} ({}; public: {})",
        kit.signing_key().display(),
        state(done.new_signing_key),
        kit.signing_public().display()
    );
    let _ = writeln!(
        out,
        "  devices            {} issued, {} kept, under {}",
        done.created.len(),
        done.kept.len(),
        kit.root().join("devices").display()
    );
    let revoked = match mmpg::security::revocation::read(&kit.revoked()) {
        Ok(revoked) => revoked,
        Err(e) => {
            let _ = writeln!(out, "  revoked            CANNOT BE READ: {e}");
            Default::default()
        }
    };
    if !revoked.is_empty() {
        let _ = writeln!(
            out,
            "  revoked            {} device{} in {} (delete a line to reinstate a device)",
            revoked.len(),
            if revoked.len() == 1 { "" } else { "s" },
            kit.revoked().display()
        );
    }
    let _ = writeln!(out, "  audit log          {}", kit.audit().display());
    let _ = writeln!(out, "private keys are mode 0600; copy devices/<id>/ to each device as its startup kit");
    out
}
