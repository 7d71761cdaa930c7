//! The deployment processes over `[transport] plugin = "mqtt"`: how the cloud workers and devices
//! reach the broker (TLS with the kit's CA and each one's password under `[security]`), and the
//! broker's files `mmpg provision` writes.

use std::path::Path;

use anyhow::{Context as _, bail};
use mmpg::Deployment;
use mmpg::security::{DeviceKit, Kit};
use mmpg_mqtt::credentials::{BrokerFiles, CLOUD_USER, read_password, write_broker_files};
use mmpg_mqtt::{BrokerSettings, BrokerUrl, Credentials, MqttSettings};

/// The mqtt transport's settings, when the deployment chose it.
pub fn settings(deployment: &Deployment) -> anyhow::Result<Option<MqttSettings>> {
    if deployment.transport.plugin != mmpg_mqtt::settings::MQTT.name {
        return Ok(None);
    }
    let settings = mmpg::parse_settings(&deployment.transport.settings)
        .map_err(|e| anyhow::anyhow!("{}: transport.settings.{e}", deployment.file()))?;
    Ok(Some(settings))
}

/// Why a plain `mqtt://` broker is refused under `[security]` (`validate` says it too).
pub fn plain_under_security(url: &BrokerUrl) -> String {
    format!("{url}: [security] allows only mqtts:// (TLS); set `insecure = true` to allow plain MQTT")
}

/// The mqtt transport's settings and broker when the deployment chose it (`--broker`, `flag`,
/// overriding its `broker`); `None` over HTTP(S), where `--broker` is an error.
pub fn chosen(deployment: &Deployment, flag: Option<&str>) -> anyhow::Result<Option<(MqttSettings, BrokerUrl)>> {
    match settings(deployment)? {
        Some(settings) => {
            let url = broker(deployment, &settings, flag)?;
            Ok(Some((settings, url)))
        }
        None if flag.is_some() => bail!("--broker: {} does not use the mqtt transport", deployment.file()),
        None => Ok(None),
    }
}

/// The broker: `--broker` when given, else `[transport.settings] broker`. Under `[security]`
/// only `mqtts://` (TLS) is allowed.
fn broker(deployment: &Deployment, settings: &MqttSettings, flag: Option<&str>) -> anyhow::Result<BrokerUrl> {
    let Some(text) = flag.or(settings.broker.as_deref()) else {
        bail!(
            "{}: [transport.settings] broker is not set and no --broker was given (mmpg fleet starts a broker of its \
             own; cloud serve and device need its URL)",
            deployment.file()
        );
    };
    let url = BrokerUrl::parse(text)?;
    if deployment.secured().is_some() && !url.tls {
        bail!("broker {}", plain_under_security(&url));
    }
    Ok(url)
}

/// How a client reaches the broker: the settings' limits, TLS trusting `ca` for `mqtts://`,
/// and `credentials` if given.
fn client(
    settings: &MqttSettings,
    url: &BrokerUrl,
    ca: Option<&Path>,
    credentials: Option<Credentials>,
) -> anyhow::Result<BrokerSettings> {
    let mut client = settings.client(url);
    if url.tls {
        let Some(ca) = ca else {
            bail!("broker {url}: mqtts:// needs a CA to verify the broker with ([security] and `mmpg provision`)");
        };
        client.tls = Some(mmpg_mqtt::tls::client_config(ca)?);
    }
    client.credentials = credentials;
    Ok(client)
}

/// A cloud worker's client: under `[security]` the kit's CA and the cloud's password.
pub fn cloud_client(
    deployment: &Deployment,
    settings: &MqttSettings,
    url: &BrokerUrl,
) -> anyhow::Result<BrokerSettings> {
    let Some(security) = deployment.secured() else { return client(settings, url, None, None) };
    let kit = security.kit();
    let password = read_password(&kit.cloud_broker_password())
        .with_context(|| format!("the cloud's broker password; run `mmpg provision {}`", deployment.file()))?;
    client(settings, url, Some(&kit.ca_cert()), Some(Credentials { username: CLOUD_USER.into(), password }))
}

/// A client of the load's devices: under `[security]` TLS with the kit's CA; each device's
/// password is its own (`mmpg_mqtt::load::LoadSettings::credentials`).
pub fn load_client(
    deployment: &Deployment,
    settings: &MqttSettings,
    url: &BrokerUrl,
) -> anyhow::Result<BrokerSettings> {
    let ca = deployment.secured().map(|security| security.kit().ca_cert());
    client(settings, url, ca.as_deref(), None)
}

/// A device's client: under `[security]` its kit's CA and password; its user name is its id as
/// one topic level.
pub fn device_client(
    deployment: &Deployment,
    settings: &MqttSettings,
    url: &BrokerUrl,
    device: &str,
    kit: Option<&Path>,
) -> anyhow::Result<BrokerSettings> {
    let Some(security) = deployment.secured() else { return client(settings, url, None, None) };
    let dir = DeviceKit::new(&kit.map_or_else(|| security.kit().device_dir(device), Path::to_path_buf));
    let password = read_password(&dir.broker_password()).with_context(|| {
        format!(
            "device `{device}`'s broker password; on the cloud's machine run `mmpg provision {} --device {device}` \
             and copy its devices/<id>/ folder here (or pass --kit <folder>)",
            deployment.file()
        )
    })?;
    let username = mmpg_mqtt::topics::level(&mmpg::DeviceId(device.to_string()));
    client(settings, url, Some(&dir.ca()), Some(Credentials { username, password }))
}

/// Writes the broker's password file and ACL into `kit` for every device it holds a startup kit
/// for, revoked ones left out.
pub fn provision_broker(settings: &MqttSettings, kit: &Kit) -> anyhow::Result<BrokerFiles> {
    let revoked = mmpg::security::revocation::read(&kit.revoked())
        .with_context(|| format!("reading {}", kit.revoked().display()))?;
    let folder = kit.root().join("devices");
    let mut devices = Vec::new();
    for entry in std::fs::read_dir(&folder).with_context(|| format!("listing {}", folder.display()))? {
        let name = entry.with_context(|| format!("listing {}", folder.display()))?.file_name();
        if let Some(device) = name.to_str().and_then(mmpg::security::identity::decode) {
            devices.push(device);
        }
    }
    devices.sort();
    write_broker_files(kit, &settings.topics(), &devices, &revoked)
        .with_context(|| format!("writing the broker's files in {}", kit.broker().display()))
}
