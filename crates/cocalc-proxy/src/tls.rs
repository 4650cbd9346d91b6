//! HTTPS for the ingress: the same [`Ingress`] behind a TLS listener
//! (rustls, with the *ring* provider already in the build for SSH).
//!
//! [`CertStore`] (from [`cocalc_client::tls`], shared with hosts) holds a
//! certificate chain and its private key loaded from PEM files, and
//! reloads them when asked ([`CertStore::reload`]: the daemon asks every
//! `key_refresh_secs`, so a renewed certificate is presented to new
//! connections without a restart, while open ones keep theirs);
//! [`CertStore::server_config`] makes the rustls `ServerConfig` (TLS 1.2
//! and 1.3, ALPN `h2` and `http/1.1` unless [`HttpVersions`] says
//! HTTP/1.1 only) that presents it, and [`server_config`] does both at
//! once. [`serve_ingress_tls`] accepts connections, finishes each
//! handshake within [`HANDSHAKE_TIMEOUT`], and serves the encrypted stream
//! with [`Ingress::handle`], telling hosts `X-Forwarded-Proto: https`:
//! HTTP/2 to clients whose handshake chose it
//! ([`cocalc_client::http2`]: browsers send a page's requests over one
//! connection; hosts still get HTTP/1.1), HTTP/1.1 to the rest and for
//! WebSockets. A failed handshake (plain HTTP sent to the
//! TLS port, an unknown protocol version, a client that stalls) is a
//! refusal like any other: counted as `tls_handshake` and audited.
//!
//! The proxy's own endpoints under `/.cocalc/` are served here too, so
//! hidden hosts can dial their tunnels over TLS (`tunnel_url =
//! "https://…"`). What differs from the plain listener: every request goes
//! through hyper's server half (the lean one reads a bare socket), and
//! bodies and WebSockets are copied rather than spliced (the bytes must be
//! decrypted).
//!
//! ```no_run
//! # async fn demo(ingress: std::sync::Arc<cocalc_proxy::Ingress>) -> Result<(), Box<dyn std::error::Error>> {
//! use cocalc_proxy::tls::{serve_ingress_tls, server_config, TlsFiles};
//! let tls = server_config(&TlsFiles {
//!     cert_file: "/etc/cocalc/proxy.crt".into(),
//!     key_file: "/etc/cocalc/proxy.key".into(),
//! })?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
//! serve_ingress_tls(listener, tls, ingress, axum::Router::new(), std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

pub use cocalc_client::tls::{
    server_config, CertStore, HttpVersions, TlsError, TlsFiles, HANDSHAKE_TIMEOUT,
};

use crate::ingress::Peer;
use crate::Ingress;

/// Serves `ingress`, and `internal` for paths under `/.cocalc/`, over TLS
/// on `listener` until `shutdown` completes, then lets requests in flight
/// finish — as [`serve_ingress`](crate::serve_ingress) does over plain
/// HTTP. Each connection gets keepalive
/// ([`cocalc_client::liveness::tune`]) and [`HANDSHAKE_TIMEOUT`] to finish
/// its handshake.
pub async fn serve_ingress_tls(
    listener: impl cocalc_client::serve::Accept,
    tls: Arc<rustls::ServerConfig>,
    ingress: Arc<Ingress>,
    internal: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let internal = crate::with_refusals(&ingress, internal);
    let refusing = ingress.clone();
    cocalc_client::tls::serve_tls(
        listener,
        tls,
        move |addr| {
            crate::connection_service(ingress.clone(), internal.clone(), Peer::over_tls(addr))
        },
        move |addr, why| refusing.refuse_handshake(addr, &why),
        shutdown,
    )
    .await
}
