//! # mmpg-http — cloud and devices as separate processes over HTTP(S)
//!
//! - [`CloudServer`]: the cloud as a service on tokio (axum routes served by hyper, HTTP/1.1 and
//!   HTTP/2, TLS through rustls with the `ring` provider). `POST /v1/adapt` takes a summary
//!   envelope and answers a params (200) or error (422) envelope; `GET /v1/hello`,
//!   `GET /v1/bundle[/<file>]`, `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus).
//!   Requests reach the cloud node through an [`HttpEndpoint`], the cloud's
//!   [`CloudEndpoint`](mmpg::CloudEndpoint); the node's loop micro-batches them.
//! - [`CloudClient`]: a device's [`DeviceLink`](mmpg::DeviceLink) to it (reqwest), and the
//!   fetch of its info and bundle.

pub mod client;
pub mod load;
pub mod metrics;
pub mod server;
pub mod tls;

pub use client::CloudClient;
pub use metrics::Metrics;
pub use server::{CloudServer, HttpEndpoint, Limits, Published, ServerSettings};

/// Why the HTTP layer failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound.
    #[error("cannot listen on {address}: {error}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// Cause.
        error: String,
    },
    /// A certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The async runtime could not start.
    #[error("runtime: {0}")]
    Runtime(String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
    /// An exchange with the cloud failed.
    #[error(transparent)]
    Transport(mmpg::TransportError),
    /// The cloud speaks another wire version.
    #[error("the cloud speaks wire version {cloud}, this build speaks {ours}")]
    Version {
        /// The cloud's.
        cloud: u8,
        /// This build's.
        ours: u8,
    },
    /// The cloud's bundle was refused.
    #[error("bundle: {0}")]
    Bundle(mmpg::bundle::BundleError),
}
