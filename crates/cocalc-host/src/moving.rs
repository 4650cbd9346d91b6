//! A host's part in moving a project to another host: the calls the
//! master's move coordinator makes (see `cocalc_core::moves` for the whole
//! protocol), each refused unless the token is the master's own
//! ([`UserId::MASTER`](cocalc_core::UserId::MASTER)).
//!
//! On the source: [`snapshot`](HostAgent::move_snapshot) (optionally
//! freezing the project: stopped, and no start until thawed),
//! [`stream`](HostAgent::move_stream) (the snapshot's send stream, which
//! the target fetches), [`thaw`](HostAgent::move_thaw) (a move rolled
//! back) and [`release`](HostAgent::move_release) (after the flip: the
//! copy here is deleted). On the target: [`pull`](HostAgent::move_pull)
//! (fetch a stream from the source and receive it) and
//! [`discard`](HostAgent::move_discard) (a move rolled back).
//!
//! The freeze is kept in memory: a host that restarts mid-move forgets it.
//! The coordinator does not rely on it alone: before the flip it asks for
//! the newest snapshot again and goes on only if it is the one it sent.

use cocalc_auth::Grant;
use cocalc_core::moves::{MovePullRequest, MoveSnapshot};
use cocalc_core::{
    ByteStream, ProjectId, ProjectState, Runner, SnapshotInfo, Storage, StorageError,
};

use crate::agent::{AgentError, HostAgent};

fn master_only(grant: &Grant, what: &'static str) -> Result<ProjectId, AgentError> {
    if grant.claims.user.is_master() {
        Ok(grant.claims.project)
    } else {
        Err(AgentError::MasterOnly(what))
    }
}

impl HostAgent {
    /// The project's move lock: held by a pull while it runs, taken by a
    /// discard before it looks.
    fn move_lock(&self, project: ProjectId) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.move_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(project)
            .or_default()
            .clone()
    }

    /// True while `project` is frozen for a move away from this host.
    pub fn is_frozen(&self, project: ProjectId) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&project)
    }

    /// The newest snapshot of the project (taken now if anything changed
    /// since the last one; the volume is created if the project never
    /// had one here). With `freeze`, the project is first marked frozen
    /// (so no start gets through) and stopped; the answer says whether it
    /// was running. Freezing a frozen project answers what the first
    /// freeze saw.
    pub async fn move_snapshot(
        &self,
        grant: &Grant,
        freeze: bool,
    ) -> Result<MoveSnapshot, AgentError> {
        let project = master_only(grant, "snapshot a project for a move")?;
        let mut was_running = false;
        if freeze {
            let earlier = {
                let mut f = self.frozen.lock().unwrap_or_else(|p| p.into_inner());
                let earlier = f.get(&project).copied();
                f.entry(project).or_insert(false);
                earlier
            };
            let running = self.runner().status(project).await?.state == ProjectState::Running;
            if running {
                self.stop(project).await?;
            }
            was_running = earlier.unwrap_or(running);
            self.frozen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(project, was_running);
        }
        self.volume(project).await?;
        let storage = self.storage();
        let name = match storage.snapshot(project).await? {
            Some(s) => s.name,
            None => storage
                .snapshots(project)
                .await?
                .pop()
                .map(|s| s.name)
                .ok_or_else(|| {
                    StorageError::Io(format!(
                        "project {project}: no snapshot taken and none found"
                    ))
                })?,
        };
        Ok(MoveSnapshot::new(name, was_running))
    }

    /// The send stream of `snapshot` (changes since `parent` if given).
    pub async fn move_stream(
        &self,
        grant: &Grant,
        snapshot: &str,
        parent: Option<&str>,
    ) -> Result<ByteStream, AgentError> {
        let project = master_only(grant, "read a project's send stream")?;
        Ok(self.storage().send(project, snapshot, parent).await?)
    }

    /// Fetches `req.snapshot` from the source host and receives it here.
    /// A full copy (`parent: None`) is refused if a volume of the project
    /// is here already, so a move never overwrites a copy it did not make.
    /// With `req.last`, the project's volume is then made exactly that
    /// snapshot. A cut stream leaves nothing behind (the storage contract).
    ///
    /// The work runs in a task of its own under the project's move lock:
    /// a caller that goes away (the master stopped, or gave up on this
    /// host) does not cut a receive half way, and a
    /// [`discard`](HostAgent::move_discard) waits for it to end, so it sees
    /// what the pull left.
    pub async fn move_pull(
        &self,
        grant: &Grant,
        req: &MovePullRequest,
    ) -> Result<SnapshotInfo, AgentError> {
        let project = master_only(grant, "pull a project from another host")?;
        let guard = self.move_lock(project).lock_owned().await;
        let (runner, storage, req) = (self.runner().clone(), self.storage().clone(), req.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            pull(runner.as_ref(), storage.as_ref(), project, &req).await
        });
        task.await.map_err(|e| {
            AgentError::Storage(StorageError::Io(format!("the pull's task failed: {e}")))
        })?
    }

    /// Ends a freeze; with `restart`, starts the project again (at the
    /// newest generation this host has seen for it) if the freeze stopped
    /// it. Thawing a project that is not frozen changes nothing.
    pub async fn move_thaw(&self, grant: &Grant, restart: bool) -> Result<(), AgentError> {
        let project = master_only(grant, "thaw a project")?;
        let was_running = self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&project);
        if restart && was_running == Some(true) {
            let generation = self.fence(project).unwrap_or(grant.claims.generation);
            self.run_at(project, generation).await?;
        }
        Ok(())
    }

    /// Deletes the project's copy here (refused while the project runs
    /// here). With `snapshot`, only a copy that holds that snapshot is
    /// deleted: a rolled-back move names the one it copied first, so a
    /// copy it did not make (one that refused its full copy, though the
    /// refusal never reached the master) is left alone, and the answer is
    /// `false`. Answers whether a copy was deleted.
    pub async fn move_discard(
        &self,
        grant: &Grant,
        snapshot: Option<&str>,
    ) -> Result<bool, AgentError> {
        let project = master_only(grant, "discard a project's copy")?;
        let _pulls_done = self.move_lock(project).lock_owned().await;
        if self.runner().status(project).await?.state == ProjectState::Running {
            return Err(AgentError::Running(project));
        }
        let storage = self.storage();
        if let Some(name) = snapshot {
            let ours = match storage.snapshots(project).await {
                Ok(list) => list.iter().any(|s| s.name == name),
                Err(StorageError::NotFound(_)) => false,
                Err(e) => return Err(e.into()),
            };
            if !ours {
                return Ok(false);
            }
        }
        storage.delete(project).await?;
        Ok(true)
    }

    /// After the flip: stops the project here (if it runs at all), deletes
    /// its volume with every snapshot, and ends the freeze. The master
    /// calls it with a token of the new generation, so from then on this
    /// host refuses every token of the old placement.
    pub async fn move_release(&self, grant: &Grant) -> Result<(), AgentError> {
        let project = master_only(grant, "release a moved project")?;
        {
            let mut f = self.frozen.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(project).or_insert(false);
        }
        self.stop(project).await?;
        self.storage().delete(project).await?;
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&project);
        Ok(())
    }
}

/// [`HostAgent::move_pull`]'s work.
async fn pull(
    runner: &dyn Runner,
    storage: &dyn Storage,
    project: ProjectId,
    req: &MovePullRequest,
) -> Result<SnapshotInfo, AgentError> {
    if runner.status(project).await?.state == ProjectState::Running {
        return Err(AgentError::Running(project));
    }
    if req.parent.is_none() {
        match storage.volume(project).await {
            Ok(_) => return Err(AgentError::VolumeExists(project)),
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let source = cocalc_client::HostClient::new(req.source.clone(), project, req.token.clone());
    let stream = source
        .move_stream(&req.snapshot, req.parent.as_deref())
        .await
        .map_err(AgentError::Pull)?;
    let got = storage.receive(project, stream).await?;
    if got.name != req.snapshot {
        let _ = storage.delete_snapshot(project, &got.name).await;
        return Err(AgentError::Pull(cocalc_core::ApiError::new(
            502,
            "wrong_snapshot",
            format!(
                "asked for snapshot {}, the stream held {}; it was deleted",
                req.snapshot, got.name
            ),
        )));
    }
    if req.last {
        storage.restore(project, &req.snapshot, None).await?;
    }
    Ok(got)
}
