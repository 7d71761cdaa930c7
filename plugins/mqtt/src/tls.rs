//! TLS to the broker through rustls with the `ring` provider, trusting exactly the deployment's
//! CA (the kit's `ca.pem`). (The HTTP plugin has its own: plugins depend on the framework only.)

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::MqttError;

/// A client configuration trusting the certificates in `ca` (PEM) and nothing else.
///
/// # Errors
/// [`MqttError::Tls`] naming the file when it cannot be read or holds no usable certificate.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    let fail = |m: String| MqttError::Tls(format!("{}: {m}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| fail(e.to_string()))? {
        roots.add(cert.map_err(|e| fail(e.to_string()))?).map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
