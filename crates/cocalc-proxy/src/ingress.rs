//! [`Ingress`]: HTTP and WebSocket ingress into projects.
//!
//! `/<project id>/…` is routed to the host that holds the project:
//!
//! 1. **Base path first.** The first segment must be a canonical project id
//!    (36 bytes, lowercase UUID); `..` segments and percent-encoded slashes
//!    or backslashes anywhere are refused. Each refusal is a 400 that says
//!    why — never a panic, never a mis-route.
//! 2. **Token.** The same connect token as hosts take (`Authorization:
//!    Bearer`, `?token=`, or the project cookie). Signature, key, expiry and
//!    lifetime are checked here; the token must be for the project in the
//!    path. A request without a valid token never reaches a host.
//! 3. **Route.** The token names its host; the host's endpoint comes from
//!    the master (cached for a short TTL). The request goes to that host
//!    only, which checks the token again (audience, ACL, generation).
//!    The cache maps *hosts* to endpoints, never projects to hosts, so a
//!    project that moves needs no invalidation here: tokens minted after
//!    the move name the new host, and tokens for the old placement reach
//!    the old host, which refuses them by generation. Only a host's own
//!    endpoint can go stale (a host re-registering elsewhere, a hidden
//!    host moving its tunnel); that entry is asked for again at the first
//!    failed connection and otherwise after the TTL. An entry past its TTL
//!    still serves while the master is asked again in the background
//!    (one request per host at a time), so the master is never on the
//!    request path once a host is known; and while the master cannot
//!    answer, the ingress keeps routing with what it knows for
//!    [`IngressConfig::route_grace`] (tokens are verified with the signing
//!    keys it holds).
//! 4. **Rate limits** (before any token is verified): per client address
//!    and per project, answered with 429 and `Retry-After`, so one noisy
//!    project or client does not starve the others. Before those, a cap
//!    on the connections one client address holds open with project
//!    requests on them ([`IngressConfig::client_connections`]; a
//!    WebSocket counts until it closes): a connection over it is answered
//!    429 `too_many_connections` and closed. Behind a load balancer listed
//!    in [`IngressConfig::trusted_proxies`], the client is the address it
//!    forwarded for.
//! 5. **Forward.** Bodies stream both ways; WebSocket upgrades pass
//!    through; `Host` becomes the host's address and the original goes in
//!    `X-Forwarded-Host`, with `X-Forwarded-For` and `X-Forwarded-Proto`.
//!    Requests without a body or upgrade (most of them) go through the
//!    lean [`Upstream`] client, which writes the head once and reads the
//!    answer in the request's own task; the rest through hyper's client
//!    ([`cocalc_client::relay`]). Each keeps its own idle connections per
//!    host. Served by [`crate::serve_ingress`], plain requests are also
//!    read and answered without hyper's server
//!    ([`Ingress::handle_lean`] on [`cocalc_client::lean`]), and a large
//!    body from a host moves to the client by `splice(2)`.
//!
//! **Through another proxy.** A hidden host's endpoint names the proxy its
//! tunnel lands at (its handle). With [`IngressConfig::tunnel_handle`]
//! set, a request for a hidden host whose tunnel lands at *another* proxy
//! goes to that proxy's handle, as to a host's URL (TLS for `https://`),
//! so any proxy of a fleet serves every hidden host and users need not
//! reach the one that holds the tunnel. That proxy checks the token
//! again and routes into the tunnel. The request keeps the client's
//! `Host` (the other proxy writes `X-Forwarded-Host` from it), gets the
//! client appended to `X-Forwarded-For` as usual, and carries
//! [`cocalc_core::wire::VIA_PROXY_HEADER`]. A request that carries that
//! header is never forwarded to a third proxy: when this proxy's route
//! places the tunnel elsewhere, the master is asked again at once (the
//! other proxy was just told "here"); if it still says elsewhere, the
//! request is refused with 502 [`TUNNEL_ELSEWHERE`], so two proxies whose
//! cached routes disagree cannot send a request round. And a request for
//! a hidden host that cannot be reached where the route says (its tunnel
//! moved after a failover) asks the master at once and is sent to the new
//! place, once, if it reached no one: no connection could be opened, so
//! nothing was sent (a body is still unread, an upgrade not begun; SSH
//! channels too, through [`Ingress::connect_host`]). Both ask the
//! master at most once per host per [`REASK_AFTER`], so a host that stays
//! unreachable, or a client sending the header on purpose, cannot turn
//! requests into lookups. The header is stripped before requests
//! reach hosts. List the other proxies in
//! [`IngressConfig::trusted_proxies`] so that the clients they forward
//! for are the ones rate-limited, capped and logged, not the proxies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::watch::{HostWatch, Watched};
use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use cocalc_auth::{paserk, AuditSink, KeySet, TracingAuditSink, Verifier};
use cocalc_client::access_log::{AccessLog, BodySent, Logged, Pending, Waiting};
use cocalc_client::conncap::{forwarded_client, in_nets, ConnectionCap, Slot};
use cocalc_client::lean::LeanBody;
use cocalc_client::upstream::{ResponseBody, Silenced, Upstream, UpstreamError};
use cocalc_client::MasterClient;
use cocalc_core::{
    ApiError, AuditOutcome, AuditRecord, HostEndpoint, HostId, ProjectId, SharedClock, Timestamp,
    Transport,
};
use http_body_util::Either;
use hyper::body::Incoming;

/// Ingress tunables.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// The master's base URL.
    pub master_url: String,
    /// API key the ingress uses to look hosts up.
    pub api_key: String,
    /// How long a host's endpoint is cached before the master is asked
    /// again (default 10 s).
    pub route_ttl: Duration,
    /// How long past `route_ttl` a host's endpoint is still used when the
    /// master cannot be asked (default an hour, a host's default offline
    /// grace); after that its requests fail with the master's error.
    pub route_grace: Duration,
    /// Where the ingress keeps the master's signing keys and the hosts'
    /// addresses ([`Ingress::save_state`]), so that it can start and
    /// route while the master is away (default none: it cannot).
    pub state_dir: Option<std::path::PathBuf>,
    /// Proxies in front of this one (load balancers) whose
    /// `X-Forwarded-For` and `X-Forwarded-Proto` are believed (default
    /// none). A request from one of them counts against the per-client
    /// rate limit of the right-most address in `X-Forwarded-For` that is
    /// not itself a trusted proxy, and its connections are not capped
    /// (they carry many clients). Requests from anyone else are judged by
    /// their own address, whatever headers they send.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests per second allowed per project (default 200), with the
    /// same number as burst.
    pub project_rps: u32,
    /// Requests per second allowed per client address (default 100).
    pub client_rps: u32,
    /// Connections one client address may hold open with project requests
    /// on them, WebSockets and SSH sessions included (default 1,000: a
    /// classroom behind
    /// one NAT address, each browser with a few keep-alive connections and
    /// a few terminals, stays well under it); 0 for no cap. Connections
    /// that only carry the proxy's own endpoints (`/.cocalc/`: hidden
    /// hosts' tunnels and dial-backs) do not count.
    pub client_connections: u32,
    /// How long requests wait on a host that answers none of them before
    /// the host is checked (its `GET /health`), and again every as long
    /// while that goes on (default 10 s; zero: never). See
    /// [`crate::watch`].
    pub host_check_after: Duration,
    /// How long a host has to answer that check before the requests
    /// waiting on it end with 504 `host_not_responding` (default 10 s).
    pub host_check_timeout: Duration,
    /// Where every project request answered is logged, one JSON line
    /// each ([`cocalc_client::access_log`]); default none.
    pub access_log: Option<AccessLog>,
    /// This proxy's tunnel handle ([`crate::TunnelHub::handle`]), when it
    /// has a tunnel hub. A hidden host whose tunnel lands at *another*
    /// proxy (a tunnel endpoint with another handle) is then reached
    /// through that proxy, so every proxy of a fleet serves every hidden
    /// host: see "Through another proxy" in the module overview. Default
    /// none: tunnel endpoints go to the transport as they are.
    pub tunnel_handle: Option<String>,
}

impl IngressConfig {
    /// Defaults for `master_url` with `api_key`.
    pub fn new(master_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        IngressConfig {
            master_url: master_url.into(),
            api_key: api_key.into(),
            route_ttl: Duration::from_secs(10),
            route_grace: Duration::from_secs(3600),
            state_dir: None,
            trusted_proxies: Vec::new(),
            project_rps: 200,
            client_rps: 100,
            client_connections: 1000,
            host_check_after: Duration::from_secs(10),
            host_check_timeout: Duration::from_secs(10),
            access_log: None,
            tunnel_handle: None,
        }
    }
}

/// Refusals by reason, for metrics and audit.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Malformed base paths.
    pub bad_path: AtomicU64,
    /// Missing or invalid tokens.
    pub bad_token: AtomicU64,
    /// Hosts that could not be reached, or whose address the master
    /// could not give.
    pub unreachable: AtomicU64,
    /// Requests over a rate limit.
    pub rate_limited: AtomicU64,
    /// TLS handshakes that failed or stalled ([`crate::tls`]).
    pub tls_handshake: AtomicU64,
    /// HTTP connections refused because their client address held
    /// [`IngressConfig::client_connections`] already (SSH ones are
    /// counted with the SSH refusals).
    pub too_many_connections: AtomicU64,
    /// Requests ended because their host kept them waiting and did not
    /// answer its health check either ([`crate::watch`]).
    pub host_not_responding: AtomicU64,
    /// Connections from trusted proxies, on a listener that expects the
    /// PROXY protocol from them, closed for a missing, malformed or late
    /// header ([`crate::proxy_protocol`]; SSH listeners' too).
    pub bad_proxy_header: AtomicU64,
    /// Requests another proxy forwarded for a hidden host whose tunnel
    /// this one places at a third ([`TUNNEL_ELSEWHERE`]).
    pub tunnel_elsewhere: AtomicU64,
}

/// The ingress service.
pub struct Ingress {
    audit: Arc<dyn AuditSink>,
    cfg: IngressConfig,
    /// [`IngressConfig::access_log`], shared with the requests it logs.
    access_log: Option<Arc<AccessLog>>,
    /// Requests and SSH connections that went through another proxy.
    peer_forwards: AtomicU64,
    /// Set by [`Ingress::drain`].
    draining: std::sync::atomic::AtomicBool,
    verifier: Verifier,
    transport: Arc<dyn Transport>,
    /// The master client, the clock, the cached routes, how lookups have
    /// gone, and the host watch.
    lookup: RouteLookup,
    /// The master's signing keys as it last gave them (PASERK), to save.
    signing_keys: Mutex<Vec<String>>,
    refusals: Refusals,
    per_project: Limiter<ProjectId>,
    per_client: Limiter<std::net::IpAddr>,
    connections: Arc<ConnectionCap>,
    pool: cocalc_client::relay::Pool<HostId, Incoming>,
    upstream: Upstream<HostId>,
}

/// A keyed rate limiter whose map hashes with foldhash (seeded per
/// process) rather than SipHash: keys are checked on every request.
type Limiter<K> = governor::RateLimiter<
    K,
    governor::state::keyed::DashMapStateStore<K, foldhash::fast::RandomState>,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

fn limiter<K: std::hash::Hash + Eq + Clone>(rps: u32) -> Limiter<K> {
    governor::RateLimiter::dashmap_with_hasher(quota(rps), Default::default())
}

/// What one client connection holds: its slot under the per-client
/// connection cap, taken at its first project request (`None` once
/// refused). Shared by every clone of its [`Peer`], and kept by relayed
/// WebSockets until they close.
#[derive(Debug, Default)]
struct PeerConnection {
    slot: std::sync::OnceLock<Option<Slot>>,
}

/// A host's cached route: its endpoint, where connections to it go, the
/// authority requests to it carry as `Host`, and when the master was
/// asked.
#[derive(Debug)]
struct Route {
    /// The endpoint as the master gave it (what is saved).
    endpoint: HostEndpoint,
    /// What connections go to: `endpoint`, or, for a tunnel that lands at
    /// another proxy, that proxy's handle as a URL.
    dial: HostEndpoint,
    /// Requests go through another proxy (`dial` is its handle): they keep
    /// the client's `Host` and carry [`VIA_PROXY_HEADER`].
    via_peer: bool,
    authority: HeaderValue,
    /// When the master gave this endpoint (saved with it); its age, by the
    /// ingress's clock, decides between fresh, stale and too old.
    confirmed: Timestamp,
    /// A connection to the host failed: ask the master again.
    doubted: std::sync::atomic::AtomicBool,
    /// The master is being asked again (or could not answer within the
    /// last second).
    refreshing: std::sync::atomic::AtomicBool,
    /// The host as [`crate::watch`] sees it.
    watched: Arc<Watched>,
}

impl Route {
    /// The route to `host` at `endpoint`, which the master gave at
    /// `confirmed`; `own` is this proxy's tunnel handle, if it has one
    /// (a tunnel endpoint with another handle is reached through the
    /// proxy it names).
    fn new(
        host: HostId,
        endpoint: HostEndpoint,
        confirmed: Timestamp,
        watch: &HostWatch,
        own: Option<&str>,
    ) -> Result<Route, ApiError> {
        let peer = match (&endpoint, own) {
            (HostEndpoint::Tunnel(h), Some(own))
                if h.trim_end_matches('/') != own.trim_end_matches('/') =>
            {
                Some(peer_handle(host, h)?)
            }
            _ => None,
        };
        let (dial, authority) = match (peer, &endpoint) {
            (Some((url, authority)), _) => (HostEndpoint::Url(url), authority),
            (None, HostEndpoint::Url(u)) => (
                endpoint.clone(),
                crate::parse_host_url(u).map_err(|e| ApiError::from(&e))?,
            ),
            (None, _) => (endpoint.clone(), host.to_string()),
        };
        let authority = HeaderValue::from_str(&authority).map_err(|_| {
            ApiError::new(
                502,
                "bad_endpoint",
                format!("host {host}'s address {authority:?} is not a valid Host header"),
            )
        })?;
        let watched = watch.host(host, &dial, authority.to_str().unwrap_or_default());
        Ok(Route {
            via_peer: dial != endpoint,
            endpoint,
            dial,
            authority,
            confirmed,
            watched,
            doubted: Default::default(),
            refreshing: Default::default(),
        })
    }

    /// Within `ttl` of when the master gave it, and no connection failed.
    fn fresh(&self, now: Timestamp, ttl: Duration) -> bool {
        now.since(self.confirmed) < ttl && !self.doubted.load(Ordering::Relaxed)
    }
}

/// What the ingress keeps in [`IngressConfig::state_dir`], so that it can
/// start and route while the master is away: the master's signing keys,
/// and the hosts' addresses with when the master gave them.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    signing_keys: Vec<String>,
    routes: Vec<SavedRoute>,
}

/// One saved route.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedRoute {
    host: HostId,
    endpoint: HostEndpoint,
    confirmed: Timestamp,
}

/// The file in [`IngressConfig::state_dir`].
pub const STATE_FILE: &str = "ingress-state.json";

/// How the master's answers to route lookups have gone: failures counted,
/// and whether the last one failed (logged once when that changes, not
/// per lookup).
#[derive(Debug, Default)]
struct Lookups {
    failures: AtomicU64,
    away: std::sync::atomic::AtomicBool,
}

impl Lookups {
    fn answered(&self) {
        if self.away.swap(false, Ordering::Relaxed) {
            tracing::info!("the master answers route lookups again");
        }
    }

    fn failed(&self, host: HostId, e: &ApiError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if master_away(e) && !self.away.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %host,
                error = %e.message,
                "the master cannot be asked for hosts' addresses; routing with the ones known"
            );
        }
    }
}

/// How the ingress asks the master for a host's address, on a request's
/// path or in the background: what it needs, cheap to clone into a task.
#[derive(Clone)]
struct RouteLookup {
    master: MasterClient,
    /// The cached routes.
    routes: Arc<Routes>,
    clock: SharedClock,
    /// How the master's route lookups have gone.
    lookups: Arc<Lookups>,
    /// Checks hosts that keep requests waiting.
    watch: HostWatch,
    /// This proxy's tunnel handle ([`IngressConfig::tunnel_handle`]).
    handle: Option<Arc<str>>,
    /// What requests forwarded to another proxy carry as
    /// [`VIA_PROXY_HEADER`]: the handle.
    via: HeaderValue,
}

impl RouteLookup {
    /// Asks the master for `host`'s endpoint; caches and returns the
    /// route. A failed lookup is counted (a 404 is an answer: the master
    /// does not know the host).
    async fn ask(&self, host: HostId) -> Result<Arc<Route>, ApiError> {
        let answer = self.master.host_endpoint(host).await;
        match &answer {
            Err(e) if e.status != 404 => self.lookups.failed(host, e),
            _ => self.lookups.answered(),
        }
        let r = Arc::new(Route::new(
            host,
            answer?,
            self.clock.now(),
            &self.watch,
            self.handle.as_deref(),
        )?);
        lock_routes(&self.routes).insert(host, r.clone());
        Ok(r)
    }
}

/// What the ingress knows of hosts' addresses now ([`Ingress::route_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteStats {
    /// Routes within their TTL.
    pub fresh: u64,
    /// Routes past their TTL or doubted, still used while the master is
    /// asked again (or away).
    pub stale: u64,
    /// Lookups at the master that failed, since start.
    pub lookup_failures: u64,
    /// Whether the last lookup failed because the master could not answer.
    pub master_away: bool,
}

/// The cached routes, by host.
type Routes = Mutex<HashMap<HostId, Arc<Route>, foldhash::fast::RandomState>>;

fn lock_routes(
    routes: &Routes,
) -> std::sync::MutexGuard<'_, HashMap<HostId, Arc<Route>, foldhash::fast::RandomState>> {
    routes.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `e` says the master could not answer (unreachable, failing),
/// rather than that it answered no.
fn master_away(e: &ApiError) -> bool {
    e.status >= 500
}

/// An answer's body: a host's streamed response (through hyper's client
/// for requests with a body or an upgrade, through the lean [`Upstream`]
/// client for the rest; either read under the host watch, so a host that
/// hangs midway cuts it off), or the ingress's own (a refusal).
pub type AnswerBody = Either<Either<Silenced<Incoming>, ResponseBody<HostId>>, Body>;

/// What the ingress answers with: an [`AnswerBody`], its bytes counted for
/// the access log when there is one.
pub type IngressBody = Logged<AnswerBody>;

/// An HTTP response from [`Ingress::handle`].
pub type Response = http::Response<IngressBody>;

/// The client end of a connection to the ingress: its address, which the
/// per-client limits key on, that address as the value appended to
/// `X-Forwarded-For` (made once per connection, not per request), the
/// scheme it came in with (`X-Forwarded-Proto`), and the connection's
/// place under the per-client connection cap. Make one per connection
/// and clone it for its requests: the cap counts `Peer`s.
#[derive(Debug, Clone)]
pub struct Peer {
    addr: SocketAddr,
    ip: HeaderValue,
    proto: HeaderValue,
    conn: Arc<PeerConnection>,
}

impl Peer {
    /// The peer at `addr`, over plain HTTP.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer {
            addr,
            ip,
            proto: HTTP,
            conn: Arc::default(),
        }
    }

    /// The peer at `addr`, over TLS: hosts see `X-Forwarded-Proto: https`.
    pub fn over_tls(addr: SocketAddr) -> Self {
        Peer {
            proto: HTTPS,
            ..Peer::new(addr)
        }
    }

    /// The client's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const VIA_PROXY: HeaderName = HeaderName::from_static(cocalc_core::wire::VIA_PROXY_HEADER);
const DRAINING: HeaderName = HeaderName::from_static(cocalc_core::wire::DRAINING_HEADER);

/// The code of the refusal of a request another proxy forwarded for a
/// host whose tunnel this proxy places at a third one.
pub const TUNNEL_ELSEWHERE: &str = "tunnel_elsewhere";

/// How long after the master gave a host's route a request may ask it
/// again, when the route seems wrong (a hidden host's tunnel moved).
pub const REASK_AFTER: Duration = Duration::from_secs(1);

fn quota(rps: u32) -> governor::Quota {
    let n = std::num::NonZeroU32::new(rps.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    governor::Quota::per_second(n).allow_burst(n)
}

/// The ingress's own answers (refusals), complete in memory; both the
/// hyper path and the lean one send them.
type Refusal = http::Response<Bytes>;

/// The hyper path's body for one of the ingress's own answers.
fn full(b: Bytes) -> AnswerBody {
    Either::Right(Body::from(b))
}

/// A 429 saying when to retry.
fn too_many(what: &str, wait: Duration) -> Refusal {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let mut r = fail(
        429,
        "rate_limited",
        format!("too many requests for this {what}; retry in {secs} s"),
    );
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("cfg", &self.cfg.master_url)
            .finish_non_exhaustive()
    }
}

fn fail(status: u16, code: &str, message: impl Into<String>) -> Refusal {
    api(&ApiError::new(status, code, message))
}

/// `e` as a JSON answer with its status.
fn api(e: &ApiError) -> Refusal {
    let s = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(e).unwrap_or_default();
    let mut r = http::Response::new(Bytes::from(body));
    *r.status_mut() = s;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Checks the base path; returns the project or why the path is refused.
/// One pass over the bytes: percent-encoded slashes or backslashes
/// anywhere, and `.` or `..` segments (also when their dots are written
/// `%2e`), are refused; then the first segment must be a project id.
pub fn project_of_path(path: &str) -> Result<ProjectId, String> {
    // Most paths have no '%' and no segment starting with '.', so no
    // segment can be a dot segment or hide a slash: only the id is left
    // to check.
    if path.starts_with('/') && !path.contains('%') && !path.contains("/.") {
        return first_segment(path);
    }
    let b = path.as_bytes();
    let (mut encoded_slash, mut dot_segment) = (false, false);
    let mut seg_start = 0;
    for i in 0..=b.len() {
        match b.get(i) {
            Some(b'%') => {
                let code = b.get(i + 1..i + 3).unwrap_or_default();
                encoded_slash |=
                    code.eq_ignore_ascii_case(b"2f") || code.eq_ignore_ascii_case(b"5c");
            }
            Some(b'/') | None => {
                dot_segment |= is_dot_segment(&b[seg_start..i]);
                seg_start = i + 1;
            }
            Some(_) => {}
        }
    }
    if encoded_slash {
        return Err("percent-encoded slashes are not allowed in the path".into());
    }
    if dot_segment {
        return Err("'.' and '..' segments are not allowed in the path".into());
    }
    first_segment(path)
}

/// The project id the path's first segment names.
fn first_segment(path: &str) -> Result<ProjectId, String> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let first = &rest[..rest.find('/').unwrap_or(rest.len())];
    if first.is_empty() {
        return Err("the path must start with /<project id>/".into());
    }
    first
        .parse::<ProjectId>()
        .map_err(|e| format!("first path segment: {e}"))
}

/// Whether a path segment means `.` or `..`: one or two dots, each
/// written `.` or `%2e` (either case), and nothing else.
fn is_dot_segment(seg: &[u8]) -> bool {
    let (mut dots, mut i) = (0, 0);
    while i < seg.len() {
        if seg[i] == b'.' {
            i += 1;
        } else if seg[i..].len() >= 3 && seg[i..i + 3].eq_ignore_ascii_case(b"%2e") {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

fn token_of<B>(req: &http::Request<B>, project: ProjectId) -> Option<&str> {
    let h = req.headers();
    if let Some(t) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim());
    }
    if let Some(q) = req.uri().query() {
        if let Some(t) = q.split('&').find_map(|p| p.strip_prefix("token=")) {
            return Some(t);
        }
    }
    let name = cocalc_core::wire::token_cookie_name(project);
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Ingress {
    /// An ingress; fetches the master's signing keys once before serving.
    pub async fn new(
        cfg: IngressConfig,
        transport: Arc<dyn Transport>,
        clock: SharedClock,
    ) -> Result<Arc<Self>, ApiError> {
        Self::with_audit(cfg, transport, clock, Arc::new(TracingAuditSink::new())).await
    }

    /// Like [`Ingress::new`], with every refusal (bad path, bad token, rate
    /// limit, unreachable host) also handed to `audit` as an
    /// [`AuditRecord`] (action `ingress`, reason the refusal's code).
    pub async fn with_audit(
        cfg: IngressConfig,
        transport: Arc<dyn Transport>,
        clock: SharedClock,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Arc<Self>, ApiError> {
        let mut cfg = cfg;
        let access_log = cfg.access_log.take().map(Arc::new);
        let master = MasterClient::new(cfg.master_url.clone(), cfg.api_key.clone());
        let ing = Ingress {
            access_log,
            peer_forwards: AtomicU64::new(0),
            draining: Default::default(),
            audit,
            per_project: limiter(cfg.project_rps),
            per_client: limiter(cfg.client_rps),
            connections: ConnectionCap::new(cfg.client_connections),
            pool: cocalc_client::relay::Pool::new(POOL_PER_HOST),
            upstream: Upstream::new(POOL_PER_HOST),
            verifier: Verifier::for_ingress(KeySet::new(), clock.clone()),
            lookup: RouteLookup {
                master,
                routes: Arc::default(),
                clock,
                lookups: Arc::default(),
                watch: HostWatch::new(
                    transport.clone(),
                    cfg.host_check_after,
                    cfg.host_check_timeout,
                ),
                handle: cfg
                    .tunnel_handle
                    .as_deref()
                    .map(|h| Arc::from(h.trim_end_matches('/'))),
                via: cfg
                    .tunnel_handle
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h.trim_end_matches('/')).ok())
                    .unwrap_or(HeaderValue::from_static("proxy")),
            },
            cfg,
            transport,
            signing_keys: Mutex::default(),
            refusals: Refusals::default(),
        };
        let restored = ing.restore_state().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the saved ingress state cannot be used; ignoring it");
            false
        });
        if let Err(e) = ing.refresh_keys().await {
            if !(restored && master_away(&e)) {
                return Err(e);
            }
            tracing::warn!(
                error = %e.message,
                "the master cannot be reached: starting with the signing keys and routes saved \
                 in state_dir"
            );
        }
        Ok(Arc::new(ing))
    }

    /// Marks the proxy as draining before a stop: its health check
    /// ([`cocalc_core::wire::PROXY_HEALTH_PATH`]) answers 503 from now on,
    /// so load balancers send new clients elsewhere, while requests are
    /// served as before. There is no way back: a drained proxy stops.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether [`Ingress::drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// What the health check answers: ok unless draining.
    pub fn health(&self) -> cocalc_core::wire::ProxyHealth {
        let draining = self.draining();
        cocalc_core::wire::ProxyHealth {
            ok: !draining,
            draining,
            signing_keys: self
                .signing_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
        }
    }

    /// Refusal counters.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Hands a record to this ingress's audit sink (the SSH ingress
    /// records its logins and refusals here too).
    pub fn audit(&self, record: AuditRecord) {
        self.audit.record(record);
    }

    /// Counts a refusal and hands its audit record to the sink.
    fn refuse(
        &self,
        counter: &AtomicU64,
        reason: &str,
        project: Option<ProjectId>,
        peer: impl std::fmt::Display,
        detail: &str,
    ) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut r = AuditRecord::new(
            self.lookup.clock.now(),
            AuditOutcome::Refuse,
            "ingress",
            reason,
            format!("client {peer}: {detail}"),
        );
        r.project = project;
        self.audit.record(r);
    }

    /// Reloads the master's signing keys (call periodically and after a
    /// rotation).
    pub async fn refresh_keys(&self) -> Result<(), ApiError> {
        let keys = self.lookup.master.signing_keys().await?;
        self.install_keys(&keys)?;
        *self.signing_keys.lock().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// Verifies tokens with `keys` (PASERK, newest first) from now on.
    fn install_keys(&self, keys: &[String]) -> Result<(), ApiError> {
        let mut set = KeySet::new();
        for (i, k) in keys.iter().rev().enumerate() {
            let pk = paserk::decode_public(k)
                .map_err(|e| ApiError::new(502, "bad_key", format!("master key {k:?}: {e}")))?;
            set.insert_public(pk, Timestamp(i as i64 + 1));
        }
        self.verifier.set_keys(set);
        Ok(())
    }

    /// Writes the master's signing keys and the known routes to
    /// [`IngressConfig::state_dir`] ([`STATE_FILE`], replaced whole);
    /// does nothing without one, or before the master gave any key. The
    /// daemon calls it after each key refresh and at shutdown; at start,
    /// the ingress reads it back, and starts with it if the master cannot
    /// be reached. Routes keep the time the master gave them, so restarts
    /// do not extend [`IngressConfig::route_grace`].
    pub fn save_state(&self) -> std::io::Result<()> {
        let Some(dir) = &self.cfg.state_dir else {
            return Ok(());
        };
        let signing_keys = self
            .signing_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if signing_keys.is_empty() {
            return Ok(());
        }
        let routes = lock_routes(&self.lookup.routes)
            .iter()
            .map(|(host, r)| SavedRoute {
                host: *host,
                endpoint: r.endpoint.clone(),
                confirmed: r.confirmed,
            })
            .collect();
        let text = serde_json::to_vec(&SavedState {
            signing_keys,
            routes,
        })
        .map_err(std::io::Error::other)?;
        cocalc_core::config::write_file_atomically(&dir.join(STATE_FILE), &text)
    }

    /// Reads what [`Ingress::save_state`] wrote: the signing keys, and the
    /// routes the master gave less than `route_ttl + route_grace` ago
    /// (each asked for again at its first use). `Ok(false)` when there is
    /// nothing saved.
    fn restore_state(&self) -> Result<bool, String> {
        let Some(dir) = &self.cfg.state_dir else {
            return Ok(false);
        };
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let state: SavedState =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.install_keys(&state.signing_keys)
            .map_err(|e| format!("{}: {}", path.display(), e.message))?;
        *self.signing_keys.lock().unwrap_or_else(|p| p.into_inner()) = state.signing_keys;
        let now = self.lookup.clock.now();
        let usable = self.cfg.route_ttl + self.cfg.route_grace;
        let mut routes = lock_routes(&self.lookup.routes);
        for saved in state.routes {
            if now.since(saved.confirmed) >= usable {
                continue;
            }
            let Ok(r) = Route::new(
                saved.host,
                saved.endpoint,
                saved.confirmed,
                &self.lookup.watch,
                self.lookup.handle.as_deref(),
            ) else {
                continue;
            };
            r.doubted.store(true, Ordering::Relaxed);
            routes.insert(saved.host, Arc::new(r));
        }
        Ok(true)
    }

    /// The route to `host`: the cached one while fresh; past its TTL (or
    /// doubted) and within the grace, still the cached one, while the
    /// master is asked again in the background; otherwise the master's
    /// answer, waited for. The asking is boxed, so the future of every
    /// request does not carry the master client's request state for the
    /// rare miss.
    async fn route(&self, host: HostId) -> Result<Arc<Route>, ApiError> {
        let cached = lock_routes(&self.lookup.routes).get(&host).cloned();
        let Some(r) = cached else {
            return Box::pin(self.fetch_route(host)).await;
        };
        let now = self.lookup.clock.now();
        if r.fresh(now, self.cfg.route_ttl) {
            return Ok(r);
        }
        if now.since(r.confirmed) >= self.cfg.route_ttl + self.cfg.route_grace {
            return Box::pin(self.fetch_route(host)).await;
        }
        if !r.refreshing.swap(true, Ordering::AcqRel) {
            self.refresh_route(host, r.clone());
        }
        Ok(r)
    }

    /// Asks the master for `host`'s endpoint in the background and
    /// replaces `old` with the answer. A host the master no longer knows
    /// (404) is forgotten; when the master cannot answer, `old` stays and
    /// is asked for again a second later at the earliest.
    fn refresh_route(&self, host: HostId, old: Arc<Route>) {
        let lookup = self.lookup.clone();
        tokio::spawn(async move {
            match lookup.ask(host).await {
                Ok(_) => {}
                Err(e) if e.status == 404 => {
                    let mut routes = lock_routes(&lookup.routes);
                    if routes.get(&host).is_some_and(|r| Arc::ptr_eq(r, &old)) {
                        routes.remove(&host);
                    }
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    old.refreshing.store(false, Ordering::Release);
                }
            }
        });
    }

    /// Asks the master for `host`'s endpoint and waits for the answer.
    async fn fetch_route(&self, host: HostId) -> Result<Arc<Route>, ApiError> {
        self.lookup.ask(host).await
    }

    /// The master client the ingress acts with.
    pub fn master(&self) -> &MasterClient {
        &self.lookup.master
    }

    /// A fresh connection to `host` (route from the master, then the
    /// transport), with what requests on it must carry. Used by the SSH
    /// ingress; goes through the same [`Transport`] as HTTP, so hosts
    /// reached by other means (tunnels, also through another proxy) work
    /// the same. A hidden host not reached where its route says is
    /// looked for where its tunnel is now, once, as for HTTP requests
    /// (see "Through another proxy" in the module overview). A failed connect makes the route
    /// doubted.
    pub async fn connect_host(&self, host: HostId) -> Result<HostConnection, ApiError> {
        let route = self.route(host).await?;
        let e = match self.connect_route(host, &route).await {
            Ok(c) => return Ok(c),
            Err(Unreached::Connect(e)) if route.endpoint.is_tunnel() => {
                match self.moved_route(host, &route).await {
                    Some(fresh) => match self.connect_route(host, &fresh).await {
                        Ok(c) => return Ok(c),
                        Err(e) => e,
                    },
                    None => Unreached::Connect(e),
                }
            }
            Err(e) => e,
        };
        self.refusals.unreachable.fetch_add(1, Ordering::Relaxed);
        self.doubt_route(host);
        Err(match e {
            Unreached::Connect(e) => ApiError::from(&e),
            Unreached::Refused(e) => e,
        })
    }

    /// [`Ingress::connect_host`] by `route`, once.
    async fn connect_route(
        &self,
        host: HostId,
        route: &Route,
    ) -> Result<HostConnection, Unreached> {
        let authority = route
            .authority
            .to_str()
            .map_err(|_| {
                Unreached::Refused(ApiError::new(
                    502,
                    "bad_endpoint",
                    format!("host {host}'s address"),
                ))
            })?
            .to_string();
        let via = route.via_peer.then(|| (VIA_PROXY, self.lookup.via.clone()));
        self.count_peer(route);
        let conn = self
            .transport
            .connect(host, &route.dial)
            .await
            .map_err(Unreached::Connect)?;
        Ok(HostConnection {
            conn,
            authority,
            via,
        })
    }

    /// Forgets a cached route and the pooled connections to that host:
    /// the next request to it waits for the master's answer.
    pub fn forget_route(&self, host: HostId) {
        lock_routes(&self.lookup.routes).remove(&host);
        self.pool.forget(|h| *h == host);
        self.upstream.forget(|h| *h == host);
        self.lookup.watch.forget(host);
    }

    /// A connection to `host` failed: its pooled connections are dropped
    /// and the master is asked for its address again at the next request,
    /// which meanwhile goes where the cached route says (the host may be
    /// restarting at the same address while the master is away).
    fn doubt_route(&self, host: HostId) {
        if let Some(r) = lock_routes(&self.lookup.routes).get(&host) {
            r.doubted.store(true, Ordering::Relaxed);
        }
        self.pool.forget(|h| *h == host);
        self.upstream.forget(|h| *h == host);
    }

    /// Drops rate-limit state of clients and projects not seen lately, so
    /// the limiters' memory stays bounded, and flushes the audit sink
    /// (a summary of refusals it did not log one by one) — call
    /// periodically.
    pub fn prune_limits(&self) {
        self.per_client.retain_recent();
        self.per_project.retain_recent();
        self.audit.flush();
    }

    /// Answers one request: the checks of the module overview in order
    /// (rate limits, base path, token), then the request goes to the
    /// token's host and the host's response streams back. Refusals are
    /// counted, audited and answered here. Serve it with
    /// [`crate::serve_ingress`], or from any hyper server.
    pub async fn handle(&self, peer: &Peer, mut req: http::Request<Incoming>) -> Response {
        let mut seen = self.seen(peer, &req);
        // What the answer needs if the proxy drains: looked at only then.
        let marks = self.draining().then(|| Marks {
            http1: req
                .extensions()
                .get::<cocalc_client::http2::ClientVersion>()
                .is_none(),
            forwarded: req.headers().contains_key(VIA_PROXY),
        });
        let (project, host, route) = match self.prepare(peer, &req).await {
            Ok(ready) => ready,
            Err(refusal) => {
                let mut r = refusal.map(full);
                mark_draining(&mut r, marks);
                return logged(seen, r);
            }
        };
        if let Some(w) = &mut seen {
            w.routed(Some(project), host);
            // A WebSocket is logged when its relay ends, with its bytes.
            w.relayed_upgrade(&mut req);
        }
        // Pinned where it is made: the request's future is large, and
        // the watch takes it by reference rather than moving it.
        let answer = std::pin::pin!(self.forward(host, &route, peer, req));
        let mut r = match self.lookup.watch.answer(&route.watched, answer).await {
            Ok(mut r) => {
                self.check_peer_answer(host, &route, r.status(), r.headers_mut());
                r
            }
            Err(e) => self.forward_failed(project, host, peer, &e).map(full),
        };
        mark_draining(&mut r, marks);
        logged(seen, r)
    }

    /// `body`, from the host `route` leads to, under the host watch: it
    /// ends rather than wait without end on a host that hangs while it
    /// is sent ([`HostWatch::silence`]).
    fn watch_body(&self, body: ResponseBody<HostId>, route: &Route) -> ResponseBody<HostId> {
        let watch = &self.lookup.watch;
        if watch.after().is_zero() {
            return body;
        }
        body.watched(|| watch.silence(&route.watched))
    }

    /// [`Marks`] for a request on the lean path (HTTP/1.1), if draining.
    fn lean_marks(&self, headers: &http::HeaderMap) -> Option<Marks> {
        self.draining().then(|| Marks {
            http1: true,
            forwarded: headers.contains_key(VIA_PROXY),
        })
    }

    /// Answers one plain request (no body, no upgrade) as
    /// [`Ingress::handle`] does, for
    /// [`cocalc_client::lean::serve_connection`]: the host's answer
    /// comes back through the lean [`Upstream`] client, so a large body
    /// can be spliced to the client. [`crate::serve_ingress`] serves
    /// with both. With an access log, the answer comes with the log's
    /// record of the request: count the body's bytes on it, and drop it
    /// once the body is sent.
    pub async fn handle_lean(
        &self,
        peer: &Peer,
        req: http::Request<()>,
    ) -> (http::Response<LeanBody<HostId>>, Option<BodySent>) {
        let mut seen = self.seen(peer, &req);
        let (project, host, route) = match self.prepare(peer, &req).await {
            Ok(ready) => ready,
            Err(refusal) => {
                let mut r = refusal.map(LeanBody::Full);
                mark_draining(&mut r, self.lean_marks(req.headers()));
                return logged_lean(seen, r);
            }
        };
        if let Some(w) = &mut seen {
            w.routed(Some(project), host);
        }
        let (parts, ()) = req.into_parts();
        let answer = std::pin::pin!(self.send_lean(host, &route, peer, &parts));
        let mut r = match self.lookup.watch.answer(&route.watched, answer).await {
            Ok(mut r) => {
                self.check_peer_answer(host, &route, r.status(), r.headers_mut());
                r.map(|b| LeanBody::Upstream(self.watch_body(b, &route)))
            }
            Err(e) => self
                .forward_failed(project, host, peer, &e)
                .map(LeanBody::Full),
        };
        mark_draining(&mut r, self.lean_marks(&parts.headers));
        logged_lean(seen, r)
    }

    /// What the access log keeps of `req` while it is answered (logged
    /// as 499 if the client goes away first); nothing without an access
    /// log.
    fn seen<B>(&self, peer: &Peer, req: &http::Request<B>) -> Option<Waiting> {
        self.access_log.as_ref().map(|log| {
            let client = self.client_of(peer, req.headers()).ip;
            let pending = Pending::new(req, client, peer.proto == HTTPS, self.lookup.clock.now());
            Waiting::new(pending, log.clone())
        })
    }

    /// Awaits `answer`, an exchange with `host` made outside the HTTP
    /// path (the SSH ingress's), under the same watch as requests
    /// ([`crate::watch`]): if the host keeps it waiting and fails its
    /// health check, the result is 504 `host_not_responding`.
    pub async fn while_host_answers<T, F>(
        &self,
        host: HostId,
        answer: std::pin::Pin<&mut F>,
    ) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, ApiError>> + ?Sized,
    {
        let route = self.route(host).await?;
        self.lookup.watch.answer(&route.watched, answer).await
    }

    /// The access log, when there is one ([`IngressConfig::access_log`]).
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_deref()
    }

    /// Host checks run, and how many found the host silent.
    pub fn host_checks(&self) -> &crate::watch::WatchStats {
        self.lookup.watch.stats()
    }

    /// Requests and SSH connections for hidden hosts whose tunnels land
    /// at other proxies, forwarded to those, since start.
    pub fn peer_forwards(&self) -> u64 {
        self.peer_forwards.load(Ordering::Relaxed)
    }

    /// Another proxy that `route` went through answered 502, or says it
    /// is draining ([`cocalc_core::wire::DRAINING_HEADER`], removed from
    /// `headers` here): it may know better where `host`'s tunnel is (a
    /// refusal with [`TUNNEL_ELSEWHERE`] says so), or be about to stop, so
    /// the route is doubted and the master asked again, off the request
    /// path, rather than sending request after request there until the
    /// route's TTL. At most once per host per [`REASK_AFTER`]: a 502 may
    /// also be a project's server failing, which says nothing about the
    /// route.
    fn check_peer_answer(
        &self,
        host: HostId,
        route: &Route,
        status: http::StatusCode,
        headers: &mut http::HeaderMap,
    ) {
        if !route.via_peer {
            return;
        }
        let draining = headers.remove(DRAINING).is_some();
        if (draining || status == http::StatusCode::BAD_GATEWAY) && self.may_ask_again(host) {
            if let Some(r) = lock_routes(&self.lookup.routes).get(&host) {
                r.doubted.store(true, Ordering::Relaxed);
            }
        }
    }

    /// `route` goes through another proxy: counted.
    fn count_peer(&self, route: &Route) {
        if route.via_peer {
            self.peer_forwards.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The checks ([`Ingress::admit`]) and the route of the token's host.
    async fn prepare<B>(
        &self,
        peer: &Peer,
        req: &http::Request<B>,
    ) -> Result<(ProjectId, HostId, Arc<Route>), Refusal> {
        self.hold_connection(peer).map_err(|r| *r)?;
        let client = self.client_of(peer, req.headers());
        let (project, host) = self.admit(client, req).map_err(|r| *r)?;
        match self.route(host).await {
            Ok(route) if route.via_peer && req.headers().contains_key(VIA_PROXY) => {
                // Boxed: rare, and kept out of every request's future.
                Box::pin(self.forwarded_here(peer, project, host, route)).await
            }
            Ok(route) => Ok((project, host, route)),
            Err(e) => {
                // Counted and audited with the master's own words; the
                // client is told what failed, not where the master is.
                self.refuse(
                    &self.refusals.unreachable,
                    &e.code,
                    Some(project),
                    peer.addr,
                    &format!("asking the master for host {host}: {}", e.message),
                );
                Err(api(&if master_away(&e) {
                    ApiError::new(
                        e.status,
                        &e.code,
                        format!("the proxy cannot ask the master where host {host} is"),
                    )
                } else {
                    e
                }))
            }
        }
    }

    /// Whether the master may be asked for `host`'s route again on a
    /// request's path: not within [`REASK_AFTER`] of its last answer for
    /// it (the cached route's, which other requests may have just
    /// renewed), so a host that stays unreachable, or a client sending the
    /// via header on purpose, costs the master about one lookup per host
    /// that long.
    fn may_ask_again(&self, host: HostId) -> bool {
        let now = self.lookup.clock.now();
        lock_routes(&self.lookup.routes)
            .get(&host)
            .is_none_or(|r| now.since(r.confirmed) >= REASK_AFTER)
    }

    /// A request another proxy forwarded here, for `host` whose tunnel
    /// this proxy's `route` places at a third: the proxies' routes
    /// disagree (the host moved its tunnel). If the host still holds a
    /// tunnel open here (one moving away keeps its old tunnel a while),
    /// the request goes through it. Otherwise the forwarding proxy has
    /// just been told this one, so the master is asked again first: if it
    /// now names this proxy, the request is served. Otherwise it is
    /// refused ([`TUNNEL_ELSEWHERE`]) rather than forwarded again, which
    /// could go round.
    async fn forwarded_here(
        &self,
        peer: &Peer,
        project: ProjectId,
        host: HostId,
        route: Arc<Route>,
    ) -> Result<(ProjectId, HostId, Arc<Route>), Refusal> {
        if let (true, Some(own)) = (self.transport.holds_tunnel(host), &self.lookup.handle) {
            let here = HostEndpoint::Tunnel(own.to_string());
            let now = self.lookup.clock.now();
            if let Ok(r) = Route::new(host, here, now, &self.lookup.watch, Some(own)) {
                return Ok((project, host, Arc::new(r)));
            }
        }
        let route = if !self.may_ask_again(host) {
            route
        } else {
            match self.fetch_route(host).await {
                Ok(fresh) if !fresh.via_peer => return Ok((project, host, fresh)),
                Ok(fresh) => fresh,
                Err(_) => {
                    self.doubt_route(host);
                    route
                }
            }
        };
        let why = format!(
            "host {host}'s tunnel lands at another proxy ({}) as far as this one knows, \
             and the request was forwarded by a proxy already",
            route.endpoint.base_url()
        );
        self.refuse(
            &self.refusals.tunnel_elsewhere,
            TUNNEL_ELSEWHERE,
            Some(project),
            peer.addr,
            &why,
        );
        Err(api(&ApiError::new(502, TUNNEL_ELSEWHERE, why)))
    }

    /// Forwarding to `host` failed: counted, audited, the host's route
    /// forgotten, and answered with `e`.
    fn forward_failed(
        &self,
        project: ProjectId,
        host: HostId,
        peer: &Peer,
        e: &ApiError,
    ) -> Refusal {
        let counter = if e.code == crate::watch::HOST_NOT_RESPONDING {
            &self.refusals.host_not_responding
        } else {
            &self.refusals.unreachable
        };
        self.refuse(counter, &e.code, Some(project), peer.addr, &e.message);
        self.doubt_route(host);
        api(e)
    }

    /// Counts and audits a TLS handshake that failed (reason
    /// `tls_handshake`); the connection is then closed.
    pub(crate) fn refuse_handshake(&self, peer: SocketAddr, why: &str) {
        self.refuse(
            &self.refusals.tls_handshake,
            "tls_handshake",
            None,
            peer,
            why,
        );
    }

    /// Refuses `path` as a bad path: counted, audited and answered 400
    /// with the reason, as [`Ingress::handle`] refuses one (for paths
    /// another router saw first).
    pub(crate) fn refuse_path(&self, peer: SocketAddr, path: &str) -> Response {
        let why = match project_of_path(path) {
            Err(why) => why,
            Ok(_) => format!("no such path {path:?}"),
        };
        self.refuse(&self.refusals.bad_path, "bad_path", None, peer, &why);
        fail(400, "bad_path", why).map(|b| Logged::new(full(b), None))
    }

    /// The connection cap: the peer's connection takes a slot at its first
    /// project request; one whose address holds them all is refused (429
    /// `too_many_connections`, `Connection: close`), once per connection.
    fn hold_connection(&self, peer: &Peer) -> Result<(), Box<Refusal>> {
        let limit = self.connections.limit();
        if limit == 0 || self.is_trusted(peer.addr.ip()) {
            return Ok(());
        }
        let slot = peer
            .conn
            .slot
            .get_or_init(|| self.connections.take(peer.addr.ip()));
        if slot.is_some() {
            return Ok(());
        }
        self.refuse(
            &self.refusals.too_many_connections,
            "too_many_connections",
            None,
            peer.addr,
            &format!("this address holds {limit} connections already"),
        );
        let mut r = fail(
            429,
            "too_many_connections",
            format!(
                "this address holds {limit} connections to the proxy already; close some \
                 (idle keep-alive connections, WebSockets) or retry in 1 s"
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Err(Box::new(r))
    }

    /// A place under the per-client connection cap for a connection from
    /// `ip` that is not served by [`Ingress::handle`] (an SSH session):
    /// `Ok(None)` when there is no cap or `ip` is a trusted proxy,
    /// `Err(cap)` when `ip` holds `cap` connections already.
    pub(crate) fn connection_slot(&self, ip: std::net::IpAddr) -> Result<Option<Slot>, u32> {
        match self.connections.limit() {
            // A trusted proxy's connections carry many clients, as on
            // the HTTP side.
            0 => Ok(None),
            _ if self.is_trusted(ip) => Ok(None),
            limit => self.connections.take(ip).map(Some).ok_or(limit),
        }
    }

    /// The cached routes by freshness, and how the master's lookups went.
    pub fn route_stats(&self) -> RouteStats {
        let mut stats = RouteStats {
            lookup_failures: self.lookup.lookups.failures.load(Ordering::Relaxed),
            master_away: self.lookup.lookups.away.load(Ordering::Relaxed),
            ..RouteStats::default()
        };
        let now = self.lookup.clock.now();
        for r in lock_routes(&self.lookup.routes).values() {
            if r.fresh(now, self.cfg.route_ttl) {
                stats.fresh += 1;
            } else {
                stats.stale += 1;
            }
        }
        stats
    }

    /// Client addresses holding connections under the cap, and the
    /// connections they hold.
    pub fn connections_held(&self) -> (u64, u64) {
        self.connections.held()
    }

    /// How many connections `ip` holds under the connection cap now.
    pub fn connections_of(&self, ip: std::net::IpAddr) -> u32 {
        self.connections.of(ip)
    }

    /// Whether `ip` is one of [`IngressConfig::trusted_proxies`].
    fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        in_nets(&self.cfg.trusted_proxies, ip)
    }

    /// `listener`, reading a PROXY protocol header off every connection
    /// from [`IngressConfig::trusted_proxies`] if `proxy_protocol`
    /// ([`crate::proxy_protocol`]): serve the ingress, its HTTPS side or
    /// the SSH ingress on it, and they see the clients behind TCP load
    /// balancers as the peers. A trusted proxy's connection without a
    /// valid header is closed, counted (`bad_proxy_header`) and audited
    /// with `name`, the listener's.
    pub fn listener(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        name: &'static str,
        proxy_protocol: bool,
    ) -> crate::proxy_protocol::Listener {
        if !proxy_protocol {
            return listener.into();
        }
        let nets = self.cfg.trusted_proxies.clone();
        let ingress = Arc::downgrade(self);
        crate::proxy_protocol::Listener::Proxied(crate::proxy_protocol::ProxiedListener::new(
            listener,
            Arc::new(move |ip| in_nets(&nets, ip)),
            Arc::new(move |peer, why: &str| {
                if let Some(i) = ingress.upgrade() {
                    i.refuse(
                        &i.refusals.bad_proxy_header,
                        "bad_proxy_header",
                        None,
                        format_args!("{peer} (a trusted proxy)"),
                        &format!("{name} listener: {why}"),
                    );
                }
            }),
        ))
    }

    /// Who a request from `peer` is from: `peer` itself, unless it is a
    /// trusted proxy; then the right-most address of `X-Forwarded-For`
    /// that is not a trusted proxy too (the proxy itself if there is none,
    /// or if an entry before one does not parse).
    fn client_of(&self, peer: &Peer, headers: &http::HeaderMap) -> Client {
        Client {
            ip: forwarded_client(peer.addr.ip(), headers, &self.cfg.trusted_proxies),
            peer: peer.addr,
        }
    }

    /// The scheme to tell hosts: what a trusted proxy says it was
    /// (`X-Forwarded-Proto: http` or `https`), else the one the request
    /// came in with.
    fn forwarded_proto(&self, peer: &Peer, headers: &http::HeaderMap) -> HeaderValue {
        if self.is_trusted(peer.addr.ip()) {
            match headers.get(X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
                Some(b"https") => return HTTPS,
                Some(b"http") => return HTTP,
                _ => {}
            }
        }
        peer.proto.clone()
    }

    /// The checks before anything is forwarded: the per-client limit, the
    /// base path, the per-project limit and the token. Returns the
    /// project and the host the token names, or the refusal to answer
    /// with.
    fn admit<B>(
        &self,
        peer: Client,
        req: &http::Request<B>,
    ) -> Result<(ProjectId, HostId), Box<Refusal>> {
        use governor::clock::{Clock, DefaultClock};
        if let Err(not_until) = self.per_client.check_key(&peer.ip) {
            self.refuse(
                &self.refusals.rate_limited,
                "rate_limited",
                None,
                peer,
                "per-client limit",
            );
            return Err(Box::new(too_many(
                "client",
                not_until.wait_time_from(DefaultClock::default().now()),
            )));
        }
        let project = match project_of_path(req.uri().path()) {
            Ok(p) => p,
            Err(why) => {
                self.refuse(&self.refusals.bad_path, "bad_path", None, peer, &why);
                return Err(Box::new(fail(400, "bad_path", why)));
            }
        };
        if let Err(not_until) = self.per_project.check_key(&project) {
            self.refuse(
                &self.refusals.rate_limited,
                "rate_limited",
                Some(project),
                peer,
                "per-project limit",
            );
            return Err(Box::new(too_many(
                "project",
                not_until.wait_time_from(DefaultClock::default().now()),
            )));
        }
        let Some(token) = token_of(req, project) else {
            self.refuse(
                &self.refusals.bad_token,
                "token_missing",
                Some(project),
                peer,
                "no connect token",
            );
            return Err(Box::new(fail(
                401,
                "token_missing",
                "no connect token (Authorization header, ?token= or cookie)",
            )));
        };
        match self
            .verifier
            .verify(token)
            .and_then(|c| c.require_project(project).map(|()| c))
        {
            Ok(claims) => Ok((project, claims.host)),
            Err(e) => {
                self.refuse(
                    &self.refusals.bad_token,
                    e.code(),
                    Some(project),
                    peer,
                    &e.to_string(),
                );
                Err(Box::new(api(&ApiError::from(&e))))
            }
        }
    }

    /// Sends an admitted request to `host` and returns its response.
    async fn forward(
        &self,
        host: HostId,
        route: &Route,
        peer: &Peer,
        req: http::Request<Incoming>,
    ) -> Result<http::Response<AnswerBody>, ApiError> {
        let (mut parts, body) = req.into_parts();
        if cocalc_client::upstream::takes(&parts, &body) {
            let resp = self.send_lean(host, route, peer, &parts).await?;
            return Ok(resp.map(|b| Either::Left(Either::Right(self.watch_body(b, route)))));
        }
        let xff = forwarded_for(&parts, peer);
        let client_host = parts.headers.remove(header::HOST);
        parts.headers.remove(X_FORWARDED_HOST);
        parts.headers.insert(X_FORWARDED_FOR, xff);
        let proto = self.forwarded_proto(peer, &parts.headers);
        parts.headers.insert(X_FORWARDED_PROTO, proto);
        if parts.headers.contains_key(header::UPGRADE) {
            // A WebSocket keeps its connection's slot until it closes.
            cocalc_client::relay::HoldWhileUpgraded::add(&mut parts.extensions, peer.conn.clone());
        }
        let mut req = http::Request::from_parts(parts, body);
        self.address(&mut req, route, client_host.as_ref());
        // Boxed: hyper's client futures are large, and most requests take
        // the lean path above.
        match Box::pin(self.forward_hyper(host, route, req)).await {
            Ok(r) => Ok(r),
            // Nothing was sent: as on the lean path, a hidden host's tunnel
            // may have moved (Ingress::send_lean_moved).
            Err(Unsent(e, mut req)) if route.endpoint.is_tunnel() => {
                let Some(fresh) = self.moved_route(host, route).await else {
                    return Err(ApiError::from(&e));
                };
                self.address(&mut req, &fresh, client_host.as_ref());
                match Box::pin(self.forward_hyper(host, &fresh, *req)).await {
                    Ok(r) => Ok(r),
                    Err(Unsent(e, _)) => Err(ApiError::from(&e)),
                    Err(Failed(e)) => Err(e),
                }
            }
            Err(Unsent(e, _)) => Err(ApiError::from(&e)),
            Err(Failed(e)) => Err(e),
        }
    }

    /// Writes into `req`'s head where it goes by `route`: the host's
    /// address as `Host` and the client's (`client_host`) as
    /// `X-Forwarded-Host`, as on the lean path (a client's own
    /// X-Forwarded-Host never passes); through another proxy, the client's
    /// `Host` as it is (that proxy writes X-Forwarded-Host from it) and
    /// this proxy's handle as the via header. Counts a forward to another
    /// proxy.
    fn address<B>(
        &self,
        req: &mut http::Request<B>,
        route: &Route,
        client_host: Option<&HeaderValue>,
    ) {
        let headers = req.headers_mut();
        if route.via_peer {
            let host_header = client_host.unwrap_or(&route.authority).clone();
            headers.insert(header::HOST, host_header);
            headers.remove(X_FORWARDED_HOST);
            headers.insert(VIA_PROXY, self.lookup.via.clone());
        } else {
            match client_host {
                Some(orig) => headers.insert(X_FORWARDED_HOST, orig.clone()),
                None => headers.remove(X_FORWARDED_HOST),
            };
            headers.insert(header::HOST, route.authority.clone());
            headers.remove(VIA_PROXY);
        }
        self.count_peer(route);
    }

    /// Sends a request without a body or upgrade through the lean
    /// client, on its own keep-alive connections, with what the host sees
    /// instead of the client's own written into the head: its own address
    /// as `Host`, the client's `Host` as `X-Forwarded-Host`, the client
    /// appended to `X-Forwarded-For`, and the scheme. A hidden host that
    /// cannot be reached where the route says may have moved its tunnel
    /// ([`Ingress::send_lean_moved`]).
    async fn send_lean(
        &self,
        host: HostId,
        route: &Route,
        peer: &Peer,
        parts: &http::request::Parts,
    ) -> Result<http::Response<ResponseBody<HostId>>, ApiError> {
        match self.send_lean_to(host, route, peer, parts).await {
            Ok(r) => Ok(r),
            Err(UpstreamError::Connect(e)) if route.endpoint.is_tunnel() => {
                // Boxed: the rare retry stays out of every request's future.
                Box::pin(self.send_lean_moved(host, route, peer, parts, e)).await
            }
            Err(e) => Err(lean_failed(host, e)),
        }
    }

    /// A hidden host's tunnel could not be reached where `route` says
    /// (the request reached no one): after a failover its tunnel is at
    /// another proxy, and `route` has not caught up. The route cached now
    /// (another request may have renewed it), else the master's answer
    /// (asked at once, if [`Ingress::may_ask_again`]), says where it is;
    /// if that is another place, the request is sent there, once.
    /// Otherwise the connect error `e` stands.
    async fn send_lean_moved(
        &self,
        host: HostId,
        route: &Route,
        peer: &Peer,
        parts: &http::request::Parts,
        e: cocalc_core::TransportError,
    ) -> Result<http::Response<ResponseBody<HostId>>, ApiError> {
        match self.moved_route(host, route).await {
            Some(fresh) => self
                .send_lean_to(host, &fresh, peer, parts)
                .await
                .map_err(|e| lean_failed(host, e)),
            None => Err(ApiError::from(&e)),
        }
    }

    /// Where a hidden host's tunnel is now, if not where `route` says
    /// (which a request just failed to reach): the route cached now
    /// (another request may have renewed it), else the master's answer,
    /// asked at once if [`Ingress::may_ask_again`]. `None` when neither
    /// names another place.
    async fn moved_route(&self, host: HostId, route: &Route) -> Option<Arc<Route>> {
        let cached = lock_routes(&self.lookup.routes).get(&host).cloned();
        let now = match cached {
            Some(c) if c.endpoint != route.endpoint => c,
            _ if self.may_ask_again(host) => self.fetch_route(host).await.ok()?,
            _ => return None,
        };
        if now.endpoint == route.endpoint {
            return None;
        }
        tracing::debug!(%host, from = ?route.endpoint, to = ?now.endpoint, "a hidden host's tunnel moved; sending there");
        Some(now)
    }

    /// [`Ingress::send_lean`] to `route`, once.
    async fn send_lean_to(
        &self,
        host: HostId,
        route: &Route,
        peer: &Peer,
        parts: &http::request::Parts,
    ) -> Result<http::Response<ResponseBody<HostId>>, UpstreamError<cocalc_core::TransportError>>
    {
        let xff = forwarded_for(parts, peer);
        let proto = self.forwarded_proto(peer, &parts.headers);
        let client_host = parts.headers.get(header::HOST);
        self.count_peer(route);
        let replace = if route.via_peer {
            // Another proxy: the client's Host as it is (that proxy writes
            // X-Forwarded-Host from it), and who forwarded.
            [
                (&header::HOST, client_host.or(Some(&route.authority))),
                (&X_FORWARDED_HOST, None),
                (&X_FORWARDED_FOR, Some(&xff)),
                (&X_FORWARDED_PROTO, Some(&proto)),
                (&VIA_PROXY, Some(&self.lookup.via)),
            ]
        } else {
            [
                (&header::HOST, Some(&route.authority)),
                (&X_FORWARDED_HOST, client_host),
                (&X_FORWARDED_FOR, Some(&xff)),
                (&X_FORWARDED_PROTO, Some(&proto)),
                (&VIA_PROXY, None),
            ]
        };
        let connect = || self.transport.connect(host, &route.dial);
        self.upstream.send(host, parts, &replace, connect).await
    }

    /// Sends a request with a body or an upgrade, its headers already
    /// rewritten for `route`, through hyper's client. A request that
    /// reached no one (no connection could be opened) comes back
    /// [`Unsent`].
    async fn forward_hyper(
        &self,
        host: HostId,
        route: &Route,
        req: http::Request<Incoming>,
    ) -> Result<http::Response<AnswerBody>, Forwarded> {
        let connect = || self.transport.connect(host, &route.dial);
        let failed = |e: hyper::Error| Failed(host_failed(host, e));
        let resp = if req.headers().contains_key(header::UPGRADE) {
            // Upgrades take the connection over: a fresh one, relayed both ways.
            let conn = match connect().await {
                Ok(c) => c,
                Err(e) => return Err(Unsent(e, Box::new(req))),
            };
            cocalc_client::relay::relay_within(conn, req, HOST_UPGRADE_TIMEOUT)
                .await
                .map_err(|e| match e {
                    cocalc_client::relay::RelayError::NoAnswer(t) => Failed(ApiError::new(
                        504,
                        "host_timeout",
                        format!("host {host} did not answer the upgrade within {t:?}"),
                    )),
                    e => Failed(host_failed(host, e)),
                })?
        } else {
            // Requests with a body go through hyper's client, on keep-alive
            // connections of their own.
            self.pool
                .send(host, req, connect)
                .await
                .map_err(|e| match e {
                    cocalc_client::relay::PoolError::Connect(e, req) => Unsent(e, req),
                    cocalc_client::relay::PoolError::Http(e) => failed(e),
                })?
        };
        // A body (not a WebSocket's switch) is read under the host watch.
        let silence = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && !self.lookup.watch.after().is_zero())
        .then(|| self.lookup.watch.silence(&route.watched));
        Ok(resp.map(|b| Either::Left(Either::Left(Silenced::new(b, silence)))))
    }
}

/// Why [`Ingress::connect_route`] has no connection.
enum Unreached {
    /// The connect failed.
    Connect(cocalc_core::TransportError),
    /// The route cannot be used, for this reason.
    Refused(ApiError),
}

/// What an answer given while the proxy drains ([`Ingress::drain`])
/// carries, by its request ([`mark_draining`]).
#[derive(Debug, Clone, Copy)]
struct Marks {
    /// The client speaks HTTP/1.1.
    http1: bool,
    /// Another proxy forwarded the request.
    forwarded: bool,
}

/// While the proxy drains (`marks` is `Some`):
/// - an answer to an HTTP/1.1 client closes its connection
///   (`Connection: close`), so a keep-alive client connects again,
///   through its balancer to a proxy that is not stopping, rather than
///   holding on to this one until it stops (and losing a request sent as
///   it does). An upgrade keeps its connection; HTTP/2 clients get a
///   GOAWAY at the stop instead.
/// - an answer to a request another proxy forwarded carries
///   [`cocalc_core::wire::DRAINING_HEADER`], so that proxy looks the host
///   up again (`Ingress::check_peer_answer`).
fn mark_draining<B>(r: &mut http::Response<B>, marks: Option<Marks>) {
    let Some(m) = marks else { return };
    if r.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    if m.http1 {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if m.forwarded {
        r.headers_mut()
            .insert(DRAINING, HeaderValue::from_static("1"));
    }
}

/// How [`Ingress::forward_hyper`] failed.
enum Forwarded {
    /// No connection could be opened: the request, whole, and why.
    Unsent(cocalc_core::TransportError, Box<http::Request<Incoming>>),
    /// The exchange failed, answered with this.
    Failed(ApiError),
}
use Forwarded::{Failed, Unsent};

/// A connection to a host from [`Ingress::connect_host`].
pub struct HostConnection {
    /// The connection (to the host, or to the proxy its tunnel lands at).
    pub conn: cocalc_core::BoxedConnection,
    /// What requests on it carry as `Host`.
    pub authority: String,
    /// A header requests on it must also carry: [`cocalc_core::wire::VIA_PROXY_HEADER`]
    /// when the connection goes to another proxy.
    pub via: Option<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for HostConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConnection")
            .field("authority", &self.authority)
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

/// The URL and authority of another proxy's tunnel handle `h`, which
/// `host`'s tunnel lands at, for forwarding requests to it: an `http://`
/// or `https://` URL with nothing after the authority (requests go to
/// `/<project id>/…` at its root, as to a host).
fn peer_handle(host: HostId, h: &str) -> Result<(String, String), ApiError> {
    let url = h.trim_end_matches('/');
    let bad = |why: String| {
        ApiError::new(
            502,
            "bad_endpoint",
            format!(
                "host {host}'s tunnel lands at the proxy {h:?}, which cannot be reached: {why}"
            ),
        )
    };
    let authority = cocalc_core::parse_root_url(url).map_err(|e| bad(e.to_string()))?;
    Ok((url.to_string(), authority))
}

/// `r`, its body counted for the access log if the request was `seen`
/// (logged when the body has been sent).
fn logged(seen: Option<Waiting>, r: http::Response<AnswerBody>) -> Response {
    let sent = seen.map(|w| w.answered(r.status()));
    r.map(|b| Logged::new(b, sent))
}

/// `r`, with the access log's record of the request if it was `seen`,
/// for the lean server to count its body on.
fn logged_lean(
    seen: Option<Waiting>,
    r: http::Response<LeanBody<HostId>>,
) -> (http::Response<LeanBody<HostId>>, Option<BodySent>) {
    let sent = seen.map(|w| w.answered(r.status()));
    (r, sent)
}

/// The `X-Forwarded-For` the host sees: the client's, with the client
/// appended.
fn forwarded_for(parts: &http::request::Parts, peer: &Peer) -> HeaderValue {
    match parts.headers.get(X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| peer.ip.clone())
        }
        None => peer.ip.clone(),
    }
}

/// Who a request is from, for the per-client limit and the audit log: its
/// peer's address, or the address a trusted proxy (`via`) forwarded it
/// for.
#[derive(Debug, Clone, Copy)]
struct Client {
    ip: std::net::IpAddr,
    peer: SocketAddr,
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ip == self.peer.ip() {
            write!(f, "{}", self.peer)
        } else {
            write!(f, "{} (via {})", self.ip, self.peer)
        }
    }
}

/// The schemes clients reach the ingress with.
const HTTP: HeaderValue = HeaderValue::from_static("http");
const HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The ingress as the [`LeanService`](cocalc_client::lean::LeanService)
/// of one client connection: plain requests to projects go to
/// [`Ingress::handle_lean`]; paths under `/.cocalc/` (the proxy's own
/// endpoints) are declined, so the connection's fallback serves them.
#[derive(Debug, Clone)]
pub struct LeanIngress {
    ingress: Arc<Ingress>,
    peer: Peer,
}

impl LeanIngress {
    /// `ingress` for the client connection from `peer`.
    pub fn new(ingress: Arc<Ingress>, peer: Peer) -> Self {
        LeanIngress { ingress, peer }
    }
}

impl cocalc_client::lean::LeanService for LeanIngress {
    type Key = HostId;

    fn takes(&self, req: &http::Request<()>) -> bool {
        !req.uri().path().starts_with("/.cocalc/")
    }

    async fn call(&self, req: http::Request<()>) -> http::Response<LeanBody<HostId>> {
        self.ingress.handle_lean(&self.peer, req).await.0
    }

    fn call_logged(
        &self,
        req: http::Request<()>,
    ) -> impl std::future::Future<Output = (http::Response<LeanBody<HostId>>, Option<BodySent>)> + Send
    {
        self.ingress.handle_lean(&self.peer, req)
    }
}

/// What a failed lean exchange with `host` is answered with.
fn lean_failed(host: HostId, e: UpstreamError<cocalc_core::TransportError>) -> ApiError {
    match e {
        UpstreamError::Connect(e) => ApiError::from(&e),
        e => host_failed(host, e),
    }
}

/// A host's HTTP exchange failed after the connection was made.
fn host_failed(host: HostId, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(502, "host_failed", format!("host {host}: {e}"))
}

/// Idle connections kept per host.
const POOL_PER_HOST: usize = 64;

/// How long the ingress waits for a host to answer an upgrade: longer
/// than the host waits for a server in a project
/// ([`UPGRADE_ANSWER_TIMEOUT`](cocalc_client::relay::UPGRADE_ANSWER_TIMEOUT)),
/// so a server that never answers gets the host's precise 504, and this
/// one means the host itself did not answer.
const HOST_UPGRADE_TIMEOUT: Duration = Duration::from_secs(45);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_match_ranges_and_mapped_addresses() {
        let nets: Vec<ipnet::IpNet> = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(in_nets(&nets, ip("10.1.2.3")));
        assert!(in_nets(&nets, ip("::ffff:10.1.2.3")), "IPv4 seen as IPv6");
        assert!(in_nets(&nets, ip("2001:db8::1")));
        assert!(in_nets(&nets, ip("192.0.2.7")));
        assert!(!in_nets(&nets, ip("192.0.2.8")));
        assert!(!in_nets(&nets, ip("11.0.0.1")));
        assert!(!in_nets(&[], ip("10.1.2.3")), "no list, nobody trusted");
    }

    #[tokio::test]
    async fn tunnels_at_other_proxies_are_reached_through_them() {
        let watch = HostWatch::new(
            Arc::new(crate::TcpTransport::default()),
            Duration::ZERO,
            Duration::from_secs(1),
        );
        let host = HostId::from_bytes([7; 16]);
        let route =
            |e: HostEndpoint, own: Option<&str>| Route::new(host, e, Timestamp(0), &watch, own);
        let tunnel = |h: &str| HostEndpoint::Tunnel(h.into());

        // Its own tunnel (a trailing slash on either side is the same
        // handle): to the transport as it is.
        for (at, own) in [
            ("http://a:8000", "http://a:8000/"),
            ("http://a:8000/", "http://a:8000"),
        ] {
            let r = route(tunnel(at), Some(own)).unwrap();
            assert!(!r.via_peer);
            assert_eq!(r.dial, tunnel(at));
            assert_eq!(r.authority, host.to_string().as_str());
        }
        // Another proxy's: to its handle, as to a host's URL.
        let r = route(tunnel("https://b.example:8443/"), Some("http://a:8000")).unwrap();
        assert!(r.via_peer);
        assert_eq!(r.dial, HostEndpoint::Url("https://b.example:8443".into()));
        assert_eq!(r.authority, "b.example:8443");
        assert_eq!(
            r.endpoint,
            tunnel("https://b.example:8443/"),
            "saved as given"
        );
        // Without a port, the scheme's.
        let r = route(tunnel("https://b.example"), Some("http://a:8000")).unwrap();
        assert_eq!(r.dial, HostEndpoint::Url("https://b.example".into()));
        assert_eq!(r.authority, "b.example:443");
        // Without a handle of its own, the ingress leaves tunnels to the
        // transport; URLs are never another proxy's.
        assert!(!route(tunnel("http://b:8000"), None).unwrap().via_peer);
        let url = HostEndpoint::Url("http://10.0.0.5:8443".into());
        let r = route(url.clone(), Some("http://a:8000")).unwrap();
        assert!(!r.via_peer);
        assert_eq!(r.dial, url);
        // A handle that cannot be forwarded to is a clear error.
        for (bad, why) in [
            ("http://b:8000/edge", "a path"),
            ("https://b.example?x=1", "a path"),
            ("ftp://b", "scheme"),
            ("http://user@b:8000", "user info"),
        ] {
            let e = route(tunnel(bad), Some("http://a:8000")).unwrap_err();
            assert_eq!((e.status, e.code.as_str()), (502, "bad_endpoint"), "{bad}");
            assert!(e.message.contains(why), "{bad}: {}", e.message);
            assert!(e.message.contains(&host.to_string()), "{}", e.message);
        }
    }

    #[test]
    fn base_paths_are_checked_before_anything_is_sliced() {
        let id = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
        assert!(project_of_path(&format!("/{id}/exec")).is_ok());
        assert!(project_of_path(&format!("/{id}")).is_ok());
        // Dots inside names, and "..." are ordinary segments.
        assert!(project_of_path(&format!("/{id}/files/a..b/.hidden/...")).is_ok());
        assert!(project_of_path(&format!("/{id}/files/%2e%2e%2e/%41")).is_ok());
        for (bad, why) in [
            (
                "/6ba7b810-9dad-41d1-80b4-00c04fd430c/exec",
                "expected 36 characters",
            ),
            (&format!("/{id}0/exec"), "expected 36 characters"),
            (&format!("/{}/exec", id.to_uppercase()), "lowercase hex"),
            (&format!("/{id}/../other"), "'..'"),
            (&format!("/{id}/./other"), "'..'"),
            (&format!("/{id}/x/%2e%2E"), "'..'"),
            (&format!("/{id}/.%2e/y"), "'..'"),
            (&format!("/{id}/%2E"), "'..'"),
            ("/../x", "'..'"),
            (&format!("/{id}/files/a%2Fb"), "percent-encoded slashes"),
            (&format!("/{id}/files/a%5cb"), "percent-encoded slashes"),
            ("/", "must start with"),
            ("", "must start with"),
            ("/é/x", "first path segment"),
        ] {
            let e = project_of_path(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
