//! [`MasterLink`]: the host's side of the control plane.
//!
//! * **Registration** with the host key and, the first time, a one-time
//!   bootstrap token; later registrations are signed with the host key.
//! * **Keepalives** at the interval the master asks for (it already adds
//!   jitter), renewing the host's lease.
//! * **The push channel**: one WebSocket the host dials (so hosts behind NAT
//!   work the same), carrying ACL changes, revocations, signing keys and
//!   start/stop commands, applied to the [`AclCache`] and handed to
//!   [`HostEvents`] as they arrive.
//! * **ACL lookups** when the cache needs a fresh answer, and **activity
//!   reports**.
//! * [`MasterLink::run`] keeps all of it going: reconnects with exponential
//!   backoff and jitter, and tells the ACL cache when the master link is up
//!   or down so the offline grace is counted from the right moment.
//!
//! Every control call is signed with the host key (see
//! `cocalc_auth::host_auth`).

use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::host_auth::sign_request;
use cocalc_auth::{paserk, AclCache, KeySet};
use cocalc_core::wire::{
    ActivityReport, HeldProject, KeepaliveRequest, LeaseGrant, ProjectActivity, PushFrame,
    PushMessage, RegisterHostRequest,
};
use cocalc_core::{
    ApiError, Capacity, Dialer, Generation, Health, HostEndpoint, HostId, Load, Permission,
    ProjectId, Region, SharedClock, Timestamp, UserId,
};
use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use serde::Deserialize;

/// Hooks the link calls when the master says something. Every hook has a
/// default that does nothing.
pub trait HostEvents: Send + Sync {
    /// The master's signing keys changed (PASERK `k4.public`, newest first).
    fn signing_keys(&self, keys: &KeySet) {
        let _ = keys;
    }
    /// The master asks to start a project at a generation.
    fn start(&self, project: ProjectId, generation: Generation) {
        let _ = (project, generation);
    }
    /// The master asks to stop a project.
    fn stop(&self, project: ProjectId) {
        let _ = project;
    }
    /// The project was placed on another host at `generation`: older
    /// generations are to be refused from now on, and the project stopped.
    fn fence(&self, project: ProjectId, generation: Generation) {
        let _ = (project, generation);
    }
    /// The projects this host knows, each with the newest generation it
    /// has seen; reported to the master each time the push channel opens
    /// ([`HostMessage::Holding`](cocalc_core::wire::HostMessage::Holding)),
    /// which answers with a fence for every one placed elsewhere since.
    fn held(&self) -> Vec<(ProjectId, Generation)> {
        Vec::new()
    }
}

/// [`HostEvents`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoEvents;
impl HostEvents for NoEvents {}

/// Why a call to the master failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The master could not be reached; retry later.
    #[error("master unreachable: {0}")]
    Unreachable(String),
    /// The master refused the call.
    #[error("master refused: {} ({})", .0.message, .0.code)]
    Refused(ApiError),
    /// The master answered something this host does not understand.
    #[error("unexpected answer from the master: {0}")]
    Protocol(String),
}

impl LinkError {
    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LinkError::Unreachable(_) => true,
            LinkError::Refused(e) => e.status >= 500,
            LinkError::Protocol(_) => false,
        }
    }
}

/// Who this host is, to the master.
#[derive(Clone)]
pub struct LinkConfig {
    /// The master's base URL (`http://127.0.0.1:8080`).
    pub master_url: String,
    /// This host's id.
    pub host: HostId,
    /// This host's key (its public half is registered with the master).
    pub key: SigningKey,
    /// One-time bootstrap token for the first registration.
    pub bootstrap_token: Option<String>,
    /// Region.
    pub region: Region,
    /// How users and the proxy reach this host (at first: a hidden host
    /// whose tunnel moves to another proxy changes it with
    /// [`MasterLink::set_endpoint`]).
    pub endpoint: HostEndpoint,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("master_url", &self.master_url)
            .field("host", &self.host)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What the host reports about itself on each keepalive.
pub trait HostStatus: Send + Sync {
    /// Health, capacity and load now.
    fn status(&self) -> (Health, Capacity, Load);
}

impl<F: Fn() -> (Health, Capacity, Load) + Send + Sync> HostStatus for F {
    fn status(&self) -> (Health, Capacity, Load) {
        self()
    }
}

/// Answer of the master's ACL lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct AclAnswer {
    /// The user's permission, `None` for no access.
    pub permission: Option<Permission>,
    /// The user's revocation cutoff.
    pub not_before: Option<Timestamp>,
}

/// How the link's requests reach the master.
enum Wire {
    /// reqwest over TCP, with TLS for an `https` master (the daemon's).
    Http(reqwest::Client),
    /// Plain HTTP/1.1 over connections from a [`Dialer`], one per call
    /// (a network simulator's).
    Dialed(Arc<dyn Dialer>),
}

/// The time one control call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The host's connection to its master.
pub struct MasterLink {
    cfg: LinkConfig,
    wire: Wire,
    clock: SharedClock,
    acl: Arc<AclCache>,
    events: Arc<dyn HostEvents>,
    /// Outgoing messages on the push channel while it is connected.
    push_tx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
    /// When the master wants the next keepalive (from the last grant).
    next_keepalive_ms: std::sync::atomic::AtomicU64,
    /// When the last lease arrived (ms since the epoch, by the link's clock).
    last_lease_ms: std::sync::atomic::AtomicI64,
    /// Wakes the keepalive loop early when the host's status changed.
    status_changed: tokio::sync::Notify,
    /// Closes the push channel: beats went out on it and no lease came
    /// back, so it is open at this end only (a cut that sent no reset).
    push_reset: tokio::sync::Notify,
    /// When the push channel last opened (ms, by the link's clock): a
    /// channel gets one interval to bring a lease before it counts as dead.
    push_opened_ms: std::sync::atomic::AtomicI64,
    /// How users and proxies reach this host now.
    endpoint: std::sync::Mutex<HostEndpoint>,
    /// The endpoint changed since the master was last told it.
    endpoint_changed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MasterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterLink")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Turns the master's published keys into a verification key set.
pub fn keyset_from_paserks(keys: &[String]) -> Result<KeySet, LinkError> {
    let mut set = KeySet::new();
    // Newest first on the wire; creation order is what KeySet sorts by.
    for (i, k) in keys.iter().rev().enumerate() {
        let pk = paserk::decode_public(k)
            .map_err(|e| LinkError::Protocol(format!("signing key {k:?}: {e}")))?;
        set.insert_public(pk, Timestamp(i as i64 + 1));
    }
    Ok(set)
}

impl MasterLink {
    /// A link; nothing is sent until a method is called.
    pub fn new(
        cfg: LinkConfig,
        clock: SharedClock,
        acl: Arc<AclCache>,
        events: Arc<dyn HostEvents>,
    ) -> Self {
        let http = cocalc_client::http_client_builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            .build()
            .unwrap_or_default();
        MasterLink {
            endpoint: std::sync::Mutex::new(cfg.endpoint.clone()),
            endpoint_changed: std::sync::atomic::AtomicBool::new(false),
            cfg,
            wire: Wire::Http(http),
            clock,
            acl,
            events,
            push_tx: std::sync::Mutex::new(None),
            next_keepalive_ms: std::sync::atomic::AtomicU64::new(5_000),
            last_lease_ms: std::sync::atomic::AtomicI64::new(0),
            status_changed: tokio::sync::Notify::new(),
            push_reset: tokio::sync::Notify::new(),
            push_opened_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The same link, reaching the master through `dialer` instead of
    /// TCP: plain HTTP/1.1 and the push channel's WebSocket on a fresh
    /// connection per call, the host name taken from the configured
    /// `master_url`. Everything above the bytes (signatures, retries,
    /// backoff, the ACL cache's link state) is unchanged. This is how a
    /// deterministic network simulator runs the real link.
    pub fn with_dialer(mut self, dialer: Arc<dyn Dialer>) -> Self {
        self.wire = Wire::Dialed(dialer);
        self
    }

    /// This host's id.
    pub fn host(&self) -> HostId {
        self.cfg.host
    }

    /// How users and proxies reach this host, as the master is (or is
    /// about to be) told.
    pub fn endpoint(&self) -> HostEndpoint {
        self.endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The host is now reached at `endpoint` (a hidden host's tunnel
    /// landed at another proxy): [`MasterLink::run`] registers again with
    /// it at once, retrying until the master has it. No-op when it is the
    /// endpoint already.
    pub fn set_endpoint(&self, endpoint: HostEndpoint) {
        let mut e = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if *e != endpoint {
            tracing::info!(from = ?*e, to = ?endpoint, "the host's endpoint moved; telling the master");
            *e = endpoint;
            self.endpoint_changed
                .store(true, std::sync::atomic::Ordering::Release);
            self.status_changed.notify_one();
        }
    }

    /// When the master last granted a lease (registration or keepalive),
    /// by the link's clock; `None` before the first.
    pub fn last_lease(&self) -> Option<Timestamp> {
        let ms = self
            .last_lease_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (ms > 0).then_some(Timestamp(ms))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, LinkError> {
        let body = body.unwrap_or_default();
        let signed = sign_request(
            &self.cfg.key,
            self.cfg.host,
            method.as_str(),
            path,
            self.clock.now(),
            &body,
        );
        let (status, bytes) = match &self.wire {
            Wire::Http(http) => {
                let mut req = http
                    .request(method.clone(), format!("{}{path}", self.cfg.master_url))
                    .header("content-type", "application/json");
                for (k, v) in signed {
                    req = req.header(k, v);
                }
                let resp = req
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| LinkError::Unreachable(e.to_string()))?;
                let status = resp.status();
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| LinkError::Unreachable(e.to_string()))?;
                (status, bytes)
            }
            Wire::Dialed(dialer) => tokio::time::timeout(
                CALL_TIMEOUT,
                self.call_dialed(dialer.as_ref(), method, path, signed, body),
            )
            .await
            .map_err(|_| LinkError::Unreachable(format!("no answer in {CALL_TIMEOUT:?}")))??,
        };
        if !status.is_success() {
            let err = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                ApiError::new(
                    status.as_u16(),
                    "http_error",
                    String::from_utf8_lossy(&bytes),
                )
            });
            return Err(LinkError::Refused(err));
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| LinkError::Protocol(e.to_string()))
    }

    /// One request on a fresh dialed connection: the status and the body.
    async fn call_dialed(
        &self,
        dialer: &dyn Dialer,
        method: reqwest::Method,
        path: &str,
        signed: [(&'static str, String); 3],
        body: Vec<u8>,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), LinkError> {
        use http_body_util::BodyExt;
        let unreachable = |e: &dyn std::fmt::Display| LinkError::Unreachable(e.to_string());
        let authority = cocalc_core::parse_host_url(&self.cfg.master_url)
            .map_err(|e| LinkError::Protocol(format!("master_url: {e}")))?;
        let conn = dialer.dial().await.map_err(|e| unreachable(&e))?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
                .await
                .map_err(|e| unreachable(&e))?;
        let driver = tokio::spawn(connection);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("content-type", "application/json");
        for (k, v) in signed {
            req = req.header(k, v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let answer = async {
            let resp = send.send_request(req).await.map_err(|e| unreachable(&e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(&e))?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        driver.abort();
        answer
    }

    fn apply_grant(&self, grant: &LeaseGrant) -> Result<(), LinkError> {
        self.acl.master_up();
        self.next_keepalive_ms.store(
            grant.next_keepalive_ms.max(100),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.last_lease_ms.store(
            self.clock.now().as_millis(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if !grant.signing_keys.is_empty() {
            self.events
                .signing_keys(&keyset_from_paserks(&grant.signing_keys)?);
        }
        Ok(())
    }

    /// Registers (or re-registers) this host.
    pub async fn register(&self, capacity: Capacity) -> Result<LeaseGrant, LinkError> {
        let req = RegisterHostRequest::new(
            self.cfg.host,
            paserk::encode_public(&self.cfg.key.verifying_key()),
            self.cfg.bootstrap_token.clone(),
            self.cfg.region.clone(),
            self.endpoint(),
            capacity,
        );
        let body = serde_json::to_vec(&req).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let grant: LeaseGrant = self
            .call(reqwest::Method::POST, "/v1/hosts/register", Some(body))
            .await?;
        self.apply_grant(&grant)?;
        Ok(grant)
    }

    /// Renews the lease.
    pub async fn keepalive(
        &self,
        health: Health,
        capacity: Capacity,
        load: Load,
    ) -> Result<LeaseGrant, LinkError> {
        let req = KeepaliveRequest::new(self.cfg.host, health, capacity, load);
        let body = serde_json::to_vec(&req).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let path = format!("/v1/hosts/{}/keepalive", self.cfg.host);
        let grant: LeaseGrant = self.call(reqwest::Method::POST, &path, Some(body)).await?;
        self.apply_grant(&grant)?;
        Ok(grant)
    }

    /// Asks the master what `user` may do on `project` and stores the
    /// answer (and the user's revocation cutoff) in the ACL cache.
    pub async fn fetch_acl(
        &self,
        project: ProjectId,
        user: UserId,
    ) -> Result<AclAnswer, LinkError> {
        let path = format!(
            "/v1/hosts/{}/acl?project={project}&user={user}",
            self.cfg.host
        );
        let a: AclAnswer = self.call(reqwest::Method::GET, &path, None).await?;
        self.acl.set(project, user, a.permission);
        if let Some(t) = a.not_before {
            self.acl.revoke_user(user, t);
        }
        self.acl.master_up();
        Ok(a)
    }

    /// Reports when projects were last used.
    pub async fn report_activity(&self, projects: Vec<ProjectActivity>) -> Result<(), LinkError> {
        let req = ActivityReport::new(self.cfg.host, projects);
        let body = serde_json::to_vec(&req).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let path = format!("/v1/hosts/{}/activity", self.cfg.host);
        let _: serde_json::Value = self.call(reqwest::Method::POST, &path, Some(body)).await?;
        Ok(())
    }

    /// Applies one push message to the ACL cache and the event hooks.
    pub fn apply(&self, message: &PushMessage) {
        match message {
            PushMessage::Acl {
                project,
                user,
                permission,
            } => self.acl.set(*project, *user, *permission),
            PushMessage::RevokeUser { user, not_before } => {
                self.acl.revoke_user(*user, *not_before)
            }
            PushMessage::RevokeToken { token_id, expires } => {
                self.acl.revoke_token(token_id.clone(), *expires)
            }
            PushMessage::Start {
                project,
                generation,
            } => self.events.start(*project, *generation),
            PushMessage::Stop { project } => self.events.stop(*project),
            PushMessage::Fence {
                project,
                generation,
            } => self.events.fence(*project, *generation),
            PushMessage::Lease { grant } => {
                if let Err(e) = self.apply_grant(grant) {
                    tracing::warn!(error = %e, "ignoring a lease from the push channel");
                }
            }
            PushMessage::SigningKeys { keys } => match keyset_from_paserks(keys) {
                Ok(set) => self.events.signing_keys(&set),
                Err(e) => tracing::warn!(error = %e, "ignoring pushed signing keys"),
            },
            other => tracing::warn!(?other, "unknown push message ignored"),
        }
    }

    /// Connects the push channel and applies frames until it closes. Returns
    /// `Ok` when the master closed it, an error when it could not connect.
    /// `connected` is called once the channel is open.
    pub async fn push_channel(&self, connected: impl FnOnce()) -> Result<(), LinkError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let path = format!("/v1/hosts/{}/push", self.cfg.host);
        let ws_url = format!(
            "{}{path}",
            self.cfg
                .master_url
                .replacen("http://", "ws://", 1)
                .replacen("https://", "wss://", 1)
        );
        let mut req = ws_url
            .into_client_request()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        for (k, v) in sign_request(
            &self.cfg.key,
            self.cfg.host,
            "GET",
            &path,
            self.clock.now(),
            b"",
        ) {
            let v = v
                .parse()
                .map_err(|_| LinkError::Protocol("header value".into()))?;
            req.headers_mut().insert(k, v);
        }
        match &self.wire {
            Wire::Http(_) => {
                let (ws, _) = tokio_tungstenite::connect_async(req)
                    .await
                    .map_err(|e| LinkError::Unreachable(format!("push channel: {e}")))?;
                self.drive_push(ws, connected).await
            }
            Wire::Dialed(dialer) => {
                let conn = dialer
                    .dial()
                    .await
                    .map_err(|e| LinkError::Unreachable(format!("push channel: {e}")))?;
                let (ws, _) =
                    tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::client_async(req, conn))
                        .await
                        .map_err(|_| LinkError::Unreachable("push channel: no answer".into()))?
                        .map_err(|e| LinkError::Unreachable(format!("push channel: {e}")))?;
                self.drive_push(ws, connected).await
            }
        }
    }

    /// Applies frames from an open push channel and sends what the link
    /// queues on it, until either side closes it.
    async fn drive_push<S>(
        &self,
        mut ws: tokio_tungstenite::WebSocketStream<S>,
        connected: impl FnOnce(),
    ) -> Result<(), LinkError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.acl.master_up();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let held: Vec<HeldProject> = self
            .events
            .held()
            .into_iter()
            .map(|(project, generation)| HeldProject {
                project,
                generation,
            })
            .collect();
        if !held.is_empty() {
            let msg = cocalc_core::wire::HostMessage::Holding { projects: held };
            match serde_json::to_string(&msg) {
                Ok(text) => {
                    let _ = tx.send(text);
                }
                Err(e) => tracing::warn!(error = %e, "encoding the held projects failed"),
            }
        }
        *self.push_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.push_opened_ms.store(
            self.clock.now().as_millis(),
            std::sync::atomic::Ordering::Relaxed,
        );
        connected();
        let result = loop {
            tokio::select! {
                () = self.push_reset.notified() => {
                    tracing::warn!("no lease came back on the push channel; opening it again");
                    break Ok(());
                }
                out = rx.recv() => {
                    let Some(text) = out else { break Ok(()) };
                    if let Err(e) = futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::Text(text.into())).await {
                        break Err(LinkError::Unreachable(format!("push channel: {e}")));
                    }
                }
                msg = ws.next() => {
                    let msg = match msg {
                        None => break Ok(()),
                        Some(Ok(m)) => m,
                        Some(Err(e)) => break Err(LinkError::Unreachable(format!("push channel: {e}"))),
                    };
                    if let Ok(text) = msg.to_text() {
                        if text.is_empty() {
                            continue;
                        }
                        match serde_json::from_str::<PushFrame>(text) {
                            Ok(frame) => self.apply(&frame.message),
                            Err(e) => tracing::warn!(error = %e, "undecodable push frame ignored"),
                        }
                    }
                }
            }
        };
        *self.push_tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
        result
    }

    /// Sends a keepalive as a frame on the push channel, if it is open (no
    /// HTTP request, no per-beat signature; the master answers with a
    /// lease frame). `false` if the channel is not open.
    pub fn keepalive_on_push(&self, health: Health, capacity: Capacity, load: Load) -> bool {
        let msg = cocalc_core::wire::HostMessage::Keepalive {
            keepalive: KeepaliveRequest::new(self.cfg.host, health, capacity, load),
        };
        let Ok(text) = serde_json::to_string(&msg) else {
            return false;
        };
        self.push_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.send(text).is_ok())
    }

    /// Tells the link that the host's health changed (a hidden host's
    /// tunnel came up or went down): the next keepalive goes out now, not
    /// at the end of the interval, so placement sees it at once. A change
    /// while a keepalive is in flight is not lost.
    pub fn status_changed(&self) {
        self.status_changed.notify_one();
    }

    /// No lease came for a whole keepalive interval or more.
    fn lease_is_late(&self) -> bool {
        let interval = self
            .next_keepalive_ms
            .load(std::sync::atomic::Ordering::Relaxed) as i64;
        let last = self
            .last_lease_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        self.clock.now().as_millis() - last >= interval
    }

    /// Sleeps `d`, or less if the host's status changes meanwhile.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.status_changed.notified() => {}
        }
    }

    /// Keeps the link alive until `shutdown` resolves: registers (retrying),
    /// sends keepalives when the master asks, and keeps the push channel
    /// open, reconnecting with backoff and jitter. Marks the ACL cache's
    /// master link down on the first failure and up on the next success.
    pub async fn run(
        self: Arc<Self>,
        status: Arc<dyn HostStatus>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        // The push channel is opened once the master knows this host: tried
        // before, it fails, and the failure marked the ACL cache's link down
        // right after the registration had marked it up.
        let (registered_tx, mut registered_rx) = tokio::sync::watch::channel(false);
        let push = {
            let me = self.clone();
            let status = status.clone();
            async move {
                let _ = registered_rx.wait_for(|r| *r).await;
                let mut backoff = Backoff::new(self_seed(&me.cfg.host));
                loop {
                    // A channel that opens again after a cut, with no lease
                    // for an interval or more, carries a beat at once, since
                    // the lease may have run out at the master, and wakes
                    // the control loop, which may be waiting out its backoff
                    // (up to 30 s) or a call lost in the cut, and would let
                    // the new lease lapse. (Right after a registration the
                    // lease is fresh, and the first beat waits its turn.)
                    let beat = || {
                        if me.lease_is_late() {
                            let (health, capacity, load) = status.status();
                            me.keepalive_on_push(health, capacity, load);
                            me.status_changed();
                        }
                    };
                    match me.push_channel(beat).await {
                        Ok(()) => backoff.reset(),
                        Err(e) => {
                            tracing::warn!(error = %e, "push channel failed");
                            me.acl.master_down();
                        }
                    }
                    tokio::time::sleep(backoff.next_wait()).await;
                }
            }
        };
        let control = async {
            let mut backoff = Backoff::new(self_seed(&self.cfg.host) ^ 1);
            let mut registered = false;
            loop {
                let (health, capacity, load) = status.status();
                // Beats go on the push channel while leases keep coming back
                // on it; if none came for two intervals, fall back to HTTP
                // (which also notices a master that is gone), a beat before
                // the lease (three intervals) runs out, and open the channel
                // again: it may be dead at the far end without a word (a
                // network cut), and beats on it would go nowhere.
                let interval =
                    self.next_keepalive_ms
                        .load(std::sync::atomic::Ordering::Relaxed) as i64;
                let last = self
                    .last_lease_ms
                    .load(std::sync::atomic::Ordering::Relaxed);
                let leases_flow = self.clock.now().as_millis() - last < 2 * interval;
                let opened = self
                    .push_opened_ms
                    .load(std::sync::atomic::Ordering::Relaxed);
                if registered && !leases_flow && self.clock.now().as_millis() - opened >= interval {
                    self.push_reset.notify_waiters();
                }
                // A moved endpoint goes to the master by registering again
                // (signed with the host key: no bootstrap token is used).
                let moved = self
                    .endpoint_changed
                    .swap(false, std::sync::atomic::Ordering::AcqRel);
                if registered
                    && !moved
                    && leases_flow
                    && self.keepalive_on_push(health, capacity, load)
                {
                    // The lease comes back as a frame; wait as the last grant said.
                    let ms = self
                        .next_keepalive_ms
                        .load(std::sync::atomic::Ordering::Relaxed);
                    self.pause(Duration::from_millis(ms)).await;
                    continue;
                }
                let result = if registered && !moved {
                    self.keepalive(health, capacity, load).await
                } else {
                    self.register(capacity).await
                };
                if moved && result.is_err() {
                    self.endpoint_changed
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                let wait = match result {
                    Ok(grant) => {
                        registered = true;
                        registered_tx.send_replace(true);
                        backoff.reset();
                        Duration::from_millis(grant.next_keepalive_ms.max(100))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "master call failed");
                        if matches!(&e, LinkError::Refused(a) if a.status == 404) {
                            // The master forgot us (new database): register again.
                            registered = false;
                        }
                        self.acl.master_down();
                        backoff.next_wait()
                    }
                };
                self.pause(wait).await;
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = push => {}
            _ = control => {}
        }
    }
}

#[async_trait::async_trait]
impl cocalc_auth::AclRefresher for MasterLink {
    async fn refresh(
        &self,
        project: ProjectId,
        user: UserId,
    ) -> Result<(), cocalc_auth::RefreshError> {
        match self.fetch_acl(project, user).await {
            Ok(_) => Ok(()),
            // The master answered, with a refusal (the project is placed
            // on another host): not a sign that it is away.
            Err(LinkError::Refused(e)) if (400..500).contains(&e.status) && e.status != 401 => {
                Err(cocalc_auth::RefreshError::Refused(e.message))
            }
            Err(e) => Err(cocalc_auth::RefreshError::Unreachable(e.to_string())),
        }
    }
}

fn self_seed(host: &HostId) -> u64 {
    u64::from_le_bytes(host.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Exponential backoff from 200 ms to 30 s with full jitter, from a seed.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    state: u64,
}

impl Backoff {
    /// A backoff whose jitter sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Backoff {
            attempt: 0,
            state: seed | 1,
        }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait: uniform in `[cap/2, cap]`, cap doubling from 200 ms.
    pub fn next_wait(&mut self) -> Duration {
        let cap_ms = (200u64 << self.attempt.min(8)).min(30_000);
        self.attempt += 1;
        // xorshift64
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        Duration::from_millis(cap_ms / 2 + self.state % (cap_ms / 2 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let mut b = Backoff::new(7);
        let waits: Vec<u64> = (0..12).map(|_| b.next_wait().as_millis() as u64).collect();
        assert!((100..=200).contains(&waits[0]), "{waits:?}");
        assert!((200..=400).contains(&waits[1]), "{waits:?}");
        assert!(waits[11] <= 30_000 && waits[11] >= 15_000, "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(200));
    }

    #[test]
    fn keysets_from_the_wire_keep_newest_last() {
        let a = KeySet::generate(Timestamp(1)).unwrap();
        let mut b = a.clone();
        let newest = b.rotate(Timestamp(2)).unwrap();
        let set = keyset_from_paserks(&b.public_paserks()).unwrap();
        assert_eq!(set.keys().len(), 2);
        assert_eq!(set.keys()[1].kid, newest);
        assert!(keyset_from_paserks(&["k4.public.bad".into()]).is_err());
    }
}
