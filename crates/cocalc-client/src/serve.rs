//! [`serve`]: the HTTP/1.1 accept loop shared by the host's data plane and
//! the proxy's ingress.
//!
//! It differs from `axum::serve` in what relays need: every connection is
//! served by hyper's HTTP/1.1 server straight on its `TcpStream` (no
//! protocol sniffing wrapper), so an upgraded connection can be taken
//! back as the socket and relayed with `splice(2)`
//! ([`relay_upgraded`](crate::relay::relay_upgraded)). It also sets
//! `TCP_NODELAY` and keepalive ([`liveness`](crate::liveness): a client
//! that vanished is noticed within minutes even on an idle WebSocket),
//! bounds how long a client may take to send a request head, and on
//! shutdown lets requests in flight finish while idle
//! keep-alive connections close.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Where a server's connections come from: a bound [`TcpListener`], or a
/// listener that does something with each connection before giving it
/// out (the proxy's PROXY-protocol listener reads a load balancer's header
/// off it and gives the client's address as the peer). [`serve`],
/// [`serve_lean`], [`accept_loop`] and [`crate::tls::serve_tls`] take
/// any.
pub trait Accept: Send {
    /// The next connection and its peer's address. Errors are those of
    /// [`TcpListener::accept`]: [`accept_loop`] skips per-connection ones
    /// and pauses on others.
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(tokio::net::TcpStream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(tokio::net::TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// How long a client may take to send a whole request head before the
/// connection is closed (slow-header clients would otherwise hold
/// connections open forever).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections on `listener` and serves each with the service
/// `make(peer address)` returns, HTTP/1.1 with upgrades, until `shutdown`
/// completes. Then it stops accepting, asks every connection to close
/// once its request in flight is answered, and returns when all have.
/// Upgraded connections (WebSockets) are detached from their HTTP
/// connection and are not waited for.
///
/// Accept errors never end the loop: a refused or reset connection is
/// skipped, and running out of file descriptors pauses accepting for a
/// moment.
pub async fn serve<F, S, B>(
    listener: impl Accept,
    make: F,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    accept_loop(listener, shutdown, move |tcp, peer, mut stop| {
        serve_connection(tcp, make(peer), async move {
            let _ = stop.changed().await;
        })
    })
    .await
}

/// Like [`serve`], with each connection served by
/// [`lean::serve_connection`](crate::lean::serve_connection): plain
/// requests by the [`LeanService`](crate::lean::LeanService) `make(peer
/// address)` returns first, everything else by hyper with the fallback
/// service returned beside it. Shutdown, accept errors and the head
/// timeout are as in [`serve`].
pub async fn serve_lean<F, L, S, B>(
    listener: impl Accept,
    make: F,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    F: Fn(SocketAddr) -> (L, S),
    L: crate::lean::LeanService + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    accept_loop(listener, shutdown, move |tcp, peer, mut stop| {
        let (lean, fallback) = make(peer);
        crate::lean::serve_connection(tcp, lean, fallback, async move {
            let _ = stop.changed().await;
        })
    })
    .await
}

/// The accept loop of [`serve`] and [`serve_lean`], for servers that do
/// something else with each connection (a TLS handshake first): each
/// accepted socket is handed, untouched, to `conn(socket, peer, stop)`,
/// whose future runs in a task of its own; `stop` changes when `shutdown`
/// completes. Then it stops accepting and returns once every
/// connection's future has. Accept errors are handled as in [`serve`].
pub async fn accept_loop<C, Fut>(
    mut listener: impl Accept,
    shutdown: impl Future<Output = ()>,
    conn: C,
) -> std::io::Result<()>
where
    C: Fn(tokio::net::TcpStream, SocketAddr, tokio::sync::watch::Receiver<()>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    // Each connection task holds a sender; all dropped = all done.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting connections failed; pausing for 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let served = conn(tcp, peer, stop_rx.clone());
        let done = done_tx.clone();
        tokio::spawn(async move {
            served.await;
            drop(done);
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(done_tx);
    let _ = done_rx.recv().await;
    Ok(())
}

/// Serves one accepted (or dialled) TCP connection as [`serve`] does: sets
/// `TCP_NODELAY` and keepalive ([`liveness::tune`](crate::liveness::tune)),
/// serves HTTP/1.1 with upgrades and the head timeout, and
/// when `stop` completes closes the connection once its request in flight
/// is answered. Returns when the connection has ended; errors of the
/// connection (a client that went away) are not reported.
pub async fn serve_connection<S, B>(
    tcp: tokio::net::TcpStream,
    service: S,
    stop: impl Future<Output = ()>,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let _ = crate::liveness::tune(&tcp);
    serve_io(tcp, service, stop).await
}

/// Serves HTTP/1.1 (with upgrades and the head timeout) on any
/// connection — the lean server's hand-off, a TLS stream — until it ends;
/// when `stop` completes, the connection closes once its request in
/// flight is answered. [`serve_connection`] is this on a `TcpStream`,
/// tuned first.
pub async fn serve_io<I, S, B>(io: I, service: S, stop: impl Future<Output = ()>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The TCP socket under a connection upgraded by a server from this
/// module ([`serve`], [`serve_lean`]), with the bytes read from it that
/// nobody used yet (they come before anything still in the socket); the
/// connection back if it is something else (a tunnel stream, a test's
/// in-memory pipe).
pub fn into_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(tokio::net::TcpStream, bytes::Bytes), hyper::upgrade::Upgraded> {
    use crate::lean::Prefixed;
    let upgraded = match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
        Ok(p) => return Ok((p.io.into_inner(), p.read_buf)),
        Err(u) => u,
    };
    let p = upgraded.downcast::<TokioIo<Prefixed<tokio::net::TcpStream>>>()?;
    let (prefix, tcp) = p.io.into_inner().into_parts();
    if prefix.is_empty() {
        return Ok((tcp, p.read_buf));
    }
    let mut early = bytes::BytesMut::with_capacity(p.read_buf.len() + prefix.len());
    early.extend_from_slice(&p.read_buf);
    early.extend_from_slice(&prefix);
    Ok((tcp, early.freeze()))
}

/// The open-files limit a server starts with, and what
/// [`raise_open_files_limit`] made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Raises this process's soft limit on open files to its hard limit (at
/// most the kernel's `fs.nr_open`), as Go's runtime does for every
/// program since Go 1.19: systemd starts services with a soft limit of
/// 1,024 and a hard one of 524,288 (`DefaultLimitNOFILE=`,
/// systemd-system.conf(5)), and a relay needs several descriptors
/// per connection — a spliced WebSocket holds two sockets and two pipes
/// (six descriptors) in each process it crosses. Daemons call it once at
/// start. Never lowers the limit; fails only if the kernel refuses.
///
/// Logs (`tracing`) a limit it raised, a warning when the limit stays
/// below [`LOW_OPEN_FILES`] (raise `LimitNOFILE=` in the service's unit,
/// or `ulimit -Hn`), and a failure.
pub fn raise_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    let r = set_open_files_limit();
    match &r {
        Ok(l) if l.now < LOW_OPEN_FILES => tracing::warn!(
            limit = l.now,
            "the open files limit is low: each relayed connection takes several \
             descriptors; raise the hard limit (LimitNOFILE= in a systemd unit)"
        ),
        Ok(l) if l.now > l.before => {
            tracing::info!(from = l.before, to = l.now, "raised the open files limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    r
}

/// Below this many open files [`raise_open_files_limit`] warns: about
/// 680 spliced WebSockets' worth (six descriptors each).
pub const LOW_OPEN_FILES: u64 = 4096;

#[cfg(target_os = "linux")]
fn set_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFilesLimit { before: soft, now })
}

/// Elsewhere: unknown, left as it is.
#[cfg(not(target_os = "linux"))]
fn set_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    Ok(OpenFilesLimit {
        before: u64::MAX,
        now: u64::MAX,
    })
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes: the
/// text `render` returns at each scrape, as OpenMetrics
/// ([`cocalc_core::counters::CONTENT_TYPE`]); any other path is a 404.
/// The daemons put it on an address of its own, off the public network.
pub async fn serve_metrics(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let render = std::sync::Arc::new(render);
    serve(
        listener,
        move |_| {
            let render = render.clone();
            hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let resp = if req.uri().path() == "/metrics" {
                    http::Response::builder()
                        .header(
                            http::header::CONTENT_TYPE,
                            cocalc_core::counters::CONTENT_TYPE,
                        )
                        .body(render())
                } else {
                    http::Response::builder()
                        .status(404)
                        .body("metrics are at /metrics\n".to_string())
                };
                std::future::ready(resp)
            })
        },
        shutdown,
    )
    .await
}

/// Errors that concern one connection only, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_until_shutdown_then_waits_for_requests_in_flight() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let hello = |peer: SocketAddr| {
            hyper::service::service_fn(move |r: http::Request<Incoming>| {
                let text = format!("{} from {peer}", r.uri());
                std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(text)))
            })
        };
        let server = tokio::spawn(serve(l, hello, async {
            let _ = stopped.await;
        }));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let me = c.local_addr().unwrap();
        assert!(
            text.ends_with(&format!("/x from {me}")),
            "the service is told the peer: {text}"
        );
        assert_eq!(
            cocalc_testkit::net::tcp_timer(addr, me).map(|t| t.0),
            Some(cocalc_testkit::net::KEEPALIVE_TIMER),
            "the server armed keepalive on the connection it accepted"
        );
        // An idle keep-alive connection does not hold shutdown up.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("shutdown finishes with an idle connection open")
            .unwrap()
            .unwrap();
        assert_eq!(c.read(&mut buf).await.unwrap(), 0, "the idle one closed");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
