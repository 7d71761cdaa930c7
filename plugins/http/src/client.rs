//! A device's end over HTTP(S), through reqwest: the adaptation exchange, the cloud's info and
//! its device bundle.

use std::collections::BTreeMap;
use std::time::Duration;

use mmpg::bundle::{Bundle, BundleError, FILES, SIGNATURE};
use mmpg::config::ClientTrust;
use mmpg::deploy::CloudInfo;
use mmpg::security::CloudKey;
use mmpg::transport::{DeviceLink, TransportError};

use crate::HttpError;
use crate::server::OCTET_STREAM;

/// Largest reply body a device reads, in bytes: the wire's payload limit plus its header.
const MAX_REPLY: u64 = mmpg::wire::MAX_PAYLOAD as u64 + 1024;

/// A device's connection to the cloud at one URL (keep-alive, HTTP/2 over TLS when offered).
#[derive(Debug, Clone)]
pub struct CloudClient {
    base: String,
    client: reqwest::blocking::Client,
}

/// The TLS error behind `e`, if the failure was the handshake's: reqwest wraps rustls's error in
/// hyper's and an `io::Error`.
fn tls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut source = Some(e);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        source = cause.source();
    }
    None
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> TransportError {
    let chain = error_chain(e);
    if let Some(tls) = tls_cause(e) {
        TransportError::Tls(tls.to_string())
    } else if TLS_REFUSALS.iter().any(|m| chain.contains(m)) {
        // A handshake refused by either side, reached through a cause chain whose layers do
        // not expose rustls's error type: it will not pass on a retry either.
        TransportError::Tls(chain)
    } else if e.is_timeout() {
        TransportError::Timeout(timeout)
    } else if e.is_connect() {
        TransportError::Unreachable(format!("the cloud: {chain}"))
    } else {
        TransportError::Closed(chain)
    }
}

/// How rustls words a handshake that failed for a reason a retry does not change (its `Display`
/// of `Error::InvalidCertificate`, `Error::AlertReceived`, `Error::NoCertificatesPresented`).
const TLS_REFUSALS: [&str; 3] = ["invalid peer certificate", "received fatal alert", "peer sent no certificates"];

/// The error with its causes: reqwest's own message is often just "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl CloudClient {
    /// A client of the cloud at `url` (`http://…` or `https://…`); over HTTPS it trusts the
    /// certificates in the PEM file `trust.ca` only, and presents `trust.identity` (mutual TLS)
    /// when given.
    ///
    /// # Errors
    /// [`HttpError::Tls`] naming an unreadable or invalid file; [`HttpError::Client`].
    pub fn new(url: &str, trust: &ClientTrust) -> Result<Self, HttpError> {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => return Err(HttpError::Client(format!("`{url}` is not an http:// or https:// URL with a host"))),
            Err(e) => return Err(HttpError::Client(format!("`{url}` is not a URL: {e}"))),
        }
        let mut builder = reqwest::blocking::Client::builder()
            // The device talks to the cloud it was configured with, whatever the peer answers: a
            // redirect (to another host, or from https:// to http://) is an error, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            // Below the server's idle limit (its request timeout, 10 s by default, and at least
            // 2 s): a kept connection is dropped here before the server closes it under a request.
            .pool_idle_timeout(Duration::from_millis(900))
            .user_agent(concat!("mmpg-device/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &trust.ca {
            // Trusting a CA means TLS, on every request this client makes.
            builder = builder.https_only(true);
            let identity = trust.identity.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
            builder = builder.use_preconfigured_tls(crate::tls::client_config(ca, identity)?);
        }
        let client = builder.build().map_err(|e| HttpError::Client(error_chain(&e)))?;
        Ok(Self { base: url.trim_end_matches('/').to_string(), client })
    }

    /// The cloud's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str, timeout: Duration, limit: u64) -> Result<Vec<u8>, TransportError> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .timeout(timeout)
            .send()
            .map_err(|e| transport_error(&e, timeout))?;
        read_body(response, timeout, limit)
    }

    /// `GET /v1/hello`: the cloud's versions and what it serves.
    ///
    /// # Errors
    /// The transport's, and [`TransportError::Wire`]-like content errors as `Closed`.
    pub fn hello(&self, timeout: Duration) -> Result<CloudInfo, TransportError> {
        let body = self.get("/v1/hello", timeout, 1 << 20)?;
        serde_json::from_slice(&body).map_err(|e| TransportError::Protocol(format!("/v1/hello is not cloud info: {e}")))
    }

    /// `GET /v1/bundle` and its files, verified against the manifest; with the cloud's `key`,
    /// the manifest's signature (`GET /v1/bundle/manifest.sig`) is checked before it is read.
    ///
    /// # Errors
    /// [`HttpError::Transport`] while fetching, [`HttpError::Bundle`] when the signature does not
    /// verify or the files do not match the manifest.
    pub fn bundle(&self, timeout: Duration, key: Option<&CloudKey>) -> Result<Bundle, HttpError> {
        let manifest = self.get("/v1/bundle", timeout, mmpg::bundle::MAX_MANIFEST as u64)?;
        let signature = match key {
            Some(_) => match self.get(&format!("/v1/bundle/{SIGNATURE}"), timeout, 1024) {
                Ok(sig) => Some(sig),
                Err(TransportError::Status { status: 404, .. }) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        // The manifest's signature (when required) and format are checked before any file is fetched.
        Bundle::check_manifest(&manifest, signature.as_deref(), key)?;
        let mut files = BTreeMap::new();
        for name in FILES {
            files.insert(name.to_string(), self.get(&format!("/v1/bundle/{name}"), timeout, MAX_REPLY)?);
        }
        Ok(Bundle::from_parts(&manifest, signature.as_deref(), key, files)?)
    }

    /// `GET /metrics`: the server's Prometheus exposition.
    ///
    /// # Errors
    /// The transport's.
    pub fn metrics(&self, timeout: Duration) -> Result<String, TransportError> {
        let body = self.get("/metrics", timeout, 16 << 20)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// A response's body, refused above `limit` bytes; a failure status without an envelope is an
/// error carrying the status and the body's first line.
fn read_body(response: reqwest::blocking::Response, timeout: Duration, limit: u64) -> Result<Vec<u8>, TransportError> {
    use std::io::Read as _;
    let status = response.status();
    let envelope = response.headers().get(reqwest::header::CONTENT_TYPE).is_some_and(|v| v == OCTET_STREAM);
    if let Some(size) = response.content_length().filter(|s| *s > limit) {
        return Err(TransportError::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit: limit as usize,
        });
    }
    let mut body = Vec::new();
    response.take(limit + 1).read_to_end(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::TimedOut => TransportError::Timeout(timeout),
        _ => TransportError::Closed(error_chain(&e)),
    })?;
    if body.len() as u64 > limit {
        return Err(TransportError::TooLarge { size: body.len(), limit: limit as usize });
    }
    if status.is_success() || (status.is_client_error() && envelope) {
        return Ok(body);
    }
    let text = String::from_utf8_lossy(&body);
    let message = text.lines().next().unwrap_or("").chars().take(200).collect::<String>();
    Err(TransportError::Status { status: status.as_u16(), message })
}

impl DeviceLink for CloudClient {
    fn exchange(&mut self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let response = self
            .client
            .post(format!("{}/v1/adapt", self.base))
            .header(reqwest::header::CONTENT_TYPE, OCTET_STREAM)
            .timeout(timeout)
            .body(request)
            .send()
            .map_err(|e| transport_error(&e, timeout))?;
        read_body(response, timeout, MAX_REPLY)
    }
}

impl From<TransportError> for HttpError {
    fn from(e: TransportError) -> Self {
        HttpError::Transport(e)
    }
}

impl From<BundleError> for HttpError {
    fn from(e: BundleError) -> Self {
        HttpError::Bundle(e)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Issue 28: a device talks only to the cloud it was configured with. A peer answering with a
    /// redirect elsewhere gets an error, and the other address is never contacted.
    #[test]
    fn a_redirect_is_an_error_not_followed() {
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        elsewhere.set_nonblocking(true).expect("non-blocking");
        let target = elsewhere.local_addr().expect("address");
        let cloud = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let url = format!("http://{}", cloud.local_addr().expect("address"));
        let server = std::thread::spawn(move || {
            let (mut stream, _) = cloud.accept().expect("a connection");
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let reply = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{target}/v1/adapt\r\ncontent-length: 0\r\n\r\n"
            );
            stream.write_all(reply.as_bytes()).expect("answers");
        });
        let mut client = CloudClient::new(&url, &ClientTrust::default()).expect("client");
        let answer = client.exchange(vec![1, 2, 3], Duration::from_secs(10));
        assert!(matches!(answer, Err(TransportError::Status { status: 307, .. })), "{answer:?}");
        server.join().expect("server thread");
        assert!(elsewhere.accept().is_err(), "the redirect's target was contacted");
    }
}
