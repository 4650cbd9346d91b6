//! Moving projects between hosts from the master: the admin API
//! ([`Master::move_project`], [`Master::project_move`]), the restart
//! path ([`Master::resume_moves`]) and [`HostSteps`], the
//! [`MoveSteps`] that reach hosts' data planes with tokens of
//! [`UserId::MASTER`]. The coordinator itself (phases, rollback, the
//! map's flip) is `cocalc_placement::MoveCoordinator`. The project's bytes
//! go from host to host: the target pulls the stream from the source (or
//! through the proxy holding a hidden source's tunnel); the master only
//! sends small requests.

use std::sync::Arc;

use async_trait::async_trait;
use cocalc_auth::MintRequest;
use cocalc_core::moves::{
    Evacuation, MovePhase, MovePullRequest, MoveRecord, MoveRequest, MoveSnapshot,
};
use cocalc_core::{
    ApiError, Generation, HostId, HostState, Permission, PlacementDecision, ProjectId, UserId,
};
use cocalc_placement::{MoveError, MoveSteps};

use crate::error::MasterError;
use crate::master::{Caller, Master};

impl From<MoveError> for MasterError {
    fn from(e: MoveError) -> Self {
        match e {
            MoveError::InProgress { .. } => MasterError::Conflict(e.to_string()),
            MoveError::Store(s) => s.into(),
            other => MasterError::Internal(other.to_string()),
        }
    }
}

impl Master {
    /// Starts moving `project` (admin) to `req.to`, or to the host
    /// placement picks among the others, and answers the stored record;
    /// the move goes on in the background ([`Master::project_move`] shows
    /// it). Refused: a project not placed (404); a move of it unfinished,
    /// its host down (use `replace` for a lost host), a target that is its
    /// host, unknown, not up or draining (409).
    pub async fn move_project(
        self: &Arc<Self>,
        caller: &Caller,
        project: ProjectId,
        req: &MoveRequest,
    ) -> Result<MoveRecord, MasterError> {
        caller.require_admin()?;
        let mv = self.plan_move(project, req.to).await?;
        let mv = self.moves().begin(mv).await?;
        let master = self.clone();
        let started = mv.clone();
        tokio::spawn(async move {
            master.run_move(started).await;
        });
        Ok(mv)
    }

    /// Runs a begun move to its end, logging how it ended.
    async fn run_move(self: &Arc<Self>, mv: MoveRecord) {
        let project = mv.project;
        let steps = HostSteps::new(self.clone());
        match self.moves().run(mv, &steps).await {
            Ok(done) => tracing::info!(
                project = %done.project, phase = %done.phase,
                error = done.error.as_deref().unwrap_or(""), "move ended"
            ),
            Err(e) => tracing::error!(%project, error = %e, "move could not be stored"),
        }
    }

    /// Empties a host (admin): drains it (no new projects land there),
    /// then moves every project on it, one at a time, each to the host
    /// placement picks, in the background. Refused for a host that is not
    /// registered (404) or is down (its data cannot be copied: re-place its
    /// projects instead), and when no other host can take projects (409),
    /// before anything changes. A project whose move cannot begin (one is
    /// running already, no host can take it) is skipped, with a warning in
    /// the log.
    pub async fn evacuate_host(
        self: &Arc<Self>,
        caller: &Caller,
        host: HostId,
    ) -> Result<Evacuation, MasterError> {
        caller.require_admin()?;
        let now = self.now();
        match self.registry().inspect(host, |h| h.state_at(now)) {
            None => return Err(MasterError::NotFound(format!("no host {host}"))),
            Some(HostState::Down) => {
                return Err(MasterError::Conflict(format!(
                    "host {host} is down, so its data cannot be copied; re-place its projects \
                     instead (replace)"
                )))
            }
            Some(_) => {}
        }
        let elsewhere = self
            .registry()
            .hosts()
            .iter()
            .any(|h| h.id != host && cocalc_core::placement::ineligibility(h).is_none());
        if !elsewhere && !self.store().projects_on(host).await?.is_empty() {
            return Err(MasterError::Conflict(format!(
                "no other host can take projects now, so host {host} cannot be emptied; \
                 add or undrain a host first"
            )));
        }
        self.set_draining(caller, host, true).await?;
        let projects: Vec<ProjectId> = self
            .store()
            .projects_on(host)
            .await?
            .into_iter()
            .map(|p| p.project)
            .collect();
        let master = self.clone();
        let todo = projects.clone();
        tokio::spawn(async move {
            for project in todo {
                let still_there = matches!(
                    master.store().placement(project).await,
                    Ok(Some(p)) if p.host == host
                );
                if !still_there {
                    continue;
                }
                let begun = match master.plan_move(project, None).await {
                    Ok(mv) => master.moves().begin(mv).await.map_err(MasterError::from),
                    Err(e) => Err(e),
                };
                match begun {
                    Ok(mv) => master.run_move(mv).await,
                    Err(e) => tracing::warn!(%project, %host, error = %e,
                        "evacuation: this project's move could not begin; skipped"),
                }
            }
            tracing::info!(%host, "evacuation ended");
        });
        Ok(Evacuation::new(host, projects, now))
    }

    /// Deletes the copy of `project` that `host` holds although the map
    /// names another host (admin): what a move into that host refuses
    /// with `volume_exists` (left by an earlier placement, or by a move
    /// cut short). Refused for the copy the map names (409), while a move
    /// of the project is unfinished (409), and by the host while the
    /// project runs there (409 `project_running`).
    pub async fn discard_copy(
        self: &Arc<Self>,
        caller: &Caller,
        host: HostId,
        project: ProjectId,
    ) -> Result<(), MasterError> {
        caller.require_admin()?;
        let current = self
            .store()
            .placement(project)
            .await?
            .ok_or_else(|| MasterError::NotFound(format!("project {project} is not placed")))?;
        if current.host == host {
            return Err(MasterError::Conflict(format!(
                "host {host} holds the live copy of project {project}; move or re-place it first"
            )));
        }
        if let Some(mv) = self.store().move_of(project).await? {
            if !mv.phase.is_finished() {
                return Err(MasterError::Conflict(format!(
                    "project {project} is being moved (phase {}); wait for the move to end",
                    mv.phase
                )));
            }
        }
        let steps = HostSteps::new(self.clone());
        let client = steps
            .client(host, project, current.generation)
            .map_err(MasterError::Upstream)?;
        steps
            .on(host, client.move_discard(None))
            .await
            .map(|_| ())
            .map_err(MasterError::Upstream)
    }

    /// The checks before a move, and its record (not stored yet).
    async fn plan_move(
        &self,
        project: ProjectId,
        to: Option<HostId>,
    ) -> Result<MoveRecord, MasterError> {
        let current = self
            .store()
            .placement(project)
            .await?
            .ok_or_else(|| MasterError::NotFound(format!("project {project} is not placed")))?;
        let now = self.now();
        // A draining host is one to move projects off: only a host that
        // stopped renewing its lease cannot be copied from.
        let from_state = self.registry().inspect(current.host, |h| h.state_at(now));
        if matches!(from_state, None | Some(HostState::Down)) {
            return Err(MasterError::Conflict(format!(
                "host {} of project {project} is down, so its data cannot be copied; \
                 an operator can re-place the project instead (replace)",
                current.host
            )));
        }
        let decision = match to {
            Some(to) if to == current.host => {
                return Err(MasterError::Conflict(format!(
                    "project {project} is on host {to} already"
                )))
            }
            Some(to) => {
                let info = self
                    .registry()
                    .hosts()
                    .into_iter()
                    .find(|h| h.id == to)
                    .ok_or_else(|| MasterError::Conflict(format!("host {to} is not registered")))?;
                if let Some(why) = cocalc_core::placement::ineligibility(&info) {
                    return Err(MasterError::Conflict(format!(
                        "host {to} cannot take projects: {why}"
                    )));
                }
                PlacementDecision::new(
                    to,
                    "operator",
                    format!("moved from host {} by an operator's choice", current.host),
                    vec![],
                    vec![],
                )
            }
            None => {
                let hosts: Vec<_> = self
                    .registry()
                    .hosts()
                    .into_iter()
                    .filter(|h| h.id != current.host)
                    .collect();
                // Evacuations pick targets one after another, faster
                // than keepalives report load: counted as placed.
                self.choose_host(project, &hosts)?
            }
        };
        Ok(MoveRecord::new(
            project,
            current.host,
            current.generation,
            decision,
            now,
        ))
    }

    /// The latest move of `project` (admin), finished or not.
    pub async fn project_move(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<MoveRecord, MasterError> {
        caller.require_admin()?;
        self.store()
            .move_of(project)
            .await?
            .ok_or_else(|| MasterError::NotFound(format!("project {project} was never moved")))
    }

    /// Goes on with the moves a previous run of the master left
    /// unfinished, and with rollbacks and clean-ups that failed (a host
    /// was away): call at start and now and then. Moves running in this
    /// process are left alone.
    pub async fn resume_moves(self: &Arc<Self>) -> Result<Vec<MoveRecord>, MasterError> {
        let master = self.clone();
        Ok(self
            .moves()
            .resume(move |_| Arc::new(HostSteps::new(master.clone())) as Arc<dyn MoveSteps>)
            .await?)
    }

    /// A 409 `project_moving` while `project` is stopped for the last
    /// step of a move (or its rollback), so nobody opens it meanwhile.
    pub(crate) fn refuse_if_moving(&self, project: ProjectId) -> Result<(), MasterError> {
        match self.moves().running_phase(project) {
            Some(MovePhase::Syncing | MovePhase::RollingBack) => Err(MasterError::Upstream(
                ApiError::new(
                    409,
                    "project_moving",
                    format!("project {project} is being moved to another host"),
                )
                .with_hint("try again in a few seconds"),
            )),
            _ => Ok(()),
        }
    }
}

/// The host calls of a move, made by the master over each host's data
/// plane with a token of [`UserId::MASTER`] for that host, project and
/// generation (a fresh one per call). A call to a host that stops renewing
/// its lease is dropped ([`Master::while_host_up`]).
pub struct HostSteps {
    master: Arc<Master>,
}

impl std::fmt::Debug for HostSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSteps").finish_non_exhaustive()
    }
}

impl HostSteps {
    /// The steps of `master`.
    pub fn new(master: Arc<Master>) -> Self {
        HostSteps { master }
    }

    /// The data-plane base URL of `host` and a master token for it.
    fn reach(
        &self,
        host: HostId,
        project: ProjectId,
        generation: Generation,
    ) -> Result<(String, String), ApiError> {
        let endpoint = self
            .master
            .registry()
            .inspect(host, |h| h.info.endpoint.clone())
            .ok_or_else(|| {
                ApiError::new(
                    503,
                    "host_unknown",
                    format!("host {host} is not registered"),
                )
            })?;
        let token = self
            .master
            .mint_for(&MintRequest {
                user: UserId::MASTER,
                project,
                host,
                generation,
                permission: Permission::Admin,
                ttl: self.master.config().token_ttl,
            })
            .map_err(|e| ApiError::from(&e))?;
        Ok((endpoint.base_url().to_string(), token))
    }

    fn client(
        &self,
        host: HostId,
        project: ProjectId,
        generation: Generation,
    ) -> Result<cocalc_client::HostClient, ApiError> {
        let (base, token) = self.reach(host, project, generation)?;
        Ok(cocalc_client::HostClient::new(base, project, token))
    }

    /// Awaits `call` to `host` unless the host goes down first.
    async fn on<T>(
        &self,
        host: HostId,
        call: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.master
            .while_host_up(host, async { call.await.map_err(MasterError::Upstream) })
            .await
            .map_err(|e| ApiError::from(&e))
    }
}

#[async_trait]
impl MoveSteps for HostSteps {
    async fn snapshot(&self, mv: &MoveRecord, freeze: bool) -> Result<MoveSnapshot, ApiError> {
        let c = self.client(mv.from, mv.project, mv.generation)?;
        self.on(mv.from, c.move_snapshot(freeze)).await
    }

    async fn pull(
        &self,
        mv: &MoveRecord,
        snapshot: &str,
        parent: Option<&str>,
        last: bool,
    ) -> Result<(), ApiError> {
        let (source, token) = self.reach(mv.from, mv.project, mv.generation)?;
        let req = MovePullRequest::new(
            source,
            token,
            snapshot.to_string(),
            parent.map(str::to_string),
            last,
        );
        let c = self.client(mv.to, mv.project, mv.generation)?;
        // Given up if either host goes down: the target pulls from the
        // source (its own pull then ends by itself: the stream errs when
        // the source is gone or stalls).
        let on_target = self.on(mv.to, c.move_pull(&req));
        self.on(mv.from, on_target).await.map(|_| ())
    }

    async fn target_snapshots(&self, mv: &MoveRecord) -> Result<Vec<String>, ApiError> {
        let c = self.client(mv.to, mv.project, mv.generation)?;
        let list = self.on(mv.to, c.snapshots()).await?;
        Ok(list.into_iter().map(|s| s.name).collect())
    }

    async fn thaw(&self, mv: &MoveRecord, restart: bool) -> Result<(), ApiError> {
        let c = self.client(mv.from, mv.project, mv.generation)?;
        self.on(mv.from, c.move_thaw(restart)).await
    }

    async fn discard(&self, mv: &MoveRecord) -> Result<(), ApiError> {
        let c = self.client(mv.to, mv.project, mv.generation)?;
        // Only a copy holding the move's first snapshot is this move's.
        self.on(mv.to, c.move_discard(mv.base.as_deref()))
            .await
            .map(|_| ())
    }

    async fn release(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError> {
        // At once over the push channel if the source listens, so that it
        // refuses the old placement even while the release below fails.
        self.master.push().send(
            mv.from,
            cocalc_core::wire::PushMessage::Fence {
                project: mv.project,
                generation,
            },
        );
        let c = self.client(mv.from, mv.project, generation)?;
        self.on(mv.from, c.move_release()).await
    }

    async fn start(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError> {
        let c = self.client(mv.to, mv.project, generation)?;
        self.on(mv.to, c.start()).await.map(|_| ())
    }
}
