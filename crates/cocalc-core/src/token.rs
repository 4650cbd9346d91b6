//! Connect tokens as the data plane sees them: [`TokenClaims`], the
//! [`TokenVerifier`] trait, and [`TokenError`].
//!
//! The real verifier (PASETO v4.public, key sets, cache) lives in
//! `cocalc-auth`; [`StaticTokenVerifier`] here is the reference
//! implementation for tests and embedders who mint nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId, UserId};
use crate::record::{Generation, Permission};
use crate::time::{SharedClock, Timestamp};

/// The verified content of a connect token.
///
/// Only a [`TokenVerifier`] produces these from a token; holding one means
/// the signature, key id, validity window, TTL bounds and audience were
/// checked. The caller still checks the project ([`TokenClaims::require_project`])
/// and the ACL/revocation state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TokenClaims {
    /// Who minted it (the master's name).
    pub issuer: String,
    /// The user it was issued to (`sub`).
    pub user: UserId,
    /// The project it opens.
    pub project: ProjectId,
    /// The host it is for (the audience).
    pub host: HostId,
    /// The project's placement generation at minting time.
    pub generation: Generation,
    /// The most the bearer may do (the host's ACL may allow less).
    pub permission: Permission,
    /// `iat`.
    pub issued_at: Timestamp,
    /// `nbf`.
    pub not_before: Timestamp,
    /// `exp`.
    pub expires: Timestamp,
    /// `jti`: unique per token, for revoking one token.
    pub token_id: String,
    /// Key id (PASERK `k4.pid`) of the signing key.
    pub key_id: String,
}

impl TokenClaims {
    /// Claims with every field given (verifiers and minting code use this).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        issuer: String,
        user: UserId,
        project: ProjectId,
        host: HostId,
        generation: Generation,
        permission: Permission,
        issued_at: Timestamp,
        not_before: Timestamp,
        expires: Timestamp,
        token_id: String,
        key_id: String,
    ) -> Self {
        TokenClaims {
            issuer,
            user,
            project,
            host,
            generation,
            permission,
            issued_at,
            not_before,
            expires,
            token_id,
            key_id,
        }
    }

    /// `Ok` when the token is for `project`, else [`TokenError::WrongProject`].
    pub fn require_project(&self, project: ProjectId) -> Result<(), TokenError> {
        if self.project == project {
            Ok(())
        } else {
            Err(TokenError::WrongProject {
                expected: project,
                found: self.project,
            })
        }
    }

    /// Checks `exp` and `nbf` against `now`, allowing `skew` either way.
    pub fn check_time(&self, now: Timestamp, skew: Duration) -> Result<(), TokenError> {
        if now >= self.expires.saturating_add(skew) {
            return Err(TokenError::Expired {
                expired_at: self.expires,
                now,
            });
        }
        if now.saturating_add(skew) < self.not_before {
            return Err(TokenError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        Ok(())
    }
}

/// Why a token was refused. Every variant names the one check that failed;
/// all are the bearer's fault (HTTP 401/403), none is retryable as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Longer than the verifier accepts; refused before decoding.
    #[error("token too long: {len} bytes, at most {max} accepted")]
    TooLong {
        /// Length seen.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Not of the shape `v4.public.<payload>[.<footer>]`.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A PASETO token of another version or purpose (`v4.local`, `v3.public`).
    #[error("unsupported token header {found:?}: only v4.public is accepted")]
    WrongHeader {
        /// The header seen (at most 16 characters of it).
        found: String,
    },
    /// A segment is not canonical unpadded base64url.
    #[error("invalid base64url in token {segment}")]
    Base64 {
        /// `payload` or `footer`.
        segment: &'static str,
    },
    /// The footer is missing, not JSON, or has no usable `kid`.
    #[error("invalid token footer: {0}")]
    Footer(&'static str),
    /// No key with this id is known.
    #[error("unknown signing key {kid}")]
    UnknownKey {
        /// The key id from the footer.
        kid: String,
    },
    /// The key exists but was retired.
    #[error("signing key {kid} is retired")]
    RetiredKey {
        /// The key id from the footer.
        kid: String,
    },
    /// The Ed25519 signature does not match payload, footer and header.
    #[error("token signature is invalid")]
    BadSignature,
    /// The signed payload is not the claims this platform mints.
    #[error("invalid token claims: {0}")]
    Claims(String),
    /// `exp` (plus allowed skew) has passed.
    #[error("token expired at {expired_at:?} (now {now:?})")]
    Expired {
        /// `exp`.
        expired_at: Timestamp,
        /// The verifier's time.
        now: Timestamp,
    },
    /// `nbf` (minus allowed skew) is still ahead.
    #[error("token not valid before {not_before:?} (now {now:?})")]
    NotYetValid {
        /// `nbf`.
        not_before: Timestamp,
        /// The verifier's time.
        now: Timestamp,
    },
    /// `exp - iat` is outside the allowed TTL bounds.
    #[error("token lifetime {ttl_secs} s outside allowed {min_secs}..={max_secs} s")]
    BadTtl {
        /// `exp - iat` in seconds.
        ttl_secs: i64,
        /// Lower bound.
        min_secs: u64,
        /// Upper bound.
        max_secs: u64,
    },
    /// The token is for another host.
    #[error("token is for host {found}, this is host {expected}")]
    WrongHost {
        /// This host.
        expected: HostId,
        /// The token's audience.
        found: HostId,
    },
    /// The token is for another project.
    #[error("token is for project {found}, not {expected}")]
    WrongProject {
        /// The project being accessed.
        expected: ProjectId,
        /// The token's project.
        found: ProjectId,
    },
}

/// Turns a token string into verified claims.
///
/// Contract for every implementation:
/// 1. `Ok` only if the token is authentic (signed by a known, unretired key),
///    inside its validity window at the verifier's clock (with its skew), has
///    an acceptable lifetime, and is addressed to this verifier's host.
/// 2. Each refusal returns the [`TokenError`] variant of the first failed
///    check; malformed input of any length or content returns an error, never
///    panics.
/// 3. Verification has no side effects visible to callers; repeating it with
///    the same token and clock gives the same answer (caching is allowed, but
///    the time checks run on every call).
#[async_trait]
pub trait TokenVerifier: Send + Sync {
    /// Verifies `token` and returns its claims.
    async fn verify(&self, token: &str) -> Result<Arc<TokenClaims>, TokenError>;
}

/// Reference verifier: a fixed table of token strings and their claims.
/// Checks the time window against its clock and the audience; no
/// cryptography. For tests and for embedders whose tokens are checked
/// elsewhere.
#[derive(Debug)]
pub struct StaticTokenVerifier {
    host: HostId,
    clock: SharedClock,
    tokens: HashMap<String, Arc<TokenClaims>>,
}

impl StaticTokenVerifier {
    /// An empty table for `host`, reading time from `clock`.
    pub fn new(host: HostId, clock: SharedClock) -> Self {
        StaticTokenVerifier {
            host,
            clock,
            tokens: HashMap::new(),
        }
    }

    /// Adds a token string that verifies to `claims`.
    pub fn insert(&mut self, token: impl Into<String>, claims: TokenClaims) {
        self.tokens.insert(token.into(), Arc::new(claims));
    }
}

#[async_trait]
impl TokenVerifier for StaticTokenVerifier {
    async fn verify(&self, token: &str) -> Result<Arc<TokenClaims>, TokenError> {
        let claims = self.tokens.get(token).ok_or(TokenError::BadSignature)?;
        claims.check_time(self.clock.now(), Duration::ZERO)?;
        if claims.host != self.host {
            return Err(TokenError::WrongHost {
                expected: self.host,
                found: claims.host,
            });
        }
        Ok(claims.clone())
    }
}
