//! Reverse tunnels: the proxy's end of the connections that hidden hosts
//! dial out.
//!
//! ## Protocol
//!
//! 1. The host connects to the proxy's HTTP listener and sends
//!    `GET /.cocalc/tunnel` with `Connection: upgrade`,
//!    `Upgrade: cocalc-tunnel/1` and the three signed-request headers of
//!    [`cocalc_auth::host_auth`], signed by its host key over method
//!    `TUNNEL` and, as the path, this proxy's *handle* (its public base
//!    URL). A handshake made for one proxy therefore does not verify at
//!    another, and each signature is accepted once (a replay within the
//!    60 s clock window is refused).
//!    Handshakes are rate-limited per client address (429), since a bad
//!    signature costs a key lookup on the master.
//! 2. The proxy looks the host's public key up on the master
//!    (`GET /v1/hosts/{h}/key`, cached), checks the signature and answers
//!    `101 Switching Protocols`.
//! 3. The connection then carries HTTP/2 with the **proxy as client** and
//!    the host as server. Each user connection (an ingress request, a
//!    WebSocket, an SSH session) is one HTTP/2 `CONNECT` stream, on which
//!    plain HTTP/1.1 to the host's data plane is spoken, so upgrades work
//!    unchanged. HTTP/2 gives multiplexing, per-stream flow control and
//!    PING keepalives (a tunnel that stops answering is dropped within
//!    [`TunnelConfig::keepalive_timeout`] plus an interval).
//!
//! 4. **Dial-back** (on by default, [`TunnelConfig::dial_back`]): to open
//!    a connection to the host, the proxy first asks over the tunnel for a
//!    separate one: `POST /.cocalc/dial` with a fresh 128-bit nonce in
//!    `x-cocalc-dial`. The host answers `202`, dials the proxy address *it*
//!    is configured with (the proxy cannot point it anywhere else) and
//!    sends `GET /.cocalc/tunnel/dial` with `Upgrade: cocalc-dial/1` and
//!    the nonce. The proxy hands that socket, after `101`, to the request
//!    that asked; the nonce is good for that one connection and only while
//!    the request waits ([`TunnelConfig::dial_timeout`]). The connection
//!    then carries HTTP/1.1 into the host's data plane like a `CONNECT`
//!    stream, but with nothing between the sockets: relayed WebSockets
//!    move by `splice(2)` at both ends, and bodies skip the HTTP/2 framing
//!    and its copies. If a dial-back fails or is late, that request uses
//!    a `CONNECT` stream, and so does every request to that host for
//!    [`TunnelConfig::dial_retry_after`] (a host behind a firewall that
//!    allows only one connection still works, through the tunnel).
//!    Dial-back connections end with the tunnel that asked for them.
//!
//! Why both: the tunnel is how the proxy reaches a host at all (it holds
//! the host's proven identity and carries the dial requests); per-user
//! connections outside it cost one TCP handshake each, which the ingress
//! pays once per pooled keep-alive connection, and save HTTP/2's framing,
//! flow control and two copies of every byte on each side (`cargo bench
//! -p cocalc-daemons --bench proxy`, tunnel rows).
//!
//! A newer tunnel from the same host replaces the older one (a restarted
//! host); the older connection is closed as soon as its open streams
//! have finished (an HTTP/2 client connection ends when its last handle
//! is gone), so a host holds one tunnel plus, briefly, one draining. When a tunnel drops, its streams fail at once, so requests in
//! flight end with a 502 instead of hanging; the host redials with backoff
//! and jitter.
//!
//! [`TunnelHub`] is a [`Transport`] for [`HostEndpoint::Tunnel`]
//! endpoints whose handle is this proxy; [`ProxyTransport`] puts it
//! together with [`TcpTransport`] for hosts with URLs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use cocalc_auth::host_auth::{self, HEADER_HOST, HEADER_SIGNATURE, HEADER_TIME};
use cocalc_auth::paserk;
use cocalc_client::MasterClient;
use cocalc_core::wire::{
    is_dial_nonce, DIAL_HEADER, DIAL_PATH, DIAL_PROTOCOL, DIAL_REQUEST_PATH,
    TUNNEL_CONNECTION_WINDOW, TUNNEL_MAX_FRAME, TUNNEL_MOVE_PATH, TUNNEL_PATH, TUNNEL_PROTOCOL,
    TUNNEL_SIGNED_METHOD, TUNNEL_STREAM_WINDOW,
};
use cocalc_core::{
    ApiError, BoxedConnection, HostEndpoint, HostId, SharedClock, Transport, TransportError,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::TcpTransport;

/// Tunnel tunables.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// This proxy's handle: the base URL hosts dial and sign
    /// (`http://proxy.example:8000`). Hosts register it with the master as
    /// their endpoint.
    pub handle: String,
    /// How far a handshake's time may be from this proxy's clock (default
    /// 60 s).
    pub max_clock_skew: Duration,
    /// HTTP/2 PING interval on idle tunnels (default 10 s).
    pub keepalive_interval: Duration,
    /// A tunnel that does not answer a PING within this is dropped (default
    /// 10 s).
    pub keepalive_timeout: Duration,
    /// How long opening a stream may take before the request fails (default
    /// 5 s).
    pub open_timeout: Duration,
    /// Tunnel handshakes allowed per second (and as burst) per client
    /// address (default 10): a failed signature costs the master a key
    /// lookup, so strangers cannot make the proxy hammer it. Applies when
    /// the router is served with connect info.
    pub handshakes_per_sec: u32,
    /// Ask hosts for dial-back connections (default on): each user
    /// connection to a hidden host gets its own TCP connection, dialled
    /// by the host on request, instead of a stream inside the tunnel.
    /// Off, everything rides the tunnel.
    pub dial_back: bool,
    /// How long a dial-back may take before the request uses a stream in
    /// the tunnel instead (default 3 s). A host whose dial-back failed is
    /// not asked again for [`TunnelConfig::dial_retry_after`].
    pub dial_timeout: Duration,
    /// See [`TunnelConfig::dial_timeout`] (default 60 s).
    pub dial_retry_after: Duration,
    /// Where the hub keeps the host keys the master gave it
    /// ([`TunnelHub::save_state`]), so that hidden hosts can open their
    /// tunnels again while the master is away, also after a restart of
    /// this proxy (default none).
    pub state_dir: Option<std::path::PathBuf>,
}

impl TunnelConfig {
    /// Defaults for a proxy known to hosts as `handle`.
    pub fn new(handle: impl Into<String>) -> Self {
        TunnelConfig {
            handle: handle.into().trim_end_matches('/').to_string(),
            max_clock_skew: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            handshakes_per_sec: 10,
            dial_back: true,
            dial_timeout: Duration::from_secs(3),
            dial_retry_after: Duration::from_secs(60),
            state_dir: None,
        }
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Body>;

/// Host keys kept at most (one per host that dialled lately).
const HOST_KEY_CACHE: u64 = 100_000;

/// The file in [`TunnelConfig::state_dir`]: host id → PASERK public key.
pub const HOST_KEYS_FILE: &str = "tunnel-host-keys.json";

struct Tunnel {
    serial: u64,
    sender: Sender,
    since: Instant,
}

/// Tunnel counters, for metrics and audit.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Tunnels accepted.
    pub accepted: AtomicU64,
    /// Handshakes refused (bad signature, unknown host, replay, stale).
    pub refused: AtomicU64,
    /// Streams opened to hosts inside tunnels.
    pub streams: AtomicU64,
    /// Dial-back connections received from hosts and handed to a request.
    pub dials: AtomicU64,
    /// Dial-backs that failed or timed out (the request then used a
    /// stream inside the tunnel).
    pub dial_failures: AtomicU64,
    /// Dial-back connections refused (unknown or expired nonce).
    pub dials_refused: AtomicU64,
    /// Hosts that agreed to move their tunnel away ([`TunnelHub::drain`]).
    pub moves: AtomicU64,
}

/// A dial-back the proxy asked a host for and is waiting on.
struct PendingDial {
    host: HostId,
    asked: Instant,
    deliver: tokio::sync::oneshot::Sender<BoxedConnection>,
}

/// The tunnels that hidden hosts hold open to this proxy.
pub struct TunnelHub {
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    audit: Arc<dyn cocalc_auth::AuditSink>,
    cfg: TunnelConfig,
    master: MasterClient,
    clock: SharedClock,
    tunnels: Mutex<HashMap<HostId, Tunnel>>,
    /// Host keys from the master: bounded, and looked up again after a
    /// while (and at once when a signature fails, see `check_handshake`).
    keys: moka::sync::Cache<HostId, ed25519_dalek::VerifyingKey>,
    /// Every host key the master gave (at most [`HOST_KEY_CACHE`]), used
    /// when it cannot be asked.
    known_keys: Mutex<HashMap<HostId, ed25519_dalek::VerifyingKey>>,
    seen: Mutex<HashMap<[u8; 64], Instant>>,
    /// Dial-backs asked for, by nonce.
    pending: Mutex<HashMap<String, PendingDial>>,
    /// Hosts whose last dial-back failed, and when.
    no_dial: Mutex<HashMap<HostId, Instant>>,
    /// Set by [`TunnelHub::drain`].
    draining: std::sync::atomic::AtomicBool,
    serial: AtomicU64,
    stats: TunnelStats,
}

impl std::fmt::Debug for TunnelHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHub")
            .field("handle", &self.cfg.handle)
            .finish_non_exhaustive()
    }
}

fn refuse(status: u16, code: &str, message: impl Into<String>) -> Response {
    let e = ApiError::new(status, code, message);
    let s = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (s, Json(e)).into_response()
}

impl TunnelHub {
    /// A hub that looks host keys up on the master through `master`.
    pub fn new(cfg: TunnelConfig, master: MasterClient, clock: SharedClock) -> Arc<Self> {
        Self::with_audit(
            cfg,
            master,
            clock,
            Arc::new(cocalc_auth::TracingAuditSink::new()),
        )
    }

    /// Like [`TunnelHub::new`], with every refused handshake also handed to
    /// `audit` (action `tunnel`, reason the refusal's code).
    pub fn with_audit(
        cfg: TunnelConfig,
        master: MasterClient,
        clock: SharedClock,
        audit: Arc<dyn cocalc_auth::AuditSink>,
    ) -> Arc<Self> {
        let n = std::num::NonZeroU32::new(cfg.handshakes_per_sec.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let known_keys = Mutex::new(restore_host_keys(cfg.state_dir.as_deref()));
        Arc::new(TunnelHub {
            known_keys,
            limiter: governor::RateLimiter::keyed(governor::Quota::per_second(n).allow_burst(n)),
            audit,
            cfg,
            master,
            clock,
            tunnels: Mutex::new(HashMap::new()),
            keys: moka::sync::Cache::builder()
                .max_capacity(HOST_KEY_CACHE)
                .time_to_live(Duration::from_secs(600))
                .build(),
            seen: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            no_dial: Mutex::new(HashMap::new()),
            draining: Default::default(),
            serial: AtomicU64::new(1),
            stats: TunnelStats::default(),
        })
    }

    /// This proxy's handle.
    pub fn handle(&self) -> &str {
        &self.cfg.handle
    }

    /// Drops rate-limit state of clients not seen lately and replay
    /// entries past the clock window, and flushes the audit sink (call
    /// periodically).
    pub fn prune(&self) {
        self.limiter.retain_recent();
        let window = self.cfg.max_clock_skew * 2;
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, at| at.elapsed() < window);
        let retry = self.cfg.dial_retry_after;
        lock(&self.no_dial).retain(|_, at| at.elapsed() < retry);
        self.audit.flush();
    }

    /// The proxy is stopping: new tunnels are refused (503 `draining`), so
    /// hosts land at their other proxies, and every host with a tunnel
    /// here is asked to move it ([`TUNNEL_MOVE_PATH`]). A host that can
    /// dials its next proxy and keeps this tunnel open meanwhile, so the
    /// requests this proxy still gets for it are served through it until
    /// the proxy stops; one that cannot (no other proxy) stays. Returns
    /// once every host has answered (or 5 s have passed), with how many
    /// are moving.
    pub async fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let tunnels: Vec<(HostId, Sender)> = lock(&self.tunnels)
            .iter()
            .map(|(h, t)| (*h, t.sender.clone()))
            .collect();
        let asks = tunnels.into_iter().map(|(host, mut sender)| async move {
            let ask = post_to_host(&mut sender, TUNNEL_MOVE_PATH, None);
            match tokio::time::timeout(Duration::from_secs(5), ask).await {
                Ok(Ok(StatusCode::ACCEPTED)) => {
                    tracing::info!(%host, "draining: the host moves its tunnel to another proxy");
                    self.stats.moves.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Ok(Ok(status)) => {
                    // 409: it has no other proxy to go to.
                    tracing::info!(%host, %status, "draining: the host keeps its tunnel here");
                    false
                }
                Ok(Err(e)) => {
                    tracing::warn!(%host, error = %e, "draining: asking the host to move failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(%host, "draining: the host did not answer the move within 5 s");
                    false
                }
            }
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .filter(|moved| *moved)
            .count()
    }

    /// Whether [`TunnelHub::drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    /// Whether `host` has a tunnel open here now.
    pub fn holds(&self, host: HostId) -> bool {
        lock(&self.tunnels)
            .get(&host)
            .is_some_and(|t| !t.sender.is_closed())
    }

    /// Hosts with a tunnel open now.
    pub fn connected(&self) -> Vec<HostId> {
        let mut v: Vec<HostId> = self
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| !t.sender.is_closed())
            .map(|(h, _)| *h)
            .collect();
        v.sort();
        v
    }

    /// The routes that accept tunnels (`GET /.cocalc/tunnel`) and
    /// dial-back connections (`GET /.cocalc/tunnel/dial`); merge them into
    /// the proxy's HTTP router. Served by
    /// [`cocalc_client::serve::serve`], a dial-back connection reaches the
    /// request as the bare TCP socket, so relays through it can splice.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(TUNNEL_PATH, axum::routing::get(accept))
            .route(DIAL_PATH, axum::routing::get(accept_dial))
            .with_state(self)
    }

    /// `host`'s key: cached, or the master's; when the master cannot be
    /// asked (5xx), the last one it gave.
    async fn host_key(&self, host: HostId) -> Result<ed25519_dalek::VerifyingKey, ApiError> {
        if let Some(k) = self.keys.get(&host) {
            return Ok(k);
        }
        let r = match self.master.host_key(host).await {
            Ok(r) => r,
            Err(e) if e.status >= 500 => {
                let known = lock(&self.known_keys).get(&host).copied();
                return match known {
                    Some(key) => {
                        tracing::warn!(
                            %host,
                            error = %e.message,
                            "the master cannot be asked for a host's key; using the last one it gave"
                        );
                        Ok(key)
                    }
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let key = paserk::decode_public(&r.public_key)
            .map_err(|e| ApiError::new(502, "bad_host_key", format!("host {host}'s key: {e}")))?;
        self.keys.insert(host, key);
        let mut known = lock(&self.known_keys);
        if known.len() < HOST_KEY_CACHE as usize || known.contains_key(&host) {
            known.insert(host, key);
        }
        Ok(key)
    }

    /// Writes the host keys the master gave to [`TunnelConfig::state_dir`]
    /// ([`HOST_KEYS_FILE`], replaced whole); does nothing without one. The
    /// daemon calls it with the ingress's
    /// [`save_state`](crate::Ingress::save_state); a new hub reads it back.
    pub fn save_state(&self) -> std::io::Result<()> {
        let Some(dir) = &self.cfg.state_dir else {
            return Ok(());
        };
        let keys: HashMap<String, String> = lock(&self.known_keys)
            .iter()
            .map(|(h, k)| (h.to_string(), paserk::encode_public(k)))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let text = serde_json::to_vec(&keys).map_err(std::io::Error::other)?;
        cocalc_core::config::write_file_atomically(&dir.join(HOST_KEYS_FILE), &text)
    }

    /// Checks a handshake's signature: against the cached key first, and
    /// once more against the master's current key if that fails (the host
    /// may have re-registered with a new key).
    async fn check_handshake(
        &self,
        h: &axum::http::HeaderMap,
    ) -> Result<HostId, (u16, &'static str, String)> {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let host = host_auth::request_host(get(HEADER_HOST))
            .map_err(|e| (400, "bad_handshake", e.to_string()))?;
        let sig = get(HEADER_SIGNATURE);
        let time = get(HEADER_TIME);
        let now = self.clock.now();
        let check = |key: &ed25519_dalek::VerifyingKey| {
            host_auth::verify_request(
                key,
                host,
                TUNNEL_SIGNED_METHOD,
                &self.cfg.handle,
                time,
                sig,
                b"",
                now,
                self.cfg.max_clock_skew,
            )
        };
        let refused = |e: ApiError| {
            if e.status == 404 {
                (
                    401,
                    "unknown_host",
                    format!("host {host} is not registered with the master"),
                )
            } else {
                (
                    502,
                    "master_unreachable",
                    format!("looking up host {host}'s key: {}", e.message),
                )
            }
        };
        let key = self.host_key(host).await.map_err(refused)?;
        if let Err(first) = check(&key) {
            if !matches!(first, cocalc_auth::HostAuthError::BadSignature(_)) {
                return Err((401, "bad_handshake", first.to_string()));
            }
            self.keys.invalidate(&host);
            let key = self.host_key(host).await.map_err(refused)?;
            check(&key).map_err(|e| (401, "bad_handshake", e.to_string()))?;
        }
        // Each signature opens one tunnel.
        let sig_bytes = sig
            .and_then(|s| {
                use base64::Engine as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .ok()
            })
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or((400, "bad_handshake", "malformed signature".to_string()))?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.cfg.max_clock_skew * 2;
        seen.retain(|_, at| at.elapsed() < window);
        if seen.insert(sig_bytes, Instant::now()).is_some() {
            return Err((
                401,
                "replayed_handshake",
                "this tunnel handshake was already used; sign a fresh one".into(),
            ));
        }
        Ok(host)
    }

    /// Takes a verified, upgraded connection over as `host`'s tunnel.
    async fn attach(self: Arc<Self>, host: HostId, io: hyper::upgrade::Upgraded) {
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(TUNNEL_STREAM_WINDOW)
            .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW)
            .max_frame_size(TUNNEL_MAX_FRAME);
        let (sender, conn) = match b.handshake(io).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%host, error = %e, "tunnel: HTTP/2 handshake failed");
                return;
            }
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                host,
                Tunnel {
                    serial,
                    sender,
                    since: Instant::now(),
                },
            );
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%host, serial, "tunnel up");
        let result = conn.await;
        let mut map = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&host) {
            if t.serial == serial {
                tracing::info!(%host, serial, up_secs = t.since.elapsed().as_secs(), error = ?result.err(), "tunnel down");
                map.remove(&host);
            }
        }
    }

    fn refused(&self, reason: &str, detail: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.audit.record(cocalc_core::AuditRecord::new(
            self.clock.now(),
            cocalc_core::AuditOutcome::Refuse,
            "tunnel",
            reason,
            detail,
        ));
    }

    /// Opens one byte connection to `host`: a dial-back connection when
    /// the config allows and the host managed one lately, else a stream
    /// inside its tunnel.
    pub async fn open_stream(&self, host: HostId) -> Result<BoxedConnection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { host, reason };
        let sender = lock(&self.tunnels).get(&host).map(|t| t.sender.clone());
        let Some(sender) = sender else {
            return Err(unreachable(format!(
                "host {host} is hidden and has no tunnel to this proxy ({}) now",
                self.cfg.handle
            )));
        };
        let recently_failed = lock(&self.no_dial)
            .get(&host)
            .is_some_and(|at| at.elapsed() < self.cfg.dial_retry_after);
        if self.cfg.dial_back && !recently_failed {
            match self.dial(host, sender.clone()).await {
                Ok(conn) => return Ok(conn),
                Err(why) => {
                    self.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
                    lock(&self.no_dial).insert(host, Instant::now());
                    tracing::warn!(%host, %why, retry_after = ?self.cfg.dial_retry_after,
                        "dial-back failed; using streams inside the tunnel");
                }
            }
        }
        self.tunnel_stream(host, sender).await
    }

    /// Asks `host` over its tunnel for a dial-back connection and waits
    /// for it.
    async fn dial(&self, host: HostId, mut sender: Sender) -> Result<BoxedConnection, String> {
        let mut raw = [0u8; 16];
        getrandom::getrandom(&mut raw).map_err(|e| format!("random source: {e}"))?;
        let nonce: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let (deliver, delivered) = tokio::sync::oneshot::channel();
        lock(&self.pending).insert(
            nonce.clone(),
            PendingDial {
                host,
                asked: Instant::now(),
                deliver,
            },
        );
        let ask = async {
            let status =
                post_to_host(&mut sender, DIAL_REQUEST_PATH, Some((DIAL_HEADER, &nonce))).await?;
            if status != StatusCode::ACCEPTED {
                return Err(format!("the host answered {status}"));
            }
            delivered
                .await
                .map_err(|_| "the dial-back was dropped".to_string())
        };
        let result = tokio::time::timeout(self.cfg.dial_timeout, ask)
            .await
            .unwrap_or_else(|_| Err(format!("no dial-back within {:?}", self.cfg.dial_timeout)));
        lock(&self.pending).remove(&nonce);
        if result.is_ok() {
            self.stats.dials.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Opens a `CONNECT` stream inside `host`'s tunnel.
    async fn tunnel_stream(
        &self,
        host: HostId,
        mut sender: Sender,
    ) -> Result<BoxedConnection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { host, reason };
        let open = async {
            sender
                .ready()
                .await
                .map_err(|e| unreachable(format!("tunnel: {e}")))?;
            let req = axum::http::Request::builder()
                .method(Method::CONNECT)
                .uri("cocalc-host:80")
                .body(Body::empty())
                .map_err(|e| unreachable(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(format!("tunnel stream: {e}")))?;
            if resp.status() != StatusCode::OK {
                return Err(unreachable(format!(
                    "host refused a tunnel stream: {}",
                    resp.status()
                )));
            }
            let io = hyper::upgrade::on(resp)
                .await
                .map_err(|e| unreachable(format!("tunnel stream: {e}")))?;
            Ok::<BoxedConnection, TransportError>(Box::new(TokioIo::new(io)))
        };
        let conn = tokio::time::timeout(self.cfg.open_timeout, open)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "opening a tunnel stream took longer than {:?}",
                    self.cfg.open_timeout
                ))
            })??;
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }
}

#[async_trait]
impl Transport for TunnelHub {
    async fn connect(
        &self,
        host: HostId,
        endpoint: &HostEndpoint,
    ) -> Result<BoxedConnection, TransportError> {
        match endpoint {
            HostEndpoint::Tunnel(h) if h.trim_end_matches('/') == self.cfg.handle => {
                self.open_stream(host).await
            }
            HostEndpoint::Tunnel(h) => Err(TransportError::Unreachable {
                host,
                reason: format!(
                    "host {host}'s tunnel lands at the proxy {h}, not at this one ({})",
                    self.cfg.handle
                ),
            }),
            other => Err(TransportError::UnsupportedEndpoint(other.clone())),
        }
    }
}

/// Sends the host a control request over its tunnel (an empty `POST` to
/// `path`, with `header` if given) and returns the status it answered.
async fn post_to_host(
    sender: &mut Sender,
    path: &str,
    header: Option<(&str, &str)>,
) -> Result<StatusCode, String> {
    sender.ready().await.map_err(|e| format!("tunnel: {e}"))?;
    let mut req = axum::http::Request::builder()
        .method(Method::POST)
        .uri(path);
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    let req = req.body(Body::empty()).map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("tunnel: {e}"))?;
    Ok(resp.status())
}

async fn accept(State(hub): State<Arc<TunnelHub>>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    if let Some(peer) = peer {
        if hub.limiter.check_key(&peer.ip()).is_err() {
            hub.refused("rate_limited", &format!("tunnel handshakes from {peer}"));
            let mut r = refuse(
                429,
                "rate_limited",
                "too many tunnel handshakes from this address; retry in 1 s",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    }
    if hub.draining() {
        hub.refused("draining", "a tunnel handshake while the proxy is stopping");
        return refuse(
            503,
            "draining",
            "this proxy is stopping: open the tunnel at another proxy",
        );
    }
    let upgrade_ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TUNNEL_PROTOCOL));
    if !upgrade_ok {
        hub.refused("bad_handshake", "no tunnel Upgrade header");
        return refuse(
            400,
            "bad_handshake",
            format!("a tunnel needs `Upgrade: {TUNNEL_PROTOCOL}`"),
        );
    }
    let host = match hub.check_handshake(req.headers()).await {
        Ok(h) => h,
        Err((status, code, why)) => {
            hub.refused(code, &why);
            return refuse(status, code, why);
        }
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(io) => hub.attach(host, io).await,
            Err(e) => tracing::warn!(%host, error = %e, "tunnel: upgrade failed"),
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_PROTOCOL));
    r
}

/// A dial-back connection arriving from a host: matched to the request
/// that asked for it by its one-time nonce.
async fn accept_dial(State(hub): State<Arc<TunnelHub>>, req: Request) -> Response {
    let upgrade_ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(DIAL_PROTOCOL));
    let nonce = req
        .headers()
        .get(DIAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| is_dial_nonce(n))
        .map(str::to_string);
    let (Some(nonce), true) = (nonce, upgrade_ok) else {
        hub.stats.dials_refused.fetch_add(1, Ordering::Relaxed);
        hub.refused("bad_dial", "dial-back without its Upgrade header or nonce");
        return refuse(
            400,
            "bad_dial",
            format!("a dial-back needs `Upgrade: {DIAL_PROTOCOL}` and a `{DIAL_HEADER}` nonce"),
        );
    };
    // A nonce is good once, for the time its request waits.
    let pending = lock(&hub.pending)
        .remove(&nonce)
        .filter(|p| p.asked.elapsed() < hub.cfg.dial_timeout);
    let Some(pending) = pending else {
        hub.stats.dials_refused.fetch_add(1, Ordering::Relaxed);
        hub.refused("unknown_dial", "dial-back with an unknown or expired nonce");
        return refuse(
            403,
            "unknown_dial",
            "this proxy is not waiting for a dial-back with that nonce",
        );
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let host = pending.host;
        let io = match on_upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(%host, error = %e, "dial-back: upgrade failed");
                return;
            }
        };
        // The bare socket when served by `cocalc_client::serve`.
        let conn: BoxedConnection = match cocalc_client::serve::into_tcp(io) {
            Ok((tcp, early)) if early.is_empty() => Box::new(tcp),
            Ok(_) => {
                // The host is the server on this connection: it must wait
                // for the first request, not talk.
                tracing::warn!(%host, "dial-back: the host sent bytes before a request");
                return;
            }
            Err(io) => Box::new(TokioIo::new(io)),
        };
        let _ = pending.deliver.send(conn);
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(DIAL_PROTOCOL));
    r
}

/// The host keys saved in `dir` ([`TunnelHub::save_state`]); none when
/// there is no file, and those that do not parse are skipped (logged).
fn restore_host_keys(
    dir: Option<&std::path::Path>,
) -> HashMap<HostId, ed25519_dalek::VerifyingKey> {
    let Some(path) = dir.map(|d| d.join(HOST_KEYS_FILE)) else {
        return HashMap::new();
    };
    let saved: HashMap<String, String> = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "saved host keys not read");
            return HashMap::new();
        }
        Ok(text) => serde_json::from_slice(&text).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "saved host keys not read");
            HashMap::new()
        }),
    };
    saved
        .into_iter()
        .filter_map(|(h, k)| Some((h.parse().ok()?, paserk::decode_public(&k).ok()?)))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy's transport: direct TCP for hosts with URLs, the tunnel hub
/// for hidden hosts whose tunnel lands here.
#[derive(Debug, Clone)]
pub struct ProxyTransport {
    tcp: TcpTransport,
    tunnels: Arc<TunnelHub>,
}

impl ProxyTransport {
    /// Direct connections with default timeouts, tunnels through `tunnels`.
    pub fn new(tunnels: Arc<TunnelHub>) -> Self {
        ProxyTransport {
            tcp: TcpTransport::default(),
            tunnels,
        }
    }

    /// Hosts with URLs reached through `tcp` (a private CA for `https://`
    /// hosts: [`TcpTransport::with_tls`]).
    pub fn with_tcp(mut self, tcp: TcpTransport) -> Self {
        self.tcp = tcp;
        self
    }
}

#[async_trait]
impl Transport for ProxyTransport {
    async fn connect(
        &self,
        host: HostId,
        endpoint: &HostEndpoint,
    ) -> Result<BoxedConnection, TransportError> {
        if endpoint.is_tunnel() {
            self.tunnels.connect(host, endpoint).await
        } else {
            self.tcp.connect(host, endpoint).await
        }
    }

    fn holds_tunnel(&self, host: HostId) -> bool {
        self.tunnels.holds(host)
    }
}
