//! The HTTP front door: the accept loop, per-connection HTTP/1.1 and HTTP/2
//! serving with hyper, and graceful shutdown that drains in-flight requests
//! within a deadline.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::serve::dispatch::Dispatcher;
use crate::serve::stall::StallTimeout;

/// Serves `dispatcher`'s services on `listener` until `shutdown` resolves,
/// then drains.
/// `client_timeout` bounds how long a client may stall (headers, idle
/// keep-alive, unread response); `drain_timeout` bounds the drain.
pub(crate) async fn run(
    dispatcher: Arc<Dispatcher>,
    listener: TcpListener,
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
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, and keep serving the connections we have.
                    tracing::error!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small responses should leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let scheme = if tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        };
        let dispatcher = dispatcher.clone();
        let counted = dispatcher.metrics().connection();
        let service = service_fn(move |request: http::Request<Incoming>| {
            let dispatcher = dispatcher.clone();
            let scheme = scheme.clone();
            async move {
                let request = request.map(|body| body.map_err(Into::into).boxed_unsync());
                Ok::<_, std::convert::Infallible>(dispatcher.dispatch(request, scheme).await)
            }
        });
        let stream = StallTimeout::new(stream, client_timeout);
        match &tls {
            None => {
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _counted = counted;
                    if let Err(err) = connection.await {
                        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                // The handshake runs in the connection's task, bounded like a
                // stalled client, so a slow handshake never blocks accepting.
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _counted = counted;
                    let handshake =
                        tokio::time::timeout(client_timeout, acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(peer = %peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(err) = watcher.watch(connection.into_owned()).await {
                        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
                    }
                });
            }
        }
    }

    drop(listener);
    dispatcher.set_draining();
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        "shutting down: draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(drain_timeout) => tracing::warn!(
            "drain timeout of {} passed; closing the remaining connections",
            humantime::format_duration(drain_timeout)
        ),
    }
    Ok(())
}

/// Opens `threads` listening sockets on `addr`, all bound to the same port
/// with `SO_REUSEPORT` so the kernel spreads connections across them. With
/// port 0 the first socket picks the port and the others share it.
pub(crate) fn reuseport_listeners(
    addr: std::net::SocketAddr,
    threads: usize,
) -> Result<Vec<std::net::TcpListener>> {
    use anyhow::Context as _;
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .context("creating a socket")?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("cannot listen on {addr}"))?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}
