//! The cap on connections one client address holds on a host's own
//! listener ([`HostConfig::client_connections`](crate::daemon::HostConfig)).
//!
//! Users reach a host directly, so one address could hold thousands of
//! connections — idle keep-alives, WebSockets, heads that never finish —
//! and take the host's file descriptors from everyone else. [`Admission`]
//! gives each accepted connection a place under a
//! [`ConnectionCap`]: the connection's services ([`Admitted`] around the
//! router, [`AdmittedLean`] around the lean port relay) keep it while the
//! connection is served, and a WebSocket keeps it until it closes (the
//! place rides in the upgrade request's extensions as a
//! [`HoldWhileUpgraded`], which the port relay and the terminal,
//! exec-stream and tcp handlers keep). A connection over the cap is
//! answered 429 `too_many_connections` (with `Retry-After: 1` and
//! `Connection: close`) at its first request, and closed; the refusal is
//! counted and, with [`Admission::with_audit`], an audit record. Connections
//! from `trusted_proxies` — the proxies in front, which carry many
//! clients — are not counted.
//!
//! With [`Admission::with_access_log`] the same services also log every
//! request they answer ([`cocalc_client::access_log`]), the client being
//! the one a trusted proxy names in `X-Forwarded-For`.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use cocalc_auth::AuditSink;
use cocalc_client::access_log::{AccessLog, BodySent, Logged as LoggedBody, Pending, Waiting};
use cocalc_client::conncap::{forwarded_client, in_nets, ConnectionCap};
use cocalc_client::lean::{LeanBody, LeanService};
use cocalc_client::relay::HoldWhileUpgraded;
use cocalc_core::{ApiError, AuditOutcome, AuditRecord, HostId, SharedClock};

/// Who may hold how many connections (see the module overview).
#[derive(Clone)]
pub struct Admission {
    cap: Arc<ConnectionCap>,
    trusted: Arc<[ipnet::IpNet]>,
    refused: Arc<AtomicU64>,
    audit: Option<(Arc<dyn AuditSink>, SharedClock)>,
    log: Option<Arc<HostLog>>,
}

/// The access log, this host's id for its lines, the clock that stamps
/// them, and the trusted proxies whose `X-Forwarded-For` names clients.
struct HostLog {
    log: Arc<AccessLog>,
    host: HostId,
    clock: SharedClock,
    trusted: Arc<[ipnet::IpNet]>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("cap", &self.cap)
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

/// What one connection was given: a place to hold (none when uncapped),
/// or a refusal naming the cap; and, with an access log, what its
/// requests are logged with.
#[derive(Clone)]
pub struct Ticket {
    hold: Option<HoldWhileUpgraded>,
    refused: Option<u32>,
    logged: Option<Logged>,
}

/// How a connection's requests are logged: the log, the peer, whether
/// it is TLS.
#[derive(Clone)]
struct Logged {
    log: Arc<HostLog>,
    peer: IpAddr,
    tls: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("hold", &self.hold)
            .field("refused", &self.refused)
            .field("logged", &self.logged.is_some())
            .finish()
    }
}

impl Admission {
    /// `limit` connections per address (0: no cap), not counting those
    /// from `trusted`.
    pub fn new(limit: u32, trusted: Vec<ipnet::IpNet>) -> Self {
        Admission {
            cap: ConnectionCap::new(limit),
            trusted: trusted.into(),
            refused: Arc::default(),
            audit: None,
            log: None,
        }
    }

    /// Also logs every request the connections' services answer to `log`
    /// (as answered by `host`), stamped by `clock`.
    pub fn with_access_log(mut self, log: AccessLog, host: HostId, clock: SharedClock) -> Self {
        self.log = Some(Arc::new(HostLog {
            log: Arc::new(log),
            host,
            clock,
            trusted: self.trusted.clone(),
        }));
        self
    }

    /// The access log, when there is one.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.log.as_ref().map(|l| &*l.log)
    }

    /// Also hands each refusal to `audit` (action `host_connection`,
    /// reason `too_many_connections`), stamped by `clock`.
    pub fn with_audit(mut self, audit: Arc<dyn AuditSink>, clock: SharedClock) -> Self {
        self.audit = Some((audit, clock));
        self
    }

    /// The ticket of a plain connection from `peer`.
    pub fn admit(&self, peer: IpAddr) -> Ticket {
        let logged = self.log.as_ref().map(|log| Logged {
            log: log.clone(),
            peer,
            tls: false,
        });
        if self.cap.limit() == 0 || in_nets(&self.trusted, peer) {
            return Ticket {
                hold: None,
                refused: None,
                logged,
            };
        }
        match self.cap.take(peer) {
            Some(slot) => Ticket {
                hold: Some(HoldWhileUpgraded(Arc::new(slot))),
                refused: None,
                logged,
            },
            None => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if let Some((audit, clock)) = &self.audit {
                    audit.record(AuditRecord::new(
                        clock.now(),
                        AuditOutcome::Refuse,
                        "host_connection",
                        "too_many_connections",
                        format!(
                            "client {peer}: this address holds {} connections already",
                            self.cap.limit()
                        ),
                    ));
                }
                Ticket {
                    hold: None,
                    refused: Some(self.cap.limit()),
                    logged,
                }
            }
        }
    }

    /// Addresses holding connections now, and the connections they hold.
    pub fn held(&self) -> (u64, u64) {
        self.cap.held()
    }

    /// Connections refused for being over the cap, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Ticket {
    /// This ticket for a connection over TLS (as its log lines say).
    pub fn over_tls(mut self) -> Self {
        if let Some(l) = &mut self.logged {
            l.tls = true;
        }
        self
    }

    /// What the access log keeps of `req` until it is answered (logged
    /// as 499 if the client goes away first); nothing without a log.
    fn pending<B>(&self, req: &Request<B>) -> Option<Waiting> {
        let l = self.logged.as_ref()?;
        let client = forwarded_client(l.peer, req.headers(), &l.log.trusted);
        let pending = Pending::new(req, client, l.tls, l.log.clock.now());
        let mut w = Waiting::new(pending, l.log.log.clone());
        w.routed(None, l.log.host);
        Some(w)
    }

    /// The refusal, as JSON with the headers that close the connection.
    fn refusal(limit: u32) -> (StatusCode, [(header::HeaderName, HeaderValue); 3], Bytes) {
        let e = ApiError::new(
            429,
            "too_many_connections",
            format!(
                "this address holds {limit} connections to the host already; close some \
                 (idle keep-alive connections, WebSockets) or retry in 1 s"
            ),
        );
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, HeaderValue::from_static("1")),
                (header::CONNECTION, HeaderValue::from_static("close")),
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
            ],
            Bytes::from(serde_json::to_vec(&e).unwrap_or_default()),
        )
    }
}

/// `r`, its body counted for the access log if [`Ticket::pending`] kept
/// the request (logged when the body has been sent).
fn logged(pending: Option<Waiting>, r: Response<Body>) -> Response<Body> {
    match pending {
        None => r,
        Some(w) => {
            let sent = w.answered(r.status());
            r.map(|b| Body::new(LoggedBody::new(b, Some(sent))))
        }
    }
}

/// Builds the response `parts` describe with `body`.
fn respond<B>(
    (status, headers, _): &(StatusCode, [(header::HeaderName, HeaderValue); 3], Bytes),
    body: B,
) -> Response<B> {
    let mut r = Response::new(body);
    *r.status_mut() = *status;
    for (k, v) in headers {
        r.headers_mut().insert(k.clone(), v.clone());
    }
    r
}

/// A connection's router service under its [`Ticket`].
#[derive(Debug, Clone)]
pub struct Admitted<S> {
    inner: S,
    ticket: Ticket,
}

impl<S> Admitted<S> {
    /// `inner` for a connection holding `ticket`.
    pub fn new(inner: S, ticket: Ticket) -> Self {
        Admitted { inner, ticket }
    }
}

impl<S> hyper::service::Service<Request<hyper::body::Incoming>> for Admitted<S>
where
    S: hyper::service::Service<
        Request<hyper::body::Incoming>,
        Response = Response<Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        let mut pending = self.ticket.pending(&req);
        if let Some(limit) = self.ticket.refused {
            let refusal = Ticket::refusal(limit);
            let body = Body::from(refusal.2.clone());
            let r = logged(pending, respond(&refusal, body));
            return Box::pin(std::future::ready(Ok(r)));
        }
        if let Some(hold) = &self.ticket.hold {
            if req.headers().contains_key(header::UPGRADE) {
                HoldWhileUpgraded::add(req.extensions_mut(), hold.0.clone());
            }
        }
        if let Some(w) = &mut pending {
            // A WebSocket relayed to a project's server is logged when the
            // relay ends, with its bytes.
            w.relayed_upgrade(&mut req);
        }
        let answer = self.inner.call(req);
        match pending {
            None => Box::pin(answer),
            Some(pending) => Box::pin(async move {
                let r = answer.await;
                r.map(|resp| logged(Some(pending), resp))
            }),
        }
    }
}

/// A connection's lean port relay under its [`Ticket`]: a refused
/// connection's plain requests are answered with the refusal here.
#[derive(Debug, Clone)]
pub struct AdmittedLean<L> {
    inner: L,
    ticket: Ticket,
}

impl<L> AdmittedLean<L> {
    /// `inner` for a connection holding `ticket`.
    pub fn new(inner: L, ticket: Ticket) -> Self {
        AdmittedLean { inner, ticket }
    }
}

impl<L: LeanService> LeanService for AdmittedLean<L> {
    type Key = L::Key;

    fn takes(&self, req: &Request<()>) -> bool {
        self.ticket.refused.is_some() || self.inner.takes(req)
    }

    async fn call(&self, req: Request<()>) -> Response<LeanBody<Self::Key>> {
        self.call_logged(req).await.0
    }

    async fn call_logged(
        &self,
        req: Request<()>,
    ) -> (Response<LeanBody<Self::Key>>, Option<BodySent>) {
        let pending = self.ticket.pending(&req);
        let r = match self.ticket.refused {
            Some(limit) => {
                let refusal = Ticket::refusal(limit);
                let body = LeanBody::Full(refusal.2.clone());
                respond(&refusal, body)
            }
            None => self.inner.call(req).await,
        };
        // The lean server counts the body on it, and the line is written
        // when the body has been sent.
        let sent = pending.map(|w| w.answered(r.status()));
        (r, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_untrusted_addresses_only() {
        let a = Admission::new(1, vec!["10.0.0.0/8".parse().unwrap()]);
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let first = a.admit(client);
        assert!(first.hold.is_some() && first.refused.is_none());
        assert_eq!(a.admit(client).refused, Some(1));
        assert_eq!(a.refused(), 1);
        // A proxy in front is not counted, however many it holds.
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        assert!((0..5).all(|_| a.admit(proxy).refused.is_none()));
        assert_eq!(a.held(), (1, 1));
        drop(first);
        assert_eq!(a.held(), (0, 0));
        assert!(a.admit(client).refused.is_none());
        // Refusals are audit records, when a sink is given.
        let sink = Arc::new(cocalc_auth::MemoryAuditSink::new());
        let audited = Admission::new(1, Vec::new())
            .with_audit(sink.clone(), Arc::new(cocalc_core::SystemClock));
        let _held = audited.admit(client);
        assert_eq!(audited.admit(client).refused, Some(1));
        let records = sink.records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].reason, "too_many_connections");
        assert!(
            records[0].detail.starts_with("client 192.0.2.1:"),
            "{records:?}"
        );
        // No cap: nothing counted.
        let off = Admission::new(0, Vec::new());
        assert!((0..5).all(|_| off.admit(client).hold.is_none()));
    }
}
