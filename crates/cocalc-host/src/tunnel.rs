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

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, Response, StatusCode};
use axum::Router;
use cocalc_auth::host_auth;
use cocalc_core::wire::{
    TUNNEL_CONNECTION_WINDOW, TUNNEL_MAX_FRAME, TUNNEL_PATH, TUNNEL_PROTOCOL, TUNNEL_SIGNED_METHOD,
    TUNNEL_STREAM_WINDOW,
};
use cocalc_core::{parse_host_url, HostId, SharedClock};
use ed25519_dalek::SigningKey;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::master_link::Backoff;

/// How long the proxy may take to answer a tunnel handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Where and as whom to open the tunnel.
#[derive(Clone)]
pub struct TunnelClientConfig {
    /// The proxy's base URL: where to dial, and the handle the signature
    /// covers (it must equal the proxy's configured handle).
    pub proxy_url: String,
    /// This host.
    pub host: HostId,
    /// This host's key (the one registered with the master).
    pub key: SigningKey,
    /// HTTP/2 PING interval (default 10 s).
    pub keepalive_interval: Duration,
    /// Drop the tunnel when a PING is not answered within this (default 10 s).
    pub keepalive_timeout: Duration,
}

impl std::fmt::Debug for TunnelClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClientConfig")
            .field("proxy_url", &self.proxy_url)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl TunnelClientConfig {
    /// Defaults for dialling `proxy_url` as `host` with `key`.
    pub fn new(proxy_url: impl Into<String>, host: HostId, key: SigningKey) -> Self {
        TunnelClientConfig {
            proxy_url: proxy_url.into().trim_end_matches('/').to_string(),
            host,
            key,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Called with the new state whenever the tunnel comes up or goes down.
pub type TunnelHook = Box<dyn Fn(bool) + Send + Sync>;

/// Keeps a hidden host's tunnel to its proxy open.
pub struct TunnelClient {
    cfg: TunnelClientConfig,
    clock: SharedClock,
    connected: AtomicBool,
    connects: AtomicU64,
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
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            hook: std::sync::OnceLock::new(),
        })
    }

    /// Sets the function told about every change of the tunnel's state (the
    /// host daemon sends a keepalive with the new health). Only the first
    /// call has an effect.
    pub fn on_change(&self, hook: TunnelHook) {
        let _ = self.hook.set(hook);
    }

    fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            if let Some(h) = self.hook.get() {
                h(up);
            }
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

    /// Serves `router` through the tunnel, redialling after every failure,
    /// until `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        router: Router,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        let seed = u64::from_le_bytes(self.cfg.host.as_bytes()[8..16].try_into().unwrap_or([7; 8]));
        let mut backoff = Backoff::new(seed);
        let work = async {
            loop {
                let started = std::time::Instant::now();
                let result = self.once(router.clone()).await;
                self.set_connected(false);
                match result {
                    Ok(()) => tracing::info!(proxy = %self.cfg.proxy_url, "tunnel closed"),
                    Err(e) => {
                        tracing::warn!(proxy = %self.cfg.proxy_url, error = %e, "tunnel failed")
                    }
                }
                // A tunnel that lived a while resets the backoff.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        };
        tokio::select! { _ = work => {}, _ = shutdown => {} }
        self.set_connected(false);
    }

    /// One tunnel: dial, handshake, serve until it ends.
    pub async fn once(&self, router: Router) -> Result<(), TunnelError> {
        if !self.cfg.proxy_url.starts_with("http://") {
            return Err(TunnelError::BadUrl(format!(
                "{:?}: only http:// is supported (no TLS to the proxy yet)",
                self.cfg.proxy_url
            )));
        }
        let addr =
            parse_host_url(&self.cfg.proxy_url).map_err(|e| TunnelError::BadUrl(e.to_string()))?;
        let dial_err = |reason: String| TunnelError::Dial {
            addr: addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .map_err(|_| dial_err("timed out after 10 s".into()))?
        .map_err(|e| dial_err(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| dial_err(e.to_string()))?;
        let conn_err = |e: hyper::Error| TunnelError::Connection(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
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
            &self.cfg.proxy_url,
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
        self.set_connected(true);
        self.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(proxy = %self.cfg.proxy_url, "tunnel up");
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .initial_stream_window_size(TUNNEL_STREAM_WINDOW)
            .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW)
            .max_frame_size(TUNNEL_MAX_FRAME);
        let service = hyper::service::service_fn(move |req| stream(req, router.clone()));
        b.serve_connection(io, service).await.map_err(conn_err)
    }
}

/// One `CONNECT` stream from the proxy: answer 200, then serve HTTP/1.1 on
/// it into the data plane.
async fn stream(
    req: Request<hyper::body::Incoming>,
    router: Router,
) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::CONNECT {
        let mut r = Response::new(Body::from("a tunnel carries CONNECT streams only"));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(r);
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
