//! TLS for the public listener: the certificate chain and private key from
//! PEM files, served with rustls, offering HTTP/2 and HTTP/1.1 by ALPN.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use crate::base::files::read_bounded;

/// Largest certificate or key file read.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// Builds a TLS acceptor from a PEM certificate chain and a PEM private key
/// (regular files of at most `MAX_PEM_FILE` (1 MiB) bytes).
pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor> {
    let pem = read_bounded(cert_path, MAX_PEM_FILE).map_err(anyhow::Error::msg)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", cert_path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_path.display());
    }
    let pem = read_bounded(key_path, MAX_PEM_FILE).map_err(anyhow::Error::msg)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("reading a PEM private key from {}", key_path.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
