//! SSH public keys of users, and the proxies' question "may this key enter
//! that project?".
//!
//! Users register OpenSSH public keys (`ssh-ed25519 AAAA… comment`); the
//! master keeps the key type, the base64 blob, the comment and the
//! OpenSSH `SHA256:` fingerprint in its own table (`ssh_keys`). A proxy
//! that has verified a client's signature asks [`Master::ssh_authorize`]
//! with its proxy key (or the admin key) and gets the same [`OpenProjectResponse`] as
//! opening the project, minted for the collaborator who registered that
//! key, or one uniform refusal that does not tell an unknown project from
//! an unknown key or a key of a non-collaborator.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use cocalc_core::wire::{AddSshKeyRequest, OpenProjectResponse, SshAuthorizeRequest, SshKey};
use cocalc_core::{ApiError, Timestamp, UserId};
use rusqlite::params;
use sha2::Digest as _;

use crate::directory::{Directory, User};
use crate::error::MasterError;
use crate::http::{json, Auth};
use crate::master::{Caller, Master};

/// The table of registered keys (created with the directory).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ssh_keys (
    user TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key_type TEXT NOT NULL,
    blob TEXT NOT NULL,
    comment TEXT NOT NULL,
    added INTEGER NOT NULL,
    PRIMARY KEY (user, fingerprint)
);
CREATE INDEX IF NOT EXISTS ssh_keys_fingerprint ON ssh_keys(fingerprint);
";

/// Key types accepted (those OpenSSH and the proxy both speak).
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Most keys a user may register.
pub const MAX_KEYS_PER_USER: usize = 100;

/// The one answer to every refused SSH authorization.
pub const SSH_REFUSAL: &str = "public key not authorized for this project";

/// Why a public key line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SshKeyError {
    /// Nothing but whitespace.
    #[error("empty public key; expected one OpenSSH line like `ssh-ed25519 AAAA… comment`")]
    Empty,
    /// Longer than any key we accept.
    #[error("public key line is {0} bytes; at most 16384 are accepted")]
    TooLong(usize),
    /// A private key was given.
    #[error("this is a private key; give the public one (the .pub file)")]
    PrivateKey,
    /// The key type is not one we accept.
    #[error("unknown key type {0:?}; accepted: {types}", types = KEY_TYPES.join(", "))]
    UnknownType(String),
    /// Only the type was given.
    #[error("key of type {0} has no base64 key data after the type")]
    MissingBlob(String),
    /// The blob is not base64.
    #[error("key data is not valid base64: {0}")]
    BadBase64(String),
    /// The blob does not start with the type it claims.
    #[error("key data is of type {inside:?}, but the line says {declared:?}")]
    TypeMismatch {
        /// The type on the line.
        declared: String,
        /// The type inside the blob.
        inside: String,
    },
}

impl From<SshKeyError> for MasterError {
    fn from(e: SshKeyError) -> Self {
        MasterError::BadRequest(e.to_string())
    }
}

/// A parsed OpenSSH public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// Key type, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// The blob, base64 with padding (as OpenSSH writes it).
    pub blob: String,
    /// The rest of the line (may be empty).
    pub comment: String,
    /// `SHA256:<base64 without padding>` of the blob, as `ssh-keygen -l` prints.
    pub fingerprint: String,
}

/// Parses one OpenSSH public key line (`type base64 [comment]`), checking
/// the type against [`KEY_TYPES`] and against the type inside the blob.
pub fn parse_public_key(line: &str) -> Result<ParsedKey, SshKeyError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(SshKeyError::Empty);
    }
    if line.len() > 16384 {
        return Err(SshKeyError::TooLong(line.len()));
    }
    if line.starts_with("-----BEGIN") {
        return Err(SshKeyError::PrivateKey);
    }
    let mut parts = line.splitn(3, char::is_whitespace);
    let key_type = parts.next().unwrap_or("").to_string();
    if !KEY_TYPES.contains(&key_type.as_str()) {
        return Err(SshKeyError::UnknownType(key_type));
    }
    let b64 = parts.next().unwrap_or("").trim();
    if b64.is_empty() {
        return Err(SshKeyError::MissingBlob(key_type));
    }
    let comment = parts.next().unwrap_or("").trim().to_string();
    let raw = STANDARD
        .decode(b64)
        .map_err(|e| SshKeyError::BadBase64(e.to_string()))?;
    let inside = raw
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| raw.get(4..4 + n))
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    if inside != key_type {
        return Err(SshKeyError::TypeMismatch {
            declared: key_type,
            inside,
        });
    }
    Ok(ParsedKey {
        fingerprint: fingerprint(&raw),
        blob: STANDARD.encode(&raw),
        key_type,
        comment,
    })
}

/// The OpenSSH SHA-256 fingerprint of a key blob.
pub fn fingerprint(blob: &[u8]) -> String {
    format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(sha2::Sha256::digest(blob))
    )
}

fn db(e: rusqlite::Error) -> MasterError {
    MasterError::Internal(format!("ssh keys: {e}"))
}

impl Directory {
    /// Registers `key` for `user` (idempotent: the same key again keeps its
    /// first entry).
    pub fn add_ssh_key(
        &self,
        user: UserId,
        key: &ParsedKey,
        now: Timestamp,
    ) -> Result<SshKey, MasterError> {
        self.with_conn(|c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM ssh_keys WHERE user = ?1",
                    [user.to_string()],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if n as usize >= MAX_KEYS_PER_USER {
                return Err(MasterError::Conflict(format!(
                    "at most {MAX_KEYS_PER_USER} SSH keys per user; remove one first"
                )));
            }
            c.execute(
                "INSERT INTO ssh_keys (user, fingerprint, key_type, blob, comment, added)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(user, fingerprint) DO NOTHING",
                params![
                    user.to_string(),
                    key.fingerprint,
                    key.key_type,
                    key.blob,
                    key.comment,
                    now.as_millis()
                ],
            )
            .map_err(db)?;
            Ok(())
        })?;
        self.ssh_keys(user)?
            .into_iter()
            .find(|k| k.fingerprint == key.fingerprint)
            .ok_or_else(|| MasterError::Internal("ssh key vanished after insert".into()))
    }

    /// `user`'s keys, oldest first.
    pub fn ssh_keys(&self, user: UserId) -> Result<Vec<SshKey>, MasterError> {
        self.with_conn(|c| {
            let mut st = c
                .prepare(
                    "SELECT fingerprint, key_type, blob, comment, added FROM ssh_keys
                     WHERE user = ?1 ORDER BY added, fingerprint",
                )
                .map_err(db)?;
            let rows = st
                .query_map([user.to_string()], |r| {
                    Ok(SshKey::new(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        Timestamp(r.get(4)?),
                    ))
                })
                .map_err(db)?;
            rows.map(|r| r.map_err(db)).collect()
        })
    }

    /// Removes one of `user`'s keys; `NotFound` if they have none with
    /// that fingerprint.
    pub fn remove_ssh_key(&self, user: UserId, fingerprint: &str) -> Result<(), MasterError> {
        let n = self.with_conn(|c| {
            c.execute(
                "DELETE FROM ssh_keys WHERE user = ?1 AND fingerprint = ?2",
                params![user.to_string(), fingerprint],
            )
            .map_err(db)
        })?;
        if n == 0 {
            return Err(MasterError::NotFound(format!(
                "no SSH key with fingerprint {fingerprint}; see `cocalc ssh-key list`"
            )));
        }
        Ok(())
    }

    /// Users who registered the key with this fingerprint.
    pub fn users_with_ssh_key(&self, fingerprint: &str) -> Result<Vec<UserId>, MasterError> {
        self.with_conn(|c| {
            let mut st = c
                .prepare("SELECT user FROM ssh_keys WHERE fingerprint = ?1 ORDER BY user")
                .map_err(db)?;
            let rows = st
                .query_map([fingerprint], |r| r.get::<_, String>(0))
                .map_err(db)?;
            rows.map(|r| {
                let s = r.map_err(db)?;
                s.parse::<UserId>()
                    .map_err(|_| MasterError::Internal(format!("corrupt user id {s}")))
            })
            .collect()
        })
    }

    fn user_by_id(&self, id: UserId) -> Result<Option<User>, MasterError> {
        self.user(&id.to_string())
    }
}

fn acting_user(caller: &Caller) -> Result<&User, MasterError> {
    match caller {
        Caller::User(u) => Ok(u),
        Caller::Admin => Err(MasterError::BadRequest(
            "SSH keys belong to users; use a user's API key".into(),
        )),
        Caller::Proxy(_) => Err(Caller::proxy_refused()),
    }
}

impl Master {
    /// Registers an SSH public key (one OpenSSH line) for the calling user.
    pub fn add_ssh_key(&self, caller: &Caller, line: &str) -> Result<SshKey, MasterError> {
        let user = acting_user(caller)?;
        let key = parse_public_key(line)?;
        self.directory().add_ssh_key(user.id, &key, self.now())
    }

    /// The calling user's SSH keys.
    pub fn ssh_keys(&self, caller: &Caller) -> Result<Vec<SshKey>, MasterError> {
        self.directory().ssh_keys(acting_user(caller)?.id)
    }

    /// Removes one of the calling user's SSH keys by fingerprint.
    pub fn remove_ssh_key(&self, caller: &Caller, fingerprint: &str) -> Result<(), MasterError> {
        self.directory()
            .remove_ssh_key(acting_user(caller)?.id, fingerprint)
    }

    /// For proxies (a proxy key or the admin key): the project's connect token for the
    /// collaborator who registered `public_key` (the one with the highest
    /// permission if several did), placing the project if needed. Unknown
    /// projects, unknown keys, malformed keys and keys of users who are not
    /// collaborators all get the same 403 ([`SSH_REFUSAL`]).
    pub async fn ssh_authorize(
        &self,
        caller: &Caller,
        req: &SshAuthorizeRequest,
    ) -> Result<OpenProjectResponse, MasterError> {
        if !matches!(caller, Caller::Admin | Caller::Proxy(_)) {
            return Err(MasterError::Forbidden(
                "a proxy key or the admin key is required".into(),
            ));
        }
        let refuse = || MasterError::Forbidden(SSH_REFUSAL.into());
        let Ok(key) = parse_public_key(&req.public_key) else {
            return Err(refuse());
        };
        let dir = self.directory();
        let mut best = None;
        for uid in dir.users_with_ssh_key(&key.fingerprint)? {
            if let Some(perm) = dir.permission(req.project, uid)? {
                if best.as_ref().is_none_or(|(p, _)| perm > *p) {
                    best = Some((perm, uid));
                }
            }
        }
        let Some((_, uid)) = best else {
            return Err(refuse());
        };
        let user = dir.user_by_id(uid)?.ok_or_else(refuse)?;
        match self.open_project(&Caller::User(user), req.project).await {
            Err(MasterError::NotFound(_)) | Err(MasterError::Forbidden(_)) => Err(refuse()),
            other => other,
        }
    }
}

/// The HTTP routes of this module (merged into [`crate::http::router`]).
pub(crate) fn routes() -> axum::Router<std::sync::Arc<Master>> {
    use axum::routing::{delete, post};
    axum::Router::new()
        .route("/v1/users/me/ssh-keys", post(add_key).get(list_keys))
        .route("/v1/users/me/ssh-keys/{fingerprint}", delete(remove_key))
        .route("/v1/ssh/authorize", post(authorize))
}

/// The OpenAPI description of [`routes`].
#[derive(utoipa::OpenApi)]
#[openapi(paths(add_key, list_keys, remove_key, authorize))]
pub(crate) struct SshApi;

type St = axum::extract::State<std::sync::Arc<Master>>;

#[utoipa::path(post, path = "/v1/users/me/ssh-keys", tag = "users", request_body = AddSshKeyRequest, security(("api_key" = [])), responses((status = 201, body = SshKey), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 409, body = ApiError)))]
async fn add_key(
    axum::extract::State(m): St,
    Auth(c): Auth,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, MasterError> {
    use axum::response::IntoResponse;
    let req: AddSshKeyRequest = json(&body)?;
    let key = m.add_ssh_key(&c, &req.public_key)?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(key)).into_response())
}

#[utoipa::path(get, path = "/v1/users/me/ssh-keys", tag = "users", security(("api_key" = [])), responses((status = 200, body = Vec<SshKey>), (status = 400, body = ApiError), (status = 401, body = ApiError)))]
async fn list_keys(
    axum::extract::State(m): St,
    Auth(c): Auth,
) -> Result<axum::Json<Vec<SshKey>>, MasterError> {
    Ok(axum::Json(m.ssh_keys(&c)?))
}

#[utoipa::path(delete, path = "/v1/users/me/ssh-keys/{fingerprint}", tag = "users", params(("fingerprint" = String, Path, description = "`SHA256:…` as `ssh-keygen -l` prints it, percent-encoded")), security(("api_key" = [])), responses((status = 204), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn remove_key(
    axum::extract::State(m): St,
    Auth(c): Auth,
    axum::extract::Path(fp): axum::extract::Path<String>,
) -> Result<axum::http::StatusCode, MasterError> {
    m.remove_ssh_key(&c, &fp)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/ssh/authorize", tag = "admin", request_body = SshAuthorizeRequest, security(("api_key" = [])), responses((status = 200, body = OpenProjectResponse), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn authorize(
    axum::extract::State(m): St,
    Auth(c): Auth,
    body: axum::body::Bytes,
) -> Result<axum::Json<OpenProjectResponse>, MasterError> {
    let req: SshAuthorizeRequest = json(&body)?;
    Ok(axum::Json(m.ssh_authorize(&c, &req).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    // `ssh-keygen -t ed25519 -C alice@example`, and its `ssh-keygen -l`.
    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdgrLq6EQg+0c1tebzpv3B1ieQjD79IQARfd4TNBrg8 alice@example";

    #[test]
    fn openssh_lines_parse_with_fingerprints() {
        let k = parse_public_key(&format!("  {ED}\n")).unwrap();
        assert_eq!(k.key_type, "ssh-ed25519");
        assert_eq!(k.comment, "alice@example");
        assert_eq!(
            k.fingerprint,
            "SHA256:pPZtlamNFmRVOuZojBvD+YU5jExpqGbB/+TIDbDyqqc"
        );
        let no_comment = parse_public_key(&ED[..ED.rfind(' ').unwrap()]).unwrap();
        assert_eq!(no_comment.fingerprint, k.fingerprint);
        assert_eq!(no_comment.comment, "");
    }

    #[test]
    fn malformed_keys_get_precise_errors() {
        let blob = ED.split(' ').nth(1).unwrap();
        for (bad, want) in [
            ("", "empty public key"),
            ("ssh-dss AAAA", "unknown key type \"ssh-dss\""),
            ("ssh-ed25519", "no base64 key data"),
            ("ssh-ed25519 !!!!", "not valid base64"),
            (&format!("ssh-rsa {blob}"), "the line says \"ssh-rsa\""),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
            (&"x".repeat(20000), "at most 16384"),
        ] {
            let e = parse_public_key(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
