//! Access logs: one JSON line per request a relay answered, for the
//! operator's tools (`jq`, Loki, a SIEM) — who asked for what, what they
//! were answered and how long it took.
//!
//! [`AccessLog::open`] starts a thread of its own that writes the lines,
//! so a request pays for formatting its line and handing it over, never
//! for a write: a full queue (a stalled disk) drops lines and counts them
//! ([`AccessLog::dropped`]) rather than hold requests up. The thread
//! wakes every [`DRAIN_EVERY`] and writes what has queued in one batch
//! (not a wake-up and a write per request), so a line is on disk within
//! a tenth of a second of its request; [`AccessLog::flush`] writes the
//! queue out at once (a daemon calls it when it stops).
//!
//! Rotation needs no signal: about once a second the thread checks that
//! the file at the log's path is still the one it writes, and opens it
//! again (creating it) when it is not — after `logrotate` moved it away or
//! it was deleted. Lines written in between are in the moved file.
//!
//! Connect tokens never reach the log: a `token=` value in the query is
//! written as `REDACTED`, and headers are not logged.
//!
//! A server keeps a [`Pending`] of each request (its arrival, client,
//! method and target, shared with the request rather than copied) in a
//! [`Waiting`]. Once the answer's head is there, [`Waiting::answered`]
//! turns it into a [`BodySent`], which goes with the answer's body and
//! counts its bytes; the line is written when the body has been sent (or
//! failed, or the client left mid-body), with the status, the time to
//! the head (`micros`), the bytes of body sent (`bytes`) and the time to
//! then (`total_micros`). A [`Logged`] body counts for hyper's servers;
//! the lean server ([`crate::lean`]) gets the [`BodySent`] with the answer
//! (`LeanService::call_logged`). A request dropped before it was answered,
//! because the client went away first, is logged as 499 (nginx's "client
//! closed request"), with the host it waited on. A WebSocket relayed to
//! a server ([`crate::relay::relay_within`]) is logged when it closes,
//! `bytes` counting what the relay sent the client: the server gives the
//! request to [`Waiting::relayed_upgrade`] before forwarding it.
//! Other WebSockets are logged at their upgrade, with `bytes` 0. The
//! proxy's ingress and hosts' per-connection services log this way.
//! [`Entry`] is the line itself, for callers that have all of it at
//! once.
//!
//! ```no_run
//! # fn demo() -> std::io::Result<()> {
//! use cocalc_client::access_log::{AccessLog, Entry, Target};
//! let log = AccessLog::open(Target::parse("/var/log/cocalc/proxy-access.log"))?;
//! log.record(&Entry {
//!     time: cocalc_core::Timestamp(1_764_034_200_123),
//!     client: "192.0.2.7".parse().unwrap(),
//!     method: "GET",
//!     target: "/a778f1d1-6365-4ece-a961-c658fd1a9b4b/port/8888/?token=secret",
//!     version: "HTTP/1.1",
//!     tls: true,
//!     status: 200,
//!     micros: 1_250,
//!     bytes: Some(5_120),
//!     total_micros: Some(2_380),
//!     project: None,
//!     host: None,
//! });
//! // {"time":"2025-11-25T01:30:00.123Z","client":"192.0.2.7","method":"GET",
//! //  "target":"/a778…/port/8888/?token=REDACTED","version":"HTTP/1.1",
//! //  "tls":true,"status":200,"micros":1250,"bytes":5120,"total_micros":2380}
//! # Ok(()) }
//! ```

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;

use cocalc_core::{HostId, ProjectId, Timestamp};

/// Lines queued for the writer at most; more are dropped and counted.
pub const QUEUE: usize = 16_384;

/// Longest target written; a longer one is cut there (on a character
/// boundary) and ends with `…`.
pub const MAX_TARGET: usize = 4096;

/// How often the writer thread writes out what has queued.
pub const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// How often the writer checks that its file is still at the log's path.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Where an access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (a container's log, journald).
    Stdout,
    /// A file, appended to and created (mode 0640) if missing.
    File(PathBuf),
}

impl Target {
    /// `"-"` is standard output; anything else a file's path.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }

    /// Whether the log can be opened as far as can be told without
    /// creating it (a config check): a file's directory must exist. The
    /// error names it.
    pub fn check(&self) -> Result<(), String> {
        let Target::File(path) = self else {
            return Ok(());
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if dir.is_dir() {
            Ok(())
        } else {
            Err(format!(
                "access_log {}: {} is not a directory",
                path.display(),
                dir.display()
            ))
        }
    }
}

/// One request as the log records it. Fields that are `None` are left
/// out of the line.
#[derive(Debug)]
pub struct Entry<'a> {
    /// When the request's head arrived (written in RFC 3339, UTC, to the
    /// millisecond).
    pub time: Timestamp,
    /// The client: the peer, or the client a trusted proxy named.
    pub client: IpAddr,
    /// The method.
    pub method: &'a str,
    /// Path and query as requested, `token=` values `REDACTED`, cut at
    /// [`MAX_TARGET`] bytes.
    pub target: &'a str,
    /// The HTTP version the client spoke (`HTTP/1.1`, `HTTP/2`).
    pub version: &'a str,
    /// Whether the connection was TLS.
    pub tls: bool,
    /// The status answered.
    pub status: u16,
    /// Microseconds from the request's head to the answer's (for a
    /// WebSocket, until it was upgraded).
    pub micros: u64,
    /// Bytes of the answer's body sent (none for a request not answered).
    pub bytes: Option<u64>,
    /// Microseconds from the request's head until the answer's body was
    /// sent, failed, or the client left mid-body.
    pub total_micros: Option<u64>,
    /// The project, when the path named one.
    pub project: Option<ProjectId>,
    /// The host the request went to, when it got that far.
    pub host: Option<HostId>,
}

impl Entry<'_> {
    /// Appends the entry's JSON object (no newline) to `out`. Written by
    /// hand rather than through serde: a line per request is on the
    /// request path, and this costs a fraction of the general encoder
    /// (the time's text is made once a second, ids and numbers without a
    /// formatter).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"{\"time\":\"");
        write_time(self.time, out);
        out.extend_from_slice(b"\",\"client\":\"");
        write_ip(self.client, out);
        out.extend_from_slice(b"\",\"method\":");
        json_str(self.method, out);
        out.extend_from_slice(b",\"target\":");
        json_str(&redact(self.target), out);
        out.extend_from_slice(b",\"version\":");
        json_str(self.version, out);
        out.extend_from_slice(if self.tls {
            b",\"tls\":true,\"status\":"
        } else {
            b",\"tls\":false,\"status\":"
        });
        out.extend_from_slice(num.format(self.status).as_bytes());
        out.extend_from_slice(b",\"micros\":");
        out.extend_from_slice(num.format(self.micros).as_bytes());
        if let Some(b) = self.bytes {
            out.extend_from_slice(b",\"bytes\":");
            out.extend_from_slice(num.format(b).as_bytes());
        }
        if let Some(t) = self.total_micros {
            out.extend_from_slice(b",\"total_micros\":");
            out.extend_from_slice(num.format(t).as_bytes());
        }
        if let Some(p) = self.project {
            out.extend_from_slice(b",\"project\":\"");
            out.extend_from_slice(&p.encode());
            out.push(b'"');
        }
        if let Some(h) = self.host {
            out.extend_from_slice(b",\"host\":\"");
            out.extend_from_slice(&h.encode());
            out.push(b'"');
        }
        out.push(b'}');
    }
}

/// A request on its way in, kept until it is answered and then logged
/// ([`Pending::record`]); the target is the request's own `Uri`, shared,
/// not copied.
#[derive(Debug)]
pub struct Pending {
    started: Instant,
    time: Timestamp,
    client: IpAddr,
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    tls: bool,
    /// An RFC 8441 WebSocket: logged as its client sent and saw it.
    h2_websocket: bool,
}

impl Pending {
    /// `req`, from `client` (over TLS if `tls`), arriving at `time`. The
    /// version is the one the client spoke, when
    /// [`shape_as_http1`](crate::http2::shape_as_http1) changed it; a
    /// WebSocket over HTTP/2 that
    /// [`websocket_as_upgrade`](crate::http2::websocket_as_upgrade) handed
    /// on as an HTTP/1.1 handshake is logged as its client sent it
    /// (`CONNECT`) and saw it answered (`200` for the `101`).
    pub fn new<B>(req: &http::Request<B>, client: IpAddr, tls: bool, time: Timestamp) -> Self {
        let h2_websocket = req
            .extensions()
            .get::<crate::http2::WebSocketOverHttp2>()
            .is_some();
        Pending {
            started: Instant::now(),
            time,
            client,
            method: if h2_websocket {
                http::Method::CONNECT
            } else {
                req.method().clone()
            },
            uri: req.uri().clone(),
            version: req
                .extensions()
                .get::<crate::http2::ClientVersion>()
                .map_or(req.version(), |v| v.0),
            tls,
            h2_websocket,
        }
    }

    /// The request's path.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// Logs the request to `log`, answered with `status` now (and no
    /// body counted); `project` and `host` as far as they are known.
    pub fn record(
        self,
        log: &AccessLog,
        status: http::StatusCode,
        project: Option<ProjectId>,
        host: Option<HostId>,
    ) {
        let micros = micros(self.started.elapsed());
        self.write(log, status.as_u16(), micros, None, project, host);
    }

    /// Logs the request to `log`: answered with `status` after `micros`,
    /// and `body` (bytes sent, and microseconds to then) when known.
    fn write(
        &self,
        log: &AccessLog,
        status: u16,
        micros: u64,
        body: Option<(u64, u64)>,
        project: Option<ProjectId>,
        host: Option<HostId>,
    ) {
        let version = match self.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_11 => "HTTP/1.1",
            http::Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/?",
        };
        let target = self
            .uri
            .path_and_query()
            .map_or_else(|| self.uri.path(), |pq| pq.as_str());
        let status = if self.h2_websocket && status == 101 {
            200
        } else {
            status
        };
        log.record(&Entry {
            time: self.time,
            client: self.client,
            method: self.method.as_str(),
            target,
            version,
            tls: self.tls,
            status,
            micros,
            bytes: body.map(|b| b.0),
            total_micros: body.map(|b| b.1),
            project,
            host,
        });
    }
}

/// `d` in whole microseconds.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The status logged for a request whose client went away before it was
/// answered (nginx's 499, "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// A request waiting for its answer, logged exactly once: once answered
/// ([`Waiting::answered`]), when its body has been sent, or as
/// [`CLIENT_CLOSED`] when dropped unanswered. The project is the one it
/// was routed to, else the one its path names; the host, the one it was
/// routed to.
#[derive(Debug)]
pub struct Waiting {
    pending: Option<Pending>,
    log: Arc<AccessLog>,
    project: Option<ProjectId>,
    host: Option<HostId>,
    /// Handed to the relay of an upgrade ([`Waiting::relayed_upgrade`]).
    upgrading: Option<Upgrading>,
}

impl Waiting {
    /// `pending`, to be logged to `log`.
    pub fn new(pending: Pending, log: Arc<AccessLog>) -> Self {
        Waiting {
            pending: Some(pending),
            log,
            project: None,
            host: None,
            upgrading: None,
        }
    }

    /// If `req` asks for an upgrade, puts an [`Upgrading`] in its
    /// extensions for the relay ([`crate::relay::relay_within`]): an
    /// answer of 101 is then logged when the relayed connection closes,
    /// with the bytes relayed to the client.
    pub fn relayed_upgrade<B>(&mut self, req: &mut http::Request<B>) {
        if req.headers().contains_key(http::header::UPGRADE) {
            let u = Upgrading::default();
            req.extensions_mut().insert(u.clone());
            self.upgrading = Some(u);
        }
    }

    /// The request went to `host` (for `project`, when given; otherwise
    /// the project its path names is logged).
    pub fn routed(&mut self, project: Option<ProjectId>, host: HostId) {
        self.project = project.or(self.project);
        self.host = Some(host);
    }

    /// The answer's head, with `status`, is there: the request is logged
    /// when the [`BodySent`] returned (and its clones) are dropped, with
    /// the bytes counted on it (for a 101 to a request given to
    /// [`Waiting::relayed_upgrade`], also when its relay has ended).
    pub fn answered(mut self, status: http::StatusCode) -> BodySent {
        let pending = self.pending.take().expect("a Waiting is answered once");
        let project = self.project.or_else(|| project_in_path(pending.path()));
        let sent = BodySent(Arc::new(Sending {
            head: micros(pending.started.elapsed()),
            pending,
            log: self.log.clone(),
            status: status.as_u16(),
            project,
            host: self.host,
            bytes: AtomicU64::new(0),
        }));
        if let Some(u) = self.upgrading.take() {
            if status == http::StatusCode::SWITCHING_PROTOCOLS {
                u.fill(sent.clone());
            }
        }
        sent
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            let project = self.project.or_else(|| project_in_path(p.path()));
            let micros = micros(p.started.elapsed());
            p.write(&self.log, CLIENT_CLOSED, micros, None, project, self.host);
        }
    }
}

/// A request whose answer's head is out and whose body is being sent:
/// logged once the last clone is dropped (the body ended or failed, or
/// the client left mid-body), with the bytes counted by
/// [`BodySent::add`]. A server keeps one with the body: a [`Logged`]
/// body, or, for the lean server, what
/// [`LeanService::call_logged`](crate::lean::LeanService::call_logged)
/// returns with the answer.
#[derive(Debug, Clone)]
pub struct BodySent(Arc<Sending>);

impl BodySent {
    /// `n` more bytes of the body were sent.
    pub fn add(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

/// What [`BodySent`] logs when its last clone goes.
#[derive(Debug)]
struct Sending {
    pending: Pending,
    log: Arc<AccessLog>,
    status: u16,
    /// Microseconds to the answer's head.
    head: u64,
    project: Option<ProjectId>,
    host: Option<HostId>,
    bytes: AtomicU64,
}

impl Drop for Sending {
    fn drop(&mut self) {
        let body = (
            *self.bytes.get_mut(),
            micros(self.pending.started.elapsed()),
        );
        self.pending.write(
            &self.log,
            self.status,
            self.head,
            Some(body),
            self.project,
            self.host,
        );
    }
}

/// The access log's record of an upgraded request, for the relay that
/// carries its bytes: a request extension the server fills
/// ([`Upgrading::fill`]) once the answer is 101, and
/// [`crate::relay::relay_within`] takes when the relayed connection has
/// closed, counting what it sent the client. The line is written then.
#[derive(Debug, Clone, Default)]
pub struct Upgrading(Arc<std::sync::Mutex<Option<BodySent>>>);

impl Upgrading {
    /// The request was answered 101: `sent` waits for the relay.
    pub fn fill(&self, sent: BodySent) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
    }

    /// The record, if the server filled it (once).
    pub fn take(&self) -> Option<BodySent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A response body that counts what passes through it on a [`BodySent`]
/// (when there is one) and drops that at its end, so the request is
/// logged when its body has been sent. Without one it only passes the
/// body on.
#[derive(Debug)]
pub struct Logged<B> {
    inner: B,
    sent: Option<BodySent>,
}

impl<B> Logged<B> {
    /// `inner`, counted on `sent`.
    pub fn new(inner: B, sent: Option<BodySent>) -> Self {
        Logged { inner, sent }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(sent) = &this.sent {
            match &r {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        sent.add(d.remaining() as u64);
                    }
                }
                // The end, or a failure: logged now.
                Poll::Ready(_) => this.sent = None,
                Poll::Pending => {}
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The project a path names in its first segment
/// (`/<project id>/…`), if it parses as one.
pub fn project_in_path(path: &str) -> Option<ProjectId> {
    path.strip_prefix('/')?.split('/').next()?.parse().ok()
}

/// `s` as a JSON string: copied as it is when it is printable ASCII with
/// nothing to escape (a request's method and target nearly always are),
/// through serde_json's escaping otherwise.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// An address as text; IPv4 (the usual case) without a formatter.
fn write_ip(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            let mut num = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(num.format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `t` in RFC 3339 (UTC, milliseconds: `2026-11-25T01:30:00.123Z`). The
/// text up to the second is kept per thread and made again only when the
/// second changes.
fn write_time(t: Timestamp, out: &mut Vec<u8>) {
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> =
            const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let (secs, millis) = (t.as_secs(), t.as_millis().rem_euclid(1000));
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            use time::format_description::well_known::Rfc3339;
            let text = time::OffsetDateTime::from_unix_timestamp(secs)
                .ok()
                .and_then(|d| d.format(&Rfc3339).ok())
                .unwrap_or_else(|| secs.to_string());
            // `2026-11-25T01:30:00Z`: the part before the zone.
            *cached = (secs, text.trim_end_matches('Z').to_string());
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
    let mut num = itoa::Buffer::new();
    let ms = num.format(millis);
    out.push(b'.');
    out.extend_from_slice(&b"00"[..3 - ms.len()]);
    out.extend_from_slice(ms.as_bytes());
    out.push(b'Z');
}

/// `target` with every `token=` value in its query replaced by
/// `REDACTED`, and cut at [`MAX_TARGET`] bytes.
pub fn redact(target: &str) -> std::borrow::Cow<'_, str> {
    let mut cut = target;
    if cut.len() > MAX_TARGET {
        let mut end = MAX_TARGET;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        cut = &cut[..end];
    }
    let Some((path, query)) = cut.split_once('?') else {
        return if cut.len() == target.len() {
            target.into()
        } else {
            format!("{cut}…").into()
        };
    };
    let has_token = query.split('&').any(|p| p.starts_with("token="));
    if !has_token && cut.len() == target.len() {
        return target.into();
    }
    let mut out = String::with_capacity(cut.len() + 8);
    out.push_str(path);
    let mut sep = '?';
    for p in query.split('&') {
        out.push(sep);
        sep = '&';
        if p.starts_with("token=") {
            out.push_str("token=REDACTED");
        } else {
            out.push_str(p);
        }
    }
    if cut.len() < target.len() {
        out.push('…');
    }
    out.into()
}

/// An open access log; clones write to the same one. The writer thread
/// ends when the last clone is dropped, after writing what is queued.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    counts: Arc<Counts>,
    target: Arc<Target>,
    writer: std::thread::Thread,
}

#[derive(Debug, Default)]
struct Counts {
    /// Lines queued.
    sent: AtomicU64,
    /// Lines written.
    written: AtomicU64,
    /// Lines not queued: the queue was full.
    full: AtomicU64,
    /// Lines queued that could not be written.
    failed: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("target", &self.target)
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl AccessLog {
    /// Opens `target` (a file is opened now, so a path that cannot be
    /// written is an error at start, naming it) and starts the writer.
    pub fn open(target: Target) -> std::io::Result<Self> {
        Self::open_checking(target, REOPEN_CHECK)
    }

    fn open_checking(target: Target, every: Duration) -> std::io::Result<Self> {
        let out = Out::open(&target)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let writer_counts = counts.clone();
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out, &writer_counts, every))?;
        Ok(AccessLog {
            tx,
            counts,
            target: Arc::new(target),
            writer: writer.thread().clone(),
        })
    }

    /// Has the writer write out what is queued now, and waits until it
    /// has (or `within` has passed: `false`). Lines recorded meanwhile by
    /// others may be written too.
    pub fn flush(&self, within: Duration) -> bool {
        let want = self.counts.sent.load(Ordering::Acquire);
        let started = Instant::now();
        self.writer.unpark();
        loop {
            let done = self.counts.written.load(Ordering::Acquire)
                + self.counts.failed.load(Ordering::Acquire);
            if done >= want {
                return true;
            }
            if started.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queues `entry`'s line for the writer; drops it (counted) if the
    /// queue is full.
    pub fn record(&self, entry: &Entry<'_>) {
        let mut line = Vec::with_capacity(320);
        entry.write_json(&mut line);
        line.push(b'\n');
        match self.tx.try_send(line) {
            Ok(()) => {
                self.counts.sent.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.counts.written.load(Ordering::Relaxed)
    }

    /// Lines dropped so far (the queue was full, or writing failed).
    pub fn dropped(&self) -> u64 {
        self.counts.full.load(Ordering::Relaxed) + self.counts.failed.load(Ordering::Relaxed)
    }

    /// Where the log goes.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

/// What the writer writes to.
enum Out {
    Stdout,
    File {
        path: PathBuf,
        file: std::io::BufWriter<std::fs::File>,
    },
}

impl Out {
    fn open(target: &Target) -> std::io::Result<Self> {
        match target {
            Target::Stdout => Ok(Out::Stdout),
            Target::File(path) => Ok(Out::File {
                path: path.clone(),
                file: std::io::BufWriter::with_capacity(64 << 10, open_file(path)?),
            }),
        }
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout => std::io::stdout().lock().write_all(line),
            Out::File { file, .. } => file.write_all(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Stdout => std::io::stdout().lock().flush(),
            Out::File { file, .. } => file.flush(),
        }
    }

    /// Opens the path again if the file there is not the one written
    /// (moved away, deleted). What was buffered goes to the old one.
    fn reopen_if_moved(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Out::File { path, file } = self else {
            return Ok(());
        };
        let ours = file.get_ref().metadata()?;
        let same = std::fs::metadata(&*path)
            .map(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
            .unwrap_or(false);
        if !same {
            file.flush()?;
            *file = std::io::BufWriter::with_capacity(64 << 10, open_file(path)?);
        }
        Ok(())
    }
}

fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The writer thread: every [`DRAIN_EVERY`] (or when unparked by
/// [`AccessLog::flush`]) writes what has queued and flushes it; looks for
/// a moved file every `every`; ends, after a last batch, when every
/// [`AccessLog`] is gone.
fn write_lines(rx: Receiver<Vec<u8>>, mut out: Out, counts: &Counts, every: Duration) {
    let mut checked = Instant::now();
    let mut failing = false;
    loop {
        std::thread::park_timeout(DRAIN_EVERY.min(every));
        if checked.elapsed() >= every {
            checked = Instant::now();
            if let Err(e) = out.reopen_if_moved() {
                tracing::warn!(error = %e, "access log: cannot open it again");
            }
        }
        let (mut batch, mut ended) = (0u64, false);
        let mut result = Ok(());
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if result.is_ok() {
                        result = out.write(&line);
                    }
                    batch += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        if batch > 0 {
            match result.and_then(|()| out.flush()) {
                Ok(()) => {
                    counts.written.fetch_add(batch, Ordering::Release);
                    failing = false;
                }
                Err(e) => {
                    counts.failed.fetch_add(batch, Ordering::Release);
                    if !failing {
                        tracing::warn!(error = %e, "access log: lines dropped, writing failed");
                        failing = true;
                    }
                }
            }
        }
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str) -> Entry<'_> {
        Entry {
            time: Timestamp(1_764_034_200_123),
            client: "192.0.2.7".parse().unwrap(),
            method: "GET",
            target,
            version: "HTTP/2",
            tls: true,
            status: 200,
            micros: 1250,
            bytes: Some(5120),
            total_micros: Some(2380),
            project: Some("a778f1d1-6365-4ece-a961-c658fd1a9b4b".parse().unwrap()),
            host: None,
        }
    }

    #[test]
    fn tokens_are_redacted_and_long_targets_cut() {
        assert_eq!(redact("/p/x?a=1"), "/p/x?a=1");
        assert_eq!(redact("/p/x"), "/p/x");
        assert_eq!(
            redact("/p/x?a=1&token=v4.public.abc&b=2&token="),
            "/p/x?a=1&token=REDACTED&b=2&token=REDACTED"
        );
        // `mytoken=` is someone else's parameter.
        assert_eq!(redact("/p?mytoken=x"), "/p?mytoken=x");
        let long = format!("/p?token=t&q={}", "é".repeat(MAX_TARGET));
        let cut = redact(&long);
        assert!(
            cut.len() <= MAX_TARGET + "REDACTED".len() + "…".len(),
            "{}",
            cut.len()
        );
        assert!(cut.starts_with("/p?token=REDACTED&q=é"), "{cut}");
        assert!(cut.ends_with('…'));
        let long_path = "/x".repeat(MAX_TARGET);
        assert_eq!(redact(&long_path).len(), MAX_TARGET + "…".len());
    }

    #[test]
    fn lines_are_json_with_what_happened() {
        let mut line = Vec::new();
        entry("/p?token=secret").write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2025-11-25T01:30:00.123Z",
                "client": "192.0.2.7",
                "method": "GET",
                "target": "/p?token=REDACTED",
                "version": "HTTP/2",
                "tls": true,
                "status": 200,
                "micros": 1250,
                "bytes": 5120,
                "total_micros": 2380,
                "project": "a778f1d1-6365-4ece-a961-c658fd1a9b4b",
            })
        );
        // Milliseconds padded, an IPv6 client, a target that needs
        // escaping, a host, no body (not answered).
        let host: HostId = "0b5e0c1d-3a5f-4c8e-9a7b-2f1e0d9c8b7a".parse().unwrap();
        let e = Entry {
            time: Timestamp(1_764_034_200_005),
            client: "2001:db8::7".parse().unwrap(),
            target: "/p/\"é\\\n",
            host: Some(host),
            project: None,
            tls: false,
            bytes: None,
            total_micros: None,
            ..entry("")
        };
        let mut line = Vec::new();
        e.write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["time"], "2025-11-25T01:30:00.005Z");
        assert_eq!(v["client"], "2001:db8::7");
        assert_eq!(v["target"], "/p/\"é\\\n");
        assert_eq!(v["host"], host.to_string());
        assert_eq!(v["tls"], false);
        assert!(v.get("project").is_none(), "{v}");
        assert!(
            v.get("bytes").is_none() && v.get("total_micros").is_none(),
            "{v}"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_rotated_file_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open_checking(Target::File(path.clone()), Duration::from_millis(50))
            .unwrap();
        for i in 0..3 {
            log.record(&entry(&format!("/r{i}")));
        }
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(log.written(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        let targets: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["target"].to_string())
            .collect();
        assert_eq!(targets, ["\"/r0\"", "\"/r1\"", "\"/r2\""]);

        // logrotate moves the file away: new lines go to a new file at
        // the path once the writer notices; none is lost.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        let t = Instant::now();
        while !path.exists() {
            log.record(&entry("/during"));
            assert!(t.elapsed() < Duration::from_secs(10), "not reopened");
            std::thread::sleep(Duration::from_millis(20));
        }
        log.record(&entry("/after"));
        assert!(log.flush(Duration::from_secs(10)));
        let new = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(&rotated).unwrap();
        assert!(new.contains("\"/after\""), "{new}");
        assert_eq!(
            (old.lines().count() + new.lines().count()) as u64,
            log.written()
        );
        assert_eq!(log.dropped(), 0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o007, 0, "not readable by others: {mode:o}");
        }
    }

    #[test]
    fn a_request_dropped_unanswered_is_logged_as_499_with_where_it_waited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = Arc::new(AccessLog::open(Target::File(path.clone())).unwrap());
        let pid = "a778f1d1-6365-4ece-a961-c658fd1a9b4b";
        let host: HostId = "0b5e0c1d-3a5f-4c8e-9a7b-2f1e0d9c8b7a".parse().unwrap();
        let req = |path: String| http::Request::get(path).body(()).unwrap();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let t = Timestamp(1_764_034_200_123);
        // Answered, routed: one line with its status.
        let mut w = Waiting::new(
            Pending::new(&req(format!("/{pid}/a")), client, false, t),
            log.clone(),
        );
        w.routed(None, host);
        drop(w.answered(http::StatusCode::OK));
        // Dropped while waiting on the host: 499, with the host.
        let mut w = Waiting::new(
            Pending::new(&req(format!("/{pid}/b")), client, false, t),
            log.clone(),
        );
        w.routed(None, host);
        drop(w);
        // Dropped before routing: 499, the project from the path.
        drop(Waiting::new(
            Pending::new(&req(format!("/{pid}/c")), client, true, t),
            log.clone(),
        ));
        assert!(log.flush(Duration::from_secs(10)));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<_> = lines
            .iter()
            .map(|l| {
                (
                    l["target"]
                        .as_str()
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .to_string(),
                    l["status"].as_u64().unwrap(),
                    l["project"].as_str().unwrap().to_string(),
                    l.get("host").map(|h| h.as_str().unwrap().to_string()),
                )
            })
            .collect();
        let h = Some(host.to_string());
        assert_eq!(
            seen,
            [
                ("a".to_string(), 200, pid.to_string(), h.clone()),
                ("b".to_string(), 499, pid.to_string(), h),
                ("c".to_string(), 499, pid.to_string(), None),
            ]
        );
    }

    #[tokio::test]
    async fn an_answer_is_logged_once_its_body_has_been_sent() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = Arc::new(AccessLog::open(Target::File(path.clone())).unwrap());
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let waiting = |target: &str| {
            let req = http::Request::get(target).body(()).unwrap();
            Waiting::new(Pending::new(&req, client, false, Timestamp(0)), log.clone())
        };
        let lines = || -> Vec<serde_json::Value> {
            assert!(log.flush(Duration::from_secs(10)));
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };

        // Counted by hand, on clones: logged when the last one goes.
        let sent = waiting("/a").answered(http::StatusCode::OK);
        let other = sent.clone();
        sent.add(100);
        drop(sent);
        std::thread::sleep(Duration::from_millis(5));
        other.add(23);
        assert!(lines().is_empty(), "logged before the body was sent");
        drop(other);
        let l = lines();
        assert_eq!((l.len(), &l[0]["bytes"]), (1, &serde_json::json!(123)));
        let (head, total) = (
            l[0]["micros"].as_u64().unwrap(),
            l[0]["total_micros"].as_u64().unwrap(),
        );
        assert!(total >= head + 5_000, "head {head} µs, total {total} µs");

        // A Logged body counts its frames and logs at its end, before it
        // is dropped; without a BodySent it only passes the body on.
        let sent = waiting("/b").answered(http::StatusCode::PARTIAL_CONTENT);
        let (mut tx, frames) =
            http_body_util::channel::Channel::<bytes::Bytes, std::convert::Infallible>::new(2);
        tx.send_data("hello ".into()).await.unwrap();
        tx.send_data("world".into()).await.unwrap();
        drop(tx);
        let body = Logged::new(frames, Some(sent));
        let mut body = std::pin::pin!(body);
        while body.frame().await.is_some() {}
        let l = lines();
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!((&l[1]["status"], &l[1]["bytes"]), (&206.into(), &11.into()));
        let plain = Logged::new(http_body_util::Full::new(bytes::Bytes::from("x")), None);
        assert_eq!(plain.collect().await.unwrap().to_bytes(), "x");
        assert_eq!(lines().len(), 2);
    }

    #[test]
    fn the_last_lines_are_written_when_the_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(Target::File(path.clone())).unwrap();
        log.record(&entry("/a"));
        log.record(&entry("/b"));
        drop(log);
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{text:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_path_that_cannot_be_written_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("access.log");
        let e = AccessLog::open(Target::File(path.clone())).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(Target::parse("-"), Target::Stdout);
    }
}
