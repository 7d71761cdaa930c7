//! Real processes on loopback for the deployment tests: `mmpg` children killed (by pid) when
//! dropped, a small deployment that trains in seconds, and bounded waits on a device's log.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid fits"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal sent");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "process {} did not exit within {limit:?}", self.0.id());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

pub fn mmpg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmpg"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A small deployment whose cloud trains in seconds, with its checkpoint and device state in
/// `dir` and the cloud on `port`.
pub fn deployment(dir: &Path, port: u16, fleet_extra: &str, extra: &str) -> PathBuf {
    let d = dir.display();
    let text = format!(
        r#"
seed = 5
[cloud]
checkpoint = "{d}/checkpoint"
[cloud.training]
pretrain_steps = 15
generator_steps = 4
source_domains = 16
[fleet]
window_clips = 16
eval_clips = 160
request_timeout_ms = 1500
max_attempts = 2
state = "{d}/state"
shifts = [{{ kind = "contrast", severity = 4 }}, {{ kind = "brightness", severity = 4 }}]
{fleet_extra}
[serve]
listen = "127.0.0.1:{port}"
{extra}
"#
    );
    let path = dir.join("deployment.toml");
    std::fs::write(&path, text).expect("deployment written");
    path
}

/// Starts `mmpg cloud serve` and waits (bounded) until it serves; its stderr goes to
/// `dir/cloud-<n>.log`.
pub fn cloud(deployment: &Path, dir: &Path, n: usize) -> Proc {
    cloud_with(deployment, dir, n, &[])
}

/// `mmpg cloud serve` with `extra` arguments, its stderr in `dir/cloud-<n>.log`; returns once it
/// says it serves.
pub fn cloud_with(deployment: &Path, dir: &Path, n: usize, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("cloud-{n}.log"))).expect("log");
    let mut child = mmpg()
        .args(["cloud", "serve"])
        .args(extra)
        .arg(deployment)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("cloud started");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("mmpg cloud: serving") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(300)).expect("the cloud serves within 300 s");
    proc
}

pub fn device(deployment: &Path, id: &str, rounds: u64, extra: &[&str]) -> Proc {
    Proc(
        mmpg()
            .args(["device", "--id", id, "--rounds", &rounds.to_string()])
            .args(extra)
            .arg(deployment)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("device started"),
    )
}

pub fn events(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(state.join("log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn count(state: &Path, event: &str) -> usize {
    events(state).iter().filter(|e| e["event"] == event).count()
}

/// Waits (bounded) until `state`'s log satisfies `done`.
pub fn wait_for(state: &Path, what: &str, done: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(&events(state)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log: {:#?}", events(state));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain-HTTP stand-in for the cloud on `listener`, until the test ends: `POST /v1/adapt`'s body
/// goes to `answer`, whose (status, body) is sent back as an envelope; anything else is 404.
pub fn fake_cloud(listener: TcpListener, answer: impl Fn(Vec<u8>) -> (u16, Vec<u8>) + Send + Sync + 'static) {
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let (status, payload) =
                    if head.starts_with("POST /v1/adapt") { answer(body) } else { (404, b"no\n".to_vec()) };
                let header = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    payload.len()
                );
                let _ = stream.write_all(header.as_bytes());
                let _ = stream.write_all(&payload);
            });
        }
    });
}
