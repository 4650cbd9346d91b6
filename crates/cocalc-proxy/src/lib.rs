//! # cocalc-proxy
//!
//! Optional ingress in front of project-hosts:
//!
//! * **HTTP/WebSocket ingress**: routes `/<project id>/…` to the host that
//!   holds the project, enforcing the base path (a canonical 36-byte UUID
//!   segment) before anything is sliced, validating the same connect tokens
//!   as hosts, streaming bodies, rate-limiting per project and per client;
//! * **SSH ingress** (`ssh project-<uuid>@proxy`), public-key only;
//! * **reverse tunnels**: the far end for hosts that accept no inbound
//!   connections, as a [`Transport`](cocalc_core::Transport).
//!
//! In detail: the HTTP/WebSocket [`Ingress`] (base-path checks, token
//! checks, routing by the token's host, streaming and WebSocket
//! pass-through, rate limits, a cap on connections per client address;
//! the master is asked for hosts' addresses in the background and, while
//! it is away, the known ones keep serving, across restarts with
//! [`IngressConfig::state_dir`]), the SSH ingress (`ssh::SshIngress`:
//! public-key logins authorized by the master; exec, shell, `direct-tcpip`
//! forwarding and SFTP forwarded to the host's data plane), the direct
//! transport, [`TcpTransport`], which reaches hosts that publish a URL
//! (over TLS for `https://` ones),
//! the reverse-tunnel end, [`TunnelHub`] with [`ProxyTransport`], and
//! [`metrics`] (refusals by reason, tunnels, dial-backs), [`watch`] (requests
//! waiting on a host whose program hangs end with 504 once its health
//! check goes unanswered) and [`proxy_protocol`] (the clients behind TCP
//! load balancers, from their PROXY protocol headers). [`serve_ingress`]
//! serves it all on one listener, project paths without a router in
//! between; [`tls::serve_ingress_tls`] serves the ingress over HTTPS on
//! another.
//!
//! | cargo feature | default | what |
//! | --- | --- | --- |
//! | `ssh` | on | the SSH ingress (russh, russh-sftp; about a minute more to build on 2 cores) |
//!
//! ```no_run
//! use cocalc_core::{HostEndpoint, HostId, Transport};
//! use cocalc_proxy::TcpTransport;
//! # async fn demo() -> Result<(), cocalc_core::TransportError> {
//! let t = TcpTransport::default();
//! let endpoint = HostEndpoint::Url("http://127.0.0.1:8443".into());
//! let _conn = t.connect(HostId::from_bytes([1; 16]), &endpoint).await?;
//! # Ok(()) }
//! ```

pub mod daemon;
pub mod ingress;
pub mod metrics;
pub mod proxy_protocol;
#[cfg(feature = "ssh")]
mod sftp;
#[cfg(feature = "ssh")]
pub mod ssh;
mod tcp;
pub mod tls;
pub mod tunnel;
pub mod watch;

pub use cocalc_core::parse_host_url;
pub use ingress::{HostConnection, Ingress, IngressConfig, LeanIngress, Peer};
#[cfg(feature = "ssh")]
pub use ssh::{Refusal, SshIngress, SshRefusals};
pub use tcp::TcpTransport;
pub use tunnel::{ProxyTransport, TunnelConfig, TunnelHub};

/// Serves the proxy: `ingress` for every request, except paths under
/// `/.cocalc/` (no project id starts with a dot), which go to `internal`
/// — the proxy's own endpoints, such as [`TunnelHub::router`]; those it
/// does not serve are refused by the ingress as bad paths (its fallback
/// is replaced). Project requests reach the ingress directly, with no
/// router in between: plain ones (no body, no upgrade) through
/// [`Ingress::handle_lean`] on the lean server half
/// ([`cocalc_client::lean`]), which splices large bodies from hosts to
/// clients; the rest through [`Ingress::handle`] on hyper's. Runs until
/// `shutdown` completes; built on [`cocalc_client::serve::serve_lean`],
/// so relayed WebSockets between TCP sockets reach the relay as bare
/// sockets and move by `splice(2)` too.
pub async fn serve_ingress(
    listener: impl cocalc_client::serve::Accept,
    ingress: std::sync::Arc<Ingress>,
    internal: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let internal = with_refusals(&ingress, internal);
    cocalc_client::serve::serve_lean(
        listener,
        move |addr: std::net::SocketAddr| {
            let peer = Peer::new(addr);
            let lean = LeanIngress::new(ingress.clone(), peer.clone());
            let fallback = connection_service(ingress.clone(), internal.clone(), peer);
            (lean, fallback)
        },
        shutdown,
    )
    .await
}

/// `internal` with the proxy's health check
/// ([`cocalc_core::wire::PROXY_HEALTH_PATH`], [`Ingress::health`]), and
/// with the ingress refusing, counting and auditing the paths under
/// `/.cocalc/` it does not serve, as bad paths like any other.
pub(crate) fn with_refusals(
    ingress: &std::sync::Arc<Ingress>,
    internal: axum::Router,
) -> axum::Router {
    let refuser = ingress.clone();
    let checked = ingress.clone();
    let health = move || {
        let h = checked.health();
        let status = if h.ok {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        };
        std::future::ready((status, axum::Json(h)))
    };
    internal
        .route(
            cocalc_core::wire::PROXY_HEALTH_PATH,
            axum::routing::get(health),
        )
        .fallback(
            move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                std::net::SocketAddr,
            >,
                  uri: axum::http::Uri| {
                let ingress = refuser.clone();
                async move { ingress.refuse_path(peer, uri.path()) }
            },
        )
}

/// What hyper's server half answers on one client connection from `peer`:
/// paths under `/.cocalc/` go to `internal` (made by [`with_refusals`]),
/// told the client's address; everything else to [`Ingress::handle`].
pub(crate) fn connection_service(
    ingress: std::sync::Arc<Ingress>,
    internal: axum::Router,
    peer: Peer,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = ingress::Response,
    Error = std::convert::Infallible,
    Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<ingress::Response, std::convert::Infallible>>
                + Send,
        >,
    >,
> + Clone {
    use http_body_util::Either;
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let (ingress, internal, peer) = (ingress.clone(), internal.clone(), peer.clone());
        Box::pin(async move {
            if req.uri().path().starts_with("/.cocalc/") {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer.addr()));
                let resp = tower::ServiceExt::oneshot(internal, req).await?;
                Ok(resp.map(|b| cocalc_client::access_log::Logged::new(Either::Right(b), None)))
            } else {
                Ok(ingress.handle(&peer, req).await)
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    })
}

/// Serves an axum router on `listener` until `shutdown` completes, with
/// each request told its client's address (axum's `ConnectInfo`). Built
/// on [`cocalc_client::serve::serve`], so relayed upgrades between TCP
/// sockets and dial-back connections from hidden hosts reach the relay
/// as bare sockets and move by `splice(2)`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    cocalc_client::serve::serve(
        listener,
        move |peer: std::net::SocketAddr| {
            let app = app.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            })
        },
        shutdown,
    )
    .await
}
