//! Forwarding HTTP/1.1, shared by the host's port proxy and the ingress:
//! [`relay`] sends one request over an open connection with protocol
//! upgrades (WebSocket) passed through both ways ([`relay_upgraded`],
//! by `splice(2)` between TCP sockets); [`Pool`] keeps idle keep-alive
//! connections for plain requests.

use std::time::Duration;

use bytes::Bytes;
use cocalc_core::BoxedConnection;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long [`relay`] waits for the answer to an upgrade request (a
/// WebSocket handshake) from the server it relays to. Upgrades are
/// answered at once by servers that take them; one that accepts the
/// connection and never answers would otherwise hold the relay (and,
/// through hyper's server, which does not notice a client leaving while
/// it waits) for as long as the connection stays up.
pub const UPGRADE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Something a relayed upgrade keeps until both of its directions are
/// done: put in the extensions of a request given to [`relay_within`], it
/// is moved into the task that relays the upgraded connections (and
/// dropped with the request otherwise). The ingress holds its
/// per-client connection slot this way, so a WebSocket counts for as long
/// as it is open, not only while its handshake is answered.
#[derive(Clone)]
pub struct HoldWhileUpgraded(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl HoldWhileUpgraded {
    /// Adds `item` to what a request's `extensions` hold while upgraded,
    /// keeping what they held already (several layers of a server each
    /// have something to hold: a connection slot, an HTTP/2 stream).
    pub fn add(
        extensions: &mut http::Extensions,
        item: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) {
        let held: std::sync::Arc<dyn std::any::Any + Send + Sync> =
            match extensions.remove::<HoldWhileUpgraded>() {
                Some(HoldWhileUpgraded(before)) => std::sync::Arc::new((before, item)),
                None => item,
            };
        extensions.insert(HoldWhileUpgraded(held));
    }
}

impl std::fmt::Debug for HoldWhileUpgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldWhileUpgraded")
    }
}

/// Why [`relay`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// No response head came within the limit.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
}

/// [`relay_within`] with [`UPGRADE_ANSWER_TIMEOUT`]: for upgrade requests.
pub async fn relay<B>(
    conn: BoxedConnection,
    req: http::Request<B>,
) -> Result<http::Response<hyper::body::Incoming>, RelayError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    relay_within(conn, req, UPGRADE_ANSWER_TIMEOUT).await
}

/// Sends `req` over `conn` and returns the response with its body
/// streaming, or [`RelayError::NoAnswer`] if its head does not arrive
/// within `limit` (the connection is then closed). If the response
/// switches protocols (101) and the request came from a server that can
/// upgrade it (an `OnUpgrade` in its extensions), the two upgraded
/// connections are relayed into each other ([`relay_upgraded`]) until
/// both directions are done, keeping the request's [`HoldWhileUpgraded`]
/// until then; the bytes sent to the client are then counted on the
/// request's [`Upgrading`](crate::access_log::Upgrading), if it has one.
pub async fn relay_within<B>(
    conn: BoxedConnection,
    req: http::Request<B>,
    limit: Duration,
) -> Result<http::Response<hyper::body::Incoming>, RelayError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let hold = parts.extensions.remove::<HoldWhileUpgraded>();
    let upgrading = parts.extensions.remove::<crate::access_log::Upgrading>();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let answer = tokio::time::timeout(
        limit,
        sender.send_request(http::Request::from_parts(parts, body)),
    )
    .await;
    let mut resp = match answer {
        Ok(r) => r?,
        Err(_) => {
            // Nothing more will be asked of this connection: close it.
            driver.abort();
            return Err(RelayError::NoAnswer(limit));
        }
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        if let Some(client) = client_upgrade {
            tokio::spawn(async move {
                let mut to_client = 0;
                if let (Ok(c), Ok(u)) = (client.await, upstream.await) {
                    // Counted also when the relay fails midway.
                    let _ = relay_upgraded(c, u, &mut to_client).await;
                }
                drop(hold);
                // The access log's line, with what the client got.
                if let Some(sent) = upgrading.and_then(|u| u.take()) {
                    sent.add(to_client);
                }
            });
        }
    }
    Ok(resp)
}

/// Relays two upgraded connections into each other until both are done,
/// adding to `to_client` the bytes sent to the client as they go (so
/// after an error too it says how many got out).
///
/// When both are plain TCP sockets underneath (a client served by
/// [`serve`](crate::serve::serve) and a host or port reached over TCP),
/// the bytes move with `splice(2)` and never enter this process;
/// otherwise (a tunnel stream, a test transport) they are copied.
pub async fn relay_upgraded(
    client: Upgraded,
    upstream: Upgraded,
    to_client: &mut u64,
) -> std::io::Result<()> {
    // Each side as a connection, plus what its HTTP parser read past the
    // head, which belongs to the other side before anything else.
    let (mut down, down_early): (BoxedConnection, Bytes) = match crate::serve::into_tcp(client) {
        Ok((tcp, early)) => (Box::new(tcp), early),
        Err(c) => (Box::new(TokioIo::new(c)), Bytes::new()),
    };
    let (mut up, up_early): (BoxedConnection, Bytes) =
        match upstream.downcast::<TokioIo<BoxedConnection>>() {
            Ok(p) => (p.io.into_inner(), p.read_buf),
            Err(u) => (Box::new(TokioIo::new(u)), Bytes::new()),
        };
    up.write_all(&down_early).await?;
    down.write_all(&up_early).await?;
    *to_client += up_early.len() as u64;
    #[cfg(target_os = "linux")]
    if let (Some(d), Some(u)) = (
        (*down).as_any_mut().downcast_mut::<TcpStream>(),
        (*up).as_any_mut().downcast_mut::<TcpStream>(),
    ) {
        // Without pipes (out of file descriptors), copy instead.
        if let Ok(s) = crate::splice::Splicer::new() {
            let mut moved = (0, 0);
            let r = s.run(d, u, &mut moved).await;
            *to_client += moved.1;
            return r;
        }
    }
    let mut down = CountWrites {
        io: &mut *down,
        written: to_client,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut *up, RELAY_BUFFER, RELAY_BUFFER)
        .await
        .map(|_| ())
}

/// A connection that adds what is written to it to `written` as it goes.
struct CountWrites<'a, T: ?Sized> {
    io: &'a mut T,
    written: &'a mut u64,
}

impl<T: tokio::io::AsyncRead + Unpin + ?Sized> tokio::io::AsyncRead for CountWrites<'_, T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin + ?Sized> tokio::io::AsyncWrite for CountWrites<'_, T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut *this.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            *this.written += *n as u64;
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// Copy buffer per direction of a relayed upgrade: 128 KiB of memory per
/// open WebSocket in each process that relays it. tokio's default, 8 KiB,
/// costs a system call per 8 KiB; in `cargo bench -p cocalc-daemons
/// --bench proxy` a bulk WebSocket through the proxy went from 692 MiB/s
/// (8 KiB) to 900 (32 KiB) and 1,050 (64 KiB).
const RELAY_BUFFER: usize = 64 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle keep-alive HTTP/1.1 connections by destination, for relays that
/// forward many plain requests to the same place (the ingress to a host,
/// a host to a server inside a project): a request reuses an idle
/// connection instead of paying a TCP handshake, and the relaying host
/// does not leave a socket in `TIME_WAIT` per request.
///
/// A connection goes back to the pool as soon as its response head is
/// in; it is handed out again only once that response's body has been
/// read (it must be ready for a new request). Upgrades do not belong in a
/// pool: use [`relay`] on a fresh connection. For requests without a body,
/// [`crate::upstream::Upstream`] costs less (no connection task).
pub struct Pool<K, B> {
    idle: std::sync::Mutex<IdleMap<K, B>>,
    per_key: usize,
}

type SendRequest<B> = hyper::client::conn::http1::SendRequest<B>;

/// Idle connections by destination; hashed with foldhash (seeded per
/// process), as every request looks its destination up.
type IdleMap<K, B> = std::collections::HashMap<K, Vec<SendRequest<B>>, foldhash::fast::RandomState>;

impl<K, B> std::fmt::Debug for Pool<K, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("per_key", &self.per_key)
            .finish_non_exhaustive()
    }
}

/// Why a pooled request failed.
pub enum PoolError<E, B> {
    /// Opening a new connection failed (the caller's connect error).
    /// Nothing of the request was sent: it is handed back whole, body
    /// unread, for the caller to send elsewhere.
    Connect(E, Box<http::Request<B>>),
    /// The HTTP exchange failed (after the request may have been sent).
    Http(hyper::Error),
}

impl<E: std::fmt::Debug, B> std::fmt::Debug for PoolError<E, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(e, req) => f
                .debug_tuple("Connect")
                .field(e)
                .field(&format_args!("{} {}", req.method(), req.uri()))
                .finish(),
            PoolError::Http(e) => f.debug_tuple("Http").field(e).finish(),
        }
    }
}

impl<K, B> Pool<K, B>
where
    K: std::hash::Hash + Eq + Clone,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool keeping at most `per_key` connections per destination.
    pub fn new(per_key: usize) -> Self {
        Pool {
            idle: Default::default(),
            per_key,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdleMap<K, B>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the connections to destinations for which `gone` is true
    /// (a host that failed, a project that stopped).
    pub fn forget(&self, mut gone: impl FnMut(&K) -> bool) {
        self.lock().retain(|k, _| !gone(k));
    }

    /// A connection to `key` that can take a request now, if any; closed
    /// ones are dropped on the way.
    fn take(&self, key: &K) -> Option<SendRequest<B>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut s) = list.pop() {
            match s.poll_ready(&mut cx) {
                std::task::Poll::Ready(Ok(())) => {
                    found = Some(s);
                    break;
                }
                std::task::Poll::Ready(Err(_)) => {}
                std::task::Poll::Pending => busy.push(s),
            }
        }
        list.extend(busy);
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    fn put(&self, key: K, s: SendRequest<B>) {
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() < self.per_key {
            list.push(s);
        }
    }

    /// Sends `req` to `key` on an idle connection, or on a new one from
    /// `connect`. If the idle connection turns out closed before the
    /// request went out (the server timed it out), the request goes on a
    /// new connection instead; once sent, a failure is the caller's to
    /// see. If no connection can be opened, the request comes back
    /// unsent with the connect error. The response's body streams.
    pub async fn send<E, F, Fut>(
        &self,
        key: K,
        req: http::Request<B>,
        connect: F,
    ) -> Result<http::Response<hyper::body::Incoming>, PoolError<E, B>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<BoxedConnection, E>>,
    {
        let mut req = req;
        if let Some(mut s) = self.take(&key) {
            match s.try_send_request(req).await {
                Ok(resp) => {
                    self.put(key, s);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
        let conn = match connect().await {
            Ok(c) => c,
            Err(e) => return Err(PoolError::Connect(e, Box::new(req))),
        };
        let (mut s, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(PoolError::Http)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let resp = s.send_request(req).await.map_err(PoolError::Http)?;
        self.put(key, s);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_copied_relay_counts_what_it_wrote_also_when_it_fails() {
        use tokio::io::AsyncWriteExt;
        let (mut near, mut far) = tokio::io::duplex(64);
        let mut written = 0;
        let mut counted = CountWrites {
            io: &mut near,
            written: &mut written,
        };
        counted.write_all(b"hello ").await.unwrap();
        counted.write_all(b"world").await.unwrap();
        let mut got = [0u8; 11];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        drop(far);
        assert!(counted.write_all(b"lost").await.is_err());
        assert_eq!(written, 11);
    }

    /// A server that answers every request "ok" with keep-alive, counting
    /// connections; with `close_after_one`, it closes each connection
    /// after its first answer (as a server's idle timeout would).
    async fn server(close_after_one: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        server_with(2, close_after_one).await
    }

    /// Like [`server`], answering bodies of `len` bytes ("ok" for 2).
    async fn server_with(
        len: usize,
        close_after_one: bool,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(k) = s.read(&mut buf).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..k]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let body = if len == 2 {
                                b"ok".to_vec()
                            } else {
                                vec![b'x'; len]
                            };
                            let mut ok =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n")
                                    .into_bytes();
                            ok.extend_from_slice(&body);
                            if s.write_all(&ok).await.is_err() || close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Pool<u8, String>, key: u8, addr: std::net::SocketAddr) -> String {
        let req = http::Request::get("/")
            .header("host", "x")
            .body(String::new())
            .unwrap();
        let resp = pool
            .send(key, req, || async move {
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map(|s| Box::new(s) as BoxedConnection)
            })
            .await
            .unwrap();
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn pooled_requests_reuse_one_connection_per_key() {
        let (addr, accepted) = server(false).await;
        let pool = Pool::new(4);
        for _ in 0..5 {
            assert_eq!(get(&pool, 1, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        assert_eq!(get(&pool, 2, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "keys never share");
        pool.forget(|k| *k == 1);
        assert_eq!(get(&pool, 1, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "forgotten means new");
    }

    #[tokio::test]
    async fn connections_the_server_closed_are_not_used_again() {
        let (addr, accepted) = server(true).await;
        let pool = Pool::new(4);
        for i in 1..=3 {
            assert_eq!(get(&pool, 1, addr).await, "ok");
            // Let the client side see the server's close.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_the_pool() {
        let (addr, accepted) = server(false).await;
        let pool = Arc::new(Pool::new(64));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(get(&pool, 1, addr).await, "ok");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=16).contains(&n),
            "{n} connections for 16 concurrent clients"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        use http_body_util::BodyExt;
        let (addr, accepted) = server_with(4 << 20, false).await;
        let pool: Pool<u8, String> = Pool::new(4);
        let connect = || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .map(|s| Box::new(s) as BoxedConnection)
        };
        let req = || {
            http::Request::get("/")
                .header("host", "x")
                .body(String::new())
                .unwrap()
        };
        // Read one frame of a 4 MiB body, then drop it.
        let resp = pool.send(1, req(), connect).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(body);
        // The next request cannot use that connection.
        let resp = pool.send(1, req(), connect).await.unwrap();
        let all = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 4 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Read to its end, a body leaves its connection for the next.
        let resp = pool.send(1, req(), connect).await.unwrap();
        let all = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 4 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "reused");
    }

    #[tokio::test]
    async fn an_upgrade_nobody_answers_ends_within_the_limit() {
        // A server that takes the connection and the request, and says
        // nothing; it reports when the relay closes the connection.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            let _ = closed_tx.send(());
        });
        let conn: BoxedConnection = Box::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let req = http::Request::builder()
            .uri("/ws")
            .header("host", "x")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(String::new())
            .unwrap();
        let t = std::time::Instant::now();
        let limit = Duration::from_millis(300);
        match relay_within(conn, req, limit).await {
            Err(RelayError::NoAnswer(l)) => assert_eq!(l, limit),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the relay closed the connection")
            .unwrap();
    }
}
