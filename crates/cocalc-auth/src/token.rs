//! Connect tokens: minting ([`Minter`]) and verification ([`Verifier`]).
//!
//! A connect token is a PASETO v4.public token whose payload is a JSON
//! object of these claims (the time claims are RFC 3339 strings, as the
//! PASETO spec registers them):
//!
//! | claim | meaning |
//! | --- | --- |
//! | `iss` | issuer (the master's name) |
//! | `sub` | user id |
//! | `aud` | `cocalc-host:<host id>`: the only host that accepts it |
//! | `project` | project id |
//! | `gen` | the project's placement generation |
//! | `perm` | `read`, `write` or `admin` |
//! | `iat`, `nbf`, `exp` | issued at, not before, expires |
//! | `jti` | unique token id (128 random bits, hex) |
//!
//! and whose footer is `{"kid":"k4.pid.…"}`, naming the signing key.
//!
//! Verification order (the first failure is the error): length cap, header,
//! segments, footer and key id, key known and not retired, signature, claims
//! syntax, audience, lifetime bounds, `nbf`/`exp` with skew. A verified token
//! is cached by its exact string; a cache hit skips the cryptography but
//! still checks `nbf`/`exp` against the clock.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cocalc_core::{
    Generation, HostId, Permission, ProjectId, SharedClock, Timestamp, TokenClaims, TokenError,
    TokenVerifier, UserId,
};
use ed25519_dalek::SigningKey;
use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::keys::{KeyError, KeySet};
use crate::paserk;
use crate::paseto;

/// Prefix of the `aud` claim.
pub const AUDIENCE_PREFIX: &str = "cocalc-host:";

/// Tunables of token lifetimes and verification.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    /// Clock skew allowed on `nbf` and `exp` (default 30 s).
    pub skew: Duration,
    /// Shortest lifetime (`exp - iat`) accepted (default 60 s).
    pub min_ttl: Duration,
    /// Longest lifetime accepted (default 30 min).
    pub max_ttl: Duration,
    /// Longest token accepted, in bytes, checked before any decoding
    /// (default 2048; a connect token is about 500).
    pub max_token_len: usize,
    /// Verified tokens kept in the cache (default 100 000).
    pub cache_capacity: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            skew: Duration::from_secs(30),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(30 * 60),
            max_token_len: 2048,
            cache_capacity: 100_000,
        }
    }
}

impl TokenPolicy {
    fn check_ttl(&self, ttl_secs: i64) -> Result<(), TokenError> {
        let (min, max) = (self.min_ttl.as_secs(), self.max_ttl.as_secs());
        if ttl_secs < min as i64 || ttl_secs > max as i64 {
            return Err(TokenError::BadTtl {
                ttl_secs,
                min_secs: min,
                max_secs: max,
            });
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    iss: Cow<'a, str>,
    #[serde(borrow)]
    sub: Cow<'a, str>,
    #[serde(borrow)]
    aud: Cow<'a, str>,
    #[serde(borrow)]
    project: Cow<'a, str>,
    gen: u64,
    perm: Permission,
    #[serde(borrow)]
    iat: Cow<'a, str>,
    #[serde(borrow)]
    nbf: Cow<'a, str>,
    #[serde(borrow)]
    exp: Cow<'a, str>,
    #[serde(borrow)]
    jti: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct Footer<'a> {
    #[serde(borrow)]
    kid: Cow<'a, str>,
}

/// Longest footer parsed (before signature verification, so it is capped).
const MAX_FOOTER: usize = 128;

/// Formats a timestamp as RFC 3339 in UTC with whole seconds.
pub fn format_time(t: Timestamp) -> String {
    OffsetDateTime::from_unix_timestamp(t.as_secs())
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// Parses an RFC 3339 date-time (any offset) into a timestamp.
pub fn parse_time(claim: &'static str, s: &str) -> Result<Timestamp, TokenError> {
    let d = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|_| TokenError::Claims(format!("{claim} is not an RFC 3339 date-time")))?;
    let ms = d.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms)
        .map(Timestamp)
        .map_err(|_| TokenError::Claims(format!("{claim} is out of range")))
}

/// Signs exactly these claims with `key`; the footer names `key`'s id.
///
/// This does no policy checks (lifetime, clock): [`Minter::mint`] is the
/// normal way to make tokens. Tests and tools use this to craft tokens.
pub fn encode_claims(claims: &TokenClaims, key: &SigningKey) -> String {
    encode_claims_with_kid(claims, key, &paserk::pid(&key.verifying_key()))
}

/// [`encode_claims`] with `key`'s id already known (the minter keeps it).
fn encode_claims_with_kid(claims: &TokenClaims, key: &SigningKey, kid: &str) -> String {
    let payload = Payload {
        iss: Cow::Borrowed(&claims.issuer),
        sub: Cow::Owned(claims.user.to_string()),
        aud: Cow::Owned(format!("{AUDIENCE_PREFIX}{}", claims.host)),
        project: Cow::Owned(claims.project.to_string()),
        gen: claims.generation.0,
        perm: claims.permission,
        iat: Cow::Owned(format_time(claims.issued_at)),
        nbf: Cow::Owned(format_time(claims.not_before)),
        exp: Cow::Owned(format_time(claims.expires)),
        jti: Cow::Borrowed(&claims.token_id),
    };
    let body = serde_json::to_vec(&payload).expect("claims always serialise");
    let footer = serde_json::to_vec(&Footer {
        kid: Cow::Borrowed(kid),
    })
    .expect("footer always serialises");
    paseto::sign(key, &body, &footer, b"")
}

/// What to mint a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintRequest {
    /// The user.
    pub user: UserId,
    /// The project.
    pub project: ProjectId,
    /// The host that will accept it.
    pub host: HostId,
    /// The project's current placement generation.
    pub generation: Generation,
    /// What the bearer may do.
    pub permission: Permission,
    /// Lifetime; must lie within the minter's policy bounds.
    pub ttl: Duration,
}

/// Why minting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// No key to sign with.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The requested lifetime is outside the policy bounds.
    #[error("requested token lifetime {ttl_secs} s outside allowed {min_secs}..={max_secs} s")]
    Ttl {
        /// Requested seconds.
        ttl_secs: u64,
        /// Lower bound.
        min_secs: u64,
        /// Upper bound.
        max_secs: u64,
    },
}

/// Mints connect tokens with the newest key of a [`KeySet`]. Only the
/// master holds one of these.
#[derive(Debug)]
pub struct Minter {
    keys: KeySet,
    issuer: String,
    clock: SharedClock,
    policy: TokenPolicy,
    ids: IdPool,
}

/// Bytes from the OS random source, fetched 1 KiB at a time and handed out
/// 16 at a time as token ids, each byte once: one `getrandom` call per 64
/// tokens instead of one per token (a system call was a visible part of
/// minting).
struct IdPool(std::sync::Mutex<([u8; 1024], usize)>);

impl Default for IdPool {
    fn default() -> Self {
        // Empty: the first `next` fills it.
        IdPool(std::sync::Mutex::new(([0; 1024], 1024)))
    }
}

impl std::fmt::Debug for IdPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdPool(<random>)")
    }
}

impl IdPool {
    fn next(&self) -> Result<[u8; 16], KeyError> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (buf, used) = &mut *g;
        if *used + 16 > buf.len() {
            getrandom::getrandom(buf).map_err(|e| KeyError::Random(e.to_string()))?;
            *used = 0;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&buf[*used..*used + 16]);
        // Never hand the same bytes out twice.
        buf[*used..*used + 16].fill(0);
        *used += 16;
        Ok(id)
    }
}

impl Minter {
    /// A minter signing as `issuer` with `keys`, reading time from `clock`.
    pub fn new(issuer: impl Into<String>, keys: KeySet, clock: SharedClock) -> Self {
        Minter {
            keys,
            issuer: issuer.into(),
            clock,
            policy: TokenPolicy::default(),
            ids: IdPool::default(),
        }
    }

    /// Replaces the lifetime policy.
    pub fn with_policy(mut self, policy: TokenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The key set (to publish its public half to hosts).
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Mints a token; returns it with the claims it carries.
    pub fn mint(&self, req: &MintRequest) -> Result<(String, TokenClaims), MintError> {
        let jti = hex16(&self.ids.next()?);
        self.mint_with_id(req, jti)
    }

    /// Mints with a caller-chosen `jti` (a seeded RNG in simulations).
    pub fn mint_with_id(
        &self,
        req: &MintRequest,
        token_id: String,
    ) -> Result<(String, TokenClaims), MintError> {
        let ttl = req.ttl.as_secs();
        let (min, max) = (self.policy.min_ttl.as_secs(), self.policy.max_ttl.as_secs());
        if ttl < min || ttl > max {
            return Err(MintError::Ttl {
                ttl_secs: ttl,
                min_secs: min,
                max_secs: max,
            });
        }
        let key = self.keys.signing_key()?;
        let sk = key.secret.as_ref().ok_or(KeyError::NoSigningKey)?;
        // Whole seconds: the wire format carries no fractions.
        let now = Timestamp::from_secs(self.clock.now().as_secs());
        let claims = TokenClaims::new(
            self.issuer.clone(),
            req.user,
            req.project,
            req.host,
            req.generation,
            req.permission,
            now,
            now,
            Timestamp::from_secs(now.as_secs() + ttl as i64),
            token_id,
            key.kid.clone(),
        );
        Ok((encode_claims_with_kid(&claims, sk, &key.kid), claims))
    }
}

fn hex16(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for x in b {
        s.push(HEX[usize::from(x >> 4)] as char);
        s.push(HEX[usize::from(x & 15)] as char);
    }
    s
}

/// Verifies connect tokens addressed to one host.
///
/// Implements [`TokenVerifier`]; [`Verifier::verify`] is the same check as
/// a plain synchronous call. Key rotation: [`Verifier::set_keys`] swaps the
/// trusted keys and empties the cache, so a retired key stops working at
/// once, cached tokens included.
pub struct Verifier {
    /// `None`: any audience (ingress that routes each token to its host).
    host: Option<HostId>,
    keys: RwLock<Arc<KeySet>>,
    clock: SharedClock,
    policy: TokenPolicy,
    /// Keyed by the token; hashed with foldhash (seeded per process), as
    /// every request hashes a token of a few hundred bytes. A hit costs a
    /// shard read lock and one atomic bit (quick_cache, S3-FIFO).
    cache:
        Cache<Arc<str>, Arc<TokenClaims>, quick_cache::UnitWeighter, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("host", &self.host)
            .field("policy", &self.policy)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `host` trusting `keys`, with the default policy.
    pub fn new(host: HostId, keys: KeySet, clock: SharedClock) -> Self {
        Verifier::with_policy(host, keys, clock, TokenPolicy::default())
    }

    /// A verifier for ingress (the proxy): it checks everything except the
    /// audience, and the caller must deliver each request only to the host
    /// the token names (`claims.host`), which checks the audience again.
    /// Never use this on a host.
    pub fn for_ingress(keys: KeySet, clock: SharedClock) -> Self {
        let mut v = Verifier::new(HostId::from_bytes([0; 16]), keys, clock);
        v.host = None;
        v
    }

    /// A verifier with an explicit policy.
    pub fn with_policy(
        host: HostId,
        keys: KeySet,
        clock: SharedClock,
        policy: TokenPolicy,
    ) -> Self {
        // Bounded by count; an expired entry is refused at its next use
        // (every hit checks `nbf`/`exp`) and evicted as new tokens come.
        let capacity = usize::try_from(policy.cache_capacity)
            .unwrap_or(usize::MAX)
            .max(1);
        let cache = Cache::with(
            capacity,
            capacity as u64,
            quick_cache::UnitWeighter,
            foldhash::fast::RandomState::default(),
            Default::default(),
        );
        Verifier {
            host: Some(host),
            keys: RwLock::new(Arc::new(keys)),
            clock,
            policy,
            cache,
        }
    }

    /// The host this verifier accepts tokens for (`None` for ingress).
    pub fn host(&self) -> Option<HostId> {
        self.host
    }

    /// Replaces the trusted keys and empties the cache.
    pub fn set_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.cache.clear();
    }

    /// Verifies `token` (cached).
    pub fn verify(&self, token: &str) -> Result<Arc<TokenClaims>, TokenError> {
        if token.len() > self.policy.max_token_len {
            return Err(TokenError::TooLong {
                len: token.len(),
                max: self.policy.max_token_len,
            });
        }
        if let Some(claims) = self.cache.get(token) {
            claims.check_time(self.clock.now(), self.policy.skew)?;
            return Ok(claims);
        }
        let claims = Arc::new(self.verify_uncached(token)?);
        self.cache.insert(Arc::from(token), claims.clone());
        Ok(claims)
    }

    /// Verifies `token` without consulting or filling the cache.
    pub fn verify_uncached(&self, token: &str) -> Result<TokenClaims, TokenError> {
        if token.len() > self.policy.max_token_len {
            return Err(TokenError::TooLong {
                len: token.len(),
                max: self.policy.max_token_len,
            });
        }
        let parsed = paseto::parse(token)?;
        if parsed.footer.is_empty() {
            return Err(TokenError::Footer("missing (a key id is required)"));
        }
        if parsed.footer.len() > MAX_FOOTER {
            return Err(TokenError::Footer("too long"));
        }
        let footer: Footer<'_> = serde_json::from_slice(&parsed.footer)
            .map_err(|_| TokenError::Footer("not a JSON object with a string \"kid\""))?;
        if !paserk::is_pid(&footer.kid) {
            return Err(TokenError::Footer("kid is not a k4.pid"));
        }
        let public = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let entry = keys
                .get(&footer.kid)
                .ok_or_else(|| TokenError::UnknownKey {
                    kid: footer.kid.to_string(),
                })?;
            if entry.retired {
                return Err(TokenError::RetiredKey {
                    kid: footer.kid.to_string(),
                });
            }
            entry.public
        };
        let body = parsed.verify(&public, b"")?;
        let claims = decode_payload(&body, &footer.kid)?;
        if let Some(host) = self.host {
            if claims.host != host {
                return Err(TokenError::WrongHost {
                    expected: host,
                    found: claims.host,
                });
            }
        }
        self.policy
            .check_ttl(claims.expires.as_secs() - claims.issued_at.as_secs())?;
        claims.check_time(self.clock.now(), self.policy.skew)?;
        Ok(claims)
    }
}

fn decode_payload(body: &[u8], kid: &str) -> Result<TokenClaims, TokenError> {
    let p: Payload<'_> =
        serde_json::from_slice(body).map_err(|e| TokenError::Claims(e.to_string()))?;
    let id = |what: &'static str, s: &str| -> Result<[u8; 16], TokenError> {
        cocalc_core::id::parse_uuid(what, s).map_err(|e| TokenError::Claims(e.to_string()))
    };
    let host = p
        .aud
        .strip_prefix(AUDIENCE_PREFIX)
        .ok_or_else(|| TokenError::Claims(format!("aud must start with {AUDIENCE_PREFIX:?}")))?;
    let issued_at = parse_time("iat", &p.iat)?;
    let not_before = parse_time("nbf", &p.nbf)?;
    let expires = parse_time("exp", &p.exp)?;
    if p.jti.is_empty() || p.jti.len() > 64 {
        return Err(TokenError::Claims(
            "jti must have 1 to 64 characters".into(),
        ));
    }
    Ok(TokenClaims::new(
        p.iss.into_owned(),
        UserId::from_bytes(id("user", &p.sub)?),
        ProjectId::from_bytes(id("project", &p.project)?),
        HostId::from_bytes(id("host", host)?),
        Generation(p.gen),
        p.perm,
        issued_at,
        not_before,
        expires,
        p.jti.into_owned(),
        kid.to_string(),
    ))
}

#[async_trait]
impl TokenVerifier for Verifier {
    async fn verify(&self, token: &str) -> Result<Arc<TokenClaims>, TokenError> {
        Verifier::verify(self, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_distinct_across_pool_refills() {
        let pool = IdPool::default();
        let ids: std::collections::HashSet<[u8; 16]> =
            (0..1000).map(|_| pool.next().unwrap()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&[0; 16]));
        assert_eq!(hex16(&[0xab; 16]), "ab".repeat(16));
        assert_eq!(format!("{pool:?}"), "IdPool(<random>)");
    }
}
