//! TLS through rustls with the `ring` provider: the server's certificate and key from PEM
//! files, the roots a device trusts, mutual TLS, and the device identity a client certificate
//! carries.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls::ServerConfig;

use crate::HttpError;

fn tls_error(path: &Path, message: impl std::fmt::Display) -> HttpError {
    HttpError::Tls(format!("{}: {message}", path.display()))
}

/// The crypto provider every TLS config here uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file, leaf first.
///
/// # Errors
/// [`HttpError::Tls`] naming the file when it cannot be read or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpError> {
    // A kit's file, read bounded and as a regular file before it is parsed.
    let pem = mmpg::files::read_kit_text(path).map_err(|e| tls_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|e| tls_error(ca, e))?;
    }
    Ok(roots)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, HttpError> {
    let pem = mmpg::files::read_kit_text(path).map_err(|e| tls_error(path, e))?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| tls_error(path, e))
}

/// The server's TLS configuration: HTTP/2 and HTTP/1.1 offered over ALPN. With `client_ca`,
/// mutual TLS: a client without a certificate chaining to it is refused at the handshake.
///
/// # Errors
/// [`HttpError::Tls`] naming the file that cannot be read, or a key that does not match.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<rustls::ServerConfig, HttpError> {
    let chain = certificates(cert)?;
    let key = private_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| tls_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| tls_error(cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client TLS configuration trusting exactly the certificates in `ca` (PEM), presenting the
/// certificate chain and key of `identity` (PEM files) when given.
///
/// # Errors
/// [`HttpError::Tls`] naming the file.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig, HttpError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            builder.with_client_auth_cert(certificates(cert)?, private_key(key)?).map_err(|e| tls_error(cert, e))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The device a client certificate (DER) identifies: its `spiffe://mmpg/device/<id>` URI name
/// ([`mmpg::security::identity`]); `None` for a certificate without one.
pub fn device_identity(certificate: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    cert.valid_uri_names().find_map(mmpg::security::identity::device_from_uri)
}
