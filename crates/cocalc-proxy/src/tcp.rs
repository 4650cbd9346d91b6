//! Direct TCP transport to hosts that publish a URL, with TLS for
//! `https://` ones.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cocalc_core::{
    parse_host_url, BoxedConnection, HostEndpoint, HostId, Transport, TransportError,
};
use tokio::net::TcpStream;

/// Connects to [`HostEndpoint::Url`] endpoints over TCP, with a connect
/// timeout (default 5 s). For `https` URLs it also runs the TLS handshake
/// ([`cocalc_client::tls::connect`]) and checks the host's certificate
/// against the roots it was given ([`TcpTransport::with_tls`]) or else the
/// system's ([`cocalc_client::system_tls_config`]); the connection it
/// returns is then the encrypted stream, whose bytes relays copy (they
/// splice only bare TCP sockets). Tunnel endpoints are refused with
/// [`TransportError::UnsupportedEndpoint`].
#[derive(Debug, Clone)]
pub struct TcpTransport {
    connect_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for TcpTransport {
    fn default() -> Self {
        TcpTransport {
            connect_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl TcpTransport {
    /// A transport with the given connect timeout.
    pub fn with_timeout(connect_timeout: Duration) -> Self {
        TcpTransport {
            connect_timeout,
            ..TcpTransport::default()
        }
    }

    /// Checks `https://` hosts against `config` (a private CA's roots,
    /// say: [`cocalc_client::tls_config_from_pem`]) instead of the
    /// system's roots.
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The TLS configuration for `https://` hosts: the one given, else the
    /// system's roots.
    fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        static SYSTEM: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>> =
            std::sync::OnceLock::new();
        self.tls.clone().or_else(|| {
            SYSTEM
                .get_or_init(|| cocalc_client::system_tls_config().map(|c| Arc::new(c.clone())))
                .clone()
        })
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn connect(
        &self,
        host: HostId,
        endpoint: &HostEndpoint,
    ) -> Result<BoxedConnection, TransportError> {
        let url = match endpoint {
            HostEndpoint::Url(u) => u,
            other => return Err(TransportError::UnsupportedEndpoint(other.clone())),
        };
        let addr = parse_host_url(url)?;
        let unreachable = |reason: String| TransportError::Unreachable { host, reason };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| unreachable(format!("connect to {addr} timed out")))?
            .map_err(|e| unreachable(format!("connect to {addr}: {e}")))?;
        cocalc_client::liveness::tune(&stream)
            .map_err(|e| unreachable(format!("set TCP_NODELAY and keepalive: {e}")))?;
        if !url.starts_with("https://") {
            return Ok(Box::new(stream));
        }
        let config = self.tls_config().ok_or_else(|| {
            unreachable(format!(
                "{url} needs TLS, and the system has no root certificates \
                 (configure the hosts' CA)"
            ))
        })?;
        let name = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let tls = cocalc_client::tls::connect(config, name, stream)
            .await
            .map_err(|e| unreachable(format!("TLS to {addr}: {e}")))?;
        Ok(Box::new(tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_host_url("http://127.0.0.1:8/x").unwrap(),
            "127.0.0.1:8"
        );
        assert_eq!(
            parse_host_url("https://h.example").unwrap(),
            "h.example:443"
        );
        assert_eq!(parse_host_url("http://[::1]:9").unwrap(), "[::1]:9");
        assert_eq!(parse_host_url("http://[::1]").unwrap(), "[::1]:80");
        assert!(parse_host_url("ftp://h").is_err());
        assert!(parse_host_url("http://").is_err());
        assert!(parse_host_url("http://u@h:1").is_err());
        assert!(parse_host_url("http://h:99999").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connects_and_carries_bytes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let t = TcpTransport::default();
        let host = HostId::from_bytes([1; 16]);
        let mut c = t
            .connect(host, &HostEndpoint::Url(format!("http://{addr}")))
            .await
            .unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        // TCP_NODELAY and keepalive, on the proxy's end.
        let tcp = c.as_any_mut().downcast_mut::<TcpStream>().unwrap();
        assert!(tcp.nodelay().unwrap());
        assert_eq!(
            cocalc_testkit::net::tcp_timer(tcp.local_addr().unwrap(), addr).map(|t| t.0),
            Some(cocalc_testkit::net::KEEPALIVE_TIMER)
        );
        server.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refuses_tunnels_and_reports_unreachable() {
        let t = TcpTransport::with_timeout(Duration::from_secs(2));
        let host = HostId::from_bytes([1; 16]);
        let e = t
            .connect(host, &HostEndpoint::Tunnel("t1".into()))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, TransportError::UnsupportedEndpoint(_)));
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = t
            .connect(host, &HostEndpoint::Url(format!("http://127.0.0.1:{port}")))
            .await
            .err()
            .unwrap();
        assert!(e.is_retryable(), "{e}");
    }
}
