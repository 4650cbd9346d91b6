//! [`HostAgent`]: one host's projects — who may reach them, and starting
//! them on demand — composed from a [`Runner`], a [`Storage`] and the
//! token/ACL [`Gate`].
//!
//! Every data-plane request goes through [`HostAgent::authorize`]: token
//! signature, expiry and audience (this host), project, revocations and ACL
//! (fetched from the master when the cache has no fresh answer), and the
//! **generation fence**: a token minted for an older placement generation
//! of a project than this host has seen is refused, so a project moved away
//! and back cannot be driven by stale tokens (DESIGN.md promise 1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocalc_auth::{AuthError, Gate, Grant};
use cocalc_core::{
    ApiError, ExecEvent, ExecRequest, Generation, HostId, Permission, ProjectId, ProjectSpec,
    ProjectState, ResourceLimits, RunStatus, Runner, RunnerError, Storage, StorageError,
    VolumeInfo,
};
use futures_util::StreamExt;

/// Agent tunables.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host.
    pub host: HostId,
    /// Limits of every project's container.
    pub limits: ResourceLimits,
    /// Most bytes of output an exec returns (the rest is dropped and the
    /// result marked truncated); default 16 MiB.
    pub max_exec_output: usize,
    /// Timeout of an exec that names none; default 10 min.
    pub exec_timeout: Duration,
    /// Grace given to a project's processes on stop; default 10 s.
    pub stop_grace: Duration,
}

impl AgentConfig {
    /// Defaults for `host`.
    pub fn new(host: HostId) -> Self {
        AgentConfig {
            host,
            limits: ResourceLimits::default(),
            max_exec_output: 16 << 20,
            exec_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Why an agent call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The token or the access check failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The token is for an older placement of the project than this host
    /// has seen.
    #[error("token is for generation {got} of project {project}, this host has seen {seen}; open the project again")]
    StaleGeneration {
        /// The project.
        project: ProjectId,
        /// The token's generation.
        got: Generation,
        /// The newest this host has seen.
        seen: Generation,
    },
    /// The runner failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The backup store failed.
    #[error(transparent)]
    Backup(#[from] cocalc_core::BackupError),
    /// This host has no backup store configured.
    #[error("this host keeps no backups (no [backup] in its configuration)")]
    NoBackups,
    /// The call needs the project stopped.
    #[error("project {0} is running; stop it first")]
    Running(ProjectId),
    /// The project is being moved away from this host: it is stopped and
    /// may not start until the move ends.
    #[error("project {0} is being moved to another host; it cannot start here meanwhile")]
    Moving(ProjectId),
    /// The call is one only the master makes (a move's steps).
    #[error("only the master may {0}")]
    MasterOnly(&'static str),
    /// A move's full copy found a volume of the project here already.
    #[error("this host already holds a volume of project {0}")]
    VolumeExists(ProjectId),
    /// A move's pull from the source host failed.
    #[error("pulling from the source host: {0}")]
    Pull(ApiError),
}

impl From<&AgentError> for ApiError {
    fn from(e: &AgentError) -> Self {
        match e {
            AgentError::Auth(a) => ApiError::from(a),
            AgentError::StaleGeneration { .. } => {
                ApiError::new(409, "stale_generation", e.to_string()).with_hint(
                    "the project was moved; open it again to get a token for its current host",
                )
            }
            AgentError::Runner(r) => ApiError::from(r),
            AgentError::Storage(s) => ApiError::from(s),
            AgentError::Backup(b) => ApiError::from(b),
            AgentError::NoBackups => ApiError::new(501, "backups_not_configured", e.to_string())
                .with_hint("configure [backup] on the host"),
            AgentError::Running(_) => ApiError::new(409, "project_running", e.to_string())
                .with_hint("stop the project, or restore a single path"),
            AgentError::Moving(_) => ApiError::new(409, "project_moving", e.to_string())
                .with_hint("wait for the move to end, then open the project again"),
            AgentError::MasterOnly(_) => ApiError::new(403, "master_only", e.to_string()),
            AgentError::VolumeExists(_) => ApiError::new(409, "volume_exists", e.to_string())
                .with_hint(
                    "a copy left from an earlier placement: `cocalc host discard-copy` deletes \
                     it, or move the project to another host",
                ),
            AgentError::Pull(a) => ApiError::new(
                if a.status == 503 { 503 } else { 502 },
                "move_source",
                e.to_string(),
            ),
        }
    }
}

/// One host's projects.
pub struct HostAgent {
    cfg: AgentConfig,
    runner: Arc<dyn Runner>,
    storage: Arc<dyn Storage>,
    gate: Gate,
    fences: Mutex<HashMap<ProjectId, Generation>>,
    local: Option<crate::local_store::LocalStore>,
    active: Mutex<std::collections::HashSet<ProjectId>>,
    /// Idle keep-alive connections to servers inside projects, for
    /// requests with a body (hyper's client) ...
    ports: cocalc_client::relay::Pool<(ProjectId, u16), axum::body::Body>,
    /// ... and for those without (the lean client).
    port_upstream: cocalc_client::upstream::Upstream<(ProjectId, u16)>,
    /// The data plane's answers by status code.
    responses: cocalc_core::StatusCounts,
    /// Where backups go, if anywhere.
    backups: Option<Arc<crate::backups::Backups>>,
    /// Projects being moved away (stopped, not to be started), each with
    /// whether it ran when frozen.
    pub(crate) frozen: Mutex<HashMap<ProjectId, bool>>,
    /// Per project: held by a move's pull while it runs ([`crate::moving`]).
    pub(crate) move_locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for HostAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgent")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Idle connections kept per project port.
const PORT_POOL_PER_PORT: usize = 64;

impl HostAgent {
    /// An agent over the given parts.
    pub fn new(
        cfg: AgentConfig,
        runner: Arc<dyn Runner>,
        storage: Arc<dyn Storage>,
        gate: Gate,
    ) -> Self {
        HostAgent {
            cfg,
            runner,
            storage,
            gate,
            fences: Mutex::new(HashMap::new()),
            local: None,
            active: Mutex::new(std::collections::HashSet::new()),
            ports: cocalc_client::relay::Pool::new(PORT_POOL_PER_PORT),
            port_upstream: cocalc_client::upstream::Upstream::new(PORT_POOL_PER_PORT),
            backups: None,
            responses: Default::default(),
            frozen: Mutex::new(HashMap::new()),
            move_locks: Mutex::new(HashMap::new()),
        }
    }

    /// The data plane's answers by status code (counted by
    /// [`crate::dataplane::router`], shown by [`crate::metrics`]).
    pub fn responses(&self) -> &cocalc_core::StatusCounts {
        &self.responses
    }

    /// Idle keep-alive connections to servers inside projects, by project
    /// and port (never shared between projects, even where two reach the
    /// same address).
    pub(crate) fn port_pool(
        &self,
    ) -> &cocalc_client::relay::Pool<(ProjectId, u16), axum::body::Body> {
        &self.ports
    }

    /// Like [`HostAgent::port_pool`], for requests without a body or
    /// upgrade, through [`cocalc_client::upstream::Upstream`].
    pub(crate) fn port_upstream(&self) -> &cocalc_client::upstream::Upstream<(ProjectId, u16)> {
        &self.port_upstream
    }

    /// Projects that served an authorised request since the last call (for
    /// the idle culler and the master's activity reports).
    pub fn take_active(&self) -> Vec<ProjectId> {
        let mut g = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<ProjectId> = g.drain().collect();
        v.sort();
        v
    }

    /// Persists newly seen generations in `local` (and lets a restarted
    /// host start from what it had seen): call [`HostAgent::restore`] next.
    pub fn with_local_store(mut self, local: crate::local_store::LocalStore) -> Self {
        self.local = Some(local);
        self
    }

    /// Loads what the local store remembers: generation fences, the ACL
    /// cache's entries and revocations. A restarted host then serves at once
    /// (within the offline grace) and never accepts an older generation.
    pub async fn restore(&self) -> Result<usize, crate::local_store::LocalStoreError> {
        let Some(local) = &self.local else {
            return Ok(0);
        };
        let projects = local.projects().await?;
        self.seed_fences(projects.iter().map(|p| (p.project, p.generation)));
        let acl = self.gate.acl();
        for e in local.load_acl().await? {
            acl.restore(e);
        }
        let (users, tokens) = local.load_revocations().await?;
        for (u, t) in users {
            acl.revoke_user(u, t);
        }
        for (j, t) in tokens {
            acl.revoke_token(j, t);
        }
        Ok(projects.len())
    }

    /// Flushes the audit sink of the host's gate (a summary of refusals
    /// it did not log one by one); call periodically.
    pub fn flush_audit(&self) {
        self.gate.flush_audit();
    }

    /// Writes the ACL cache's entries and revocations to the local store.
    pub async fn save_acl(&self) -> Result<(), crate::local_store::LocalStoreError> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let acl = self.gate.acl();
        local.save_acl(&acl.entries()).await?;
        let (users, tokens) = acl.revocations();
        local.save_revocations(&users, &tokens).await
    }

    /// This host.
    pub fn host(&self) -> HostId {
        self.cfg.host
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The runner.
    pub fn runner(&self) -> &Arc<dyn Runner> {
        &self.runner
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Records generations known from elsewhere (the local store after a
    /// restart); never lowers a fence.
    pub fn seed_fences(&self, known: impl IntoIterator<Item = (ProjectId, Generation)>) {
        let mut g = self.fences.lock().unwrap_or_else(|p| p.into_inner());
        for (p, gen) in known {
            let e = g.entry(p).or_insert(gen);
            *e = (*e).max(gen);
        }
    }

    /// The newest generation seen for `project`.
    pub fn fence(&self, project: ProjectId) -> Option<Generation> {
        self.fences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&project)
            .copied()
    }

    /// Every project this host has seen, with the newest generation seen:
    /// what the master link reports when its push channel opens, so the
    /// master can fence those placed elsewhere meanwhile.
    pub fn known_generations(&self) -> Vec<(ProjectId, Generation)> {
        self.fences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, g)| (*p, *g))
            .collect()
    }

    /// Checks a request (see the [module docs](self)); returns the grant.
    /// The project counts as in use (for the idle culler and the master).
    pub async fn authorize(
        &self,
        token: &str,
        project: ProjectId,
        needed: Permission,
        action: &str,
    ) -> Result<Grant, AgentError> {
        self.check(token, project, needed, action, true).await
    }

    /// Like [`authorize`](HostAgent::authorize), for requests that only
    /// look (status polls): they do not keep a project from being culled.
    pub async fn authorize_passive(
        &self,
        token: &str,
        project: ProjectId,
        needed: Permission,
        action: &str,
    ) -> Result<Grant, AgentError> {
        self.check(token, project, needed, action, false).await
    }

    async fn check(
        &self,
        token: &str,
        project: ProjectId,
        needed: Permission,
        action: &str,
        in_use: bool,
    ) -> Result<Grant, AgentError> {
        let grant = self.gate.authorize(token, project, needed, action).await?;
        let got = grant.claims.generation;
        let newer = {
            let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
            let seen = fences.get(&project).copied();
            if let Some(seen) = seen.filter(|s| got < *s) {
                return Err(AgentError::StaleGeneration { project, got, seen });
            }
            fences.insert(project, got);
            seen != Some(got)
        };
        if newer {
            // Written before the request is served.
            self.persist_generation(project, got).await?;
        }
        if in_use {
            self.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(project);
        }
        Ok(grant)
    }

    /// The project's volume, created if this is its first placement here.
    pub async fn volume(&self, project: ProjectId) -> Result<VolumeInfo, AgentError> {
        match self.storage.volume(project).await {
            Ok(v) => Ok(v),
            Err(StorageError::NotFound(_)) => Ok(self.storage.create(project).await?),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts the project if it is not running (creating its volume first
    /// if needed) and returns its status.
    pub async fn ensure_running(&self, grant: &Grant) -> Result<RunStatus, AgentError> {
        self.run_at(grant.claims.project, grant.claims.generation)
            .await
    }

    /// Records that `project` is placed elsewhere at `generation` (the push
    /// channel's `Fence`): from now on, tokens and commands of older
    /// generations are refused here, also after a restart (the local store
    /// keeps it); the project is stopped if it runs here. Never lowers a
    /// fence.
    pub async fn fence_at(
        &self,
        project: ProjectId,
        generation: Generation,
    ) -> Result<(), AgentError> {
        self.seed_fences([(project, generation)]);
        match self.persist_generation(project, generation).await {
            Ok(()) | Err(AgentError::StaleGeneration { .. }) => {}
            Err(e) => return Err(e),
        }
        self.stop(project).await
    }

    /// Starts `project` at `generation` on the master's command (the push
    /// channel's `Start`): refused if this host has seen a newer generation.
    pub async fn start_at(
        &self,
        project: ProjectId,
        generation: Generation,
    ) -> Result<RunStatus, AgentError> {
        {
            let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
            let seen = fences.entry(project).or_insert(generation);
            if generation < *seen {
                return Err(AgentError::StaleGeneration {
                    project,
                    got: generation,
                    seen: *seen,
                });
            }
            *seen = generation;
        }
        self.persist_generation(project, generation).await?;
        self.run_at(project, generation).await
    }

    /// Records in the local store (if there is one) that this host acts on
    /// `generation` of `project`, so a restart does not forget it; a newer
    /// generation recorded there is [`AgentError::StaleGeneration`].
    async fn persist_generation(
        &self,
        project: ProjectId,
        generation: Generation,
    ) -> Result<(), AgentError> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        match local.admit(project, generation, None).await {
            Ok(_) => Ok(()),
            Err(crate::local_store::LocalStoreError::StaleGeneration { seen, .. }) => {
                Err(AgentError::StaleGeneration {
                    project,
                    got: generation,
                    seen,
                })
            }
            Err(e) => Err(AgentError::Runner(RunnerError::Backend(format!(
                "recording generation {generation} of project {project}: {e}"
            )))),
        }
    }

    pub(crate) async fn run_at(
        &self,
        project: ProjectId,
        generation: Generation,
    ) -> Result<RunStatus, AgentError> {
        if self.is_frozen(project) {
            return Err(AgentError::Moving(project));
        }
        let status = self.runner.status(project).await?;
        if status.state == ProjectState::Running {
            return Ok(status);
        }
        let vol = self.volume(project).await?;
        let mut spec = ProjectSpec::new(project, generation, vol.home);
        spec.scratch = vol.scratch;
        spec.limits = self.cfg.limits;
        spec.hostname = format!("project-{}", &project.to_string()[..8]);
        Ok(self.runner.start(&spec).await?)
    }

    /// Backs projects up to `backups` ([`crate::backups`]).
    pub fn with_backups(mut self, backups: crate::backups::Backups) -> Self {
        self.backups = Some(Arc::new(backups));
        self
    }

    /// What backups and restores did since start, if this host keeps
    /// backups.
    pub fn backup_stats(&self) -> Option<crate::backups::BackupStats> {
        self.backups.as_ref().map(|b| b.stats())
    }

    fn backup_store(&self) -> Result<&crate::backups::Backups, AgentError> {
        self.backups.as_deref().ok_or(AgentError::NoBackups)
    }

    /// Backs the project up: snapshots it if it changed since its newest
    /// snapshot, and backs that snapshot up unless this host already did.
    pub async fn backup(&self, project: ProjectId) -> Result<cocalc_core::BackupInfo, AgentError> {
        self.backup_store()?
            .backup(self.storage.as_ref(), self.cfg.host, project)
            .await
            .map(|(b, _)| b)
    }

    /// The project's backups in the store (from every host), oldest first.
    pub async fn backups(
        &self,
        project: ProjectId,
    ) -> Result<Vec<cocalc_core::BackupInfo>, AgentError> {
        Ok(self.backup_store()?.store().backups(project).await?)
    }

    /// Restores `path` (or, with `None`, the whole project, which must be
    /// stopped) from backup `id`; see [`crate::backups`].
    pub async fn restore_backup(
        &self,
        project: ProjectId,
        id: &str,
        path: Option<&str>,
    ) -> Result<cocalc_core::wire::RestoredBackup, AgentError> {
        let b = self.backup_store()?;
        let running =
            path.is_none() && self.runner.status(project).await?.state == ProjectState::Running;
        b.restore(self.storage.as_ref(), project, id, path, running)
            .await
    }

    /// Backs up every project with a volume here, one at a time, and for
    /// each that got a new backup forgets what `keep` does not keep (all
    /// hosts' backups of it counted together). Answers the projects that
    /// failed, with errors.
    pub async fn backup_all(
        &self,
        keep: Option<&cocalc_storage::RetentionPolicy>,
        now: cocalc_core::Timestamp,
    ) -> Result<Vec<(ProjectId, AgentError)>, AgentError> {
        let b = self.backup_store()?;
        let mut failed = Vec::new();
        for project in self.storage.list().await? {
            let r = async {
                let (_, stored) = b
                    .backup(self.storage.as_ref(), self.cfg.host, project)
                    .await?;
                // What retention keeps changes only when a backup is added
                // (it counts periods that hold a backup, not back from now),
                // so an unchanged project costs no listing of the store.
                if let Some(policy) = keep.filter(|_| stored) {
                    cocalc_storage::backup::forget_by_retention(
                        b.store().as_ref(),
                        project,
                        policy,
                        now,
                    )
                    .await?;
                }
                Ok::<_, AgentError>(())
            }
            .await;
            if let Err(e) = r {
                failed.push((project, e));
            }
        }
        Ok(failed)
    }

    /// The project's status (no start).
    pub async fn status(&self, project: ProjectId) -> Result<RunStatus, AgentError> {
        Ok(self.runner.status(project).await?)
    }

    /// Stops the project.
    pub async fn stop(&self, project: ProjectId) -> Result<(), AgentError> {
        self.ports.forget(|k| k.0 == project);
        self.port_upstream.forget(|k| k.0 == project);
        Ok(self.runner.stop(project, self.cfg.stop_grace).await?)
    }

    /// Stops every project the runner lists as running, all at once, each
    /// with the configured grace ([`HostAgent::stop`]): for a host being
    /// retired, or a development federation shutting down. Answers the
    /// projects that failed to stop, each with its error; fails only when
    /// the runner cannot list its projects, having stopped none.
    pub async fn stop_all(&self) -> Result<Vec<(ProjectId, AgentError)>, AgentError> {
        let running: Vec<ProjectId> = self
            .runner
            .list()
            .await?
            .into_iter()
            .filter(|p| p.state == ProjectState::Running)
            .map(|p| p.project)
            .collect();
        let stops = running
            .iter()
            .map(|&p| async move { (p, self.stop(p).await) });
        Ok(futures_util::future::join_all(stops)
            .await
            .into_iter()
            .filter_map(|(p, r)| r.err().map(|e| (p, e)))
            .collect())
    }

    /// Opens an interactive terminal (starting the project if needed).
    pub async fn terminal(
        &self,
        grant: &Grant,
        size: cocalc_core::PtySize,
    ) -> Result<cocalc_core::PtySession, AgentError> {
        self.ensure_running(grant).await?;
        Ok(self.runner.pty(grant.claims.project, size).await?)
    }

    /// Runs a command (starting the project if needed) and collects its
    /// output, up to the configured limit.
    pub async fn exec(
        &self,
        grant: &Grant,
        mut req: ExecRequest,
    ) -> Result<cocalc_core::wire::ExecResult, AgentError> {
        self.ensure_running(grant).await?;
        if req.timeout.is_none() {
            req.timeout = Some(self.cfg.exec_timeout);
        }
        let mut stream = self.runner.exec(grant.claims.project, req).await?;
        let (mut out, mut err, mut truncated) = (Vec::new(), Vec::new(), false);
        let limit = self.cfg.max_exec_output;
        let mut code = None;
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(b) | ExecEvent::Stderr(b)
                    if out.len() + err.len() + b.len() > limit =>
                {
                    truncated = true;
                }
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Stderr(b) => err.extend_from_slice(&b),
                ExecEvent::Exit(c) => code = Some(c),
            }
        }
        let code =
            code.ok_or_else(|| RunnerError::Backend("command ended without an exit code".into()))?;
        Ok(cocalc_core::wire::ExecResult::new(
            code, out, err, truncated,
        ))
    }
}
