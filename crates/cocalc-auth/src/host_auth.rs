//! How hosts prove who they are to the master.
//!
//! * **Bootstrap tokens**: an operator mints a one-time token
//!   ([`BootstrapToken::generate`]); the master stores only its BLAKE2b hash
//!   ([`BootstrapToken::hash`]) with an expiry. A host presents it once, with
//!   its own Ed25519 public key, to register.
//! * **Signed requests**: every later control call carries the host id, a
//!   timestamp and an Ed25519 signature by the host key over
//!   `PAE("cocalc-host-request-v1", host, method, path, time, body)`
//!   ([`sign_request`] / [`verify_request`]). The master accepts a signature
//!   only within `max_age` of its clock (default 60 s), so a captured request
//!   cannot be replayed later; within the window, replays of the idempotent
//!   control calls (keepalive, activity) are harmless.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use cocalc_core::{HostId, Timestamp};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::keys::{random_bytes, KeyError};
use crate::paseto::pae_into;

/// Header naming the calling host.
pub const HEADER_HOST: &str = "x-cocalc-host";
/// Header with the request time (Unix milliseconds).
pub const HEADER_TIME: &str = "x-cocalc-time";
/// Header with the signature (unpadded base64url).
pub const HEADER_SIGNATURE: &str = "x-cocalc-signature";

const DOMAIN: &[u8] = b"cocalc-host-request-v1";
const BOOTSTRAP_PREFIX: &str = "cbt.";

/// A one-time host bootstrap token (`cbt.<43 base64url characters>`).
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapToken(<secret>)")
    }
}

impl BootstrapToken {
    /// A fresh token with 256 random bits.
    pub fn generate() -> Result<Self, KeyError> {
        let b = random_bytes::<32>()?;
        Ok(BootstrapToken(format!(
            "{BOOTSTRAP_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(b)
        )))
    }

    /// Wraps a presented token, checking its shape.
    pub fn parse(s: &str) -> Result<Self, HostAuthError> {
        let ok = s.strip_prefix(BOOTSTRAP_PREFIX).is_some_and(|d| {
            d.len() == 43 && URL_SAFE_NO_PAD.decode(d).is_ok_and(|b| b.len() == 32)
        });
        if ok {
            Ok(BootstrapToken(s.to_string()))
        } else {
            Err(HostAuthError::MalformedBootstrapToken)
        }
    }

    /// The token text (show it once to the operator).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the master stores: hex BLAKE2b-256 of the token.
    pub fn hash(&self) -> String {
        let mut h = Blake2bVar::new(32).expect("32 is a valid BLAKE2b output length");
        h.update(self.0.as_bytes());
        let mut out = [0u8; 32];
        h.finalize_variable(&mut out)
            .expect("buffer has the output length");
        out.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a host's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostAuthError {
    /// A required header is missing.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is not in the expected form.
    #[error("malformed header {0}")]
    MalformedHeader(&'static str),
    /// The request time is too far from the master's clock.
    #[error("request time {time:?} is more than {} s from the master's clock ({now:?})", max_age.as_secs())]
    Stale {
        /// Time in the request.
        time: Timestamp,
        /// The master's time.
        now: Timestamp,
        /// Allowed difference.
        max_age: Duration,
    },
    /// The signature does not match the registered host key.
    #[error("request signature does not match host {0}'s registered key")]
    BadSignature(HostId),
    /// The bootstrap token is not of the form `cbt.<43 chars>`.
    #[error("malformed bootstrap token")]
    MalformedBootstrapToken,
}

fn message(host: HostId, method: &str, path: &str, time: Timestamp, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + path.len() + body.len());
    let host = host.to_string();
    let time = time.as_millis().to_string();
    pae_into(
        &mut m,
        &[
            DOMAIN,
            host.as_bytes(),
            method.as_bytes(),
            path.as_bytes(),
            time.as_bytes(),
            body,
        ],
    );
    m
}

/// The three header values (host, time, signature) for a request.
pub fn sign_request(
    key: &SigningKey,
    host: HostId,
    method: &str,
    path: &str,
    time: Timestamp,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let sig = key.sign(&message(host, method, path, time, body));
    [
        (HEADER_HOST, host.to_string()),
        (HEADER_TIME, time.as_millis().to_string()),
        (HEADER_SIGNATURE, URL_SAFE_NO_PAD.encode(sig.to_bytes())),
    ]
}

/// Parses the host header (so the caller can look up the host's key).
pub fn request_host(host_header: Option<&str>) -> Result<HostId, HostAuthError> {
    host_header
        .ok_or(HostAuthError::MissingHeader(HEADER_HOST))?
        .parse()
        .map_err(|_| HostAuthError::MalformedHeader(HEADER_HOST))
}

/// Checks a signed request against the host's registered key.
#[allow(clippy::too_many_arguments)]
pub fn verify_request(
    key: &VerifyingKey,
    host: HostId,
    method: &str,
    path: &str,
    time_header: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    now: Timestamp,
    max_age: Duration,
) -> Result<(), HostAuthError> {
    let time = Timestamp(
        time_header
            .ok_or(HostAuthError::MissingHeader(HEADER_TIME))?
            .parse()
            .map_err(|_| HostAuthError::MalformedHeader(HEADER_TIME))?,
    );
    let sig = signature_header.ok_or(HostAuthError::MissingHeader(HEADER_SIGNATURE))?;
    let sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(HostAuthError::MalformedHeader(HEADER_SIGNATURE))?;
    if time.since(now) > max_age || now.since(time) > max_age {
        return Err(HostAuthError::Stale { time, now, max_age });
    }
    key.verify_strict(
        &message(host, method, path, time, body),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| HostAuthError::BadSignature(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_hash_and_parse() {
        let t = BootstrapToken::generate().unwrap();
        assert!(t.as_str().starts_with("cbt."));
        assert_eq!(BootstrapToken::parse(t.as_str()).unwrap(), t);
        assert_eq!(t.hash().len(), 64);
        assert_ne!(t.hash(), BootstrapToken::generate().unwrap().hash());
        assert_eq!(format!("{t:?}"), "BootstrapToken(<secret>)");
        for bad in [
            "",
            "cbt.",
            "cbt.short",
            "xyz.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(
                BootstrapToken::parse(bad),
                Err(HostAuthError::MalformedBootstrapToken)
            );
        }
    }

    #[test]
    fn signed_requests_verify_only_unchanged_and_fresh() {
        let sk = SigningKey::from_bytes(&[3; 32]);
        let vk = sk.verifying_key();
        let host = HostId::new_v4([1; 16]);
        let t = Timestamp::from_secs(1000);
        let max = Duration::from_secs(60);
        let [_, (_, time), (_, sig)] =
            sign_request(&sk, host, "POST", "/v1/hosts/x/keepalive", t, b"{}");
        let check = |method: &str, path: &str, body: &[u8], now: Timestamp| {
            verify_request(
                &vk,
                host,
                method,
                path,
                Some(&time),
                Some(&sig),
                body,
                now,
                max,
            )
        };
        assert_eq!(check("POST", "/v1/hosts/x/keepalive", b"{}", t), Ok(()));
        assert_eq!(
            check("POST", "/v1/hosts/x/keepalive", b"{ }", t),
            Err(HostAuthError::BadSignature(host))
        );
        assert_eq!(
            check("PUT", "/v1/hosts/x/keepalive", b"{}", t),
            Err(HostAuthError::BadSignature(host))
        );
        assert_eq!(
            check("POST", "/v1/hosts/y/keepalive", b"{}", t),
            Err(HostAuthError::BadSignature(host))
        );
        assert!(matches!(
            check(
                "POST",
                "/v1/hosts/x/keepalive",
                b"{}",
                Timestamp::from_secs(1061)
            ),
            Err(HostAuthError::Stale { .. })
        ));
        assert!(check(
            "POST",
            "/v1/hosts/x/keepalive",
            b"{}",
            Timestamp::from_secs(1059)
        )
        .is_ok());
        assert_eq!(
            verify_request(&vk, host, "POST", "/", None, Some(&sig), b"", t, max),
            Err(HostAuthError::MissingHeader(HEADER_TIME))
        );
        assert_eq!(
            verify_request(&vk, host, "POST", "/", Some(&time), Some("!!"), b"", t, max),
            Err(HostAuthError::MalformedHeader(HEADER_SIGNATURE))
        );
        assert_eq!(
            request_host(Some("nope")),
            Err(HostAuthError::MalformedHeader(HEADER_HOST))
        );
        assert_eq!(request_host(Some(&host.to_string())), Ok(host));
    }
}
