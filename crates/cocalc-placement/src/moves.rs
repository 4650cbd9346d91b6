//! The move coordinator: moves a project from one host to another as a
//! persisted state machine ([`MoveRecord`], phases in
//! [`cocalc_core::moves`]), with the hosts' calls behind the [`MoveSteps`]
//! trait, so the same logic runs against real hosts (the master's HTTP
//! implementation) and against fakes in tests and the simulator.
//!
//! Each phase is stored before its work starts, and the map flips with a
//! compare-and-set on the generation the move began with, so:
//!
//! * a failure before the flip rolls back: the target's copy is
//!   discarded, the source thawed and restarted if the freeze stopped it
//!   (unless the map names another host by then); the map never changed
//!   (DESIGN.md promise 2: nothing is lost);
//! * a failure after the flip only delays the deletion of the source's
//!   copy, which [`MoveCoordinator::resume`] retries;
//! * a coordinator that restarts rolls back every move it finds before the
//!   flip (a step may have been cut half way) and finishes every flipped
//!   one ([`MoveCoordinator::resume`]);
//! * anyone else changing the map meanwhile (an operator's re-placement)
//!   makes the flip fail, and the move rolls back.
//!
//! One coordinator runs a project's move at a time (the in-process set
//! of running moves); two coordinators on one database are not
//! coordinated beyond the flip's compare-and-set.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cocalc_core::moves::{MovePhase, MoveRecord, MoveSnapshot};
use cocalc_core::{ApiError, Generation, ProjectId, SharedClock};

use crate::store::{MapStore, StoreError};

/// The host calls a move is made of. Every call is on one host (named in
/// the doc) for the record's project; errors are the host's answer.
#[async_trait]
pub trait MoveSteps: Send + Sync {
    /// Source: the newest snapshot (taken now if anything changed); with
    /// `freeze`, the project is stopped first and kept from starting.
    async fn snapshot(&self, mv: &MoveRecord, freeze: bool) -> Result<MoveSnapshot, ApiError>;

    /// Target: fetch `snapshot` from the source (changes since `parent`
    /// if given) and receive it; `last` makes the target's volume exactly
    /// that snapshot.
    async fn pull(
        &self,
        mv: &MoveRecord,
        snapshot: &str,
        parent: Option<&str>,
        last: bool,
    ) -> Result<(), ApiError>;

    /// Target: the names of the project's snapshots there.
    async fn target_snapshots(&self, mv: &MoveRecord) -> Result<Vec<String>, ApiError>;

    /// Source: end the freeze; with `restart`, start the project again if
    /// the freeze stopped it (the source remembers whether it did).
    async fn thaw(&self, mv: &MoveRecord, restart: bool) -> Result<(), ApiError>;

    /// Target: delete what the move copied there.
    async fn discard(&self, mv: &MoveRecord) -> Result<(), ApiError>;

    /// Source, with the authority of `generation` (the one after the
    /// flip): delete the project's copy there.
    async fn release(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError>;

    /// Target: start the project at `generation` (after the flip, for a
    /// project that ran before the move).
    async fn start(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError>;
}

/// Why a move could not begin.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The project has a move that has not finished.
    #[error("project {project} is already being moved (phase {phase})")]
    InProgress {
        /// The project.
        project: ProjectId,
        /// Where that move stands.
        phase: MovePhase,
    },
    /// The map store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a coordinator did since it was made (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveStats {
    /// Moves begun.
    pub begun: u64,
    /// Moves that ended moved.
    pub done: u64,
    /// Moves that ended rolled back.
    pub rolled_back: u64,
    /// Moves running in this process now.
    pub running: u64,
}

/// Runs moves: see the [module docs](self).
pub struct MoveCoordinator {
    store: Arc<dyn MapStore>,
    clock: SharedClock,
    /// Moves running in this process, by project, with their phase.
    running: Mutex<HashMap<ProjectId, MovePhase>>,
    /// Moves [`begin`](MoveCoordinator::begin) stored and kept in
    /// `running` for the [`run`](MoveCoordinator::run) that follows, so
    /// that [`resume`](MoveCoordinator::resume) never takes them for
    /// interrupted ones in between.
    reserved: Mutex<std::collections::HashSet<ProjectId>>,
    begun: AtomicU64,
    done: AtomicU64,
    rolled_back: AtomicU64,
}

impl std::fmt::Debug for MoveCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoveCoordinator").finish_non_exhaustive()
    }
}

/// Removes a project from the running set when its run ends, however it
/// ends (a cancelled run included).
struct Running<'a> {
    set: &'a Mutex<HashMap<ProjectId, MovePhase>>,
    project: ProjectId,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.project);
    }
}

/// The step named in the error of a failed release (cleared once a retry
/// succeeds).
const RELEASE: &str = "deleting the source's copy";

/// The step named in the error of a failed start on the target (kept
/// once the move is done: the project is moved, but not running).
const START: &str = "starting on the target";

/// Between a failed start's error and a failed release's.
const AND: &str = " || ";

/// Between a move's error and that of its failed rollback.
const ROLLBACK_PENDING: &str = "; rollback not finished: ";

fn step_err(step: &str, e: &ApiError) -> String {
    format!("{step}: {} ({})", e.message, e.code)
}

impl MoveCoordinator {
    /// A coordinator storing its moves in `store`, timing them by `clock`.
    pub fn new(store: Arc<dyn MapStore>, clock: SharedClock) -> Self {
        MoveCoordinator {
            store,
            clock,
            running: Mutex::new(HashMap::new()),
            reserved: Mutex::new(std::collections::HashSet::new()),
            begun: AtomicU64::new(0),
            done: AtomicU64::new(0),
            rolled_back: AtomicU64::new(0),
        }
    }

    /// Counts of moves begun and ended since this coordinator was made.
    pub fn stats(&self) -> MoveStats {
        MoveStats {
            begun: self.begun.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            rolled_back: self.rolled_back.load(Ordering::Relaxed),
            running: self.lock().len() as u64,
        }
    }

    /// The phase of `project`'s move if one is running in this process
    /// (no database read: the open-project path asks on every call).
    pub fn running_phase(&self, project: ProjectId) -> Option<MovePhase> {
        self.lock().get(&project).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProjectId, MovePhase>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `mv` (phase [`MovePhase::Copying`]) as a new move, refused
    /// while the project has an unfinished one. Then call
    /// [`run`](MoveCoordinator::run): until then the move counts as
    /// running in this process (resume leaves it alone, a second `begin`
    /// is refused).
    pub async fn begin(&self, mv: MoveRecord) -> Result<MoveRecord, MoveError> {
        let project = mv.project;
        {
            let mut g = self.lock();
            if let Some(&phase) = g.get(&project) {
                return Err(MoveError::InProgress { project, phase });
            }
            g.insert(project, MovePhase::Copying);
        }
        let guard = Running {
            set: &self.running,
            project,
        };
        if let Some(old) = self.store.move_of(project).await? {
            if !old.phase.is_finished() {
                return Err(MoveError::InProgress {
                    project,
                    phase: old.phase,
                });
            }
        }
        self.store.put_move(&mv).await?;
        // Stays in `running`, reserved for the run that follows.
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(project);
        std::mem::forget(guard);
        self.begun.fetch_add(1, Ordering::Relaxed);
        Ok(mv)
    }

    async fn save(&self, mv: &mut MoveRecord) -> Result<(), StoreError> {
        mv.updated = self.clock.now();
        self.store.put_move(mv).await?;
        if let Some(p) = self.lock().get_mut(&mv.project) {
            *p = mv.phase;
        }
        Ok(())
    }

    /// Runs `mv` from its stored phase until it is finished, or until a
    /// step of a rollback or of the source's release fails (the record
    /// keeps its phase and the error; [`resume`](MoveCoordinator::resume)
    /// goes on later). Answers the record as it was left. A move already
    /// running in this process is not run twice: its stored record is
    /// answered.
    pub async fn run(
        &self,
        mut mv: MoveRecord,
        steps: &dyn MoveSteps,
    ) -> Result<MoveRecord, StoreError> {
        let project = mv.project;
        let already = {
            let mut g = self.lock();
            let reserved = self
                .reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&project);
            let already = g.contains_key(&project) && !reserved;
            if !already {
                g.insert(project, mv.phase);
            }
            already
        };
        if already {
            return Ok(self.store.move_of(project).await?.unwrap_or(mv));
        }
        let _running = Running {
            set: &self.running,
            project,
        };
        loop {
            match mv.phase {
                MovePhase::Copying => match self.copy(&mut mv, steps).await? {
                    Ok(()) => {
                        mv.phase = MovePhase::Syncing;
                        mv.stopped_at = Some(self.clock.now());
                        self.save(&mut mv).await?;
                    }
                    Err(e) => self.fail(&mut mv, e).await?,
                },
                MovePhase::Syncing => match self.sync(&mut mv, steps).await? {
                    Ok(()) => {
                        if let Err(e) = self.flip(&mut mv).await? {
                            self.fail(&mut mv, e).await?;
                        }
                    }
                    Err(e) => self.fail(&mut mv, e).await?,
                },
                MovePhase::RollingBack => {
                    // Restart the source only while the map still names
                    // it: a map changed under the move names another host.
                    // And if it names the target (an operator re-placed
                    // the project there meanwhile), the copy there is the
                    // project's volume now: not this move's to delete.
                    let now_at = self.store.placement(project).await?;
                    let restart = now_at
                        .as_ref()
                        .is_some_and(|p| p.host == mv.from && p.generation == mv.generation);
                    let target_owns = now_at.as_ref().is_some_and(|p| p.host == mv.to);
                    let undo = async {
                        if mv.copy_started && !target_owns {
                            steps
                                .discard(&mv)
                                .await
                                .map_err(|e| step_err("discarding the target's copy", &e))?;
                        }
                        steps
                            .thaw(&mv, restart)
                            .await
                            .map_err(|e| step_err("thawing the source", &e))
                    };
                    match undo.await {
                        Ok(()) => {
                            mv.phase = MovePhase::RolledBack;
                            self.save(&mut mv).await?;
                            self.rolled_back.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(%project, error = %e, "move rollback step failed; will retry");
                            let first = mv.error.take().unwrap_or_default();
                            let first = first.split(ROLLBACK_PENDING).next().unwrap_or_default();
                            mv.error = Some(format!("{first}{ROLLBACK_PENDING}{e}"));
                            self.save(&mut mv).await?;
                            return Ok(mv);
                        }
                    }
                }
                MovePhase::Flipped => {
                    let generation = mv.generation.next();
                    if mv.was_running && !mv.restarted {
                        // Tried once: a start that fails is reported, not
                        // retried (the project is the target's now, and
                        // opening it starts it).
                        if let Err(e) = steps.start(&mv, generation).await {
                            mv.error = Some(step_err(START, &e));
                        }
                        mv.restarted = true;
                        self.save(&mut mv).await?;
                    }
                    match steps.release(&mv, generation).await {
                        Ok(()) => {
                            // What stays reported is a failed start.
                            mv.error = mv
                                .error
                                .take()
                                .filter(|e| e.starts_with(START))
                                .map(|e| e.split(AND).next().unwrap_or_default().to_string());
                            mv.phase = MovePhase::Done;
                            self.save(&mut mv).await?;
                            self.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let e = step_err(RELEASE, &e);
                            tracing::warn!(%project, error = %e, "move cleanup failed; will retry");
                            // A failed start stays reported; an earlier
                            // failed release is replaced by this one.
                            mv.error = Some(match mv.error.take() {
                                Some(start) if start.starts_with(START) => {
                                    let start = start.split(AND).next().unwrap_or_default();
                                    format!("{start}{AND}{e}")
                                }
                                _ => e,
                            });
                            self.save(&mut mv).await?;
                            return Ok(mv);
                        }
                    }
                }
                MovePhase::Done | MovePhase::RolledBack => return Ok(mv),
            }
        }
    }

    /// Stores the failure and turns to rolling back.
    async fn fail(&self, mv: &mut MoveRecord, error: String) -> Result<(), StoreError> {
        tracing::warn!(project = %mv.project, phase = %mv.phase, %error, "move failed; rolling back");
        mv.error = Some(error);
        mv.phase = MovePhase::RollingBack;
        self.save(mv).await
    }

    /// The full copy: the outer error is the store's, the inner a step's.
    async fn copy(
        &self,
        mv: &mut MoveRecord,
        steps: &dyn MoveSteps,
    ) -> Result<Result<(), String>, StoreError> {
        let base = match steps.snapshot(mv, false).await {
            Ok(s) => s.snapshot,
            Err(e) => return Ok(Err(step_err("snapshot on the source", &e))),
        };
        mv.base = Some(base.clone());
        mv.copy_started = true;
        self.save(mv).await?;
        match steps.pull(mv, &base, None, false).await {
            Ok(()) => Ok(Ok(())),
            Err(e) => {
                if e.code == "volume_exists" {
                    // Refused before anything was written: what the
                    // target holds is not this move's to delete.
                    mv.copy_started = false;
                }
                Ok(Err(step_err("full copy to the target", &e)))
            }
        }
    }

    /// The stop, the incremental copy and the checks before the flip.
    async fn sync(
        &self,
        mv: &mut MoveRecord,
        steps: &dyn MoveSteps,
    ) -> Result<Result<(), String>, StoreError> {
        let Some(base) = mv.base.clone() else {
            return Ok(Err("no full copy was recorded".into()));
        };
        let last = match steps.snapshot(mv, true).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(step_err("stopping and snapshotting the source", &e))),
        };
        mv.was_running = last.was_running;
        mv.last = Some(last.snapshot.clone());
        self.save(mv).await?;
        if last.snapshot != base {
            if let Err(e) = steps.pull(mv, &last.snapshot, Some(&base), true).await {
                return Ok(Err(step_err("incremental copy to the target", &e)));
            }
        }
        match steps.target_snapshots(mv).await {
            Ok(names) if names.contains(&last.snapshot) => {}
            Ok(names) => {
                return Ok(Err(format!(
                    "validation: the target holds {names:?}, not snapshot {}",
                    last.snapshot
                )))
            }
            Err(e) => return Ok(Err(step_err("validation on the target", &e))),
        }
        // The freeze lives in the source's memory: ask again, and go on
        // only if nothing changed since the snapshot that was sent.
        match steps.snapshot(mv, true).await {
            Ok(s) if s.snapshot == last.snapshot => Ok(Ok(())),
            Ok(s) => Ok(Err(format!(
                "validation: the source changed after its last snapshot ({} is newer than {})",
                s.snapshot, last.snapshot
            ))),
            Err(e) => Ok(Err(step_err("validation on the source", &e))),
        }
    }

    /// Points the map at the target (compare-and-set on the move's
    /// generation). The inner error means the map was not changed.
    async fn flip(&self, mv: &mut MoveRecord) -> Result<Result<Generation, String>, StoreError> {
        let r = self
            .store
            .assign(
                mv.project,
                mv.to,
                Some(mv.generation),
                mv.decision.clone(),
                self.clock.now(),
            )
            .await;
        let generation = match r {
            Ok(p) => p.generation,
            Err(StoreError::Conflict { current, .. }) => {
                return Ok(Err(format!(
                    "the map changed during the move (generation {current}, the move began at \
                     {}); not flipped",
                    mv.generation
                )))
            }
            Err(e) => {
                // Committed or not? The map says.
                match self.store.placement(mv.project).await? {
                    Some(p) if p.host == mv.to && p.generation == mv.generation.next() => {
                        p.generation
                    }
                    _ => return Ok(Err(format!("flipping the map: {e}"))),
                }
            }
        };
        mv.phase = MovePhase::Flipped;
        mv.flipped_at = Some(self.clock.now());
        mv.error = None;
        self.save(mv).await?;
        Ok(Ok(generation))
    }

    /// Goes on with every unfinished move not running in this process:
    /// those before the flip are rolled back (a step may have been cut
    /// half way when the coordinator stopped), flipped ones finished,
    /// rollbacks retried. `steps` gives the host calls of each record.
    /// Answers the records as they were left.
    pub async fn resume<F>(&self, steps: F) -> Result<Vec<MoveRecord>, StoreError>
    where
        F: Fn(&MoveRecord) -> Arc<dyn MoveSteps>,
    {
        let mut out = Vec::new();
        for mut mv in self.store.unfinished_moves().await? {
            if self.lock().contains_key(&mv.project) {
                continue;
            }
            if mv.phase == MovePhase::Syncing {
                // The flip and the record of it are two writes: a map
                // that already names the target is a flipped move.
                let flipped = self
                    .store
                    .placement(mv.project)
                    .await?
                    .is_some_and(|p| p.host == mv.to && p.generation == mv.generation.next());
                if flipped {
                    mv.phase = MovePhase::Flipped;
                    mv.error = None;
                    self.save(&mut mv).await?;
                }
            }
            if matches!(mv.phase, MovePhase::Copying | MovePhase::Syncing) {
                let e = format!(
                    "interrupted in phase {} (the coordinator stopped)",
                    mv.phase
                );
                self.fail(&mut mv, e).await?;
            }
            let s = steps(&mv);
            out.push(self.run(mv, s.as_ref()).await?);
        }
        Ok(out)
    }
}
