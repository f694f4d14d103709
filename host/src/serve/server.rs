//! The HTTP front door: where connections come from (a listener, or another
//! thread's acceptor handing them over), per-connection HTTP/1.1 and HTTP/2
//! with hyper, the idle timeout of a connection with no request open, the
//! checks a request must pass before it is routed, and graceful shutdown
//! that drains in-flight requests within a deadline.
//!
//! The shape is mini-redis's: the accept loop and the connection task are
//! separate; shutdown is a watch channel every connection listens to, and
//! the drain waits for the connection tasks (in a `JoinSet`) to finish,
//! aborting the ones left when the drain timeout passes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming as IncomingBody;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::base::respond::{self, Body};
use crate::serve::dispatch::Dispatcher;
use crate::serve::stall::StallTimeout;

/// A connection accepted on one thread for another to serve.
pub(crate) type Handoff = (std::net::TcpStream, SocketAddr);

/// Where a server loop's connections come from.
pub(crate) enum Incoming {
    /// Accepted from this listener by the loop itself.
    Listener(TcpListener),
    /// Accepted by another thread and handed over; the channel closing means
    /// no more will come.
    Handoff(mpsc::UnboundedReceiver<Handoff>),
}

impl Incoming {
    /// The next connection; `None` when no more will come.
    async fn next(&mut self) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
        match self {
            Incoming::Listener(listener) => Some(listener.accept().await),
            Incoming::Handoff(receiver) => {
                let (stream, peer) = receiver.recv().await?;
                Some(TcpStream::from_std(stream).map(|stream| (stream, peer)))
            }
        }
    }
}

/// What every connection of a server loop shares.
#[derive(Clone)]
struct Settings {
    dispatcher: Arc<Dispatcher>,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    client_timeout: Duration,
}

/// Serves `dispatcher`'s services on the connections from `incoming` until
/// `shutdown` resolves (or no more connections can come), then drains.
/// `client_timeout` bounds how long a client may stall (headers, idling with
/// no request open, not reading a response); `drain_timeout` bounds the drain.
pub(crate) async fn run(
    dispatcher: Arc<Dispatcher>,
    mut incoming: Incoming,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
    client_timeout: Duration,
    drain_timeout: Duration,
) -> Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds how long an idle keep-alive connection waits for its
        // next request: the timer starts when hyper waits for a head.
        .header_read_timeout(client_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(client_timeout)
        .keep_alive_timeout(client_timeout);
    let settings = Settings {
        dispatcher: dispatcher.clone(),
        tls,
        builder,
        client_timeout,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let next = tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            next = incoming.next() => next,
        };
        let (stream, peer) = match next {
            None => break,
            Some(Ok(accepted)) => accepted,
            Some(Err(err)) => {
                // Usually out of file descriptors: back off instead of
                // spinning, and keep serving the connections we have.
                tracing::error!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            settings.clone(),
            stop_rx.clone(),
        ));
    }

    drop(incoming);
    dispatcher.set_draining();
    tracing::info!(
        open_connections = connections.len(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!(
                open_connections = connections.len(),
                "drain timeout of {} passed; closing the remaining connections",
                humantime::format_duration(drain_timeout)
            );
            connections.shutdown().await;
        }
    }
    Ok(())
}

/// Serves one connection: the TLS handshake (bounded like a stalled
/// client), then HTTP until the client is done, the connection has had no
/// request open for the client timeout, or shutdown asks it to finish.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Settings,
    stop: watch::Receiver<bool>,
) {
    // Small responses should leave at once, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let _counted = settings.dispatcher.metrics().connection();
    let stream = StallTimeout::new(stream, settings.client_timeout);
    match settings.tls.clone() {
        None => serve_http(stream, peer, Scheme::Http, settings, stop).await,
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(settings.client_timeout, acceptor.accept(stream)).await;
            match handshake {
                Ok(Ok(stream)) => serve_http(stream, peer, Scheme::Https, settings, stop).await,
                Ok(Err(err)) => {
                    tracing::debug!(peer = %peer, error = %err, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    scheme: Scheme,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = {
        let dispatcher = settings.dispatcher.clone();
        let activity = activity.clone();
        service_fn(move |request: http::Request<IncomingBody>| {
            let dispatcher = dispatcher.clone();
            let scheme = scheme.clone();
            let open = activity.open();
            async move {
                let response = match host_header_error(&request) {
                    Some(response) => response,
                    None => {
                        let request = request.map(|body| body.map_err(Into::into).boxed_unsync());
                        dispatcher.dispatch(request, scheme).await
                    }
                };
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| OpenBody { body, _open: open }),
                )
            }
        })
    };
    let connection = settings
        .builder
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        let idle_check = tokio::time::sleep_until(activity.idle_deadline(settings.client_timeout));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !closing => {
                // A closed channel means the server loop is gone: stop too.
                let _ = changed;
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_check, if !closing => {
                if activity.is_idle(settings.client_timeout) {
                    // Nothing open for the whole client timeout (an HTTP/2
                    // client answering pings but sending nothing): close.
                    tracing::debug!(peer = %peer, "closing an idle connection");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request that
/// lacks a `Host` header or carries more than one.
fn host_header_error(request: &http::Request<IncomingBody>) -> Option<http::Response<Body>> {
    if request.version() != http::Version::HTTP_11 {
        return None;
    }
    match request.headers().get_all(http::header::HOST).iter().count() {
        1 => None,
        0 => Some(respond::text(
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request needs a Host header",
        )),
        _ => Some(respond::text(
            StatusCode::BAD_REQUEST,
            "a request may carry only one Host header",
        )),
    }
}

/// What a connection is doing: requests open (from their head until their
/// response body is done) and when that number last changed, for the idle
/// timeout.
struct Activity {
    started: Instant,
    open: AtomicUsize,
    /// Milliseconds after `started` of the last change to `open`.
    last_change_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            open: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_change_ms.store(now, Ordering::Relaxed);
    }

    /// Counts a request open until the guard is dropped.
    fn open(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.touch();
        OpenRequest(self.clone())
    }

    /// When the number of open requests last changed.
    fn last_change(&self) -> Instant {
        self.started + Duration::from_millis(self.last_change_ms.load(Ordering::Relaxed))
    }

    /// When the connection would have been idle for `timeout` if nothing
    /// happens meanwhile.
    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        (self.last_change() + timeout).into()
    }

    /// Whether no request is open and none has been for `timeout`.
    fn is_idle(&self, timeout: Duration) -> bool {
        self.open.load(Ordering::Relaxed) == 0 && Instant::now() >= self.last_change() + timeout
    }
}

/// Keeps a request counted as open.
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request counted as open until it is done
/// (or dropped).
struct OpenBody {
    body: Body,
    /// Dropped with the body: the request is no longer open.
    _open: OpenRequest,
}

impl HttpBody for OpenBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Binds the listening socket for `addr`. Not `SO_REUSEPORT`: another
/// process asking for the same port gets "Address already in use", as with
/// any server, instead of silently taking part of the traffic.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating a socket")?;
    // Lets a restarted host bind while old connections sit in TIME_WAIT; on
    // Linux it never lets two sockets listen on one port.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts on `listener` and hands the connections to `threads` in turn, so
/// each server thread gets an even share and a connection never leaves the
/// thread it was handed to. Ends when `stop` turns true (dropping the
/// senders, which tells the threads no more connections come).
pub(crate) async fn distribute(
    listener: TcpListener,
    threads: Vec<mpsc::UnboundedSender<Handoff>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::error!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(peer = %peer, error = %err, "cannot hand a connection over");
                continue;
            }
        };
        if threads.is_empty() {
            return;
        }
        // A thread that has stopped drops what it is handed.
        let _ = threads[next % threads.len()].send((stream, peer));
        next = next.wrapping_add(1);
    }
}

/// Server threads, each running its own single-threaded runtime; the first
/// also accepts, and hands connections to every thread in turn (see
/// [`distribute`]).
pub(crate) struct ServerThreads {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl ServerThreads {
    /// Starts `count` threads (at least one) serving what `listener`
    /// accepts.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        count: usize,
        dispatcher: &Arc<Dispatcher>,
        tls: Option<TlsAcceptor>,
        client_timeout: Duration,
        drain_timeout: Duration,
    ) -> Result<ServerThreads> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..count.max(1))
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let mut listener = Some((listener, senders));
        let mut threads = Vec::with_capacity(receivers.len());
        for (index, receiver) in receivers.into_iter().enumerate() {
            let dispatcher = dispatcher.clone();
            let tls = tls.clone();
            let mut stop = stop_rx.clone();
            // The first thread also runs the acceptor.
            let acceptor = listener.take();
            let thread = std::thread::Builder::new()
                .name(format!("wharf-server-{index}"))
                .spawn(move || -> Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a server thread's runtime")?;
                    runtime.block_on(async move {
                        if let Some((listener, senders)) = acceptor {
                            let listener = TcpListener::from_std(listener)?;
                            tokio::spawn(distribute(listener, senders, stop.clone()));
                        }
                        let shutdown = async move {
                            let _ = stop.wait_for(|stop| *stop).await;
                        };
                        run(
                            dispatcher,
                            Incoming::Handoff(receiver),
                            tls,
                            shutdown,
                            client_timeout,
                            drain_timeout,
                        )
                        .await
                    })
                })
                .context("starting a server thread")?;
            threads.push(thread);
        }
        Ok(ServerThreads {
            stop: stop_tx,
            threads,
        })
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// timeout), and waits for every thread.
    pub(crate) async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let threads = self.threads;
        let results = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a server thread panicked")))
                })
                .collect::<Vec<_>>()
        })
        .await
        .context("joining the server threads")?;
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_idle_only_with_nothing_open_for_the_timeout() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_millis(20);
        assert!(!activity.is_idle(timeout));
        let open = activity.open();
        std::thread::sleep(timeout * 2);
        assert!(!activity.is_idle(timeout), "a request is open");
        drop(open);
        assert!(!activity.is_idle(timeout), "it just closed");
        std::thread::sleep(timeout * 2);
        assert!(activity.is_idle(timeout));
    }

    #[test]
    fn a_second_listener_on_the_same_port_is_refused() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind(addr).unwrap_err();
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
    }
}
