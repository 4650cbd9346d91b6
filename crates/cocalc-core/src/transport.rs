//! The [`Transport`] trait: how the master and the proxy reach a host.
//!
//! A host is reached either directly at a URL or through a reverse tunnel it
//! dialled out (see [`HostEndpoint`]). Control-plane code opens connections
//! only through a `Transport`, so tests and the network simulator can swap
//! the network out. `TcpTransport` (direct) lives in `cocalc-proxy`, as will
//! the tunnel transport; `cocalc-testkit` has an in-memory one.

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::id::HostId;
use crate::record::HostEndpoint;

/// A bidirectional byte connection.
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The concrete connection, so a relay can find a plain TCP socket
    /// under the box and move bytes with `splice(2)` instead of copying
    /// them. Call it on the boxed value (`(*boxed).as_any_mut()`), not on
    /// the `Box`, which is a `Connection` too.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A boxed connection, as [`Transport::connect`] returns it.
pub type BoxedConnection = Box<dyn Connection>;

/// Why a host could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint is not of a kind this transport serves.
    #[error("transport cannot reach endpoint {0:?}")]
    UnsupportedEndpoint(HostEndpoint),
    /// The endpoint is malformed (bad URL).
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    /// Connecting failed; may succeed later.
    #[error("host {host} unreachable: {reason}")]
    Unreachable {
        /// The host.
        host: HostId,
        /// What failed.
        reason: String,
    },
}

impl TransportError {
    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransportError::Unreachable { .. })
    }
}

/// [`parse_host_url`] for a URL that must be a server's root
/// (`http(s)://host[:port]`, a trailing `/` allowed), as a proxy's tunnel
/// handle is: hidden hosts dial it and other proxies forward
/// `/<project id>/…` to it. Refuses a path, query or fragment.
pub fn parse_root_url(url: &str) -> Result<String, TransportError> {
    let authority = parse_host_url(url)?;
    let rest = url
        .trim_end_matches('/')
        .split_once("://")
        .map_or("", |r| r.1);
    if rest.contains(['/', '?', '#']) {
        return Err(TransportError::InvalidEndpoint(format!(
            "{url:?}: a path, query or fragment is not supported here (the server's root URL, \
             http(s)://host[:port])"
        )));
    }
    Ok(authority)
}

/// Splits `http://host:port[/...]` (or `https://`) into `host:port`,
/// supplying the scheme's default port. Refuses other schemes, user info,
/// and empty hosts.
pub fn parse_host_url(url: &str) -> Result<String, TransportError> {
    let bad = |why: &str| TransportError::InvalidEndpoint(format!("{url:?}: {why}"));
    let (rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else {
        return Err(bad("scheme must be http:// or https://"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains('@') {
        return Err(bad("user info is not allowed"));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    if has_port {
        let port = &authority[authority.rfind(':').map_or(0, |i| i + 1)..];
        if port.parse::<u16>().is_err() {
            return Err(bad("invalid port"));
        }
        Ok(authority.to_string())
    } else {
        Ok(format!("{authority}:{default_port}"))
    }
}

/// Opens byte connections to hosts.
///
/// Contract: `connect` either returns a connection on which the host's data
/// plane (HTTP/1.1 or HTTP/2) can be spoken, or an error; it never hangs
/// longer than the implementation's documented connect timeout.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Connects to `host` at `endpoint`.
    async fn connect(
        &self,
        host: HostId,
        endpoint: &HostEndpoint,
    ) -> Result<BoxedConnection, TransportError>;

    /// Whether `host` holds a reverse tunnel open to this process now, so
    /// that it can be reached through it whatever endpoint the master
    /// names (a host moving its tunnel away keeps the old one open a
    /// while). Default: no.
    fn holds_tunnel(&self, _host: HostId) -> bool {
        false
    }
}

/// Opens byte connections to one fixed peer (a host's master, say): the
/// seam through which a control-plane client reaches its server, so a
/// network simulator can carry the bytes instead of the kernel.
///
/// Contract: `dial` returns a fresh connection on which plain HTTP/1.1
/// (and WebSocket upgrades) can be spoken, or an error; it never hangs
/// longer than the implementation's documented connect timeout.
#[async_trait]
pub trait Dialer: Send + Sync + std::fmt::Debug {
    /// Opens a new connection to the peer.
    async fn dial(&self) -> std::io::Result<BoxedConnection>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_urls_are_a_scheme_and_an_authority() {
        assert_eq!(
            parse_root_url("https://p.example").unwrap(),
            "p.example:443"
        );
        assert_eq!(parse_root_url("http://p:8000/").unwrap(), "p:8000");
        assert_eq!(parse_root_url("http://[::1]:8/").unwrap(), "[::1]:8");
        for bad in [
            "http://p:8000/edge",
            "https://p?x=1",
            "https://p#f",
            "p:8000",
        ] {
            assert!(
                matches!(parse_root_url(bad), Err(TransportError::InvalidEndpoint(_))),
                "{bad}"
            );
        }
    }
}
