//! Proxy keys: API keys that let a `cocalc-proxy` do its work and nothing
//! else.
//!
//! A proxy asks the master for four things: the signing keys (to check
//! connect tokens), a host's endpoint and a host's public key (to route,
//! and to check tunnel handshakes), and SSH authorizations (a connect
//! token for the collaborator whose key an SSH client proved). The admin
//! key can do all of that and everything else besides, so a proxy holding
//! it could create users, rotate the signing keys or mint bootstrap
//! tokens. A proxy key ([`Caller::Proxy`]) can make only those four calls;
//! every other call is refused with 403.
//!
//! The admin creates, lists and revokes them (`cocalc proxy-key
//! create|list|revoke NAME`, `/v1/admin/proxy-keys`). The master keeps a
//! hash of each key, never the key; a revoked key is refused at its next
//! call, since lookups are not cached.

use cocalc_core::wire::{CreateProxyKeyRequest, CreatedProxyKey, ProxyKey};
use cocalc_core::{ApiError, Timestamp};
use rusqlite::{params, OptionalExtension as _};

use crate::directory::{hash_secret, new_api_key, Directory};
use crate::error::MasterError;
use crate::http::{json, Auth};
use crate::master::{Caller, Master};

/// The table of proxy keys (created with the directory).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS proxy_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
";

fn db(e: rusqlite::Error) -> MasterError {
    MasterError::Internal(format!("proxy keys: {e}"))
}

/// Checks a proxy key's name: 1 to 64 characters of `[A-Za-z0-9._-]`.
fn check_name(name: &str) -> Result<(), MasterError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MasterError::BadRequest(format!(
            "proxy key name {name:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        )))
    }
}

impl Directory {
    /// Stores a new proxy key (its hash); `Conflict` if the name is taken.
    pub fn create_proxy_key(
        &self,
        name: &str,
        key_hash: &str,
        now: Timestamp,
    ) -> Result<ProxyKey, MasterError> {
        check_name(name)?;
        self.with_conn(|c| {
            let n = c
                .execute(
                    "INSERT INTO proxy_keys (name, key_hash, created) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO NOTHING",
                    params![name, key_hash, now.as_millis()],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(MasterError::Conflict(format!(
                    "a proxy key named {name:?} exists; revoke it first or pick another name"
                )));
            }
            Ok(ProxyKey::new(name, now))
        })
    }

    /// The proxy key with this hash, if any.
    pub fn proxy_key_by_hash(&self, key_hash: &str) -> Result<Option<ProxyKey>, MasterError> {
        self.with_conn(|c| {
            c.query_row(
                "SELECT name, created FROM proxy_keys WHERE key_hash = ?1",
                [key_hash],
                |r| Ok(ProxyKey::new(r.get::<_, String>(0)?, Timestamp(r.get(1)?))),
            )
            .optional()
            .map_err(db)
        })
    }

    /// Every proxy key, by name.
    pub fn proxy_keys(&self) -> Result<Vec<ProxyKey>, MasterError> {
        self.with_conn(|c| {
            let mut st = c
                .prepare("SELECT name, created FROM proxy_keys ORDER BY name")
                .map_err(db)?;
            let rows = st
                .query_map([], |r| {
                    Ok(ProxyKey::new(r.get::<_, String>(0)?, Timestamp(r.get(1)?)))
                })
                .map_err(db)?;
            rows.map(|r| r.map_err(db)).collect()
        })
    }

    /// Deletes a proxy key; `NotFound` if there is none by that name.
    pub fn revoke_proxy_key(&self, name: &str) -> Result<(), MasterError> {
        let n = self.with_conn(|c| {
            c.execute("DELETE FROM proxy_keys WHERE name = ?1", [name])
                .map_err(db)
        })?;
        if n == 0 {
            return Err(MasterError::NotFound(format!(
                "no proxy key named {name:?}; see `cocalc proxy-key list`"
            )));
        }
        Ok(())
    }
}

impl Master {
    /// Creates a proxy key named `name` (admin only); the key is in the
    /// answer and nowhere else.
    pub fn create_proxy_key(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<CreatedProxyKey, MasterError> {
        caller.require_admin()?;
        let key = new_api_key(crate::master::random()?);
        let info = self
            .directory()
            .create_proxy_key(name, &hash_secret(&key), self.now())?;
        Ok(CreatedProxyKey::new(info, key))
    }

    /// Every proxy key (admin only).
    pub fn proxy_keys(&self, caller: &Caller) -> Result<Vec<ProxyKey>, MasterError> {
        caller.require_admin()?;
        self.directory().proxy_keys()
    }

    /// Revokes the proxy key named `name` (admin only).
    pub fn revoke_proxy_key(&self, caller: &Caller, name: &str) -> Result<(), MasterError> {
        caller.require_admin()?;
        self.directory().revoke_proxy_key(name)
    }
}

/// The HTTP routes of this module (merged into [`crate::http::router`]).
pub(crate) fn routes() -> axum::Router<std::sync::Arc<Master>> {
    use axum::routing::{delete, post};
    axum::Router::new()
        .route("/v1/admin/proxy-keys", post(create).get(list))
        .route("/v1/admin/proxy-keys/{name}", delete(revoke))
}

/// The OpenAPI description of [`routes`].
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, revoke))]
pub(crate) struct ProxyKeyApi;

type St = axum::extract::State<std::sync::Arc<Master>>;

#[utoipa::path(post, path = "/v1/admin/proxy-keys", tag = "admin", request_body = CreateProxyKeyRequest, security(("api_key" = [])), responses((status = 201, body = CreatedProxyKey), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 409, body = ApiError)))]
async fn create(
    axum::extract::State(m): St,
    Auth(c): Auth,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, MasterError> {
    use axum::response::IntoResponse;
    let req: CreateProxyKeyRequest = json(&body)?;
    let created = m.create_proxy_key(&c, &req.name)?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(created)).into_response())
}

#[utoipa::path(get, path = "/v1/admin/proxy-keys", tag = "admin", security(("api_key" = [])), responses((status = 200, body = Vec<ProxyKey>), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
async fn list(
    axum::extract::State(m): St,
    Auth(c): Auth,
) -> Result<axum::Json<Vec<ProxyKey>>, MasterError> {
    Ok(axum::Json(m.proxy_keys(&c)?))
}

#[utoipa::path(delete, path = "/v1/admin/proxy-keys/{name}", tag = "admin", params(("name" = String, Path, description = "the proxy key's name")), security(("api_key" = [])), responses((status = 204), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn revoke(
    axum::extract::State(m): St,
    Auth(c): Auth,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<axum::http::StatusCode, MasterError> {
    m.revoke_proxy_key(&c, &name)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
