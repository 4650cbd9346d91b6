//! The master's HTTP JSON API, as an axum [`Router`] ([`router`]), so
//! tests and embedders can serve it on any listener or call it in-process.
//!
//! Users and the operator authenticate with `Authorization: Bearer <key>`.
//! Hosts sign their control calls with their host key
//! ([`cocalc_auth::host_auth`]). Every error is an [`ApiError`] JSON body
//! with its status code.
//!
//! | method | path | who | what |
//! | --- | --- | --- | --- |
//! | GET | `/v1/health` | anyone | liveness |
//! | POST | `/v1/users` | admin | create a user `{name}` → `{id, name, api_key}` |
//! | POST | `/v1/users/{user}/signout` | that user, admin | revoke their tokens everywhere |
//! | GET, POST | `/v1/projects` | user | list / create (`CreateProjectRequest`) |
//! | GET | `/v1/projects/{p}` | collaborator | `ProjectInfo` (`p`: id or name) |
//! | PUT, DELETE | `/v1/projects/{p}/collaborators/{user}` | project admin | `{permission}` / remove |
//! | POST | `/v1/projects/{p}/open` | collaborator | place if needed; `OpenProjectResponse` |
//! | GET | `/v1/projects/{p}/placement` | collaborator | `PlacementExplanation` |
//! | POST | `/v1/projects/{p}/exec` | writer | `ExecRequest` → `ExecResult`, forwarded to the project's host |
//! | POST | `/v1/projects/{p}/start`, `/stop` | writer | forwarded to the project's host |
//! | POST | `/v1/projects/{p}/replace` | admin | re-place a project whose host is down or draining (generation + 1) |
//! | POST | `/v1/admin/bootstrap-tokens` | admin | one-time host bootstrap token |
//! | POST | `/v1/admin/keys/rotate` | admin | new signing key (old ones keep verifying) |
//! | GET | `/v1/hosts` | admin | every `HostInfo` |
//! | GET | `/v1/hosts/{h}/endpoint` | any API key | how to reach host `h` (for proxies) |
//! | GET | `/v1/keys` | anyone | the public token-signing keys (PASERK), newest first |
//! | POST | `/v1/hosts/{h}/drain`, `/undrain` | admin | stop/resume new placements |
//! | POST | `/v1/hosts/register` | host | `RegisterHostRequest` → `LeaseGrant` |
//! | POST | `/v1/hosts/{h}/keepalive` | host (signed) | `KeepaliveRequest` → `LeaseGrant` |
//! | POST | `/v1/hosts/{h}/activity` | host (signed) | `ActivityReport` |
//! | GET | `/v1/hosts/{h}/acl?project=&user=` | host (signed) | `{permission, not_before}` |
//! | GET | `/v1/hosts/{h}/push` | host (signed) | WebSocket of `PushFrame`s |
//! | POST, GET | `/v1/users/me/ssh-keys` | user | register an SSH public key (`AddSshKeyRequest` → `SshKey`) / list them |
//! | DELETE | `/v1/users/me/ssh-keys/{fingerprint}` | user | remove one (`SHA256:…`, percent-encoded) |
//! | POST | `/v1/ssh/authorize` | admin (proxies) | `SshAuthorizeRequest` → `OpenProjectResponse`, or one uniform 403 |
//! | GET | `/openapi.json` | anyone | this API as an OpenAPI document ([`openapi`]) |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cocalc_auth::host_auth::{self, HEADER_HOST, HEADER_SIGNATURE, HEADER_TIME};
use cocalc_core::wire::{
    ActivityReport, CreateProjectRequest, KeepaliveRequest, LeaseGrant, OpenProjectResponse,
    PlacementExplanation, ProjectInfo, PushFrame, RegisterHostRequest,
};
use cocalc_core::{ApiError, HostId, HostInfo, Permission, ProjectId, Timestamp, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::error::MasterError;
use crate::master::{Caller, Master};

type AppState = Arc<Master>;
type Result<T> = std::result::Result<T, MasterError>;

/// The API router over `master`.
pub fn router(master: Arc<Master>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/users", post(create_user))
        .route("/v1/users/{user}/signout", post(sign_out))
        .route("/v1/projects", get(list_projects).post(create_project))
        .route("/v1/projects/{p}", get(get_project))
        .route(
            "/v1/projects/{p}/collaborators/{user}",
            put(put_collaborator).delete(delete_collaborator),
        )
        .route("/v1/projects/{p}/open", post(open_project))
        .route("/v1/projects/{p}/placement", get(explain))
        .route("/v1/projects/{p}/exec", post(forward_exec))
        .route("/v1/projects/{p}/start", post(forward_start))
        .route("/v1/projects/{p}/stop", post(forward_stop))
        .route("/v1/projects/{p}/replace", post(replace))
        .route("/v1/projects/{p}/move", get(get_move).post(start_move))
        .route("/v1/admin/bootstrap-tokens", post(bootstrap_token))
        .route("/v1/admin/keys/rotate", post(rotate_key))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{h}/endpoint", get(host_endpoint))
        .route("/v1/hosts/{h}/key", get(host_key))
        .route("/v1/keys", get(public_keys))
        .route("/v1/hosts/{h}/drain", post(drain))
        .route("/v1/hosts/{h}/undrain", post(undrain))
        .route("/v1/hosts/{h}/evacuate", post(evacuate))
        .route(
            "/v1/hosts/{h}/projects/{p}",
            axum::routing::delete(discard_copy),
        )
        .route("/v1/hosts/register", post(register))
        .route("/v1/hosts/{h}/keepalive", post(keepalive))
        .route("/v1/hosts/{h}/activity", post(activity))
        .route("/v1/hosts/{h}/acl", get(host_acl))
        .route("/v1/hosts/{h}/push", get(push))
        .merge(crate::ssh::routes())
        .merge(crate::proxy_keys::routes())
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .fallback(|uri: axum::http::Uri| async move {
            MasterError::NotFound(format!("no API route {}", uri.path()))
        })
        .layer(axum::middleware::map_response_with_state(
            master.clone(),
            count_response,
        ))
        .with_state(master)
}

/// The API description: every route, its bodies and its errors, generated
/// from the same types the handlers use.
#[derive(OpenApi)]
#[openapi(
    info(title = "cocalc master API", description = "Control plane of a cocalc federation."),
    paths(
        create_user, sign_out, list_projects, create_project, get_project, put_collaborator,
        delete_collaborator, open_project, explain, forward_exec, forward_start, forward_stop, replace,
        start_move, get_move, evacuate, discard_copy,
        bootstrap_token, host_endpoint, host_key, public_keys, rotate_key, list_hosts,
        drain, undrain, register, keepalive, activity, host_acl, push
    ),
    modifiers(&Security)
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "host_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                HEADER_SIGNATURE,
                "Ed25519 signature by the host key, with x-cocalc-host and x-cocalc-time",
            ))),
        );
    }
}

/// The OpenAPI document of this API (served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::ssh::SshApi::openapi());
    doc.merge(crate::proxy_keys::ProxyKeyApi::openapi());
    doc
}

/// Counts every answer by status code, for the metrics.
async fn count_response(State(m): State<AppState>, r: Response) -> Response {
    m.responses().record(r.status().as_u16());
    r
}

/// The authenticated caller, from `Authorization: Bearer <key>`.
pub(crate) struct Auth(pub(crate) Caller);

impl FromRequestParts<AppState> for Auth {
    type Rejection = MasterError;

    async fn from_request_parts(parts: &mut Parts, m: &AppState) -> Result<Self> {
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| MasterError::Unauthorized("missing bearer API key".into()))?;
        m.authenticate(key.trim()).map(Auth)
    }
}

pub(crate) fn json<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| MasterError::BadRequest(format!("invalid JSON body: {e}")))
}

fn id<T: std::str::FromStr<Err = cocalc_core::IdError>>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|e: cocalc_core::IdError| MasterError::BadRequest(e.to_string()))
}

/// `POST /v1/users` body.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewUser {
    name: String,
}

/// A created user with its API key (shown once).
#[derive(Serialize, utoipa::ToSchema)]
struct CreatedUser {
    id: UserId,
    name: String,
    api_key: String,
}

#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = NewUser, security(("api_key" = [])), responses((status = 201, body = CreatedUser), (status = 409, body = ApiError), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn create_user(State(m): State<AppState>, Auth(c): Auth, body: Bytes) -> Result<Response> {
    let req: NewUser = json(&body)?;
    let (u, key) = m.create_user(&c, &req.name)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            id: u.id,
            name: u.name,
            api_key: key,
        }),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/users/{user}/signout", tag = "users", params(("user" = String, Path, description = "user id or name")), security(("api_key" = [])), responses((status = 200, body = SignOutAnswer), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn sign_out(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(user): Path<String>,
) -> Result<Response> {
    let n = m.sign_out_everywhere(&c, &user)?;
    Ok(Json(SignOutAnswer { hosts_notified: n }).into_response())
}

/// Answer of a sign-out: how many connected hosts heard of it.
#[derive(Serialize, utoipa::ToSchema)]
struct SignOutAnswer {
    hosts_notified: usize,
}

#[utoipa::path(get, path = "/v1/projects", tag = "projects", security(("api_key" = [])), responses((status = 200, body = Vec<ProjectInfo>), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn list_projects(State(m): State<AppState>, Auth(c): Auth) -> Result<Response> {
    Ok(Json(m.projects(&c).await?).into_response())
}

#[utoipa::path(post, path = "/v1/projects", tag = "projects", request_body = CreateProjectRequest, security(("api_key" = [])), responses((status = 201, body = ProjectInfo), (status = 409, body = ApiError), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn create_project(State(m): State<AppState>, Auth(c): Auth, body: Bytes) -> Result<Response> {
    let req: CreateProjectRequest = json(&body)?;
    cocalc_core::wire::check_version(req.v).map_err(|e| MasterError::BadRequest(e.message))?;
    let info = m
        .create_project(&c, &req.name, req.image.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

#[utoipa::path(get, path = "/v1/projects/{p}", tag = "projects", params(("p" = String, Path, description = "project id, or name among the caller's projects")), security(("api_key" = [])), responses((status = 200, body = ProjectInfo), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn get_project(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    Ok(Json(m.project(&c, p).await?).into_response())
}

/// A collaborator's new permission.
#[derive(Deserialize, utoipa::ToSchema)]
struct SetPermission {
    permission: Permission,
}

#[utoipa::path(put, path = "/v1/projects/{p}/collaborators/{user}", tag = "projects", params(("p" = String, Path, description = "project id or name"), ("user" = String, Path, description = "user id or name")), request_body = SetPermission, security(("api_key" = [])), responses((status = 200, body = ProjectInfo), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn put_collaborator(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path((p, user)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response> {
    let req: SetPermission = json(&body)?;
    let p = m.resolve_project(&c, &p)?;
    Ok(Json(
        m.set_collaborator(&c, p, &user, Some(req.permission))
            .await?,
    )
    .into_response())
}

#[utoipa::path(delete, path = "/v1/projects/{p}/collaborators/{user}", tag = "projects", params(("p" = String, Path, description = "project id or name"), ("user" = String, Path, description = "user id or name")), security(("api_key" = [])), responses((status = 200, body = ProjectInfo), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn delete_collaborator(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path((p, user)): Path<(String, String)>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    Ok(Json(m.set_collaborator(&c, p, &user, None).await?).into_response())
}

#[utoipa::path(post, path = "/v1/projects/{p}/open", tag = "projects", params(("p" = String, Path, description = "project id or name")), security(("api_key" = [])), responses((status = 200, body = OpenProjectResponse), (status = 409, body = ApiError), (status = 503, body = ApiError), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn open_project(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    Ok(Json(m.open_project(&c, p).await?).into_response())
}

#[utoipa::path(get, path = "/v1/projects/{p}/placement", tag = "projects", params(("p" = String, Path, description = "project id or name")), security(("api_key" = [])), responses((status = 200, body = PlacementExplanation), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn explain(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    Ok(Json(m.explain(&c, p).await?).into_response())
}

#[utoipa::path(post, path = "/v1/admin/bootstrap-tokens", tag = "admin", security(("api_key" = [])), responses((status = 201, body = BootstrapTokenAnswer), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn bootstrap_token(State(m): State<AppState>, Auth(c): Auth) -> Result<Response> {
    let (token, expires) = m.bootstrap_token(&c)?;
    Ok((
        StatusCode::CREATED,
        Json(BootstrapTokenAnswer { token, expires }),
    )
        .into_response())
}

/// A fresh one-time bootstrap token.
#[derive(Serialize, utoipa::ToSchema)]
struct BootstrapTokenAnswer {
    token: String,
    expires: Timestamp,
}

#[utoipa::path(post, path = "/v1/admin/keys/rotate", tag = "admin", security(("api_key" = [])), responses((status = 200, body = RotateAnswer), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn rotate_key(State(m): State<AppState>, Auth(c): Auth) -> Result<Response> {
    let (key_id, _) = m.rotate_key(&c)?;
    Ok(Json(RotateAnswer {
        key_id,
        signing_keys: m.signing_keys(),
    })
    .into_response())
}

/// The new signing key and every key that verifies now.
#[derive(Serialize, utoipa::ToSchema)]
struct RotateAnswer {
    key_id: String,
    signing_keys: Vec<String>,
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", security(("api_key" = [])), responses((status = 200, body = Vec<HostInfo>), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn list_hosts(State(m): State<AppState>, Auth(c): Auth) -> Result<Response> {
    Ok(Json(m.hosts(&c)?).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{h}/drain", tag = "hosts", params(("h" = String, Path, description = "host id")), security(("api_key" = [])), responses((status = 200, body = HostInfo), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn drain(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(h): Path<String>,
) -> Result<Response> {
    let rec = m.set_draining(&c, id(&h)?, true).await?;
    Ok(Json(rec.info).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{h}/undrain", tag = "hosts", params(("h" = String, Path, description = "host id")), security(("api_key" = [])), responses((status = 200, body = HostInfo), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn undrain(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(h): Path<String>,
) -> Result<Response> {
    let rec = m.set_draining(&c, id(&h)?, false).await?;
    Ok(Json(rec.info).into_response())
}

/// Largest body a host may send on a signed call.
const MAX_HOST_BODY: usize = 1 << 20;

/// A request signed by a registered host: the host in the path (`{h}`, if
/// the route has one), the `x-cocalc-host` header and the signature over
/// method, path, time and body all agree. Holds the body for the handler.
struct SignedHost {
    host: HostId,
    body: Bytes,
}

impl axum::extract::FromRequest<AppState> for SignedHost {
    type Rejection = MasterError;

    async fn from_request(req: axum::extract::Request, m: &AppState) -> Result<Self> {
        let (mut parts, body) = req.into_parts();
        let path_host =
            Path::<std::collections::HashMap<String, String>>::from_request_parts(&mut parts, m)
                .await
                .ok()
                .and_then(|Path(p)| p.get("h").cloned());
        let body = axum::body::to_bytes(body, MAX_HOST_BODY)
            .await
            .map_err(|e| {
                MasterError::BadRequest(format!(
                    "request body (at most {MAX_HOST_BODY} bytes): {e}"
                ))
            })?;
        let host = signed_host(
            m,
            path_host.as_deref(),
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
        )?;
        Ok(SignedHost { host, body })
    }
}

/// Checks a host-signed request: the host in the path, the header and the
/// signature must agree.
fn signed_host(
    m: &Master,
    path_host: Option<&str>,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HostId> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = host_auth::request_host(h(HEADER_HOST))
        .map_err(|e| MasterError::Unauthorized(e.to_string()))?;
    if let Some(p) = path_host {
        let p: HostId = id(p)?;
        if p != host {
            return Err(MasterError::Forbidden(format!(
                "signed by host {host}, path names {p}"
            )));
        }
    }
    let key = m.host_key(host)?;
    let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    host_auth::verify_request(
        &key,
        host,
        method.as_str(),
        path,
        h(HEADER_TIME),
        h(HEADER_SIGNATURE),
        body,
        m.now(),
        m.config().request_max_age,
    )
    .map_err(|e| MasterError::Unauthorized(e.to_string()))?;
    Ok(host)
}

#[utoipa::path(post, path = "/v1/hosts/register", tag = "host control", request_body = RegisterHostRequest, responses((status = 200, body = LeaseGrant), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn register(
    State(m): State<AppState>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let req: RegisterHostRequest = json(&body)?;
    let signed = headers.contains_key(HEADER_SIGNATURE)
        && signed_host(
            &m,
            Some(&req.host.to_string()),
            &method,
            &uri,
            &headers,
            &body,
        )
        .is_ok();
    Ok(Json(m.register_host(&req, signed).await?).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{h}/keepalive", tag = "host control", params(("h" = String, Path, description = "host id")), request_body = KeepaliveRequest, security(("host_signature" = [])), responses((status = 200, body = LeaseGrant), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn keepalive(State(m): State<AppState>, signed: SignedHost) -> Result<Response> {
    let req: KeepaliveRequest = json(&signed.body)?;
    Ok(Json(m.keepalive(signed.host, &req).await?).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{h}/activity", tag = "host control", params(("h" = String, Path, description = "host id")), request_body = ActivityReport, security(("host_signature" = [])), responses((status = 204), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn activity(State(m): State<AppState>, signed: SignedHost) -> Result<Response> {
    let req: ActivityReport = json(&signed.body)?;
    m.activity(signed.host, &req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct AclQuery {
    project: String,
    user: String,
}

/// Answer of the host ACL lookup.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AclAnswer {
    /// The user's permission, `None` for no access.
    pub permission: Option<Permission>,
    /// The user's revocation cutoff, if any.
    pub not_before: Option<Timestamp>,
}

#[utoipa::path(get, path = "/v1/hosts/{h}/acl", tag = "host control", params(("h" = String, Path, description = "host id"), ("project" = String, Query, description = "project id"), ("user" = String, Query, description = "user id")), security(("host_signature" = [])), responses((status = 200, body = AclAnswer), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn host_acl(
    State(m): State<AppState>,
    Query(q): Query<AclQuery>,
    SignedHost { host, .. }: SignedHost,
) -> Result<Response> {
    let project: ProjectId = id(&q.project)?;
    let user: UserId = id(&q.user)?;
    let (permission, not_before) = m.host_acl(host, project, user).await?;
    Ok(Json(AclAnswer {
        permission,
        not_before,
    })
    .into_response())
}

#[utoipa::path(get, path = "/v1/hosts/{h}/push", tag = "host control", description = "WebSocket upgrade; each text message is a PushFrame (JSON).", params(("h" = String, Path, description = "host id")), security(("host_signature" = [])), responses((status = 101, description = "switching to WebSocket", body = PushFrame), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn push(
    State(m): State<AppState>,
    ws: WebSocketUpgrade,
    SignedHost { host, .. }: SignedHost,
) -> Result<Response> {
    // Push frames are small and every host holds one channel: small buffers
    // keep 10,000 connected hosts in tens of MB instead of GBs (the default
    // read buffer alone is 128 KiB per connection).
    Ok(ws
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| serve_push(m, host, socket)))
}

/// One host's push channel: frames out, keepalives in.
///
/// ## Why keepalive frames are not signed
///
/// A keepalive over HTTP carries its own signature because every request
/// stands alone. On the push channel the host proved its key once, on the
/// upgrade (`GET /v1/hosts/{h}/push` signed over method, path, time and
/// body, fresh within `request_max_age`), and every later frame arrives on
/// that same connection, so the frames are the authenticated host's for as
/// long as the connection lives. Signing each beat again would add an
/// Ed25519 verification per keepalive (the largest single cost of the HTTP
/// path) and prove nothing new against anyone who cannot take over the
/// connection. The limits that make this hold:
///
/// * a frame speaks only for the host that opened the channel: the
///   registry refuses a keepalive naming another host;
/// * a keepalive can only renew that host's lease and report its own
///   health, capacity and load — nothing that grants access;
/// * a channel does not outlive its key: re-registering with a new key
///   closes it ([`crate::push::PushHub::disconnect`]), and a newer channel
///   of the same host replaces it;
/// * someone able to inject bytes into the TCP stream could forge a frame,
///   but such an attacker can equally forge the master's frames to the host
///   (ACL changes, revocations), which were never signed: the channel's
///   integrity rests on the transport (TLS between hosts and master in any
///   deployment off loopback), as it did before.
async fn serve_push(m: AppState, host: HostId, mut socket: WebSocket) {
    let mut sub = m.push().subscribe(host);
    tracing::info!(%host, "push channel connected");
    if let Err(e) = m.replay_sign_outs(host) {
        tracing::warn!(%host, error = %e, "replaying sign-outs to the host failed");
    }
    loop {
        tokio::select! {
            frame = sub.rx.recv() => {
                let Some(frame) = frame else { break };
                let Ok(text) = serde_json::to_string(&frame) else { continue };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Text(t))) => {
                    match serde_json::from_str::<cocalc_core::wire::HostMessage>(t.as_str()) {
                        Ok(cocalc_core::wire::HostMessage::Keepalive { keepalive }) => {
                            match m.keepalive(host, &keepalive).await {
                                Ok(grant) => {
                                    m.push().send(host, cocalc_core::wire::PushMessage::Lease { grant });
                                }
                                Err(e) => tracing::warn!(%host, error = %e, "keepalive on the push channel refused"),
                            }
                        }
                        Ok(cocalc_core::wire::HostMessage::Holding { projects }) => {
                            // A map lookup per project: off this loop, so the
                            // channel's frames do not wait for it.
                            let m = m.clone();
                            tokio::spawn(async move {
                                match m.reconcile_host(host, &projects).await {
                                    Ok(fenced) if !fenced.is_empty() => {
                                        tracing::info!(%host, fenced = fenced.len(), "fenced projects placed elsewhere while the host was away");
                                    }
                                    Ok(_) => {}
                                    Err(e) => tracing::warn!(%host, error = %e, "reconciling the host's projects failed"),
                                }
                            });
                        }
                        Ok(other) => tracing::warn!(%host, ?other, "unknown host message ignored"),
                        Err(e) => tracing::warn!(%host, error = %e, "undecodable host message ignored"),
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
    m.push().unsubscribe(&sub);
    tracing::info!(%host, "push channel closed");
}

/// Renders an [`ApiError`] for callers outside this module (the daemon).
pub fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.clone())).into_response()
}

#[utoipa::path(post, path = "/v1/projects/{p}/exec", tag = "projects", params(("p" = String, Path, description = "project id or name")), request_body = cocalc_core::ExecRequest, security(("api_key" = [])), responses((status = 200, body = cocalc_core::wire::ExecResult), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn forward_exec(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let req: cocalc_core::ExecRequest = json(&body)?;
    if req.argv.is_empty() {
        return Err(MasterError::BadRequest("argv is empty".into()));
    }
    let p = m.resolve_project(&c, &p)?;
    let (h, host) = m.host_client(&c, p).await?;
    let done = m.while_host_up(h, async {
        host.exec(&req).await.map_err(MasterError::Upstream)
    });
    Ok(Json(done.await?).into_response())
}

#[utoipa::path(post, path = "/v1/projects/{p}/start", tag = "projects", params(("p" = String, Path, description = "project id or name")), security(("api_key" = [])), responses((status = 200, body = cocalc_core::RunStatus), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn forward_start(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    let (h, host) = m.host_client(&c, p).await?;
    let done = m.while_host_up(h, async {
        host.start().await.map_err(MasterError::Upstream)
    });
    Ok(Json(done.await?).into_response())
}

#[utoipa::path(post, path = "/v1/projects/{p}/stop", tag = "projects", params(("p" = String, Path, description = "project id or name")), security(("api_key" = [])), responses((status = 204), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn forward_stop(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p = m.resolve_project(&c, &p)?;
    let (h, host) = m.host_client(&c, p).await?;
    m.while_host_up(h, async {
        host.stop().await.map_err(MasterError::Upstream)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/projects/{p}/replace", tag = "admin", params(("p" = String, Path, description = "project id")), security(("api_key" = [])), responses((status = 200, body = PlacementExplanation), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn replace(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p: ProjectId = id(&p)?;
    m.replace_project(&c, p).await?;
    Ok(Json(m.explain(&c, p).await?).into_response())
}

#[utoipa::path(post, path = "/v1/projects/{p}/move", tag = "admin", params(("p" = String, Path, description = "project id")), request_body = cocalc_core::moves::MoveRequest, security(("api_key" = [])), responses((status = 202, body = cocalc_core::MoveRecord), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn start_move(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let p: ProjectId = id(&p)?;
    let req: cocalc_core::moves::MoveRequest = if body.is_empty() {
        Default::default()
    } else {
        json(&body)?
    };
    let mv = m.move_project(&c, p, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(mv)).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{h}/evacuate", tag = "admin", params(("h" = String, Path, description = "host id")), security(("api_key" = [])), responses((status = 202, body = cocalc_core::moves::Evacuation), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn evacuate(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(h): Path<String>,
) -> Result<Response> {
    let ev = m.evacuate_host(&c, id(&h)?).await?;
    Ok((StatusCode::ACCEPTED, Json(ev)).into_response())
}

#[utoipa::path(delete, path = "/v1/hosts/{h}/projects/{p}", tag = "admin", params(("h" = String, Path, description = "host id"), ("p" = String, Path, description = "project id")), security(("api_key" = [])), responses((status = 204), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn discard_copy(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path((h, p)): Path<(String, String)>,
) -> Result<Response> {
    m.discard_copy(&c, id(&h)?, id(&p)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/projects/{p}/move", tag = "admin", params(("p" = String, Path, description = "project id")), security(("api_key" = [])), responses((status = 200, body = cocalc_core::MoveRecord), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn get_move(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(p): Path<String>,
) -> Result<Response> {
    let p: ProjectId = id(&p)?;
    Ok(Json(m.project_move(&c, p).await?).into_response())
}

#[utoipa::path(get, path = "/v1/hosts/{h}/endpoint", tag = "hosts", params(("h" = String, Path, description = "host id")), security(("api_key" = [])), responses((status = 200, body = cocalc_core::HostEndpoint), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn host_endpoint(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(h): Path<String>,
) -> Result<Response> {
    Ok(Json(m.host_endpoint(&c, id(&h)?)?).into_response())
}

#[utoipa::path(get, path = "/v1/hosts/{h}/key", tag = "hosts", params(("h" = String, Path, description = "host id")), security(("api_key" = [])), responses((status = 200, body = cocalc_core::wire::HostKeyResponse), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn host_key(
    State(m): State<AppState>,
    Auth(c): Auth,
    Path(h): Path<String>,
) -> Result<Response> {
    Ok(Json(m.host_public_key(&c, id(&h)?)?).into_response())
}

/// The public token-signing keys.
#[derive(Serialize, utoipa::ToSchema)]
struct PublicKeys {
    signing_keys: Vec<String>,
}

#[utoipa::path(get, path = "/v1/keys", tag = "hosts", responses((status = 200, body = PublicKeys)))]
async fn public_keys(State(m): State<AppState>) -> Result<Response> {
    Ok(Json(PublicKeys {
        signing_keys: m.signing_keys(),
    })
    .into_response())
}
