//! Serde wire types of the control-plane APIs, defined once for server and
//! client.
//!
//! Every top-level message carries `v`, the wire version ([`WIRE_VERSION`]).
//! A receiver refuses a message whose major version it does not know
//! ([`check_version`]); fields added later are optional so older senders keep
//! working. Messages that may grow are `#[non_exhaustive]`: build them with
//! their constructors.

use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId, UserId};
use crate::placement::PlacementDecision;
use crate::record::{
    Capacity, Generation, Health, HostEndpoint, HostState, Load, Permission, Region,
};
use crate::time::Timestamp;

/// The wire version this build speaks.
pub const WIRE_VERSION: u16 = 1;

fn v1() -> u16 {
    WIRE_VERSION
}

/// `Ok` if `v` is a version this build understands.
pub fn check_version(v: u16) -> Result<(), crate::error::ApiError> {
    if v == WIRE_VERSION {
        Ok(())
    } else {
        Err(crate::error::ApiError::new(
            400,
            "unsupported_version",
            format!("wire version {v} is not supported; this build speaks {WIRE_VERSION}"),
        ))
    }
}

/// Name of the cookie that carries a project's connect token in browsers
/// (set by the host, scoped to the project's path; read by hosts and
/// proxies).
pub fn token_cookie_name(project: ProjectId) -> String {
    format!("cocalc-token-{project}")
}

/// Path at a proxy where hidden hosts open their reverse tunnel (an
/// HTTP/1.1 `GET` with `Upgrade:` [`TUNNEL_PROTOCOL`], signed by the host
/// key; see `cocalc-proxy`'s tunnel module for the protocol).
pub const TUNNEL_PATH: &str = "/.cocalc/tunnel";

/// The `Upgrade:` token of a reverse tunnel: after `101 Switching
/// Protocols` the connection carries HTTP/2 with the proxy as client and
/// the host as server.
pub const TUNNEL_PROTOCOL: &str = "cocalc-tunnel/1";

/// The method string a host signs (with its host key, as a signed request
/// whose path is the proxy's tunnel handle) to open a tunnel.
pub const TUNNEL_SIGNED_METHOD: &str = "TUNNEL";

/// HTTP/2 receive window per tunnel stream, on both ends: large enough
/// that one stream can fill a fast link (HTTP/2's default, 64 KiB, caps a
/// stream at one window per round trip). It also bounds what one slow
/// reader can make the other end buffer; [`TUNNEL_CONNECTION_WINDOW`]
/// bounds a whole tunnel. (`cargo bench -p cocalc-daemons --bench proxy`:
/// 4 MiB / 16 MiB windows and 256 KiB frames gave 0.23–0.28× direct for
/// one download, these 0.33×.)
pub const TUNNEL_STREAM_WINDOW: u32 = 16 << 20;

/// HTTP/2 receive window of a whole tunnel (all its streams).
pub const TUNNEL_CONNECTION_WINDOW: u32 = 64 << 20;

/// The largest HTTP/2 frame either end of a tunnel accepts.
pub const TUNNEL_MAX_FRAME: u32 = 1 << 20;

/// Path on a host's tunnel (HTTP/2, proxy → host) where the proxy asks for
/// a dial-back connection: a `POST` with the nonce in [`DIAL_HEADER`],
/// answered `202 Accepted` before the host dials.
pub const DIAL_REQUEST_PATH: &str = "/.cocalc/dial";

/// Path on a host's tunnel (HTTP/2, proxy → host) where a proxy that is
/// draining before a stop asks the host to move its tunnel to another of
/// its proxies: a `POST`, answered `202 Accepted` when the host will (it
/// dials its next proxy at once and keeps this tunnel open meanwhile, so
/// nothing in flight fails), `409 Conflict` when it has no other proxy.
pub const TUNNEL_MOVE_PATH: &str = "/.cocalc/move";

/// Path at a proxy where a hidden host delivers a dial-back connection: an
/// HTTP/1.1 `GET` with `Upgrade:` [`DIAL_PROTOCOL`] and the nonce the proxy
/// sent in [`DIAL_HEADER`]. After `101` the connection carries HTTP/1.1
/// from the proxy into the host's data plane.
pub const DIAL_PATH: &str = "/.cocalc/tunnel/dial";

/// The `Upgrade:` token of a dial-back connection.
pub const DIAL_PROTOCOL: &str = "cocalc-dial/1";

/// Path at a proxy where load balancers check it (`GET`, on every
/// listener, not rate-limited, not logged): 200 with a [`ProxyHealth`]
/// while it takes new clients, 503 once it is draining before a stop.
pub const PROXY_HEALTH_PATH: &str = "/.cocalc/health";

/// The answer at [`PROXY_HEALTH_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHealth {
    /// Whether new clients should be sent here: not draining.
    pub ok: bool,
    /// The proxy is stopping: it still serves the requests it gets and
    /// those in flight, but a balancer should send new clients elsewhere.
    pub draining: bool,
    /// The master's token-signing keys the proxy holds (it verifies
    /// tokens with these, also while the master is away).
    pub signing_keys: usize,
}

/// Header carrying a dial-back nonce: 32 lowercase hex digits (128 random
/// bits), issued by the proxy over the authenticated tunnel, good for one
/// connection within seconds.
pub const DIAL_HEADER: &str = "x-cocalc-dial";

/// Header (value `1`) a draining proxy adds to its answers to requests
/// another proxy forwarded it. That proxy then asks the master again
/// where the host is (at most once a second per host), so requests for
/// hosts that moved their tunnels stop going through the proxy about to
/// stop; it removes the header before the answer goes on.
pub const DRAINING_HEADER: &str = "x-cocalc-draining";

/// Header a proxy adds to a request it forwards to another proxy (the one
/// a hidden host's tunnel lands at), naming itself by its tunnel handle.
/// A proxy never forwards a request carrying it to a third proxy: when
/// two proxies' cached routes disagree about where a tunnel lands, the
/// request gets a 502 instead of going round. Stripped before a request
/// reaches a host.
pub const VIA_PROXY_HEADER: &str = "x-cocalc-via-proxy";

/// True when `s` has the form of a dial-back nonce (32 lowercase hex
/// digits).
pub fn is_dial_nonce(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `GET /v1/hosts/{h}/key`: a host's registered public key (what a proxy
/// checks a tunnel handshake against).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostKeyResponse {
    /// The host.
    pub host: HostId,
    /// Its Ed25519 public key (PASERK `k4.public.…`).
    pub public_key: String,
}

impl HostKeyResponse {
    /// A host-key answer.
    pub fn new(host: HostId, public_key: impl Into<String>) -> Self {
        HostKeyResponse {
            host,
            public_key: public_key.into(),
        }
    }
}

/// `POST /v1/projects`: create a project owned by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateProjectRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// Human-readable name, unique per owner.
    pub name: String,
    /// Image to run; `None` = the host's default.
    #[serde(default)]
    pub image: Option<String>,
}

impl CreateProjectRequest {
    /// A request for a project called `name` with the default image.
    pub fn new(name: impl Into<String>) -> Self {
        CreateProjectRequest {
            v: WIRE_VERSION,
            name: name.into(),
            image: None,
        }
    }
}

/// A user's access to a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Collaborator {
    /// The user.
    pub user: UserId,
    /// What they may do.
    pub permission: Permission,
}

/// When a project was last used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProjectActivity {
    /// The project.
    pub project: ProjectId,
    /// Last use.
    pub last_use: Timestamp,
}

/// A project as the master describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProjectInfo {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// Its id.
    pub id: ProjectId,
    /// Its name.
    pub name: String,
    /// Its owner.
    pub owner: UserId,
    /// Collaborators and their permissions (the owner is `admin`).
    pub collaborators: Vec<Collaborator>,
    /// Host it is placed on, if any.
    pub host: Option<HostId>,
    /// Current placement generation.
    pub generation: Generation,
    /// Last use its host reported, if any.
    #[serde(default)]
    pub last_activity: Option<Timestamp>,
}

impl ProjectInfo {
    /// A project description.
    pub fn new(
        id: ProjectId,
        name: String,
        owner: UserId,
        collaborators: Vec<Collaborator>,
        host: Option<HostId>,
        generation: Generation,
    ) -> Self {
        ProjectInfo {
            v: WIRE_VERSION,
            id,
            name,
            owner,
            collaborators,
            host,
            generation,
            last_activity: None,
        }
    }
}

/// `POST /v1/projects/{id}/open`: answer of an open-project call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OpenProjectResponse {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The project.
    pub project: ProjectId,
    /// The host it is placed on.
    pub host: HostId,
    /// How to reach the host (or the proxy in front of it).
    pub endpoint: HostEndpoint,
    /// Placement generation the token is bound to.
    pub generation: Generation,
    /// The connect token for that host.
    pub token: String,
    /// When the token expires.
    pub expires: Timestamp,
}

impl OpenProjectResponse {
    /// An open-project answer.
    pub fn new(
        project: ProjectId,
        host: HostId,
        endpoint: HostEndpoint,
        generation: Generation,
        token: String,
        expires: Timestamp,
    ) -> Self {
        OpenProjectResponse {
            v: WIRE_VERSION,
            project,
            host,
            endpoint,
            generation,
            token,
            expires,
        }
    }
}

/// `GET /v1/projects/{id}/placement`: why the project is where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlacementExplanation {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The project.
    pub project: ProjectId,
    /// Its generation.
    pub generation: Generation,
    /// The stored decision.
    pub decision: PlacementDecision,
    /// When it was made.
    pub decided_at: Timestamp,
}

impl PlacementExplanation {
    /// An explanation.
    pub fn new(
        project: ProjectId,
        generation: Generation,
        decision: PlacementDecision,
        decided_at: Timestamp,
    ) -> Self {
        PlacementExplanation {
            v: WIRE_VERSION,
            project,
            generation,
            decision,
            decided_at,
        }
    }
}

/// `POST /v1/hosts/register`: a host introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterHostRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The host's id.
    pub host: HostId,
    /// The host's Ed25519 public key, as PASERK `k4.public`.
    pub public_key: String,
    /// One-time bootstrap token minted by an operator (first registration only).
    #[serde(default)]
    pub bootstrap_token: Option<String>,
    /// Its region.
    pub region: Region,
    /// How to reach it.
    pub endpoint: HostEndpoint,
    /// Its capacity.
    pub capacity: Capacity,
}

impl RegisterHostRequest {
    /// A registration request.
    pub fn new(
        host: HostId,
        public_key: String,
        bootstrap_token: Option<String>,
        region: Region,
        endpoint: HostEndpoint,
        capacity: Capacity,
    ) -> Self {
        RegisterHostRequest {
            v: WIRE_VERSION,
            host,
            public_key,
            bootstrap_token,
            region,
            endpoint,
            capacity,
        }
    }
}

/// Answer to registration and to every keepalive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseGrant {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The host's state as the master sees it.
    pub state: HostState,
    /// When the lease runs out unless renewed.
    pub lease_expires: Timestamp,
    /// When to send the next keepalive, milliseconds from now (jitter applied).
    pub next_keepalive_ms: u64,
    /// The master's token-signing public keys (PASERK `k4.public`), newest first.
    pub signing_keys: Vec<String>,
}

impl LeaseGrant {
    /// A lease answer.
    pub fn new(
        state: HostState,
        lease_expires: Timestamp,
        next_keepalive_ms: u64,
        signing_keys: Vec<String>,
    ) -> Self {
        LeaseGrant {
            v: WIRE_VERSION,
            state,
            lease_expires,
            next_keepalive_ms,
            signing_keys,
        }
    }
}

/// `POST /v1/hosts/{id}/keepalive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeepaliveRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The host.
    pub host: HostId,
    /// Health now.
    pub health: Health,
    /// Capacity now (disk free changes).
    pub capacity: Capacity,
    /// Load now.
    pub load: Load,
}

impl KeepaliveRequest {
    /// A keepalive.
    pub fn new(host: HostId, health: Health, capacity: Capacity, load: Load) -> Self {
        KeepaliveRequest {
            v: WIRE_VERSION,
            host,
            health,
            capacity,
            load,
        }
    }
}

/// `POST /v1/hosts/{id}/activity`: last use of projects on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ActivityReport {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The reporting host.
    pub host: HostId,
    /// Projects and when each was last used.
    pub projects: Vec<ProjectActivity>,
}

impl ActivityReport {
    /// An activity report.
    pub fn new(host: HostId, projects: Vec<ProjectActivity>) -> Self {
        ActivityReport {
            v: WIRE_VERSION,
            host,
            projects,
        }
    }
}

/// A message on the master→host push channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PushMessage {
    /// Set (or, with `None`, remove) a user's permission on a project.
    Acl {
        /// The project.
        project: ProjectId,
        /// The user.
        user: UserId,
        /// New permission; `None` removes access.
        permission: Option<Permission>,
    },
    /// Refuse every token of `user` issued before `not_before`
    /// ("sign out everywhere").
    RevokeUser {
        /// The user.
        user: UserId,
        /// Cutoff.
        not_before: Timestamp,
    },
    /// Refuse one token by its `jti` until it expires anyway.
    RevokeToken {
        /// The token id.
        token_id: String,
        /// The token's expiry (after it the entry can be dropped).
        expires: Timestamp,
    },
    /// Start a project at this generation.
    Start {
        /// The project.
        project: ProjectId,
        /// Its generation.
        generation: Generation,
    },
    /// Stop a project.
    Stop {
        /// The project.
        project: ProjectId,
    },
    /// The project is placed on another host now, at `generation`: refuse
    /// its tokens and commands of older generations from now on, and stop
    /// it if it runs here (sent when a project is moved or re-placed away).
    Fence {
        /// The project.
        project: ProjectId,
        /// Its new generation.
        generation: Generation,
    },
    /// The master's current signing keys (PASERK `k4.public`), newest first.
    SigningKeys {
        /// The keys.
        keys: Vec<String>,
    },
    /// The answer to a keepalive the host sent on this channel.
    Lease {
        /// The renewed lease.
        grant: LeaseGrant,
    },
}

/// A message a host sends to the master on its push channel (the channel
/// is authenticated once, by the signed WebSocket upgrade).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub enum HostMessage {
    /// Renews the lease, like `POST /v1/hosts/{id}/keepalive` but without
    /// a new request and signature per beat; answered with
    /// [`PushMessage::Lease`].
    Keepalive {
        /// The keepalive.
        keepalive: KeepaliveRequest,
    },
    /// The projects this host knows, each with the newest generation it
    /// has seen, sent each time the push channel opens. The master answers
    /// a [`PushMessage::Fence`] for every one placed elsewhere since (a
    /// re-placement or a move the host missed while it was cut off), so the
    /// host stops it and refuses its old generation.
    Holding {
        /// The projects and generations.
        projects: Vec<HeldProject>,
    },
}

/// A project a host knows, in [`HostMessage::Holding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeldProject {
    /// The project.
    pub project: ProjectId,
    /// The newest generation the host has seen for it.
    pub generation: Generation,
}

/// The collected result of a command run in a project (`POST
/// /<project>/exec` on a host). Output bytes are base64 on the wire, so
/// nothing the program printed is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct ExecResult {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// Exit code (128 + signal number if killed).
    pub exit_code: i32,
    /// Standard output.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    pub stdout: Vec<u8>,
    /// Standard error.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    pub stderr: Vec<u8>,
    /// True if output beyond the host's limit was dropped.
    #[serde(default)]
    pub truncated: bool,
}

impl ExecResult {
    /// A result.
    pub fn new(exit_code: i32, stdout: Vec<u8>, stderr: Vec<u8>, truncated: bool) -> Self {
        ExecResult {
            v: WIRE_VERSION,
            exit_code,
            stdout,
            stderr,
            truncated,
        }
    }
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// One file as a host's files API reports it (`GET /<project>/files/...`). Symlinks are reported as themselves (`lstat`), not as their target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    /// The file's name (its last path component); `"."` for the home itself.
    pub name: String,
    /// File, directory, symlink or something else.
    pub kind: FileKind,
    /// Size in bytes (for a symlink: the length of its target).
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch, when known.
    pub modified_ms: Option<i64>,
    /// Permission bits (`mode & 0o7777`), when known.
    pub mode: Option<u32>,
}

/// The kind of a [`FileEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: FIFO, socket, device.
    Other,
}

/// One frame on the push channel: a sequence number and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PushFrame {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// Monotonic per host; lets a reconnecting host ask for what it missed.
    pub seq: u64,
    /// The message.
    pub message: PushMessage,
}

impl PushFrame {
    /// A frame.
    pub fn new(seq: u64, message: PushMessage) -> Self {
        PushFrame {
            v: WIRE_VERSION,
            seq,
            message,
        }
    }
}

/// An SSH public key registered by a user (`GET /v1/users/me/ssh-keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshKey {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// OpenSSH fingerprint, `SHA256:<base64 without padding>`.
    pub fingerprint: String,
    /// Key type, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// The key blob, base64 as in an `authorized_keys` line.
    pub blob: String,
    /// The comment of the line it was added with (may be empty).
    #[serde(default)]
    pub comment: String,
    /// When it was added.
    pub added: Timestamp,
}

impl SshKey {
    /// A registered key.
    pub fn new(
        fingerprint: String,
        key_type: String,
        blob: String,
        comment: String,
        added: Timestamp,
    ) -> Self {
        SshKey {
            v: WIRE_VERSION,
            fingerprint,
            key_type,
            blob,
            comment,
            added,
        }
    }

    /// The key as one OpenSSH line (`type blob comment`).
    pub fn openssh_line(&self) -> String {
        if self.comment.is_empty() {
            format!("{} {}", self.key_type, self.blob)
        } else {
            format!("{} {} {}", self.key_type, self.blob, self.comment)
        }
    }
}

/// `POST /v1/users/me/ssh-keys`: register a public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddSshKeyRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// One OpenSSH public key line: `ssh-ed25519 AAAA… comment`.
    pub public_key: String,
}

impl AddSshKeyRequest {
    /// A request to add `public_key`.
    pub fn new(public_key: impl Into<String>) -> Self {
        AddSshKeyRequest {
            v: WIRE_VERSION,
            public_key: public_key.into(),
        }
    }
}

/// A proxy key (`GET /v1/admin/proxy-keys`): an API key that lets a
/// `cocalc-proxy` look up hosts and signing keys and ask for SSH
/// authorizations, and nothing else. The key itself is shown only once,
/// in [`CreatedProxyKey`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyKey {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The name the admin gave it (unique; 1 to 64 characters of
    /// `[A-Za-z0-9._-]`).
    pub name: String,
    /// When it was created.
    pub created: Timestamp,
}

impl ProxyKey {
    /// A proxy key's description.
    pub fn new(name: impl Into<String>, created: Timestamp) -> Self {
        ProxyKey {
            v: WIRE_VERSION,
            name: name.into(),
            created,
        }
    }
}

/// `POST /v1/admin/proxy-keys`: create a proxy key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateProxyKeyRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// Its name, e.g. the proxy's host name.
    pub name: String,
}

impl CreateProxyKeyRequest {
    /// A request for a key named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        CreateProxyKeyRequest {
            v: WIRE_VERSION,
            name: name.into(),
        }
    }
}

/// A created proxy key with the secret (shown only now; the master keeps
/// a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedProxyKey {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The key's description.
    pub key: ProxyKey,
    /// The API key to give the proxy (`api_key` / `api_key_file`).
    pub api_key: String,
}

impl CreatedProxyKey {
    /// A created key.
    pub fn new(key: ProxyKey, api_key: String) -> Self {
        CreatedProxyKey {
            v: WIRE_VERSION,
            key,
            api_key,
        }
    }
}

/// `POST /v1/ssh/authorize` (proxies: a proxy key or the admin key): may the holder of
/// `public_key` enter `project`? Answered with an [`OpenProjectResponse`]
/// for the collaborator who registered the key, or one uniform refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshAuthorizeRequest {
    /// Wire version.
    #[serde(default = "v1")]
    pub v: u16,
    /// The project the SSH user name names.
    pub project: ProjectId,
    /// The public key the client proved it holds, as an OpenSSH line.
    pub public_key: String,
}

impl SshAuthorizeRequest {
    /// A request for `project` with `public_key`.
    pub fn new(project: ProjectId, public_key: impl Into<String>) -> Self {
        SshAuthorizeRequest {
            v: WIRE_VERSION,
            project,
            public_key: public_key.into(),
        }
    }
}

/// The last text frame of a host's `/{project}/exec-stream` WebSocket:
/// the command's exit code, or why it could not run. Output before it
/// comes as binary frames whose first byte is [`EXEC_STREAM_STDOUT`] or
/// [`EXEC_STREAM_STDERR`]. The client sends the `ExecRequest` as its first
/// text frame, then standard input as binary frames, and the text frame
/// `{"eof":true}` to close it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExecStreamEnd {
    /// The command ended with this code (128 + signal number if killed).
    Exit(i32),
    /// The command could not be run or failed midway.
    Error(crate::error::ApiError),
}

/// Binary-frame tag of standard output on an exec stream.
pub const EXEC_STREAM_STDOUT: u8 = 1;
/// Binary-frame tag of standard error on an exec stream.
pub const EXEC_STREAM_STDERR: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_defaults_and_is_checked() {
        let r: CreateProjectRequest = serde_json::from_str(r#"{"name":"x"}"#).unwrap();
        assert_eq!(r.v, WIRE_VERSION);
        assert!(check_version(r.v).is_ok());
        let e = check_version(99).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.code, "unsupported_version");
    }

    #[test]
    fn exec_results_carry_any_bytes() {
        let r = ExecResult::new(3, vec![0, 255, b'a'], b"err".to_vec(), false);
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains(r#""stdout":"AP9h""#), "{j}");
        assert_eq!(serde_json::from_str::<ExecResult>(&j).unwrap(), r);
    }

    #[test]
    fn push_frames_round_trip() {
        let f = PushFrame::new(
            7,
            PushMessage::Acl {
                project: ProjectId::from_bytes([1; 16]),
                user: UserId::from_bytes([2; 16]),
                permission: None,
            },
        );
        let j = serde_json::to_string(&f).unwrap();
        assert!(j.contains(r#""type":"acl""#), "{j}");
        assert_eq!(serde_json::from_str::<PushFrame>(&j).unwrap(), f);
    }
}

/// Body of `POST /<project>/backups/<id>/restore` on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoreBackupRequest {
    /// The path to restore, relative to the project's home; `None`
    /// restores the whole project (which must be stopped).
    #[serde(default)]
    pub path: Option<String>,
}

impl RestoreBackupRequest {
    /// Restores `path` (or, with `None`, everything).
    pub fn new(path: Option<String>) -> Self {
        RestoreBackupRequest { path }
    }
}

/// What a host did to restore a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoredBackup {
    /// The backup restored. It was restored from its own snapshot (named
    /// in `backup.snapshot`), brought back from the store unless the host
    /// still had it.
    pub backup: crate::backup::BackupInfo,
    /// Whether that snapshot was brought back from the store (`false`: the
    /// host still had it).
    pub fetched: bool,
    /// The snapshot of the project's state just before the restore, taken
    /// so that the restore can be undone; `None` when the project had no
    /// volume here.
    pub previous: Option<String>,
}

impl RestoredBackup {
    /// A restore's outcome.
    pub fn new(backup: crate::backup::BackupInfo, fetched: bool, previous: Option<String>) -> Self {
        RestoredBackup {
            backup,
            fetched,
            previous,
        }
    }
}
