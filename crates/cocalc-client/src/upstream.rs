//! A lean HTTP/1.1 client for relays, for the commonest request a relay
//! forwards: one with **no body and no upgrade** (`GET`, `HEAD`, most
//! `DELETE`s and `OPTIONS`).
//!
//! [`Upstream::send`] writes the request head in one write on an idle
//! keep-alive connection (or a new one), parses the response head with
//! `httparse`, and answers with a [`ResponseBody`] that reads the
//! connection itself as it is polled: no connection task, no channel
//! between tasks. A response whose body is already in the first read
//! (most small ones) gives its connection back to the pool before the
//! caller sees the response. Compared with hyper's client connection this
//! saved, per small request through the ingress, a fifth of the proxy's
//! user-space instructions (34.8k to 28.1k), and in the host's port proxy
//! 54.2k to 46.8k (`cargo bench -p cocalc-daemons --bench proxy --
//! --callgrind`, `--callgrind-host`).
//!
//! Requests with bodies and upgrades stay with hyper
//! ([`crate::relay::Pool`], [`crate::relay::relay`]): streaming a request
//! body while the response may already be coming needs a full-duplex
//! client, which hyper is.
//!
//! What the client does with the message, per RFC 9112:
//!
//! * hop-by-hop headers are not forwarded either way (`Connection` and
//!   the names it lists, `Keep-Alive`, `Proxy-Connection`, `TE`,
//!   `Trailer`, `Transfer-Encoding`, `Upgrade`); the response body is
//!   handed on decoded, and whoever serves it frames it again;
//! * the response body's length is: none for `HEAD`, 1xx, 204 and 304;
//!   chunked if `Transfer-Encoding` ends in `chunked`; else
//!   `Content-Length` (several must agree); else until the connection
//!   closes. Interim 1xx responses are skipped; a 101 is refused (nothing
//!   asked for an upgrade);
//! * a connection is used again only after an HTTP/1.1 response without
//!   `Connection: close`, whose body was read to its end with nothing
//!   after it; a connection the server closed while idle is noticed
//!   before use and dropped;
//! * a request on a reused connection that the server closes without
//!   answering goes once more on a new connection if its method is
//!   idempotent (RFC 9110 §9.2.2), and fails otherwise;
//! * trailers of chunked bodies are read and dropped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cocalc_client::upstream::Upstream;
//! use http_body_util::BodyExt;
//!
//! let pool: Upstream<&'static str> = Upstream::new(8);
//! let (parts, ()) = http::Request::get("/status")
//!     .header("host", "backend")
//!     .body(())?
//!     .into_parts();
//! let resp = pool
//!     .send("backend", &parts, &[], || async {
//!         let s = tokio::net::TcpStream::connect("127.0.0.1:8080").await?;
//!         Ok::<_, std::io::Error>(Box::new(s) as cocalc_core::BoxedConnection)
//!     })
//!     .await?;
//! let body = resp.into_body().collect().await?.to_bytes();
//! # let _ = body;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use cocalc_core::BoxedConnection;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;

/// Most header lines a response head may have.
const MAX_HEADERS: usize = 100;
/// Largest response head accepted, in bytes.
const MAX_HEAD: usize = 64 << 10;
/// Largest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_META: usize = 16 << 10;
/// How much a streaming body asks the socket for at a time.
const READ_SIZE: usize = 64 << 10;
/// Largest read buffer an idle connection keeps.
const IDLE_BUFFER: usize = 16 << 10;

/// Why [`Upstream::send`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError<E> {
    /// Opening a new connection failed (the caller's connect error).
    #[error("connect: {0}")]
    Connect(E),
    /// Reading or writing the connection failed, or it closed early.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server's response is not valid HTTP/1.1 (or is too large).
    #[error("bad response: {0}")]
    Protocol(&'static str),
}

/// One open connection and what was read from it but not yet used.
struct Conn {
    io: BoxedConnection,
    buf: BytesMut,
}

struct Shared<K> {
    idle: Mutex<HashMap<K, Vec<Conn>, foldhash::fast::RandomState>>,
    per_key: usize,
}

impl<K: Hash + Eq> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Vec<Conn>, foldhash::fast::RandomState>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, key: K, mut conn: Conn) {
        // An idle connection keeps a small buffer, not the one a large
        // body grew.
        if conn.buf.capacity() > IDLE_BUFFER {
            conn.buf = BytesMut::new();
        }
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() < self.per_key {
            list.push(conn);
        }
    }
}

/// Whether a request is one [`Upstream::send`] serves: no body (its end
/// already reached) and no `Upgrade`. Relays send the others through
/// hyper ([`crate::relay`]).
pub fn takes<B: http_body::Body>(parts: &http::request::Parts, body: &B) -> bool {
    body.is_end_stream() && !parts.headers.contains_key(header::UPGRADE)
}

/// Idle keep-alive connections by destination and the client that uses
/// them (see the module overview). Cloning shares the pool.
pub struct Upstream<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Upstream<K> {
    fn clone(&self) -> Self {
        Upstream {
            shared: self.shared.clone(),
        }
    }
}

impl<K> std::fmt::Debug for Upstream<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("per_key", &self.shared.per_key)
            .finish_non_exhaustive()
    }
}

/// A parsed response head and how its body is framed.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// How an exchange on one connection failed.
enum Failure {
    /// The server closed (or reset) the connection before a single byte
    /// of the response: on a reused connection, a timed-out keep-alive.
    Unanswered(io::Error),
    Io(io::Error),
    Protocol(&'static str),
}

impl<E> From<Failure> for UpstreamError<E> {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Unanswered(e) | Failure::Io(e) => UpstreamError::Io(e),
            Failure::Protocol(why) => UpstreamError::Protocol(why),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Upstream<K> {
    /// A pool keeping at most `per_key` idle connections per destination.
    pub fn new(per_key: usize) -> Self {
        Upstream {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                per_key,
            }),
        }
    }

    /// Forgets the idle connections to destinations for which `gone` is
    /// true (a host that failed, a project that stopped).
    pub fn forget(&self, mut gone: impl FnMut(&K) -> bool) {
        self.shared.lock().retain(|k, _| !gone(k));
    }

    /// Idle connections held for `key` (for tests and metrics).
    pub fn idle(&self, key: &K) -> usize {
        self.shared.lock().get(key).map_or(0, Vec::len)
    }

    /// An idle connection to `key` the server has not closed; closed
    /// ones (and ones with bytes nobody asked for) are dropped on the way.
    fn take(&self, key: &K) -> Option<Conn> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            let mut conn = {
                let mut idle = self.shared.lock();
                let list = idle.get_mut(key)?;
                let conn = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                conn?
            };
            // Readiness is cached by the runtime, so this is usually not
            // even a system call.
            let poll = crate::readiness::poll_read_conn(&mut conn.io, &mut cx, &mut conn.buf);
            if poll.is_pending() {
                return Some(conn);
            }
        }
    }

    /// Sends a request without a body (the caller checks, with [`takes`];
    /// a `Content-Length` other than 0 and `Upgrade` are not
    /// sent, so a mistaken caller's server waits for no body) to `key`, on an idle connection or a new one from
    /// `connect`, and returns the response with its body streaming from
    /// the connection. `parts` is forwarded as it is but for hop-by-hop
    /// headers and those named in `replace`: each of those is sent with
    /// the value given there instead (or left out, for `None`), which
    /// spares the caller editing the header map (`Host`,
    /// `X-Forwarded-*`).
    pub async fn send<E, F, Fut>(
        &self,
        key: K,
        parts: &http::request::Parts,
        replace: &[(&HeaderName, Option<&HeaderValue>)],
        connect: F,
    ) -> Result<http::Response<ResponseBody<K>>, UpstreamError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<BoxedConnection, E>>,
    {
        let head = request_head(parts, replace);
        let no_body = parts.method == Method::HEAD;
        if let Some(mut conn) = self.take(&key) {
            match exchange(&mut conn, &head, no_body).await {
                Ok(h) => return Ok(self.respond(key, conn, h)),
                Err(Failure::Unanswered(_)) if parts.method.is_idempotent() => {}
                Err(f) => return Err(f.into()),
            }
        }
        let io = connect().await.map_err(UpstreamError::Connect)?;
        let mut conn = Conn {
            io,
            buf: BytesMut::new(),
        };
        let h = exchange(&mut conn, &head, no_body).await?;
        Ok(self.respond(key, conn, h))
    }

    /// The response for a parsed head: a body already complete in the
    /// buffer frees its connection now; any other streams from it.
    fn respond(&self, key: K, mut conn: Conn, head: Head) -> http::Response<ResponseBody<K>> {
        let kind = match head.framing {
            Framing::Empty => {
                self.release(key, conn, head.reusable);
                Kind::Full(None)
            }
            Framing::Length(n) if (conn.buf.len() as u64) >= n => {
                let data = conn.buf.split_to(n as usize).freeze();
                self.release(key, conn, head.reusable);
                Kind::Full(Some(data))
            }
            framing => Kind::Stream(Box::new(Stream {
                io: Some(conn.io),
                buf: conn.buf,
                state: match framing {
                    Framing::Length(n) => State::Length(n),
                    Framing::Chunked => State::ChunkSize,
                    _ => State::Close,
                },
                home: head.reusable.then(|| (self.shared.clone(), key)),
            })),
        };
        let mut resp = http::Response::new(ResponseBody {
            kind,
            watching: None,
        });
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        resp
    }

    fn release(&self, key: K, conn: Conn, reusable: bool) {
        if reusable && conn.buf.is_empty() {
            self.shared.put(key, conn);
        }
    }
}

/// The request head as sent: request line, the headers but hop-by-hop
/// ones and those `replace` names (whose values come first), blank line.
fn request_head(
    parts: &http::request::Parts,
    replace: &[(&HeaderName, Option<&HeaderValue>)],
) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let line = |n: &HeaderName, v: &HeaderValue| n.as_str().len() + v.len() + 4;
    let size = parts.headers.iter().map(|(n, v)| line(n, v)).sum::<usize>()
        + replace
            .iter()
            .filter_map(|(n, v)| Some(line(n, (*v)?)))
            .sum::<usize>();
    let mut out = Vec::with_capacity(parts.method.as_str().len() + target.len() + 13 + size + 2);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut header = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    // The replacements first, so that Host leads (RFC 9112 §3.2).
    for (name, value) in replace {
        if let Some(value) = value {
            header(name, value);
        }
    }
    let listed: Vec<&str> = connection_tokens(&parts.headers).collect();
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name)
            // No body follows, whatever a caller's headers said.
            || (*name == header::CONTENT_LENGTH && value.as_bytes() != b"0")
            || replace.iter().any(|(n, _)| *n == name)
            || listed.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()))
        {
            continue;
        }
        header(name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Headers that describe one connection, never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The comma-separated tokens of every `Connection` header.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Writes the request head and reads the response head.
async fn exchange(conn: &mut Conn, head: &[u8], no_body: bool) -> Result<Head, Failure> {
    let unanswered = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => Failure::Unanswered(e),
        _ => Failure::Io(e),
    };
    conn.io.write_all(head).await.map_err(unanswered)?;
    conn.io.flush().await.map_err(unanswered)?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(h) = parse_head(&mut conn.buf, no_body)? {
                return Ok(h);
            }
            if conn.buf.len() >= MAX_HEAD {
                return Err(Failure::Protocol("response head too large"));
            }
        }
        conn.buf.reserve(8 << 10);
        let read = std::future::poll_fn(|cx| {
            crate::readiness::poll_read_conn(&mut conn.io, cx, &mut conn.buf)
        });
        match read.await {
            Ok(0) if !answered => {
                return Err(Failure::Unanswered(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before any response",
                )))
            }
            Ok(0) => {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the response head",
                )))
            }
            Ok(_) => {}
            Err(e) if !answered => return Err(unanswered(e)),
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

/// Parses a final response head off the front of `buf`, skipping interim
/// (1xx) ones; `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut, no_body: bool) -> Result<Option<Head>, Failure> {
    loop {
        // Each header's name, and where its value lies in `buf`, so the
        // values can share the head's bytes once it is split off.
        let base = buf.as_ptr() as usize;
        let (len, code, version, spans) = {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
            let len = match parsed {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Failure::Protocol("too many response headers"))
                }
                Err(_) => return Err(Failure::Protocol("malformed response head")),
            };
            let mut spans = Vec::with_capacity(resp.headers.len());
            for h in resp.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| Failure::Protocol("bad response header name"))?;
                spans.push((name, h.value.as_ptr() as usize - base, h.value.len()));
            }
            (
                len,
                resp.code.unwrap_or(0),
                resp.version.unwrap_or(0),
                spans,
            )
        };
        let bytes = buf.split_to(len).freeze();
        let status =
            StatusCode::from_u16(code).map_err(|_| Failure::Protocol("bad response status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Failure::Protocol("101 without an upgrade request"));
        }
        if status.is_informational() {
            continue;
        }
        return frame(status, version, &bytes, spans, no_body).map(Some);
    }
}

/// Builds the response headers from `spans` of `bytes`, leaving out the
/// hop-by-hop ones, and decides in the same pass the body's framing and
/// whether the connection can be used again.
fn frame(
    status: StatusCode,
    version: u8,
    bytes: &Bytes,
    spans: Vec<(HeaderName, usize, usize)>,
    no_body: bool,
) -> Result<Head, Failure> {
    let mut reusable = version == 1;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut listed = Vec::new();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, at, n) in spans {
        let value = HeaderValue::from_maybe_shared(bytes.slice(at..at + n))
            .map_err(|_| Failure::Protocol("bad response header value"))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Failure::Protocol("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Failure::Protocol("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // The last coding of the last header is the one that frames.
            chunked = Some(value.to_str().ok().is_some_and(|s| {
                s.rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            }));
            continue;
        } else if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    reusable = false;
                } else if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(n);
                }
            }
            continue;
        } else if is_hop_by_hop(&name) {
            continue;
        }
        headers.append(name, value);
    }
    for name in listed {
        headers.remove(name);
    }
    let framing =
        if no_body || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(chunked), l) => {
                    // Transfer-Encoding wins; a Content-Length beside it is
                    // dropped and the connection not trusted again.
                    if l.is_some() {
                        headers.remove(header::CONTENT_LENGTH);
                        reusable = false;
                    }
                    if chunked {
                        Framing::Chunked
                    } else {
                        reusable = false;
                        Framing::Close
                    }
                }
                (None, Some(0)) => Framing::Empty,
                (None, Some(n)) => Framing::Length(n),
                (None, None) => {
                    reusable = false;
                    Framing::Close
                }
            }
        };
    Ok(Head {
        status,
        headers,
        framing,
        reusable,
    })
}

/// A response body from [`Upstream::send`]: complete already, or read
/// from its connection as it is polled. Its connection goes back to the
/// pool when the body has been read to its end; dropped before that, the
/// body closes the connection.
pub struct ResponseBody<K> {
    kind: Kind<K>,
    /// Set by [`ResponseBody::watched`].
    watching: Option<Box<Watching>>,
}

/// What tells a body that its upstream's program has stopped (hung while
/// its kernel keeps the connection open, so nothing ever arrives and
/// nothing fails): the proxy's host watch. A body given one
/// ([`ResponseBody::watched`]) waits on it while it has nothing to hand
/// out, and ends with a `TimedOut` error once it reports the upstream
/// silent.
pub trait Silence: Send + Sync {
    /// A wait on the upstream begins.
    fn begin_wait(&self);
    /// The wait ends; `heard`: because bytes came.
    fn end_wait(&self, heard: bool);
    /// Completes, saying why, when the upstream is found silent while
    /// waits on it are open (a wait that began after the finding waits
    /// for the next one).
    fn silent(&self) -> Pin<Box<dyn std::future::Future<Output = String> + Send>>;
}

/// A body's waits under a [`Silence`].
struct Watching {
    by: Arc<dyn Silence>,
    waiting: bool,
    /// Made when a wait begins and dropped when it ends, so a finding
    /// that the upstream is silent ends only the waits open then.
    silent: Option<Pin<Box<dyn std::future::Future<Output = String> + Send>>>,
}

impl Watching {
    /// `inner`, a poll of the body's bytes, under the watch: a pending
    /// one waits (and fails if the upstream is found silent), a ready
    /// one ends the wait.
    fn poll<T, E: From<io::Error>>(
        &mut self,
        cx: &mut Context<'_>,
        inner: Poll<Option<Result<T, E>>>,
    ) -> Poll<Option<Result<T, E>>> {
        match inner {
            Poll::Ready(r) => {
                self.end(matches!(r, Some(Ok(_))));
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_silent(cx) {
                Poll::Ready(e) => Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// Begins a wait (if none is open) and polls for the finding that
    /// the upstream is silent, as the error to end the body with.
    fn poll_silent(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.waiting {
            self.waiting = true;
            self.by.begin_wait();
        }
        let by = &self.by;
        let silent = self.silent.get_or_insert_with(|| by.silent());
        let why = ready!(silent.as_mut().poll(cx));
        self.end(false);
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why))
    }

    fn end(&mut self, heard: bool) {
        if self.waiting {
            self.waiting = false;
            self.silent = None;
            self.by.end_wait(heard);
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.end(false);
    }
}

pin_project_lite::pin_project! {
    /// Any body (hyper's `Incoming` from a relay, say) read under a
    /// [`Silence`], as [`ResponseBody::watched`] reads its own: while it
    /// has nothing to hand out it waits on its upstream, and it ends with
    /// a `TimedOut` error once the upstream is found silent. Without one
    /// it is the body as it is (its errors boxed).
    pub struct Silenced<B> {
        #[pin]
        inner: B,
        watching: Option<Box<Watching>>,
    }
}

impl<B> Silenced<B> {
    /// `inner`, under `silence` if there is one.
    pub fn new(inner: B, silence: Option<Arc<dyn Silence>>) -> Self {
        Silenced {
            inner,
            watching: silence.map(|by| {
                Box::new(Watching {
                    by,
                    waiting: false,
                    silent: None,
                })
            }),
        }
    }
}

impl<B> http_body::Body for Silenced<B>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let me = self.project();
        let next = me
            .inner
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)));
        match me.watching.as_mut() {
            Some(w) => w.poll(cx, next),
            None => next,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<K> ResponseBody<K> {
    /// This body, reading under `silence` (made only if the body is
    /// still to be read from its connection): it ends with a `TimedOut`
    /// error rather than wait without end on an upstream found silent,
    /// whether it is polled or spliced.
    pub fn watched(mut self, silence: impl FnOnce() -> Arc<dyn Silence>) -> Self {
        if matches!(self.kind, Kind::Stream(_)) {
            self.watching = Some(Box::new(Watching {
                by: silence(),
                waiting: false,
                silent: None,
            }));
        }
        self
    }
}

impl<K> std::fmt::Debug for ResponseBody<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full(_) => "full",
            Kind::Stream(_) => "streaming",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

enum Kind<K> {
    /// The whole body (or none), not yet handed out.
    Full(Option<Bytes>),
    Stream(Box<Stream<K>>),
}

struct Stream<K> {
    /// The connection, until it goes home.
    io: Option<BoxedConnection>,
    /// Read from it, not yet handed out.
    buf: BytesMut,
    state: State,
    /// Where the connection goes when the body is done, if it may be
    /// used again.
    home: Option<(Arc<Shared<K>>, K)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many body bytes still to come.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many bytes still to come.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// Reading (and dropping) trailer lines, this many bytes so far.
    Trailers(usize),
    /// Until the connection closes.
    Close,
    Done,
}

fn protocol(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl<K: Hash + Eq> Stream<K> {
    /// Reads more from the connection; `Ok(false)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        let n = ready!(crate::readiness::poll_read_conn(io, cx, &mut self.buf))?;
        Poll::Ready(Ok(n > 0))
    }

    /// The body is done: its connection goes home if it may.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some((shared, key)), true) = (self.home.take(), self.buf.is_empty()) {
            if let Some(io) = self.io.take() {
                let buf = std::mem::take(&mut self.buf);
                shared.put(key, Conn { io, buf });
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let buf = &mut self.buf;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                State::Length(n) | State::ChunkData(n) if !buf.is_empty() => {
                    let take = n.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.state = match self.state {
                        State::Length(_) if take == n => {
                            self.finish();
                            State::Done
                        }
                        State::Length(_) => State::Length(n - take),
                        _ if take == n => State::ChunkEnd,
                        _ => State::ChunkData(n - take),
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                State::Close if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                State::ChunkSize if !buf.is_empty() => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            State::Trailers(0)
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META => {}
                    _ => return Poll::Ready(Some(Err(protocol("bad chunk size line")))),
                },
                State::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(protocol("chunk data not ended by CRLF"))));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers(seen) if !buf.is_empty() => {
                    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                        let line = buf.split_to(end + 1);
                        if line.as_ref() == b"\r\n" || line.as_ref() == b"\n" {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        if seen + line.len() > MAX_CHUNK_META {
                            return Poll::Ready(Some(Err(protocol("trailers too large"))));
                        }
                        self.state = State::Trailers(seen + line.len());
                        continue;
                    }
                    if seen + buf.len() > MAX_CHUNK_META {
                        return Poll::Ready(Some(Err(protocol("trailers too large"))));
                    }
                }
                _ => {}
            }
            // Nothing usable buffered: read more.
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if self.state == State::Close => {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(false) => {
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection before the body's end",
                    ))));
                }
                Err(e) => {
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl<K: Hash + Eq> ResponseBody<K> {
    /// The stream's TCP socket, when its connection is a bare one.
    fn tcp(s: &mut Stream<K>) -> Option<&mut tokio::net::TcpStream> {
        let io = s.io.as_mut()?;
        (**io).as_any_mut().downcast_mut::<tokio::net::TcpStream>()
    }

    /// Whether the rest of this body can be spliced: it is framed by
    /// `Content-Length`, its connection is a bare TCP socket, and at
    /// least `min` of its bytes are still unread. If so, takes the body
    /// bytes already read (to be sent first) and returns them with the
    /// count still to come, which [`splice_rest`](Self::splice_rest)
    /// then moves; otherwise changes nothing.
    pub fn splice_plan(&mut self, min: u64) -> Option<(Bytes, u64)> {
        let Kind::Stream(s) = &mut self.kind else {
            return None;
        };
        let State::Length(n) = s.state else {
            return None;
        };
        Self::tcp(s)?;
        let early = (s.buf.len() as u64).min(n);
        if n - early < min {
            return None;
        }
        let data = s.buf.split_to(early as usize).freeze();
        s.state = State::Length(n - early);
        Some((data, n - early))
    }

    /// Moves the rest of the body (after [`splice_plan`](Self::splice_plan)
    /// said yes) to `dst` with `splice(2)`: it never enters this
    /// process. Adds to `moved` the bytes written to `dst` as they go (so
    /// after an error it says how many got out). Afterwards the body is
    /// at its end and its connection went back to the pool; on an error
    /// it is closed instead, and `pipe` must not be used again.
    pub async fn splice_rest(
        &mut self,
        dst: &tokio::net::TcpStream,
        pipe: &mut crate::splice::Pipe,
        moved: &mut u64,
    ) -> io::Result<()> {
        let Kind::Stream(s) = &mut self.kind else {
            return Err(protocol("splice_rest without splice_plan"));
        };
        let (State::Length(n), true) = (s.state, s.buf.is_empty()) else {
            return Err(protocol("splice_rest without splice_plan"));
        };
        let Some(src) = Self::tcp(s) else {
            return Err(protocol("splice_rest without splice_plan"));
        };
        let spliced = crate::splice::splice_exact(src, dst, n, pipe, moved);
        let spliced = match self.watching.as_mut() {
            None => spliced.await,
            Some(w) => {
                // One wait for the whole splice (a long one is checked
                // every so often, and the host answers).
                let mut spliced = std::pin::pin!(spliced);
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = std::future::Future::poll(spliced.as_mut(), cx) {
                        w.end(r.is_ok());
                        return Poll::Ready(r);
                    }
                    w.poll_silent(cx).map(Err)
                })
                .await
            }
        };
        let Kind::Stream(s) = &mut self.kind else {
            return Err(protocol("splice_rest without splice_plan"));
        };
        match spliced {
            Ok(()) => {
                s.finish();
                Ok(())
            }
            Err(e) => {
                s.state = State::Done;
                s.io = None;
                s.home = None;
                Err(e)
            }
        }
    }
}

impl<K: Hash + Eq + Unpin> http_body::Body for ResponseBody<K> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let me = self.get_mut();
        match &mut me.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream(s) => {
                let next = s.poll_next(cx);
                let next = match me.watching.as_mut() {
                    Some(w) => w.poll(cx, next),
                    None => next,
                };
                next.map(|o| o.map(|r| r.map(Frame::data)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream(s) => s.state == State::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Stream(s) => match s.state {
                State::Length(n) => SizeHint::with_exact(n),
                State::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::test_util::read_head;

    /// A server on the far end of each new connection: it answers each
    /// request head with the next of `answers` (written one byte at a time
    /// when `trickle`), and closes once they are used up. An empty answer
    /// means: take the request, then close without a word (as a server
    /// timing a connection out just then). Counts connections and keeps
    /// the request heads seen.
    struct Script {
        connects: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
        answers: Arc<Mutex<Vec<Vec<Vec<u8>>>>>,
        trickle: bool,
    }

    impl Script {
        /// One entry per connection: the answers given on it, in order.
        fn new(per_connection: &[&[&[u8]]]) -> Self {
            Script {
                connects: Arc::default(),
                heads: Arc::default(),
                answers: Arc::new(Mutex::new(
                    per_connection
                        .iter()
                        .rev()
                        .map(|c| c.iter().map(|a| a.to_vec()).collect())
                        .collect(),
                )),
                trickle: false,
            }
        }

        fn connect(&self) -> impl std::future::Future<Output = Result<BoxedConnection, io::Error>> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let answers = self.answers.lock().unwrap().pop();
            let heads = self.heads.clone();
            let trickle = self.trickle;
            async move {
                let answers = answers.ok_or_else(|| io::Error::other("no more connections"))?;
                let (ours, mut theirs) = tokio::io::duplex(256 << 10);
                tokio::spawn(async move {
                    for a in answers {
                        let Some(head) = read_head(&mut theirs).await else {
                            return;
                        };
                        heads.lock().unwrap().push(head);
                        if a.is_empty() {
                            return;
                        }
                        if trickle {
                            for b in a {
                                theirs.write_all(&[b]).await.unwrap();
                                tokio::task::yield_now().await;
                            }
                        } else if theirs.write_all(&a).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Box::new(ours) as BoxedConnection)
            }
        }

        fn connects(&self) -> usize {
            self.connects.load(Ordering::SeqCst)
        }
    }

    fn parts(method: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri("/p/x?q=1");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    async fn get(
        up: &Upstream<u8>,
        script: &Script,
        method: &str,
    ) -> Result<(http::response::Parts, Vec<u8>), UpstreamError<io::Error>> {
        let resp = up
            .send(1, &parts(method, &[("host", "h")]), &[], || {
                script.connect()
            })
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes().to_vec();
        Ok((parts, body))
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";

    #[test]
    fn request_heads_leave_hop_by_hop_headers_behind() {
        let p = parts(
            "GET",
            &[
                ("host", "h:1"),
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "s"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "h2c"),
                ("proxy-connection", "keep-alive"),
                ("x-forwarded-for", "10.0.0.1"),
                ("accept", "*/*"),
                ("content-length", "12"),
            ],
        );
        assert_eq!(
            String::from_utf8(request_head(&p, &[])).unwrap(),
            "GET /p/x?q=1 HTTP/1.1\r\nhost: h:1\r\nx-forwarded-for: 10.0.0.1\r\naccept: */*\r\n\r\n"
        );
        // An empty body's length goes along (servers may want one on a POST).
        let zero = parts("POST", &[("host", "h"), ("content-length", "0")]);
        assert_eq!(
            String::from_utf8(request_head(&zero, &[])).unwrap(),
            "POST /p/x?q=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
        );
        // Replacements take the place of the request's own, or drop them.
        let host = HeaderValue::from_static("upstream:9");
        let xff = HeaderValue::from_static("10.0.0.1, 10.0.0.2");
        let xff_name = HeaderName::from_static("x-forwarded-for");
        assert_eq!(
            String::from_utf8(request_head(
                &p,
                &[(&header::HOST, Some(&host)), (&xff_name, Some(&xff)), (&header::ACCEPT, None)]
            ))
            .unwrap(),
            "GET /p/x?q=1 HTTP/1.1\r\nhost: upstream:9\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2\r\n\r\n"
        );
    }

    #[test]
    fn takes_only_requests_without_body_or_upgrade() {
        use http_body_util::{Empty, Full};
        let get = parts("GET", &[("host", "h")]);
        assert!(takes(&get, &Empty::<Bytes>::new()));
        assert!(!takes(&get, &Full::new(Bytes::from_static(b"x"))));
        let ws = parts("GET", &[("host", "h"), ("upgrade", "websocket")]);
        assert!(!takes(&ws, &Empty::<Bytes>::new()));
    }

    #[tokio::test]
    async fn a_length_body_comes_whole_and_its_connection_is_reused() {
        let script = Script::new(&[&[OK, OK, OK]]);
        let up = Upstream::new(4);
        for i in 1..=3 {
            let (p, body) = get(&up, &script, "GET").await.unwrap();
            assert_eq!(p.status, 200);
            assert_eq!(body, b"hello");
            assert_eq!(p.headers["x-a"], "1");
            assert_eq!(p.headers["content-length"], "5");
            assert_eq!(up.idle(&1), 1, "request {i}");
        }
        assert_eq!(script.connects(), 1);
        let heads = script.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3);
        assert_eq!(heads[0], "GET /p/x?q=1 HTTP/1.1\r\nhost: h\r\n\r\n");
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_at_any_split_and_trailers_dropped() {
        let chunked: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
            5;ext=1\r\nhello\r\n1A\r\n, this is twenty-six bytes\r\n0\r\nx-t: v\r\n\r\n";
        let mut script = Script::new(&[&[chunked, OK]]);
        script.trickle = true;
        let up = Upstream::new(4);
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "hello, this is twenty-six bytes"
        );
        assert!(!p.headers.contains_key("transfer-encoding"));
        assert!(!p.headers.contains_key("trailer"));
        assert_eq!(
            up.idle(&1),
            1,
            "read to its end, the connection is reusable"
        );
        let (_, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(script.connects(), 1);
    }

    #[tokio::test]
    async fn bodies_until_close_and_closing_servers_do_not_keep_connections() {
        let cases: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\n\r\nto the end",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 10\r\n\r\nto the end",
            b"HTTP/1.0 200 OK\r\ncontent-length: 10\r\n\r\nto the end",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nto the end",
        ];
        for case in cases {
            let script = Script::new(&[&[case]]);
            let up = Upstream::new(4);
            let (p, body) = get(&up, &script, "GET").await.unwrap();
            assert_eq!(p.status, 200);
            assert_eq!(body, b"to the end", "{}", String::from_utf8_lossy(case));
            assert!(!p.headers.contains_key("connection"));
            assert!(!p.headers.contains_key("transfer-encoding"));
            assert_eq!(up.idle(&1), 0, "{}", String::from_utf8_lossy(case));
        }
    }

    #[tokio::test]
    async fn head_204_304_and_interim_answers_have_no_body() {
        let script = Script::new(&[&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\netag: x\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s>\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]]);
        let up = Upstream::new(4);
        let (p, body) = get(&up, &script, "HEAD").await.unwrap();
        assert_eq!((p.status.as_u16(), body.len()), (200, 0));
        assert_eq!(p.headers["content-length"], "10", "HEAD keeps the length");
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!((p.status.as_u16(), body.len()), (204, 0));
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!((p.status.as_u16(), body.len()), (304, 0));
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!((p.status.as_u16(), body.as_slice()), (200, &b"ok"[..]));
        assert!(
            !p.headers.contains_key("link"),
            "the 103's headers stay there"
        );
        assert_eq!(script.connects(), 1, "all four on one connection");
    }

    #[tokio::test]
    async fn malformed_responses_are_precise_errors() {
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x-h: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx-h: {}\r\n", "a".repeat(MAX_HEAD + 10));
        let cases: [(&[u8], &str); 8] = [
            (b"HTTP/1.1 OK\r\n\r\n", "malformed response head"),
            (b"SMTP ready\r\n\r\n", "malformed response head"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
                "conflicting Content-Length headers",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "bad Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n",
                "bad Content-Length",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                "101 without an upgrade request",
            ),
            (many.as_bytes(), "too many response headers"),
            (huge.as_bytes(), "response head too large"),
        ];
        for (answer, why) in cases {
            let script = Script::new(&[&[answer]]);
            let up = Upstream::new(4);
            match get(&up, &script, "GET").await {
                Err(UpstreamError::Protocol(w)) => assert_eq!(w, why),
                other => panic!("{why}: {other:?}"),
            }
            assert_eq!(up.idle(&1), 0);
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_chunked_one_with_a_length_is_not_reused() {
        let script = Script::new(&[&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"]]);
        let up = Upstream::new(4);
        let resp = up
            .send(1, &parts("GET", &[]), &[], || script.connect())
            .await
            .unwrap();
        let err = resp.into_body().collect().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(up.idle(&1), 0);

        let script = Script::new(&[&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ]]);
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(body, b"ok");
        assert!(!p.headers.contains_key("content-length"));
        assert_eq!(up.idle(&1), 0);

        let script =
            Script::new(&[&[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"]]);
        match get(&up, &script, "GET").await {
            Err(UpstreamError::Io(e)) => assert_eq!(e.to_string(), "bad chunk size line"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_along() {
        let big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
            200_000,
            "x".repeat(200_000)
        );
        let script = Script::new(&[&[big.as_bytes()], &[OK]]);
        let up = Upstream::new(4);
        let resp = up
            .send(1, &parts("GET", &[]), &[], || script.connect())
            .await
            .unwrap();
        let mut body = resp.into_body();
        assert!(body.size_hint().exact().is_some());
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(!first.is_empty() && first.len() < 200_000);
        drop(body);
        assert_eq!(up.idle(&1), 0);
        let (_, b) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(b, b"hello");
        assert_eq!(script.connects(), 2);
    }

    /// A [`Silence`] the test fires, counting the waits open.
    #[derive(Default)]
    struct FakeSilence {
        waits: std::sync::atomic::AtomicI64,
        heard: AtomicUsize,
        fire: Arc<tokio::sync::Notify>,
    }

    impl FakeSilence {
        /// Returns once one wait is open (fails after a second).
        async fn until_a_wait_is_open(&self) {
            for _ in 0..100 {
                if self.waits.load(Ordering::SeqCst) == 1 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("no wait open: {}", self.waits.load(Ordering::SeqCst));
        }
    }

    impl Silence for FakeSilence {
        fn begin_wait(&self) {
            self.waits.fetch_add(1, Ordering::SeqCst);
        }
        fn end_wait(&self, heard: bool) {
            self.waits.fetch_sub(1, Ordering::SeqCst);
            if heard {
                self.heard.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn silent(&self) -> Pin<Box<dyn std::future::Future<Output = String> + Send>> {
            let fire = self.fire.clone();
            Box::pin(async move {
                fire.notified().await;
                "the upstream stopped".to_string()
            })
        }
    }

    #[tokio::test]
    async fn a_watched_body_waiting_on_a_silent_upstream_ends_with_an_error() {
        // 10 of 100 bytes, then nothing, the connection held open.
        let partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
        let script = Script::new(&[&[partial, OK]]);
        let up = Upstream::new(4);
        let resp = up
            .send(1, &parts("GET", &[]), &[], || script.connect())
            .await
            .unwrap();
        let fake = Arc::new(FakeSilence::default());
        let by: Arc<dyn Silence> = fake.clone();
        let mut body = resp.into_body().watched(|| by);
        let mut got = Vec::new();
        let waiting = tokio::spawn(async move {
            loop {
                match body.frame().await {
                    Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
                    other => return (other.map(|r| r.map(|_| ())), got),
                }
            }
        });
        fake.until_a_wait_is_open().await;
        assert!(!waiting.is_finished());
        fake.fire.notify_waiters();
        let (end, got) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the body ended")
            .unwrap();
        assert_eq!(got, b"0123456789");
        let e = end.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(e.to_string(), "the upstream stopped");
        assert_eq!(fake.waits.load(Ordering::SeqCst), 0, "the wait ended");
        assert_eq!(up.idle(&1), 0, "a cut body's connection is not reused");
    }

    #[tokio::test]
    async fn any_body_silenced_ends_when_its_upstream_is_found_silent() {
        let (mut tx, inner) = http_body_util::channel::Channel::<Bytes, io::Error>::new(1);
        let fake = Arc::new(FakeSilence::default());
        let by: Arc<dyn Silence> = fake.clone();
        let mut body = Silenced::new(inner, Some(by));
        tx.send_data(Bytes::from("part")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "part");
        let next = tokio::spawn(async move { (body.frame().await, tx) });
        fake.until_a_wait_is_open().await;
        fake.fire.notify_waiters();
        let (end, _tx) = next.await.unwrap();
        let e = end.unwrap().unwrap_err();
        let e = e.downcast::<io::Error>().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(fake.waits.load(Ordering::SeqCst), 0);
        // Without a silence it is the body as it is.
        let (mut tx, inner) = http_body_util::channel::Channel::<Bytes, io::Error>::new(1);
        let body = Silenced::new(inner, None);
        tx.send_data(Bytes::from("all")).await.unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "all");
    }

    #[tokio::test]
    async fn a_finding_ends_only_the_waits_open_then() {
        let (mut tx, inner) = http_body_util::channel::Channel::<Bytes, io::Error>::new(1);
        let fake = Arc::new(FakeSilence::default());
        let by: Arc<dyn Silence> = fake.clone();
        let mut body = std::pin::pin!(Silenced::new(inner, Some(by)));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(fake.waits.load(Ordering::SeqCst), 1);
        tx.send_data(Bytes::from("a")).await.unwrap();
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(fake.waits.load(Ordering::SeqCst), 0);
        // Found silent while this body had its bytes and waited for none.
        fake.fire.notify_waiters();
        assert!(
            body.as_mut().poll_frame(&mut cx).is_pending(),
            "a later wait is not ended by an earlier finding"
        );
        tx.send_data(Bytes::from("b")).await.unwrap();
        drop(tx);
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(fake.waits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_watched_body_that_keeps_coming_ends_its_waits_as_heard() {
        // A body already read whole is not watched at all.
        let script = Script::new(&[&[OK]]);
        let up = Upstream::new(4);
        let resp = up
            .send(1, &parts("GET", &[]), &[], || script.connect())
            .await
            .unwrap();
        let fake = Arc::new(FakeSilence::default());
        let by: Arc<dyn Silence> = fake.clone();
        let body = resp.into_body().watched(|| by);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(fake.heard.load(Ordering::SeqCst), 0);
        // One trickling in byte by byte waits between bytes, and each
        // wait ends as heard.
        let slow = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n{}",
            "y".repeat(300)
        );
        let mut script = Script::new(&[&[slow.as_bytes()]]);
        script.trickle = true;
        let resp = up
            .send(2, &parts("GET", &[]), &[], || script.connect())
            .await
            .unwrap();
        let by: Arc<dyn Silence> = fake.clone();
        let body = resp.into_body().watched(|| by);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 300);
        assert!(fake.heard.load(Ordering::SeqCst) >= 1);
        assert_eq!(fake.waits.load(Ordering::SeqCst), 0, "no wait left open");
    }

    #[tokio::test]
    async fn a_streamed_body_read_to_its_end_leaves_a_small_idle_connection() {
        let big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
            300_000,
            "y".repeat(300_000)
        );
        let script = Script::new(&[&[big.as_bytes(), OK]]);
        let up = Upstream::new(4);
        let (_, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(body.len(), 300_000);
        assert_eq!(up.idle(&1), 1);
        let held = up.shared.lock()[&1][0].buf.capacity();
        assert!(held <= IDLE_BUFFER, "an idle connection holds {held} bytes");
        let (_, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(script.connects(), 1);
    }

    #[tokio::test]
    async fn a_reused_connection_closed_unanswered_is_retried_for_idempotent_methods_only() {
        // The first connection answers once, then takes the next request
        // and closes without answering; the second answers.
        let script = Script::new(&[&[OK, b""], &[OK]]);
        let up = Upstream::new(4);
        get(&up, &script, "GET").await.unwrap();
        let (p, body) = get(&up, &script, "GET").await.unwrap();
        assert_eq!((p.status.as_u16(), body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(script.connects(), 2, "retried on a new connection");

        let script = Script::new(&[&[OK, b""], &[OK]]);
        let up = Upstream::new(4);
        get(&up, &script, "POST").await.unwrap();
        match get(&up, &script, "POST").await {
            Err(UpstreamError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
        assert_eq!(script.connects(), 1, "a POST is not sent twice");
    }

    #[tokio::test]
    async fn idle_connections_the_server_closed_are_dropped_before_use() {
        let script = Script::new(&[&[OK, b""]]);
        let up = Upstream::new(4);
        get(&up, &script, "POST").await.unwrap();
        // The server's side goes away while the connection is idle.
        script.answers.lock().unwrap().clear();
        let (ours, theirs) = tokio::io::duplex(1024);
        drop(theirs);
        up.shared.put(
            1,
            Conn {
                io: Box::new(ours),
                buf: BytesMut::new(),
            },
        );
        // The closed one is on top: dropped on the way to the open one.
        assert!(up.take(&1).is_some(), "the first connection is still open");
        assert_eq!(up.idle(&1), 0, "the closed one is gone");
        assert!(up.take(&1).is_none());
    }

    #[tokio::test]
    async fn connect_failures_are_the_callers_errors() {
        let script = Script::new(&[]);
        let up = Upstream::new(4);
        match get(&up, &script, "GET").await {
            Err(UpstreamError::Connect(e)) => assert_eq!(e.to_string(), "no more connections"),
            other => panic!("{other:?}"),
        }
        up.forget(|_| true);
        assert_eq!(up.idle(&1), 0);
    }
}
