//! Everything the `cocalc-master` binary does besides parsing arguments:
//! the config file, building a [`Master`] from it, and serving until a
//! shutdown signal.
//!
//! ## Config file (TOML)
//!
//! ```toml
//! listen = "127.0.0.1:8080"          # address of the HTTP API
//! data_dir = "/var/lib/cocalc-master" # map.db, directory.db, keys/, admin.key
//! placement = "least-loaded"          # or "data-aware"
//! issuer = "cocalc-master"            # `iss` of connect tokens
//! token_ttl_secs = 600                # connect token lifetime (60..=1800)
//! # admin_key_file = "/etc/cocalc/admin.key"  # default: <data_dir>/admin.key
//! # metrics_listen = "127.0.0.1:9100"   # GET /metrics (Prometheus); keep it private
//! ```
//!
//! On first start the master generates its signing key (`<data_dir>/keys/`)
//! and, if the admin key file does not exist, an admin key (mode 0600).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::KeySet;
use cocalc_core::{SharedClock, SystemClock};
use cocalc_placement::{DataAware, LeastLoaded, Registry, RegistryPolicy, SqliteStore};
use serde::Deserialize;

use crate::directory::{new_api_key, Directory};
use crate::master::{Master, MasterConfig};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The config file is missing or invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file or directory could not be used.
    #[error("{path}: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Building the master failed.
    #[error("{0}")]
    Master(#[from] crate::MasterError),
    /// The listen address could not be bound.
    #[error("listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
}

impl DaemonError {
    /// Process exit code: 2 for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config { .. } => 2,
            _ => 1,
        }
    }
}

/// The master's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// State directory.
    pub data_dir: PathBuf,
    /// `least-loaded` (default) or `data-aware`.
    #[serde(default = "default_placement")]
    pub placement: String,
    /// Token issuer name.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Connect token lifetime in seconds.
    #[serde(default = "default_ttl")]
    pub token_ttl_secs: u64,
    /// Admin key file (default `<data_dir>/admin.key`).
    #[serde(default)]
    pub admin_key_file: Option<PathBuf>,
    /// Where to serve `GET /metrics` ([`crate::metrics`]); none when
    /// absent. Keep it off the public network.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_placement() -> String {
    "least-loaded".into()
}
fn default_issuer() -> String {
    "cocalc-master".into()
}
fn default_ttl() -> u64 {
    600
}

impl DaemonConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        let bad = |message: String| DaemonError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: DaemonConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !matches!(cfg.placement.as_str(), "least-loaded" | "data-aware") {
            return Err(bad(format!(
                "placement {:?}: expected \"least-loaded\" or \"data-aware\"",
                cfg.placement
            )));
        }
        if !(60..=1800).contains(&cfg.token_ttl_secs) {
            return Err(bad(format!(
                "token_ttl_secs {} outside 60..=1800",
                cfg.token_ttl_secs
            )));
        }
        Ok(cfg)
    }

    /// The admin key file in use.
    pub fn admin_key_path(&self) -> PathBuf {
        self.admin_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.key"))
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads the admin key, creating one (mode 0600) if the file is missing.
pub fn ensure_admin_key(path: &Path) -> Result<String, DaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => return Err(io(path, "admin key file is empty")),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(path, e)),
        Err(_) => {}
    }
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| io(path, e))?;
    let key = new_api_key(b).replacen("cuk.", "cak.", 1);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    writeln!(f, "{key}").map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))?;
    Ok(key)
}

/// Builds the master from its config: opens the databases, loads (or
/// creates) the signing keys and the admin key.
pub async fn build(cfg: &DaemonConfig) -> Result<Arc<Master>, DaemonError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| io(&cfg.data_dir, e))?;
    let clock: SharedClock = Arc::new(SystemClock);
    let key_dir = cfg.data_dir.join("keys");
    let keys = if key_dir.exists() {
        KeySet::load_dir(&key_dir).map_err(|e| io(&key_dir, e))?
    } else {
        let k = KeySet::generate(clock.now()).map_err(|e| io(&key_dir, e))?;
        k.save_dir(&key_dir).map_err(|e| io(&key_dir, e))?;
        k
    };
    let admin_key = ensure_admin_key(&cfg.admin_key_path())?;
    let mut mc = MasterConfig::new(&admin_key);
    mc.issuer = cfg.issuer.clone();
    mc.token_ttl = Duration::from_secs(cfg.token_ttl_secs);
    mc.key_dir = Some(key_dir);
    let map_path = cfg.data_dir.join("map.db");
    // The master is the only writer of its map: placements may be cached.
    let store = SqliteStore::open(&map_path)
        .map_err(|e| io(&map_path, e))?
        .cached();
    let dir = Directory::open(Some(&cfg.data_dir.join("directory.db")))?;
    let placement: Box<dyn cocalc_core::Placement> = match cfg.placement.as_str() {
        "data-aware" => Box::new(DataAware::default().sampled(64, seed())),
        _ => Box::new(LeastLoaded::sampled(64, seed())),
    };
    let registry = Registry::new(clock.clone(), RegistryPolicy::default(), seed());
    let master = Master::new(mc, clock, dir, Arc::new(store), registry, placement, keys).await?;
    Ok(Arc::new(master))
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // A failing random source only makes jitter predictable; not fatal.
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// Serves the API on `listener` until `shutdown` completes; in-flight
/// requests finish first. Every connection gets `TCP_NODELAY` and
/// keepalive ([`cocalc_client::liveness::tune`]), so the push channel of
/// a host whose machine vanished is dropped within minutes.
pub async fn serve(
    master: Arc<Master>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hub_owner = master.clone();
    let closer = master.clone();
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = cocalc_client::liveness::tune(tcp);
    });
    let served = axum::serve(listener, crate::http::router(master))
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Upgraded (WebSocket) connections outlive the HTTP server:
            // close the push channels so hosts see the master go.
            hub_owner.push().close_all();
        })
        .await;
    // Once more now that nothing is accepted: a push channel a host
    // opened while the server was stopping would otherwise stay up.
    closer.push().close_all();
    served
}

/// How often unfinished moves are taken up again; the first time is one
/// period after the start, when hosts have had time to reconnect.
pub const MOVE_RESUME_EVERY: Duration = Duration::from_secs(15);

/// Takes up unfinished moves every [`MOVE_RESUME_EVERY`]: those a previous
/// run left before the flip are rolled back, flipped ones finished,
/// failed rollbacks and clean-ups retried ([`Master::resume_moves`]).
pub async fn resume_moves(master: Arc<Master>) {
    loop {
        tokio::time::sleep(MOVE_RESUME_EVERY).await;
        match master.resume_moves().await {
            Ok(done) => {
                for mv in done {
                    tracing::info!(project = %mv.project, phase = %mv.phase,
                        error = mv.error.as_deref().unwrap_or(""), "resumed move");
                }
            }
            Err(e) => tracing::warn!(error = %e, "resuming moves failed"),
        }
    }
}

/// Binds the configured address.
pub async fn bind(cfg: &DaemonConfig) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| DaemonError::Listen {
            addr: cfg.listen,
            message: e.to_string(),
        })
}

/// Builds the master from its config and serves until `shutdown`: what the
/// `cocalc-master` binary does. Prints `cocalc-master: listening on <url>`
/// to stderr once serving. Raises the open files limit first
/// ([`raise_open_files_limit`](cocalc_client::serve::raise_open_files_limit)).
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let _ = cocalc_client::serve::raise_open_files_limit();
    let master = build(&cfg).await?;
    let listener = bind(&cfg).await?;
    let addr = listener.local_addr().map_err(|e| DaemonError::Listen {
        addr: cfg.listen,
        message: e.to_string(),
    })?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = match cfg.metrics_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| DaemonError::Listen {
                    addr: at,
                    message: format!("metrics_listen: {e}"),
                })?;
            let maddr = l.local_addr().map_err(|e| DaemonError::Listen {
                addr: at,
                message: e.to_string(),
            })?;
            eprintln!("cocalc-master: metrics on http://{maddr}/metrics");
            let metrics = crate::metrics::MasterMetrics::new(master.clone());
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
    tracing::info!(%addr, admin_key_file = %cfg.admin_key_path().display(), "cocalc-master listening");
    eprintln!("cocalc-master: listening on http://{addr}");
    let resumer = tokio::spawn(resume_moves(master.clone()));
    let served = serve(master, listener, shutdown)
        .await
        .map_err(|e| DaemonError::Listen {
            addr,
            message: e.to_string(),
        });
    resumer.abort();
    let _ = stop_metrics.send(());
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    served
}
