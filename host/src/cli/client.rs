//! A client of a running host's admin API: what `wharf deploy`, `wharf rm`
//! and `wharf status` use, so a CI pipeline can deploy to a running host
//! with one command.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Where the admin API is when nothing says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9090";

/// A running host's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployOutcome {
    /// The version serves: its generation, digest and route.
    Serving {
        /// The host's generation of the service.
        generation: u64,
        /// The component's digest.
        digest: String,
        /// Where it serves.
        route: String,
    },
    /// The files are in place but the version did not serve within the
    /// host's wait (a newer change may have replaced it).
    Accepted(String),
}

/// One service as `wharf status` shows it.
#[derive(Debug, Clone)]
pub struct ServiceStatus {
    /// The service.
    pub name: String,
    /// Where it serves (`None`: rejected and not serving).
    pub route: Option<String>,
    /// Its generation on the host.
    pub generation: Option<u64>,
    /// Requests per second over the sampling second.
    pub requests_per_second: f64,
    /// Responses with a 5xx status so far.
    pub server_errors: u64,
    /// Requests running now.
    pub in_flight: u64,
    /// The last deploy's result: `ok`, or the rejection's reason.
    pub last_deploy: String,
}

impl AdminClient {
    /// A client of the admin API at `base` (`http://HOST:PORT` or
    /// `https://…`), sending `token` as the bearer token on writes, and
    /// trusting the CA certificates in the PEM file `ca` besides the
    /// public roots.
    pub fn new(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<AdminClient> {
        let base = base.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base)
            .with_context(|| format!("admin URL {base:?} is not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("admin URL {base:?}: expected http://HOST:PORT or https://HOST:PORT");
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            for root in read_ca(ca)? {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(AdminClient { base, token, http })
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Uploads `component` (and `manifest`, if any) as service `name` and
    /// waits for the host's answer. `progress` is called every few seconds
    /// while the host compiles, with the time so far.
    pub async fn deploy(
        &self,
        name: &str,
        component: &Path,
        manifest: Option<&Path>,
        mut progress: impl FnMut(Duration),
    ) -> Result<DeployOutcome> {
        self.check_token().await?;
        let file = tokio::fs::File::open(component)
            .await
            .with_context(|| format!("opening {}", component.display()))?;
        let length = file.metadata().await?.len();
        let mut form = reqwest::multipart::Form::new().part(
            "component",
            reqwest::multipart::Part::stream_with_length(reqwest::Body::from(file), length)
                .file_name(format!("{name}.wasm")),
        );
        if let Some(manifest) = manifest {
            let text = tokio::fs::read_to_string(manifest)
                .await
                .with_context(|| format!("reading {}", manifest.display()))?;
            form = form.part(
                "manifest",
                reqwest::multipart::Part::text(text).file_name(format!("{name}.toml")),
            );
        }
        let request = self
            .authorised(self.http.put(format!("{}/services/{name}", self.base)))
            .multipart(form)
            .send();
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        tokio::pin!(request);
        let response = loop {
            tokio::select! {
                response = &mut request => break response,
                _ = tick.tick() => progress(started.elapsed()),
            }
        }
        .with_context(|| {
            format!(
                "sending the deploy to {} (the host closed the connection while the file was being sent: it may have refused it, e.g. for its size)",
                self.base
            )
        })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        match status.as_u16() {
            200 => {
                let value: Value = serde_json::from_str(&body)
                    .with_context(|| format!("reading the host's answer: {body}"))?;
                Ok(DeployOutcome::Serving {
                    generation: value["generation"].as_u64().unwrap_or_default(),
                    digest: value["digest"].as_str().unwrap_or_default().to_string(),
                    route: value["route"].as_str().unwrap_or_default().to_string(),
                })
            }
            202 => Ok(DeployOutcome::Accepted(body)),
            _ => bail!("{}: {}", status, body.trim()),
        }
    }

    /// Asks whether the host would let a write with this client's token
    /// in, so a refusal arrives with its reason before a file is streamed.
    pub async fn check_token(&self) -> Result<()> {
        let response = self
            .authorised(self.http.get(format!("{}/auth", self.base)))
            .send()
            .await
            .with_context(|| format!("reaching the admin endpoint at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{}: {}", status, body.trim());
        }
        Ok(())
    }

    /// Removes service `name`.
    pub async fn remove(&self, name: &str) -> Result<String> {
        let response = self
            .authorised(self.http.delete(format!("{}/services/{name}", self.base)))
            .send()
            .await
            .with_context(|| format!("sending the removal to {}", self.base))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{}: {}", status, body.trim());
        }
        Ok(body)
    }

    /// `POST /keyvalue/rekey`: the host's report, per bucket.
    pub async fn rekey(&self, buckets: &[String]) -> Result<Value> {
        let query: Vec<(&str, &str)> = buckets.iter().map(|b| ("bucket", b.as_str())).collect();
        let response = self
            .authorised(
                self.http
                    .post(format!("{}/keyvalue/rekey", self.base))
                    .query(&query),
            )
            .send()
            .await
            .with_context(|| format!("reaching the admin endpoint at {}", self.base))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{}: {}", status, body.trim());
        }
        serde_json::from_str(&body).with_context(|| format!("reading the rekey report: {body}"))
    }

    /// `GET /services`.
    pub async fn services(&self) -> Result<Value> {
        let response = self
            .authorised(self.http.get(format!("{}/services", self.base)))
            .send()
            .await
            .with_context(|| format!("asking {} for its services", self.base))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{}: {}", status, body.trim());
        }
        serde_json::from_str(&body).with_context(|| format!("reading the service list: {body}"))
    }

    /// Every service's state, with its request rate sampled over `window`.
    pub async fn status(&self, window: Duration) -> Result<Vec<ServiceStatus>> {
        let first = self.services().await?;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let second = self.services().await?;
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        let totals = |list: &Value, name: &str| {
            services_of(list)
                .iter()
                .find(|s| s["name"] == name)
                .and_then(|s| s["requests"]["total"].as_u64())
        };
        Ok(services_of(&second)
            .iter()
            .map(|service| {
                let name = service["name"].as_str().unwrap_or_default().to_string();
                let now = totals(&second, &name).unwrap_or_default();
                let before = totals(&first, &name).unwrap_or(now);
                ServiceStatus {
                    route: service["route"].as_str().map(str::to_string),
                    generation: service["generation"].as_u64(),
                    requests_per_second: now.saturating_sub(before) as f64 / seconds,
                    server_errors: service["requests"]["server_errors"]
                        .as_u64()
                        .unwrap_or_default(),
                    in_flight: service["requests"]["in_flight"]
                        .as_u64()
                        .unwrap_or_default(),
                    last_deploy: match service["last_error"].as_str() {
                        Some(reason) => format!("rejected: {reason}"),
                        None => "ok".to_string(),
                    },
                    name,
                }
            })
            .collect())
    }
}

fn services_of(list: &Value) -> Vec<Value> {
    list["services"].as_array().cloned().unwrap_or_default()
}

/// `wharf status`'s table.
pub fn render_status(services: &[ServiceStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if services.is_empty() {
        return "no services\n".to_string();
    }
    let name_width = services
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let route_width = services
        .iter()
        .map(|s| s.route.as_deref().unwrap_or("-").len())
        .max()
        .unwrap_or(0)
        .max(5);
    let _ = writeln!(
        out,
        "{:name_width$}  {:route_width$}  {:>4}  {:>8}  {:>6}  {:>9}  LAST DEPLOY",
        "SERVICE", "ROUTE", "GEN", "REQ/S", "5XX", "IN FLIGHT"
    );
    for s in services {
        let _ = writeln!(
            out,
            "{:name_width$}  {:route_width$}  {:>4}  {:>8.1}  {:>6}  {:>9}  {}",
            s.name,
            s.route.as_deref().unwrap_or("-"),
            s.generation.map_or("-".to_string(), |g| g.to_string()),
            s.requests_per_second,
            s.server_errors,
            s.in_flight,
            s.last_deploy
        );
    }
    out
}

/// Where the admin API is and how to authenticate to it.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The host's admin endpoint [default: WHARF_ADMIN_URL, else
    /// http://127.0.0.1:9090].
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// File holding the admin bearer token [default: WHARF_ADMIN_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the admin endpoint's certificate,
    /// trusted besides the public roots [default: WHARF_ADMIN_CA].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// Largest CA file read.
const MAX_CA_FILE: u64 = 1 << 20;

/// The certificates of the PEM file `path` (a regular file of at most
/// 1 MiB), with a clear error if it holds none.
fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !metadata.is_file() || metadata.len() > MAX_CA_FILE {
        bail!(
            "{}: a CA file is a regular PEM file of at most 1 MiB",
            path.display()
        );
    }
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if roots.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(roots)
}

impl AdminArgs {
    /// The client these arguments describe: `--to`, else `WHARF_ADMIN_URL`,
    /// else the default address; `--token-file`, else `WHARF_ADMIN_TOKEN`.
    pub fn client(&self) -> Result<AdminClient> {
        let url = self
            .to
            .clone()
            .or_else(|| std::env::var("WHARF_ADMIN_URL").ok())
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
        let token = match &self.token_file {
            Some(path) => Some(wharf::admin::AdminToken::read_text(path)?),
            None => std::env::var("WHARF_ADMIN_TOKEN")
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        };
        let ca = self
            .ca
            .clone()
            .or_else(|| std::env::var_os("WHARF_ADMIN_CA").map(PathBuf::from));
        AdminClient::new(&url, token, ca.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_checked_once() {
        assert!(AdminClient::new("http://127.0.0.1:9090/", None, None).is_ok());
        assert_eq!(
            AdminClient::new(" https://admin.example:9443/ ", None, None)
                .unwrap()
                .base,
            "https://admin.example:9443"
        );
        for bad in ["127.0.0.1:9090", "ftp://x", "http://"] {
            assert!(AdminClient::new(bad, None, None).is_err(), "{bad}");
        }
    }
}
