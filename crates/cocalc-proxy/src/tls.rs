//! HTTPS for the ingress: the same [`Ingress`] behind a TLS listener
//! (rustls, with the *ring* provider already in the build for SSH).
//!
//! [`CertStore`] holds a certificate chain and its private key loaded from
//! PEM files, and reloads them when asked ([`CertStore::reload`]: the
//! daemon asks every `key_refresh_secs`, so a renewed certificate is
//! presented to new connections without a restart, while open ones keep
//! theirs); [`CertStore::server_config`] makes the rustls `ServerConfig`
//! (TLS 1.2 and 1.3, ALPN `http/1.1`) that presents it, and
//! [`server_config`] does both at once. [`serve_ingress_tls`] accepts
//! connections, finishes each
//! handshake within [`HANDSHAKE_TIMEOUT`], and serves HTTP/1.1 on the
//! encrypted stream with [`Ingress::handle`], telling hosts
//! `X-Forwarded-Proto: https`. A failed handshake (plain HTTP sent to the
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

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::ingress::Peer;
use crate::Ingress;

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

/// Loads `files` into a server configuration: TLS 1.2 and 1.3 with
/// rustls' safe defaults, no client certificates, ALPN `http/1.1`
/// ([`CertStore::load`], then [`CertStore::server_config`]).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    CertStore::load(files.clone())?.server_config()
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
    /// whatever it is at each handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Refused(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
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

/// Serves `ingress`, and `internal` for paths under `/.cocalc/`, over TLS
/// on `listener` until `shutdown` completes, then lets requests in flight
/// finish — as [`serve_ingress`](crate::serve_ingress) does over plain
/// HTTP. Each connection gets keepalive
/// ([`cocalc_client::liveness::tune`]) and [`HANDSHAKE_TIMEOUT`] to finish
/// its handshake.
pub async fn serve_ingress_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ingress: Arc<Ingress>,
    internal: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let internal = crate::with_refusals(&ingress, internal);
    cocalc_client::serve::accept_loop(listener, shutdown, move |tcp, addr, mut stop| {
        let (acceptor, ingress, internal) = (acceptor.clone(), ingress.clone(), internal.clone());
        async move {
            let _ = cocalc_client::liveness::tune(&tcp);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return ingress.refuse_handshake(addr, &e.to_string()),
                Err(_) => {
                    return ingress.refuse_handshake(
                        addr,
                        &format!("handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
                    )
                }
            };
            let service = crate::connection_service(ingress, internal, Peer::over_tls(addr));
            cocalc_client::serve::serve_io(stream, service, async move {
                let _ = stop.changed().await;
            })
            .await;
        }
    })
    .await
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
}
