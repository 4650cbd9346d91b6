//! PASERK serialisations of v4 keys: `k4.public`, `k4.secret` and the key id
//! `k4.pid`.
//!
//! ```text
//! k4.public.<b64url(32-byte Ed25519 public key)>
//! k4.secret.<b64url(32-byte seed || 32-byte public key)>
//! k4.pid.<b64url(BLAKE2b-264("k4.pid." || "k4.public.<...>"))>
//! ```
//!
//! Checked against the PASERK test vectors in `tests/paseto_vectors.rs`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Why a PASERK string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaserkError {
    /// The prefix is not the expected `k4.<type>.`.
    #[error("expected a {expected} PASERK, found prefix {found:?}")]
    WrongType {
        /// `k4.public.` or `k4.secret.`.
        expected: &'static str,
        /// At most 12 characters of what was found.
        found: String,
    },
    /// The key data is not canonical base64url.
    #[error("invalid base64url in PASERK")]
    Base64,
    /// The key data has the wrong length.
    #[error("PASERK key data has {found} bytes, expected {expected}")]
    Length {
        /// Bytes expected.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// Not a valid Ed25519 public key, or a secret key whose public half does
    /// not match its seed.
    #[error("invalid Ed25519 key: {0}")]
    InvalidKey(&'static str),
}

const PUBLIC: &str = "k4.public.";
const SECRET: &str = "k4.secret.";
const PID: &str = "k4.pid.";

fn decode(s: &str, prefix: &'static str, len: usize) -> Result<Vec<u8>, PaserkError> {
    let data = s
        .strip_prefix(prefix)
        .ok_or_else(|| PaserkError::WrongType {
            expected: prefix,
            found: s.chars().take(12).collect(),
        })?;
    let bytes = URL_SAFE_NO_PAD
        .decode(data)
        .map_err(|_| PaserkError::Base64)?;
    if bytes.len() != len {
        return Err(PaserkError::Length {
            expected: len,
            found: bytes.len(),
        });
    }
    Ok(bytes)
}

/// `k4.public.…` of a public key.
pub fn encode_public(key: &VerifyingKey) -> String {
    encode_public_bytes(key.as_bytes())
}

fn encode_public_bytes(key: &[u8; 32]) -> String {
    format!("{PUBLIC}{}", URL_SAFE_NO_PAD.encode(key))
}

/// `k4.public.…` of raw key bytes; refuses anything but 32 bytes.
pub fn encode_public_raw(key: &[u8]) -> Result<String, PaserkError> {
    let arr: &[u8; 32] = key.try_into().map_err(|_| PaserkError::Length {
        expected: 32,
        found: key.len(),
    })?;
    Ok(encode_public_bytes(arr))
}

/// Parses `k4.public.…`.
pub fn decode_public(s: &str) -> Result<VerifyingKey, PaserkError> {
    let b = decode(s.trim(), PUBLIC, 32)?;
    let mut arr = [0u8; 32];
    arr.copy_from_slice(&b);
    VerifyingKey::from_bytes(&arr).map_err(|_| PaserkError::InvalidKey("not a curve point"))
}

/// `k4.secret.…` of a secret key (seed followed by public key).
pub fn encode_secret(key: &SigningKey) -> String {
    format!("{SECRET}{}", URL_SAFE_NO_PAD.encode(key.to_keypair_bytes()))
}

/// `k4.secret.…` of raw key bytes (seed || public key); refuses anything
/// but 64 bytes whose public half matches the seed.
pub fn encode_secret_raw(key: &[u8]) -> Result<String, PaserkError> {
    let arr: &[u8; 64] = key.try_into().map_err(|_| PaserkError::Length {
        expected: 64,
        found: key.len(),
    })?;
    let sk = SigningKey::from_keypair_bytes(arr)
        .map_err(|_| PaserkError::InvalidKey("public half does not match the seed"))?;
    Ok(encode_secret(&sk))
}

/// Parses `k4.secret.…`, checking that the public half matches the seed.
pub fn decode_secret(s: &str) -> Result<SigningKey, PaserkError> {
    let b = decode(s.trim(), SECRET, 64)?;
    let mut arr = [0u8; 64];
    arr.copy_from_slice(&b);
    SigningKey::from_keypair_bytes(&arr)
        .map_err(|_| PaserkError::InvalidKey("public half does not match the seed"))
}

/// The key id (`k4.pid.…`) of a public key.
pub fn pid(key: &VerifyingKey) -> String {
    pid_of_bytes(key.as_bytes())
}

/// The key id of raw public-key bytes; refuses anything but 32 bytes.
pub fn pid_of_raw(key: &[u8]) -> Result<String, PaserkError> {
    let arr: [u8; 32] = key.try_into().map_err(|_| PaserkError::Length {
        expected: 32,
        found: key.len(),
    })?;
    Ok(pid_of_bytes(&arr))
}

fn pid_of_bytes(key: &[u8; 32]) -> String {
    let paserk = encode_public_bytes(key);
    let mut h = Blake2bVar::new(33).expect("33 is a valid BLAKE2b output length");
    h.update(PID.as_bytes());
    h.update(paserk.as_bytes());
    let mut out = [0u8; 33];
    h.finalize_variable(&mut out)
        .expect("output buffer has the requested length");
    format!("{PID}{}", URL_SAFE_NO_PAD.encode(out))
}

/// True if `s` looks like a `k4.pid` (prefix and 44 base64url characters).
pub fn is_pid(s: &str) -> bool {
    s.strip_prefix(PID).is_some_and(|d| {
        d.len() == 44
            && d.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_types() {
        let sk = SigningKey::from_bytes(&[5; 32]);
        let s = encode_secret(&sk);
        assert_eq!(decode_secret(&s).unwrap().to_bytes(), sk.to_bytes());
        let p = encode_public(&sk.verifying_key());
        assert_eq!(decode_public(&p).unwrap(), sk.verifying_key());
        assert!(matches!(
            decode_public(&s),
            Err(PaserkError::WrongType { .. })
        ));
        assert!(matches!(
            decode_secret(&p),
            Err(PaserkError::WrongType { .. })
        ));
        assert!(is_pid(&pid(&sk.verifying_key())));
        assert!(!is_pid("k4.pid.short"));
        // A secret whose public half was swapped is refused.
        let mut kp = sk.to_keypair_bytes();
        kp[63] ^= 1;
        let bad = format!("k4.secret.{}", URL_SAFE_NO_PAD.encode(kp));
        assert!(matches!(
            decode_secret(&bad),
            Err(PaserkError::InvalidKey(_))
        ));
    }
}
