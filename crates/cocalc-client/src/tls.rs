//! TLS for servers and clients of the federation: the pieces the proxy's
//! HTTPS ingress and a host's HTTPS data plane share, and the client side
//! the proxy uses to reach hosts whose URL is `https://`.
//!
//! * [`CertStore`] holds a certificate chain and its private key loaded
//!   from PEM files ([`TlsFiles`]), and reloads them when asked
//!   ([`CertStore::reload`]): a renewed certificate is presented to new
//!   connections without a restart, while open ones keep theirs.
//!   [`CertStore::server_config`] makes the rustls `ServerConfig` (TLS 1.2
//!   and 1.3, ALPN `h2` and `http/1.1`, or `http/1.1` alone:
//!   [`HttpVersions`]) that presents it; [`server_config`] does both at
//!   once.
//! * [`serve_tls`] serves HTTP over it: HTTP/2 ([`crate::http2`]) to
//!   clients whose handshake chose `h2`, HTTP/1.1 to the rest.
//! * [`accept`] finishes a server handshake within [`HANDSHAKE_TIMEOUT`];
//!   [`connect`] runs a client handshake over an open TCP connection,
//!   checking the server's certificate against the name in its URL.
//!
//! rustls runs on *ring*, the provider already in the build for SSH and
//! reqwest.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cocalc_client::tls::{accept, server_config, TlsFiles};
//! let tls = server_config(&TlsFiles {
//!     cert_file: "/etc/cocalc/host.crt".into(),
//!     key_file: "/etc/cocalc/host.key".into(),
//! })?;
//! let acceptor = tokio_rustls::TlsAcceptor::from(tls);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8443").await?;
//! let (tcp, _) = listener.accept().await?;
//! let _stream = accept(&acceptor, tcp).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the certificate and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Why the certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the pair (a key that does not match the
    /// certificate, an unsupported key type).
    #[error("certificate and key refused: {0}")]
    Refused(String),
}

/// Which HTTP versions a TLS listener offers, by ALPN (RFC 7301) in the
/// handshake. A client offering none of them still gets HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HttpVersions {
    /// HTTP/2 to clients that offer it (browsers do), HTTP/1.1 to the
    /// rest.
    #[default]
    Http2AndHttp1,
    /// HTTP/1.1 only.
    Http1Only,
}

impl HttpVersions {
    /// `Http2AndHttp1` if `http2`, else `Http1Only` (a config file's
    /// switch).
    pub fn with_http2(http2: bool) -> Self {
        if http2 {
            HttpVersions::Http2AndHttp1
        } else {
            HttpVersions::Http1Only
        }
    }

    /// The ALPN protocol names offered, the preferred first.
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            HttpVersions::Http2AndHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            HttpVersions::Http1Only => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Loads `files` into a server configuration: TLS 1.2 and 1.3 with
/// rustls' safe defaults, no client certificates, ALPN `h2` and
/// `http/1.1` ([`CertStore::load`], then [`CertStore::server_config`]).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    CertStore::load(files.clone())?.server_config(HttpVersions::default())
}

/// The certificate a TLS listener presents, loaded from its files and
/// reloadable from them. Each handshake takes the certificate current at
/// that moment.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads `files`; fails, naming the file, if either does not load or
    /// the key is not the certificate's.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = RwLock::new(Arc::new(read_pair(&files, &provider)?));
        Ok(Arc::new(CertStore {
            files,
            provider,
            current,
        }))
    }

    /// A server configuration presenting this store's certificate,
    /// whatever it is at each handshake, and offering `versions` of HTTP.
    pub fn server_config(
        self: &Arc<Self>,
        versions: HttpVersions,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Refused(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = versions.alpn();
        Ok(Arc::new(cfg))
    }

    /// Reads the files again. If they hold a different certificate chain
    /// that loads, new handshakes present it from now on and the answer
    /// is `true`; the same chain is `false`. On an error the current
    /// certificate stays (a renewal caught half-written is read again at
    /// the next call).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let fresh = read_pair(&self.files, &self.provider)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.cert == fresh.cert {
            return Ok(false);
        }
        *current = Arc::new(fresh);
        Ok(true)
    }

    /// The certificate presented now.
    pub fn certificate(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate())
    }
}

/// Reads and checks one certificate chain and its key.
fn read_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let file_err = |path: &PathBuf, message: String| TlsError::File {
        path: path.clone(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| file_err(&files.cert_file, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(&files.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(
            &files.cert_file,
            "no CERTIFICATE in the PEM file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| file_err(&files.key_file, e.to_string()))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Refused(e.to_string()))
}

/// Finishes the server side of a TLS handshake on `tcp` within
/// [`HANDSHAKE_TIMEOUT`]. The error says why it failed (plain HTTP sent to
/// a TLS port, no protocol in common, a client that stalled), for the
/// caller to count and log.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "handshake not finished within {HANDSHAKE_TIMEOUT:?}"
        )),
    }
}

/// Serves HTTP over TLS on `listener` until `shutdown` completes, then
/// lets requests in flight finish, as [`serve`](crate::serve::serve)
/// does over plain TCP: each connection gets keepalive
/// ([`liveness::tune`](crate::liveness::tune)) and [`accept`]'s handshake,
/// then the service `make(peer address)` returns. A connection whose
/// handshake chose `h2` is served HTTP/2 ([`crate::http2::serve_io`]),
/// any other HTTP/1.1 with upgrades (their bytes are copied: a TLS stream
/// cannot be spliced). A failed handshake goes to `refused(peer, why)`
/// instead.
pub async fn serve_tls<F, R, S, B>(
    listener: impl crate::serve::Accept,
    config: Arc<rustls::ServerConfig>,
    make: F,
    refused: R,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    F: Fn(std::net::SocketAddr) -> S + Clone + Send + 'static,
    R: Fn(std::net::SocketAddr, String) + Clone + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    crate::serve::accept_loop(listener, shutdown, move |tcp, peer, mut stop| {
        let (acceptor, make, refused) = (acceptor.clone(), make.clone(), refused.clone());
        async move {
            let _ = crate::liveness::tune(&tcp);
            match accept(&acceptor, tcp).await {
                Ok(stream) => {
                    let stop = async move {
                        let _ = stop.changed().await;
                    };
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let idle = crate::http2::IDLE_TIMEOUT;
                        crate::http2::serve_io(stream, make(peer), stop, idle).await
                    } else {
                        crate::serve::serve_io(stream, make(peer), stop).await
                    }
                }
                Err(why) => refused(peer, why),
            }
        }
    })
    .await
}

/// Runs a client TLS handshake on `tcp` (within [`HANDSHAKE_TIMEOUT`]),
/// verifying the server's certificate against `config`'s roots and
/// `server`, the host part of its URL: a DNS name, or an IP address
/// (bracketed or not) that the certificate must name as such.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    server: &str,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = server.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(name.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{server:?} is not a name TLS can check: {e}"),
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
            )
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair for 127.0.0.1 in `dir`.
    fn pair(dir: &std::path::Path, name: &str) -> TlsFiles {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let files = TlsFiles {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.pem")),
        };
        std::fs::write(&files.cert_file, ck.cert.pem()).unwrap();
        std::fs::write(&files.key_file, ck.key_pair.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_good_pair_loads_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "a");
        let cfg = server_config(&good).unwrap();
        assert_eq!(cfg.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let store = CertStore::load(good.clone()).unwrap();
        let cfg = store.server_config(HttpVersions::Http1Only).unwrap();
        assert_eq!(cfg.alpn_protocols, [b"http/1.1".to_vec()]);

        let missing = TlsFiles {
            cert_file: dir.path().join("nope.crt"),
            ..good.clone()
        };
        match server_config(&missing) {
            Err(TlsError::File { path, .. }) => assert_eq!(path, missing.cert_file),
            other => panic!("{other:?}"),
        }
        let not_pem = dir.path().join("junk.crt");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let e = server_config(&TlsFiles {
            cert_file: not_pem.clone(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(
            matches!(&e, TlsError::File { path, message } if *path == not_pem && message.contains("no CERTIFICATE")),
            "{e}"
        );
        // A key file holding a certificate instead of a key.
        let e = server_config(&TlsFiles {
            cert_file: good.cert_file.clone(),
            key_file: good.cert_file.clone(),
        })
        .unwrap_err();
        assert!(
            matches!(&e, TlsError::File { path, .. } if *path == good.cert_file),
            "{e}"
        );
        // Another certificate's key.
        let other = pair(dir.path(), "b");
        let e = server_config(&TlsFiles {
            cert_file: good.cert_file.clone(),
            key_file: other.key_file,
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::Refused(_)), "{e}");
    }

    #[test]
    fn a_renewed_certificate_is_presented_after_reload_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let files = pair(dir.path(), "live");
        let store = CertStore::load(files.clone()).unwrap();
        let first = store.certificate();
        assert!(!store.reload().unwrap(), "same files, same certificate");
        assert!(Arc::ptr_eq(&first, &store.certificate()));

        // Renewed: new handshakes get the new chain.
        let renewed = pair(dir.path(), "renewed");
        std::fs::copy(&renewed.cert_file, &files.cert_file).unwrap();
        std::fs::copy(&renewed.key_file, &files.key_file).unwrap();
        assert!(store.reload().unwrap());
        let second = store.certificate();
        assert_ne!(second.cert, first.cert);
        assert_eq!(
            second.cert[0].as_ref(),
            std::fs::read(&renewed.cert_file)
                .map(|pem| CertificateDer::from_pem_slice(&pem).unwrap().to_vec())
                .unwrap()
        );

        // Caught half-written (the key not yet replaced): refused, and the
        // renewed certificate stays.
        let next = pair(dir.path(), "next");
        std::fs::copy(&next.cert_file, &files.cert_file).unwrap();
        assert!(matches!(store.reload(), Err(TlsError::Refused(_))));
        assert_eq!(store.certificate().cert, second.cert);
        std::fs::write(&files.key_file, "").unwrap();
        assert!(matches!(store.reload(), Err(TlsError::File { .. })));
        assert_eq!(store.certificate().cert, second.cert);
        std::fs::copy(&next.key_file, &files.key_file).unwrap();
        assert!(store.reload().unwrap(), "complete again");
    }

    /// A client trusting the certificate of `files` only.
    fn trusting(files: &TlsFiles) -> Arc<rustls::ClientConfig> {
        Arc::new(crate::tls_config_from_pem(&files.cert_file).unwrap())
    }

    #[tokio::test]
    async fn connect_checks_the_name_and_accept_names_the_failure() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let files = pair(dir.path(), "srv");
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&files).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..3 {
                let (tcp, _) = l.accept().await.unwrap();
                match accept(&acceptor, tcp).await {
                    Ok(mut s) => {
                        let mut b = [0u8; 4];
                        s.read_exact(&mut b).await.unwrap();
                        s.write_all(&b).await.unwrap();
                        s.shutdown().await.unwrap();
                        outcomes.push("ok".to_string());
                    }
                    Err(e) => outcomes.push(e),
                }
            }
            outcomes
        });
        // The certificate names 127.0.0.1: an IP address checks.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = connect(trusting(&files), "127.0.0.1", tcp).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        // Another name does not.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let e = connect(trusting(&files), "localhost", tcp)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // Plain HTTP to the TLS port: the server's error says what it got.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let _ = tcp.read(&mut [0u8; 64]).await;
        let outcomes = server.await.unwrap();
        assert_eq!(outcomes[0], "ok");
        // The client's alert, and rustls' words for bytes that are not TLS.
        assert!(outcomes[1].contains("BadCertificate"), "{outcomes:?}");
        assert!(outcomes[2].contains("InvalidContentType"), "{outcomes:?}");
        // A name TLS cannot check is refused before any byte is sent.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let e = connect(trusting(&files), "bad name!", tcp)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    }
}
