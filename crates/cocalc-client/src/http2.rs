//! HTTP/2 on the HTTPS listeners of the proxy and hosts.
//!
//! Browsers offer `h2` in the TLS handshake (ALPN, RFC 7301) and, given it,
//! send all of a page's requests over one connection instead of queueing
//! them on six: a notebook's dozens of assets and API calls no longer wait
//! for each other. [`crate::tls::serve_tls`] serves a connection with
//! [`serve_io`] when the handshake chose `h2`, and with HTTP/1.1 otherwise.
//!
//! The services behind it are written for HTTP/1.1 (they forward to hosts
//! and to servers in projects over HTTP/1.1), so each request is handed to
//! them in HTTP/1.1's shape ([`shape_as_http1`]): a `Host` header from the
//! `:authority`, the target in origin form (`/path?query`), the cookies in
//! one header (RFC 9113 §8.2.3), version 1.1. Hyper's HTTP/2 server drops
//! the connection-specific headers (`Connection`, `Transfer-Encoding`,
//! `Keep-Alive`, …) of their responses.
//!
//! WebSockets ride the same connection (RFC 8441): the listener announces
//! extended CONNECT, and a browser opens a WebSocket as a `CONNECT`
//! stream with `:protocol = websocket`. The service gets it as the
//! HTTP/1.1 handshake it knows ([`websocket_as_upgrade`]: `GET` with
//! `Connection: upgrade`, `Upgrade: websocket` and a `Sec-WebSocket-Key`),
//! its `101 Switching Protocols` goes to the client as the `200` RFC 8441
//! asks for, and the stream then carries the WebSocket's frames both ways
//! (through `hyper::upgrade::on`, as an HTTP/1.1 upgrade does). A
//! WebSocket holds the connection open while it lasts, through the
//! request's [`HoldWhileUpgraded`](crate::relay::HoldWhileUpgraded) where
//! the service relays it ([`crate::relay::relay_within`]). Clients that do
//! not use extended CONNECT open their WebSockets on a connection of their
//! own over HTTP/1.1, as before (the same listener serves both).
//!
//! Limits: at most [`MAX_CONCURRENT_STREAMS`] requests at once per
//! connection, request heads up to [`MAX_HEADER_LIST_SIZE`], at most
//! [`MAX_SEND_BUFFER`] of each answer held for a client slow to read it, and a
//! connection with no request for [`IDLE_TIMEOUT`] is closed (a GOAWAY,
//! then the close), as HTTP/1.1 closes an idle keep-alive connection.
//! Hyper's HTTP/2 server bounds streams reset before they are answered
//! (the "rapid reset" attack, CVE-2023-44487).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    UPGRADE,
};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

/// Most requests one HTTP/2 connection may have open at once (nginx's
/// default for `http2_max_concurrent_streams`); a client asking for more
/// waits for one to finish.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;

/// Largest request head accepted, as HTTP/2 counts it (each field's name
/// and value plus 32 bytes, RFC 9113 §6.5.2); a larger one is refused.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 << 10;

/// Most bytes of one response held for a client that does not read them
/// (hyper's default is 400 KiB): with [`MAX_CONCURRENT_STREAMS`] streams a
/// connection holds at most 16 MiB of answers it could not yet send,
/// rather than 50.
pub const MAX_SEND_BUFFER: usize = 128 << 10;

/// How long an HTTP/2 connection may go without a request open before it
/// is closed: the same as an idle HTTP/1.1 keep-alive connection
/// ([`HEADER_READ_TIMEOUT`](crate::serve::HEADER_READ_TIMEOUT)).
pub const IDLE_TIMEOUT: Duration = crate::serve::HEADER_READ_TIMEOUT;

/// The HTTP version a request came in with, when [`shape_as_http1`]
/// changed it (a request extension), for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientVersion(pub http::Version);

/// Rewrites an HTTP/2 request into the shape an HTTP/1.1 service expects:
/// `Host` set from the target's authority (without any user part), the
/// target reduced to its path and query, several `Cookie` headers joined
/// into one with `"; "`, and the version set to HTTP/1.1, the one it had
/// kept as a [`ClientVersion`] extension. A target without a path (a
/// `CONNECT`'s) is left as it is. Applying it twice changes nothing more.
pub fn shape_as_http1<B>(req: &mut http::Request<B>) {
    if req.version() != http::Version::HTTP_11 {
        let v = ClientVersion(req.version());
        req.extensions_mut().insert(v);
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        if let Some(authority) = req.uri().authority() {
            let host = authority.as_str().rsplit('@').next().unwrap_or_default();
            if let Ok(v) = HeaderValue::from_str(host) {
                req.headers_mut().insert(HOST, v);
            }
        }
        *req.uri_mut() = http::Uri::from(pq);
    }
    let mut cookies = req.headers().get_all(COOKIE).iter();
    if let (Some(_), Some(_)) = (cookies.next(), cookies.next()) {
        let mut joined = Vec::new();
        for c in req.headers().get_all(COOKIE) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(c.as_bytes());
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            req.headers_mut().insert(COOKIE, v);
        }
    }
    *req.version_mut() = http::Version::HTTP_11;
}

/// Marks a request that came as an RFC 8441 WebSocket (an extension set
/// by [`websocket_as_upgrade`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketOverHttp2;

/// Rewrites an RFC 8441 WebSocket (`CONNECT` with `:protocol =
/// websocket`) into the HTTP/1.1 handshake: method `GET`, `Connection:
/// upgrade`, `Upgrade: websocket`, and a fresh `Sec-WebSocket-Key` (RFC
/// 8441 §5 has none; the client's `Sec-WebSocket-Version`,
/// `-Protocol` and `-Extensions` stay), marked [`WebSocketOverHttp2`].
/// Answers whether it did; any other request is left as it is.
pub fn websocket_as_upgrade<B>(req: &mut http::Request<B>) -> bool {
    let websocket = req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return false;
    }
    *req.method_mut() = http::Method::GET;
    let headers = req.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(key) = HeaderValue::from_str(&websocket_key()) {
        headers.insert(SEC_WEBSOCKET_KEY, key);
    }
    req.extensions_mut().insert(WebSocketOverHttp2);
    true
}

/// A `Sec-WebSocket-Key`: 16 bytes from a randomly seeded hash of a
/// counter, in base64 (RFC 6455 §4.1 asks for a random nonce; it guards
/// against caches, not attackers, and the server's accept for it is not
/// checked here: the client of the WebSocket is the HTTP/2 one).
fn websocket_key() -> String {
    use base64::Engine as _;
    use std::hash::BuildHasher as _;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let seed = foldhash::fast::RandomState::default();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seed.hash_one(n).to_le_bytes());
    bytes[8..].copy_from_slice(&seed.hash_one(!n).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The answer to an RFC 8441 WebSocket in HTTP/2's terms: the service's
/// `101` becomes `200` without the handshake's headers (then the stream
/// carries the WebSocket); a `2xx` that did not switch protocols is a
/// failed handshake, `502` with no body (RFC 8441 leaves a `2xx` no room
/// for one); anything else goes as it is. Answers whether the body is to
/// be dropped.
fn websocket_answer<B>(res: &mut http::Response<B>) -> bool {
    let status = res.status();
    if status == http::StatusCode::SWITCHING_PROTOCOLS {
        *res.status_mut() = http::StatusCode::OK;
        for h in [CONNECTION, UPGRADE, SEC_WEBSOCKET_ACCEPT, CONTENT_LENGTH] {
            res.headers_mut().remove(h);
        }
        return true;
    }
    if status.is_success() {
        *res.status_mut() = http::StatusCode::BAD_GATEWAY;
        res.headers_mut().remove(CONTENT_LENGTH);
        return true;
    }
    false
}

/// Serves HTTP/2 on `io` (a TLS stream whose handshake chose `h2`) with
/// `service`, each request shaped by [`shape_as_http1`], until the client
/// closes the connection, it goes `idle` with no request open (servers
/// pass [`IDLE_TIMEOUT`]), or `stop` completes; then the client is told
/// (GOAWAY) and the requests open are answered before the connection
/// closes. Errors of the connection (a client that went away, a protocol
/// error) are not reported.
pub async fn serve_io<I, S, B>(io: I, service: S, stop: impl Future<Output = ()>, idle: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let activity = Arc::new(Activity {
        open: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let service = Shaped {
        inner: service,
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buf_size(MAX_SEND_BUFFER)
        // WebSockets on the connection (RFC 8441).
        .enable_connect_protocol()
        // Uploads: the receive window grows with the link's measured
        // bandwidth-delay product instead of staying at 1 MiB, which
        // would cap a 50 ms path at 20 MiB/s.
        .adaptive_window(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::pin!(stop);
    let check = tokio::time::sleep(idle);
    tokio::pin!(check);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = &mut stop => break,
            _ = &mut check => match activity.check_again(idle) {
                Some(at) => check.as_mut().reset(at),
                None => break,
            },
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The requests open on one connection, and since when none has been.
struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    /// When to look again, or `None` if the connection has been idle for
    /// `idle` and should close.
    fn check_again(&self, idle: Duration) -> Option<Instant> {
        let now = Instant::now();
        if self.open.load(Ordering::Acquire) > 0 {
            return Some(now + idle);
        }
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        let due = since + idle;
        (due > now).then_some(due)
    }
}

/// One open request: counted from the call until its response body ends
/// or is dropped (or its future is, for a request the client reset).
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::AcqRel);
        Open(activity.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// A service given requests in HTTP/1.1's shape, whose requests are
/// counted while open.
struct Shaped<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Shaped<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
{
    type Response = http::Response<Tracked<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        let open = Open::new(&self.activity);
        let websocket = websocket_as_upgrade(&mut req);
        shape_as_http1(&mut req);
        let open = if websocket {
            // Held by the request, and by a relay of its WebSocket until
            // that ends (crate::relay::relay_within).
            crate::relay::HoldWhileUpgraded::add(req.extensions_mut(), Arc::new(open));
            None
        } else {
            Some(open)
        };
        TrackedFuture {
            fut: self.inner.call(req),
            open,
            websocket,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way, holding its request's [`Open`]; for an
    /// RFC 8441 WebSocket, put in HTTP/2's terms ([`websocket_answer`]).
    struct TrackedFuture<F> {
        #[pin]
        fut: F,
        open: Option<Open>,
        websocket: bool,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.project();
        let res = ready!(me.fut.poll(cx));
        let open = me.open.take();
        let websocket = *me.websocket;
        Poll::Ready(res.map(|mut r| {
            let empty = websocket && websocket_answer(&mut r);
            r.map(|body| Tracked { body, open, empty })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body, holding its request's [`Open`] until it ends;
    /// `empty` ones end at once, whatever the service's body held.
    struct Tracked<B> {
        #[pin]
        body: B,
        open: Option<Open>,
        empty: bool,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let me = self.project();
        if *me.empty {
            me.open.take();
            return Poll::Ready(None);
        }
        let frame = ready!(me.body.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            me.open.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.empty || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.empty {
            SizeHint::with_exact(0)
        } else {
            self.body.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn requests_take_http1s_shape() {
        let mut req = http::Request::builder()
            .uri("https://user@app.example:8443/p/x?a=1")
            .version(http::Version::HTTP_2)
            .header(COOKIE, "a=1")
            .header(COOKIE, "b=2; c=3")
            .header(HOST, "other.example")
            .body(())
            .unwrap();
        shape_as_http1(&mut req);
        assert_eq!(req.uri(), "/p/x?a=1");
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert_eq!(
            req.extensions().get::<ClientVersion>(),
            Some(&ClientVersion(http::Version::HTTP_2))
        );
        assert_eq!(req.headers()[HOST], "app.example:8443");
        let cookies: Vec<_> = req.headers().get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let once = req.headers().clone();
        shape_as_http1(&mut req);
        assert_eq!(req.uri(), "/p/x?a=1");
        assert_eq!(req.headers(), &once);
        assert_eq!(
            req.extensions().get::<ClientVersion>(),
            Some(&ClientVersion(http::Version::HTTP_2)),
            "the client's version is kept"
        );

        // No authority: the Host sent stays; one cookie header stays.
        let mut req = http::Request::builder()
            .uri("/q")
            .header(HOST, "h.example")
            .header(COOKIE, "a=1")
            .body(())
            .unwrap();
        shape_as_http1(&mut req);
        assert_eq!(req.headers()[HOST], "h.example");
        assert_eq!(req.headers()[COOKIE], "a=1");

        // A CONNECT's authority-form target is kept.
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("db.example:5432")
            .body(())
            .unwrap();
        shape_as_http1(&mut req);
        assert_eq!(req.uri(), "db.example:5432");
    }

    /// A server of `serve_io_idle` on one end of an in-memory pipe, whose
    /// service answers with what it saw (or, for `/slow`, a body that
    /// takes `slow` to end), and an HTTP/2 client on the other.
    async fn pair(
        idle: Duration,
        slow: Duration,
    ) -> (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let service = hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
            let body: http_body_util::Either<Full<Bytes>, _> = if req.uri().path() == "/slow" {
                let (mut tx, body) = http_body_util::channel::Channel::<Bytes, String>::new(1);
                tokio::spawn(async move {
                    let _ = tx.send_data(Bytes::from("part ")).await;
                    tokio::time::sleep(slow).await;
                    let _ = tx.send_data(Bytes::from("end")).await;
                });
                http_body_util::Either::Right(body)
            } else {
                let seen = format!(
                    "{:?} {} host={:?} cookie={:?}",
                    req.version(),
                    req.uri(),
                    req.headers().get(HOST),
                    req.headers().get(COOKIE)
                );
                http_body_util::Either::Left(Full::new(Bytes::from(seen)))
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("connection", "keep-alive")
                    .body(body)
                    .unwrap(),
            )
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_io(
            server,
            service,
            async move {
                let _ = stop_rx.await;
            },
            idle,
        ));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        (send, served, stop_tx)
    }

    fn get(path: &str) -> http::Request<Full<Bytes>> {
        http::Request::builder()
            .uri(format!("https://app.example{path}"))
            .header(COOKIE, "a=1")
            .header(COOKIE, "b=2")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn requests_arrive_shaped_and_answers_lose_connection_headers() {
        let (mut send, _served, _stop) = pair(IDLE_TIMEOUT, Duration::ZERO).await;
        let r = send.send_request(get("/a?b=c")).await.unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert!(!r.headers().contains_key("connection"), "{r:?}");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            r#"HTTP/1.1 /a?b=c host=Some("app.example") cookie=Some("a=1; b=2")"#
        );
    }

    #[tokio::test]
    async fn an_idle_connection_closes_and_a_busy_one_does_not() {
        let idle = Duration::from_secs(2);
        let (mut send, served, _stop) = pair(idle, 2 * idle).await;
        // A response body still coming holds the connection open past
        // the idle time.
        let r = send.send_request(get("/slow")).await.unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "part end");
        assert!(!served.is_finished(), "open while a body was coming");
        // Idle from now: still open well before the time, closed after.
        tokio::time::sleep(idle / 4).await;
        assert!(send.send_request(get("/x")).await.is_ok());
        let t = Instant::now();
        tokio::time::timeout(5 * idle, served)
            .await
            .expect("the idle connection closed")
            .unwrap();
        assert!(t.elapsed() >= idle, "not before its idle time");
        assert!(send.send_request(get("/x")).await.is_err());
    }

    /// A server of `serve_io` whose service takes WebSocket handshakes
    /// at `/ws` (101, then echoes bytes), answers `/plain` 200 with a
    /// body and anything else 401; and an HTTP/2 client that has seen the
    /// server's settings (so it may send extended CONNECT).
    async fn websocket_pair() -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1 << 16);
        let service = hyper::service::service_fn(|mut req: http::Request<Incoming>| async move {
            let h = |name| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            let seen = format!(
                "{} {} {:?} upgrade={:?} connection={:?} version={:?} key_len={:?}",
                req.method(),
                req.uri(),
                req.version(),
                h("upgrade"),
                h("connection"),
                h("sec-websocket-version"),
                h("sec-websocket-key").map(|k| k.len()),
            );
            let reply = http::Response::builder().header("x-seen", seen);
            let r = match req.uri().path() {
                "/ws" => {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.unwrap());
                        let mut buf = [0u8; 4];
                        io.read_exact(&mut buf).await.unwrap();
                        io.write_all(&buf).await.unwrap();
                    });
                    reply
                        .status(101)
                        .header("upgrade", "websocket")
                        .header("connection", "upgrade")
                        .header("sec-websocket-accept", "x")
                        .body(Full::new(Bytes::new()))
                }
                "/plain" => reply.body(Full::new(Bytes::from("not a websocket"))),
                _ => reply.status(401).body(Full::new(Bytes::from("no token"))),
            };
            Ok::<_, std::convert::Infallible>(r.unwrap())
        });
        tokio::spawn(serve_io(
            server,
            service,
            std::future::pending(),
            IDLE_TIMEOUT,
        ));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        // One plain request first: its answer comes after the settings.
        send.send_request(get("/plain")).await.unwrap();
        send
    }

    fn websocket(path: &str) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("https://app.example{path}"))
            .header("sec-websocket-version", "13")
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    }

    #[tokio::test]
    async fn websockets_over_http2_reach_the_service_as_http1_upgrades() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut send = websocket_pair().await;
        let r = send.send_request(websocket("/ws?t=1")).await.unwrap();
        assert_eq!(r.status(), 200, "{r:?}");
        assert!(!r.headers().contains_key("sec-websocket-accept"), "{r:?}");
        assert_eq!(
            r.headers()["x-seen"],
            "GET /ws?t=1 HTTP/1.1 upgrade=Some(\"websocket\") connection=Some(\"upgrade\") \
             version=Some(\"13\") key_len=Some(24)"
        );
        let mut io = TokioIo::new(hyper::upgrade::on(r).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // The connection serves other requests meanwhile.
        let r = send.send_request(get("/plain")).await.unwrap();
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn a_websocket_the_service_refuses_or_does_not_switch_fails_cleanly() {
        let mut send = websocket_pair().await;
        // A refusal goes as it is, body and all.
        let r = send.send_request(websocket("/nope")).await.unwrap();
        assert_eq!(r.status(), 401);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "no token");
        // A 200 to a handshake is no WebSocket: 502, without the body.
        let r = send.send_request(websocket("/plain")).await.unwrap();
        assert_eq!(r.status(), 502);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "{body:?}");
        // Plain CONNECT (no :protocol) is not turned into anything.
        let mut plain = websocket("/ws");
        plain.extensions_mut().remove::<hyper::ext::Protocol>();
        *plain.uri_mut() = "app.example:443".parse().unwrap();
        let r = send.send_request(plain).await.unwrap();
        assert!(r.headers()["x-seen"]
            .to_str()
            .unwrap()
            .starts_with("CONNECT "));
    }

    #[tokio::test]
    async fn a_relayed_websocket_keeps_its_connection_from_closing_as_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A backend that answers handshakes with 101 and then echoes
        // until its client is done, and anything else with 200.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = backend.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = backend.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut b = [0u8; 1];
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if !head.contains("\r\nupgrade: websocket\r\n") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                        .await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let service = hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
            let conn = tokio::net::TcpStream::connect(at).await.unwrap();
            let r = crate::relay::relay_within(Box::new(conn), req, Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(r.unwrap())
        });
        let idle = Duration::from_secs(1);
        let (client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve_io(server, service, std::future::pending(), idle));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        assert_eq!(send.send_request(get("/")).await.unwrap().status(), 200);
        let r = send.send_request(websocket("/ws")).await.unwrap();
        assert_eq!(r.status(), 200, "{r:?}");
        let mut ws = TokioIo::new(hyper::upgrade::on(r).await.unwrap());
        // Open well past the idle time, with no request: still served.
        tokio::time::sleep(idle * 5 / 2).await;
        assert!(!served.is_finished(), "closed under an open WebSocket");
        ws.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        ws.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        let r = send.send_request(get("/")).await.unwrap();
        assert_eq!(r.status(), 200);
        // Once it closes, the connection is idle again, and closes.
        ws.shutdown().await.unwrap();
        drop(ws);
        tokio::time::timeout(idle * 5, served)
            .await
            .expect("the idle connection closed after its WebSocket")
            .unwrap();
    }

    #[tokio::test]
    async fn stop_lets_an_open_request_finish() {
        let (mut send, served, stop) = pair(IDLE_TIMEOUT, Duration::from_millis(300)).await;
        let r = send.send_request(get("/slow")).await.unwrap();
        stop.send(()).unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "part end", "answered after the stop");
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("closed after its last request")
            .unwrap();
    }
}
