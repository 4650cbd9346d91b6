//! # cocalc-client
//!
//! The caller's side of the federation's HTTP APIs, shared by the `cocalc`
//! CLI, the master (which forwards exec/start/stop to hosts), tests and
//! embedders:
//!
//! * [`MasterClient`]: the master's control-plane API with one API key;
//! * [`HostClient`]: one project's data plane on its host, with one connect
//!   token;
//! * [`relay`](relay::relay): one HTTP/1.1 request over an open connection
//!   with WebSocket upgrades passed through (the host's port proxy and the
//!   ingress use it), and [`serve`](serve::serve), the HTTP/1.1 server loop
//!   both serve with, so that relayed WebSockets between two TCP sockets
//!   move by `splice(2)` ([`relay_upgraded`](relay::relay_upgraded)).
//! * [`Upstream`](upstream::Upstream): a lean pooled HTTP/1.1 client for
//!   the requests relays forward most, those without a body or upgrade,
//!   and [`lean::serve_connection`], the server half for the same
//!   requests in front of hyper's, which splices large relayed bodies.
//! * [`liveness`]: TCP keepalive and `TCP_USER_TIMEOUT` on every relayed
//!   connection, so a peer that vanished is noticed within minutes.
//! * [`tls`]: certificates loaded from PEM files and reloaded on
//!   renewal, server and client handshakes with a deadline, for the HTTPS
//!   listeners of the proxy and hosts and for the proxy's connections to
//!   `https://` hosts; [`http2`] serves the clients of those listeners
//!   that ask for HTTP/2.
//!
//! * [`access_log`]: one JSON line per request answered, written by a
//!   thread of its own, with tokens redacted and rotation noticed.
//!
//! Errors are the server's [`ApiError`](cocalc_core::ApiError) (status, code,
//! message, hint); failures to connect are `503 master_unreachable` /
//! `host_unreachable`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cocalc_core::ApiError> {
//! use cocalc_client::{HostClient, MasterClient};
//! use cocalc_core::{ExecRequest, HostEndpoint};
//!
//! let master = MasterClient::new("http://127.0.0.1:8080", "cuk.…");
//! let open = master.open("thesis").await?;
//! if let HostEndpoint::Url(url) = &open.endpoint {
//!     let host = HostClient::new(url.clone(), open.project, open.token.clone());
//!     let out = host.exec(&ExecRequest::new(vec!["echo".into(), "hi".into()])).await?;
//!     assert_eq!(out.stdout, b"hi\n");
//! }
//! # Ok(()) }
//! ```

pub mod access_log;
pub mod conncap;
mod host;
pub mod http2;
pub mod lean;
pub mod liveness;
mod master;
mod readiness;
pub mod relay;
pub mod serve;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod tls;
pub mod upstream;

pub use host::{encode_path, HostClient, MOVE_STREAM_IDLE};
pub use master::{EvacuationOutcome, MasterClient};

/// The TLS client configuration of every HTTP client this crate makes,
/// and of hidden hosts' tunnels without a CA file of their own: the
/// system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured), read once
/// per process; `None` when the system has none rustls can use. reqwest
/// would read and parse them for every client it builds:
/// `MasterClient::new` took 2.8–4.1 ms with the 292 certificates of this
/// machine's `/etc/ssl/certs`, against 1.9 µs with this (a loop of 200 in
/// a release build), and the master makes a client for every exec, start
/// and stop it forwards to a host.
pub fn system_tls_config() -> Option<&'static rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Option<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                // Certificates rustls cannot use are skipped, as reqwest does.
                let _ = roots.add(cert);
            }
            (!roots.is_empty()).then(|| trusting(roots)).flatten()
        })
        .as_ref()
}

/// A TLS client configuration trusting only the PEM certificates in
/// `ca_file` (a private CA); the error names the file and what is wrong.
pub fn tls_config_from_pem(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| format!("CA file {}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))?
    {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE in the PEM file".into()));
    }
    trusting(roots).ok_or_else(|| bad("refused by rustls".into()))
}

/// TLS 1.2 and 1.3 on *ring*, verifying servers against `roots`.
fn trusting(roots: rustls::RootCertStore) -> Option<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// A reqwest client builder with the shared TLS configuration
/// ([`system_tls_config`]), for clients with options of their own.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    match system_tls_config() {
        Some(cfg) => builder.use_preconfigured_tls(cfg.clone()),
        None => builder,
    }
}

/// A new HTTP client (its own connection pool) with the shared TLS
/// configuration.
fn http_client() -> reqwest::Client {
    http_client_builder().build().unwrap_or_default()
}

#[cfg(test)]
mod test_util {
    use tokio::io::AsyncReadExt;

    /// Reads one HTTP head (through the blank line) off `s`, a byte at a
    /// time so nothing after it is taken; `None` at the end of the stream.
    pub(crate) async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            seen.push(byte[0]);
        }
        Some(String::from_utf8(seen).unwrap())
    }
}
