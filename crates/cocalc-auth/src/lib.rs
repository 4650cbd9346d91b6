//! # cocalc-auth
//!
//! Who may reach which project, decided without calling the master on the
//! request path.
//!
//! * **Connect tokens** ([`token`]): PASETO v4.public (Ed25519) tokens with
//!   claims `iss`, `sub` (user), `aud` (host), `project`, `gen` (placement
//!   generation), `perm`, `iat`, `nbf`, `exp`, `jti`, and a footer naming the
//!   signing key by its PASERK id (`k4.pid`). The master mints them with a
//!   [`Minter`]; hosts and proxies check them with a [`Verifier`], which
//!   caches verified tokens and still checks expiry on every use.
//! * **Keys** ([`KeySet`]): several keys by id; the newest signs, every
//!   unretired one verifies, so rotation needs no cutover. Stored as PASERK
//!   files, secrets with mode 0600.
//! * **ACL cache** ([`AclCache`]): `(project, user) → permission` with a TTL,
//!   push invalidation, per-user and per-token revocation, and a bounded
//!   offline grace when the master is unreachable.
//! * **Gate** ([`Gate`]): token, project, revocation and ACL checks in one
//!   call, every decision sent to an [`AuditSink`].
//!
//! The PASETO and PASERK encodings are implemented here on `ed25519-dalek`,
//! `blake2` and `base64`, and checked against the standard's test vectors.
//! Nothing in this crate does network I/O.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cocalc_auth::{KeySet, MintRequest, Minter, Verifier};
//! use cocalc_core::{Generation, HostId, Permission, ProjectId, SystemClock, TokenError, UserId};
//!
//! let clock = Arc::new(SystemClock);
//! let keys = KeySet::generate(cocalc_core::Clock::now(&SystemClock))?;
//! let minter = Minter::new("master", keys.clone(), clock.clone());
//! let host = HostId::new_v4([1; 16]);
//! let (token, _claims) = minter.mint(&MintRequest {
//!     user: UserId::new_v4([2; 16]),
//!     project: ProjectId::new_v4([3; 16]),
//!     host,
//!     generation: Generation(1),
//!     permission: Permission::Write,
//!     ttl: Duration::from_secs(600),
//! })?;
//!
//! // A host holds only the public keys.
//! let verifier = Verifier::new(host, keys.public_only(), clock.clone());
//! let claims = verifier.verify(&token)?;
//! assert_eq!(claims.permission, Permission::Write);
//!
//! // Another host refuses it.
//! let other = Verifier::new(HostId::new_v4([9; 16]), keys.public_only(), clock);
//! assert!(matches!(other.verify(&token), Err(TokenError::WrongHost { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod acl;
pub mod audit;
pub mod gate;
pub mod host_auth;
pub mod keys;
pub mod paserk;
pub mod paseto;
pub mod token;

pub use acl::{AccessError, AclCache, AclEntry, AclPolicy};
pub use audit::{AuditSink, LogBudget, MemoryAuditSink, TracingAuditSink};
pub use gate::{AclRefresher, AuthError, Gate, Grant, RefreshError};
pub use host_auth::{BootstrapToken, HostAuthError};
pub use keys::{KeyEntry, KeyError, KeySet};
pub use token::{encode_claims, MintError, MintRequest, Minter, TokenPolicy, Verifier};
