//! The host's end of a reverse tunnel: how a hidden host, which accepts no
//! inbound connections, serves its data plane through a proxy.
//!
//! [`TunnelClient::run`] dials the proxy, proves it is this host (a request
//! signed by the host key over the proxy's handle, see
//! `cocalc_proxy::tunnel` for the protocol), and after the upgrade serves
//! HTTP/2 on the connection it opened: every `CONNECT` stream the proxy
//! opens becomes one HTTP/1.1 connection into the data plane router, with
//! upgrades (terminals, WebSockets to project servers) intact. When the
//! tunnel drops it redials with exponential backoff and jitter; HTTP/2
//! PINGs notice a proxy that went silent.
//!
//! The proxy may also ask, over the tunnel, for a *dial-back*: this host
//! then opens one more outbound TCP connection to the same proxy address,
//! presents the proxy's one-time nonce, and serves the data plane on that
//! socket directly. Nothing sits between the socket and the data plane,
//! so a WebSocket relayed there moves by `splice(2)` at both ends. The
//! host only ever dials its own configured proxy address.
//!
//! With an `https://` proxy URL the tunnel and every dial-back connection
//! are TLS (rustls), the proxy verified against the roots of
//! [`TunnelClientConfig::tls`] ([`tls_client_config`]: the system's, or a
//! CA file's); dial-back connections are then served through hyper and
//! copy rather than splice.
//!
//! **Several proxies.** With more than one URL in
//! [`TunnelClientConfig::proxy_urls`] the tunnel lands at one of them at a
//! time. An attempt that does not get a tunnel up (the proxy is down,
//! unreachable, draining or busy) moves the next attempt on to the next
//! URL, round the list, with the same backoff; one the proxy refused
//! because of the host itself (401: not registered with the master yet)
//! is repeated at the same proxy, since every proxy asks the same
//! master; a tunnel that was up and ended is dialled at the same proxy
//! first (it may be restarting). The host
//! stays where it landed rather than going back to the first proxy, and
//! [`TunnelClient::on_change`] tells the host daemon where that is, so
//! that it registers that proxy as its endpoint. Users reach the host
//! through any proxy either way (proxies forward requests for hidden
//! hosts whose tunnels land at other proxies to those).
//!
//! **A proxy that is stopping** (draining) asks its hosts over their
//! tunnels to move ([`TUNNEL_MOVE_PATH`]). A host with another proxy to go
//! to dials the next one at once, *before* it lets the old tunnel go: the
//! old one stays open, serving what the draining proxy still sends it,
//! until that proxy closes it at its stop (or [`MOVE_OVERLAP`] has
//! passed). So a planned stop of a proxy costs its hidden hosts no failed
//! request. If no other proxy takes the tunnel meanwhile (the next one is
//! down too), the host stays at the draining proxy, whose tunnel still
//! serves, and is down only once that tunnel has closed.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, Response, StatusCode};
use axum::Router;
use cocalc_auth::host_auth;
use cocalc_core::wire::{
    is_dial_nonce, DIAL_HEADER, DIAL_PATH, DIAL_PROTOCOL, DIAL_REQUEST_PATH,
    TUNNEL_CONNECTION_WINDOW, TUNNEL_MAX_FRAME, TUNNEL_MOVE_PATH, TUNNEL_PATH, TUNNEL_PROTOCOL,
    TUNNEL_SIGNED_METHOD, TUNNEL_STREAM_WINDOW,
};
use cocalc_core::{parse_host_url, HostId, SharedClock};
use ed25519_dalek::SigningKey;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::master_link::Backoff;

/// How long the proxy may take to answer a tunnel handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a tunnel the proxy asked to move from stays open after the
/// host has dialled its next proxy, at most: the draining proxy closes it
/// at its stop, normally well before.
pub const MOVE_OVERLAP: Duration = Duration::from_secs(60);

/// Dial-back connections one tunnel may have open at once; past this the
/// host answers 503 and the proxy uses streams inside the tunnel, so a
/// misbehaving proxy cannot make the host open sockets without bound.
pub const MAX_DIAL_BACKS: usize = 1024;

/// Why one tunnel attempt ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The proxy URL is not usable.
    #[error("proxy URL: {0}")]
    BadUrl(String),
    /// The proxy could not be reached.
    #[error("dialling the proxy at {addr}: {reason}")]
    Dial {
        /// `host:port` dialled.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The proxy answered the handshake with a refusal.
    #[error("the proxy refused the tunnel ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The proxy's reason.
        message: String,
    },
    /// The connection failed during the handshake or while serving.
    #[error("tunnel connection: {0}")]
    Connection(String),
    /// The roots to verify the proxy with could not be loaded.
    #[error("TLS to the proxy: {0}")]
    Tls(String),
}

/// Where and as whom to open the tunnel.
#[derive(Clone)]
pub struct TunnelClientConfig {
    /// The proxies' base URLs, the preferred first: where to dial, and
    /// the handle the signature covers (each must equal that proxy's
    /// configured handle). The tunnel lands at one of them at a time: see
    /// "Several proxies" in the module overview. Never empty when built
    /// with [`TunnelClientConfig::new`]; add more with
    /// [`TunnelClientConfig::fall_back_to`].
    pub proxy_urls: Vec<String>,
    /// This host.
    pub host: HostId,
    /// This host's key (the one registered with the master).
    pub key: SigningKey,
    /// HTTP/2 PING interval (default 10 s).
    pub keepalive_interval: Duration,
    /// Drop the tunnel when a PING is not answered within this (default 10 s).
    pub keepalive_timeout: Duration,
    /// How to verify the proxies whose URLs are `https://` (required then;
    /// [`tls_client_config`]). Unused for `http://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration for tunnels: the proxy's certificate must
/// chain to one of the certificates in `ca_file` (PEM) when given, else
/// to the system's roots (`SSL_CERT_FILE` or `SSL_CERT_DIR` when set, as
/// OpenSSL reads them).
pub fn tls_client_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, TunnelError> {
    match ca_file {
        Some(path) => cocalc_client::tls_config_from_pem(path)
            .map(Arc::new)
            .map_err(TunnelError::Tls),
        None => cocalc_client::system_tls_config()
            .map(|c| Arc::new(c.clone()))
            .ok_or_else(|| {
                TunnelError::Tls(
                    "no usable root certificates on this system; set tunnel_ca_file".into(),
                )
            }),
    }
}

impl std::fmt::Debug for TunnelClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClientConfig")
            .field("proxy_urls", &self.proxy_urls)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl TunnelClientConfig {
    /// Defaults for dialling `proxy_url` as `host` with `key`.
    pub fn new(proxy_url: impl Into<String>, host: HostId, key: SigningKey) -> Self {
        TunnelClientConfig {
            proxy_urls: vec![proxy_url.into().trim_end_matches('/').to_string()],
            host,
            key,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// Adds `proxy_url` to the proxies the tunnel may land at, after the
    /// ones given so far.
    pub fn fall_back_to(mut self, proxy_url: impl Into<String>) -> Self {
        self.proxy_urls
            .push(proxy_url.into().trim_end_matches('/').to_string());
        self
    }
}

/// How a tunnel's connections to the proxy are made: plain TCP, or TLS
/// to the named server.
#[derive(Clone)]
struct Dial {
    /// The proxy's `host:port` (from this host's own configuration, never
    /// from the proxy).
    addr: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// One connection to the proxy.
enum Dialled {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Dial {
    /// Where and how `proxy_url` is dialled.
    fn new(proxy_url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Self, TunnelError> {
        let addr = parse_host_url(proxy_url).map_err(|e| TunnelError::BadUrl(e.to_string()))?;
        let tls = match (proxy_url.split_once("://").map(|s| s.0), tls) {
            (Some("http"), _) => None,
            (Some("https"), Some(cfg)) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |h| h.0);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| TunnelError::BadUrl(format!("{proxy_url:?}: {e}")))?;
                Some((tokio_rustls::TlsConnector::from(cfg.clone()), name))
            }
            (Some("https"), None) => {
                return Err(TunnelError::BadUrl(format!(
                    "{proxy_url:?} is https but the tunnel has no TLS configuration"
                )))
            }
            _ => {
                return Err(TunnelError::BadUrl(format!(
                    "{proxy_url:?}: expected http:// or https://"
                )))
            }
        };
        Ok(Dial { addr, tls })
    }

    /// A new connection, TCP tuned and (for TLS) the handshake done, all
    /// within `limit`.
    async fn connect(&self, limit: Duration) -> Result<Dialled, TunnelError> {
        let dial_err = |reason: String| TunnelError::Dial {
            addr: self.addr.clone(),
            reason,
        };
        tokio::time::timeout(limit, async {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| dial_err(e.to_string()))?;
            cocalc_client::liveness::tune(&tcp).map_err(|e| dial_err(e.to_string()))?;
            match &self.tls {
                None => Ok(Dialled::Tcp(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| Dialled::Tls(Box::new(s)))
                    .map_err(|e| dial_err(format!("TLS: {e}"))),
            }
        })
        .await
        .map_err(|_| dial_err(format!("timed out after {limit:?}")))?
    }
}

/// Called whenever the tunnel comes up (with the URL of the proxy it
/// landed at) or goes down (`None`).
pub type TunnelHook = Box<dyn Fn(Option<&str>) + Send + Sync>;

/// Keeps a hidden host's tunnel to its proxy open.
pub struct TunnelClient {
    cfg: TunnelClientConfig,
    clock: SharedClock,
    /// Index in `cfg.proxy_urls` of the proxy the tunnel is at, or is
    /// dialled at next.
    current: AtomicUsize,
    connected: AtomicBool,
    /// The proxy the tunnel is up at, as last told to the hook.
    landed: std::sync::Mutex<Option<String>>,
    /// Tunnels moves left behind, which serve on until their proxies
    /// close them, oldest first: the number of tunnels up when the move
    /// began (which names it), its proxy, and its task (stopped with
    /// [`TunnelClient::run`]). While one lives, the host is not down.
    left: std::sync::Mutex<Vec<(u64, String, tokio::task::AbortHandle)>>,
    connects: AtomicU64,
    dials: Arc<AtomicU64>,
    hook: std::sync::OnceLock<TunnelHook>,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("cfg", &self.cfg)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    /// A client; nothing is dialled until [`TunnelClient::run`].
    pub fn new(cfg: TunnelClientConfig, clock: SharedClock) -> Arc<Self> {
        Arc::new(TunnelClient {
            cfg,
            clock,
            current: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            landed: std::sync::Mutex::new(None),
            left: std::sync::Mutex::new(Vec::new()),
            connects: AtomicU64::new(0),
            dials: Arc::new(AtomicU64::new(0)),
            hook: std::sync::OnceLock::new(),
        })
    }

    /// Sets the function told about every change of the tunnel's state
    /// (the host daemon registers the proxy the tunnel landed at as its
    /// endpoint, and sends a keepalive with the new health). Only the
    /// first call has an effect.
    pub fn on_change(&self, hook: TunnelHook) {
        let _ = self.hook.set(hook);
    }

    /// The tunnel is up at `proxy`, or down (`None`): the hook hears of
    /// every change, also from one proxy to another (a move).
    fn set_landed(&self, proxy: Option<&str>) {
        self.connected.store(proxy.is_some(), Ordering::Relaxed);
        let mut landed = self.landed.lock().unwrap_or_else(|p| p.into_inner());
        if landed.as_deref() != proxy {
            *landed = proxy.map(str::to_string);
            if let Some(h) = self.hook.get() {
                h(proxy);
            }
        }
    }

    /// No tunnel is up at the proxy dialled last: the host is down,
    /// unless a tunnel a move left behind still serves, whose proxy it
    /// then stays at (so the master goes on routing users there).
    fn set_down(&self) {
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        self.set_landed(left.last().map(|l| l.1.as_str()));
    }

    /// The tunnel a move left behind (named by `mark`) has ended. If the
    /// host was at its proxy (no tunnel came up elsewhere since), it is
    /// at the proxy of a younger tunnel left behind, or down.
    fn left_tunnel_ended(&self, mark: u64) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = left.iter().position(|l| l.0 == mark) else {
            return;
        };
        let (_, from, _) = left.remove(i);
        let at_it = self
            .landed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(&from);
        if at_it {
            self.set_landed(left.last().map(|l| l.1.as_str()));
        }
    }

    /// The URL of the proxy the tunnel is at (or, while it is down, is
    /// dialled at next).
    pub fn proxy_url(&self) -> &str {
        let urls = &self.cfg.proxy_urls;
        urls.get(self.current.load(Ordering::Relaxed) % urls.len().max(1))
            .map_or("", String::as_str)
    }

    /// After an attempt that did not get a tunnel up, the next one goes
    /// to the next proxy in the list (the first after the last).
    fn try_next_proxy(&self) {
        let n = self.cfg.proxy_urls.len();
        if n > 1 {
            let next = (self.current.load(Ordering::Relaxed) + 1) % n;
            self.current.store(next, Ordering::Relaxed);
        }
    }

    /// True while a tunnel is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many tunnels have been established so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// How many dial-back connections the proxy asked for and got.
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::Relaxed)
    }

    /// Serves the data plane (a [`Router`], or a [`DataPlane`] with the
    /// lean port relay too) through the tunnel, redialling after every
    /// failure, until `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        router: impl Into<DataPlane>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        let router = router.into();
        let seed = u64::from_le_bytes(self.cfg.host.as_bytes()[8..16].try_into().unwrap_or([7; 8]));
        let mut backoff = Backoff::new(seed);
        let movable = self.cfg.proxy_urls.len() > 1;
        let work = async {
            loop {
                let started = std::time::Instant::now();
                let before = self.connects();
                // Told through this tunnel (and only this one) when its
                // proxy asks the host to move.
                let asked_to_move = Arc::new(tokio::sync::Notify::new());
                let mover = movable.then(|| asked_to_move.clone());
                let mut tunnel = Box::pin(self.clone().serve_one(router.clone(), mover));
                let result = tokio::select! {
                    r = &mut tunnel => r,
                    () = asked_to_move.notified() => {
                        // Make before break: the next proxy is dialled now,
                        // and this tunnel goes on serving meanwhile, until
                        // its proxy closes it.
                        let from = self.proxy_url().to_string();
                        tracing::info!(proxy = %from, "the proxy is stopping: moving the tunnel to the next one");
                        let mark = self.connects();
                        let me = self.clone();
                        // Held while the task starts, so that it cannot
                        // end before it is recorded.
                        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
                        let task = tokio::spawn(async move {
                            let _ = tokio::time::timeout(MOVE_OVERLAP, tunnel).await;
                            me.left_tunnel_ended(mark);
                        });
                        left.push((mark, from, task.abort_handle()));
                        drop(left);
                        self.try_next_proxy();
                        continue;
                    }
                };
                self.set_down();
                let proxy = self.proxy_url().to_string();
                match &result {
                    Ok(()) => tracing::info!(%proxy, "tunnel closed"),
                    Err(e) => tracing::warn!(%proxy, error = %e, "tunnel failed"),
                }
                // A tunnel that was up is dialled at the same proxy again
                // (it may be restarting); one that never came up, at the
                // next proxy, unless this proxy refused the host itself.
                if self.connects() == before && !refused_the_host(&result) {
                    self.try_next_proxy();
                }
                // A tunnel that lived a while resets the backoff.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        };
        tokio::select! { _ = work => {}, _ = shutdown => {} }
        for (_, _, task) in self
            .left
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.set_landed(None);
    }

    /// One tunnel: dial, handshake, serve until it ends. Requests to move
    /// ([`TUNNEL_MOVE_PATH`]) are refused: that takes [`TunnelClient::run`].
    pub async fn once(&self, router: impl Into<DataPlane>) -> Result<(), TunnelError> {
        self.serve_one_with(router.into(), None).await
    }

    /// [`TunnelClient::once`] owning its client, `mover` told when the
    /// proxy asks the host to move.
    async fn serve_one(
        self: Arc<Self>,
        router: DataPlane,
        mover: Option<Arc<tokio::sync::Notify>>,
    ) -> Result<(), TunnelError> {
        self.serve_one_with(router, mover).await
    }

    async fn serve_one_with(
        &self,
        router: DataPlane,
        mover: Option<Arc<tokio::sync::Notify>>,
    ) -> Result<(), TunnelError> {
        let DataPlane { router, lean } = router;
        let proxy_url = self.proxy_url();
        let dial = Dial::new(proxy_url, self.cfg.tls.as_ref())?;
        let addr = dial.addr.clone();
        let io: cocalc_core::BoxedConnection = match dial.connect(Duration::from_secs(10)).await? {
            Dialled::Tcp(tcp) => Box::new(tcp),
            Dialled::Tls(tls) => tls,
        };
        let conn_err = |e: hyper::Error| TunnelError::Connection(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(conn_err)?;
        let driver = tokio::spawn(conn.with_upgrades());
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(TUNNEL_PATH)
            .header(header::HOST, &addr)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, TUNNEL_PROTOCOL);
        for (name, value) in host_auth::sign_request(
            &self.cfg.key,
            self.cfg.host,
            TUNNEL_SIGNED_METHOD,
            proxy_url,
            self.clock.now(),
            b"",
        ) {
            req = req.header(name, value);
        }
        let req = req
            .body(Body::empty())
            .map_err(|e| TunnelError::Connection(e.to_string()))?;
        let resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| {
                TunnelError::Connection(format!(
                    "the proxy did not answer the handshake within {HANDSHAKE_TIMEOUT:?}"
                ))
            })?
            .map_err(conn_err)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(Body::new(resp.into_body()), 64 << 10)
                .await
                .unwrap_or_default();
            let message = serde_json::from_slice::<cocalc_core::ApiError>(&body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            driver.abort();
            return Err(TunnelError::Refused { status, message });
        }
        let io = tokio::time::timeout(HANDSHAKE_TIMEOUT, hyper::upgrade::on(resp))
            .await
            .map_err(|_| TunnelError::Connection("the upgrade did not complete".into()))?
            .map_err(conn_err)?;
        self.set_landed(Some(proxy_url));
        self.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(proxy = %proxy_url, "tunnel up");
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .initial_stream_window_size(TUNNEL_STREAM_WINDOW)
            .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW)
            .max_frame_size(TUNNEL_MAX_FRAME);
        // Dial-back connections live no longer than this tunnel: they end
        // when `_alive` is dropped, as the tunnel's own streams do.
        let (_alive, alive) = tokio::sync::watch::channel(());
        let dialer = Dialer {
            dial,
            router,
            lean,
            alive,
            dials: self.dials.clone(),
            room: Arc::new(tokio::sync::Semaphore::new(MAX_DIAL_BACKS)),
            mover,
        };
        let service = hyper::service::service_fn(move |req| stream(req, dialer.clone()));
        b.serve_connection(io, service).await.map_err(conn_err)
    }
}

/// Whether a tunnel attempt ended with the proxy refusing this host
/// itself (4xx but 429: not registered with the master yet, a key the
/// master does not have), which every proxy would do alike, since they all
/// ask the same master: the attempt is then repeated at the same proxy
/// rather than the next. A proxy that is down, draining (503), busy (429)
/// or cannot ask the master (502) is a reason to try another.
fn refused_the_host(result: &Result<(), TunnelError>) -> bool {
    matches!(result, Err(TunnelError::Refused { status, .. }) if (400..500).contains(status) && *status != 429)
}

/// What a tunnel serves: the data-plane router, and optionally the lean
/// relay for plain port requests
/// ([`LeanPorts`](crate::dataplane::LeanPorts)), which dial-back
/// connections (bare TCP) then take as the host's own listener does.
#[derive(Clone)]
pub struct DataPlane {
    /// Every request (the lean relay's declined ones included).
    pub router: Router,
    /// Plain requests to servers in projects, if set.
    pub lean: Option<crate::dataplane::LeanPorts>,
}

impl From<Router> for DataPlane {
    fn from(router: Router) -> Self {
        DataPlane { router, lean: None }
    }
}

/// What a tunnel stream needs to serve the data plane or dial back.
#[derive(Clone)]
struct Dialer {
    /// How to reach the proxy (from this host's own configuration, never
    /// from the proxy).
    dial: Dial,
    router: Router,
    /// Serves plain port requests on dial-back connections, if set.
    lean: Option<crate::dataplane::LeanPorts>,
    /// Completes `changed()` (with an error) when the tunnel ends.
    alive: tokio::sync::watch::Receiver<()>,
    dials: Arc<AtomicU64>,
    /// One permit per open dial-back connection.
    room: Arc<tokio::sync::Semaphore>,
    /// Told when the proxy asks the host to move its tunnel; `None` when
    /// it cannot (no other proxy to go to).
    mover: Option<Arc<tokio::sync::Notify>>,
}

impl Dialer {
    /// Opens a dial-back connection for `nonce` and serves the data plane
    /// on it until it ends or the tunnel that asked for it does.
    async fn dial_back(self, nonce: String) -> Result<(), TunnelError> {
        let mut conn = self.dial.connect(HANDSHAKE_TIMEOUT).await?;
        let head = format!(
            "GET {DIAL_PATH} HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\n\
             upgrade: {DIAL_PROTOCOL}\r\n{DIAL_HEADER}: {nonce}\r\n\r\n",
            self.dial.addr
        );
        let status = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            match &mut conn {
                Dialled::Tcp(tcp) => {
                    tcp.write_all(head.as_bytes()).await?;
                    read_response_head(tcp).await
                }
                Dialled::Tls(tls) => {
                    tls.write_all(head.as_bytes()).await?;
                    tls.flush().await?;
                    read_response_head_bytewise(tls).await
                }
            }
        })
        .await
        .map_err(|_| TunnelError::Connection("the proxy did not answer the dial-back".into()))?
        .map_err(|e| TunnelError::Connection(format!("dial-back handshake: {e}")))?;
        if status != 101 {
            return Err(TunnelError::Refused {
                status,
                message: "dial-back connection refused".into(),
            });
        }
        self.dials.fetch_add(1, Ordering::Relaxed);
        let mut alive = self.alive;
        let svc = hyper_util::service::TowerToHyperService::new(self.router);
        let pending = std::future::pending::<()>();
        let serve = async move {
            match (conn, self.lean) {
                (Dialled::Tcp(tcp), Some(lean)) => {
                    cocalc_client::lean::serve_connection(tcp, lean, svc, pending).await
                }
                (Dialled::Tcp(tcp), None) => {
                    cocalc_client::serve::serve_connection(tcp, svc, pending).await
                }
                (Dialled::Tls(tls), _) => cocalc_client::serve::serve_io(tls, svc, pending).await,
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = alive.changed() => {}
        }
        Ok(())
    }
}

/// Reads one HTTP/1.1 response head from `tcp` and returns its status,
/// consuming not one byte past the head: what follows belongs to the
/// connection's next user, and the socket itself (not a buffer in front
/// of it) is handed on so relays can `splice(2)` it.
async fn read_response_head(tcp: &mut tokio::net::TcpStream) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind};
    const MAX: usize = 8 << 10;
    let mut head = Vec::new();
    let mut peeked = vec![0u8; MAX];
    loop {
        let n = tcp.peek(&mut peeked).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let mut seen = head.clone();
        seen.extend_from_slice(&peeked[..n]);
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let mut rest = vec![0u8; at + 4 - head.len()];
            tcp.read_exact(&mut rest).await?;
            head.extend_from_slice(&rest);
            return status_of(&head);
        }
        if seen.len() >= MAX {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "response head over 8 KiB",
            ));
        }
        // Everything but the last 3 bytes is head for sure (the end marker
        // may start there); take it so the next peek waits for new bytes.
        let take = n.saturating_sub(3).max(1).min(n);
        let mut part = vec![0u8; take];
        tcp.read_exact(&mut part).await?;
        head.extend_from_slice(&part);
    }
}

/// Like [`read_response_head`] on a stream that cannot be peeked (TLS):
/// one byte at a time, which costs no system call per byte there (the
/// TLS layer reads whole records and hands out what it decrypted).
async fn read_response_head_bytewise(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind};
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8 << 10 {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "response head over 8 KiB",
            ));
        }
        head.push(io.read_u8().await?);
    }
    status_of(&head)
}

/// The status of an HTTP/1 response head.
fn status_of(head: &[u8]) -> std::io::Result<u16> {
    let line = String::from_utf8_lossy(head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP/1 response")
        })
}

/// One stream from the proxy: a `CONNECT` is answered 200 and then
/// carries HTTP/1.1 into the data plane; a `POST` to [`DIAL_REQUEST_PATH`]
/// is answered 202 and this host dials a separate connection back.
async fn stream(
    req: Request<hyper::body::Incoming>,
    dialer: Dialer,
) -> Result<Response<Body>, Infallible> {
    let answer = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Body::from(text));
        *r.status_mut() = status;
        Ok(r)
    };
    if req.method() == Method::POST && req.uri().path() == DIAL_REQUEST_PATH {
        let nonce = req
            .headers()
            .get(DIAL_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|n| is_dial_nonce(n));
        let Some(nonce) = nonce else {
            return answer(StatusCode::BAD_REQUEST, "a dial-back needs a nonce");
        };
        let Ok(permit) = dialer.room.clone().try_acquire_owned() else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many dial-back connections open",
            );
        };
        let nonce = nonce.to_string();
        tokio::spawn(async move {
            if let Err(e) = dialer.dial_back(nonce).await {
                tracing::warn!(error = %e, "dial-back connection failed");
            }
            drop(permit);
        });
        return answer(StatusCode::ACCEPTED, "");
    }
    if req.method() == Method::POST && req.uri().path() == TUNNEL_MOVE_PATH {
        return match &dialer.mover {
            Some(m) => {
                m.notify_waiters();
                answer(StatusCode::ACCEPTED, "")
            }
            None => answer(
                StatusCode::CONFLICT,
                "this host has no other proxy to move its tunnel to",
            ),
        };
    }
    let router = dialer.router;
    if req.method() != Method::CONNECT {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "a tunnel carries CONNECT streams and dial-back requests only",
        );
    }
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(io) => {
                let svc = hyper_util::service::TowerToHyperService::new(router);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(error = %e, "tunnel stream ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "tunnel stream: upgrade failed"),
        }
    });
    Ok(Response::new(Body::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_the_host_itself_keep_the_tunnel_at_the_same_proxy() {
        let refused = |status| {
            Err(TunnelError::Refused {
                status,
                message: String::new(),
            })
        };
        assert!(refused_the_host(&refused(401)), "not registered yet");
        assert!(refused_the_host(&refused(400)));
        for next in [429, 502, 503] {
            assert!(!refused_the_host(&refused(next)), "{next}");
        }
        let down = Err(TunnelError::Dial {
            addr: "proxy:8000".into(),
            reason: "connection refused".into(),
        });
        assert!(!refused_the_host(&down));
        assert!(!refused_the_host(&Ok(())));
    }

    #[test]
    fn tunnel_ca_files_that_do_not_load_are_named_and_https_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = tls_client_config(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "no certificates here\n").unwrap();
        let e = tls_client_config(Some(&junk)).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");

        let e = Dial::new("https://proxy:8443", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no TLS configuration"), "{e}");
        assert!(Dial::new("ftp://proxy:8443", None).is_err());
        let plain = Dial::new("http://proxy:8000", None).unwrap();
        assert_eq!(plain.addr, "proxy:8000");
        assert!(plain.tls.is_none());
    }
}
