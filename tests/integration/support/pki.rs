//! A private PKI made by the test (`rcgen`): a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate, and an unrelated CA, as
//! PEM files in a temporary directory.

use std::path::PathBuf;

use tempfile::TempDir;

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a second, unrelated CA. Each certificate has a name of its
/// own: OpenSSL (Redis, RabbitMQ's Erlang) takes a certificate whose
/// subject equals its issuer for self-signed, and rcgen's default subject
/// is the same for all.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new().expect("temp dir");
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write a PEM file")
        };
        let named = |sans: Vec<String>, name: &str| {
            let mut params = rcgen::CertificateParams::new(sans).expect("params");
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params
        };
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params = named(Vec::new(), "Wharf test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("the CA");
        write("ca.pem", ca.pem());
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        for (name, names) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["wharf".to_string()]),
        ] {
            let key = rcgen::KeyPair::generate().expect("a key");
            let cert = named(names, &format!("wharf test {name}"))
                .signed_by(&key, &issuer)
                .expect("a certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        let other_key = rcgen::KeyPair::generate().expect("a key");
        let mut other = named(Vec::new(), "Unrelated test CA");
        other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        write(
            "other-ca.pem",
            other.self_signed(&other_key).expect("a CA").pem(),
        );
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}
