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
//! What HTTP/2 does not carry here: WebSockets. The listener does not
//! announce extended CONNECT (RFC 8441), so browsers open their WebSockets
//! on a connection of their own, over HTTP/1.1 (the same listener serves
//! both).
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

use http::header::{HeaderValue, COOKIE, HOST};
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
        shape_as_http1(&mut req);
        TrackedFuture {
            fut: self.inner.call(req),
            open: Some(open),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way, holding its request's [`Open`].
    struct TrackedFuture<F> {
        #[pin]
        fut: F,
        open: Option<Open>,
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
        Poll::Ready(res.map(|r| r.map(|body| Tracked { body, open })))
    }
}

pin_project_lite::pin_project! {
    /// A response body, holding its request's [`Open`] until it ends.
    struct Tracked<B> {
        #[pin]
        body: B,
        open: Option<Open>,
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
        let frame = ready!(me.body.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            me.open.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
