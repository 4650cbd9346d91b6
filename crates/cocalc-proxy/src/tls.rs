//! HTTPS for the ingress: the same [`Ingress`] behind a TLS listener
//! (rustls, with the *ring* provider already in the build for SSH).
//!
//! [`server_config`] loads a certificate chain and its private key from
//! PEM files into a rustls `ServerConfig` (TLS 1.2 and 1.3, ALPN
//! `http/1.1`); [`serve_ingress_tls`] accepts connections, finishes each
//! handshake within [`HANDSHAKE_TIMEOUT`], and serves HTTP/1.1 on the
//! encrypted stream with [`Ingress::handle`], telling hosts
//! `X-Forwarded-Proto: https`. A failed handshake (plain HTTP sent to the
//! TLS port, an unknown protocol version, a client that stalls) is a
//! refusal like any other: counted as `tls_handshake` and audited.
//!
//! What differs from the plain listener: every request goes through
//! hyper's server half (the lean one reads a bare socket), bodies are
//! copied rather than spliced (the bytes must be decrypted), and the
//! proxy's own endpoints under `/.cocalc/` — hidden hosts' tunnels — are
//! not served here: they are refused as bad paths. Hidden hosts dial the
//! plain listener.
//!
//! ```no_run
//! # async fn demo(ingress: std::sync::Arc<cocalc_proxy::Ingress>) -> Result<(), Box<dyn std::error::Error>> {
//! use cocalc_proxy::tls::{serve_ingress_tls, server_config, TlsFiles};
//! let tls = server_config(&TlsFiles {
//!     cert_file: "/etc/cocalc/proxy.crt".into(),
//!     key_file: "/etc/cocalc/proxy.key".into(),
//! })?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
//! serve_ingress_tls(listener, tls, ingress, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ingress::{Ingress, Peer};

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
/// rustls' safe defaults, no client certificates, ALPN `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `ingress` over TLS on `listener` until `shutdown` completes,
/// then lets requests in flight finish (as
/// [`serve_ingress`](crate::serve_ingress) does). Each connection gets
/// keepalive ([`cocalc_client::liveness::tune`]) and
/// [`HANDSHAKE_TIMEOUT`] to finish its handshake.
pub async fn serve_ingress_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ingress: Arc<Ingress>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    cocalc_client::serve::accept_loop(listener, shutdown, move |tcp, addr, mut stop| {
        let (acceptor, ingress) = (acceptor.clone(), ingress.clone());
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
            let peer = Peer::over_tls(addr);
            let service = hyper::service::service_fn(move |req| {
                let (ingress, peer) = (ingress.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(ingress.handle(&peer, req).await) }
            });
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
}
