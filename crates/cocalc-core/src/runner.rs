//! The [`Runner`] trait: one container (or process group) per project.
//!
//! Implementations: `PodmanRunner` (one podman container per project) and
//! `ProcessRunner` (plain processes for development) in `cocalc-host`, and an
//! in-memory fake in `cocalc-testkit`. Every implementation must pass the
//! runner contract suite in `cocalc-testkit`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::ProjectId;
use crate::record::{Generation, ProjectState};
use crate::stream::{BoxStream, ByteStream};
use crate::time::Timestamp;

/// Resource limits applied to a project's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core.
    pub cpu_millis: u64,
    /// Maximum number of processes.
    pub pids: u64,
}

impl Default for ResourceLimits {
    /// 1 GiB, one core, 4096 processes.
    fn default() -> Self {
        ResourceLimits {
            memory_bytes: 1 << 30,
            cpu_millis: 1000,
            pids: 4096,
        }
    }
}

/// Everything a runner needs to start a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProjectSpec {
    /// The project.
    pub project: ProjectId,
    /// Placement generation this start is for. A runner that has seen a newer
    /// generation for the project refuses with [`RunnerError::StaleGeneration`].
    pub generation: Generation,
    /// Hostname inside the container (the project's name).
    pub hostname: String,
    /// Requested image; `None` means the runner's default.
    pub image: Option<String>,
    /// Host path of the project's home (mounted at `/home/user`).
    pub home: PathBuf,
    /// Host path of the project's scratch space (mounted at `/tmp`).
    pub scratch: Option<PathBuf>,
    /// Limits.
    pub limits: ResourceLimits,
}

impl ProjectSpec {
    /// A spec with default limits, default image and no scratch space.
    pub fn new(project: ProjectId, generation: Generation, home: PathBuf) -> Self {
        ProjectSpec {
            project,
            generation,
            hostname: "project".into(),
            image: None,
            home,
            scratch: None,
            limits: ResourceLimits::default(),
        }
    }
}

/// A runner's view of one project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStatus {
    /// The project.
    pub project: ProjectId,
    /// Container state (`Stopped` if the runner knows nothing of it).
    pub state: ProjectState,
    /// When the current container started, if running.
    pub started_at: Option<Timestamp>,
    /// The image it runs.
    pub image: Option<String>,
    /// Resource use, where the backend can tell.
    pub usage: Option<ResourceUsage>,
}

impl RunStatus {
    /// The status of a project the runner has no container for.
    pub fn stopped(project: ProjectId) -> Self {
        RunStatus {
            project,
            state: ProjectState::Stopped,
            started_at: None,
            image: None,
            usage: None,
        }
    }
}

/// Resource use of a running project.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResourceUsage {
    /// CPU time used since start, microseconds.
    pub cpu_time_us: u64,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Number of processes.
    pub pids: u64,
}

/// A command to run inside a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the container's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the project (default: its home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, then stdin is closed.
    #[serde(default)]
    pub stdin: Option<Vec<u8>>,
    /// Kill the command after this long (`{"secs": 60, "nanos": 0}`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    /// Runs `argv` with nothing else set.
    pub fn new(argv: Vec<String>) -> Self {
        ExecRequest {
            argv,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: None,
        }
    }
}

/// One event of a running command. A well-formed stream is any number of
/// `Stdout`/`Stderr` chunks followed by exactly one `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of standard output.
    Stdout(Bytes),
    /// A chunk of standard error.
    Stderr(Bytes),
    /// The command ended with this code (128 + signal number if killed).
    Exit(i32),
}

/// The events of a running command, as a stream.
pub type ExecStream = BoxStream<Result<ExecEvent, RunnerError>>;

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// The input side of an interactive terminal.
#[async_trait]
pub trait PtyControl: Send + Sync {
    /// Sends bytes to the terminal's input.
    async fn write(&self, data: Bytes) -> Result<(), RunnerError>;
    /// Changes the terminal size.
    async fn resize(&self, size: PtySize) -> Result<(), RunnerError>;
    /// Ends the session: the shell and its children are terminated.
    async fn close(&self) -> Result<(), RunnerError>;
}

/// An interactive terminal session in a project.
pub struct PtySession {
    /// Everything the terminal prints; ends when the session ends.
    pub output: ByteStream,
    /// Input, resize and close.
    pub control: Box<dyn PtyControl>,
}

impl std::fmt::Debug for PtySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PtySession { .. }")
    }
}

/// Why a runner call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The runner has no container for this project (for calls that need one).
    #[error("project {0} is not running")]
    NotRunning(ProjectId),
    /// The image is not on the allowlist.
    #[error("image not allowed: {image}; allowed: {}", allowed.join(", "))]
    ImageNotAllowed {
        /// The image asked for.
        image: String,
        /// The allowlist.
        allowed: Vec<String>,
    },
    /// The image is allowed but not present on this host.
    #[error("image {image} is not present on this host (no registry is consulted)")]
    ImageMissing {
        /// The image asked for.
        image: String,
    },
    /// A newer placement generation of this project has been seen.
    #[error("stale generation {got} for project {project}: this host has seen {seen}")]
    StaleGeneration {
        /// The project.
        project: ProjectId,
        /// Generation in the request.
        got: Generation,
        /// Newest generation seen.
        seen: Generation,
    },
    /// The request itself is invalid (empty argv, bad cwd).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The backend does not offer this operation.
    #[error("not supported by this runner: {0}")]
    Unsupported(&'static str),
    /// The command ran longer than its timeout and was killed.
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    /// The container engine failed; may succeed if retried.
    #[error("runner backend error: {0}")]
    Backend(String),
}

impl RunnerError {
    /// True when retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RunnerError::Backend(_))
    }
}

/// Runs projects. One container (or process group) per project.
///
/// Contract for every implementation:
/// - [`start`](Runner::start) is idempotent: starting a running project
///   returns its status and changes nothing. It refuses a spec whose
///   generation is older than one it has seen for that project.
/// - [`stop`](Runner::stop) is idempotent: stopping a stopped or unknown
///   project is `Ok`. The container gets `grace` to exit, then is killed.
/// - [`status`](Runner::status) never fails for an unknown project: it answers
///   `Stopped`.
/// - [`exec`](Runner::exec) needs a running project ([`RunnerError::NotRunning`]
///   otherwise) and streams output as it is produced; dropping the stream
///   ends the command.
/// - Calls for different projects may proceed concurrently.
#[async_trait]
pub trait Runner: Send + Sync {
    /// Starts the project's container (idempotent).
    async fn start(&self, spec: &ProjectSpec) -> Result<RunStatus, RunnerError>;

    /// Stops it, waiting up to `grace` before killing (idempotent).
    async fn stop(&self, project: ProjectId, grace: Duration) -> Result<(), RunnerError>;

    /// Reports its state.
    async fn status(&self, project: ProjectId) -> Result<RunStatus, RunnerError>;

    /// Runs a command in it, streaming output.
    async fn exec(&self, project: ProjectId, req: ExecRequest) -> Result<ExecStream, RunnerError>;

    /// Runs a command whose standard input stays open: `req.stdin` (if
    /// any) is written first, then each chunk of `input` as it arrives; the
    /// end of `input` closes the command's stdin (for SSH sessions, rsync,
    /// git). Same contract as [`exec`](Runner::exec) otherwise. Default:
    /// [`RunnerError::Unsupported`].
    async fn exec_streaming(
        &self,
        project: ProjectId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecStream, RunnerError> {
        let _ = (project, req, input);
        Err(RunnerError::Unsupported(
            "commands with streamed standard input",
        ))
    }

    /// Every project this runner has a container for (used to re-adopt
    /// running projects after a restart). Default: none.
    async fn list(&self) -> Result<Vec<RunStatus>, RunnerError> {
        Ok(Vec::new())
    }

    /// Opens a TCP connection to `127.0.0.1:port` as the project sees it
    /// (inside its own network namespace where the backend isolates
    /// projects), for proxying users to servers in the project. Needs a
    /// running project. Default: [`RunnerError::Unsupported`].
    async fn connect_port(
        &self,
        project: ProjectId,
        port: u16,
    ) -> Result<crate::transport::BoxedConnection, RunnerError> {
        let _ = (project, port);
        Err(RunnerError::Unsupported("connections to project ports"))
    }

    /// Opens an interactive terminal. Default: [`RunnerError::Unsupported`].
    async fn pty(&self, project: ProjectId, size: PtySize) -> Result<PtySession, RunnerError> {
        let _ = (project, size);
        Err(RunnerError::Unsupported("interactive terminals"))
    }
}
