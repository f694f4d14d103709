//! TLS to the backends (`[tls]` in `wharf.toml`, `--backend-tls-*`): the CA
//! bundle that signed the servers' certificates and, for mutual TLS, a
//! client certificate and key. The files are read once, as regular files
//! with a bound, and turned into a rustls client configuration that always
//! verifies the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// Largest certificate or key file read.
pub const MAX_TLS_FILE: u64 = 1 << 20;

/// How Wharf's connections to its backends are secured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BackendTls {
    /// PEM bundle of the certificate authorities trusted for the servers.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for servers that require mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl BackendTls {
    /// Whether anything is configured.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Checks the combination: a certificate needs its key, and the other
    /// way round.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("tls: cert and key go together (mutual TLS needs both)".into());
        }
        Ok(())
    }

    /// The rustls client configuration: trusting the `ca` bundle (else the
    /// system's roots are the client library's business, and `None` is
    /// returned), presenting `cert` if set. Every file is read once and
    /// checked, used or not. Blocking: reads the files.
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>> {
        self.config_from(&self.read_pem()?)
    }

    /// The files' PEM text, for client libraries that take PEM rather than
    /// a rustls configuration (Redis, RabbitMQ). Checked exactly as
    /// [`client_config`](BackendTls::client_config) checks them, so a bad
    /// file fails the same way whichever backend reads it. Blocking.
    pub fn pem(&self) -> Result<TlsPem> {
        let pem = self.read_pem()?;
        self.config_from(&pem)?;
        Ok(pem)
    }

    /// Each configured file, read once: regular files (not a device, FIFO
    /// or directory) of at most [`MAX_TLS_FILE`] bytes.
    fn read_pem(&self) -> Result<TlsPem> {
        self.validate().map_err(|why| anyhow!(why))?;
        let ca = self
            .ca
            .as_deref()
            .map(|ca| read(ca, "tls.ca"))
            .transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((read(cert, "tls.cert")?, read(key, "tls.key")?)),
            _ => None,
        };
        Ok(TlsPem { ca, identity })
    }

    /// The rustls configuration `pem` (this configuration's files) makes;
    /// errors name the file at fault.
    fn config_from(&self, pem: &TlsPem) -> Result<Option<rustls::ClientConfig>> {
        let (Some(ca), Some(ca_pem)) = (&self.ca, &pem.ca) else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca_pem, ca, "tls.ca")? {
            roots
                .add(cert)
                .with_context(|| format!("tls.ca {}: not a usable CA certificate", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("tls: the protocol versions")?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key, &pem.identity) {
            (Some(cert), Some(key), Some((cert_pem, key_pem))) => {
                let chain = certificates(cert_pem, cert, "tls.cert")?;
                let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| {
                    anyhow!("tls.key {}: no PEM private key ({err})", key.display())
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .context("tls: the client certificate and key do not match")?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }
}

/// The PEM text of [`BackendTls`]'s files, checked.
pub struct TlsPem {
    /// The CA bundle, if one is configured (else the system's roots).
    pub ca: Option<Vec<u8>>,
    /// The client certificate chain and its private key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Makes ring the process's rustls crypto provider if none is installed:
/// client libraries that build their rustls configuration with the process
/// default (Redis, RabbitMQ) would otherwise fail in a process whose
/// dependencies enable more than one provider.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have installed one meanwhile: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Refuses what would weaken or skip TLS for a backend at `url` whose
/// secure scheme is `secure_scheme`: a URL fragment (Redis reads
/// `#insecure` as "do not verify the certificate"), and a plain-text URL
/// when `[tls]` is set, since the operator asked for encryption.
pub fn check_backend_url(url: &str, secure_scheme: &str, tls: &BackendTls) -> Result<bool> {
    let shown = crate::base::redact::url(url);
    if url.contains('#') {
        bail!(
            "{shown}: a URL fragment (such as #insecure) is not accepted: Wharf always verifies the server's certificate"
        );
    }
    let secure = url
        .get(..secure_scheme.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(secure_scheme));
    if tls.is_set() && !secure {
        bail!(
            "{shown}: [tls] is set, so backends are reached over TLS only; use {secure_scheme}// for this one"
        );
    }
    Ok(secure)
}

/// The file at `path`, a regular file of at most [`MAX_TLS_FILE`] bytes.
fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    crate::base::files::read_bounded(path, MAX_TLS_FILE)
        .map_err(|why| anyhow!("{what} {}: {why}", path.display()))
}

/// Every PEM certificate in `pem`, the file at `path` (at least one).
fn certificates(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow!("{what} {}: {err}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls_are_checked_for_what_would_skip_tls() {
        let none = BackendTls::default();
        let set = BackendTls {
            ca: Some("ca.pem".into()),
            ..BackendTls::default()
        };
        assert!(!check_backend_url("redis://h:1", "rediss:", &none).unwrap());
        assert!(check_backend_url("REDISS://h:1", "rediss:", &none).unwrap());
        assert!(check_backend_url("rediss://h:1", "rediss:", &set).unwrap());
        let plain = check_backend_url("amqp://u:secret@h:1/%2f", "amqps:", &set).unwrap_err();
        assert!(format!("{plain}").contains("use amqps://"), "{plain}");
        assert!(!format!("{plain}").contains("secret"), "{plain}");
        let fragment = check_backend_url("rediss://h:1/#insecure", "rediss:", &none).unwrap_err();
        assert!(
            format!("{fragment}").contains("always verifies"),
            "{fragment}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let only_cert = BackendTls {
            cert: Some("c.pem".into()),
            ..BackendTls::default()
        };
        assert!(only_cert.validate().is_err());
        assert!(BackendTls::default().validate().is_ok());
        assert!(!BackendTls::default().is_set());
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let tls = BackendTls {
            ca: Some(ca),
            ..BackendTls::default()
        };
        let err = format!("{:#}", tls.client_config().unwrap_err());
        assert!(
            err.contains("tls.ca") && err.contains("no PEM certificate"),
            "{err}"
        );
        let missing = BackendTls {
            ca: Some(dir.path().join("missing.pem")),
            ..BackendTls::default()
        };
        assert!(missing.client_config().is_err());
    }
}
