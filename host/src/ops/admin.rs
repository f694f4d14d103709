//! The admin endpoint (`--admin ADDR`, off by default): health and
//! readiness, Prometheus metrics, the list of services, and deploying or
//! removing services over HTTP — written through the services directory, so
//! the files and the API never disagree. Writes need a bearer token.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /healthz` | `200 ok` while the process runs |
//! | `GET /readyz` | `200` once every service is loaded, `503` while loading or draining |
//! | `GET /metrics` | Prometheus/OpenMetrics text |
//! | `GET /services` | JSON: every service and every rejection |
//! | `PUT /services/NAME` | deploy: body is the component, or multipart `component` + `manifest` |
//! | `DELETE /services/NAME` | remove |
//! | `POST /keyvalue/rekey[?bucket=B…]` | seal every value again with the current key (`wharf rekey`) |

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::capabilities::messaging::{DeadLetterQuery, MAX_DEAD_LETTER_PAGE};
use crate::deploy::source::files::MAX_TOML_FILE;
use crate::deploy::source::upload::{AsyncStaging, InstallError, Upload, UploadOutcome};
use crate::deploy::spec::MAX_COMPONENT_FILE;
use crate::deploy::validate_name;
use crate::host::Host;
use crate::ops::guard::Credentials;

/// How long a PUT waits for its version to be serving.
const DEPLOY_WAIT: Duration = Duration::from_secs(60);

/// Largest admin token file read.
pub const MAX_TOKEN_FILE: u64 = 4 << 10;

pub use crate::ops::guard::{AdminGuard, AdminToken};

impl AdminToken {
    /// Reads a token from a file (its whole content, trimmed; a regular
    /// file of at most [`MAX_TOKEN_FILE`] bytes).
    pub fn from_file(path: &std::path::Path) -> Result<AdminToken> {
        let text = AdminToken::read_text(path)?;
        AdminToken::new(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The token text in a file, trimmed, read the way
    /// [`AdminToken::from_file`] reads it: for a client sending it.
    pub fn read_text(path: &std::path::Path) -> Result<String> {
        let text = crate::base::files::read_bounded_text(path, MAX_TOKEN_FILE)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("reading the admin token in {}", path.display()))?;
        Ok(text.trim().to_string())
    }
}

type AdminResponse = http::Response<Full<Bytes>>;

fn text(status: StatusCode, message: &str) -> AdminResponse {
    let mut response = http::Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &Value) -> AdminResponse {
    let mut response = http::Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves, with
/// `token` (none: writes disabled) and no host names beyond IP literals and
/// `localhost` (see [`serve_guarded`]).
pub async fn serve(
    host: Host,
    listener: TcpListener,
    token: Option<AdminToken>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_guarded(host, listener, AdminGuard::new(token, &[]), shutdown).await
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves, every
/// request passing `guard` (host names, token, failure budget) first.
pub async fn serve_guarded(
    host: Host,
    listener: TcpListener,
    guard: AdminGuard,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_admin(host, listener, guard, None, shutdown).await
}

/// [`serve_guarded`] over TLS only: the token and the dashboard never
/// travel in the clear. A plain HTTP request is answered `400` naming the
/// `https://` address, and the connection closed.
pub async fn serve_guarded_tls(
    host: Host,
    listener: TcpListener,
    guard: AdminGuard,
    tls: TlsAcceptor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_admin(host, listener, guard, Some(tls), shutdown).await
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn serve_admin(
    host: Host,
    listener: TcpListener,
    guard: AdminGuard,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let client_timeout = host.config().client_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::error!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (host, guard) = (host.clone(), guard.clone());
        let service = service_fn(move |request: http::Request<Incoming>| {
            let (host, guard) = (host.clone(), guard.clone());
            let caller = Caller {
                guard,
                peer: peer.ip(),
            };
            async move { Ok::<_, std::convert::Infallible>(route(&host, &caller, request).await) }
        });
        let Some(tls) = tls.clone() else {
            let connection = graceful.watch(
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned(),
            );
            tokio::spawn(async move {
                let _ = connection.await;
            });
            continue;
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // Bounded like a stalled request: a silent client costs a task
            // for the client timeout at most.
            let mut first = [0u8; 1];
            match tokio::time::timeout(client_timeout, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
                Ok(Ok(1)) => return refuse_plain_http(stream).await,
                _ => return,
            }
            match tokio::time::timeout(client_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let connection = watcher.watch(
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned(),
                    );
                    let _ = connection.await;
                }
                Ok(Err(err)) => {
                    tracing::debug!(peer = %peer, error = %err, "admin TLS handshake failed")
                }
                Err(_) => tracing::debug!(peer = %peer, "admin TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {},
        () = tokio::time::sleep(Duration::from_secs(5)) => {},
    }
    Ok(())
}

/// Answers a plain HTTP request on the TLS-only admin address with `400`
/// and the address to use, then closes, without acting on it. (A token it
/// carried has crossed the wire already: the client's mistake, which the
/// answer names.)
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // The request head first: closing on unread bytes would reset the
    // connection before the client reads the answer.
    let mut head = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut head)).await;
    let address = stream
        .local_addr()
        .map(|address| format!("https://{address}"))
        .unwrap_or_else(|_| "https://".to_string());
    let body = format!("this admin endpoint speaks HTTPS only: use {address}\n");
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Who sent a request: the gate to check it against and its address.
struct Caller {
    guard: AdminGuard,
    peer: std::net::IpAddr,
}

impl Caller {
    /// The request's credentials (a wrong token counts against the address).
    fn credentials<B>(&self, request: &http::Request<B>) -> Credentials {
        self.guard.check(
            request.headers().get(http::header::AUTHORIZATION),
            self.peer,
        )
    }

    /// The answer refusing a write (or a token check) that `request` may
    /// not make: writes disabled without a token, a missing or wrong bearer
    /// token, or too many failures. `None`: it may.
    fn refuse_write<B>(&self, request: &http::Request<B>) -> Option<AdminResponse> {
        match self.credentials(request) {
            Credentials::Valid => None,
            Credentials::NoTokenConfigured => Some(text(
                StatusCode::FORBIDDEN,
                "admin writes are disabled: start wharf with --admin-token-file or WHARF_ADMIN_TOKEN",
            )),
            Credentials::Refused => Some(unauthorized()),
            Credentials::Blocked(wait) => Some(blocked(wait)),
        }
    }

    /// The answer refusing a read of what guests printed or sent when a
    /// token is configured and `request` lacks it. `None`: it may.
    fn refuse_private_read<B>(&self, request: &http::Request<B>) -> Option<AdminResponse> {
        match self.credentials(request) {
            Credentials::Valid | Credentials::NoTokenConfigured => None,
            Credentials::Refused => Some(unauthorized()),
            Credentials::Blocked(wait) => Some(blocked(wait)),
        }
    }
}

/// 401 with how to pass the token.
fn unauthorized() -> AdminResponse {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token: send \"Authorization: Bearer TOKEN\" (wharf deploy/rm/status read it from --token-file or WHARF_ADMIN_TOKEN)",
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    response
}

/// 429: this address failed too often.
fn blocked(wait: Duration) -> AdminResponse {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = text(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many failed authentications from this address; try again in {seconds}s"),
    );
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

async fn route(host: &Host, caller: &Caller, request: http::Request<Incoming>) -> AdminResponse {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .map(|v| v.to_str().unwrap_or("\u{0}").to_string())
        });
    if !caller.guard.allows_host(authority.as_deref()) {
        tracing::warn!(client = %caller.peer, host = ?authority, "admin request refused: unknown Host");
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin endpoint answers to IP addresses, localhost and the names given with --admin-host; add this name there to reach it by it",
        );
    }
    let path = request.uri().path().to_string();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/") => {
            let mut response = http::Response::new(Full::new(Bytes::from_static(
                crate::ops::dashboard::PAGE.as_bytes(),
            )));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/dashboard/state") => {
            // Log lines may carry what guests print: with a token
            // configured, they need it (the rest is what /services shows).
            let logs = caller.refuse_private_read(&request).is_none();
            let since = request.uri().query().and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("since="))
                    .and_then(|n| n.parse::<u64>().ok())
            });
            json_response(
                StatusCode::OK,
                &crate::ops::dashboard::state(host, logs, since).await,
            )
        }
        (&Method::GET, "/readyz") => {
            // Backends are reported, not gating: a host whose Redis is down
            // still serves every service that does not use it.
            let backends: String = host
                .backend_statuses()
                .iter()
                .map(|(capability, status)| {
                    format!(
                        "\n{capability} backend {}: {}",
                        status.kind,
                        if status.up { "up" } else { "down" }
                    )
                })
                .collect();
            if host.is_ready() {
                text(StatusCode::OK, &format!("ready{backends}"))
            } else if host.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down")
            } else if host.cluster().is_some_and(|c| !c.has_joined()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catching up with the cluster's services",
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "loading services")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut response = http::Response::new(Full::new(Bytes::from(host.metrics_text())));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (&Method::GET, "/services") => json_response(StatusCode::OK, &services_json(host)),
        (&Method::GET, "/cluster") => match host.cluster() {
            None => text(
                StatusCode::NOT_FOUND,
                "this host is not in a cluster (start it with --cluster)",
            ),
            Some(cluster) => match cluster.view().await {
                Ok(view) => match serde_json::to_value(&view) {
                    Ok(mut value) => {
                        value["caught_up"] = json!(cluster.is_caught_up());
                        json_response(StatusCode::OK, &value)
                    }
                    Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
                },
                Err(err) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot read the cluster from NATS: {err:#}"),
                ),
            },
        },
        (&Method::GET, "/auth") => {
            // Whether a write with this request's token would be let in:
            // `wharf deploy` asks before streaming a large file, since a
            // refusal sent while the file is still being sent reaches the
            // client as a broken pipe instead of its reason.
            match caller.refuse_write(&request) {
                Some(refusal) => refusal,
                None => text(StatusCode::OK, "token accepted"),
            }
        }
        (&Method::POST, "/keyvalue/rekey") => {
            if let Some(refusal) = caller.refuse_write(&request) {
                return refusal;
            }
            match rekey_buckets(request.uri().query()) {
                Ok(buckets) => rekey(host, &buckets).await,
                Err(why) => text(StatusCode::BAD_REQUEST, &why),
            }
        }
        (&Method::DELETE, _) if path.starts_with("/messages/groups/") => {
            if let Some(refusal) = caller.refuse_write(&request) {
                return refusal;
            }
            delete_group(host, &path["/messages/groups/".len()..]).await
        }
        (&Method::GET, _) if path.starts_with("/messages/dead/") => {
            // Dead letters carry message bodies: with a token configured,
            // reading them needs it like a write does.
            if let Some(refusal) = caller.refuse_private_read(&request) {
                return refusal;
            }
            let group = &path["/messages/dead/".len()..];
            match DeadLetterParams::parse(request.uri().query()) {
                Ok(params) => dead_letters(host, group, params).await,
                Err(why) => text(StatusCode::BAD_REQUEST, &why),
            }
        }
        (method, _) if path.starts_with("/services/") => {
            let name = path["/services/".len()..].to_string();
            if *method != Method::PUT && *method != Method::DELETE {
                return text(StatusCode::METHOD_NOT_ALLOWED, "use PUT or DELETE");
            }
            if let Some(refusal) = caller.refuse_write(&request) {
                return refusal;
            }
            if let Err(reason) = validate_name(&name) {
                return text(StatusCode::BAD_REQUEST, &reason);
            }
            if *method == Method::PUT {
                put_service(host, &name, request).await
            } else {
                delete_service(host, &name).await
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "no such admin route; see / (the dashboard) /healthz /readyz /metrics /services /cluster /messages/dead/GROUP",
        ),
    }
}

/// Forgets a consumer group on the broker, unless a deployed service's
/// trigger still uses it.
async fn delete_group(host: &Host, group: &str) -> AdminResponse {
    if let Err(reason) = crate::deploy::triggers::validate_group(group) {
        return text(StatusCode::BAD_REQUEST, &reason);
    }
    let Some(messaging) = host.messaging() else {
        return text(StatusCode::NOT_FOUND, "this host has no messaging");
    };
    let users: Vec<String> = host
        .services()
        .services()
        .filter(|d| {
            d.config()
                .triggers
                .messages
                .iter()
                .any(|t| t.group() == group)
        })
        .map(|d| d.name().to_string())
        .collect();
    if !users.is_empty() {
        return text(
            StatusCode::CONFLICT,
            &format!(
                "group {group} is in use by {}: remove its trigger first",
                users.join(", ")
            ),
        );
    }
    match messaging.broker().delete_group(group).await {
        Ok(existed) => {
            tracing::info!(group = %group, existed, "message group deleted through the admin API");
            json_response(
                StatusCode::OK,
                &json!({ "group": group, "deleted": existed }),
            )
        }
        Err(err) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot delete the group: {err}"),
        ),
    }
}

/// Body bytes a dead letter shows unless `bodies=full` is asked.
pub const DEAD_LETTER_PREVIEW: usize = 1024;
/// Most letters one read returns with whole bodies.
pub const MAX_FULL_BODY_PAGE: usize = 10;

/// What `GET /messages/dead/GROUP` asks: `?limit=N` (1-100, default 20),
/// `?after=POSITION` (a previous page's `next`), `?bodies=full` (whole
/// bodies, at most 10 letters; otherwise the first 1 KiB of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeadLetterParams {
    limit: usize,
    after: Option<u64>,
    full_bodies: bool,
}

impl DeadLetterParams {
    fn parse(query: Option<&str>) -> Result<DeadLetterParams, String> {
        let mut params = DeadLetterParams {
            limit: 20,
            after: None,
            full_bodies: false,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    params.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_DEAD_LETTER_PAGE).contains(n))
                        .ok_or_else(|| {
                            format!("limit={value:?}: give a whole number from 1 to {MAX_DEAD_LETTER_PAGE}")
                        })?;
                }
                "after" => {
                    params.after = Some(value.parse::<u64>().map_err(|_| {
                        format!("after={value:?}: give the position a previous page named as next")
                    })?);
                }
                "bodies" if value == "full" => params.full_bodies = true,
                "bodies" if value == "preview" => params.full_bodies = false,
                other => {
                    return Err(format!(
                        "{other:?} is not a parameter here: use limit, after and bodies=full"
                    ));
                }
            }
        }
        if params.full_bodies {
            params.limit = params.limit.min(MAX_FULL_BODY_PAGE);
        }
        Ok(params)
    }
}

/// The buckets `?bucket=A&bucket=B` names (none: every bucket a service
/// names).
fn rekey_buckets(query: Option<&str>) -> Result<Vec<String>, String> {
    let mut buckets = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("bucket", name)) => {
                crate::capabilities::keyvalue::validate_bucket_name(name)
                    .map_err(|why| format!("bucket={name:?}: {why}"))?;
                buckets.push(name.to_string());
            }
            _ => return Err(format!("{pair:?} is not a parameter here: use bucket=NAME")),
        }
    }
    Ok(buckets)
}

/// Seals the values of `buckets` again with the current key; JSON: each
/// bucket's counts, and the services whose `"*"` grant may reach buckets
/// no manifest names (name those with `?bucket=`).
async fn rekey(host: &Host, buckets: &[String]) -> AdminResponse {
    let any_bucket: Vec<String> = host
        .services()
        .services()
        .filter(|d| d.config().keyvalue.entries().iter().any(|b| b == "*"))
        .map(|d| d.name().to_string())
        .collect();
    match host.rekey(buckets).await {
        Ok(reports) => {
            let buckets: Vec<Value> = reports
                .iter()
                .map(|(bucket, report)| {
                    let mut value = json!(report);
                    value["bucket"] = json!(bucket);
                    value
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "buckets": buckets, "any_bucket_services": any_bucket }),
            )
        }
        Err(err) => text(StatusCode::CONFLICT, &format!("{err:#}")),
    }
}

/// A page of one group's dead letters, oldest first, as JSON: bodies cut
/// to a preview unless asked, the group's count, and where the next page
/// starts.
async fn dead_letters(host: &Host, group: &str, params: DeadLetterParams) -> AdminResponse {
    if let Err(reason) = crate::deploy::triggers::validate_group(group) {
        return text(StatusCode::BAD_REQUEST, &reason);
    }
    let Some(messaging) = host.messaging() else {
        return text(StatusCode::NOT_FOUND, "this host has no messaging");
    };
    let query = DeadLetterQuery {
        after: params.after,
        limit: params.limit,
        body_limit: if params.full_bodies {
            crate::capabilities::messaging::MAX_MESSAGE_SIZE
        } else {
            DEAD_LETTER_PREVIEW
        },
    };
    let broker = messaging.broker();
    let read = broker.dead_letters(group, query).await;
    let count = broker.count_dead_letters(group).await.ok();
    match read {
        Ok(letters) => {
            let next = (letters.len() == params.limit)
                .then(|| letters.last().map(|letter| letter.position))
                .flatten();
            let letters: Vec<Value> = letters
                .iter()
                .map(|letter| {
                    let body = &letter.message.body;
                    json!({
                        "id": letter.message.id,
                        "position": letter.position,
                        "topic": letter.message.topic,
                        "attempts": letter.attempts,
                        "reason": letter.reason,
                        "dead_at": humantime::format_rfc3339_millis(letter.dead_at).to_string(),
                        "published_at": humantime::format_rfc3339_millis(letter.message.published_at).to_string(),
                        "content_type": letter.message.content_type,
                        "metadata": letter.message.metadata,
                        "body": String::from_utf8_lossy(body),
                        "body_utf8": std::str::from_utf8(body).is_ok(),
                        "body_size": letter.body_size,
                        "body_truncated": (body.len() as u64) < letter.body_size,
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "group": group, "count": count, "dead_letters": letters, "next": next }),
            )
        }
        Err(err) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot read the dead letters: {err}"),
        ),
    }
}

fn services_json(host: &Host) -> Value {
    let snapshot = host.services();
    let rejections = host.rejections();
    let mut services: Vec<Value> = snapshot
        .services()
        .map(|d| {
            let limits = d.limits();
            let answered = d.metrics().answered();
            json!({
                "name": d.name(),
                "route": d.route().as_str(),
                "generation": d.generation(),
                "digest": d.digest(),
                "wasi_http": d.guest().exports().http_export,
                "source": d.source().map(|p| p.display().to_string()),
                "loaded_at": humantime::format_rfc3339_seconds(d.loaded_at()).to_string(),
                "limits": {
                    "timeout_ms": limits.timeout.as_millis() as u64,
                    "memory_bytes": limits.memory,
                    "concurrency": limits.concurrency,
                    "body_bytes": limits.body,
                    "cpu_ms": limits.cpu.as_millis() as u64,
                },
                "instance": {
                    "reuse": d.config().reuse,
                    "concurrent": d.config().concurrent,
                    "reusing": d.reuses_instances(),
                    "warm": d.warm_instances(),
                },
                "outbound": d.config().outbound.rules().iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                "keyvalue": { "buckets": d.config().keyvalue.entries() },
                "config": d.config().config.plain(),
                "secrets": d.config().config.secret_names(),
                "messaging": {
                    "publish": d.config().messaging.entries(),
                    "subscribe": d.config().messaging.subscriptions(),
                },
                "triggers": {
                    "messages": d.config().triggers.messages.iter().map(|t| json!({
                        "topic": t.topic.to_string(),
                        "group": t.group(),
                        "path": t.path,
                        "max_attempts": t.max_attempts,
                        "concurrency": t.concurrency,
                    })).collect::<Vec<_>>(),
                    "schedules": d.config().triggers.schedules.iter().map(|t| json!({
                        "when": t.when.to_string(),
                        "path": t.path,
                    })).collect::<Vec<_>>(),
                },
                "requests": {
                    "total": answered.0,
                    "server_errors": answered.1,
                    "in_flight": d.metrics().running(),
                },
                "compile_ms": d.compile_info().duration.as_secs_f64() * 1000.0,
                "cache_hit": d.compile_info().cache_hit,
                "memory_init": d.compile_info().memory_init.as_str(),
                "tier": d.tier().as_str(),
                "optimised_at": d.compile_info().optimised_at
                    .map(|at| humantime::format_rfc3339_millis(at).to_string()),
                "last_error": rejections.get(d.name()).map(|r| r.reason.clone()),
            })
        })
        .collect();
    for (name, rejection) in &rejections {
        if snapshot.service(name).is_none() {
            services.push(json!({
                "name": name,
                "route": null,
                "generation": null,
                "last_error": rejection.reason,
            }));
        }
    }
    let backends: Vec<Value> = host
        .backend_statuses()
        .into_iter()
        .map(|(capability, status)| {
            json!({
                "capability": capability,
                "backend": status.kind,
                "up": status.up,
                "detail": status.detail,
            })
        })
        .collect();
    json!({ "ready": host.is_ready(), "services": services, "backends": backends })
}

/// Why an upload could not be received.
struct UploadError {
    status: StatusCode,
    reason: String,
}

impl UploadError {
    fn bad_request(reason: impl Into<String>) -> UploadError {
        UploadError {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }

    /// A failure to store what was received: over a limit (413) or the
    /// disk refusing it (500).
    fn storing(err: anyhow::Error) -> UploadError {
        let reason = format!("{err:#}");
        let status = if reason.contains("larger than the limit") {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        UploadError {
            status,
            reason: format!("cannot store the upload: {reason}"),
        }
    }
}

/// Streams `body`'s data into `staging`.
async fn stream_into<B>(mut body: B, staging: &mut AsyncStaging) -> Result<(), UploadError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|err| UploadError::bad_request(format!("reading the body: {err}")))?;
        if let Ok(data) = frame.into_data() {
            staging.write(&data).await.map_err(UploadError::storing)?;
        }
    }
    Ok(())
}

/// Receives a PUT: the body is the component, or `multipart/form-data` with
/// `component` and `manifest` parts. Each is streamed to disk as it
/// arrives, its size limit enforced on the way; nothing is held in memory.
async fn receive_upload(
    dir: &std::path::Path,
    name: &str,
    request: http::Request<Incoming>,
) -> Result<Upload, UploadError> {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let staging = |what| AsyncStaging::create(dir, name, what, limit_of(what));
    if !content_type.starts_with("multipart/form-data") {
        let mut component = staging("component").await.map_err(UploadError::storing)?;
        stream_into(request.into_body(), &mut component).await?;
        let component = component.finish().await.map_err(UploadError::storing)?;
        return Ok(Upload {
            component,
            manifest: None,
        });
    }
    let boundary = multer::parse_boundary(&content_type)
        .map_err(|err| UploadError::bad_request(format!("bad multipart content type: {err}")))?;
    let stream = http_body_util::BodyDataStream::new(request.into_body());
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut component, mut manifest) = (None, None);
    let multipart_error =
        |err: multer::Error| UploadError::bad_request(format!("reading the multipart body: {err}"));
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let what = match field.name() {
            Some("component") => "component",
            Some("manifest") => "manifest",
            other => {
                return Err(UploadError::bad_request(format!(
                    "unexpected multipart field {other:?}; use component and manifest"
                )));
            }
        };
        let mut file = staging(what).await.map_err(UploadError::storing)?;
        let mut text = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            file.write(&chunk).await.map_err(UploadError::storing)?;
            if what == "manifest" {
                text.extend_from_slice(&chunk);
            }
        }
        let file = file.finish().await.map_err(UploadError::storing)?;
        if what == "component" {
            component = Some(file);
        } else {
            let text = String::from_utf8(text)
                .map_err(|_| UploadError::bad_request("the manifest is not UTF-8 text"))?;
            manifest = Some((file, text));
        }
    }
    let component = component
        .ok_or_else(|| UploadError::bad_request("the multipart body has no component field"))?;
    Ok(Upload {
        component,
        manifest,
    })
}

/// The size limit of an uploaded part.
fn limit_of(what: &str) -> u64 {
    if what == "manifest" {
        MAX_TOML_FILE
    } else {
        MAX_COMPONENT_FILE
    }
}

/// Receives the upload into temporary files, then has the host validate
/// it (compile and probe it) and only then put both files in place at once
/// and deploy them. Whatever fails, the previous version's files and
/// deployment stay as they were.
async fn put_service(host: &Host, name: &str, request: http::Request<Incoming>) -> AdminResponse {
    let Some(dir) = host.services_dir() else {
        return text(
            StatusCode::CONFLICT,
            "this host has no services directory to deploy into",
        );
    };
    let upload = match receive_upload(&dir, name, request).await {
        Ok(upload) => upload,
        Err(err) => {
            tracing::warn!(service = %name, reason = %err.reason, "admin upload refused; nothing was changed");
            return text(err.status, &err.reason);
        }
    };
    match host.deploy_upload(name, upload, DEPLOY_WAIT).await {
        Ok(UploadOutcome::Serving {
            generation,
            digest,
            route,
        }) => json_response(
            StatusCode::OK,
            &json!({
                "name": name,
                "generation": generation,
                "digest": digest,
                "route": route,
            }),
        ),
        Ok(UploadOutcome::Pending) => text(
            StatusCode::ACCEPTED,
            "written to the services directory; not serving yet (a newer change may have replaced it)",
        ),
        Err(InstallError::Rejected(reason)) => text(StatusCode::UNPROCESSABLE_ENTITY, &reason),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}

async fn delete_service(host: &Host, name: &str) -> AdminResponse {
    if host.services_dir().is_none() {
        return text(StatusCode::CONFLICT, "this host has no services directory");
    }
    match host.remove_service(name).await {
        Ok(true) => text(StatusCode::OK, &format!("service {name} removed")),
        Ok(false) => text(StatusCode::NOT_FOUND, &format!("no service named {name}")),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_dead_letter_reads_are_bounded() {
        let params = |query| DeadLetterParams::parse(Some(query));
        assert!(params("limit=100000").unwrap_err().contains("1 to 100"));
        assert_eq!(params("limit=100").unwrap().limit, 100);
        // Whole bodies: ten letters at most.
        let full = params("limit=100&bodies=full").unwrap();
        assert_eq!((full.limit, full.full_bodies), (MAX_FULL_BODY_PAGE, true));
        assert_eq!(params("after=7").unwrap().after, Some(7));
        assert!(params("after=-1").is_err());
        assert!(params("limt=5").is_err());
        let default = DeadLetterParams::parse(None).unwrap();
        assert_eq!(
            (default.limit, default.after, default.full_bodies),
            (20, None, false)
        );
    }
}
