//! Where a Kafka cluster is and how Wharf signs in to it: the bootstrap
//! servers of a `kafka://` or `kafkas://` address, TLS, SASL credentials,
//! turned into librdkafka's client configuration.

use std::collections::HashMap;

use anyhow::{Context as _, Result, bail};
use rdkafka::config::ClientConfig;

use crate::capabilities::nats::Replicas;
use crate::capabilities::tls::{BackendTls, check_backend_url};

/// Where a Kafka broker is and how Wharf signs in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// Partitions of each topic Wharf creates.
    pub partitions: u32,
    /// Copies of each topic Wharf creates.
    pub replicas: Replicas,
    /// TLS to the brokers.
    pub tls: BackendTls,
    /// A SASL properties file's text (`sasl.mechanism`, `sasl.username`,
    /// `sasl.password`), for brokers that need one.
    pub credentials: Option<String>,
}

/// The bootstrap servers of `url` (`kafka://a:9092,b:9092`, each entry may
/// repeat the scheme) and whether they are reached over TLS.
pub(super) fn parse_servers(url: &str, tls: &BackendTls) -> Result<(String, bool)> {
    let shown = crate::base::redact::url(url);
    let mut servers = Vec::new();
    let mut secure = None;
    for (index, entry) in url.split(',').enumerate() {
        let entry = entry.trim();
        let (scheme, address) = match entry.split_once("://") {
            Some((scheme, address)) => (Some(scheme.to_ascii_lowercase()), address),
            None if index > 0 => (None, entry),
            None => bail!("{shown}: use kafka://HOST:PORT[,HOST:PORT…] (or kafkas:// for TLS)"),
        };
        let entry_secure = match scheme.as_deref() {
            Some("kafka") => Some(false),
            Some("kafkas") => Some(true),
            Some(other) => {
                bail!("{shown}: {other}:// is not a Kafka scheme (kafka:// or kafkas://)")
            }
            None => None,
        };
        if let Some(entry_secure) = entry_secure {
            if secure.is_some_and(|secure| secure != entry_secure) {
                bail!("{shown}: mixes kafka:// and kafkas://; one cluster is reached one way");
            }
            secure = Some(entry_secure);
        }
        if address.contains(['@', '/', '?', '#']) {
            bail!(
                "{shown}: give only HOST:PORT per server (credentials go in [messaging] credentials, TLS in [tls])"
            );
        }
        let Some((host, port)) = address.rsplit_once(':') else {
            bail!("{shown}: {address:?} has no port (HOST:PORT)");
        };
        if host.is_empty() || port.parse::<u16>().map_or(true, |port| port == 0) {
            bail!("{shown}: {address:?} is not HOST:PORT");
        }
        servers.push(address.to_string());
    }
    let scheme = if secure == Some(true) {
        "kafkas:"
    } else {
        "kafka:"
    };
    let secure = check_backend_url(&format!("{scheme}//"), "kafkas:", tls)?;
    Ok((servers.join(","), secure))
}

/// The SASL settings of a properties file's `text`: only the three keys
/// that sign in are accepted, so the file cannot loosen anything else
/// (certificate checks, say).
pub(super) fn sasl_settings(text: &str) -> Result<Vec<(String, String)>> {
    let mut settings = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("kafka credentials, line {}: expected key=value", number + 1);
        };
        let key = key.trim();
        if !matches!(key, "sasl.mechanism" | "sasl.username" | "sasl.password") {
            bail!(
                "kafka credentials, line {}: {key:?} is not accepted here (only sasl.mechanism, sasl.username, sasl.password)",
                number + 1
            );
        }
        settings.insert(key.to_string(), value.trim().to_string());
    }
    let mechanism = settings
        .get("sasl.mechanism")
        .cloned()
        .unwrap_or_else(|| "SCRAM-SHA-512".to_string());
    if !matches!(
        mechanism.as_str(),
        "SCRAM-SHA-256" | "SCRAM-SHA-512" | "PLAIN"
    ) {
        bail!(
            "kafka credentials: sasl.mechanism {mechanism:?} is not SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN"
        );
    }
    let (Some(username), Some(password)) =
        (settings.get("sasl.username"), settings.get("sasl.password"))
    else {
        bail!("kafka credentials: sasl.username and sasl.password are both needed");
    };
    Ok(vec![
        ("sasl.mechanism".into(), mechanism),
        ("sasl.username".into(), username.clone()),
        ("sasl.password".into(), password.clone()),
    ])
}

/// The client configuration every client of this broker starts from.
pub(super) fn base_config(url: &str, settings: &KafkaSettings) -> Result<ClientConfig> {
    let (servers, secure) = parse_servers(url, &settings.tls)?;
    let sasl = settings
        .credentials
        .as_deref()
        .map(sasl_settings)
        .transpose()?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &servers)
        .set("client.id", "wharf")
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.max.ms", "2000");
    let protocol = match (secure, sasl.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    config.set("security.protocol", protocol);
    if let Some(sasl) = sasl {
        if !secure
            && sasl
                .iter()
                .any(|(k, v)| k == "sasl.mechanism" && v == "PLAIN")
        {
            bail!(
                "kafka credentials: PLAIN sends the password as it is: use kafkas:// (TLS) or SCRAM"
            );
        }
        for (key, value) in sasl {
            config.set(key, value);
        }
    }
    if secure {
        let pem = settings.tls.pem().context("kafka TLS")?;
        config
            .set("ssl.endpoint.identification.algorithm", "https")
            .set("enable.ssl.certificate.verification", "true");
        if let Some(ca) = pem.ca {
            config.set("ssl.ca.pem", String::from_utf8_lossy(&ca).into_owned());
        }
        if let Some((cert, key)) = pem.identity {
            config
                .set(
                    "ssl.certificate.pem",
                    String::from_utf8_lossy(&cert).into_owned(),
                )
                .set("ssl.key.pem", String::from_utf8_lossy(&key).into_owned());
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_take_one_scheme() {
        let none = BackendTls::default();
        assert_eq!(
            parse_servers("kafka://a:9092,b:9093", &none).unwrap(),
            ("a:9092,b:9093".to_string(), false)
        );
        assert_eq!(
            parse_servers("kafkas://a:9092, kafkas://b:9093", &none).unwrap(),
            ("a:9092,b:9093".to_string(), true)
        );
        for bad in [
            "kafka://a",
            "kafka://a:0",
            "kafka://u:p@a:1",
            "kafka://a:1,kafkas://b:2",
            "a:1",
            "nats://a:1",
            "kafka://a:1/x",
        ] {
            assert!(parse_servers(bad, &none).is_err(), "{bad}");
        }
        let tls = BackendTls {
            ca: Some("ca.pem".into()),
            ..BackendTls::default()
        };
        let plain = parse_servers("kafka://a:1", &tls).unwrap_err();
        assert!(plain.to_string().contains("kafkas://"), "{plain}");
    }

    #[test]
    fn credentials_files_only_sign_in() {
        let ok = sasl_settings("# kafka\nsasl.username = app\nsasl.password=s3cret=x\n").unwrap();
        assert!(ok.contains(&("sasl.mechanism".into(), "SCRAM-SHA-512".into())));
        assert!(ok.contains(&("sasl.password".into(), "s3cret=x".into())));
        for bad in [
            "sasl.username=a\n",
            "sasl.username=a\nsasl.password=b\nenable.ssl.certificate.verification=false\n",
            "sasl.mechanism=GSSAPI\nsasl.username=a\nsasl.password=b\n",
            "garbage\n",
        ] {
            assert!(sasl_settings(bad).is_err(), "{bad}");
        }
    }
}
