//! [`SshIngress`]: `ssh project-<uuid>@proxy` into projects.
//!
//! An SSH server in-process ([russh]) that speaks for the project-hosts:
//!
//! 1. **User name.** `project-<uuid>` or the bare `<uuid>` (canonical,
//!    lowercase). Anything else is refused like a wrong key.
//! 2. **Public key only.** Once the client has proved it holds the key, the
//!    master is asked (`POST /v1/ssh/authorize`, with the proxy's proxy key)
//!    whether a collaborator of that project registered the key; it answers
//!    with a connect token for that collaborator (placing the project if
//!    needed), or one uniform refusal. The client sees the same
//!    "Permission denied (publickey)" for an unknown project, an unknown
//!    key, a key of a non-collaborator and a malformed user name; every
//!    refusal and every login is an audit record (action `ssh`, through
//!    the [`Ingress`]'s audit sink) and each refusal a counter by reason
//!    ([`SshRefusals`]). Refusals take the same time (russh's
//!    `auth_rejection_time`).
//! 3. **Forward.** Each channel becomes a request to the project's host
//!    data plane, reached through the [`Ingress`]'s route and transport
//!    (so hidden hosts behind tunnels work the same) with the token:
//!    * `exec` → the host's `/{project}/exec-stream` WebSocket (`sh -c
//!      COMMAND`), stdout and stderr kept apart, the exit code sent as
//!      `exit-status`;
//!    * `shell` with a pty → the `/{project}/terminal` WebSocket, resized on
//!      `window-change`; a shell without a pty runs `sh` like an exec;
//!    * `direct-tcpip` (`ssh -L`) to `localhost`/`127.0.0.1`/`::1` → the
//!      `/{project}/tcp/{port}` WebSocket, bytes relayed both ways;
//!    * the `sftp` subsystem → an SFTP server backed by the host's files
//!      API (the project's home is `/`).
//!
//! Standard input of an exec (and of a shell without a pty) streams to the
//! command as it comes, and the client's EOF closes it, so interactive
//! protocols over `ssh host cmd` (rsync, git) work. The project's hosts
//! start a stopped project on the first request.
//!
//! Connect tokens live for minutes; a long SSH connection asks the master
//! again for a fresh one before opening a channel with a token about to
//! expire, and uses the one it has while it is valid if the master cannot
//! be asked. When the master accepts the key but cannot open the project
//! yet (its host is down, no host has room), the login stands and each
//! channel tries again, printing why it cannot run (`cocalc: …` on
//! standard error, exit status 255).
//!
//! **While the master is away** (it cannot be reached, or something in
//! front of it answers for it), a login with a key the master granted
//! for that project through this proxy before is accepted with that grant,
//! as long as its token has a minute left ([`SshIngress`] remembers
//! the last grant per project and key, at most [`REMEMBERED_GRANTS`]).
//! Nothing is granted that the master did not grant: the token is the
//! master's, and the host checks it as always. Any answer of the master
//! itself (a refusal, an error) is obeyed; logins let in this way are
//! audited as granted "from the master's earlier grant". Every other
//! login is refused while the master is away, as nobody can check it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocalc_core::wire::{
    ExecStreamEnd, OpenProjectResponse, SshAuthorizeRequest, EXEC_STREAM_STDERR, EXEC_STREAM_STDOUT,
};
use cocalc_core::{
    ApiError, AuditOutcome, AuditRecord, BoxedConnection, ExecRequest, HostId, ProjectId,
    SharedClock,
};
use futures_util::{SinkExt, StreamExt};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::Ingress;

/// A WebSocket to a host.
type HostSocket = tokio_tungstenite::WebSocketStream<BoxedConnection>;

/// Why the SSH ingress could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The host key file could not be read, parsed or written.
    #[error("host key {path}: {message}")]
    HostKey {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Listening failed.
    #[error("ssh listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// SSH authentication refusals by reason (each also an audit record).
#[derive(Debug, Default)]
pub struct SshRefusals {
    /// User names that name no project (`project-<uuid>` or `<uuid>`).
    pub bad_user: AtomicU64,
    /// Keys the master did not authorize for the project (unknown
    /// project, unknown key, not a collaborator: one reason on purpose).
    pub not_authorized: AtomicU64,
    /// The master could not be asked, or failed.
    pub master_error: AtomicU64,
    /// Methods other than public key (password, keyboard-interactive).
    pub bad_method: AtomicU64,
    /// Login attempts over [`AUTH_ATTEMPTS_PER_MINUTE`] from one address.
    pub rate_limited: AtomicU64,
    /// Connections from an address that held
    /// [`IngressConfig::client_connections`](crate::IngressConfig::client_connections)
    /// already (closed before the SSH handshake).
    pub too_many_connections: AtomicU64,
}

/// Why a login was refused (the audit record's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The user name names no project.
    BadUser,
    /// The master did not authorize the key for the project.
    NotAuthorized,
    /// The master could not be asked, or failed.
    MasterError,
    /// A method other than public key.
    BadMethod,
    /// Too many attempts from the client's address.
    RateLimited,
    /// Too many connections from the client's address.
    TooManyConnections,
}

impl Refusal {
    /// The reason as the audit record names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadUser => "bad_user",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::MasterError => "master_error",
            Refusal::BadMethod => "bad_method",
            Refusal::RateLimited => "rate_limited",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }
}

impl SshRefusals {
    /// The counter of one reason.
    pub fn counter(&self, reason: Refusal) -> &AtomicU64 {
        match reason {
            Refusal::BadUser => &self.bad_user,
            Refusal::NotAuthorized => &self.not_authorized,
            Refusal::MasterError => &self.master_error,
            Refusal::BadMethod => &self.bad_method,
            Refusal::RateLimited => &self.rate_limited,
            Refusal::TooManyConnections => &self.too_many_connections,
        }
    }
}

/// Whether `e` is an answer of the master itself, rather than the
/// client's report that it could not reach it (`master_unreachable`) or
/// an answer that is not the master's JSON (`http_error`, `bad_response`:
/// a load balancer in front of it).
fn from_the_master(e: &ApiError) -> bool {
    !matches!(
        e.code.as_str(),
        "master_unreachable" | "http_error" | "bad_response"
    )
}

/// Public-key login attempts allowed per client address and minute (also
/// the burst); more are refused without asking the master.
pub const AUTH_ATTEMPTS_PER_MINUTE: u32 = 60;

/// Loads the Ed25519 host key from `path` (OpenSSH private key format), or
/// generates one and writes it there (mode 0600) if the file is missing.
pub fn load_or_generate_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    let bad = |message: String| SshError::HostKey {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.as_bytes()).map_err(|e| bad(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| bad(format!("random source: {e}")))?;
            let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
                &seed,
            ));
            let text = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|e| bad(e.to_string()))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            }
            write_private(path, text.as_bytes()).map_err(|e| bad(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// The project an SSH user name names: `project-<uuid>` or `<uuid>`.
pub fn project_of_user(user: &str) -> Option<ProjectId> {
    user.strip_prefix("project-")
        .unwrap_or(user)
        .parse::<ProjectId>()
        .ok()
}

/// The SSH ingress: accepts connections and serves them (see the module
/// docs).
pub struct SshIngress {
    ingress: Arc<Ingress>,
    clock: SharedClock,
    /// The master's last grant per project and key (OpenSSH key line),
    /// for logins while the master is away.
    grants: moka::sync::Cache<(ProjectId, String), OpenProjectResponse>,
    /// Logins let in from such an earlier grant.
    earlier_grants: AtomicU64,
    config: Arc<russh::server::Config>,
    refusals: Arc<SshRefusals>,
    attempts: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl std::fmt::Debug for SshIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshIngress")
            .field("refusals", &self.refusals)
            .finish_non_exhaustive()
    }
}

impl SshIngress {
    /// An SSH ingress with `host_key`, forwarding through `ingress`.
    pub fn new(ingress: Arc<Ingress>, host_key: PrivateKey, clock: SharedClock) -> Arc<Self> {
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::PublicKey);
        let config = russh::server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-cocalc-proxy".into()),
            methods,
            keys: vec![host_key],
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(3600)),
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            ..Default::default()
        };
        let n = std::num::NonZeroU32::new(AUTH_ATTEMPTS_PER_MINUTE)
            .unwrap_or(std::num::NonZeroU32::MIN);
        Arc::new(SshIngress {
            ingress,
            clock,
            // Tokens live at most 30 minutes (the master's token_ttl_secs).
            grants: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED_GRANTS)
                .time_to_live(Duration::from_secs(1800))
                .build(),
            config: Arc::new(config),
            earlier_grants: AtomicU64::new(0),
            refusals: Arc::new(SshRefusals::default()),
            attempts: governor::RateLimiter::keyed(governor::Quota::per_minute(n)),
        })
    }

    /// Refusal counters.
    pub fn refusals(&self) -> &SshRefusals {
        &self.refusals
    }

    /// Logins let in while the master could not be asked, from its
    /// earlier grants (see the module overview).
    pub fn earlier_grant_logins(&self) -> u64 {
        self.earlier_grants.load(Ordering::Relaxed)
    }

    /// Drops rate-limit state of addresses not seen lately (call
    /// periodically, like [`Ingress::prune_limits`]).
    pub fn prune_limits(&self) {
        self.attempts.retain_recent();
    }

    /// Accepts connections on `listener` until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        mut listener: impl cocalc_client::serve::Accept,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut shutdown => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "ssh accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Sessions count under the per-client connection cap, with the
            // client's HTTP connections.
            let slot = match self.ingress.connection_slot(peer.ip()) {
                Ok(slot) => slot,
                Err(cap) => {
                    self.refuse_connection(peer, cap);
                    continue;
                }
            };
            let _ = cocalc_client::liveness::tune(&sock);
            let conn = Conn {
                ssh: self.clone(),
                peer,
                login: None,
                channels: HashMap::new(),
                ptys: HashMap::new(),
            };
            let config = self.config.clone();
            tokio::spawn(async move {
                match russh::server::run_stream(config, sock, conn).await {
                    Ok(session) => {
                        if let Err(e) = session.await {
                            tracing::debug!(%peer, error = %e, "ssh session ended");
                        }
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "ssh handshake failed"),
                }
                drop(slot);
            });
        }
    }

    /// Counts and audits a connection closed at once because its address
    /// holds `cap` connections already.
    fn refuse_connection(&self, peer: std::net::SocketAddr, cap: u32) {
        let reason = Refusal::TooManyConnections;
        self.refusals
            .counter(reason)
            .fetch_add(1, Ordering::Relaxed);
        self.ingress.audit(AuditRecord::new(
            self.clock.now(),
            AuditOutcome::Refuse,
            "ssh",
            reason.as_str(),
            format!("client {peer}: this address holds {cap} connections already"),
        ));
    }
}

/// Most grants [`SshIngress`] remembers for logins while the master is
/// away (the least recently used go first).
pub const REMEMBERED_GRANTS: u64 = 10_000;

impl SshIngress {
    /// Asks the master whether `key_line` may log in to `project`,
    /// remembering what it grants. When the master cannot be asked, an
    /// earlier grant whose token lives at least `life` longer answers
    /// instead, marked by `true`.
    async fn authorize(
        &self,
        project: ProjectId,
        key_line: &str,
        life: Duration,
    ) -> Result<(OpenProjectResponse, bool), ApiError> {
        let asked = self
            .ingress
            .master()
            .ssh_authorize(&SshAuthorizeRequest::new(project, key_line.to_string()))
            .await;
        let id = (project, key_line.to_string());
        match asked {
            Ok(open) => {
                self.grants.insert(id, open.clone());
                Ok((open, false))
            }
            Err(e) if !from_the_master(&e) => match self.grants.get(&id) {
                Some(open) if open.expires.since(self.clock.now()) >= life => Ok((open, true)),
                _ => Err(e),
            },
            Err(e) => {
                if e.status == 403 {
                    // The master no longer grants it: forget it.
                    self.grants.invalidate(&id);
                }
                Err(e)
            }
        }
    }
}

/// An authenticated login: the project and the current token.
struct Login {
    project: ProjectId,
    key_line: String,
    /// The current token; `None` while the project cannot be opened yet
    /// (its host is down, no host has room).
    open: Mutex<Option<OpenProjectResponse>>,
}

/// What a channel task needs to reach the project's host.
#[derive(Clone)]
struct Ctx {
    ssh: Arc<SshIngress>,
    login: Arc<Login>,
    peer: SocketAddr,
}

impl Ctx {
    /// The host and a token valid for at least another minute.
    async fn token(&self) -> Result<(HostId, String), ApiError> {
        let now = self.ssh.clock.now();
        if let Some(o) = &*self.login.open.lock().unwrap_or_else(|p| p.into_inner()) {
            if o.expires.since(now) > Duration::from_secs(60) {
                return Ok((o.host, o.token.clone()));
            }
        }
        // With the master away, a token with a few seconds left still
        // opens a channel (the host checks it when the channel opens).
        let fresh = self
            .ssh
            .authorize(
                self.login.project,
                &self.login.key_line,
                Duration::from_secs(5),
            )
            .await?
            .0;
        let out = (fresh.host, fresh.token.clone());
        *self.login.open.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
        Ok(out)
    }

    /// A WebSocket to `/{project}{path}` on the project's host.
    async fn socket(&self, path: &str) -> Result<HostSocket, ApiError> {
        let (host, token) = self.token().await?;
        let crate::HostConnection {
            conn,
            authority,
            via,
        } = self.ssh.ingress.connect_host(host).await?;
        let url = format!("ws://{authority}/{}{path}", self.login.project);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ApiError::new(500, "internal", format!("request {url}: {e}")))?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| ApiError::new(500, "internal", "token is not a header value"))?;
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, bearer);
        req.headers_mut().insert(
            "x-forwarded-for",
            self.peer
                .ip()
                .to_string()
                .parse()
                .map_err(|_| ApiError::new(500, "internal", "peer address"))?,
        );
        if let Some((name, value)) = via {
            req.headers_mut().insert(name, value);
        }
        let handshake = std::pin::pin!(async move {
            match tokio_tungstenite::client_async(req, conn).await {
                Ok((ws, _)) => Ok(ws),
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    let status = resp.status().as_u16();
                    Err(resp
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice::<ApiError>(b).ok())
                        .unwrap_or_else(|| {
                            ApiError::new(status, "host_refused", format!("host answered {status}"))
                        }))
                }
                Err(e) => Err(ApiError::new(
                    502,
                    "host_failed",
                    format!("host {host}: {e}"),
                )),
            }
        });
        // A hung host accepts the connection and never answers: the wait
        // is watched as an ingress request's is.
        self.ssh.ingress.while_host_answers(host, handshake).await
    }

    /// A plain HTTP request to `/{project}{path}` on the project's host:
    /// the status and the body.
    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, bytes::Bytes), ApiError> {
        use http_body_util::BodyExt;
        let (host, token) = self.token().await?;
        let crate::HostConnection {
            conn,
            authority,
            via,
        } = self.ssh.ingress.connect_host(host).await?;
        let failed = |e: &dyn std::fmt::Display| {
            ApiError::new(502, "host_failed", format!("host {host}: {e}"))
        };
        let uri = format!("/{}{path}", self.login.project);
        let client = self.peer.ip().to_string();
        let exchange = std::pin::pin!(async move {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
                    .await
                    .map_err(|e| failed(&e))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            // The SSH client, as for the session's WebSockets.
            let mut req = http::Request::builder()
                .method(method)
                .uri(uri)
                .header(http::header::HOST, authority)
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .header("x-forwarded-for", client);
            if let Some((name, value)) = via {
                req = req.header(name, value);
            }
            let req = req
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .map_err(|e| failed(&e))?;
            let resp = sender.send_request(req).await.map_err(|e| failed(&e))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| failed(&e))?
                .to_bytes();
            Ok((status, body))
        });
        self.ssh.ingress.while_host_answers(host, exchange).await
    }

    /// A channel that could not be served, as a refusal record (action
    /// `ssh_<what>`, reason the error's code).
    fn audit_channel(&self, what: &str, e: &ApiError) {
        let mut r = AuditRecord::new(
            self.ssh.clock.now(),
            AuditOutcome::Refuse,
            format!("ssh_{what}"),
            e.code.clone(),
            format!("client {}: {}", self.peer, e.message),
        );
        r.project = Some(self.login.project);
        self.ssh.ingress.audit(r);
    }
}

/// One SSH connection.
struct Conn {
    ssh: Arc<SshIngress>,
    peer: SocketAddr,
    login: Option<Arc<Login>>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    ptys: HashMap<ChannelId, cocalc_core::PtySize>,
}

impl Conn {
    fn refuse(&self, reason: Refusal, user: &str, detail: &str) -> Auth {
        self.ssh
            .refusals
            .counter(reason)
            .fetch_add(1, Ordering::Relaxed);
        let user: String = user.chars().take(80).collect();
        let mut r = AuditRecord::new(
            self.ssh.clock.now(),
            AuditOutcome::Refuse,
            "ssh",
            reason.as_str(),
            format!("client {}: user {user:?}: {detail}", self.peer),
        );
        r.project = project_of_user(&user);
        self.ssh.ingress.audit(r);
        Auth::reject()
    }

    fn grant(&self, project: ProjectId, key: &PublicKey, detail: String) {
        let mut r = AuditRecord::new(
            self.ssh.clock.now(),
            AuditOutcome::Grant,
            "ssh",
            "granted",
            format!(
                "client {}: key {}{detail}",
                self.peer,
                key.fingerprint(russh::keys::HashAlg::Sha256)
            ),
        );
        r.project = Some(project);
        self.ssh.ingress.audit(r);
    }

    fn ctx(&self) -> Option<Ctx> {
        Some(Ctx {
            ssh: self.ssh.clone(),
            login: self.login.clone()?,
            peer: self.peer,
        })
    }

    fn pty_size(col_width: u32, row_height: u32) -> cocalc_core::PtySize {
        let clamp = |v: u32, d: u16| {
            if v == 0 {
                d
            } else {
                v.min(1000) as u16
            }
        };
        cocalc_core::PtySize {
            rows: clamp(row_height, 24),
            cols: clamp(col_width, 80),
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.refuse(
            Refusal::BadMethod,
            user,
            "password authentication is not offered",
        ))
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        public_key: &PublicKey,
    ) -> Result<Auth, Self::Error> {
        if self.ssh.attempts.check_key(&self.peer.ip()).is_err() {
            return Ok(self.refuse(Refusal::RateLimited, user, "too many login attempts"));
        }
        let Some(project) = project_of_user(user) else {
            return Ok(self.refuse(Refusal::BadUser, user, "user name names no project"));
        };
        let key_line = match public_key.to_openssh() {
            Ok(l) => l,
            Err(e) => return Ok(self.refuse(Refusal::BadUser, user, &e.to_string())),
        };
        let answer = self
            .ssh
            .authorize(project, &key_line, Duration::from_secs(60))
            .await;
        match answer {
            Ok((open, earlier)) => {
                let how = if earlier {
                    self.ssh.earlier_grants.fetch_add(1, Ordering::Relaxed);
                    ", from the master's earlier grant (the master cannot be asked)"
                } else {
                    ""
                };
                self.grant(project, public_key, format!(", host {}{how}", open.host));
                self.login = Some(Arc::new(Login {
                    project,
                    key_line,
                    open: Mutex::new(Some(open)),
                }));
                Ok(Auth::Accept)
            }
            // The master checked the key before it tried to open the
            // project: the login stands, and each channel tries again and
            // tells the user why it cannot run yet. Not when the master
            // could not be asked at all (or something in front of it
            // answered): then nobody checked the key.
            Err(e) if e.status == 409 || (e.status == 503 && from_the_master(&e)) => {
                self.grant(project, public_key, format!(", pending: {}", e.message));
                self.login = Some(Arc::new(Login {
                    project,
                    key_line,
                    open: Mutex::new(None),
                }));
                Ok(Auth::Accept)
            }
            Err(e) if e.status == 403 && e.message.contains("a proxy key or the admin key") => {
                tracing::warn!(
                    "the proxy's API key is neither a proxy key nor the admin key: SSH logins \
                     cannot be authorized (cocalc proxy-key create NAME)"
                );
                Ok(self.refuse(Refusal::MasterError, user, &e.message))
            }
            Err(e) if e.status == 403 => Ok(self.refuse(Refusal::NotAuthorized, user, &e.message)),
            Err(e) => Ok(self.refuse(Refusal::MasterError, user, &e.message)),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.login.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.ptys
            .insert(channel, Self::pty_size(col_width, row_height));
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(ctx), Some(ch)) = (self.ctx(), self.channels.remove(&channel)) else {
            return session.channel_failure(channel);
        };
        let command = String::from_utf8_lossy(data).into_owned();
        tokio::spawn(run_exec(ctx, ch, vec!["sh".into(), "-c".into(), command]));
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(ctx), Some(ch)) = (self.ctx(), self.channels.remove(&channel)) else {
            return session.channel_failure(channel);
        };
        match self.ptys.remove(&channel) {
            Some(size) => tokio::spawn(run_shell(ctx, ch, size)),
            None => tokio::spawn(run_exec(ctx, ch, vec!["sh".into()])),
        };
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name != "sftp" {
            return session.channel_failure(channel);
        }
        let (Some(ctx), Some(ch)) = (self.ctx(), self.channels.remove(&channel)) else {
            return session.channel_failure(channel);
        };
        tokio::spawn(crate::sftp::run(ctx_files(ctx), ch));
        session.channel_success(channel)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ctx) = self.ctx() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let port = u16::try_from(port_to_connect).ok().filter(|p| *p > 0);
        let local = matches!(host_to_connect, "localhost" | "127.0.0.1" | "::1" | "[::1]");
        let Some(port) = port.filter(|_| local) else {
            let e = ApiError::new(
                403,
                "forward_target",
                format!("forwarding to {host_to_connect}:{port_to_connect} is not allowed; only localhost"),
            );
            ctx.audit_channel("direct-tcpip", &e);
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        tokio::spawn(async move {
            match ctx.socket(&format!("/tcp/{port}")).await {
                Ok(ws) => {
                    reply.accept().await;
                    relay_tcp(ws, channel).await;
                }
                Err(e) => {
                    ctx.audit_channel("direct-tcpip", &e);
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }
}

/// The files side of a context, for the SFTP server.
fn ctx_files(ctx: Ctx) -> crate::sftp::HostFiles {
    crate::sftp::HostFiles::new(Box::new(move |method, path, body| {
        let ctx = ctx.clone();
        Box::pin(async move { ctx.request(method, &path, body).await })
    }))
}

/// Ends a session channel with `code` after telling the client why on
/// standard error.
async fn fail_channel(ch: &Channel<Msg>, e: &ApiError) {
    let msg = format!("cocalc: {}\r\n", e.message);
    let _ = ch.extended_data(1, msg.as_bytes()).await;
    let _ = ch.exit_status(255).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// Runs `argv` in the project over the host's exec stream.
async fn run_exec(ctx: Ctx, mut ch: Channel<Msg>, argv: Vec<String>) {
    let req = ExecRequest::new(argv);
    let mut ws = match ctx.socket("/exec-stream").await {
        Ok(ws) => ws,
        Err(e) => {
            ctx.audit_channel("exec", &e);
            return fail_channel(&ch, &e).await;
        }
    };
    let first = match serde_json::to_string(&req) {
        Ok(j) => Message::Text(j.into()),
        Err(e) => {
            return fail_channel(&ch, &ApiError::new(500, "internal", e.to_string())).await;
        }
    };
    if let Err(e) = ws.send(first).await {
        let e = ApiError::new(502, "host_failed", e.to_string());
        return fail_channel(&ch, &e).await;
    }
    let code = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let (tag, data) = match b.split_first() {
                        Some((t, d)) => (*t, d),
                        None => continue,
                    };
                    let sent = match tag {
                        EXEC_STREAM_STDOUT => ch.data(data).await,
                        EXEC_STREAM_STDERR => ch.extended_data(1, data).await,
                        _ => Ok(()),
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecStreamEnd>(t.as_str()) {
                    Ok(ExecStreamEnd::Exit(c)) => break c,
                    Ok(ExecStreamEnd::Error(e)) => return fail_channel(&ch, &e).await,
                    Ok(_) | Err(_) => {}
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let e = ApiError::new(502, "host_failed", "the host closed the exec stream");
                    return fail_channel(&ch, &e).await;
                }
            },
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    // A failed send shows on the read side next.
                    let _ = ws.send(Message::Binary(data.to_vec().into())).await;
                }
                Some(ChannelMsg::Eof) => {
                    let _ = ws.send(Message::Text(r#"{"eof":true}"#.into())).await;
                }
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
        }
    };
    let _ = ch.exit_status(code as u32).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// An interactive shell over the host's terminal WebSocket.
async fn run_shell(ctx: Ctx, mut ch: Channel<Msg>, size: cocalc_core::PtySize) {
    let path = format!("/terminal?rows={}&cols={}", size.rows, size.cols);
    let mut ws = match ctx.socket(&path).await {
        Ok(ws) => ws,
        Err(e) => {
            ctx.audit_channel("shell", &e);
            return fail_channel(&ch, &e).await;
        }
    };
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if ch.data(&b[..]).await.is_err() {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if ws.send(Message::Binary(data.to_vec().into())).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let s = Conn::pty_size(col_width, row_height);
                    let resize = serde_json::json!({"resize": {"rows": s.rows, "cols": s.cols}});
                    let _ = ws.send(Message::Text(resize.to_string().into())).await;
                }
                Some(ChannelMsg::Close) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(_) => {}
            },
        }
    }
    let _ = ch.exit_status(0).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// Relays a `direct-tcpip` channel and a host's TCP WebSocket.
async fn relay_tcp(mut ws: HostSocket, mut ch: Channel<Msg>) {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if ch.data(&b[..]).await.is_err() {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if ws.send(Message::Binary(data.to_vec().into())).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::Close) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(_) => {}
            },
        }
    }
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_name_projects_or_nothing() {
        let id = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
        assert_eq!(
            project_of_user(&format!("project-{id}")).map(|p| p.to_string()),
            Some(id.to_string())
        );
        assert!(project_of_user(id).is_some());
        for bad in [
            "",
            "root",
            "project-",
            &format!("project-{}", id.to_uppercase()),
            &format!("proj-{id}"),
            &format!("project-{id}x"),
        ] {
            assert!(project_of_user(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn host_keys_are_generated_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cocalc-ssh-key-{}", std::process::id()));
        let path = dir.join("host_ed25519");
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_generate_host_key(&path).unwrap();
        let b = load_or_generate_host_key(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_generate_host_key(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
