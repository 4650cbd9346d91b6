//! [`PodmanRunner`]: one podman container per project, through podman's
//! Docker-compatible API (bollard).
//!
//! Each project runs in a container named `project-<uuid>`, labelled with
//! the project ([`LABEL_PROJECT`]), the host ([`LABEL_HOST`]), the role
//! ([`LABEL_ROLE`]) and the placement generation ([`LABEL_GENERATION`]).
//! Several hosts may share one machine and one podman: a runner sees, adopts
//! and stops only containers carrying its own host id.
//!
//! The container:
//! - runs as an unprivileged user ([`PodmanConfig::user`], default
//!   2001:2001) with every capability dropped and `no-new-privileges`;
//! - has the project's home bind-mounted at `/home/user` (its working
//!   directory and `HOME`) and its scratch at `/tmp` (a tmpfs if the spec has
//!   no scratch); the runner makes the top directory of both owned by the
//!   project user (not recursively);
//! - gets its memory, CPU and process limits from [`ProjectSpec::limits`];
//! - has **no network** (`NetworkMode=none`): it cannot reach other projects
//!   or the host's control API. The host reaches servers inside it with
//!   [`PodmanRunner::connect_port`].
//!
//! Images need `/bin/sh` (the container's keep-alive main process and the
//! default terminal shell) and a world-writable `/tmp` (podman copies the
//! image's `/tmp`, mode included, onto the tmpfs that serves as `/tmp` when
//! a spec has no scratch directory).
//!
//! Dropping a runner stops the podman service it started but **leaves the
//! project containers running**: a new runner for the same host adopts them
//! ([`Runner::list`]). Stop projects explicitly to end them.
//!
//! ```no_run
//! use cocalc_core::{Generation, HostId, ProjectId, ProjectSpec, Runner};
//! use cocalc_host::podman::{PodmanConfig, PodmanRunner};
//! use cocalc_host::ImagePolicy;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let host = HostId::new_v4([1; 16]);
//! let images = ImagePolicy::single("localhost/cocalc-busybox:1");
//! let runner = PodmanRunner::new(PodmanConfig::new(host, images, "/var/lib/cocalc-host/podman")).await?;
//! runner.import_busybox_image("localhost/cocalc-busybox:1").await?;
//! for adopted in runner.list().await? {
//!     println!("adopted {} ({:?})", adopted.project, adopted.state);
//! }
//! let project = ProjectId::new_v4([2; 16]);
//! runner.start(&ProjectSpec::new(project, Generation(1), "/srv/projects/p2".into())).await?;
//! // A server the project runs on 127.0.0.1:8080, reached from the host:
//! let _conn = runner.connect_port(project, 8080).await?;
//! # Ok(()) }
//! ```
//!
//! What goes through the podman CLI instead of the API, and why:
//! - `podman import` of the test image ([`PodmanRunner::import_busybox_image`]):
//!   importing through the API ignores the tag.
//! - `podman system service` itself, when the runner starts its own.

mod image_build;
mod netns;
mod service;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, Mount, MountTmpfsOptions, MountType,
    ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use cocalc_core::{
    ExecEvent, ExecRequest, ExecStream, Generation, HostId, ProjectId, ProjectSpec, ProjectState,
    PtyControl, PtySession, PtySize, ResourceUsage, RunStatus, Runner, RunnerError,
};
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

pub use image_build::{import_busybox_image, TEST_IMAGE_UID};
pub use netns::connect_in_netns;
pub use service::{connect, PodmanEnv, PodmanService, StorageDirs};

use crate::activity::{sample_cgroup_of, ActivitySample, ActivitySource};
use crate::image::ImagePolicy;
use crate::process::check_generation;
use crate::started_at::parse_started_at;

/// Label holding the project id.
pub const LABEL_PROJECT: &str = "org.cocalc.project";
/// Label holding the id of the host that owns the container.
pub const LABEL_HOST: &str = "org.cocalc.host";
/// Label holding the role; project containers carry [`ROLE_PROJECT`].
pub const LABEL_ROLE: &str = "org.cocalc.role";
/// Label holding the placement generation the container was started for.
pub const LABEL_GENERATION: &str = "org.cocalc.generation";
/// The role value of project containers.
pub const ROLE_PROJECT: &str = "project";

/// The keep-alive main process of every project container: exits on
/// `SIGTERM` so that `stop` is quick.
const KEEPALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// Why setting up a [`PodmanRunner`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PodmanError {
    /// Writing configuration, starting or reaching the podman service, or
    /// building an image failed.
    #[error("podman setup: {0}")]
    Setup(String),
}

impl From<PodmanError> for RunnerError {
    fn from(e: PodmanError) -> Self {
        RunnerError::Backend(e.to_string())
    }
}

/// Configuration of a [`PodmanRunner`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PodmanConfig {
    /// The host this runner acts for: it owns only containers with this id.
    pub host: HostId,
    /// Allowed images and the default.
    pub images: ImagePolicy,
    /// Directory the runner owns (one runner per directory): `containers.conf`,
    /// `storage.conf`, and the socket and log of the service it starts.
    pub state_dir: PathBuf,
    /// An existing podman API socket to use. `None` (default): the runner
    /// starts `podman system service` on `state_dir/podman.sock` and stops it
    /// when dropped.
    pub socket: Option<PathBuf>,
    /// Podman storage to use instead of podman's default (only for a
    /// service the runner starts, and for CLI calls).
    pub storage: Option<StorageDirs>,
    /// `uid:gid` of the project user inside the container.
    pub user: (u32, u32),
    /// The program (and arguments) of interactive terminals; default
    /// `/bin/sh -l`.
    pub pty_command: Vec<String>,
}

impl PodmanConfig {
    /// A configuration with the default user (2001:2001), the runner's own
    /// service and podman's default storage.
    pub fn new(host: HostId, images: ImagePolicy, state_dir: impl Into<PathBuf>) -> Self {
        PodmanConfig {
            host,
            images,
            state_dir: state_dir.into(),
            socket: None,
            storage: None,
            user: (TEST_IMAGE_UID, TEST_IMAGE_UID),
            pty_command: vec!["/bin/sh".into(), "-l".into()],
        }
    }

    /// Uses an existing podman API socket instead of starting a service.
    pub fn with_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.socket = Some(socket.into());
        self
    }

    /// Keeps podman's images and containers in `storage`.
    pub fn with_storage(mut self, storage: StorageDirs) -> Self {
        self.storage = Some(storage);
        self
    }
}

/// One podman container per project. See the [module docs](self).
pub struct PodmanRunner {
    docker: Docker,
    cfg: PodmanConfig,
    env: PodmanEnv,
    generations: Mutex<HashMap<ProjectId, Generation>>,
    project_locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
    /// Running containers as last inspected, so that a `start` of a running
    /// project needs no API round trip (podman's inspect takes ~15 ms).
    live: Mutex<HashMap<ProjectId, Live>>,
    // Declared last: dropped after everything that talks to it.
    service: Option<PodmanService>,
}

impl std::fmt::Debug for PodmanRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodmanRunner")
            .field("host", &self.cfg.host)
            .field("images", &self.cfg.images)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A container seen running: its main process (host pid and the kernel's
/// start time of that pid, so a reused pid is not mistaken for it) and the
/// status reported then.
#[derive(Debug, Clone)]
struct Live {
    pid: u32,
    starttime: u64,
    status: RunStatus,
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks
/// after boot.
fn proc_starttime(pid: u32) -> Option<u64> {
    crate::procfs::stat_fields(i32::try_from(pid).ok()?)?
        .get(19)?
        .parse()
        .ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one map operation; poisoning cannot leave a
    // half-updated map.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The container name of a project.
pub fn container_name(project: ProjectId) -> String {
    format!("project-{project}")
}

fn backend(what: &str, e: bollard::errors::Error) -> RunnerError {
    RunnerError::Backend(format!("{what}: {e}"))
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Podman's transitional container state that bollard's enum lacks.
fn is_transient_state(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::JsonDataError { .. }
            | bollard::errors::Error::JsonSerdeError { .. }
    ) && e.to_string().contains("unknown variant `stopped`")
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

impl PodmanRunner {
    /// Writes the runner's podman configuration into `cfg.state_dir`,
    /// starts a podman service there unless `cfg.socket` names one, and
    /// connects. Does not adopt anything yet: call [`Runner::list`].
    pub async fn new(cfg: PodmanConfig) -> Result<Self, PodmanError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            PodmanError::Setup(format!("creating {}: {e}", cfg.state_dir.display()))
        })?;
        let env = PodmanEnv::write(&cfg.state_dir, cfg.storage.as_ref())?;
        let (service, docker) = match &cfg.socket {
            Some(sock) => {
                let d = connect(sock)?;
                d.ping().await.map_err(|e| {
                    PodmanError::Setup(format!("podman at {} does not answer: {e}", sock.display()))
                })?;
                (None, d)
            }
            None => {
                let (svc, d) =
                    PodmanService::start(&cfg.state_dir.join("podman.sock"), &env).await?;
                (Some(svc), d)
            }
        };
        Ok(PodmanRunner {
            docker,
            cfg,
            env,
            generations: Mutex::new(HashMap::new()),
            project_locks: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            service,
        })
    }

    /// The host this runner acts for.
    pub fn host(&self) -> HostId {
        self.cfg.host
    }

    /// The bollard client (for callers that need more of podman's API).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The environment that points podman's CLI at this runner's settings.
    pub fn podman_env(&self) -> &PodmanEnv {
        &self.env
    }

    /// The socket of the podman API in use.
    pub fn socket(&self) -> PathBuf {
        match (&self.cfg.socket, &self.service) {
            (Some(s), _) => s.clone(),
            (None, Some(svc)) => svc.socket().to_path_buf(),
            (None, None) => self.cfg.state_dir.join("podman.sock"),
        }
    }

    /// Builds the busybox test image and imports it as `name` into this
    /// runner's podman storage (see [`import_busybox_image`]).
    pub async fn import_busybox_image(&self, name: &str) -> Result<(), PodmanError> {
        import_busybox_image(&self.env, &self.cfg.state_dir, name).await
    }

    fn project_lock(&self, p: ProjectId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.project_locks).entry(p).or_default().clone()
    }

    /// Inspects the project's container; `None` if there is none or it
    /// belongs to another host.
    async fn inspect_own(
        &self,
        project: ProjectId,
    ) -> Result<Option<ContainerInspectResponse>, RunnerError> {
        Ok(self
            .inspect(&container_name(project))
            .await?
            .filter(|c| self.owns(c)))
    }

    /// Inspects a container by name; `None` if there is none.
    ///
    /// Podman briefly reports a state `stopped` (after the process exits,
    /// before cleanup) that the Docker API does not define and bollard cannot
    /// parse: such answers are retried for up to a second.
    async fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>, RunnerError> {
        let mut tries = 0;
        loop {
            match self
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
            {
                Ok(c) => return Ok(Some(c)),
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) if is_transient_state(&e) && tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => return Err(backend("inspecting container", e)),
            }
        }
    }

    fn owns(&self, c: &ContainerInspectResponse) -> bool {
        let host = self.cfg.host.to_string();
        c.config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_HOST))
            .is_some_and(|h| *h == host)
    }

    /// The host pid of a running project's main process.
    async fn pid_of(&self, project: ProjectId) -> Result<u32, RunnerError> {
        let c = self
            .inspect_own(project)
            .await?
            .ok_or(RunnerError::NotRunning(project))?;
        running_pid(&c).ok_or(RunnerError::NotRunning(project))
    }

    fn status_of(&self, project: ProjectId, c: &ContainerInspectResponse) -> RunStatus {
        let mut st = RunStatus::stopped(project);
        let state = c.state.as_ref();
        st.image = c.config.as_ref().and_then(|c| c.image.clone());
        if let Some(pid) = running_pid(c) {
            st.state = ProjectState::Running;
            st.started_at = state.and_then(|s| s.started_at.as_deref()).and_then(|s| {
                match parse_started_at(s) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(%project, "bad StartedAt from podman: {e}");
                        None
                    }
                }
            });
            st.usage = usage_of(pid);
            if let Some(starttime) = proc_starttime(pid) {
                let live = Live {
                    pid,
                    starttime,
                    status: st.clone(),
                };
                lock(&self.live).insert(project, live);
            }
        } else {
            lock(&self.live).remove(&project);
            // Exited on its own with an error (the keep-alive exits 0 on a
            // stop): report it, so it is not mistaken for a clean stop.
            let crashed = state
                .is_some_and(|s| s.oom_killed == Some(true) || s.exit_code.is_some_and(|c| c != 0));
            if crashed {
                st.state = ProjectState::Failed;
            }
        }
        if let Some(g) = generation_label(c) {
            let mut seen = lock(&self.generations);
            let e = seen.entry(project).or_insert(g);
            *e = (*e).max(g);
        }
        st
    }

    /// Opens a TCP connection to `127.0.0.1:port` inside the project's
    /// network namespace (the container has no other network). For the
    /// host's data plane, which proxies users to servers in projects.
    pub async fn connect_port(
        &self,
        project: ProjectId,
        port: u16,
    ) -> Result<tokio::net::TcpStream, RunnerError> {
        let pid = self.pid_of(project).await?;
        let s = connect_in_netns(pid, port, Duration::from_secs(5))
            .await
            .map_err(|e| {
                RunnerError::Backend(format!(
                    "connecting to port {port} in project {project}: {e}"
                ))
            })?;
        // Relayed traffic (a WebSocket's small frames) goes out at once.
        let _ = cocalc_client::liveness::tune(&s);
        Ok(s)
    }

    async fn create_and_start(&self, spec: &ProjectSpec, image: &str) -> Result<(), RunnerError> {
        let name = container_name(spec.project);
        let (uid, gid) = self.cfg.user;
        prepare_dir(&spec.home, uid, gid)?;
        if let Some(s) = &spec.scratch {
            prepare_dir(s, uid, gid)?;
        }
        let mut binds = vec![format!("{}:/home/user:rw", path_str(&spec.home)?)];
        let mut mounts = None;
        match &spec.scratch {
            Some(s) => binds.push(format!("{}:/tmp:rw", path_str(s)?)),
            None => {
                // Podman copies the image's /tmp onto the tmpfs ("tmpcopyup"),
                // mode included: images must have a 1777 /tmp.
                mounts = Some(vec![Mount {
                    target: Some("/tmp".into()),
                    typ: Some(MountType::TMPFS),
                    tmpfs_options: Some(MountTmpfsOptions {
                        size_bytes: Some(64 << 20),
                        mode: Some(0o1777),
                        options: None,
                    }),
                    ..Default::default()
                }]);
            }
        }
        let limits = spec.limits;
        let host_config = HostConfig {
            binds: Some(binds),
            mounts,
            memory: Some(i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX)),
            // Same as memory: no swap beyond the memory limit.
            memory_swap: Some(i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX)),
            nano_cpus: Some(
                i64::try_from(limits.cpu_millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX),
            ),
            pids_limit: Some(i64::try_from(limits.pids).unwrap_or(i64::MAX)),
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            // Both, always: setting one replaces podman's defaults and the
            // other then fails (the agent lacks CAP_SYS_RESOURCE).
            ulimits: Some(vec![
                ResourcesUlimits {
                    name: Some("nofile".into()),
                    soft: Some(1024),
                    hard: Some(1024),
                },
                ResourcesUlimits {
                    name: Some("nproc".into()),
                    soft: Some(1024),
                    hard: Some(1024),
                },
            ]),
            ..Default::default()
        };
        let labels = HashMap::from([
            (LABEL_PROJECT.to_string(), spec.project.to_string()),
            (LABEL_HOST.to_string(), self.cfg.host.to_string()),
            (LABEL_ROLE.to_string(), ROLE_PROJECT.to_string()),
            (LABEL_GENERATION.to_string(), spec.generation.0.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            hostname: Some(spec.hostname.clone()),
            user: Some(format!("{uid}:{gid}")),
            env: Some(vec!["HOME=/home/user".into(), "USER=user".into()]),
            working_dir: Some("/home/user".into()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()]),
            entrypoint: Some(vec![]),
            labels: Some(labels),
            host_config: Some(host_config),
            stop_signal: Some("SIGTERM".into()),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| backend("creating container", e))?;
        if let Err(e) = self.docker.start_container(&name, None).await {
            let _ = self.remove(&name).await;
            return Err(backend("starting container", e));
        }
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), RunnerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend("removing container", e)),
        }
    }

    /// True if `image` is present in this runner's podman storage.
    pub async fn has_image(&self, image: &str) -> Result<bool, RunnerError> {
        match self.ensure_image(image).await {
            Ok(()) => Ok(true),
            Err(RunnerError::ImageMissing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RunnerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(RunnerError::ImageMissing {
                image: image.to_string(),
            }),
            Err(e) => Err(backend("inspecting image", e)),
        }
    }

    /// Creates and starts an exec session; returns its id and the attached
    /// streams.
    async fn start_exec_session(
        &self,
        project: ProjectId,
        cmd: Vec<String>,
        env: Vec<String>,
        cwd: Option<String>,
        tty: bool,
        stdin: bool,
    ) -> Result<(String, AttachedOutput, AttachedInput), RunnerError> {
        let name = container_name(project);
        if self
            .inspect_own(project)
            .await?
            .and_then(|c| running_pid(&c))
            .is_none()
        {
            return Err(RunnerError::NotRunning(project));
        }
        let opts = CreateExecOptions::<String> {
            attach_stdin: Some(stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            env: Some(env),
            cmd: Some(cmd),
            working_dir: cwd,
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(&name, opts)
            .await
            .map_err(|e| match e {
                ref e if is_not_found(e) => RunnerError::NotRunning(project),
                e => backend("creating exec", e),
            })?;
        let started = self
            .docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: false,
                    tty,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| backend("starting exec", e))?;
        match started {
            StartExecResults::Attached { output, input } => Ok((exec.id, output, input)),
            StartExecResults::Detached => Err(RunnerError::Backend("exec started detached".into())),
        }
    }
}

type AttachedOutput = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;
type AttachedInput = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

fn usage_of(pid: u32) -> Option<ResourceUsage> {
    sample_cgroup_of(pid).ok().map(|(s, mem)| ResourceUsage {
        cpu_time_us: s.cpu_time_us,
        memory_bytes: mem,
        pids: s.processes,
    })
}

fn running_pid(c: &ContainerInspectResponse) -> Option<u32> {
    let s = c.state.as_ref()?;
    if s.running != Some(true) {
        return None;
    }
    s.pid.and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0)
}

fn generation_label(c: &ContainerInspectResponse) -> Option<Generation> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(LABEL_GENERATION)?
        .parse()
        .ok()
        .map(Generation)
}

fn path_str(p: &Path) -> Result<&str, RunnerError> {
    let s = p
        .to_str()
        .ok_or_else(|| RunnerError::InvalidRequest(format!("path {p:?} is not UTF-8")))?;
    if s.contains(':') || s.contains(',') {
        return Err(RunnerError::InvalidRequest(format!(
            "path {s:?} contains ':' or ',' and cannot be bind-mounted"
        )));
    }
    Ok(s)
}

/// Checks that `dir` is a directory and makes it (not its contents) owned by
/// the project user.
fn prepare_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), RunnerError> {
    if !dir.is_dir() {
        return Err(RunnerError::InvalidRequest(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
        RunnerError::Backend(format!(
            "making {} owned by {uid}:{gid}: {e}",
            dir.display()
        ))
    })
}

/// Working directory inside the container: relative paths are taken from
/// `/home/user`; `..` is refused.
fn container_cwd(cwd: Option<&str>) -> Result<Option<String>, RunnerError> {
    let Some(cwd) = cwd else { return Ok(None) };
    if Path::new(cwd)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(RunnerError::InvalidRequest(format!(
            "cwd {cwd:?} must not contain '..'"
        )));
    }
    Ok(Some(if cwd.starts_with('/') {
        cwd.to_string()
    } else {
        format!("/home/user/{cwd}")
    }))
}

#[async_trait]
impl Runner for PodmanRunner {
    async fn start(&self, spec: &ProjectSpec) -> Result<RunStatus, RunnerError> {
        let image = self.cfg.images.resolve(spec.image.as_deref())?;
        if !valid_hostname(&spec.hostname) {
            return Err(RunnerError::InvalidRequest(format!(
                "hostname {:?}: use 1-63 characters a-z, 0-9 and '-'",
                spec.hostname
            )));
        }
        let guard = self.project_lock(spec.project);
        let _g = guard.lock().await;
        // Fast path: seen running, and its main process is still the same.
        let known = lock(&self.live).get(&spec.project).cloned();
        if let Some(l) = known {
            if proc_starttime(l.pid) == Some(l.starttime) {
                check_generation(&self.generations, spec)?;
                let mut st = l.status;
                st.usage = usage_of(l.pid);
                return Ok(st);
            }
            lock(&self.live).remove(&spec.project);
        }
        let name = container_name(spec.project);
        let existing = self.inspect(&name).await?;
        if let Some(c) = &existing {
            if !self.owns(c) {
                return Err(RunnerError::InvalidRequest(format!(
                    "container {name} belongs to another host on this machine"
                )));
            }
            if let Some(g) = generation_label(c) {
                let mut seen = lock(&self.generations);
                let e = seen.entry(spec.project).or_insert(g);
                *e = (*e).max(g);
            }
        }
        check_generation(&self.generations, spec)?;
        if let Some(c) = existing {
            if running_pid(&c).is_some() {
                return Ok(self.status_of(spec.project, &c));
            }
            // Exited or never started: recreate from this spec.
            self.remove(&name).await?;
        }
        self.ensure_image(&image).await?;
        self.create_and_start(spec, &image).await?;
        let c = self
            .inspect_own(spec.project)
            .await?
            .ok_or_else(|| RunnerError::Backend(format!("{name} vanished after start")))?;
        let st = self.status_of(spec.project, &c);
        if st.state != ProjectState::Running {
            let err = c
                .state
                .as_ref()
                .and_then(|s| s.error.clone())
                .unwrap_or_default();
            return Err(RunnerError::Backend(format!(
                "{name} exited right after start {err}"
            )));
        }
        Ok(st)
    }

    async fn stop(&self, project: ProjectId, grace: Duration) -> Result<(), RunnerError> {
        let guard = self.project_lock(project);
        let _g = guard.lock().await;
        lock(&self.live).remove(&project);
        let name = container_name(project);
        if self.inspect_own(project).await?.is_none() {
            return Ok(());
        }
        let t = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0))
            .unwrap_or(i32::MAX);
        let opts = StopContainerOptionsBuilder::default().t(t).build();
        match self.docker.stop_container(&name, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(backend("stopping container", e)),
        }
        self.remove(&name).await
    }

    async fn status(&self, project: ProjectId) -> Result<RunStatus, RunnerError> {
        Ok(match self.inspect_own(project).await? {
            Some(c) => self.status_of(project, &c),
            None => RunStatus::stopped(project),
        })
    }

    async fn exec(&self, project: ProjectId, req: ExecRequest) -> Result<ExecStream, RunnerError> {
        self.run_command(project, req, None).await
    }

    async fn exec_streaming(
        &self,
        project: ProjectId,
        req: ExecRequest,
        input: cocalc_core::ByteStream,
    ) -> Result<ExecStream, RunnerError> {
        self.run_command(project, req, Some(input)).await
    }

    async fn list(&self) -> Result<Vec<RunStatus>, RunnerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_HOST}={}", self.cfg.host),
                format!("{LABEL_ROLE}={ROLE_PROJECT}"),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let mut tries = 0;
        let list = loop {
            match self.docker.list_containers(Some(opts.clone())).await {
                Ok(l) => break l,
                // See `inspect`: podman's transitional `stopped` state.
                Err(e) if is_transient_state(&e) && tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => return Err(backend("listing containers", e)),
            }
        };
        let mut out = Vec::with_capacity(list.len());
        for c in list {
            let Some(project) = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_PROJECT))
                .and_then(|p| p.parse::<ProjectId>().ok())
            else {
                continue;
            };
            // Inspect for StartedAt, pid and generation (adopts the latter).
            if let Some(full) = self.inspect_own(project).await? {
                out.push(self.status_of(project, &full));
            }
        }
        Ok(out)
    }

    async fn connect_port(
        &self,
        project: ProjectId,
        port: u16,
    ) -> Result<cocalc_core::BoxedConnection, RunnerError> {
        Ok(Box::new(
            PodmanRunner::connect_port(self, project, port).await?,
        ))
    }

    async fn pty(&self, project: ProjectId, size: PtySize) -> Result<PtySession, RunnerError> {
        let env = vec!["TERM=xterm-256color".to_string()];
        let (id, output, input) = self
            .start_exec_session(project, self.cfg.pty_command.clone(), env, None, true, true)
            .await?;
        // Resizing is only legal once the session has started.
        let resize = ResizeExecOptions {
            height: size.rows,
            width: size.cols,
        };
        self.docker
            .resize_exec(&id, resize)
            .await
            .map_err(|e| backend("resizing terminal", e))?;
        let output = output.map(|item| match item {
            Ok(o) => Ok(o.into_bytes()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
        Ok(PtySession {
            output: Box::pin(output),
            control: Box::new(PodmanPty {
                docker: self.docker.clone(),
                id,
                input: tokio::sync::Mutex::new(Some(input)),
            }),
        })
    }
}

#[async_trait]
impl ActivitySource for PodmanRunner {
    async fn sample(&self, project: ProjectId) -> Result<Option<ActivitySample>, RunnerError> {
        let Some(c) = self.inspect_own(project).await? else {
            return Ok(None);
        };
        let Some(pid) = running_pid(&c) else {
            return Ok(None);
        };
        sample_cgroup_of(pid)
            .map(|(s, _)| Some(s))
            .map_err(|e| RunnerError::Backend(format!("sampling project {project}: {e}")))
    }
}

/// Waits for an exec session to be reported finished and returns its code.
async fn exec_exit_code(docker: &Docker, id: &str) -> Result<ExecEvent, RunnerError> {
    for _ in 0..200 {
        let i = docker
            .inspect_exec(id)
            .await
            .map_err(|e| backend("inspecting exec", e))?;
        if i.running != Some(true) {
            if let Some(code) = i.exit_code {
                return Ok(ExecEvent::Exit(i32::try_from(code).unwrap_or(-1)));
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(RunnerError::Backend(format!(
        "exec {id}: no exit code 5 s after its output ended"
    )))
}

/// Kills an exec session's process and every process in its session (a
/// shell's children included), by host pid.
async fn kill_exec(docker: &Docker, id: &str) {
    let Ok(i) = docker.inspect_exec(id).await else {
        return;
    };
    let Some(pid) = i.pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) else {
        return;
    };
    crate::procfs::kill_session(pid);
}

/// Input side of a podman terminal session.
struct PodmanPty {
    docker: Docker,
    id: String,
    input: tokio::sync::Mutex<Option<AttachedInput>>,
}

#[async_trait]
impl PtyControl for PodmanPty {
    async fn write(&self, data: Bytes) -> Result<(), RunnerError> {
        let mut g = self.input.lock().await;
        let w = g
            .as_mut()
            .ok_or_else(|| RunnerError::InvalidRequest("terminal is closed".into()))?;
        w.write_all(&data)
            .await
            .map_err(|e| RunnerError::Backend(format!("writing to terminal: {e}")))?;
        w.flush()
            .await
            .map_err(|e| RunnerError::Backend(format!("writing to terminal: {e}")))
    }

    async fn resize(&self, size: PtySize) -> Result<(), RunnerError> {
        self.docker
            .resize_exec(
                &self.id,
                ResizeExecOptions {
                    height: size.rows,
                    width: size.cols,
                },
            )
            .await
            .map_err(|e| backend("resizing terminal", e))
    }

    async fn close(&self) -> Result<(), RunnerError> {
        // Closing stdin does not end a tty shell, and dropping the connection
        // leaves it running: end the session ourselves.
        let input = self.input.lock().await.take();
        kill_exec(&self.docker, &self.id).await;
        drop(input);
        Ok(())
    }
}

impl PodmanRunner {
    /// An exec; with `streamed`, stdin stays open and carries it.
    async fn run_command(
        &self,
        project: ProjectId,
        req: ExecRequest,
        streamed: Option<cocalc_core::ByteStream>,
    ) -> Result<ExecStream, RunnerError> {
        if req.argv.is_empty() {
            return Err(RunnerError::InvalidRequest("empty argv".into()));
        }
        let cwd = container_cwd(req.cwd.as_deref())?;
        let env = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let attach = req.stdin.is_some() || streamed.is_some();
        let (id, mut output, mut input) = self
            .start_exec_session(project, req.argv.clone(), env, cwd, false, attach)
            .await?;
        // Kept open until the output ends (closing the attach early can cut
        // the output short).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let keep = match (req.stdin, streamed) {
            (first, None) => {
                if let Some(data) = first {
                    input
                        .write_all(&data)
                        .await
                        .map_err(|e| RunnerError::Backend(format!("writing stdin: {e}")))?;
                    input
                        .shutdown()
                        .await
                        .map_err(|e| RunnerError::Backend(format!("closing stdin: {e}")))?;
                }
                Some(input)
            }
            (first, Some(mut more)) => {
                tokio::spawn(async move {
                    let mut ok = match first {
                        Some(data) => input.write_all(&data).await.is_ok(),
                        None => true,
                    };
                    while ok {
                        match more.next().await {
                            Some(Ok(chunk)) => ok = input.write_all(&chunk).await.is_ok(),
                            _ => break,
                        }
                    }
                    let _ = input.shutdown().await;
                    let _ = done_rx.await;
                    drop(input);
                });
                None
            }
        };
        let docker = self.docker.clone();
        let (tx, rx) = mpsc::channel(64);
        let timeout = req.timeout;
        tokio::spawn(async move {
            let _input = keep;
            let _done = done_tx;
            let pump = async {
                loop {
                    // A reader that went away ends the command at once, not
                    // only at its next output.
                    let item = tokio::select! {
                        i = output.next() => i,
                        _ = tx.closed() => return false,
                    };
                    let Some(item) = item else { break };
                    let ev = match item {
                        Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                            Ok(ExecEvent::Stdout(message))
                        }
                        Ok(LogOutput::StdErr { message }) => Ok(ExecEvent::Stderr(message)),
                        Ok(LogOutput::StdIn { .. }) => continue,
                        Err(e) => Err(backend("reading exec output", e)),
                    };
                    let failed = ev.is_err();
                    if tx.send(ev).await.is_err() || failed {
                        return false;
                    }
                }
                true
            };
            let finished = match timeout {
                Some(d) => match tokio::time::timeout(d, pump).await {
                    Ok(f) => f,
                    Err(_) => {
                        kill_exec(&docker, &id).await;
                        let _ = tx.send(Err(RunnerError::Timeout(d))).await;
                        return;
                    }
                },
                None => pump.await,
            };
            if !finished {
                // Reader gone or stream broken: end the command.
                kill_exec(&docker, &id).await;
                return;
            }
            let _ = tx.send(exec_exit_code(&docker, &id).await).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked() {
        assert!(valid_hostname("my-project-1"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname("Upper"));
        assert!(!valid_hostname(&"a".repeat(64)));
    }

    #[test]
    fn cwd_is_relative_to_home_and_never_climbs() {
        assert_eq!(container_cwd(None).unwrap(), None);
        assert_eq!(
            container_cwd(Some("src")).unwrap().unwrap(),
            "/home/user/src"
        );
        assert_eq!(container_cwd(Some("/tmp")).unwrap().unwrap(), "/tmp");
        assert!(container_cwd(Some("../etc")).is_err());
    }

    #[test]
    fn container_names_carry_the_project_id() {
        let p: ProjectId = "6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse().unwrap();
        assert_eq!(
            container_name(p),
            "project-6ba7b810-9dad-11d1-80b4-00c04fd430c8"
        );
    }
}
