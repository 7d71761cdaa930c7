//! A Mosquitto broker of one's own: a child process on a loopback port with a generated
//! configuration, stopped (SIGKILL, by pid) and reaped when dropped. `mmpg fleet` starts one when
//! `[transport.settings] broker` is absent; the tests start one each.
//!
//! With a kit: a TLS listener with the cloud's certificate (the names `[security]
//! server_names` lists), no anonymous clients, the kit's password file and ACL
//! ([`crate::credentials`]).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::MqttError;
use crate::credentials::BrokerFiles;

/// Where Debian and others install the broker.
const CANDIDATES: [&str; 4] =
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/local/bin/mosquitto"];

/// The `mosquitto` executable: `$MMPG_MOSQUITTO`, else the usual places, else `mosquitto` on
/// `PATH`.
pub fn executable() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MMPG_MOSQUITTO") {
        return Some(PathBuf::from(p));
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("mosquitto")).find(|p| p.exists())
    })
}

/// How to secure a broker: TLS with the kit's server certificate, and the kit's users.
#[derive(Debug, Clone)]
pub struct Secured {
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The password file and ACL.
    pub files: BrokerFiles,
}

/// A running broker, killed and reaped when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts a broker listening on a free port of 127.0.0.1, its configuration and log in `dir`,
    /// and waits (at most 10 s) until it accepts connections.
    ///
    /// # Errors
    /// [`MqttError::Broker`] when Mosquitto is not installed, does not start, or does not listen.
    pub fn start(dir: &Path, secured: Option<&Secured>) -> Result<Self, MqttError> {
        let exe = executable().ok_or_else(|| {
            MqttError::Broker(
                "mosquitto is not installed (Debian: apt-get install mosquitto; or set MMPG_MOSQUITTO), or set \
                 [transport.settings] broker to a running broker"
                    .into(),
            )
        })?;
        let fail = |what: &str, e: std::io::Error| MqttError::Broker(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), e))?;
        // A free port now; a race with another process taking it is reported as not listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| fail("finding a free port", e))?
            .port();
        let config = dir.join("mosquitto.conf");
        std::fs::write(&config, configuration(port, secured)).map_err(|e| fail(&config.display().to_string(), e))?;
        let log = dir.join("mosquitto.log");
        let log_file = std::fs::File::create(&log).map_err(|e| fail(&log.display().to_string(), e))?;
        let child = Command::new(&exe)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| fail(&format!("starting {}", exe.display()), e))?;
        let mut broker = Self { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                return Err(MqttError::Broker(format!("mosquitto exited ({status}); see {}", broker.log.display())));
            }
            if Instant::now() > deadline {
                return Err(MqttError::Broker(format!(
                    "mosquitto did not listen on 127.0.0.1:{port} within 10 s; see {}",
                    broker.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(broker)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process runs as root: Mosquitto started as root drops to the `mosquitto` user
/// unless told otherwise, and could then not read the kit's 0600 files.
fn running_as_root() -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The broker's configuration file.
fn configuration(port: u16, secured: Option<&Secured>) -> String {
    let mut c = format!(
        "# Written by mmpg: a broker of this run's own, on loopback.\n\
         persistence false\n\
         max_connections -1\n\
         max_inflight_messages 0\n\
         max_queued_messages 10000\n\
         max_queued_bytes 67108864\n\
         max_packet_size {max_packet}\n\
         log_type error\nlog_type warning\nlog_type notice\n\
         listener {port} 127.0.0.1\n",
        // One client's bounds at the broker: no packet beyond what mmpg ever sends, and at most
        // 64 MiB queued for a client that does not read.
        max_packet = crate::MAX_PACKET
    );
    if running_as_root() {
        c.push_str("user root\n");
    }
    match secured {
        None => c.push_str("allow_anonymous true\n"),
        Some(s) => {
            c.push_str(&format!(
                "certfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
                s.cert.display(),
                s.key.display(),
                s.files.passwords.display(),
                s.files.acl.display()
            ));
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secured_broker_refuses_anonymous_clients_and_reads_the_kit() {
        let files = BrokerFiles { passwords: "/k/passwd".into(), acl: "/k/acl".into() };
        let secured = Secured { cert: "/k/cert.pem".into(), key: "/k/key.pem".into(), files };
        let c = configuration(1884, Some(&secured));
        for line in ["listener 1884 127.0.0.1", "allow_anonymous false", "password_file /k/passwd", "acl_file /k/acl"] {
            assert!(c.lines().any(|l| l == line), "{line} missing:\n{c}");
        }
        assert!(configuration(7, None).lines().any(|l| l == "allow_anonymous true"));
    }
}
