//! The host's data plane over HTTP: what users (and the proxy) call with a
//! connect token. An axum [`Router`] ([`router`]) over a [`HostAgent`].
//!
//! The token comes as `Authorization: Bearer <token>`, or once as
//! `?token=<token>`: a browser's `GET` with a token in the query is answered
//! with an HttpOnly cookie scoped to that project's path and a redirect to
//! the same URL without the token, so the token leaves the address bar and
//! the history. Later requests carry the cookie.
//!
//! | method | path | needs | what |
//! | --- | --- | --- | --- |
//! | GET | `/health` | — | liveness |
//! | GET | `/{project}/status` | read | `RunStatus` |
//! | POST | `/{project}/start` | write | start (idempotent), `RunStatus` |
//! | POST | `/{project}/stop` | write | stop |
//! | POST | `/{project}/exec` | write | `ExecRequest` → `ExecResult` (starts the project if needed) |
//! | any | `/{project}/port/{p}/…` | write | HTTP or WebSocket to port `p` inside the project, prefix stripped (the server sees `/…`) |
//! | any | `/{project}/server/{p}/…` | write | the same with the full path kept |
//! | GET | `/{project}/terminal?rows=&cols=` | write | WebSocket terminal: binary frames carry the terminal's bytes both ways; a text frame `{"resize":{"rows":R,"cols":C}}` resizes; closing the socket ends the shell |
//! | GET | `/{project}/exec-stream` | write | WebSocket exec: the first text frame is an `ExecRequest`; then binary frames are standard input until a text frame `{"eof":true}` closes it; output comes as binary frames tagged by their first byte (`1` stdout, `2` stderr), then one text frame `ExecStreamEnd` (`{"exit":N}` or `{"error":{…}}`); closing the socket ends the command |
//! | GET | `/{project}/tcp/{port}` | write | WebSocket relay of a TCP connection to `127.0.0.1:port` as the project sees it: binary frames carry the bytes both ways |
//! | GET | `/{project}/files/{path}` | read | a file's bytes, or a directory's `FileEntry` list; `?stat` for one `FileEntry` |
//! | PUT | `/{project}/files/{path}` | write | replace the file with the body (atomic) |
//! | POST | `/{project}/files/{path}?op=mkdir` | write | create the directory (and parents) |
//! | POST | `/{project}/files/{path}?op=rename&to={path}` | write | rename |
//! | DELETE | `/{project}/files/{path}` | write | remove (directories recursively) |
//! | GET | `/{project}/backups` | read | the project's backups (`BackupInfo` list) |
//! | POST | `/{project}/backups` | write | back up now |
//! | POST | `/{project}/backups/{id}/restore` | write | `RestoreBackupRequest` → `RestoredBackup` |
//! | GET | `/{project}/snapshots` | read | the project's snapshots here (`SnapshotInfo` list) |
//! | POST | `/{project}/move/snapshot` | master | `MoveSnapshotRequest` → `MoveSnapshot` (with `freeze`: stop, refuse starts) |
//! | GET | `/{project}/move/stream?snapshot=&parent=` | master | the snapshot's send stream |
//! | POST | `/{project}/move/pull` | master | `MovePullRequest`: fetch a stream from the source and receive it |
//! | POST | `/{project}/move/thaw` | master | `MoveThawRequest`: end the freeze |
//! | POST | `/{project}/move/discard` | master | `MoveDiscardRequest` → `{"deleted": bool}` |
//! | POST | `/{project}/move/release` | master | after the flip: delete the copy here |
//!
//! "master": only a token the master minted for itself
//! ([`UserId::MASTER`](cocalc_core::UserId::MASTER)); see [`crate::moving`].
//!
//! File paths are relative to the project's home and confined to it
//! ([`ProjectFiles`]): `..`, absolute paths and symlinks out are refused.
//!
//! The project segment must be a canonical UUID; anything else is a 400
//! that says why. Every refusal is an [`ApiError`] JSON body.
//!
//! The host's daemon serves plain requests to `port`/`server` (HTTP/1.1,
//! no body, no upgrade) with [`LeanPorts`] on
//! [`cocalc_client::lean`] instead of the router: same checks and
//! rewriting, answered in the connection's task, large bodies spliced.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cocalc_auth::Grant;
use cocalc_core::{ApiError, ExecRequest, Permission, ProjectId};

use crate::agent::{AgentError, HostAgent};
use crate::files::{FileError, FileKind, ProjectFiles};

/// Largest file read or written through the data plane (64 MiB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

type AppState = Arc<HostAgent>;

/// An error response.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<FileError> for Failure {
    fn from(e: FileError) -> Self {
        Failure(ApiError::from(&e))
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        Failure(ApiError::from(&e))
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// A connection's place under the per-client connection cap
/// ([`crate::admission`]), which a WebSocket keeps until it closes.
type Hold = axum::Extension<cocalc_client::relay::HoldWhileUpgraded>;

/// The access log's record of a WebSocket request ([`crate::admission`]
/// puts it in the request when logging): filled once the answer is 101.
type Upgrading = axum::Extension<cocalc_client::access_log::Upgrading>;

/// A WebSocket this host serves itself (terminal, exec stream, TCP
/// relay), counting what it sends the client on the access log's record
/// of its request, if it was logged: the line is written when the socket
/// is dropped, with those bytes, as for WebSockets relayed to a project's
/// server.
struct LoggedSocket {
    socket: axum::extract::ws::WebSocket,
    sent: Option<cocalc_client::access_log::BodySent>,
}

impl LoggedSocket {
    /// `socket`, counted on the record `upgrading` holds (if any).
    fn new(socket: axum::extract::ws::WebSocket, upgrading: Option<Upgrading>) -> Self {
        let sent = upgrading.and_then(|axum::Extension(u)| u.take());
        LoggedSocket { socket, sent }
    }

    /// Sends `msg`, counting its frame as it goes on the wire (a server's
    /// frames are unmasked and unfragmented: the payload and a header of
    /// 2, 4 or 10 bytes).
    async fn send(
        &mut self,
        msg: axum::extract::ws::Message,
    ) -> std::result::Result<(), axum::Error> {
        use axum::extract::ws::Message;
        let payload = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(c) => c.as_ref().map_or(0, |c| 2 + c.reason.len()),
        };
        self.socket.send(msg).await?;
        if let Some(sent) = &self.sent {
            let header = match payload {
                0..=125 => 2,
                126..=0xffff => 4,
                _ => 10,
            };
            sent.add((payload + header) as u64);
        }
        Ok(())
    }

    /// The next message from the client.
    async fn recv(
        &mut self,
    ) -> Option<std::result::Result<axum::extract::ws::Message, axum::Error>> {
        self.socket.recv().await
    }
}

/// The data-plane router over `agent`.
pub fn router(agent: Arc<HostAgent>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/{project}/status", get(status))
        .route("/{project}/start", post(start))
        .route("/{project}/stop", post(stop))
        .route("/{project}/exec", post(exec))
        .route("/{project}/terminal", get(terminal))
        .route("/{project}/exec-stream", get(exec_stream))
        .route("/{project}/tcp/{port}", get(tcp))
        .route("/{project}/port/{port}", axum::routing::any(ports))
        .route("/{project}/port/{port}/", axum::routing::any(ports))
        .route("/{project}/port/{port}/{*rest}", axum::routing::any(ports))
        .route("/{project}/server/{port}", axum::routing::any(ports))
        .route("/{project}/server/{port}/", axum::routing::any(ports))
        .route(
            "/{project}/server/{port}/{*rest}",
            axum::routing::any(ports),
        )
        .route("/{project}/backups", get(backups_list).post(backup_now))
        .route("/{project}/backups/{id}/restore", post(backup_restore))
        .route("/{project}/snapshots", get(snapshots))
        .route("/{project}/move/snapshot", post(move_snapshot))
        .route("/{project}/move/stream", get(move_stream))
        .route("/{project}/move/pull", post(move_pull))
        .route("/{project}/move/thaw", post(move_thaw))
        .route("/{project}/move/discard", post(move_discard))
        .route("/{project}/move/release", post(move_release))
        .route("/{project}/files", get(files_get))
        .route(
            "/{project}/files/{*path}",
            get(files_get)
                .put(files_put)
                .post(files_post)
                .delete(files_delete),
        )
        .fallback(|uri: Uri| async move {
            Failure(ApiError::new(
                404,
                "not_found",
                format!("no route {}", uri.path()),
            ))
        })
        .layer(axum::middleware::map_response_with_state(
            agent.clone(),
            count_response,
        ))
        .with_state(agent)
}

/// Counts every answer by status code, for the metrics.
async fn count_response(
    State(agent): State<Arc<HostAgent>>,
    r: axum::response::Response,
) -> axum::response::Response {
    agent.responses().record(r.status().as_u16());
    r
}

/// Name of the cookie that carries a project's token.
pub fn cookie_name(project: ProjectId) -> String {
    cocalc_core::wire::token_cookie_name(project)
}

/// Parses the project segment (canonical UUID only).
pub fn project_segment(s: &str) -> Result<ProjectId> {
    s.parse::<ProjectId>()
        .map_err(|e| Failure(ApiError::new(400, "invalid_project_id", e.to_string())))
}

enum TokenSource {
    Header(String),
    Query(String),
    Cookie(String),
}

fn find_token(project: ProjectId, headers: &HeaderMap, uri: &Uri) -> Option<TokenSource> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(TokenSource::Header(t.trim().to_string()));
    }
    if let Some(q) = uri.query() {
        for pair in q.split('&') {
            if let Some(t) = pair.strip_prefix("token=") {
                return Some(TokenSource::Query(t.to_string()));
            }
        }
    }
    let name = cookie_name(project);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| TokenSource::Cookie(v.to_string()))
}

/// The outcome of checking a request: a grant, or a response to send
/// instead (the cookie exchange redirect).
enum Checked {
    Grant(Grant),
    Redirect(Response),
}

/// [`check`] for a route that changes or runs something: write
/// permission, an active use (it keeps the project from being culled),
/// and never the browser's cookie redirect (POSTs and WebSockets cannot
/// follow one).
async fn check_write(
    agent: &HostAgent,
    project: &str,
    headers: &HeaderMap,
    uri: &Uri,
    action: &str,
) -> Result<Grant> {
    Ok(grant(
        agent,
        project,
        headers,
        uri,
        Permission::Write,
        action,
        false,
    )
    .await?
    .0)
}

/// Authorizes a request's connect token (header, cookie or `?token=`)
/// for `project`: the grant, the project, the token, and whether it came
/// in the query.
async fn grant(
    agent: &HostAgent,
    project: &str,
    headers: &HeaderMap,
    uri: &Uri,
    needed: Permission,
    action: &str,
    passive: bool,
) -> Result<(Grant, ProjectId, String, bool)> {
    let project = project_segment(project)?;
    let src = find_token(project, headers, uri).ok_or_else(|| {
        Failure(
            ApiError::new(
                401,
                "token_missing",
                "no connect token (Authorization header, ?token= or cookie)",
            )
            .with_hint("open the project on the master to get one"),
        )
    })?;
    let (token, from_query) = match src {
        TokenSource::Header(t) | TokenSource::Cookie(t) => (t, false),
        TokenSource::Query(t) => (t, true),
    };
    let grant = if passive {
        agent
            .authorize_passive(&token, project, needed, action)
            .await?
    } else {
        agent.authorize(&token, project, needed, action).await?
    };
    Ok((grant, project, token, from_query))
}

/// Authorizes a request like [`grant`]; a GET whose token came in the
/// query is answered with the browser's exchange instead (a redirect
/// that sets the project's cookie and drops the token from the URL).
// The routes that read pass the same few request facts; bundling them
// would only move the list into a struct literal at each call.
#[allow(clippy::too_many_arguments)]
async fn check(
    agent: &HostAgent,
    project: &str,
    headers: &HeaderMap,
    uri: &Uri,
    is_get: bool,
    needed: Permission,
    action: &str,
    passive: bool,
) -> Result<Checked> {
    let (grant, project, token, from_query) =
        grant(agent, project, headers, uri, needed, action, passive).await?;
    if from_query && is_get {
        // Browser exchange: cookie scoped to this project, token out of the URL.
        let rest: Vec<&str> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.starts_with("token=") && !p.is_empty())
            .collect();
        let location = if rest.is_empty() {
            uri.path().to_string()
        } else {
            format!("{}?{}", uri.path(), rest.join("&"))
        };
        let max_age = grant
            .claims
            .expires
            .as_secs()
            .saturating_sub(grant.claims.issued_at.as_secs())
            .max(0);
        let cookie = format!(
            "{}={token}; Path=/{project}/; HttpOnly; SameSite=Lax; Max-Age={max_age}",
            cookie_name(project)
        );
        let resp = (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, location), (header::SET_COOKIE, cookie)],
        )
            .into_response();
        return Ok(Checked::Redirect(resp));
    }
    Ok(Checked::Grant(grant))
}

macro_rules! checked {
    ($e:expr) => {
        match $e? {
            Checked::Grant(g) => g,
            Checked::Redirect(r) => return Ok(r),
        }
    };
}

async fn status(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = checked!(
        check(
            &a,
            &p,
            &headers,
            &uri,
            true,
            Permission::Read,
            "status",
            true
        )
        .await
    );
    Ok(Json(a.status(g.claims.project).await?).into_response())
}

async fn start(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = check_write(&a, &p, &headers, &uri, "start").await?;
    Ok(Json(a.ensure_running(&g).await?).into_response())
}

async fn stop(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = check_write(&a, &p, &headers, &uri, "stop").await?;
    a.stop(g.claims.project).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn exec(State(a): State<AppState>, Path(p): Path<String>, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let g = check_write(&a, &p, &parts.headers, &parts.uri, "exec").await?;
    let body: Bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .map_err(|e| Failure(ApiError::new(400, "bad_body", format!("request body: {e}"))))?;
    let req: ExecRequest = serde_json::from_slice(&body).map_err(|e| {
        Failure(ApiError::new(
            400,
            "bad_request",
            format!("invalid ExecRequest: {e}"),
        ))
    })?;
    if req.argv.is_empty() {
        return Err(Failure(ApiError::new(400, "bad_request", "argv is empty")));
    }
    Ok(Json(a.exec(&g, req).await?).into_response())
}

/// `GET /<project>/backups`: the project's backups, oldest first (read
/// access).
async fn backups_list(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let (g, ..) = grant(&a, &p, &headers, &uri, Permission::Read, "backups", false).await?;
    Ok(Json(a.backups(g.claims.project).await?).into_response())
}

/// `POST /<project>/backups`: backs the project up now (write access);
/// answers the backup (the last one again if nothing changed since).
async fn backup_now(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = check_write(&a, &p, &headers, &uri, "backup").await?;
    Ok(Json(a.backup(g.claims.project).await?).into_response())
}

/// `POST /<project>/backups/<id>/restore` with a
/// [`RestoreBackupRequest`](cocalc_core::wire::RestoreBackupRequest)
/// (write access): one path, or the whole stopped project.
async fn backup_restore(
    State(a): State<AppState>,
    Path((p, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let g = check_write(&a, &p, &parts.headers, &parts.uri, "backup_restore").await?;
    let req: cocalc_core::wire::RestoreBackupRequest = json_body(body, "RestoreBackupRequest")
        .await?
        .unwrap_or_default();
    let done = a
        .restore_backup(g.claims.project, &id, req.path.as_deref())
        .await?;
    Ok(Json(done).into_response())
}

/// A small JSON request body (at most 64 KiB) as a `T`; `None` for an
/// empty body.
async fn json_body<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    what: &str,
) -> Result<Option<T>> {
    let body: Bytes = axum::body::to_bytes(body, 64 << 10)
        .await
        .map_err(|e| Failure(ApiError::new(400, "bad_body", format!("request body: {e}"))))?;
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(|e| {
        Failure(ApiError::new(
            400,
            "bad_request",
            format!("invalid {what}: {e}"),
        ))
    })
}

/// `GET /<project>/snapshots` (read access): the project's snapshots on
/// this host, oldest first.
async fn snapshots(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let (g, ..) = grant(&a, &p, &headers, &uri, Permission::Read, "snapshots", true).await?;
    let list = a
        .storage()
        .snapshots(g.claims.project)
        .await
        .map_err(crate::agent::AgentError::from)?;
    Ok(Json(list).into_response())
}

/// Authorizes one of a move's calls: admin access, not counted as use of
/// the project; [`crate::moving`] then refuses any token but the
/// master's own.
async fn move_grant(
    a: &HostAgent,
    p: &str,
    headers: &HeaderMap,
    uri: &Uri,
    action: &str,
) -> Result<Grant> {
    let (g, ..) = grant(a, p, headers, uri, Permission::Admin, action, true).await?;
    Ok(g)
}

/// `POST /<project>/move/snapshot` with a
/// [`MoveSnapshotRequest`](cocalc_core::moves::MoveSnapshotRequest).
async fn move_snapshot(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_snapshot").await?;
    let body: cocalc_core::moves::MoveSnapshotRequest = json_body(body, "MoveSnapshotRequest")
        .await?
        .unwrap_or_default();
    Ok(Json(a.move_snapshot(&g, body.freeze).await?).into_response())
}

/// `GET /<project>/move/stream?snapshot=S[&parent=P]`: the send stream.
async fn move_stream(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_stream").await?;
    let snapshot = query_param(&uri, "snapshot")
        .map(decode_path)
        .transpose()?
        .ok_or_else(|| {
            Failure(ApiError::new(
                400,
                "bad_request",
                "missing ?snapshot= (the snapshot to send)",
            ))
        })?;
    let parent = query_param(&uri, "parent").map(decode_path).transpose()?;
    let stream = a.move_stream(&g, &snapshot, parent.as_deref()).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /<project>/move/pull` with a
/// [`MovePullRequest`](cocalc_core::moves::MovePullRequest).
async fn move_pull(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_pull").await?;
    let pull: cocalc_core::moves::MovePullRequest =
        json_body(body, "MovePullRequest").await?.ok_or_else(|| {
            Failure(ApiError::new(
                400,
                "bad_request",
                "a MovePullRequest body is needed",
            ))
        })?;
    Ok(Json(a.move_pull(&g, &pull).await?).into_response())
}

/// `POST /<project>/move/thaw` with a
/// [`MoveThawRequest`](cocalc_core::moves::MoveThawRequest).
async fn move_thaw(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_thaw").await?;
    let body: cocalc_core::moves::MoveThawRequest = json_body(body, "MoveThawRequest")
        .await?
        .unwrap_or_default();
    a.move_thaw(&g, body.restart).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /<project>/move/discard` with a
/// [`MoveDiscardRequest`](cocalc_core::moves::MoveDiscardRequest); answers
/// `{"deleted": bool}`.
async fn move_discard(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_discard").await?;
    let body: cocalc_core::moves::MoveDiscardRequest = json_body(body, "MoveDiscardRequest")
        .await?
        .unwrap_or_default();
    let deleted = a.move_discard(&g, body.snapshot.as_deref()).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })).into_response())
}

/// `POST /<project>/move/release`.
async fn move_release(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let g = move_grant(&a, &p, &headers, &uri, "move_release").await?;
    a.move_release(&g).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then_some(v)
    })
}

/// Percent-decodes a path taken from the URL (`%2F` stays a literal `/`
/// inside one name only if the files layer allows it; it does not: names
/// are split on `/` after decoding, and `..` is refused there).
fn decode_path(raw: &str) -> Result<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Failure(ApiError::new(
                        400,
                        "invalid_path",
                        "bad percent-encoding in path",
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Failure(ApiError::new(400, "invalid_path", "path is not UTF-8")))
}

/// The file path of a `/{project}/files/{path}` request (empty for the home).
fn file_path(uri: &Uri, project: &str) -> Result<String> {
    let prefix = format!("/{project}/files");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or("");
    decode_path(rest.strip_prefix('/').unwrap_or(rest))
}

/// The checks every files request shares: project segment, token and
/// access, the file path, and the project's confined home. `Err(response)`
/// is the cookie-exchange redirect to send instead.
async fn open_files(
    a: &HostAgent,
    headers: &HeaderMap,
    uri: &Uri,
    is_get: bool,
    needed: Permission,
    action: &str,
) -> Result<std::result::Result<(ProjectFiles, String), Response>> {
    let p = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    let g = match check(a, p, headers, uri, is_get, needed, action, false).await? {
        Checked::Grant(g) => g,
        Checked::Redirect(r) => return Ok(Err(r)),
    };
    let path = file_path(uri, p)?;
    let vol = a.volume(g.claims.project).await?;
    Ok(Ok((ProjectFiles::open(&vol.home)?, path)))
}

macro_rules! opened {
    ($e:expr) => {
        match $e? {
            Ok(fp) => fp,
            Err(redirect) => return Ok(redirect),
        }
    };
}

async fn files_get(State(a): State<AppState>, headers: HeaderMap, uri: Uri) -> Result<Response> {
    let (files, path) =
        opened!(open_files(&a, &headers, &uri, true, Permission::Read, "file_read").await);
    if query_param(&uri, "stat").is_some() {
        return Ok(Json(files.stat(&path).await?).into_response());
    }
    if files.stat(&path).await?.kind == FileKind::Dir {
        return Ok(Json(files.list(&path).await?).into_response());
    }
    let data = files.read(&path, MAX_FILE_BYTES).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn files_put(State(a): State<AppState>, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let (files, path) = opened!(
        open_files(
            &a,
            &parts.headers,
            &parts.uri,
            false,
            Permission::Write,
            "file_write"
        )
        .await
    );
    let data = axum::body::to_bytes(body, MAX_FILE_BYTES as usize)
        .await
        .map_err(|e| {
            Failure(ApiError::new(
                413,
                "file_too_large",
                format!("body over {MAX_FILE_BYTES} bytes or unreadable: {e}"),
            ))
        })?;
    files.write(&path, data.to_vec()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn files_post(State(a): State<AppState>, headers: HeaderMap, uri: Uri) -> Result<Response> {
    let (files, path) =
        opened!(open_files(&a, &headers, &uri, false, Permission::Write, "file_write").await);
    match query_param(&uri, "op") {
        Some("mkdir") => files.mkdir(&path).await?,
        Some("rename") => {
            let to = query_param(&uri, "to").ok_or_else(|| {
                Failure(ApiError::new(
                    400,
                    "bad_request",
                    "op=rename needs to=<path>",
                ))
            })?;
            files.rename(&path, &decode_path(to)?).await?
        }
        other => {
            return Err(Failure(ApiError::new(
                400,
                "bad_request",
                format!("unknown op {other:?}: use op=mkdir or op=rename&to=<path>"),
            )))
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn files_delete(State(a): State<AppState>, headers: HeaderMap, uri: Uri) -> Result<Response> {
    let (files, path) =
        opened!(open_files(&a, &headers, &uri, false, Permission::Write, "file_delete").await);
    files.remove(&path).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
struct Resize {
    resize: cocalc_core::PtySize,
}

async fn terminal(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    hold: Option<Hold>,
    upgrading: Option<Upgrading>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response> {
    // Never the cookie-exchange redirect here: a WebSocket cannot follow it.
    let g = check_write(&a, &p, &headers, &uri, "terminal").await?;
    let dim = |name: &str, default: u16| {
        query_param(&uri, name)
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|v| (1..=1000).contains(v))
            .unwrap_or(default)
    };
    let size = cocalc_core::PtySize {
        rows: dim("rows", 24),
        cols: dim("cols", 80),
    };
    let session = a.terminal(&g, size).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        pump_terminal(LoggedSocket::new(socket, upgrading), session).await;
        drop(hold);
    }))
}

/// Copies terminal output to the socket and socket input to the terminal
/// until either side ends; then ends the shell.
async fn pump_terminal(mut socket: LoggedSocket, session: cocalc_core::PtySession) {
    use axum::extract::ws::Message;
    use futures_util::StreamExt;
    let cocalc_core::PtySession {
        mut output,
        control,
    } = session;
    loop {
        tokio::select! {
            chunk = output.next() => match chunk {
                Some(Ok(bytes)) => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
                _ => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if control.write(b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(r) = serde_json::from_str::<Resize>(t.as_str()) {
                        let _ = control.resize(r.resize).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = control.close().await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Proxies a request to a server inside the project. The user's token (the
/// `Authorization` header, the project cookie, `?token=`) is removed before
/// the request reaches the project's server.
async fn ports(State(a): State<AppState>, req: Request) -> Result<Response> {
    let (mut parts, body) = req.into_parts();
    let call = match port_call(&a, &mut parts).await? {
        Ok(call) => call,
        Err(redirect) => return Ok(redirect),
    };
    if cocalc_client::upstream::takes(&parts, &body) {
        let resp = port_send_lean(&a, &call, &parts).await?;
        return Ok(resp.map(axum::body::Body::new));
    }
    for (name, value) in call.replace {
        match value {
            Some(v) => parts.headers.insert(name, v),
            None => parts.headers.remove(name),
        };
    }
    let (project, port) = (call.project, call.port);
    let req = axum::http::Request::from_parts(parts, body);
    let resp = if req.headers().contains_key(header::UPGRADE) {
        // An upgrade takes a connection of its own, relayed both ways.
        let conn = a
            .runner()
            .connect_port(project, port)
            .await
            .map_err(|e| port_unreachable(port, e))?;
        cocalc_client::relay::relay(conn, req)
            .await
            .map_err(|e| match e {
                cocalc_client::relay::RelayError::NoAnswer(t) => Failure(ApiError::new(
                    504,
                    "port_timeout",
                    format!("port {port} in the project did not answer the upgrade within {t:?}"),
                )),
                e => port_failed(port, &e),
            })?
    } else {
        a.port_pool()
            .send((project, port), req, || {
                a.runner().connect_port(project, port)
            })
            .await
            .map_err(|e| match e {
                cocalc_client::relay::PoolError::Connect(e, _) => port_unreachable(port, e),
                cocalc_client::relay::PoolError::Http(e) => port_failed(port, &e),
            })?
    };
    Ok(resp.map(axum::body::Body::new))
}

/// A checked request to a server in a project: where it goes, and the
/// headers its server sees instead of the client's (the token removed).
struct PortCall {
    project: ProjectId,
    port: u16,
    replace: Vec<(header::HeaderName, Option<header::HeaderValue>)>,
}

/// Checks a request to `/{project}/port/{port}/…` or
/// `/{project}/server/{port}/…` (token, permission, the project
/// started) and rewrites `parts.uri` to what the project's server sees:
/// for `port`, the path without the prefix; the query without `token=`.
/// `Ok(Err(…))` is the browser's cookie exchange to answer instead.
async fn port_call(
    a: &HostAgent,
    parts: &mut axum::http::request::Parts,
) -> Result<std::result::Result<PortCall, Response>> {
    // A handle on the request's target (shared bytes, no copy), so its
    // pieces can be read while `parts.uri` is replaced below.
    let uri = parts.uri.clone();
    let path = uri.path();
    let mut segs = path.trim_start_matches('/').splitn(4, '/');
    let project_s = segs.next().unwrap_or("");
    let kind = segs.next().unwrap_or("");
    let port_s = segs.next().unwrap_or("");
    let rest = segs.next().unwrap_or("");
    let port: u16 = port_s.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        Failure(ApiError::new(
            400,
            "invalid_port",
            format!("{port_s:?} is not a port number (1-65535)"),
        ))
    })?;
    let is_get =
        parts.method == axum::http::Method::GET && !parts.headers.contains_key(header::UPGRADE);
    let checked = check(
        a,
        project_s,
        &parts.headers,
        &parts.uri,
        is_get,
        Permission::Write,
        "port",
        false,
    )
    .await?;
    let g = match checked {
        Checked::Grant(g) => g,
        Checked::Redirect(r) => return Ok(Err(r)),
    };
    let project = g.claims.project;
    a.ensure_running(&g).await?;

    // The path the project's server sees, and the query without `token=`
    // pairs (as it came when it has none). A `server` request whose query
    // holds no token goes as it is.
    let query = uri.query().unwrap_or("");
    let token_in_query = query.split('&').any(|p| p.starts_with("token="));
    if kind == "port" || token_in_query {
        let mut pq = String::with_capacity(path.len() + query.len() + 2);
        if kind == "port" {
            pq.push('/');
            pq.push_str(rest);
        } else {
            pq.push_str(path);
        }
        if token_in_query {
            let mut sep = '?';
            for p in query.split('&') {
                if !p.is_empty() && !p.starts_with("token=") {
                    pq.push(sep);
                    pq.push_str(p);
                    sep = '&';
                }
            }
        } else if !query.is_empty() {
            pq.push('?');
            pq.push_str(query);
        }
        parts.uri = pq.parse().map_err(|_| {
            Failure(ApiError::new(
                400,
                "invalid_path",
                "path cannot be forwarded",
            ))
        })?;
    } else {
        // Only the path and query are sent; an absolute target's scheme
        // and authority are dropped as before.
        parts.uri = uri.path_and_query().map_or_else(
            || axum::http::Uri::from_static("/"),
            |pq| axum::http::Uri::from(pq.clone()),
        );
    }
    // The client's cookies but the project's own (the token).
    let cookie = if parts.headers.contains_key(header::COOKIE) {
        let ours = format!("{}=", cookie_name(project));
        let cookies: Vec<&str> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.starts_with(&ours))
            .collect();
        (!cookies.is_empty())
            .then(|| cookies.join("; ").parse().ok())
            .flatten()
    } else {
        None
    };
    let mut replace = vec![(header::AUTHORIZATION, None), (header::COOKIE, cookie)];
    if kind == "port" {
        if let Ok(v) = format!("/{project}/port/{port}").parse() {
            replace.push((
                header::HeaderName::from_static("x-forwarded-prefix"),
                Some(v),
            ));
        }
    }
    Ok(Ok(PortCall {
        project,
        port,
        replace,
    }))
}

/// Sends a checked request without a body or upgrade to the project's
/// server through the lean client.
async fn port_send_lean(
    a: &HostAgent,
    call: &PortCall,
    parts: &axum::http::request::Parts,
) -> Result<axum::http::Response<cocalc_client::upstream::ResponseBody<(ProjectId, u16)>>> {
    let (project, port) = (call.project, call.port);
    let replace: Vec<_> = call.replace.iter().map(|(n, v)| (n, v.as_ref())).collect();
    a.port_upstream()
        .send((project, port), parts, &replace, || {
            a.runner().connect_port(project, port)
        })
        .await
        .map_err(|e| match e {
            cocalc_client::upstream::UpstreamError::Connect(e) => port_unreachable(port, e),
            e => port_failed(port, &e),
        })
}

fn port_unreachable(port: u16, e: cocalc_core::RunnerError) -> Failure {
    Failure(ApiError::new(
        502,
        "port_unreachable",
        format!("nothing answers on port {port} in the project: {e}"),
    ))
}

fn port_failed(port: u16, e: &dyn std::fmt::Display) -> Failure {
    Failure(ApiError::new(
        502,
        "port_failed",
        format!("port {port}: {e}"),
    ))
}

/// Whether `path` is one [`ports`] serves: `/{project}/port/{port}…` or
/// `/{project}/server/{port}…` with a port segment.
fn is_port_path(path: &str) -> bool {
    let mut segs = path.trim_start_matches('/').splitn(4, '/');
    let (project, kind, port) = (segs.next(), segs.next(), segs.next());
    matches!(kind, Some("port" | "server"))
        && project.is_some_and(|p| !p.is_empty())
        && port.is_some_and(|p| !p.is_empty())
}

/// The data plane as the [`LeanService`](cocalc_client::lean::LeanService)
/// of [`cocalc_client::serve::serve_lean`]: plain requests to servers in
/// projects (`/{project}/port/…`, `/{project}/server/…`) are checked and
/// relayed as [`router`]'s `ports` would, in the connection's task, with
/// large bodies from the project's server spliced to the client; every
/// other request is declined and goes to [`router`].
#[derive(Clone)]
pub struct LeanPorts {
    agent: Arc<HostAgent>,
}

impl LeanPorts {
    /// The lean port relay of `agent`.
    pub fn new(agent: Arc<HostAgent>) -> Self {
        LeanPorts { agent }
    }
}

impl std::fmt::Debug for LeanPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanPorts").finish_non_exhaustive()
    }
}

impl cocalc_client::lean::LeanService for LeanPorts {
    type Key = (ProjectId, u16);

    fn takes(&self, req: &axum::http::Request<()>) -> bool {
        is_port_path(req.uri().path())
    }

    async fn call(
        &self,
        req: axum::http::Request<()>,
    ) -> axum::http::Response<cocalc_client::lean::LeanBody<Self::Key>> {
        use cocalc_client::lean::LeanBody;
        let (mut parts, ()) = req.into_parts();
        let a = &*self.agent;
        let answer = match port_call(a, &mut parts).await {
            Ok(Ok(call)) => port_send_lean(a, &call, &parts).await,
            Ok(Err(redirect)) => {
                // The cookie exchange: a head with an empty body.
                let (head, _) = redirect.into_parts();
                let r = axum::http::Response::from_parts(head, LeanBody::Full(Bytes::new()));
                a.responses().record(r.status().as_u16());
                return r;
            }
            Err(f) => Err(f),
        };
        let r = match answer {
            Ok(r) => r.map(LeanBody::Upstream),
            Err(Failure(e)) => {
                let status =
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut r = axum::http::Response::new(LeanBody::Full(Bytes::from(
                    serde_json::to_vec(&e).unwrap_or_default(),
                )));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
        };
        a.responses().record(r.status().as_u16());
        r
    }
}

/// Streams a command's output over a WebSocket (see the table above).
async fn exec_stream(
    State(a): State<AppState>,
    Path(p): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    hold: Option<Hold>,
    upgrading: Option<Upgrading>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response> {
    let g = check_write(&a, &p, &headers, &uri, "exec").await?;
    Ok(ws.on_upgrade(move |socket| async move {
        pump_exec(LoggedSocket::new(socket, upgrading), a, g).await;
        drop(hold);
    }))
}

async fn pump_exec(mut socket: LoggedSocket, a: AppState, g: Grant) {
    use axum::extract::ws::Message;
    use cocalc_core::wire::{ExecStreamEnd, EXEC_STREAM_STDERR, EXEC_STREAM_STDOUT};
    use cocalc_core::ExecEvent;
    use futures_util::StreamExt;
    let end = |e: ExecStreamEnd| {
        Message::Text(
            serde_json::to_string(&e)
                .unwrap_or_else(|_| r#"{"exit":255}"#.into())
                .into(),
        )
    };
    let req = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecRequest>(t.as_str()) {
                Ok(r) if !r.argv.is_empty() => break r,
                Ok(_) => {
                    let e = ApiError::new(400, "bad_request", "argv is empty");
                    let _ = socket.send(end(ExecStreamEnd::Error(e))).await;
                    return;
                }
                Err(e) => {
                    let e = ApiError::new(400, "bad_request", format!("invalid ExecRequest: {e}"));
                    let _ = socket.send(end(ExecStreamEnd::Error(e))).await;
                    return;
                }
            },
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
            _ => return,
        }
    };
    let project = g.claims.project;
    // Standard input: binary frames after the request, until `{"eof":true}`.
    let (stdin_tx, stdin_rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<Bytes>>();
    let mut stdin_tx = Some(stdin_tx);
    let input: cocalc_core::ByteStream = Box::pin(
        tokio_stream::wrappers::UnboundedReceiverStream::new(stdin_rx),
    );
    let started = match a.ensure_running(&g).await {
        Ok(_) => match a.runner().exec_streaming(project, req.clone(), input).await {
            Err(cocalc_core::RunnerError::Unsupported(_)) => {
                // This runner takes stdin only up front: later input is dropped.
                stdin_tx = None;
                a.runner().exec(project, req).await
            }
            other => other,
        }
        .map_err(AgentError::from),
        Err(e) => Err(e),
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = socket
                .send(end(ExecStreamEnd::Error(ApiError::from(&e))))
                .await;
            return;
        }
    };
    loop {
        tokio::select! {
            ev = stream.next() => {
                let msg = match ev {
                    Some(Ok(ExecEvent::Stdout(b))) => tagged(EXEC_STREAM_STDOUT, &b),
                    Some(Ok(ExecEvent::Stderr(b))) => tagged(EXEC_STREAM_STDERR, &b),
                    Some(Ok(ExecEvent::Exit(c))) => end(ExecStreamEnd::Exit(c)),
                    Some(Err(e)) => end(ExecStreamEnd::Error(ApiError::from(&AgentError::from(e)))),
                    None => end(ExecStreamEnd::Error(ApiError::new(
                        502,
                        "exec_failed",
                        "command ended without an exit code",
                    ))),
                };
                let last = matches!(msg, Message::Text(_));
                if socket.send(msg).await.is_err() || last {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(Message::Binary(b))) => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(Ok(b));
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if serde_json::from_str::<StdinEof>(t.as_str()).is_ok_and(|e| e.eof) {
                        stdin_tx = None;
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// `{"eof": true}`: the client's end of standard input on an exec stream.
#[derive(serde::Deserialize)]
struct StdinEof {
    eof: bool,
}

fn tagged(tag: u8, b: &[u8]) -> axum::extract::ws::Message {
    let mut v = Vec::with_capacity(b.len() + 1);
    v.push(tag);
    v.extend_from_slice(b);
    axum::extract::ws::Message::Binary(v.into())
}

/// Relays a WebSocket to a TCP port inside the project (SSH `direct-tcpip`).
async fn tcp(
    State(a): State<AppState>,
    Path((p, port)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    hold: Option<Hold>,
    upgrading: Option<Upgrading>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response> {
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        Failure(ApiError::new(
            400,
            "invalid_port",
            format!("{port:?} is not a port number (1-65535)"),
        ))
    })?;
    let g = check_write(&a, &p, &headers, &uri, "port").await?;
    a.ensure_running(&g).await?;
    let conn = a
        .runner()
        .connect_port(g.claims.project, port)
        .await
        .map_err(|e| {
            Failure(ApiError::new(
                502,
                "port_unreachable",
                format!("nothing answers on port {port} in the project: {e}"),
            ))
        })?;
    Ok(ws.on_upgrade(move |socket| async move {
        pump_tcp(LoggedSocket::new(socket, upgrading), conn).await;
        drop(hold);
    }))
}

async fn pump_tcp(mut socket: LoggedSocket, conn: cocalc_core::transport::BoxedConnection) {
    use axum::extract::ws::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = wr.shutdown().await;
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
