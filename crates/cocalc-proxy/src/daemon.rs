//! Everything the `cocalc-proxy` binary does besides parsing arguments.
//!
//! ## Config file (TOML)
//!
//! ```toml
//! listen = "0.0.0.0:8000"
//! master_url = "http://127.0.0.1:8080"
//! api_key_file = "/etc/cocalc/proxy.key"   # a proxy key: `cocalc proxy-key create NAME` (or api_key = "…")
//! key_refresh_secs = 60                    # how often to reload the master's signing keys
//! project_rps = 200                        # requests/s per project (and burst)
//! client_rps = 100                         # requests/s per client address (and burst)
//! client_connections = 1000                # connections per client address (0: no cap)
//! route_ttl_secs = 10                      # how long a host's address is used before the
//!                                          # master is asked again (in the background)
//! route_grace_secs = 3600                  # keep routing to known hosts this long while the
//!                                          # master cannot be asked
//! host_check_after_secs = 10               # requests waiting this long on a host that answers
//! host_check_timeout_secs = 10             # nothing: check its /health; silent: 504 (0: off)
//! # state_dir = "/var/lib/cocalc-proxy"    # keeps signing keys and hosts' addresses, so the
//!                                          # proxy can start while the master is away
//! # trusted_proxies = ["10.0.0.0/8"]       # load balancers in front: their X-Forwarded-For
//!                                          # and X-Forwarded-Proto are believed
//! # proxy_protocol = ["ssh"]               # listeners ("http", "https", "ssh") where they
//!                                          # send a PROXY protocol header instead
//! # public_url = "http://proxy.example:8000" # this proxy's tunnel handle: the URL hidden
//! #                                          # hosts dial and sign (default http://<listen>)
//! ssh_listen = "0.0.0.0:2222"              # optional: SSH ingress (`ssh project-<uuid>@proxy`)
//! ssh_host_key_file = "/var/lib/cocalc/proxy_ssh_ed25519"  # generated (0600) on first start
//! metrics_listen = "127.0.0.1:9101"        # optional: GET /metrics (Prometheus), keep it private
//! # access_log = "/var/log/cocalc/proxy-access.log" # optional: a JSON line per project request
//! #                                          # ("-": standard output); rotation is noticed
//! # tls_listen = "0.0.0.0:8443"            # optional: the ingress over HTTPS (crate::tls), with
//! # tls_cert_file = "/etc/cocalc/proxy.crt" # a PEM certificate chain, leaf first,
//! # tls_key_file = "/etc/cocalc/proxy.pem"  # and its PEM private key (both re-read every
//! #                                          # key_refresh_secs: renewals need no restart)
//! # tls_http2 = true                       # HTTP/2 on tls_listen to clients that ask (default)
//! # hosts_ca_file = "/etc/cocalc/hosts-ca.pem" # hosts with https:// URLs must chain to these
//! #                                          # roots (default: the system's)
//! # drain_secs = 10                        # on SIGTERM/SIGINT, first answer the health check
//! #                                          # (GET /.cocalc/health) 503 this long while still
//! #                                          # serving, so balancers move new clients away (the
//! #                                          # SSH port closes at once; its sessions go on);
//! #                                          # a second signal ends the drain
//! ```
//!
//! Hidden hosts open reverse tunnels at `<public_url>/.cocalc/tunnel` (see
//! [`crate::tunnel`]); users reach them through this proxy like any other
//! host. With several proxies, give each its own `public_url`: a request
//! for a hidden host whose tunnel lands at another proxy goes on to that
//! proxy's `public_url` (see "Through another proxy" in
//! [`crate::ingress`]), so list the proxies in each other's
//! `trusted_proxies`. `hosts_ca_file` covers proxies with `https://`
//! handles too.
//!
//! Give the proxy a proxy key (`cocalc proxy-key create NAME`): it may
//! look hosts up and ask the master whether an SSH key may enter a
//! project (`POST /v1/ssh/authorize`), and nothing else. The admin key
//! works too, but a proxy holding it could do anything the admin can.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocalc_core::SystemClock;
use serde::Deserialize;

use crate::{Ingress, IngressConfig, ProxyTransport, TunnelConfig, TunnelHub};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyDaemonError {
    /// The config file is missing or invalid (exit code 2).
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Start-up failed (exit code 1).
    #[error("{0}")]
    Start(String),
}

impl ProxyDaemonError {
    /// Process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProxyDaemonError::Config { .. } => 2,
            ProxyDaemonError::Start(_) => 1,
        }
    }
}

/// The proxy's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// The master.
    pub master_url: String,
    /// A master API key.
    #[serde(default)]
    pub api_key: Option<String>,
    /// File holding the API key.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Signing-key reload interval, seconds.
    #[serde(default = "default_refresh")]
    pub key_refresh_secs: u64,
    /// Requests per second per project.
    #[serde(default)]
    pub project_rps: Option<u32>,
    /// Requests per second per client address.
    #[serde(default)]
    pub client_rps: Option<u32>,
    /// Connections per client address (0: no cap; default
    /// [`IngressConfig::client_connections`]).
    #[serde(default)]
    pub client_connections: Option<u32>,
    /// How long known hosts' addresses are still used while the master
    /// cannot be asked, seconds (default
    /// [`IngressConfig::route_grace`]).
    #[serde(default)]
    pub route_grace_secs: Option<u64>,
    /// Seconds a host's endpoint from the master is used before the
    /// master is asked again, in the background (default 10:
    /// [`IngressConfig::route_ttl`]). Shorter makes proxies notice hosts
    /// that moved sooner, at one lookup per host per TTL.
    #[serde(default)]
    pub route_ttl_secs: Option<u64>,
    /// Seconds requests wait on a host that answers none of them before
    /// its health is checked (0: never; default
    /// [`IngressConfig::host_check_after`]).
    #[serde(default)]
    pub host_check_after_secs: Option<u64>,
    /// Seconds a host has to answer that check before the requests
    /// waiting on it end with 504 (default
    /// [`IngressConfig::host_check_timeout`]).
    #[serde(default)]
    pub host_check_timeout_secs: Option<u64>,
    /// Where the ingress keeps the master's signing keys and the hosts'
    /// addresses, so the proxy can start while the master is away
    /// ([`IngressConfig::state_dir`]); none by default.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Load balancers in front of the proxy, as addresses or ranges
    /// (`"10.0.0.0/8"`, `"192.0.2.7"`): see
    /// [`IngressConfig::trusted_proxies`].
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Listeners (`"http"`, `"https"`, `"ssh"`) on which connections
    /// from `trusted_proxies` begin with a PROXY protocol header naming
    /// the client (TCP load balancers: HAProxy `send-proxy`, AWS NLB),
    /// see [`crate::proxy_protocol`]; none by default. On such a listener
    /// those connections' `X-Forwarded-For` is not believed: the header
    /// names the client.
    #[serde(default)]
    pub proxy_protocol: Vec<String>,
    /// This proxy's tunnel handle (default `http://<bound address>`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Where the SSH ingress listens; none when absent.
    #[serde(default)]
    pub ssh_listen: Option<SocketAddr>,
    /// The SSH host key (OpenSSH format; an Ed25519 key is generated there
    /// if the file is missing). Required with `ssh_listen`.
    #[serde(default)]
    pub ssh_host_key_file: Option<PathBuf>,
    /// Where to serve `GET /metrics` (Prometheus text format: refusals by
    /// reason, tunnel and dial-back counts); none when absent. Keep it
    /// off the public network.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where every project request answered is logged, one JSON line each
    /// ([`cocalc_client::access_log`]): a file (appended to, created, and
    /// opened again when rotated away) or `"-"` for standard output. None
    /// when absent.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Where the ingress is served over HTTPS ([`crate::tls`]); none when
    /// absent. Needs `tls_cert_file` and `tls_key_file`.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for `tls_listen`, leaf first.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Whether `tls_listen` offers HTTP/2 to clients that ask for it
    /// ([`cocalc_client::http2`]); default `true`. HTTP/1.1 is always
    /// offered, and WebSockets use it.
    #[serde(default = "default_tls_http2")]
    pub tls_http2: bool,
    /// PEM certificates that hosts with `https://` URLs must chain to
    /// (default: the system's roots).
    #[serde(default)]
    pub hosts_ca_file: Option<PathBuf>,
    /// Seconds between the stop signal and the stop: the proxy drains
    /// ([`Ingress::drain`]), answering its health check
    /// ([`cocalc_core::wire::PROXY_HEALTH_PATH`]) 503 while it serves
    /// everything as before, so a load balancer checking it sends new
    /// clients elsewhere first. The SSH listener closes when the drain
    /// begins (a TCP balancer's check of it fails), while the SSH
    /// sessions open go on until the stop. Set it to the balancer's check
    /// interval times its unhealthy threshold. Default 0: stop at once.
    #[serde(default)]
    pub drain_secs: u64,
}

fn default_refresh() -> u64 {
    60
}

fn default_tls_http2() -> bool {
    true
}

impl ProxyConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ProxyDaemonError> {
        let bad = |message: String| ProxyDaemonError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: ProxyConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if cfg.api_key.is_none() && cfg.api_key_file.is_none() {
            return Err(bad("api_key or api_key_file is required".into()));
        }
        if cfg.ssh_listen.is_some() && cfg.ssh_host_key_file.is_none() {
            return Err(bad("ssh_listen needs ssh_host_key_file".into()));
        }
        if cfg.ssh_listen.is_some() && !cfg!(feature = "ssh") {
            return Err(bad(
                "ssh_listen is set but this build has no SSH ingress (cargo feature `ssh`)".into(),
            ));
        }
        match (&cfg.tls_listen, cfg.tls_files()) {
            (Some(_), Some(files)) => {
                crate::tls::server_config(&files).map_err(|e| bad(e.to_string()))?;
            }
            (Some(_), None) => {
                return Err(bad("tls_listen needs tls_cert_file and tls_key_file".into()))
            }
            (None, _) if cfg.tls_cert_file.is_some() || cfg.tls_key_file.is_some() => {
                return Err(bad(
                    "tls_cert_file and tls_key_file go with tls_listen".into()
                ))
            }
            (None, _) => {}
        }
        if cfg.host_check_timeout_secs == Some(0) {
            return Err(bad(
                "host_check_timeout_secs must be at least 1 (to turn host checks off, set \
                 host_check_after_secs = 0)"
                    .into(),
            ));
        }
        cfg.host_transport().map_err(bad)?;
        cfg.trusted_proxies().map_err(bad)?;
        cfg.check_access_log().map_err(bad)?;
        cfg.check_proxy_protocol().map_err(bad)?;
        cfg.check_public_url().map_err(bad)?;
        Ok(cfg)
    }

    /// `public_url` is the proxy's root: hidden hosts dial
    /// `<public_url>/.cocalc/tunnel` and sign it, and other proxies forward
    /// requests for those hosts to `<public_url>/<project id>/…`.
    fn check_public_url(&self) -> Result<(), String> {
        let Some(url) = &self.public_url else {
            return Ok(());
        };
        let bad = |why: String| {
            format!(
                "public_url {url:?}: {why} (it must be this proxy's root URL, \
                 http(s)://host[:port], which hidden hosts dial and other proxies forward to)"
            )
        };
        cocalc_core::parse_root_url(url)
            .map(|_| ())
            .map_err(|e| bad(e.to_string()))
    }

    /// `proxy_protocol` names listeners that exist, and trusts someone.
    fn check_proxy_protocol(&self) -> Result<(), String> {
        for name in &self.proxy_protocol {
            let (set, option) = match name.as_str() {
                "http" => (true, "listen"),
                "https" => (self.tls_listen.is_some(), "tls_listen"),
                "ssh" => (self.ssh_listen.is_some(), "ssh_listen"),
                _ => {
                    return Err(format!(
                        "proxy_protocol: unknown listener {name:?} (one of \"http\", \"https\", \
                         \"ssh\")"
                    ))
                }
            };
            if !set {
                return Err(format!(
                    "proxy_protocol: {name:?} is listed but {option} is not set"
                ));
            }
        }
        if !self.proxy_protocol.is_empty() && self.trusted_proxies.is_empty() {
            return Err(
                "proxy_protocol needs trusted_proxies: the load balancers whose headers are read"
                    .into(),
            );
        }
        Ok(())
    }

    /// `access_log`'s directory exists (the file is created at start).
    fn check_access_log(&self) -> Result<(), String> {
        match &self.access_log {
            Some(t) => cocalc_client::access_log::Target::parse(t).check(),
            None => Ok(()),
        }
    }

    /// Whether the listener `name` reads PROXY protocol headers.
    fn proxied(&self, name: &str) -> bool {
        self.proxy_protocol.iter().any(|n| n == name)
    }

    /// The certificate and key files, when both are set.
    fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert_file: self.tls_cert_file.clone()?,
            key_file: self.tls_key_file.clone()?,
        })
    }

    /// `trusted_proxies` as ranges; a bare address is a range of one. The
    /// error names the entry that is neither.
    fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, String> {
        cocalc_client::conncap::parse_nets(&self.trusted_proxies)
    }

    /// How the proxy reaches hosts with URLs: the roots of
    /// `hosts_ca_file` for `https://` ones when it is set.
    fn host_transport(&self) -> Result<crate::TcpTransport, String> {
        let tcp = crate::TcpTransport::default();
        Ok(match &self.hosts_ca_file {
            Some(path) => tcp.with_tls(Arc::new(
                cocalc_client::tls_config_from_pem(path)
                    .map_err(|e| format!("hosts_ca_file: {e}"))?,
            )),
            None => tcp,
        })
    }

    fn key(&self) -> Result<String, ProxyDaemonError> {
        cocalc_core::config::inline_or_file(self.api_key.as_deref(), self.api_key_file.as_deref())
            .map_err(ProxyDaemonError::Start)?
            .ok_or_else(|| ProxyDaemonError::Start("no API key".into()))
    }
}

/// Starts the ingress and serves until `shutdown`, then drains for
/// [`ProxyConfig::drain_secs`] and stops. Prints
/// `cocalc-proxy: listening on <url>` to stderr once serving. Raises the
/// open files limit first
/// ([`raise_open_files_limit`](cocalc_client::serve::raise_open_files_limit)).
pub async fn run(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyDaemonError> {
    run_until(cfg, shutdown, std::future::pending()).await
}

/// [`run`], and a drain that `stop_now` cuts short: the proxy then stops
/// as it would at the drain's end (connections closed, state saved, the
/// access log flushed). The daemon passes the second stop signal, so an
/// operator's second Ctrl-C does not wait out the drain.
pub async fn run_until(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    stop_now: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyDaemonError> {
    let _ = cocalc_client::serve::raise_open_files_limit();
    let mut icfg = IngressConfig::new(cfg.master_url.trim_end_matches('/'), cfg.key()?);
    if let Some(r) = cfg.project_rps {
        icfg.project_rps = r;
    }
    if let Some(r) = cfg.client_rps {
        icfg.client_rps = r;
    }
    if let Some(n) = cfg.client_connections {
        icfg.client_connections = n;
    }
    if let Some(secs) = cfg.route_ttl_secs {
        icfg.route_ttl = Duration::from_secs(secs.max(1));
    }
    if let Some(secs) = cfg.route_grace_secs {
        icfg.route_grace = Duration::from_secs(secs);
    }
    if let Some(secs) = cfg.host_check_after_secs {
        icfg.host_check_after = Duration::from_secs(secs);
    }
    if let Some(secs) = cfg.host_check_timeout_secs {
        icfg.host_check_timeout = Duration::from_secs(secs);
    }
    if let Some(dir) = &cfg.state_dir {
        // Found out now, not as a warning at every save.
        std::fs::create_dir_all(dir)
            .map_err(|e| ProxyDaemonError::Start(format!("state_dir {}: {e}", dir.display())))?;
    }
    icfg.state_dir = cfg.state_dir.clone();
    icfg.trusted_proxies = cfg.trusted_proxies().map_err(ProxyDaemonError::Start)?;
    if let Some(target) = &cfg.access_log {
        let target = cocalc_client::access_log::Target::parse(target);
        icfg.access_log = Some(
            cocalc_client::access_log::AccessLog::open(target)
                .map_err(|e| ProxyDaemonError::Start(format!("access_log: {e}")))?,
        );
    }
    let (listener, addr) = bind(cfg.listen, "listen").await?;
    let handle = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let clock: cocalc_core::SharedClock = Arc::new(SystemClock);
    let mut tcfg = TunnelConfig::new(handle.clone());
    // Hidden hosts whose tunnels land at other proxies are reached
    // through those.
    icfg.tunnel_handle = Some(tcfg.handle.clone());
    tcfg.state_dir = cfg.state_dir.clone();
    let tunnels = TunnelHub::new(
        tcfg,
        cocalc_client::MasterClient::new(icfg.master_url.clone(), icfg.api_key.clone()),
        clock.clone(),
    );
    let ingress = Ingress::new(
        icfg,
        Arc::new(
            ProxyTransport::new(tunnels.clone())
                .with_tcp(cfg.host_transport().map_err(ProxyDaemonError::Start)?),
        ),
        clock.clone(),
    )
    .await
    .map_err(|e| ProxyDaemonError::Start(format!("reaching the master: {}", e.message)))?;
    let certs = match cfg.tls_files() {
        Some(files) if cfg.tls_listen.is_some() => Some(
            crate::tls::CertStore::load(files)
                .map_err(|e| ProxyDaemonError::Start(e.to_string()))?,
        ),
        _ => None,
    };
    let refresher = {
        let ing = ingress.clone();
        let hub = tunnels.clone();
        let certs = certs.clone();
        let every = Duration::from_secs(cfg.key_refresh_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                ing.prune_limits();
                hub.prune();
                if let Err(e) = ing.refresh_keys().await {
                    tracing::warn!(error = %e.message, "reloading signing keys failed");
                }
                if let Err(e) = ing.save_state().and_then(|()| hub.save_state()) {
                    tracing::warn!(error = %e, "saving the proxy's state failed");
                }
                match certs.as_ref().map(|c| c.reload()) {
                    Some(Ok(true)) => tracing::info!("presenting a new TLS certificate"),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reloading the TLS certificate failed; keeping the current one")
                    }
                    _ => {}
                }
            }
        })
    };
    eprintln!("cocalc-proxy: tunnel handle {handle}");
    let mut metrics = crate::metrics::ProxyMetrics::new(ingress.clone(), tunnels.clone());
    let (stop_ssh, ssh_task) = start_ssh(&cfg, &ingress, &clock, &mut metrics).await?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = match cfg.metrics_listen {
        Some(at) => {
            let (l, addr) = bind(at, "metrics listen").await?;
            eprintln!("cocalc-proxy: metrics on http://{addr}/metrics");
            Some(tokio::spawn(cocalc_client::serve::serve_metrics(
                l,
                move || metrics.render(),
                async move {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    let (stop_tls, tls_task) = start_tls(&cfg, certs, &ingress, tunnels.clone().router()).await?;
    eprintln!("cocalc-proxy: listening on http://{addr}");
    let drain = Duration::from_secs(cfg.drain_secs);
    let drained = {
        let (ingress, tunnels) = (ingress.clone(), tunnels.clone());
        async move {
            shutdown.await;
            // SSH stops taking connections now (a TCP balancer's check of
            // the port fails, so it sends new sessions elsewhere); the
            // sessions open go on until the stop.
            let _ = stop_ssh.send(());
            if !drain.is_zero() {
                let until = tokio::time::Instant::now() + drain;
                ingress.drain();
                eprintln!(
                    "cocalc-proxy: draining for {drain:?} (the health check answers 503), then \
                     stopping; a second stop signal stops now"
                );
                let draining = async {
                    let moving = tunnels.drain().await;
                    if moving > 0 {
                        eprintln!("cocalc-proxy: {moving} hidden host(s) move their tunnels");
                    }
                    tokio::time::sleep_until(until).await;
                };
                tokio::select! {
                    () = draining => {}
                    () = stop_now => {
                        eprintln!("cocalc-proxy: second stop signal: the drain ends now");
                    }
                }
            }
        }
    };
    let result = crate::serve_ingress(
        ingress.listener(listener, "http", cfg.proxied("http")),
        ingress.clone(),
        tunnels.clone().router(),
        drained,
    )
    .await
    .map_err(|e| ProxyDaemonError::Start(e.to_string()));
    let _ = stop_tls.send(());
    if let Some(t) = tls_task {
        let _ = t.await;
    }
    refresher.abort();
    let _ = stop_metrics.send(());
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = ssh_task {
        let _ = t.await;
    }
    if let Err(e) = ingress.save_state().and_then(|()| tunnels.save_state()) {
        tracing::warn!(error = %e, "saving the proxy's state failed");
    }
    if let Some(log) = ingress.access_log() {
        if !log.flush(Duration::from_secs(5)) {
            tracing::warn!("the access log's last lines were not written within 5 s");
        }
    }
    result
}

/// Binds `at` (what the config calls `what`), returning the listener and
/// the address it got (the port, when `at` asked for port 0).
async fn bind(
    at: SocketAddr,
    what: &str,
) -> Result<(tokio::net::TcpListener, SocketAddr), ProxyDaemonError> {
    let l = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| ProxyDaemonError::Start(format!("{what} on {at}: {e}")))?;
    let addr = l
        .local_addr()
        .map_err(|e| ProxyDaemonError::Start(e.to_string()))?;
    Ok((l, addr))
}

/// A stop signal and the HTTPS ingress task, when `tls_listen` is set.
/// Prints `cocalc-proxy: https on https://<address>` once serving.
async fn start_tls(
    cfg: &ProxyConfig,
    certs: Option<Arc<crate::tls::CertStore>>,
    ingress: &Arc<Ingress>,
    internal: axum::Router,
) -> Result<StoppableTask, ProxyDaemonError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (Some(at), Some(certs)) = (cfg.tls_listen, certs) else {
        return Ok((stop, None));
    };
    let tls = certs
        .server_config(crate::tls::HttpVersions::with_http2(cfg.tls_http2))
        .map_err(|e| ProxyDaemonError::Start(e.to_string()))?;
    let (l, addr) = bind(at, "tls listen").await?;
    eprintln!("cocalc-proxy: https on https://{addr}");
    let task = tokio::spawn(crate::tls::serve_ingress_tls(
        ingress.listener(l, "https", cfg.proxied("https")),
        tls,
        ingress.clone(),
        internal,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((
        stop,
        Some(tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                tracing::error!(error = %e, "the HTTPS listener failed");
            }
        })),
    ))
}

/// A server task beside the main one, and the signal that stops it (the
/// task is absent when the config does not ask for that server).
type StoppableTask = (
    tokio::sync::oneshot::Sender<()>,
    Option<tokio::task::JoinHandle<()>>,
);

/// Starts the SSH ingress if the config asks for it.
#[cfg(feature = "ssh")]
async fn start_ssh(
    cfg: &ProxyConfig,
    ingress: &Arc<Ingress>,
    clock: &cocalc_core::SharedClock,
    metrics: &mut crate::metrics::ProxyMetrics,
) -> Result<StoppableTask, ProxyDaemonError> {
    let (stop_ssh, ssh_stopped) = tokio::sync::oneshot::channel::<()>();
    let task = match (&cfg.ssh_listen, &cfg.ssh_host_key_file) {
        (Some(at), Some(key_file)) => {
            let key = crate::ssh::load_or_generate_host_key(key_file)
                .map_err(|e| ProxyDaemonError::Start(e.to_string()))?;
            let (l, ssh_addr) = bind(*at, "ssh listen").await?;
            let fp = key
                .public_key()
                .fingerprint(russh::keys::HashAlg::Sha256)
                .to_string();
            let l = ingress.listener(l, "ssh", cfg.proxied("ssh"));
            let ssh = crate::SshIngress::new(ingress.clone(), key, clock.clone());
            *metrics = metrics.clone().with_ssh(ssh.clone());
            eprintln!("cocalc-proxy: ssh on {ssh_addr} (host key {fp})");
            let pruned = ssh.clone();
            let every = Duration::from_secs(cfg.key_refresh_secs.max(1));
            let pruner = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    pruned.prune_limits();
                }
            });
            Some(tokio::spawn(async move {
                ssh.serve(l, async move {
                    let _ = ssh_stopped.await;
                })
                .await;
                pruner.abort();
            }))
        }
        _ => None,
    };
    Ok((stop_ssh, task))
}

/// Without the `ssh` feature there is never an SSH ingress (configs that
/// ask for one are refused when loaded).
#[cfg(not(feature = "ssh"))]
async fn start_ssh(
    _cfg: &ProxyConfig,
    _ingress: &Arc<Ingress>,
    _clock: &cocalc_core::SharedClock,
    _metrics: &mut crate::metrics::ProxyMetrics,
) -> Result<StoppableTask, ProxyDaemonError> {
    Ok((tokio::sync::oneshot::channel::<()>().0, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_public_url(url: &str) -> ProxyConfig {
        toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\nmaster_url = \"http://m:1\"\napi_key = \"k\"\n\
             public_url = \"{url}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn public_url_is_the_proxys_root() {
        for ok in [
            "https://proxy.example",
            "https://proxy.example/",
            "http://10.0.0.7:8000",
            "http://[2001:db8::7]:8000/",
        ] {
            assert_eq!(with_public_url(ok).check_public_url(), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("proxy.example:8000", "scheme"),
            ("https://proxy.example/edge", "a path"),
            ("https://proxy.example?x=1", "a path"),
            ("http://user@proxy.example", "user info"),
        ] {
            let e = with_public_url(bad).check_public_url().unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
