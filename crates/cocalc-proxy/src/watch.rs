//! Telling a host that is slow to answer from one that has stopped.
//!
//! A host whose program hangs — stopped, deadlocked, thrashing — while its
//! kernel runs still accepts TCP connections and acknowledges what is
//! sent to it, so neither connecting nor [TCP keepalive](cocalc_client::liveness)
//! notices anything. A request forwarded to it waits for an answer with
//! no end, and so does its client.
//!
//! No fixed deadline on the answer is right: an exec may run for ten
//! minutes, a request with a body is answered after the client has sent
//! it, and a project's own server may be slow for reasons of its own.
//! What can be checked is whether the host's *program* still answers.
//! [`HostWatch`] counts the requests waiting on each host and notes when
//! the host last answered one. When requests have waited on a host for
//! [`HostWatch::after`] with no answer from it, it asks the host's
//! `GET /health` on a connection of its own. A host that answers that
//! within [`HostWatch::timeout`] is busy, not hung: the waits go on, and
//! it is checked again after another `after`. A host that does not ends
//! every request then waiting on it with 504 `host_not_responding`.
//!
//! Bodies are watched too ([`HostWatch::silence`]): a body the host stops
//! sending midway leaves its client waiting as surely as a missing
//! answer. While a body has nothing to hand out (or is being spliced) it
//! counts as a request waiting on its host, and a check that finds the
//! host silent ends it with an error, which cuts the answer off. The
//! ingress watches every answer's body but a WebSocket's (which may
//! rightly be silent for hours).
//!
//! So one check runs per host at a time, however many requests wait on
//! it; a host that keeps answering something is never checked; and a
//! request pays two atomic counts and a wake-up registration, not a timer
//! of its own (the watch's one ticker looks for hosts that are due every
//! `after / 4`).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cocalc_core::{ApiError, HostEndpoint, HostId};
//! use cocalc_proxy::{watch::HostWatch, TcpTransport};
//! # async fn demo() -> Result<(), ApiError> {
//! let watch = HostWatch::new(
//!     Arc::new(TcpTransport::default()),
//!     Duration::from_secs(10),
//!     Duration::from_secs(10),
//! );
//! let endpoint = HostEndpoint::Url("http://127.0.0.1:8443".into());
//! let host = watch.host(HostId::from_bytes([1; 16]), &endpoint, "127.0.0.1:8443");
//! // An answer that comes at once is returned as it is, with no check.
//! let answer = std::pin::pin!(async { Ok::<_, ApiError>(42) });
//! let n = watch.answer(&host, answer).await?;
//! assert_eq!(n, 42);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cocalc_client::upstream::Silence;
use cocalc_core::{ApiError, HostEndpoint, HostId, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The code of the error a wait ends with when its host does not answer.
pub const HOST_NOT_RESPONDING: &str = "host_not_responding";

/// Checks hosts that keep requests waiting (see the module overview).
/// Cheap to clone: clones share their hosts and checks.
#[derive(Clone)]
pub struct HostWatch {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    after: Duration,
    timeout: Duration,
    /// When this watch began; the clock below counts from it.
    epoch: Instant,
    /// Milliseconds since `epoch`, advanced by the ticker: a clock that
    /// costs requests a load, not a system call.
    now_ms: AtomicU64,
    hosts: Mutex<HashMap<HostId, Arc<Watched>>>,
    stats: WatchStats,
}

/// What [`HostWatch`] has done since it was made.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Health checks the host answered in time.
    pub answered: AtomicU64,
    /// Health checks the host did not answer in time (each ended every
    /// request then waiting on that host).
    pub silent: AtomicU64,
}

/// One host as the watch sees it: get it once per route
/// ([`HostWatch::host`]) and pass it to every [`HostWatch::answer`].
#[derive(Debug)]
pub struct Watched {
    host: HostId,
    /// Where to check it, and the `Host` header to send.
    target: Mutex<(HostEndpoint, String)>,
    /// Requests waiting for this host's answer now.
    waiting: AtomicU64,
    /// When (the watch's clock, ms) the host last answered a request, or
    /// a wait began with none waiting, or a check ended.
    heard_ms: AtomicU64,
    /// A check is running.
    checking: AtomicBool,
    /// Why the last check found the host silent, for the waits it ends.
    failure: Mutex<Option<Arc<str>>>,
    /// Woken when a check finds the host silent.
    silent: Notify,
}

impl std::fmt::Debug for HostWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWatch")
            .field("after", &self.inner.after)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl HostWatch {
    /// Checks hosts through `transport` when requests have waited on
    /// them `after` with no answer (zero: never), giving each check
    /// `timeout`. Spawns the ticker that looks for such hosts (every
    /// `after / 4`, at least 10 ms), which ends with the last clone of
    /// the watch; so call it within a Tokio runtime.
    pub fn new(transport: Arc<dyn Transport>, after: Duration, timeout: Duration) -> Self {
        let inner = Arc::new(Inner {
            transport,
            after,
            timeout,
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
            hosts: Mutex::default(),
            stats: WatchStats::default(),
        });
        if !after.is_zero() {
            tokio::spawn(tick(Arc::downgrade(&inner)));
        }
        HostWatch { inner }
    }

    /// How long requests wait on a host with no answer before it is
    /// checked.
    pub fn after(&self) -> Duration {
        self.inner.after
    }

    /// How long a host has to answer a check.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The checks run so far.
    pub fn stats(&self) -> &WatchStats {
        &self.inner.stats
    }

    /// The watch's state of `host`, to be checked at `endpoint` with
    /// `Host: authority` (each call sets them: the latest route's).
    pub fn host(&self, host: HostId, endpoint: &HostEndpoint, authority: &str) -> Arc<Watched> {
        let target = (endpoint.clone(), authority.to_string());
        let mut hosts = self.inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = hosts.get(&host) {
            *w.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
            return w.clone();
        }
        let w = Arc::new(Watched {
            host,
            target: Mutex::new(target),
            waiting: AtomicU64::new(0),
            heard_ms: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            failure: Mutex::new(None),
            silent: Notify::new(),
        });
        hosts.insert(host, w.clone());
        w
    }

    /// Awaits `answer`, a request's wait for the host `watched` stands
    /// for. If a check finds that host silent while it waits — requests
    /// have waited on it [`HostWatch::after`] with no answer, and it did
    /// not answer `GET /health` within [`HostWatch::timeout`] — `answer`
    /// is dropped (closing its connection to the host) and the result is
    /// a 504 `host_not_responding` saying what the check saw.
    ///
    /// `answer` is pinned by the caller (`std::pin::pin!`), so a large
    /// request future is not moved into this one.
    pub async fn answer<T, F>(&self, watched: &Watched, answer: Pin<&mut F>) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>> + ?Sized,
    {
        if self.inner.after.is_zero() {
            return answer.await;
        }
        let _waiting = Waiting::begin(watched, &self.inner);
        tokio::select! {
            biased;
            r = answer => {
                watched.heard_ms.store(self.inner.now(), Ordering::Relaxed);
                r
            }
            () = watched.silent.notified() => {
                let why = watched.why_silent();
                Err(ApiError::new(
                    504,
                    HOST_NOT_RESPONDING,
                    format!(
                        "the host has answered no request for {:?}, and not its health check \
                         either: {why}",
                        self.inner.after
                    ),
                ))
            }
        }
    }

    /// The watch over an answer's body from the host `watched` stands for
    /// ([`cocalc_client::upstream::ResponseBody::watched`]). A body waits
    /// on the host while it has nothing to hand out (or while it is
    /// spliced), counted with the requests waiting for answers; when a
    /// check finds the host silent, the body ends with an error
    /// (`TimedOut`), so its client sees the answer cut short instead of
    /// waiting without end. (With [`HostWatch::after`] zero nothing is
    /// checked, so nothing ends.)
    pub fn silence(&self, watched: &Arc<Watched>) -> Arc<dyn Silence> {
        Arc::new(BodyWatch {
            inner: self.inner.clone(),
            watched: watched.clone(),
        })
    }

    /// Forgets what is known of `host` (a host gone from the fleet),
    /// unless requests wait on it now: those stay watched, and a later
    /// [`HostWatch::host`] gives the same state.
    pub fn forget(&self, host: HostId) {
        let mut hosts = self.inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts
            .get(&host)
            .is_some_and(|w| w.waiting.load(Ordering::Acquire) == 0)
        {
            hosts.remove(&host);
        }
    }
}

/// A body's waits on its host ([`HostWatch::silence`]).
struct BodyWatch {
    inner: Arc<Inner>,
    watched: Arc<Watched>,
}

impl Silence for BodyWatch {
    fn begin_wait(&self) {
        self.watched.begin_wait(&self.inner);
    }

    fn end_wait(&self, heard: bool) {
        if heard {
            self.watched
                .heard_ms
                .store(self.inner.now(), Ordering::Relaxed);
        }
        self.watched.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    fn silent(&self) -> Pin<Box<dyn Future<Output = String> + Send>> {
        let (watched, after) = (self.watched.clone(), self.inner.after);
        Box::pin(async move {
            watched.silent.notified().await;
            let why = watched.why_silent();
            format!(
                "{HOST_NOT_RESPONDING}: the host sent nothing for {after:?}, and did not \
                 answer its health check either: {why}"
            )
        })
    }
}

/// One request waiting on a host, from its start to its end (this
/// value's drop, however the wait ends: answered, ended by a check, or
/// given up by its client).
struct Waiting<'a> {
    watched: &'a Watched,
}

impl<'a> Waiting<'a> {
    fn begin(watched: &'a Watched, inner: &'a Inner) -> Self {
        watched.begin_wait(inner);
        Waiting { watched }
    }
}

impl Watched {
    /// One more wait on this host (a request's or a body's).
    fn begin_wait(&self, inner: &Inner) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            // The host's silence counts from the first wait, not from
            // whenever it last answered.
            self.heard_ms.store(inner.now(), Ordering::Relaxed);
        }
    }

    /// Why the last check found the host silent.
    fn why_silent(&self) -> Arc<str> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::from("no answer"))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.watched.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// The watch's clock, ms (as of the last tick).
    fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Hosts that have had requests waiting on them for `after` with no
    /// answer and no check running.
    fn due(&self) -> Vec<Arc<Watched>> {
        let now = self.now();
        let after = self.after.as_millis() as u64;
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|w| {
                w.waiting.load(Ordering::Acquire) > 0
                    && now.saturating_sub(w.heard_ms.load(Ordering::Relaxed)) >= after
                    && !w.checking.load(Ordering::Acquire)
            })
            .cloned()
            .collect()
    }

    /// Checks `w`'s host; if it is silent, ends every wait on it.
    async fn check(&self, w: &Watched) {
        let (endpoint, authority) = w.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let failure = match tokio::time::timeout(
            self.timeout,
            probe(&*self.transport, w.host, &endpoint, &authority),
        )
        .await
        {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(_) => Some(format!(
                "no answer to GET /health within {:?}",
                self.timeout
            )),
        };
        match failure {
            None => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
            }
            Some(why) => {
                tracing::warn!(
                    host = %w.host,
                    error = %why,
                    "a host keeps requests waiting and fails its health check; ending them"
                );
                self.stats.silent.fetch_add(1, Ordering::Relaxed);
                *w.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(why));
                w.silent.notify_waiters();
            }
        }
        // The next check, if waits go on, is `after` from now.
        w.heard_ms.store(self.now(), Ordering::Relaxed);
        w.checking.store(false, Ordering::Release);
    }
}

/// Advances the watch's clock and starts the checks that are due, until
/// the watch is dropped.
async fn tick(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.after / 4).max(Duration::from_millis(10)),
        None => return,
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(i) = inner.upgrade() else { return };
        i.now_ms
            .store(i.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        for w in i.due() {
            w.checking.store(true, Ordering::Release);
            let i = i.clone();
            tokio::spawn(async move { i.check(&w).await });
        }
    }
}

/// One `GET /health` on a connection of its own: any HTTP status line
/// means the host's program answers.
async fn probe(
    transport: &dyn Transport,
    host: HostId,
    endpoint: &HostEndpoint,
    authority: &str,
) -> Result<(), String> {
    let mut conn = transport
        .connect(host, endpoint)
        .await
        .map_err(|e| format!("connecting for GET /health: {e}"))?;
    let req = format!(
        "GET /health HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\
         user-agent: cocalc-proxy\r\n\r\n"
    );
    let io = |e: std::io::Error| format!("GET /health: {e}");
    conn.write_all(req.as_bytes()).await.map_err(io)?;
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match conn.read(&mut head[got..]).await.map_err(io)? {
            0 => return Err("GET /health: the connection closed without an answer".into()),
            n => got += n,
        }
    }
    if head.starts_with(b"HTTP/1.") {
        Ok(())
    } else {
        Err("GET /health: the answer is not HTTP".into())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use cocalc_core::{BoxedConnection, TransportError};
    use std::pin::pin;

    /// A transport to hosts that answer `/health` (or, if `hung`, accept
    /// the connection and never answer), counting connections.
    struct Fake {
        hung: std::sync::atomic::AtomicBool,
        connects: AtomicU64,
    }

    #[async_trait]
    impl Transport for Fake {
        async fn connect(
            &self,
            _host: HostId,
            _endpoint: &HostEndpoint,
        ) -> Result<BoxedConnection, TransportError> {
            self.connects.fetch_add(1, Ordering::Relaxed);
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let hung = self.hung.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = theirs.read(&mut buf).await.unwrap_or(0);
                assert!(buf[..n].starts_with(b"GET /health HTTP/1.1\r\nhost: h:1\r\n"));
                if hung {
                    // Keeps the connection open and silent.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let _ = theirs
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
            Ok(Box::new(ours))
        }
    }

    fn watch(hung: bool, after_ms: u64, timeout_ms: u64) -> (Arc<Fake>, HostWatch) {
        let fake = Arc::new(Fake {
            hung: hung.into(),
            connects: AtomicU64::new(0),
        });
        let w = HostWatch::new(
            fake.clone(),
            Duration::from_millis(after_ms),
            Duration::from_millis(timeout_ms),
        );
        (fake, w)
    }

    const HOST: HostId = HostId::from_bytes([7; 16]);

    fn host(w: &HostWatch) -> Arc<Watched> {
        w.host(HOST, &HostEndpoint::Url("http://h:1".into()), "h:1")
    }

    /// An answer after `ms`.
    async fn late<T>(ms: u64, v: T) -> Result<T, ApiError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(v)
    }

    #[tokio::test]
    async fn forgetting_a_host_keeps_its_waits_watched() {
        let (fake, w) = watch(true, 200, 200);
        let h = host(&w);
        let wait = pin!(std::future::pending::<Result<(), ApiError>>());
        let forget = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.forget(HOST);
            // The same state, not a fresh one the ticker never saw waits on.
            assert!(Arc::ptr_eq(&h, &host(&w)));
        };
        let (r, ()) = tokio::join!(w.answer(&h, wait), forget);
        assert_eq!(r.unwrap_err().code, HOST_NOT_RESPONDING);
        assert_eq!(fake.connects.load(Ordering::Relaxed), 1);
        // With nothing waiting, forgetting drops it.
        w.forget(HOST);
        assert!(!Arc::ptr_eq(&h, &host(&w)));
    }

    #[tokio::test]
    async fn a_slow_answer_from_a_live_host_is_waited_for() {
        let (fake, w) = watch(false, 100, 1000);
        let r = w.answer(&host(&w), pin!(late(700, "late"))).await;
        assert_eq!(r, Ok("late"));
        // Checked (every 100 ms or so) while it waited, never silent.
        let answered = w.stats().answered.load(Ordering::Relaxed);
        assert!(answered >= 1, "{answered} checks");
        assert_eq!(fake.connects.load(Ordering::Relaxed), answered);
        assert_eq!(w.stats().silent.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_hung_host_ends_the_waits_with_one_check() {
        let (fake, w) = watch(true, 200, 200);
        let h = host(&w);
        let started = Instant::now();
        let never = || std::future::pending::<Result<(), ApiError>>();
        let (one, two) = (pin!(never()), pin!(never()));
        let (a, b) = tokio::join!(w.answer(&h, one), w.answer(&h, two));
        for e in [a.unwrap_err(), b.unwrap_err()] {
            assert_eq!((e.status, e.code.as_str()), (504, HOST_NOT_RESPONDING));
            assert!(
                e.message.contains("no answer to GET /health within 200ms"),
                "{}",
                e.message
            );
        }
        // The wait, then the check's timeout; one probe for both.
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(fake.connects.load(Ordering::Relaxed), 1);
        assert_eq!(w.stats().silent.load(Ordering::Relaxed), 1);

        // The host recovers: a new long wait has it checked again (every
        // 200 ms or so), finds it answering, and goes on.
        fake.hung.store(false, Ordering::Relaxed);
        assert_eq!(w.answer(&h, pin!(late(600, ()))).await, Ok(()));
        let answered = w.stats().answered.load(Ordering::Relaxed);
        assert!(answered >= 1);
        assert_eq!(fake.connects.load(Ordering::Relaxed), 1 + answered);
        assert_eq!(w.stats().silent.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn answers_keep_a_host_unchecked_and_one_during_a_check_is_taken() {
        let (fake, w) = watch(true, 1000, 5000);
        let h = host(&w);
        // A long wait, while other requests to the host are answered
        // every 100 ms: the host is heard from, so never checked.
        let answers = async {
            for _ in 0..15 {
                w.answer(&h, pin!(late(100, ()))).await.unwrap();
            }
        };
        let long = pin!(late(1500, 1));
        let (r, ()) = tokio::join!(w.answer(&h, long), answers);
        assert_eq!(r, Ok(1));
        assert_eq!(fake.connects.load(Ordering::Relaxed), 0);

        // Alone, a wait gets its host checked after a second; the check
        // (silent until 5 s) is still running when the answer comes.
        assert_eq!(w.answer(&h, pin!(late(1600, 2))).await, Ok(2));
        assert_eq!(fake.connects.load(Ordering::Relaxed), 1);

        let off = HostWatch::new(fake.clone(), Duration::ZERO, Duration::from_secs(1));
        assert_eq!(off.answer(&host(&off), pin!(late(300, 3))).await, Ok(3));
        assert_eq!(fake.connects.load(Ordering::Relaxed), 1);
    }
}
