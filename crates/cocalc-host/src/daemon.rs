//! Everything the `cocalc-host` binary does besides parsing arguments: the
//! config file, the host's identity on disk, building the agent from its
//! parts, and running the data plane and the master link until shutdown.
//!
//! ## Config file (TOML)
//!
//! ```toml
//! listen = "127.0.0.1:8443"            # data plane address
//! # public_url = "http://10.0.0.5:8443" # how users reach it (default: http://<listen>,
//! #                                     # or https://<listen> with a certificate)
//! # tls_cert_file = "/etc/cocalc/host.crt" # serve listen over HTTPS: a PEM chain, leaf
//! # tls_key_file = "/etc/cocalc/host.pem"  # first, and its key (re-read every 30 s)
//! # tls_http2 = true                    # HTTPS: HTTP/2 to clients that ask (default)
//! # client_connections = 1000           # per client address on listen (default 0: no cap)
//! # trusted_proxies = ["10.0.0.5"]      # not capped: the proxies in front
//! # tunnel_url = "https://proxy:8443"   # instead of listen: a hidden host that
//! #                                     # dials this proxy and listens nowhere
//! #                                     # (https: TLS, or http: plain); or a
//! #                                     # list, ["https://a:8443", "https://b:8443"]:
//! #                                     # the next is tried when one is down
//! # tunnel_ca_file = "/etc/cocalc/ca.pem" # https: trust these roots for the
//! #                                     # proxy instead of the system's
//! master_url = "http://127.0.0.1:8080"
//! data_dir = "/var/lib/cocalc-host"    # host.id, host.key (0600), projects/
//! bootstrap_token = "cbt.…"            # first start only (or bootstrap_token_file)
//! region = "local"
//! runner = "process"                   # or "podman"
//! storage = "dir"                      # or "btrfs" (with btrfs_pool)
//! # btrfs_pool = "/mnt/cocalc-pool"
//! image = "localhost/cocalc-project:latest"   # podman: default image
//! # images = ["localhost/other:1"]            # podman: also allowed
//! project_slots = 100
//! offline_grace_secs = 3600
//! acl_ttl_secs = 300
//! # metrics_listen = "127.0.0.1:9102"  # GET /metrics (Prometheus); keep it private
//! # access_log = "/var/log/cocalc/host-access.log" # a JSON line per request on listen
//! #                                     # ("-": standard output); rotation is noticed
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use cocalc_auth::{paserk, AclCache, AclPolicy, Gate, KeySet, TracingAuditSink, Verifier};
use cocalc_core::{
    Capacity, Health, HostEndpoint, HostId, Load, ProjectState, Region, Runner, SharedClock,
    Storage, SystemClock,
};
use ed25519_dalek::SigningKey;
use serde::Deserialize;

use crate::agent::{AgentConfig, HostAgent};
use crate::image::ImagePolicy;
use crate::master_link::{HostEvents, LinkConfig, MasterLink};

/// Why the host daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostDaemonError {
    /// The config file is missing or invalid (exit code 2).
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Something needed at start-up failed (exit code 1).
    #[error("{0}")]
    Start(String),
}

impl HostDaemonError {
    /// Process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            HostDaemonError::Config { .. } => 2,
            HostDaemonError::Start(_) => 1,
        }
    }
}

fn start_err(what: &str, e: impl std::fmt::Display) -> HostDaemonError {
    HostDaemonError::Start(format!("{what}: {e}"))
}

/// `tunnel_url`: one proxy's URL, or several.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ProxyUrls {
    /// One proxy.
    One(String),
    /// Several, the preferred first.
    Several(Vec<String>),
}

impl ProxyUrls {
    /// The URLs, the preferred first.
    pub fn urls(&self) -> &[String] {
        match self {
            ProxyUrls::One(u) => std::slice::from_ref(u),
            ProxyUrls::Several(v) => v,
        }
    }
}

/// The host's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Data plane listen address (exactly one of `listen` and `tunnel_url`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// A hidden host: dial a reverse tunnel to the proxy at this base URL
    /// (its handle) and serve the data plane only through it. Several
    /// proxies' URLs: the tunnel lands at one at a time, the next tried
    /// when it cannot (see `cocalc_host::tunnel`), and the host registers
    /// the one it is at.
    #[serde(default)]
    pub tunnel_url: Option<ProxyUrls>,
    /// PEM certificates the proxies of `https://` `tunnel_url`s must chain
    /// to (default: the system's roots).
    #[serde(default)]
    pub tunnel_ca_file: Option<PathBuf>,
    /// How users reach this host (default `http://<bound address>`, or
    /// `https://` with `tls_cert_file`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Serve `listen` over HTTPS with this PEM certificate chain (leaf
    /// first), re-read every [`HOUSEKEEPING`] round so a renewal needs no restart.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Whether the HTTPS listener offers HTTP/2 to clients that ask for
    /// it ([`cocalc_client::http2`]); default `true`. HTTP/1.1 is always
    /// offered.
    #[serde(default = "default_tls_http2")]
    pub tls_http2: bool,
    /// Connections one client address may hold on `listen`, WebSockets
    /// included (0, the default: no cap); see [`crate::admission`]. Set
    /// it with `trusted_proxies` where users reach the host directly.
    #[serde(default)]
    pub client_connections: u32,
    /// Addresses or ranges (`"10.0.0.0/8"`, `"192.0.2.7"`) whose
    /// connections are not capped: the proxies in front, which carry many
    /// clients.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The master.
    pub master_url: String,
    /// State directory.
    pub data_dir: PathBuf,
    /// Bootstrap token (first start).
    #[serde(default)]
    pub bootstrap_token: Option<String>,
    /// File holding the bootstrap token.
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Region.
    #[serde(default = "default_region")]
    pub region: String,
    /// `process` or `podman`.
    #[serde(default = "default_runner")]
    pub runner: String,
    /// `dir` or `btrfs`.
    #[serde(default = "default_storage")]
    pub storage: String,
    /// Btrfs pool directory (storage = "btrfs").
    #[serde(default)]
    pub btrfs_pool: Option<PathBuf>,
    /// Default image (podman).
    #[serde(default = "default_image")]
    pub image: String,
    /// Other allowed images (podman).
    #[serde(default)]
    pub images: Vec<String>,
    /// Projects that may run at once.
    #[serde(default = "default_slots")]
    pub project_slots: u32,
    /// Offline grace, seconds.
    #[serde(default = "default_grace")]
    pub offline_grace_secs: u64,
    /// ACL cache TTL, seconds.
    #[serde(default = "default_ttl")]
    pub acl_ttl_secs: u64,
    /// Stop projects idle this long (no requests, CPU below 5 % of a core,
    /// no connections); 0 disables the culler.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// How often activity is reported and the culler runs, seconds.
    #[serde(default = "default_activity_interval")]
    pub activity_interval_secs: u64,
    /// Where to serve `GET /metrics` ([`crate::metrics`]); none when
    /// absent. Keep it off the public network.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where every request answered on `listen` is logged, one JSON line
    /// each ([`cocalc_client::access_log`]): a file (appended to,
    /// created, opened again when rotated away) or `"-"` for standard
    /// output. None when absent. (A hidden host's requests are logged by
    /// its proxy.)
    #[serde(default)]
    pub access_log: Option<String>,
    /// Where the host backs its projects up (none when absent: the backup
    /// API then answers 501).
    #[serde(default)]
    pub backup: Option<BackupSettings>,
}

/// The `[backup]` table of a host's config.
///
/// ```toml
/// [backup]
/// repository = "opendal:s3"          # or a directory: "/srv/cocalc-backups"
/// password_file = "/etc/cocalc/backup-password"
/// every_secs = 3600                  # 0: only when asked
/// keep = { frequent = 4, daily = 7, weekly = 4, monthly = 2 }
/// [backup.options]
/// bucket = "cocalc-backups"
/// root = "/fleet-1"
/// endpoint = "https://s3.example.org"
/// region = "us-east-1"
/// access_key_id = "..."
/// secret_access_key = "..."
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSettings {
    /// `rustic` (the default): a restic-format repository; `dir`: plain
    /// copies in the directory `repository` (development only).
    #[serde(default = "default_backup_kind")]
    pub kind: String,
    /// A directory, or `opendal:<service>` with `options`.
    pub repository: String,
    /// The file holding the repository's password (rustic; required).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Backend options (for `opendal:s3`: bucket, root, endpoint, region,
    /// access_key_id, secret_access_key).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Back every project up this often, seconds (0, the default: only
    /// when asked through the API).
    #[serde(default)]
    pub every_secs: u64,
    /// After each scheduled round, keep this many backups per bucket of
    /// each project (absent: keep everything).
    #[serde(default)]
    pub keep: Option<KeepCounts>,
}

/// Retention counts (see [`cocalc_storage::RetentionPolicy`]).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepCounts {
    /// The newest backups kept regardless of time.
    #[serde(default)]
    pub frequent: usize,
    /// Newest backup of each of this many most recent days.
    #[serde(default)]
    pub daily: usize,
    /// Newest backup of each of this many most recent weeks.
    #[serde(default)]
    pub weekly: usize,
    /// Newest backup of each of this many most recent months.
    #[serde(default)]
    pub monthly: usize,
}

impl From<KeepCounts> for cocalc_storage::RetentionPolicy {
    fn from(k: KeepCounts) -> Self {
        cocalc_storage::RetentionPolicy {
            frequent: k.frequent,
            daily: k.daily,
            weekly: k.weekly,
            monthly: k.monthly,
        }
    }
}

impl BackupSettings {
    /// Checks choices that serde cannot.
    pub fn check(&self) -> Result<(), String> {
        match self.kind.as_str() {
            "rustic" if self.password_file.is_none() => {
                return Err("[backup] password_file is required for a rustic repository".into())
            }
            "rustic" => {}
            "dir" if self.password_file.is_some() || !self.options.is_empty() => {
                return Err(
                    "[backup] kind = \"dir\" takes no password_file or options (plain copies)"
                        .into(),
                )
            }
            "dir" => {}
            other => {
                return Err(format!(
                    "[backup] kind {other:?}: not one of \"rustic\", \"dir\""
                ))
            }
        }
        if self.repository.is_empty() {
            return Err("[backup] repository is empty".into());
        }
        if self.keep.is_some() && self.every_secs == 0 {
            return Err("[backup] keep applies after scheduled backups: set every_secs too".into());
        }
        Ok(())
    }
}

fn default_backup_kind() -> String {
    "rustic".into()
}

/// Opens the backup store `b` names.
async fn backup_store(
    b: &BackupSettings,
    data_dir: &Path,
) -> Result<Arc<dyn cocalc_core::BackupStore>, String> {
    match b.kind.as_str() {
        "dir" => Ok(Arc::new(
            cocalc_storage::backup::DirBackups::new(&b.repository).map_err(|e| e.to_string())?,
        )),
        #[cfg(feature = "rustic")]
        "rustic" => {
            let file = b
                .password_file
                .as_ref()
                .ok_or("[backup] password_file is required for a rustic repository")?;
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("[backup] password_file {}: {e}", file.display()))?;
            let mut c = cocalc_storage::backup::RusticConfig::new(
                b.repository.clone(),
                password.trim_end_matches(['\n', '\r']),
            )
            .cache_dir(data_dir.join("rustic-cache"));
            for (k, v) in &b.options {
                c = c.option(k.clone(), v.clone());
            }
            Ok(Arc::new(
                cocalc_storage::backup::RusticBackups::open_or_init(c)
                    .await
                    .map_err(|e| e.to_string())?,
            ))
        }
        other => Err(format!(
            "[backup] kind {other:?}: not one of rustic, dir (or not in this build)"
        )),
    }
}

fn default_activity_interval() -> u64 {
    60
}

fn default_idle() -> u64 {
    3600
}

fn default_tls_http2() -> bool {
    true
}

fn default_region() -> String {
    "local".into()
}
fn default_runner() -> String {
    "process".into()
}
fn default_storage() -> String {
    "dir".into()
}
/// How often the host saves its ACL cache, flushes its audit sink and
/// (serving HTTPS) re-reads its certificate and key.
pub const HOUSEKEEPING: Duration = Duration::from_secs(30);

/// The default project image name used by `cocalc dev up` and the host.
pub const DEFAULT_IMAGE: &str = "localhost/cocalc-project:latest";
fn default_image() -> String {
    DEFAULT_IMAGE.into()
}
fn default_slots() -> u32 {
    100
}
fn default_grace() -> u64 {
    3600
}
fn default_ttl() -> u64 {
    300
}

impl HostConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, HostDaemonError> {
        let bad = |message: String| HostDaemonError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: HostConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        cfg.check().map_err(bad)?;
        if let Some(files) = cfg.tls_files() {
            cocalc_client::tls::server_config(&files).map_err(|e| bad(e.to_string()))?;
        }
        Ok(cfg)
    }

    /// The certificate and key files, when both are set.
    pub fn tls_files(&self) -> Option<cocalc_client::tls::TlsFiles> {
        Some(cocalc_client::tls::TlsFiles {
            cert_file: self.tls_cert_file.clone()?,
            key_file: self.tls_key_file.clone()?,
        })
    }

    /// Checks choices that serde cannot.
    pub fn check(&self) -> Result<(), String> {
        match (&self.listen, &self.tunnel_url) {
            (Some(_), Some(_)) => {
                return Err(
                    "listen and tunnel_url exclude each other: a hidden host (tunnel_url) \
                     listens nowhere"
                        .into(),
                )
            }
            (None, None) => {
                return Err("set listen (a reachable host) or tunnel_url (a hidden host)".into())
            }
            (None, Some(_)) if self.public_url.is_some() => {
                return Err(
                    "public_url has no meaning for a hidden host: users reach it at its \
                     tunnel_url (the proxy)"
                        .into(),
                )
            }
            (None, Some(urls)) => check_tunnel_urls(urls.urls())?,
            _ => {}
        }
        if self.tunnel_ca_file.is_some()
            && !self
                .tunnel_url
                .as_ref()
                .is_some_and(|u| u.urls().iter().any(|u| u.starts_with("https://")))
        {
            return Err("tunnel_ca_file goes with an https:// tunnel_url".into());
        }
        if let Some(b) = &self.backup {
            b.check()?;
        }
        cocalc_client::conncap::parse_nets(&self.trusted_proxies)?;
        if let Some(t) = &self.access_log {
            if self.listen.is_none() {
                return Err(
                    "access_log goes with listen: a hidden host's requests are logged by its \
                     proxy"
                        .into(),
                );
            }
            cocalc_client::access_log::Target::parse(t).check()?;
        }
        if self.listen.is_none()
            && (self.client_connections > 0 || !self.trusted_proxies.is_empty())
        {
            return Err(
                "client_connections and trusted_proxies go with listen: a hidden host is \
                 reached through its proxy, which caps connections itself"
                    .into(),
            );
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("tls_cert_file and tls_key_file go together".into())
            }
            (Some(_), Some(_)) if self.listen.is_none() => {
                return Err(
                    "tls_cert_file and tls_key_file go with listen: a hidden host serves \
                     only through its tunnel"
                        .into(),
                )
            }
            _ => {}
        }
        if !matches!(self.runner.as_str(), "process" | "podman") {
            return Err(format!(
                "runner {:?}: expected \"process\" or \"podman\"",
                self.runner
            ));
        }
        match (self.storage.as_str(), &self.btrfs_pool) {
            ("dir", _) => {}
            ("btrfs", Some(_)) => {}
            ("btrfs", None) => return Err("storage = \"btrfs\" needs btrfs_pool".into()),
            (other, _) => return Err(format!("storage {other:?}: expected \"dir\" or \"btrfs\"")),
        }
        if !(self.master_url.starts_with("http://") || self.master_url.starts_with("https://")) {
            return Err(format!(
                "master_url {:?} must start with http:// or https://",
                self.master_url
            ));
        }
        Ok(())
    }
}

/// Reads the host's id and key from `data_dir`, creating them (key file
/// mode 0600) on first start.
pub fn identity(data_dir: &Path) -> Result<(HostId, SigningKey), HostDaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(data_dir).map_err(|e| start_err(&data_dir.display().to_string(), e))?;
    let id_path = data_dir.join("host.id");
    let key_path = data_dir.join("host.key");
    if id_path.exists() && key_path.exists() {
        let id = std::fs::read_to_string(&id_path)
            .map_err(|e| start_err(&id_path.display().to_string(), e))?
            .trim()
            .parse()
            .map_err(|e| start_err(&id_path.display().to_string(), e))?;
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| start_err(&key_path.display().to_string(), e))?;
        let key = paserk::decode_secret(&key)
            .map_err(|e| start_err(&key_path.display().to_string(), e))?;
        return Ok((id, key));
    }
    let mut b = [0u8; 48];
    getrandom::getrandom(&mut b).map_err(|e| start_err("random source", e))?;
    let id = HostId::new_v4(b[..16].try_into().expect("16 bytes"));
    let key = SigningKey::from_bytes(b[16..].try_into().expect("32 bytes"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| start_err(&key_path.display().to_string(), e))?;
    writeln!(f, "{}", paserk::encode_secret(&key)).map_err(|e| start_err("host.key", e))?;
    f.sync_all().map_err(|e| start_err("host.key", e))?;
    std::fs::write(&id_path, format!("{id}\n")).map_err(|e| start_err("host.id", e))?;
    Ok((id, key))
}

/// Binds the configured address, builds the host and runs it until
/// `shutdown`: what the `cocalc-host` binary does. Prints
/// `cocalc-host: <host id> listening on <url>` (or `… hidden, serving
/// through the tunnel to <proxy>`) to stderr once serving. Raises the
/// open files limit first
/// ([`raise_open_files_limit`](cocalc_client::serve::raise_open_files_limit)).
pub async fn run(
    cfg: HostConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HostDaemonError> {
    let _ = cocalc_client::serve::raise_open_files_limit();
    let (host, listener) = start(&cfg).await?;
    match host.endpoint() {
        HostEndpoint::Tunnel(t) => eprintln!(
            "cocalc-host: {} hidden, serving through the tunnel to {t}",
            host.agent.host()
        ),
        other => eprintln!(
            "cocalc-host: {} listening on {}",
            host.agent.host(),
            other.base_url()
        ),
    }
    host.serve(listener, shutdown)
        .await
        .map_err(|e| start_err("serving", e))
}

/// Builds the host its config describes: for a reachable host it binds
/// `listen` first (the URL it registers is `public_url`, or the bound
/// address); a hidden host binds nothing. Serve the result with
/// [`Host::serve`].
pub async fn start(
    cfg: &HostConfig,
) -> Result<(Host, Option<tokio::net::TcpListener>), HostDaemonError> {
    let Some(listen) = cfg.listen else {
        return Ok((build_hidden(cfg).await?, None));
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| start_err(&format!("listen on {listen}"), e))?;
    let addr = listener.local_addr().map_err(|e| start_err("listen", e))?;
    let scheme = if cfg.tls_files().is_some() {
        "https"
    } else {
        "http"
    };
    let public = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    Ok((build(cfg, public).await?, Some(listener)))
}

/// Hooks from the master link into this host: new signing keys go to the
/// verifier; start/stop commands go to the agent.
struct Events {
    verifier: Arc<Verifier>,
    agent: OnceLock<Weak<HostAgent>>,
    key_dir: PathBuf,
}

impl HostEvents for Events {
    fn signing_keys(&self, keys: &KeySet) {
        self.verifier.set_keys(keys.clone());
        // Kept on disk so a host restarted while the master is away still
        // verifies tokens; replaced whole, so a retired key does not linger.
        let tmp = self.key_dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&tmp);
        let saved = keys
            .save_dir(&tmp)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let _ = std::fs::remove_dir_all(&self.key_dir);
                std::fs::rename(&tmp, &self.key_dir).map_err(|e| e.to_string())
            });
        if let Err(e) = saved {
            tracing::warn!(error = %e, "saving the master's signing keys failed");
        }
    }

    fn start(&self, project: cocalc_core::ProjectId, generation: cocalc_core::Generation) {
        if let Some(agent) = self.agent.get().and_then(Weak::upgrade) {
            tokio::spawn(async move {
                if let Err(e) = agent.start_at(project, generation).await {
                    tracing::warn!(%project, error = %e, "start requested by the master failed");
                }
            });
        }
    }

    fn stop(&self, project: cocalc_core::ProjectId) {
        if let Some(agent) = self.agent.get().and_then(Weak::upgrade) {
            tokio::spawn(async move {
                if let Err(e) = agent.stop(project).await {
                    tracing::warn!(%project, error = %e, "stop requested by the master failed");
                }
            });
        }
    }

    fn held(&self) -> Vec<(cocalc_core::ProjectId, cocalc_core::Generation)> {
        self.agent
            .get()
            .and_then(Weak::upgrade)
            .map(|agent| agent.known_generations())
            .unwrap_or_default()
    }

    fn fence(&self, project: cocalc_core::ProjectId, generation: cocalc_core::Generation) {
        if let Some(agent) = self.agent.get().and_then(Weak::upgrade) {
            tokio::spawn(async move {
                if let Err(e) = agent.fence_at(project, generation).await {
                    tracing::warn!(%project, error = %e, "fence pushed by the master failed");
                }
            });
        }
    }
}

/// A built host: the agent, its master link, and the status it reports.
pub struct Host {
    /// The agent (serve it with [`crate::dataplane::router`]).
    pub agent: Arc<HostAgent>,
    /// The master link (run it with [`MasterLink::run`]).
    pub link: Arc<MasterLink>,
    running: Arc<AtomicU32>,
    slots: u32,
    data_dir: PathBuf,
    source: Arc<dyn crate::activity::ActivitySource>,
    clock: SharedClock,
    idle_timeout: Duration,
    activity_interval: Duration,
    tunnel: Option<Arc<crate::tunnel::TunnelClient>>,
    metrics_listen: Option<SocketAddr>,
    tls: Option<Arc<cocalc_client::tls::CertStore>>,
    tls_versions: cocalc_client::tls::HttpVersions,
    tls_failures: Arc<std::sync::atomic::AtomicU64>,
    /// The per-client connection cap on `listen`.
    admission: crate::admission::Admission,
    /// Scheduled backups: how often, and what to keep.
    backup_every: Option<(Duration, Option<cocalc_storage::RetentionPolicy>)>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("host", &self.agent.host())
            .finish_non_exhaustive()
    }
}

/// Builds the host from its config; `public_url` is how users reach the
/// data plane (the caller binds the listener first).
pub async fn build(cfg: &HostConfig, public_url: String) -> Result<Host, HostDaemonError> {
    build_at(cfg, HostEndpoint::Url(public_url)).await
}

/// `tunnel_url`'s URLs: at least one, each a proxy's root URL
/// (`http(s)://host[:port]`, what the proxy's `public_url` is), no two
/// the same.
fn check_tunnel_urls(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("tunnel_url lists no proxy".into());
    }
    for (i, u) in urls.iter().enumerate() {
        if !u.starts_with("http://") && !u.starts_with("https://") {
            return Err(format!(
                "tunnel_url {u:?} must start with https:// (or http:// on a trusted network)"
            ));
        }
        cocalc_core::parse_root_url(u).map_err(|e| format!("tunnel_url: {e}"))?;
        let same = |v: &String| v.trim_end_matches('/') == u.trim_end_matches('/');
        if urls[..i].iter().any(same) {
            return Err(format!("tunnel_url lists {u:?} twice"));
        }
    }
    Ok(())
}

/// Builds a hidden host (config with `tunnel_url`): it registers the
/// tunnel's handle as its endpoint (the first proxy's, until the tunnel
/// lands at another) and serves only through the tunnel (run it with
/// [`Host::run_hidden`]).
pub async fn build_hidden(cfg: &HostConfig) -> Result<Host, HostDaemonError> {
    let url = cfg
        .tunnel_url
        .as_ref()
        .and_then(|u| u.urls().first())
        .ok_or_else(|| HostDaemonError::Start("a hidden host needs tunnel_url".into()))?;
    build_at(
        cfg,
        HostEndpoint::Tunnel(url.trim_end_matches('/').to_string()),
    )
    .await
}

async fn build_at(cfg: &HostConfig, endpoint: HostEndpoint) -> Result<Host, HostDaemonError> {
    let clock: SharedClock = Arc::new(SystemClock);
    let (host, key) = identity(&cfg.data_dir)?;
    let storage: Arc<dyn Storage> = match cfg.storage.as_str() {
        #[cfg(feature = "btrfs")]
        "btrfs" => {
            let pool = cfg.btrfs_pool.clone().expect("checked: btrfs needs a pool");
            Arc::new(
                cocalc_storage::BtrfsStorage::open(
                    pool,
                    cocalc_storage::BtrfsConfig::default(),
                    clock.clone(),
                )
                .await
                .map_err(|e| start_err("btrfs pool", e))?,
            )
        }
        "dir" => Arc::new(
            cocalc_storage::DirStorage::new(cfg.data_dir.join("projects"), clock.clone())
                .map_err(|e| start_err("project directory", e))?,
        ),
        other => {
            return Err(start_err(
                "storage",
                format!("{other:?} is not available in this build"),
            ))
        }
    };
    let (runner, source): (Arc<dyn Runner>, Arc<dyn crate::activity::ActivitySource>) = match cfg
        .runner
        .as_str()
    {
        #[cfg(feature = "podman")]
        "podman" => {
            let images = ImagePolicy::new(cfg.image.clone(), cfg.images.iter().cloned());
            let pc = crate::podman::PodmanConfig::new(host, images, cfg.data_dir.join("podman"));
            let runner = crate::podman::PodmanRunner::new(pc)
                .await
                .map_err(|e| start_err("podman", e))?;
            let present = runner
                .has_image(&cfg.image)
                .await
                .map_err(|e| start_err("podman", e))?;
            if !present && cfg.image == DEFAULT_IMAGE {
                eprintln!("cocalc-host: building the default project image {DEFAULT_IMAGE} from busybox (no registry is used)…");
                runner
                    .import_busybox_image(DEFAULT_IMAGE)
                    .await
                    .map_err(|e| start_err("building the default image", e))?;
                eprintln!("cocalc-host: image {DEFAULT_IMAGE} ready");
            } else if !present {
                return Err(start_err(
                    "podman",
                    format!(
                        "default image {} is not present; import it first (`podman import`)",
                        cfg.image
                    ),
                ));
            }
            let runner = Arc::new(runner);
            (runner.clone(), runner)
        }
        "process" => {
            let runner = Arc::new(crate::process::ProcessRunner::new(
                ImagePolicy::single("host"),
                clock.clone(),
            ));
            (runner.clone(), runner)
        }
        other => {
            return Err(start_err(
                "runner",
                format!("{other:?} is not available in this build"),
            ))
        }
    };
    let bootstrap_token = cocalc_core::config::inline_or_file(
        cfg.bootstrap_token.as_deref(),
        cfg.bootstrap_token_file.as_deref(),
    )
    .map_err(|e| start_err("bootstrap_token_file", e))?;
    let acl = Arc::new(AclCache::new(
        clock.clone(),
        AclPolicy::new(
            Duration::from_secs(cfg.acl_ttl_secs),
            Duration::from_secs(cfg.offline_grace_secs),
        ),
    ));
    let key_dir = cfg.data_dir.join("master-keys");
    let known_keys = if key_dir.exists() {
        KeySet::load_dir(&key_dir).unwrap_or_default()
    } else {
        KeySet::new()
    };
    let verifier = Arc::new(Verifier::new(host, known_keys, clock.clone()));
    let events = Arc::new(Events {
        verifier: verifier.clone(),
        agent: OnceLock::new(),
        key_dir,
    });
    let link = Arc::new(MasterLink::new(
        LinkConfig {
            master_url: cfg.master_url.trim_end_matches('/').to_string(),
            host,
            key: key.clone(),
            bootstrap_token,
            region: Region(cfg.region.clone()),
            endpoint: endpoint.clone(),
        },
        clock.clone(),
        acl.clone(),
        events.clone(),
    ));
    let audit: Arc<dyn cocalc_auth::AuditSink> = Arc::new(TracingAuditSink::new());
    let gate =
        Gate::new(host, verifier, acl, audit.clone(), clock.clone()).with_refresher(link.clone());
    let local_path = cfg.data_dir.join("local.db");
    let local = crate::local_store::LocalStore::open(&local_path)
        .map_err(|e| start_err(&local_path.display().to_string(), e))?;
    let tunnel = match &endpoint {
        HostEndpoint::Tunnel(url) => {
            let mut tcfg = crate::tunnel::TunnelClientConfig::new(url.clone(), host, key.clone());
            let others = cfg.tunnel_url.as_ref().map_or(&[][..], |u| u.urls());
            for other in others.iter().skip(1) {
                tcfg = tcfg.fall_back_to(other.clone());
            }
            if tcfg.proxy_urls.iter().any(|u| u.starts_with("https://")) {
                tcfg.tls = Some(
                    crate::tunnel::tls_client_config(cfg.tunnel_ca_file.as_deref())
                        .map_err(|e| HostDaemonError::Start(e.to_string()))?,
                );
            }
            Some(crate::tunnel::TunnelClient::new(tcfg, clock.clone()))
        }
        _ => None,
    };
    if let Some(t) = &tunnel {
        // Health follows the tunnel, and the endpoint follows the proxy
        // it lands at; tell the master at once.
        let link = Arc::downgrade(&link);
        t.on_change(Box::new(move |at| {
            if let Some(l) = link.upgrade() {
                if let Some(url) = at {
                    l.set_endpoint(HostEndpoint::Tunnel(url.to_string()));
                }
                l.status_changed();
            }
        }));
    }
    let tls = match cfg.tls_files() {
        Some(files) if cfg.listen.is_some() => {
            Some(cocalc_client::tls::CertStore::load(files).map_err(|e| start_err("TLS", e))?)
        }
        _ => None,
    };
    let mut agent =
        HostAgent::new(AgentConfig::new(host), runner, storage, gate).with_local_store(local);
    if let Some(b) = &cfg.backup {
        let store = backup_store(b, &cfg.data_dir)
            .await
            .map_err(|e| start_err("backup store", e))?;
        agent = agent.with_backups(crate::backups::Backups::new(
            store,
            cfg.data_dir.join("backup-staging"),
        ));
    }
    let known = agent
        .restore()
        .await
        .map_err(|e| start_err("restoring the local store", e))?;
    if known > 0 {
        tracing::info!(
            projects = known,
            "restored generation fences and ACL cache from the local store"
        );
    }
    let agent = Arc::new(agent);
    let _ = events.agent.set(Arc::downgrade(&agent));
    let mut admission = crate::admission::Admission::new(
        cfg.client_connections,
        cocalc_client::conncap::parse_nets(&cfg.trusted_proxies).map_err(HostDaemonError::Start)?,
    )
    .with_audit(audit, clock.clone());
    if let Some(t) = &cfg.access_log {
        let log =
            cocalc_client::access_log::AccessLog::open(cocalc_client::access_log::Target::parse(t))
                .map_err(|e| start_err("access_log", e))?;
        admission = admission.with_access_log(log, host, clock.clone());
    }
    Ok(Host {
        agent,
        link,
        running: Arc::new(AtomicU32::new(0)),
        slots: cfg.project_slots,
        data_dir: cfg.data_dir.clone(),
        source,
        clock,
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
        activity_interval: Duration::from_secs(cfg.activity_interval_secs.max(1)),
        tunnel,
        metrics_listen: cfg.metrics_listen,
        tls,
        tls_versions: cocalc_client::tls::HttpVersions::with_http2(cfg.tls_http2),
        tls_failures: Arc::default(),
        admission,
        backup_every: cfg
            .backup
            .as_ref()
            .filter(|b| b.every_secs > 0)
            .map(|b| (Duration::from_secs(b.every_secs), b.keep.map(Into::into))),
    })
}

impl Host {
    /// This host's metrics ([`crate::metrics`]).
    pub fn metrics(&self) -> crate::metrics::HostMetrics {
        let m = crate::metrics::HostMetrics::new(
            self.agent.clone(),
            self.link.clone(),
            self.clock.clone(),
            self.running.clone(),
            self.slots,
            self.tunnel.clone(),
        );
        let m = m.with_admission(self.admission.clone());
        match self.tls {
            Some(_) => m.with_tls_failures(self.tls_failures.clone()),
            None => m,
        }
    }

    /// Health, capacity and load as reported in keepalives.
    pub fn status(&self) -> (Health, Capacity, Load) {
        let (free, total) = disk(&self.data_dir);
        let cap = Capacity {
            cpu_millis: std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000,
            memory_bytes: 0,
            disk_free_bytes: free,
            disk_total_bytes: total,
            project_slots: self.slots,
        };
        let load = Load {
            running_projects: self.running.load(Ordering::Relaxed),
            cpu: loadavg() / (cap.cpu_millis as f64 / 1000.0),
            memory_used_bytes: 0,
        };
        // A hidden host without its tunnel cannot serve anyone: placement
        // skips failing hosts.
        let health = match &self.tunnel {
            Some(t) if !t.is_connected() => Health::Failing,
            _ => Health::Ok,
        };
        (health, cap, load)
    }

    /// One round of activity handling: projects used since the last round
    /// are reported to the master and count as active for the culler; then
    /// the culler samples the running projects and stops the idle ones
    /// (unless the idle timeout is 0).
    pub async fn activity_round(&self, culler: &mut crate::activity::IdleCuller) {
        let active = self.agent.take_active();
        if !active.is_empty() {
            let now = self.clock.now();
            for p in &active {
                culler.note_activity(*p);
            }
            let report = active
                .iter()
                .map(|p| cocalc_core::wire::ProjectActivity {
                    project: *p,
                    last_use: now,
                })
                .collect();
            if let Err(e) = self.link.report_activity(report).await {
                tracing::warn!(error = %e, "activity report to the master failed");
            }
        }
        if self.idle_timeout.is_zero() {
            return;
        }
        match culler
            .tick(self.agent.runner().as_ref(), self.source.as_ref())
            .await
        {
            Ok(verdicts) => {
                for (project, v) in verdicts {
                    match v {
                        Ok(crate::activity::CullDecision::Stop) => {
                            tracing::info!(%project, "stopped idle project")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(%project, "idle culler: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("idle culler: listing projects: {e}"),
        }
    }

    /// How users reach this host, as registered with the master (a
    /// hidden host's follows the proxy its tunnel is at).
    pub fn endpoint(&self) -> HostEndpoint {
        self.link.endpoint()
    }

    /// The tunnel client of a hidden host (`None` for a host with a URL).
    pub fn tunnel(&self) -> Option<&Arc<crate::tunnel::TunnelClient>> {
        self.tunnel.as_ref()
    }

    /// Serves the data plane on `listener` (and through the tunnel, if the
    /// host has one) and keeps the master link up until `shutdown`
    /// completes.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve(Some(listener), shutdown).await
    }

    /// Runs a hidden host: the data plane only through its tunnel, the
    /// master link, until `shutdown` completes.
    pub async fn run_hidden(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if self.tunnel.is_none() {
            return Err(std::io::Error::other(
                "run_hidden needs a host built with build_hidden (it has no tunnel)",
            ));
        }
        self.serve(None, shutdown).await
    }

    /// Serves the data plane on `listener` if there is one (over HTTPS if
    /// the config had `tls_cert_file`) and through the tunnel if the host
    /// has one, and keeps the master link up, until
    /// `shutdown` completes. ([`Host::run`] and [`Host::run_hidden`] are the
    /// two usual cases.)
    pub async fn serve(
        self,
        listener: Option<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let tls_config = match &self.tls {
            Some(certs) => Some(
                certs
                    .server_config(self.tls_versions)
                    .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?,
            ),
            None => None,
        };
        let me = Arc::new(self);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        // Metrics on their own address, when configured.
        let metrics = match me.metrics_listen {
            Some(at) => {
                let l = tokio::net::TcpListener::bind(at).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("metrics_listen {at}: {e}"))
                })?;
                eprintln!("cocalc-host: metrics on http://{}/metrics", l.local_addr()?);
                let m = me.metrics();
                Some(tokio::spawn(cocalc_client::serve::serve_metrics(
                    l,
                    move || m.render(),
                    wait(rx.clone()),
                )))
            }
            None => None,
        };
        // Count running projects for keepalives.
        let counter = {
            let me = me.clone();
            let stop = wait(rx.clone());
            tokio::spawn(async move {
                let count = async {
                    loop {
                        if let Ok(list) = me.agent.runner().list().await {
                            let n = list
                                .iter()
                                .filter(|s| s.state == ProjectState::Running)
                                .count();
                            me.running.store(n as u32, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                };
                tokio::select! { _ = count => {}, _ = stop => {} }
            })
        };
        // Save the ACL cache to the local store every 30 s (and at the end),
        // flush the audit sink, and re-read the TLS certificate.
        let saver = {
            let me = me.clone();
            let stop = wait(rx.clone());
            tokio::spawn(async move {
                let save = async {
                    loop {
                        tokio::time::sleep(HOUSEKEEPING).await;
                        me.agent.flush_audit();
                        match me.tls.as_ref().map(|c| c.reload()) {
                            Some(Ok(true)) => tracing::info!("presenting a new TLS certificate"),
                            Some(Err(e)) => tracing::warn!(
                                error = %e,
                                "reloading the TLS certificate failed; keeping the current one"
                            ),
                            _ => {}
                        }
                        if let Err(e) = me.agent.save_acl().await {
                            tracing::warn!(error = %e, "saving the ACL cache failed");
                        }
                    }
                };
                tokio::select! { _ = save => {}, _ = stop => {} }
                if let Err(e) = me.agent.save_acl().await {
                    tracing::warn!(error = %e, "saving the ACL cache failed");
                }
            })
        };
        // Every activity interval (default a minute): report recent use to the master, and stop projects
        // that are truly idle (no requests, no CPU, no connections).
        // Scheduled backups: every project, one at a time, then retention.
        let backups = me.backup_every.map(|(every, keep)| {
            let me = me.clone();
            let stop = wait(rx.clone());
            tokio::spawn(async move {
                let round = async {
                    loop {
                        tokio::time::sleep(every).await;
                        match me.agent.backup_all(keep.as_ref(), me.clock.now()).await {
                            Ok(failed) => {
                                for (project, e) in failed {
                                    tracing::warn!(%project, error = %e, "backup failed");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "backup round failed"),
                        }
                    }
                };
                tokio::select! { _ = round => {}, _ = stop => {} }
            })
        });
        let culler = {
            let me = me.clone();
            let stop = wait(rx.clone());
            tokio::spawn(async move {
                let policy = crate::activity::CullPolicy {
                    idle_timeout: me.idle_timeout,
                    ..crate::activity::CullPolicy::default()
                };
                let mut culler = crate::activity::IdleCuller::new(policy, me.clock.clone());
                let cull = async {
                    loop {
                        tokio::time::sleep(me.activity_interval).await;
                        me.activity_round(&mut culler).await;
                    }
                };
                tokio::select! { _ = cull => {}, _ = stop => {} }
            })
        };
        let status_me = me.clone();
        let status: Arc<dyn crate::master_link::HostStatus> = Arc::new(move || status_me.status());
        let link = tokio::spawn(me.link.clone().run(status, wait(rx.clone())));
        let router = crate::dataplane::router(me.agent.clone());
        let tunnel = me.tunnel.clone().map(|t| {
            let plane = crate::tunnel::DataPlane {
                router: router.clone(),
                lean: Some(crate::dataplane::LeanPorts::new(me.agent.clone())),
            };
            tokio::spawn(t.run(plane, wait(rx.clone())))
        });
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let result = match (listener, tls_config) {
            (Some(l), Some(config)) => {
                // HTTPS: every request through hyper (the lean relay reads
                // a bare socket).
                let tls_failures = me.tls_failures.clone();
                let admission = me.admission.clone();
                cocalc_client::tls::serve_tls(
                    l,
                    config,
                    move |peer: SocketAddr| {
                        crate::admission::Admitted::new(
                            hyper_util::service::TowerToHyperService::new(router.clone()),
                            admission.admit(peer.ip()).over_tls(),
                        )
                    },
                    move |peer, why| {
                        tls_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %why, "TLS handshake failed")
                    },
                    wait(rx),
                )
                .await
            }
            (Some(l), None) => {
                // Plain requests to servers in projects take the lean
                // relay; everything else the router.
                let lean = crate::dataplane::LeanPorts::new(me.agent.clone());
                let admission = me.admission.clone();
                cocalc_client::serve::serve_lean(
                    l,
                    move |peer: SocketAddr| {
                        let ticket = admission.admit(peer.ip());
                        (
                            crate::admission::AdmittedLean::new(lean.clone(), ticket.clone()),
                            crate::admission::Admitted::new(
                                hyper_util::service::TowerToHyperService::new(router.clone()),
                                ticket,
                            ),
                        )
                    },
                    wait(rx),
                )
                .await
            }
            (None, _) => {
                wait(rx).await;
                Ok(())
            }
        };
        stopper.abort();
        if let Some(t) = tunnel {
            let _ = t.await;
        }
        let _ = link.await;
        if let Some(m) = metrics {
            let _ = m.await;
        }
        let _ = counter.await;
        let _ = saver.await;
        let _ = culler.await;
        if let Some(b) = backups {
            let _ = b.await;
        }
        if let Some(log) = me.admission.access_log() {
            if !log.flush(Duration::from_secs(5)) {
                tracing::warn!("the access log's last lines were not written within 5 s");
            }
        }
        result
    }
}

fn disk(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let f = s.fragment_size();
            (s.blocks_available() * f, s.blocks() * f)
        }
        Err(_) => (0, 0),
    }
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::HostConfig;

    fn check(place: &str) -> Result<(), String> {
        let cfg: HostConfig = toml::from_str(&format!(
            "{place}master_url = \"http://127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n"
        ))
        .map_err(|e| e.to_string())?;
        cfg.check()
    }

    #[test]
    fn a_host_listens_or_is_hidden_never_both() {
        assert!(check("listen = \"127.0.0.1:0\"\n").is_ok());
        assert!(check("tunnel_url = \"http://proxy:8000\"\n").is_ok());
        let both = check("listen = \"127.0.0.1:0\"\ntunnel_url = \"http://proxy:8000\"\n");
        assert!(both.unwrap_err().contains("exclude each other"));
        assert!(check("").unwrap_err().contains("set listen"));
        assert!(check("tunnel_url = \"https://proxy:8443\"\n").is_ok());
        assert!(
            check("tunnel_url = \"https://proxy:8443\"\ntunnel_ca_file = \"/etc/ca.pem\"\n")
                .is_ok()
        );
        let ftp = check("tunnel_url = \"ftp://proxy:8000\"\n").unwrap_err();
        assert!(ftp.contains("must start with https://"), "{ftp}");
        let ca = check("tunnel_url = \"http://proxy:8000\"\ntunnel_ca_file = \"/etc/ca.pem\"\n");
        assert!(ca
            .unwrap_err()
            .contains("tunnel_ca_file goes with an https://"));
        let public = check("tunnel_url = \"http://p:1\"\npublic_url = \"http://h:2\"\n");
        assert!(public.unwrap_err().contains("public_url has no meaning"));
    }

    #[test]
    fn backup_settings_are_checked() {
        let listen = "listen = \"127.0.0.1:0\"\n";
        let with = |b: &str| {
            let cfg: HostConfig = toml::from_str(&format!(
                "{listen}master_url = \"http://m:1\"\ndata_dir = \"/tmp/x\"\n[backup]\n{b}"
            ))
            .map_err(|e| e.to_string())?;
            cfg.check()
        };
        assert!(with("repository = \"/r\"\npassword_file = \"/p\"\n").is_ok());
        assert!(with("kind = \"dir\"\nrepository = \"/r\"\n").is_ok());
        assert!(with(
            "repository = \"opendal:s3\"\npassword_file = \"/p\"\nevery_secs = 60\n\
             keep = { daily = 7 }\n[backup.options]\nbucket = \"b\"\n"
        )
        .is_ok());
        for (bad, why) in [
            ("repository = \"/r\"\n", "password_file is required"),
            ("kind = \"tape\"\nrepository = \"/r\"\n", "not one of"),
            (
                "kind = \"dir\"\nrepository = \"/r\"\npassword_file = \"/p\"\n",
                "takes no password_file",
            ),
            (
                "repository = \"\"\npassword_file = \"/p\"\n",
                "repository is empty",
            ),
            (
                "repository = \"/r\"\npassword_file = \"/p\"\nkeep = { daily = 1 }\n",
                "set every_secs",
            ),
            ("repository = \"/r\"\npassword = \"x\"\n", "unknown field"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn backup_stores_open_or_say_why() {
        let d = tempfile::tempdir().unwrap();
        let settings = |b: &str| -> super::BackupSettings { toml::from_str(b).unwrap() };
        let dir = settings(&format!(
            "kind = \"dir\"\nrepository = \"{}\"\n",
            d.path().join("copies").display()
        ));
        assert!(super::backup_store(&dir, d.path()).await.is_ok());
        assert!(d.path().join("copies").is_dir());
        let missing = settings(&format!(
            "repository = \"{}\"\npassword_file = \"{}\"\n",
            d.path().join("repo").display(),
            d.path().join("no-such-file").display()
        ));
        let e = super::backup_store(&missing, d.path()).await.err().unwrap();
        assert!(
            e.contains("password_file") && e.contains("no-such-file"),
            "{e}"
        );
        assert!(!d.path().join("repo").exists(), "nothing created");
    }

    #[test]
    fn a_hidden_host_may_list_several_proxies() {
        let two = "tunnel_url = [\"https://a:8443\", \"http://b:8000/\"]\n";
        assert!(check(two).is_ok());
        let cfg: HostConfig = toml::from_str(&format!(
            "{two}master_url = \"http://m:1\"\ndata_dir = \"/tmp/x\"\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.tunnel_url.unwrap().urls(),
            ["https://a:8443".to_string(), "http://b:8000/".to_string()]
        );
        // tunnel_ca_file goes with any https:// proxy among them.
        let ca = "tunnel_ca_file = \"/etc/ca.pem\"\n";
        assert!(check(&format!("{two}{ca}")).is_ok());
        let plain = "tunnel_url = [\"http://a:1\", \"http://b:1\"]\n";
        assert!(check(&format!("{plain}{ca}"))
            .unwrap_err()
            .contains("tunnel_ca_file goes with"));
        for (bad, why) in [
            ("tunnel_url = []\n", "lists no proxy"),
            (
                "tunnel_url = [\"http://a:1\", \"ftp://b:1\"]\n",
                "\"ftp://b:1\" must start",
            ),
            ("tunnel_url = [\"http://a:1\", \"http://a:1/\"]\n", "twice"),
            (
                "tunnel_url = \"https://a:1/edge\"\n",
                "a path, query or fragment",
            ),
            (
                "listen = \"127.0.0.1:0\"\ntunnel_url = [\"http://a:1\"]\n",
                "exclude each other",
            ),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let ok = "listen = \"127.0.0.1:0\"\nclient_connections = 10\n\
                  trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n";
        assert!(check(ok).is_ok());
        let bad = check("listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"proxy.example\"]\n");
        assert!(bad
            .unwrap_err()
            .contains("\"proxy.example\" is not an address"));
        let hidden = check("tunnel_url = \"http://p:1\"\nclient_connections = 10\n");
        assert!(hidden.unwrap_err().contains("go with listen"));
    }

    #[test]
    fn an_access_log_needs_a_directory_and_a_listen_address() {
        assert!(check("listen = \"127.0.0.1:0\"\naccess_log = \"-\"\n").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("access.log");
        let ok = format!(
            "listen = \"127.0.0.1:0\"\naccess_log = \"{}\"\n",
            file.display()
        );
        assert!(check(&ok).is_ok());
        let missing = dir.path().join("no").join("access.log");
        let bad = check(&format!(
            "listen = \"127.0.0.1:0\"\naccess_log = \"{}\"\n",
            missing.display()
        ));
        assert!(bad.unwrap_err().contains("is not a directory"));
        let hidden = check("tunnel_url = \"http://p:1\"\naccess_log = \"-\"\n");
        assert!(hidden.unwrap_err().contains("logged by its proxy"));
    }

    #[test]
    fn https_needs_both_files_and_a_listen_address() {
        let tls = "tls_cert_file = \"/c.crt\"\ntls_key_file = \"/c.pem\"\n";
        assert!(check(&format!("listen = \"127.0.0.1:0\"\n{tls}")).is_ok());
        let half = check("listen = \"127.0.0.1:0\"\ntls_cert_file = \"/c.crt\"\n");
        assert!(half.unwrap_err().contains("go together"));
        let hidden = check(&format!("tunnel_url = \"https://p:1\"\n{tls}"));
        assert!(hidden.unwrap_err().contains("go with listen"));
    }

    #[test]
    fn a_certificate_that_does_not_load_is_named_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("host.toml");
        let missing = dir.path().join("missing.crt");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nmaster_url = \"http://127.0.0.1:1\"\n\
                 data_dir = \"/tmp/x\"\ntls_cert_file = \"{0}\"\ntls_key_file = \"{0}\"\n",
                missing.display()
            ),
        )
        .unwrap();
        let e = HostConfig::load(&cfg).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
    }
}
