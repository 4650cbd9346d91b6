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
//!    host moving its tunnel); that entry is dropped at the first failed
//!    connection and otherwise lives at most the TTL.
//! 4. **Rate limits** (before any token is verified): per client address
//!    and per project, answered with 429 and `Retry-After`, so one noisy
//!    project or client does not starve the others.
//! 5. **Forward.** Bodies stream both ways; WebSocket upgrades pass
//!    through; `Host` becomes the host's address and the original goes in
//!    `X-Forwarded-Host`, with `X-Forwarded-For` and `X-Forwarded-Proto`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use cocalc_auth::{paserk, AuditSink, KeySet, TracingAuditSink, Verifier};
use cocalc_client::MasterClient;
use cocalc_core::{
    ApiError, AuditOutcome, AuditRecord, HostEndpoint, HostId, ProjectId, SharedClock, Timestamp,
    Transport,
};

/// Ingress tunables.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// The master's base URL.
    pub master_url: String,
    /// API key the ingress uses to look hosts up.
    pub api_key: String,
    /// How long a host's endpoint is cached (default 10 s).
    pub route_ttl: Duration,
    /// Requests per second allowed per project (default 200), with the
    /// same number as burst.
    pub project_rps: u32,
    /// Requests per second allowed per client address (default 100).
    pub client_rps: u32,
}

impl IngressConfig {
    /// Defaults for `master_url` with `api_key`.
    pub fn new(master_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        IngressConfig {
            master_url: master_url.into(),
            api_key: api_key.into(),
            route_ttl: Duration::from_secs(10),
            project_rps: 200,
            client_rps: 100,
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
    /// Hosts that could not be reached.
    pub unreachable: AtomicU64,
    /// Requests over a rate limit.
    pub rate_limited: AtomicU64,
}

/// The ingress service.
pub struct Ingress {
    audit: Arc<dyn AuditSink>,
    clock: SharedClock,
    cfg: IngressConfig,
    master: MasterClient,
    verifier: Verifier,
    transport: Arc<dyn Transport>,
    routes: Mutex<HashMap<HostId, (HostEndpoint, Instant)>>,
    refusals: Refusals,
    per_project: governor::DefaultKeyedRateLimiter<ProjectId>,
    per_client: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    pool: cocalc_client::relay::Pool<HostId, Body>,
}

fn quota(rps: u32) -> governor::Quota {
    let n = std::num::NonZeroU32::new(rps.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    governor::Quota::per_second(n).allow_burst(n)
}

/// A 429 saying when to retry.
fn too_many(what: &str, wait: Duration) -> Response {
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

fn fail(status: u16, code: &str, message: impl Into<String>) -> Response {
    let e = ApiError::new(status, code, message);
    let s = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (s, Json(e)).into_response()
}

fn api(e: &ApiError) -> Response {
    let s = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (s, Json(e.clone())).into_response()
}

/// Checks the base path; returns the project or why the path is refused.
pub fn project_of_path(path: &str) -> Result<ProjectId, String> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err("percent-encoded slashes are not allowed in the path".into());
    }
    if path
        .split('/')
        .any(|s| s == ".." || s == "." || s.eq_ignore_ascii_case("%2e%2e"))
    {
        return Err("'.' and '..' segments are not allowed in the path".into());
    }
    let first = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .next()
        .unwrap_or("");
    if first.is_empty() {
        return Err("the path must start with /<project id>/".into());
    }
    first
        .parse::<ProjectId>()
        .map_err(|e| format!("first path segment: {e}"))
}

fn token_of(req: &Request, project: ProjectId) -> Option<String> {
    let h = req.headers();
    if let Some(t) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    if let Some(q) = req.uri().query() {
        if let Some(t) = q.split('&').find_map(|p| p.strip_prefix("token=")) {
            return Some(t.to_string());
        }
    }
    let name = cocalc_core::wire::token_cookie_name(project);
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

impl Ingress {
    /// An ingress; fetches the master's signing keys once before serving.
    pub async fn new(
        cfg: IngressConfig,
        transport: Arc<dyn Transport>,
        clock: SharedClock,
    ) -> Result<Arc<Self>, ApiError> {
        Self::with_audit(cfg, transport, clock, Arc::new(TracingAuditSink)).await
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
        let master = MasterClient::new(cfg.master_url.clone(), cfg.api_key.clone());
        let ing = Ingress {
            audit,
            clock: clock.clone(),
            per_project: governor::RateLimiter::keyed(quota(cfg.project_rps)),
            per_client: governor::RateLimiter::keyed(quota(cfg.client_rps)),
            pool: cocalc_client::relay::Pool::new(POOL_PER_HOST),
            verifier: Verifier::for_ingress(KeySet::new(), clock),
            master,
            cfg,
            transport,
            routes: Mutex::new(HashMap::new()),
            refusals: Refusals::default(),
        };
        ing.refresh_keys().await?;
        Ok(Arc::new(ing))
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
        peer: SocketAddr,
        detail: &str,
    ) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut r = AuditRecord::new(
            self.clock.now(),
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
        let keys = self.master.signing_keys().await?;
        let mut set = KeySet::new();
        for (i, k) in keys.iter().rev().enumerate() {
            let pk = paserk::decode_public(k)
                .map_err(|e| ApiError::new(502, "bad_key", format!("master key {k:?}: {e}")))?;
            set.insert_public(pk, Timestamp(i as i64 + 1));
        }
        self.verifier.set_keys(set);
        Ok(())
    }

    async fn route(&self, host: HostId) -> Result<HostEndpoint, ApiError> {
        if let Some((ep, at)) = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
        {
            if at.elapsed() < self.cfg.route_ttl {
                return Ok(ep.clone());
            }
        }
        let ep = self.master.host_endpoint(host).await?;
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host, (ep.clone(), Instant::now()));
        Ok(ep)
    }

    /// The master client the ingress acts with.
    pub fn master(&self) -> &MasterClient {
        &self.master
    }

    /// A fresh connection to `host` (route from the master, then the
    /// transport), with the authority to send as `Host`. Used by the SSH
    /// ingress; goes through the same [`Transport`] as HTTP, so hosts
    /// reached by other means (tunnels) work the same. A failed connect
    /// forgets the route.
    pub async fn connect_host(
        &self,
        host: HostId,
    ) -> Result<(cocalc_core::BoxedConnection, String), ApiError> {
        let endpoint = self.route(host).await?;
        let authority = match &endpoint {
            HostEndpoint::Url(u) => crate::parse_host_url(u).map_err(|e| ApiError::from(&e))?,
            _ => host.to_string(),
        };
        match self.transport.connect(host, &endpoint).await {
            Ok(c) => Ok((c, authority)),
            Err(e) => {
                self.refusals.unreachable.fetch_add(1, Ordering::Relaxed);
                self.forget_route(host);
                Err(ApiError::from(&e))
            }
        }
    }

    /// Forgets a cached route and the pooled connections to that host (the
    /// master's push of a project move, or a host that failed).
    pub fn forget_route(&self, host: HostId) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&host);
        self.pool.forget(|h| *h == host);
    }

    /// Drops rate-limit state of clients and projects not seen lately, so
    /// the limiters' memory stays bounded (call periodically).
    pub fn prune_limits(&self) {
        self.per_client.retain_recent();
        self.per_project.retain_recent();
    }

    /// The ingress as an axum router (serve it with connect info:
    /// `into_make_service_with_connect_info::<SocketAddr>()`).
    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

async fn handle(
    State(ing): State<Arc<Ingress>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    use governor::clock::{Clock, DefaultClock};
    if let Err(not_until) = ing.per_client.check_key(&peer.ip()) {
        ing.refuse(
            &ing.refusals.rate_limited,
            "rate_limited",
            None,
            peer,
            "per-client limit",
        );
        return too_many(
            "client",
            not_until.wait_time_from(DefaultClock::default().now()),
        );
    }
    let project = match project_of_path(req.uri().path()) {
        Ok(p) => p,
        Err(why) => {
            ing.refuse(&ing.refusals.bad_path, "bad_path", None, peer, &why);
            return fail(400, "bad_path", why);
        }
    };
    if let Err(not_until) = ing.per_project.check_key(&project) {
        ing.refuse(
            &ing.refusals.rate_limited,
            "rate_limited",
            Some(project),
            peer,
            "per-project limit",
        );
        return too_many(
            "project",
            not_until.wait_time_from(DefaultClock::default().now()),
        );
    }
    let Some(token) = token_of(&req, project) else {
        ing.refuse(
            &ing.refusals.bad_token,
            "token_missing",
            Some(project),
            peer,
            "no connect token",
        );
        return fail(
            401,
            "token_missing",
            "no connect token (Authorization header, ?token= or cookie)",
        );
    };
    let verified = ing
        .verifier
        .verify(&token)
        .and_then(|c| c.require_project(project).map(|()| c));
    let claims = match verified {
        Ok(c) => c,
        Err(e) => {
            ing.refuse(
                &ing.refusals.bad_token,
                e.code(),
                Some(project),
                peer,
                &e.to_string(),
            );
            return api(&ApiError::from(&e));
        }
    };
    let endpoint = match ing.route(claims.host).await {
        Ok(ep) => ep,
        Err(e) => return api(&e),
    };
    match forward(&ing, claims.host, &endpoint, peer, req).await {
        Ok(r) => r,
        Err(e) => {
            ing.refuse(
                &ing.refusals.unreachable,
                &e.code,
                Some(project),
                peer,
                &e.message,
            );
            ing.forget_route(claims.host);
            api(&e)
        }
    }
}

async fn forward(
    ing: &Ingress,
    host: HostId,
    endpoint: &HostEndpoint,
    peer: SocketAddr,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let authority = match endpoint {
        HostEndpoint::Url(u) => crate::parse_host_url(u).map_err(|e| ApiError::from(&e))?,
        _ => host.to_string(),
    };
    if let Some(orig) = parts.headers.get(header::HOST).cloned() {
        parts.headers.insert("x-forwarded-host", orig);
    }
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let failed = |e: hyper::Error| ApiError::new(502, "host_failed", format!("host {host}: {e}"));
    let req = axum::http::Request::from_parts(parts, body);
    if req.headers().contains_key(header::UPGRADE) {
        // Upgrades take the connection over: a fresh one, relayed both ways.
        let conn = ing
            .transport
            .connect(host, endpoint)
            .await
            .map_err(|e| ApiError::from(&e))?;
        let resp = cocalc_client::relay::relay(conn, req)
            .await
            .map_err(failed)?;
        return Ok(resp.map(Body::new));
    }
    // Plain requests reuse idle keep-alive connections to the host.
    let resp = ing
        .pool
        .send(host, req, || ing.transport.connect(host, endpoint))
        .await
        .map_err(|e| match e {
            cocalc_client::relay::PoolError::Connect(e) => ApiError::from(&e),
            cocalc_client::relay::PoolError::Http(e) => failed(e),
        })?;
    Ok(resp.map(Body::new))
}

/// Idle connections kept per host.
const POOL_PER_HOST: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_are_checked_before_anything_is_sliced() {
        let id = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
        assert!(project_of_path(&format!("/{id}/exec")).is_ok());
        assert!(project_of_path(&format!("/{id}")).is_ok());
        for (bad, why) in [
            (
                "/6ba7b810-9dad-41d1-80b4-00c04fd430c/exec",
                "expected 36 characters",
            ),
            (&format!("/{id}0/exec"), "expected 36 characters"),
            (&format!("/{}/exec", id.to_uppercase()), "lowercase hex"),
            (&format!("/{id}/../other"), "'..'"),
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
