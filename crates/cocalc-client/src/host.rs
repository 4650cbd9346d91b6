//! [`HostClient`]: the data plane from the caller's side (the `cocalc` CLI,
//! the master's forwarding, tests), for one project on one host with one
//! connect token. Errors come back as the host's [`ApiError`].

use cocalc_core::wire::ExecResult;
use cocalc_core::{ApiError, ExecRequest, ProjectId, RunStatus};
use serde::de::DeserializeOwned;

use cocalc_core::wire::FileEntry;

/// A client of one project's data plane.
#[derive(Debug, Clone)]
pub struct HostClient {
    base: String,
    project: ProjectId,
    token: String,
    http: reqwest::Client,
    stream_idle: std::time::Duration,
}

fn unreachable(base: &str, e: reqwest::Error) -> ApiError {
    ApiError::new(
        503,
        "host_unreachable",
        format!("cannot reach the host at {base}: {e}"),
    )
}

/// Percent-encodes a project file path for a data-plane URL, keeping `/`
/// between names (everything but unreserved characters is escaped, so
/// `?`, `#`, `%` and spaces cannot change the URL's meaning).
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `files/<path><query>`, or `files<query>` for the home.
fn file_rest(path: &str, query: &str) -> String {
    let p = path.trim_start_matches('/');
    if p.is_empty() || p == "." {
        format!("files{query}")
    } else {
        format!("files/{}{query}", encode_path(p))
    }
}

/// How long [`HostClient::move_stream`] waits for the next bytes before it
/// ends the stream with an error: a source whose machine vanished sends
/// no FIN, and the receiving host would otherwise wait without end.
pub const MOVE_STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

impl HostClient {
    /// A client of `project` on the host at `base` (its URL), with `token`.
    pub fn new(base: impl Into<String>, project: ProjectId, token: impl Into<String>) -> Self {
        HostClient {
            base: base.into().trim_end_matches('/').to_string(),
            project,
            token: token.into(),
            http: crate::http_client(),
            stream_idle: MOVE_STREAM_IDLE,
        }
    }

    /// This client with another stall limit for
    /// [`move_stream`](HostClient::move_stream) (default
    /// [`MOVE_STREAM_IDLE`]).
    pub fn with_stream_idle(mut self, idle: std::time::Duration) -> Self {
        self.stream_idle = idle;
        self
    }

    /// Refuses `..` before sending: URL normalisation would otherwise
    /// resolve it on this side and send a different path.
    fn checked(path: &str) -> Result<&str, ApiError> {
        if path.split('/').any(|c| c == "..") {
            return Err(ApiError::new(
                403,
                "path_escape",
                format!("path escapes the project: {path}"),
            ));
        }
        Ok(path)
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/{}/{rest}", self.base, self.project)
    }

    /// Sends `req` with the token; a successful answer is returned before
    /// its body is read, any other becomes the host's [`ApiError`].
    async fn respond(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| unreachable(&self.base, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.map_err(|e| unreachable(&self.base, e))?;
        Err(
            serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| {
                ApiError::new(
                    status.as_u16(),
                    "http_error",
                    String::from_utf8_lossy(&body),
                )
            }),
        )
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<bytes::Bytes, ApiError> {
        self.respond(req)
            .await?
            .bytes()
            .await
            .map_err(|e| unreachable(&self.base, e))
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ApiError> {
        let body = self.send(req).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                502,
                "bad_response",
                format!("unexpected answer from the host: {e}"),
            )
        })
    }

    /// Runs a command (the host starts the project if needed).
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecResult, ApiError> {
        self.json(self.http.post(self.url("exec")).json(req)).await
    }

    /// The project's status.
    pub async fn status(&self) -> Result<RunStatus, ApiError> {
        self.json(self.http.get(self.url("status"))).await
    }

    /// Starts the project.
    pub async fn start(&self) -> Result<RunStatus, ApiError> {
        self.json(self.http.post(self.url("start"))).await
    }

    /// Stops the project.
    pub async fn stop(&self) -> Result<(), ApiError> {
        self.send(self.http.post(self.url("stop")))
            .await
            .map(|_| ())
    }

    /// Backs the project up now (the last backup again if nothing
    /// changed since).
    pub async fn backup(&self) -> Result<cocalc_core::BackupInfo, ApiError> {
        self.json(self.http.post(self.url("backups"))).await
    }

    /// The project's backups, oldest first.
    pub async fn backups(&self) -> Result<Vec<cocalc_core::BackupInfo>, ApiError> {
        self.json(self.http.get(self.url("backups"))).await
    }

    /// Restores `path` (or, with `None`, the whole stopped project) from
    /// backup `id`.
    pub async fn restore_backup(
        &self,
        id: &str,
        path: Option<&str>,
    ) -> Result<cocalc_core::wire::RestoredBackup, ApiError> {
        if !id.bytes().all(|b| b.is_ascii_alphanumeric()) || id.is_empty() {
            return Err(ApiError::new(
                400,
                "bad_request",
                format!("not a backup id: {id:?}"),
            ));
        }
        let body = cocalc_core::wire::RestoreBackupRequest::new(path.map(str::to_string));
        self.json(
            self.http
                .post(self.url(&format!("backups/{id}/restore")))
                .json(&body),
        )
        .await
    }

    /// The project's snapshots on this host, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<cocalc_core::SnapshotInfo>, ApiError> {
        self.json(self.http.get(self.url("snapshots"))).await
    }

    /// A move's first and last step on the source (master tokens only):
    /// the newest snapshot, taken now if anything changed; with `freeze`
    /// the project is stopped first and kept from starting.
    pub async fn move_snapshot(
        &self,
        freeze: bool,
    ) -> Result<cocalc_core::moves::MoveSnapshot, ApiError> {
        let body = cocalc_core::moves::MoveSnapshotRequest { freeze };
        self.json(self.http.post(self.url("move/snapshot")).json(&body))
            .await
    }

    /// The send stream of `snapshot` (changes since `parent` if given), as
    /// it arrives (master tokens only). A stream cut in transit ends with
    /// an error, never early without one; so does one that stalls for
    /// [`MOVE_STREAM_IDLE`] (see [`with_stream_idle`](HostClient::with_stream_idle)).
    pub async fn move_stream(
        &self,
        snapshot: &str,
        parent: Option<&str>,
    ) -> Result<cocalc_core::ByteStream, ApiError> {
        let mut q = vec![("snapshot", snapshot)];
        if let Some(p) = parent {
            q.push(("parent", p));
        }
        let resp = self
            .respond(self.http.get(self.url("move/stream")).query(&q))
            .await?;
        let idle = self.stream_idle;
        let stream = futures_util::stream::unfold(Some(resp), move |resp| async move {
            let mut resp = resp?;
            match tokio::time::timeout(idle, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(resp))),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => Some((Err(std::io::Error::other(e)), None)),
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no byte from the source for {idle:?}"),
                    )),
                    None,
                )),
            }
        });
        Ok(Box::pin(stream))
    }

    /// Has this host (a move's target) fetch a snapshot from the source and
    /// receive it (master tokens only).
    pub async fn move_pull(
        &self,
        req: &cocalc_core::moves::MovePullRequest,
    ) -> Result<cocalc_core::SnapshotInfo, ApiError> {
        self.json(self.http.post(self.url("move/pull")).json(req))
            .await
    }

    /// Ends a move's freeze on the source, restarting the project if asked
    /// (master tokens only).
    pub async fn move_thaw(&self, restart: bool) -> Result<(), ApiError> {
        let body = cocalc_core::moves::MoveThawRequest { restart };
        self.send(self.http.post(self.url("move/thaw")).json(&body))
            .await
            .map(|_| ())
    }

    /// Deletes the project's copy on this host (master tokens only); with
    /// `snapshot`, only a copy holding that snapshot (the one a move
    /// copied first). Answers whether a copy was deleted.
    pub async fn move_discard(&self, snapshot: Option<&str>) -> Result<bool, ApiError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            deleted: bool,
        }
        let body = cocalc_core::moves::MoveDiscardRequest {
            snapshot: snapshot.map(str::to_string),
        };
        let a: Answer = self
            .json(self.http.post(self.url("move/discard")).json(&body))
            .await?;
        Ok(a.deleted)
    }

    /// Deletes the source's copy after the flip (master tokens of the new
    /// generation only).
    pub async fn move_release(&self) -> Result<(), ApiError> {
        self.send(self.http.post(self.url("move/release")))
            .await
            .map(|_| ())
    }

    /// Lists a directory.
    pub async fn list(&self, path: &str) -> Result<Vec<FileEntry>, ApiError> {
        self.json(
            self.http
                .get(self.url(&file_rest(Self::checked(path)?, ""))),
        )
        .await
    }

    /// Describes one file or directory.
    pub async fn stat(&self, path: &str) -> Result<FileEntry, ApiError> {
        self.json(
            self.http
                .get(self.url(&file_rest(Self::checked(path)?, "?stat"))),
        )
        .await
    }

    /// Reads a file.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, ApiError> {
        Ok(self
            .send(
                self.http
                    .get(self.url(&file_rest(Self::checked(path)?, ""))),
            )
            .await?
            .to_vec())
    }

    /// Creates or replaces a file.
    pub async fn write(&self, path: &str, data: Vec<u8>) -> Result<(), ApiError> {
        self.send(
            self.http
                .put(self.url(&file_rest(Self::checked(path)?, "")))
                .body(data),
        )
        .await
        .map(|_| ())
    }

    /// Creates a directory (and its parents).
    pub async fn mkdir(&self, path: &str) -> Result<(), ApiError> {
        self.send(
            self.http
                .post(self.url(&file_rest(Self::checked(path)?, "?op=mkdir"))),
        )
        .await
        .map(|_| ())
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, path: &str) -> Result<(), ApiError> {
        self.send(
            self.http
                .delete(self.url(&file_rest(Self::checked(path)?, ""))),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    /// A source that sends part of a stream and then stalls, its
    /// connection open: the stream ends with a timeout error.
    #[tokio::test]
    async fn a_stalled_move_stream_ends_with_an_error() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            crate::test_util::read_head(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            // Stalls with the connection open.
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(s);
        });
        let project = cocalc_core::ProjectId::new_v4([1; 16]);
        let c = super::HostClient::new(format!("http://{addr}"), project, "t")
            .with_stream_idle(std::time::Duration::from_millis(200));
        let mut stream = c.move_stream("s1", None).await.unwrap();
        let first = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&first[..], b"hello");
        let t = std::time::Instant::now();
        let e = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        assert!(std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))
            .await
            .is_none());
        server.abort();
    }

    #[test]
    fn paths_are_encoded_but_keep_slashes() {
        assert_eq!(super::encode_path("a b/c?d"), "a%20b/c%3Fd");
        assert_eq!(super::encode_path("ü"), "%C3%BC");
    }
}
