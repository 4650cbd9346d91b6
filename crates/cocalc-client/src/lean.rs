//! [`serve_connection`]: a lean HTTP/1.1 server half for relays, in front
//! of hyper's.
//!
//! Most requests a relay serves are plain: HTTP/1.1, no body, no upgrade.
//! For those this module reads and parses the request head itself
//! (`httparse`, header values sharing the head's bytes), calls a
//! [`LeanService`] in the connection's own task, and writes the answer's
//! head and body itself. A body relayed from an [`Upstream`] connection
//! that is a bare TCP socket, framed by `Content-Length` and large, moves
//! with `splice(2)`: it never enters this process.
//!
//! Everything else goes to hyper: the first request that is not plain
//! (a body, `Transfer-Encoding`, `Upgrade`, `Expect`, HTTP/1.0, an
//! absolute or `*` target, a head this module cannot parse or finds too
//! large, a path the [`LeanService`] declines) hands the connection, with
//! the bytes read so far, to hyper's HTTP/1.1 server for the rest of its
//! life ([`crate::serve::serve_connection`]). So malformed requests get
//! hyper's answers, and upgrades are hyper's as before; relayed
//! WebSockets still reach [`relay_upgraded`](crate::relay::relay_upgraded)
//! as bare sockets ([`crate::serve::into_tcp`]).
//!
//! What it does as an HTTP/1.1 server: keep-alive unless the request or
//! the answer says `Connection: close`; requests pipelined behind one
//! another are answered in order; a client that closes while its request
//! waits for the service drops the service's future (and so the upstream
//! exchange); an answer's body is framed by its exact size when known
//! (`Content-Length`) and chunked otherwise, and none is sent for `HEAD`,
//! 1xx, 204 and 304 (their headers pass as the service gave them); a
//! `Date` header is added when the service gave none. A body that fails
//! or runs short closes the connection, so the client sees a truncated
//! answer, never a wrong one. The whole request head must arrive within
//! [`HEADER_READ_TIMEOUT`] of the connection starting to wait for it
//! (idle keep-alive time included), or the connection closes.
//!
//! [`Upstream`]: crate::upstream::Upstream

use std::error::Error as StdError;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access_log::BodySent;
pub use crate::serve::HEADER_READ_TIMEOUT;
use crate::upstream::ResponseBody;

/// A request head still incomplete after this many bytes goes to hyper
/// (which has its own limit).
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines this module parses; more go to hyper.
const MAX_HEADERS: usize = 64;
/// Bodies at least this large (still to come when the head is written)
/// are spliced; smaller ones are cheaper to copy.
const SPLICE_MIN: u64 = 64 << 10;
/// Free space the read buffer has before each read.
const READ_ROOM: usize = 1 << 10;
/// An answer's head and first bytes of body are written together up to
/// this size.
const COALESCE: usize = 16 << 10;

/// The body of a [`LeanService`]'s answer.
pub enum LeanBody<K> {
    /// Relayed from an [`Upstream`](crate::upstream::Upstream) exchange.
    Upstream(ResponseBody<K>),
    /// Complete in memory (the service's own answers: refusals, errors).
    Full(Bytes),
}

impl<K> std::fmt::Debug for LeanBody<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeanBody::Upstream(b) => f.debug_tuple("Upstream").field(b).finish(),
            LeanBody::Full(b) => f.debug_tuple("Full").field(&b.len()).finish(),
        }
    }
}

/// What answers the plain requests of one connection.
pub trait LeanService: Send + Sync {
    /// The key of the [`Upstream`](crate::upstream::Upstream) pool the
    /// service relays with.
    type Key: Hash + Eq + Unpin + Send + Sync + 'static;

    /// Whether this service answers `req` itself. `false` hands the
    /// connection, from this request on, to the fallback service (the
    /// default answers all).
    fn takes(&self, req: &http::Request<()>) -> bool {
        let _ = req;
        true
    }

    /// Answers a plain request (HTTP/1.1, no body, no upgrade).
    fn call(
        &self,
        req: http::Request<()>,
    ) -> impl Future<Output = http::Response<LeanBody<Self::Key>>> + Send;

    /// Answers as [`LeanService::call`] does, with the access log's
    /// record of the request when the service keeps one: the server
    /// counts the body's bytes on it and drops it once the body is sent
    /// (see [`crate::access_log`]). What the server calls; the default
    /// keeps no record.
    fn call_logged(
        &self,
        req: http::Request<()>,
    ) -> impl Future<Output = (http::Response<LeanBody<Self::Key>>, Option<BodySent>)> + Send {
        async move { (self.call(req).await, None) }
    }
}

/// Serves one accepted TCP connection: plain requests with `lean`, and,
/// from the first request that is not plain on, everything with
/// `fallback` on hyper's HTTP/1.1 server (with upgrades and the same head
/// timeout; see the module overview). Sets `TCP_NODELAY` and keepalive
/// ([`liveness::tune`](crate::liveness::tune)). When `stop`
/// completes, the connection closes once the request in flight (if any)
/// is answered. Returns when the connection has ended; errors of the
/// connection (a client that went away) are not reported.
pub async fn serve_connection<L, S, B>(
    mut tcp: TcpStream,
    lean: L,
    fallback: S,
    stop: impl Future<Output = ()>,
) where
    L: LeanService,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let _ = crate::liveness::tune(&tcp);
    let mut stop = pin!(stop);
    let mut conn = Conn {
        buf: BytesMut::with_capacity(4096),
        out: Vec::with_capacity(1024),
    };
    loop {
        let req = match conn.read_request(&mut tcp, stop.as_mut(), &lean).await {
            Next::Request(req) => req,
            Next::Fallback => break,
            Next::Closed => return,
        };
        let close_asked = wants_close(req.headers());
        let head_only = req.method() == Method::HEAD;
        let (answer, sent) = {
            let mut call = pin!(lean.call_logged(req));
            loop {
                conn.room();
                let room = conn.buf.len() < MAX_HEAD;
                let watch =
                    std::future::poll_fn(|cx| crate::readiness::poll_read(&tcp, cx, &mut conn.buf));
                tokio::select! {
                    biased;
                    a = &mut call => break a,
                    // Watch for the client leaving meanwhile; bytes it
                    // pipelines are kept for the next request.
                    r = watch, if room => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
        };
        match conn
            .answer(&mut tcp, answer, sent, head_only, close_asked)
            .await
        {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = tcp.shutdown().await;
                return;
            }
        }
    }
    // Not plain: hyper serves the rest, starting with the bytes read.
    let io = Prefixed {
        prefix: conn.buf.freeze(),
        io: tcp,
    };
    crate::serve::serve_io(io, fallback, stop).await;
}

/// What came of waiting for a request.
// Returned once per request and moved straight out; boxing the request
// would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(http::Request<()>),
    /// A head this module does not serve: hand the connection to hyper.
    Fallback,
    /// The client closed, the head timed out, or the server is stopping.
    Closed,
}

/// One connection's buffers.
struct Conn {
    /// Read from the client, not yet used.
    buf: BytesMut,
    /// An answer's head being put together.
    out: Vec<u8>,
}

impl Conn {
    /// Makes room in the read buffer before a read (taking back its
    /// memory once the heads split off it are dropped), so reads are not
    /// a few bytes each.
    fn room(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_ROOM {
            self.buf.reserve(4 * READ_ROOM);
        }
    }

    /// Waits for the next request head and parses it.
    async fn read_request(
        &mut self,
        tcp: &mut TcpStream,
        mut stop: Pin<&mut impl Future<Output = ()>>,
        lean: &impl LeanService,
    ) -> Next {
        let deadline = tokio::time::sleep(HEADER_READ_TIMEOUT);
        let mut deadline = pin!(deadline);
        loop {
            if !self.buf.is_empty() {
                match parse_request(&mut self.buf, |r| lean.takes(r)) {
                    Parsed::Request(req) => return Next::Request(req),
                    Parsed::Partial if self.buf.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::Other => return Next::Fallback,
                }
            }
            self.room();
            tokio::select! {
                biased;
                _ = stop.as_mut() => return Next::Closed,
                _ = deadline.as_mut() => return Next::Closed,
                r = std::future::poll_fn(|cx| crate::readiness::poll_read(tcp, cx, &mut self.buf)) => match r {
                    Ok(0) | Err(_) => return Next::Closed,
                    Ok(_) => {}
                },
            }
        }
    }

    /// Writes `answer` to the client, counting its body's bytes on `sent`
    /// (the access log's record of the request, written when this
    /// returns). `Ok(true)` when the connection may carry another
    /// request.
    async fn answer<K: Hash + Eq + Unpin>(
        &mut self,
        tcp: &mut TcpStream,
        answer: http::Response<LeanBody<K>>,
        sent: Option<BodySent>,
        head_only: bool,
        close_asked: bool,
    ) -> io::Result<bool> {
        let (parts, body) = answer.into_parts();
        let count = |n: u64| {
            if let Some(s) = &sent {
                s.add(n);
            }
        };
        let close = close_asked || wants_close(&parts.headers);
        let no_body = head_only
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let mut body = match body {
            LeanBody::Full(data) => {
                let framing = if no_body {
                    Framing::AsGiven
                } else {
                    Framing::Length(data.len() as u64)
                };
                write_head(&mut self.out, &parts, framing, close);
                if !no_body {
                    self.out.extend_from_slice(&data);
                }
                tcp.write_all(&self.out).await?;
                if !no_body {
                    count(data.len() as u64);
                }
                return Ok(!close);
            }
            LeanBody::Upstream(b) => b,
        };
        if no_body {
            write_head(&mut self.out, &parts, Framing::AsGiven, close);
            tcp.write_all(&self.out).await?;
            // The upstream sent no body either (HEAD, 1xx, 204, 304).
            return Ok(!close && body.is_end_stream());
        }
        #[cfg(target_os = "linux")]
        if let Some((early, rest)) = body.splice_plan(SPLICE_MIN) {
            // A pipe from the process's spare ones, returned after the
            // body: an idle keep-alive connection holds none.
            if let Ok(mut pipe) = crate::splice::Pipe::take() {
                let len = early.len() as u64 + rest;
                write_head(&mut self.out, &parts, Framing::Length(len), close);
                self.out.extend_from_slice(&early);
                tcp.write_all(&self.out).await?;
                count(early.len() as u64);
                // A failed splice leaves bytes in the pipe: it is closed.
                // What got out counts either way.
                let mut moved = 0;
                let spliced = body.splice_rest(&*tcp, &mut pipe, &mut moved).await;
                count(moved);
                spliced?;
                pipe.give_back();
                return Ok(!close);
            }
            // No pipe (out of descriptors): copied below, starting with
            // the bytes the plan took.
            let len = early.len() as u64 + rest;
            return self
                .stream(
                    tcp,
                    &parts,
                    Some(early),
                    Some(len),
                    body,
                    close,
                    sent.as_ref(),
                )
                .await;
        }
        let exact = body.size_hint().exact();
        self.stream(tcp, &parts, None, exact, body, close, sent.as_ref())
            .await
    }

    /// Writes the head and then the body frame by frame as it comes:
    /// `first` (if any) before the body's own frames, framed by `exact`
    /// length when known, chunked otherwise; the bytes of body written are
    /// counted on `sent`.
    #[allow(clippy::too_many_arguments)]
    async fn stream<K: Hash + Eq + Unpin>(
        &mut self,
        tcp: &mut TcpStream,
        parts: &http::response::Parts,
        first: Option<Bytes>,
        exact: Option<u64>,
        mut body: ResponseBody<K>,
        close: bool,
        sent: Option<&BodySent>,
    ) -> io::Result<bool> {
        let framing = exact.map_or(Framing::Chunked, Framing::Length);
        write_head(&mut self.out, parts, framing, close);
        let mut left = exact;
        let mut pending = first;
        loop {
            let data = match pending.take() {
                Some(d) => d,
                None => match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    None => break,
                    Some(Err(_)) => return Ok(false),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) if !d.is_empty() => d,
                        _ => continue,
                    },
                },
            };
            if let Some(n) = left.as_mut() {
                if data.len() as u64 > *n {
                    // More than the length said: the answer is cut here.
                    return Ok(false);
                }
                *n -= data.len() as u64;
            } else {
                self.out
                    .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if self.out.len() + data.len() <= COALESCE {
                self.out.extend_from_slice(&data);
            } else {
                tcp.write_all(&self.out).await?;
                self.out.clear();
                tcp.write_all(&data).await?;
            }
            if left.is_none() {
                self.out.extend_from_slice(b"\r\n");
            }
            if !self.out.is_empty() {
                tcp.write_all(&self.out).await?;
                self.out.clear();
            }
            if let Some(s) = sent {
                s.add(data.len() as u64);
            }
        }
        match left {
            Some(0) => {}
            Some(_) => return Ok(false),
            None => self.out.extend_from_slice(b"0\r\n\r\n"),
        }
        if !self.out.is_empty() {
            tcp.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(!close)
    }
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// No body follows: the service's headers pass as they are
    /// (a `HEAD` answer's `Content-Length` included).
    AsGiven,
    Length(u64),
    Chunked,
}

/// Puts an answer's head into `out` (cleared first): status line, the
/// service's headers but framing and connection ones, `Date` if missing,
/// the framing, and `Connection: close` when closing.
fn write_head(out: &mut Vec<u8>, parts: &http::response::Parts, framing: Framing, close: bool) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let as_given = matches!(framing, Framing::AsGiven);
    for (name, value) in &parts.headers {
        let skip = name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && !as_given);
        if !skip {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !parts.headers.contains_key(header::DATE) {
        date::with(|d| header_line(out, b"date", d));
    }
    match framing {
        Framing::AsGiven => {}
        Framing::Length(n) => header_line(out, b"content-length", n.to_string().as_bytes()),
        Framing::Chunked => header_line(out, b"transfer-encoding", b"chunked"),
    }
    if close {
        header_line(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether a `Connection` header lists `close`.
fn wants_close(headers: &HeaderMap) -> bool {
    crate::upstream::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("close"))
}

/// What parsing the buffered bytes gave.
#[allow(clippy::large_enum_variant)] // as `Next`
enum Parsed {
    /// A plain request; its head was taken off the buffer.
    Request(http::Request<()>),
    /// Not a whole head yet.
    Partial,
    /// Not a plain request, or not one this module parses: hyper's.
    Other,
}

/// Parses a request head off the front of `buf` if it is whole, plain
/// (module overview) and one `takes` accepts; otherwise leaves `buf` as
/// it is.
fn parse_request(buf: &mut BytesMut, takes: impl FnOnce(&http::Request<()>) -> bool) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Other;
    }
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        let plain = if n.eq_ignore_ascii_case(b"content-length") {
            h.value.trim_ascii() == b"0"
        } else {
            !(n.eq_ignore_ascii_case(b"transfer-encoding")
                || n.eq_ignore_ascii_case(b"upgrade")
                || n.eq_ignore_ascii_case(b"expect"))
        };
        if !plain {
            return Parsed::Other;
        }
    }
    // Offsets into the buffer, so the frozen head can be shared by the
    // target and the header values.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return Parsed::Other,
    };
    let target = at(path.as_bytes());
    // Name and value of each header line: offset and length of each.
    let mut fields = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = req.headers.len();
    for (slot, h) in fields.iter_mut().zip(req.headers.iter()) {
        let (n, nl) = at(h.name.as_bytes());
        let (v, vl) = at(h.value);
        *slot = (n, nl, v, vl);
    }
    let head = buf.split_to(len).freeze();
    let req = (|| {
        let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).ok()?;
        let mut headers = HeaderMap::with_capacity(count);
        for &(n, nl, v, vl) in &fields[..count] {
            let name = HeaderName::from_bytes(&head[n..n + nl]).ok()?;
            let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl)).ok()?;
            headers.append(name, value);
        }
        let mut req = http::Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        Some(req).filter(|r| takes(r))
    })();
    match req {
        Some(req) => Parsed::Request(req),
        None => {
            // Not ours after all (a header hyper will say is wrong, or
            // one the service declines): the head goes back in front.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Parsed::Other
        }
    }
}

/// The `Date` header value, formatted once per second per thread.
mod date {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        static CACHE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }

    /// Calls `f` with the current `Date` value.
    pub(super) fn with(f: impl FnOnce(&[u8])) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now).into_bytes());
            }
            f(&c.1)
        })
    }
}

/// A connection whose first bytes were already read: they are read again
/// first. Handed to hyper when a connection leaves the lean path.
pub struct Prefixed<T> {
    prefix: Bytes,
    io: T,
}

impl<T> Prefixed<T> {
    /// The bytes not yet read again, and the connection.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstream;
    use cocalc_core::BoxedConnection;
    use http_body_util::BodyExt;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Size of `/big` from the backend: more than a pipe holds.
    const BIG: usize = (3 << 20) + 123;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    use crate::test_util::read_head;

    /// The server inside a project: `/big` is [`BIG`] bytes with a
    /// length, `/chunked` three chunks, `/short` promises a megabyte and
    /// closes after a kilobyte.
    async fn backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    while let Some(head) = read_head(&mut s).await {
                        let line = head.lines().next().unwrap().to_string();
                        if line.starts_with("HEAD /big ") {
                            let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                            s.write_all(h.as_bytes()).await.unwrap();
                        } else if line.starts_with("GET /big ") {
                            let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nx-from: backend\r\n\r\n");
                            s.write_all(h.as_bytes()).await.unwrap();
                            s.write_all(&pattern(BIG)).await.unwrap();
                        } else if line.starts_with("GET /chunked ") {
                            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n").await.unwrap();
                            s.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
                        } else {
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n")
                                .await
                                .unwrap();
                            s.write_all(&[1u8; 1024]).await.unwrap();
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Counts when dropped: the future it lives in was dropped.
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone)]
    struct Svc {
        up: Upstream<u8>,
        backend: SocketAddr,
        seen: Arc<Mutex<Vec<String>>>,
        dropped: Arc<AtomicUsize>,
    }

    impl LeanService for Svc {
        type Key = u8;

        fn takes(&self, req: &http::Request<()>) -> bool {
            !req.uri().path().starts_with("/hyper")
        }

        async fn call(&self, req: http::Request<()>) -> http::Response<LeanBody<u8>> {
            let agent = req
                .headers()
                .get("user-agent")
                .map(|v| v.to_str().unwrap().to_string());
            self.seen
                .lock()
                .unwrap()
                .push(format!("{} {} {agent:?}", req.method(), req.uri()));
            match req.uri().path() {
                "/full" => http::Response::new(LeanBody::Full(Bytes::from_static(b"hello"))),
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    http::Response::new(LeanBody::Full(Bytes::from_static(b"slow")))
                }
                "/wait" => {
                    let _d = Dropped(self.dropped.clone());
                    std::future::pending().await
                }
                _ => {
                    let (parts, ()) = req.into_parts();
                    let backend = self.backend;
                    let connect = || async move {
                        TcpStream::connect(backend)
                            .await
                            .map(|s| Box::new(s) as BoxedConnection)
                    };
                    let r = self.up.send(0, &parts, &[], connect).await.unwrap();
                    r.map(LeanBody::Upstream)
                }
            }
        }
    }

    /// A server with [`Svc`] and a hyper fallback that answers
    /// `fallback <method> <path> <body>`, or a 101 whose socket, taken
    /// with [`into_tcp`](crate::serve::into_tcp), says `raw`.
    async fn server() -> (SocketAddr, Svc) {
        let (addr, svc, _) = server_until(std::future::pending()).await;
        (addr, svc)
    }

    /// [`server`], serving until `shutdown`; the task returns when the
    /// server has.
    async fn server_until(
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (SocketAddr, Svc, tokio::task::JoinHandle<io::Result<()>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let svc = Svc {
            up: Upstream::new(4),
            backend: backend().await,
            seen: Default::default(),
            dropped: Default::default(),
        };
        let s2 = svc.clone();
        let task = tokio::spawn(crate::serve::serve_lean(
            l,
            move |_| {
                let fallback =
                    hyper::service::service_fn(|mut req: http::Request<Incoming>| async move {
                        if req.headers().contains_key(header::UPGRADE) {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let (mut tcp, early) = crate::serve::into_tcp(on.await.unwrap())
                                    .map_err(|_| "not a bare socket")
                                    .unwrap();
                                assert!(early.is_empty());
                                tcp.write_all(b"raw").await.unwrap();
                            });
                            let mut r =
                                http::Response::new(http_body_util::Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut()
                                .insert(header::UPGRADE, HeaderValue::from_static("x"));
                            r.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let (m, p) = (req.method().clone(), req.uri().path().to_string());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("fallback {m} {p} {}", String::from_utf8_lossy(&body));
                        Ok(http::Response::new(http_body_util::Full::new(Bytes::from(
                            text,
                        ))))
                    });
                (s2.clone(), fallback)
            },
            shutdown,
        ));
        (addr, svc, task)
    }

    /// Reads one answer: its head, and a body of its Content-Length.
    async fn answer(c: &mut TcpStream) -> (String, Vec<u8>) {
        let head = read_head(c).await.expect("an answer");
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn plain_requests_are_answered_in_order_on_one_connection() {
        let (addr, svc) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Two pipelined in one write, then a third.
        c.write_all(b"GET /full HTTP/1.1\r\nhost: a\r\nuser-agent: one\r\n\r\nGET /full?x=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..2 {
            let (head, body) = answer(&mut c).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("\r\ndate: "), "a Date is added: {head}");
            assert!(!head.contains("connection"), "{head}");
            assert_eq!(body, b"hello");
        }
        assert_eq!(
            cocalc_testkit::net::tcp_timer(addr, c.local_addr().unwrap()).map(|t| t.0),
            Some(cocalc_testkit::net::KEEPALIVE_TIMER),
            "the server armed keepalive on the connection it accepted"
        );
        c.write_all(b"HEAD /big HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await.unwrap();
        assert!(
            head.contains(&format!("content-length: {BIG}\r\n")),
            "a HEAD answer keeps the length it was given, and has no body: {head}"
        );
        c.write_all(b"GET /full HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = answer(&mut c).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert_eq!(body, b"hello");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed after the answer");
        assert_eq!(
            *svc.seen.lock().unwrap(),
            [
                "GET /full Some(\"one\")",
                "GET /full?x=1 None",
                "HEAD /big None",
                "GET /full None"
            ],
            "the lean service answered all four, with their targets and headers"
        );
    }

    #[tokio::test]
    async fn other_requests_hand_the_connection_to_hyper() {
        let (addr, svc) = server().await;
        // A body: hyper from there on, also for a plain request after it.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /full HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c).await.1, b"hello");
        c.write_all(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabcGET /full HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c).await.1, b"fallback POST /p abc");
        assert_eq!(answer(&mut c).await.1, b"fallback GET /full ");
        // HTTP/1.0, a declined path, chunked, Expect: hyper's.
        for (req, want) in [
            ("GET /full HTTP/1.0\r\n\r\n", "fallback GET /full "),
            ("GET /hyper/x HTTP/1.1\r\nhost: a\r\n\r\n", "fallback GET /hyper/x "),
            (
                "PUT /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                "fallback PUT /c hi",
            ),
            (
                "PUT /e HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
                "fallback PUT /e ",
            ),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            let (head, mut body) = answer(&mut c).await;
            if head.starts_with("HTTP/1.1 100") {
                body = answer(&mut c).await.1;
            }
            assert_eq!(String::from_utf8_lossy(&body), want, "{req:?}");
        }
        // A malformed head gets hyper's 400; a bad header value too.
        for bad in [
            "GET /full HTTP/1.1\r\nbad header\r\n\r\n",
            "GET /full HTTP/1.1\r\nx: a\x01b\r\n\r\n",
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(bad.as_bytes()).await.unwrap();
            let head = read_head(&mut c).await.unwrap();
            assert!(head.starts_with("HTTP/1.1 400"), "{bad:?}: {head}");
        }
        // An upgrade after a plain request: the socket is still bare.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /full HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c).await.1, b"hello");
        c.write_all(b"GET /up HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut raw = [0u8; 3];
        c.read_exact(&mut raw).await.unwrap();
        assert_eq!(&raw, b"raw");
        let seen = svc.seen.lock().unwrap().clone();
        assert!(
            seen.iter().all(|s| s.starts_with("GET /full ")) && seen.len() == 2,
            "only the plain requests before a hand-off reached the lean service: {seen:?}"
        );
    }

    #[tokio::test]
    async fn heads_in_pieces_and_large_heads_are_served() {
        let (addr, svc) = server().await;
        // A head that arrives in three pieces: the lean path waits for all.
        let mut c = TcpStream::connect(addr).await.unwrap();
        for piece in [
            "GET /fu",
            "ll HTTP/1.1\r\nhost:",
            " a\r\nuser-agent: slow\r\n\r\n",
        ] {
            c.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(answer(&mut c).await.1, b"hello");
        // A head still incomplete after MAX_HEAD bytes (a big cookie) goes
        // to hyper, which takes heads that large.
        let cookie = "c=".to_string() + &"x".repeat(MAX_HEAD + 1000);
        let req = format!("GET /full HTTP/1.1\r\nhost: a\r\ncookie: {cookie}\r\n\r\n");
        let (first, rest) = req.as_bytes().split_at(MAX_HEAD + 100);
        c.write_all(first).await.unwrap();
        // Time for the server to read the first part and give up on it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.write_all(rest).await.unwrap();
        assert_eq!(answer(&mut c).await.1, b"fallback GET /full ");
        assert_eq!(
            *svc.seen.lock().unwrap(),
            ["GET /full Some(\"slow\")"],
            "only the head in pieces reached the lean service"
        );
    }

    #[tokio::test]
    async fn relayed_bodies_are_spliced_or_rechunked_and_connections_reused() {
        let (addr, svc) = server().await;
        let client = reqwest::Client::new();
        for round in 0..2 {
            let r = client
                .get(format!("http://{addr}/big"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-from"], "backend");
            assert_eq!(r.content_length(), Some(BIG as u64));
            let body = r.bytes().await.unwrap();
            assert!(
                body[..] == pattern(BIG)[..],
                "round {round}: the body arrives intact"
            );
            assert_eq!(
                svc.up.idle(&0),
                1,
                "the upstream connection went back to the pool"
            );
        }
        let r = client
            .get(format!("http://{addr}/chunked"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["transfer-encoding"], "chunked");
        assert_eq!(r.text().await.unwrap(), "abcde");
        // A body cut short by the server: the client's connection closes
        // before the length it was promised.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /short HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await.unwrap();
        assert!(head.contains("content-length: 1048576"), "{head}");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1024, "what came, then the end");
    }

    #[tokio::test]
    async fn shutdown_answers_requests_in_flight_and_closes_idle_connections() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, svc, task) = server_until(async {
            let _ = stopped.await;
        })
        .await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /full HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut idle).await.1, b"hello");
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        // Stop once the slow request is in the service's hands.
        while svc.seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(()).unwrap();
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the idle connection closed");
        assert_eq!(
            answer(&mut busy).await.1,
            b"slow",
            "the request in flight was answered"
        );
        busy.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "and then its connection closed");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server returned")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_its_request() {
        let (addr, svc) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /wait HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..100 {
            if !svc.seen.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(svc.dropped.load(Ordering::SeqCst), 0);
        drop(c);
        for _ in 0..200 {
            if svc.dropped.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the service's future was not dropped when its client left");
    }
}
