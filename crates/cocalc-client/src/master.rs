//! [`MasterClient`]: the master's HTTP API from the caller's side, shared by
//! the `cocalc` CLI and embedders. Errors come back as the server's
//! [`ApiError`].

use cocalc_core::wire::{
    AddSshKeyRequest, CreateProjectRequest, OpenProjectResponse, PlacementExplanation, ProjectInfo,
    SshAuthorizeRequest, SshKey,
};
use cocalc_core::{ApiError, HostId, HostInfo};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A client of one master, acting with one API key.
#[derive(Debug, Clone)]
pub struct MasterClient {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl MasterClient {
    /// A client of the master at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: impl Into<String>, api_key: impl Into<String>) -> Self {
        MasterClient {
            base: base.into().trim_end_matches('/').to_string(),
            key: api_key.into(),
            http: crate::http_client(),
        }
    }

    /// The API key this client acts with.
    pub fn api_key(&self) -> &str {
        &self.key
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            ApiError::new(
                503,
                "master_unreachable",
                format!("cannot reach the master at {}: {e}", self.base),
            )
            .with_hint("is cocalc-master running? set --master or COCALC_MASTER")
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| {
            ApiError::new(
                502,
                "bad_response",
                format!("reading the master's answer: {e}"),
            )
        })?;
        if !status.is_success() {
            return Err(
                serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                    ApiError::new(
                        status.as_u16(),
                        "http_error",
                        String::from_utf8_lossy(&bytes).into_owned(),
                    )
                }),
            );
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                502,
                "bad_response",
                format!("unexpected answer from the master: {e}"),
            )
        })
    }

    /// Creates a user (admin); returns `{id, name, api_key}`.
    pub async fn create_user(&self, name: &str) -> Result<Value, ApiError> {
        self.call(
            reqwest::Method::POST,
            "/v1/users",
            Some(serde_json::json!({ "name": name })),
        )
        .await
    }

    /// Creates a project.
    pub async fn create_project(
        &self,
        req: &CreateProjectRequest,
    ) -> Result<ProjectInfo, ApiError> {
        let body = serde_json::to_value(req)
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(reqwest::Method::POST, "/v1/projects", Some(body))
            .await
    }

    /// The caller's projects.
    pub async fn projects(&self) -> Result<Vec<ProjectInfo>, ApiError> {
        self.call(reqwest::Method::GET, "/v1/projects", None).await
    }

    /// Opens a project (by id or name).
    pub async fn open(&self, project: &str) -> Result<OpenProjectResponse, ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/open"),
            None,
        )
        .await
    }

    /// Why a project is where it is.
    pub async fn explain(&self, project: &str) -> Result<PlacementExplanation, ApiError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/projects/{project}/placement"),
            None,
        )
        .await
    }

    /// Runs a command in a project through the master (it forwards to the
    /// project's host as the caller).
    pub async fn exec(
        &self,
        project: &str,
        req: &cocalc_core::ExecRequest,
    ) -> Result<cocalc_core::wire::ExecResult, ApiError> {
        let body = serde_json::to_value(req)
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/exec"),
            Some(body),
        )
        .await
    }

    /// Starts a project through the master.
    pub async fn start(&self, project: &str) -> Result<cocalc_core::RunStatus, ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/start"),
            None,
        )
        .await
    }

    /// Stops a project through the master.
    pub async fn stop(&self, project: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/projects/{project}/stop"),
                None,
            )
            .await?;
        Ok(())
    }

    /// Re-places a project whose host is down or draining (admin).
    pub async fn replace(&self, project: &str) -> Result<PlacementExplanation, ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/replace"),
            None,
        )
        .await
    }

    /// Starts moving a project (admin) to `to`, or to the host placement
    /// picks; answers the move as stored when it began (phase `copying`).
    pub async fn move_project(
        &self,
        project: &str,
        to: Option<HostId>,
    ) -> Result<cocalc_core::MoveRecord, ApiError> {
        let body = serde_json::to_value(cocalc_core::moves::MoveRequest { to })
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/move"),
            Some(body),
        )
        .await
    }

    /// Drains a host and moves every project off it, one at a time, in
    /// the background (admin); answers which projects it will move.
    pub async fn evacuate(&self, host: HostId) -> Result<cocalc_core::moves::Evacuation, ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/hosts/{host}/evacuate"),
            None,
        )
        .await
    }

    /// Deletes the copy of `project` that `host` holds although the map
    /// names another host (admin).
    pub async fn discard_copy(&self, host: HostId, project: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/hosts/{host}/projects/{project}"),
                None,
            )
            .await?;
        Ok(())
    }

    /// Polls the latest move of `project` (admin) every 200 ms until it is
    /// finished, and answers it.
    pub async fn wait_move(&self, project: &str) -> Result<cocalc_core::MoveRecord, ApiError> {
        loop {
            let mv = self.project_move(project).await?;
            if mv.phase.is_finished() {
                return Ok(mv);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Follows an evacuation (admin) until every project it listed has
    /// left the host, or its move (begun after the evacuation) rolled back,
    /// or `timeout` passed: polls each project's placement and latest move
    /// every 250 ms.
    pub async fn wait_evacuation(
        &self,
        ev: &cocalc_core::moves::Evacuation,
        timeout: std::time::Duration,
    ) -> Result<EvacuationOutcome, ApiError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut out = EvacuationOutcome::default();
        let mut left = ev.projects.clone();
        while !left.is_empty() && std::time::Instant::now() < deadline {
            let mut still = Vec::new();
            for p in left {
                let id = p.to_string();
                let at = self.explain(&id).await?.decision.host;
                if at != ev.host {
                    out.moved.push((p, at));
                    continue;
                }
                match self.project_move(&id).await {
                    Ok(mv)
                        if mv.started >= ev.started
                            && mv.phase == cocalc_core::MovePhase::RolledBack =>
                    {
                        let why = mv.error.unwrap_or_else(|| "rolled back".into());
                        out.failed.push((p, why));
                    }
                    _ => still.push(p),
                }
            }
            left = still;
            if !left.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
        out.left = left;
        Ok(out)
    }

    /// The latest move of a project (admin), finished or not.
    pub async fn project_move(&self, project: &str) -> Result<cocalc_core::MoveRecord, ApiError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/projects/{project}/move"),
            None,
        )
        .await
    }

    /// How to reach one host (any API key).
    pub async fn host_endpoint(&self, host: HostId) -> Result<cocalc_core::HostEndpoint, ApiError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/hosts/{host}/endpoint"),
            None,
        )
        .await
    }

    /// A host's registered public key (any API key).
    pub async fn host_key(
        &self,
        host: HostId,
    ) -> Result<cocalc_core::wire::HostKeyResponse, ApiError> {
        self.call(reqwest::Method::GET, &format!("/v1/hosts/{host}/key"), None)
            .await
    }

    /// The master's public token-signing keys (PASERK), newest first.
    pub async fn signing_keys(&self) -> Result<Vec<String>, ApiError> {
        let v: serde_json::Value = self.call(reqwest::Method::GET, "/v1/keys", None).await?;
        serde_json::from_value(v["signing_keys"].clone())
            .map_err(|e| ApiError::new(502, "bad_response", e.to_string()))
    }

    /// Every host (admin).
    pub async fn hosts(&self) -> Result<Vec<HostInfo>, ApiError> {
        self.call(reqwest::Method::GET, "/v1/hosts", None).await
    }

    /// Drains (`true`) or undrains a host (admin).
    pub async fn drain(&self, host: HostId, drain: bool) -> Result<HostInfo, ApiError> {
        let verb = if drain { "drain" } else { "undrain" };
        self.call(
            reqwest::Method::POST,
            &format!("/v1/hosts/{host}/{verb}"),
            None,
        )
        .await
    }

    /// A one-time host bootstrap token (admin): `{token, expires}`.
    pub async fn bootstrap_token(&self) -> Result<Value, ApiError> {
        self.call(reqwest::Method::POST, "/v1/admin/bootstrap-tokens", None)
            .await
    }

    /// Rotates the signing key (admin): `{key_id, signing_keys}`.
    pub async fn rotate_key(&self) -> Result<Value, ApiError> {
        self.call(reqwest::Method::POST, "/v1/admin/keys/rotate", None)
            .await
    }
    /// Registers an SSH public key (one OpenSSH line) for the calling user.
    pub async fn add_ssh_key(&self, public_key: &str) -> Result<SshKey, ApiError> {
        let body = serde_json::to_value(AddSshKeyRequest::new(public_key))
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(reqwest::Method::POST, "/v1/users/me/ssh-keys", Some(body))
            .await
    }

    /// The calling user's SSH keys.
    pub async fn ssh_keys(&self) -> Result<Vec<SshKey>, ApiError> {
        self.call(reqwest::Method::GET, "/v1/users/me/ssh-keys", None)
            .await
    }

    /// Removes one of the calling user's SSH keys by fingerprint (`SHA256:…`).
    pub async fn remove_ssh_key(&self, fingerprint: &str) -> Result<(), ApiError> {
        let enc: String = fingerprint
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.call::<Value>(
            reqwest::Method::DELETE,
            &format!("/v1/users/me/ssh-keys/{enc}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Creates a proxy key named `name` (admin key); the answer holds the
    /// key, shown only this once.
    pub async fn create_proxy_key(
        &self,
        name: &str,
    ) -> Result<cocalc_core::wire::CreatedProxyKey, ApiError> {
        let body = serde_json::to_value(cocalc_core::wire::CreateProxyKeyRequest::new(name))
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(reqwest::Method::POST, "/v1/admin/proxy-keys", Some(body))
            .await
    }

    /// Every proxy key (admin key).
    pub async fn proxy_keys(&self) -> Result<Vec<cocalc_core::wire::ProxyKey>, ApiError> {
        self.call(reqwest::Method::GET, "/v1/admin/proxy-keys", None)
            .await
    }

    /// Revokes the proxy key named `name` (admin key).
    pub async fn revoke_proxy_key(&self, name: &str) -> Result<(), ApiError> {
        let path = format!(
            "/v1/admin/proxy-keys/{}",
            crate::encode_path(name).replace('/', "%2F")
        );
        self.call::<Value>(reqwest::Method::DELETE, &path, None)
            .await
            .map(|_| ())
    }

    /// For proxies (a proxy key or the admin key): a connect token for
    /// the collaborator who registered `public_key`, or one uniform 403.
    pub async fn ssh_authorize(
        &self,
        req: &SshAuthorizeRequest,
    ) -> Result<OpenProjectResponse, ApiError> {
        let body = serde_json::to_value(req)
            .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?;
        self.call(reqwest::Method::POST, "/v1/ssh/authorize", Some(body))
            .await
    }
}

/// How an evacuation ended, as [`MasterClient::wait_evacuation`] saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EvacuationOutcome {
    /// Projects that left the host, with the host each is on now.
    pub moved: Vec<(cocalc_core::ProjectId, HostId)>,
    /// Projects whose move rolled back, with why.
    pub failed: Vec<(cocalc_core::ProjectId, String)>,
    /// Projects still on the host when the wait ended.
    pub left: Vec<cocalc_core::ProjectId>,
}
