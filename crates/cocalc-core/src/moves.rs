//! Moving a project between hosts: the [`MoveRecord`] the master keeps
//! while it moves one, its [`MovePhase`]s, and the wire types of the host
//! calls a move is made of.
//!
//! A move copies the project's newest snapshot in full to the target
//! while the project keeps running ([`MovePhase::Copying`]), then stops it
//! and refuses starts on the source ("freezes" it), sends what changed
//! since as an incremental stream ([`MovePhase::Syncing`]), checks that
//! the target holds it and that the source did not change, flips the map
//! to the target with the next generation ([`MovePhase::Flipped`]), and
//! only then deletes the source's copy ([`MovePhase::Done`]). A failure
//! before the flip rolls back ([`MovePhase::RollingBack`] →
//! [`MovePhase::RolledBack`]): the target's copy is deleted and the
//! source thawed (and restarted if it was running). The data goes from
//! host to host: the target pulls the stream from the source's data plane
//! with a token the master minted for that; the master only coordinates.
//!
//! The coordinator that runs these steps lives in `cocalc-placement`.

use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId};
use crate::placement::PlacementDecision;
use crate::record::Generation;
use crate::time::Timestamp;

/// Where a move stands. Each phase is stored before the work it names
/// starts, so a coordinator that restarts knows what may be half done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MovePhase {
    /// The full copy of a snapshot to the target; the project runs on.
    Copying,
    /// The project is stopped and frozen on the source; the changes since
    /// the full copy go to the target.
    Syncing,
    /// The map points at the target; the source's copy is being deleted.
    Flipped,
    /// Finished: the project lives on the target only.
    Done,
    /// A step before the flip failed; the target's copy is being deleted
    /// and the source thawed.
    RollingBack,
    /// Finished without moving: the project is where it was, as it was.
    RolledBack,
}

impl MovePhase {
    /// True for [`Done`](MovePhase::Done) and
    /// [`RolledBack`](MovePhase::RolledBack): nothing is left to do.
    pub fn is_finished(self) -> bool {
        matches!(self, MovePhase::Done | MovePhase::RolledBack)
    }

    /// True once the map points at the target: the move can only go
    /// forward from here.
    pub fn is_flipped(self) -> bool {
        matches!(self, MovePhase::Flipped | MovePhase::Done)
    }

    /// The lowercase name used on the wire and in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            MovePhase::Copying => "copying",
            MovePhase::Syncing => "syncing",
            MovePhase::Flipped => "flipped",
            MovePhase::Done => "done",
            MovePhase::RollingBack => "rolling_back",
            MovePhase::RolledBack => "rolled_back",
        }
    }

    /// The phase named `s` ([`as_str`](MovePhase::as_str)'s inverse).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "copying" => MovePhase::Copying,
            "syncing" => MovePhase::Syncing,
            "flipped" => MovePhase::Flipped,
            "done" => MovePhase::Done,
            "rolling_back" => MovePhase::RollingBack,
            "rolled_back" => MovePhase::RolledBack,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MovePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One move of one project, as the master stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveRecord {
    /// The project.
    pub project: ProjectId,
    /// The host it is moved from.
    pub from: HostId,
    /// The host it is moved to.
    pub to: HostId,
    /// The project's generation on `from` when the move began; the flip
    /// succeeds only if the map still holds it.
    pub generation: Generation,
    /// Why `to`: the decision the flip stores in the map.
    pub decision: PlacementDecision,
    /// Where the move stands.
    pub phase: MovePhase,
    /// The snapshot copied in full.
    pub base: Option<String>,
    /// Whether the target may hold a copy this move made (its full copy
    /// was asked for and not refused): only then does a rollback delete
    /// the target's copy, so a volume the target held before is never
    /// touched.
    #[serde(default)]
    pub copy_started: bool,
    /// The snapshot taken after the stop, sent as changes since `base`.
    pub last: Option<String>,
    /// Whether the project ran on `from` when it was stopped (it is started
    /// on whichever host holds it when the move ends).
    pub was_running: bool,
    /// Whether the start on the target (after the flip, for a project that
    /// was running) was tried.
    #[serde(default)]
    pub restarted: bool,
    /// When the move began.
    pub started: Timestamp,
    /// When the stop for the last copy began (the move entered
    /// [`MovePhase::Syncing`]).
    #[serde(default)]
    pub stopped_at: Option<Timestamp>,
    /// When the map was flipped to the target. With `stopped_at`, how long
    /// the project could not be used (plus its start on the target).
    #[serde(default)]
    pub flipped_at: Option<Timestamp>,
    /// When the record last changed.
    pub updated: Timestamp,
    /// Why the move is rolling back or rolled back; the last error of a
    /// step that is being retried.
    pub error: Option<String>,
}

impl MoveRecord {
    /// A move that is about to start copying.
    pub fn new(
        project: ProjectId,
        from: HostId,
        generation: Generation,
        decision: PlacementDecision,
        now: Timestamp,
    ) -> Self {
        MoveRecord {
            project,
            from,
            to: decision.host,
            generation,
            decision,
            phase: MovePhase::Copying,
            base: None,
            copy_started: false,
            last: None,
            was_running: false,
            restarted: false,
            started: now,
            stopped_at: None,
            flipped_at: None,
            updated: now,
            error: None,
        }
    }
}

/// `POST /v1/projects/{p}/move` (master, admin): move the project to
/// `to`, or to the host placement picks among the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveRequest {
    /// The target host; `None` lets placement choose.
    #[serde(default)]
    pub to: Option<HostId>,
}

/// `POST /<project>/move/snapshot` (host, master only): a snapshot to send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveSnapshotRequest {
    /// Stop the project first and refuse to start it until thawed.
    #[serde(default)]
    pub freeze: bool,
}

/// The answer to [`MoveSnapshotRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MoveSnapshot {
    /// The newest snapshot, taken now if anything changed since the last.
    pub snapshot: String,
    /// With `freeze`: whether the project was running before it was stopped
    /// (a second freeze answers what the first saw).
    pub was_running: bool,
}

impl MoveSnapshot {
    /// An answer.
    pub fn new(snapshot: String, was_running: bool) -> Self {
        MoveSnapshot {
            snapshot,
            was_running,
        }
    }
}

/// `POST /<project>/move/pull` (host, master only): fetch a snapshot's
/// stream from the source host and receive it here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MovePullRequest {
    /// The source's data-plane base URL (a proxy's, for a hidden host).
    pub source: String,
    /// A token for the source host's move calls.
    pub token: String,
    /// The snapshot to fetch.
    pub snapshot: String,
    /// Send only the changes since this snapshot, which both hosts hold.
    /// `None` is a full copy, refused if this host already holds a volume
    /// of the project.
    #[serde(default)]
    pub parent: Option<String>,
    /// The last pull of the move: afterwards the project's volume here is
    /// made exactly `snapshot`.
    #[serde(default)]
    pub last: bool,
}

impl MovePullRequest {
    /// A pull of `snapshot` (incremental from `parent` if given).
    pub fn new(
        source: String,
        token: String,
        snapshot: String,
        parent: Option<String>,
        last: bool,
    ) -> Self {
        MovePullRequest {
            source,
            token,
            snapshot,
            parent,
            last,
        }
    }
}

/// `POST /<project>/move/discard` (host, master only): delete the
/// project's copy here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveDiscardRequest {
    /// Delete the copy only if it holds this snapshot (the one a move
    /// copied first): a copy without it is not that move's, and is left
    /// alone. `None` deletes whatever copy is here (an operator's call).
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// `POST /<project>/move/thaw` (host, master only): undo a freeze.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveThawRequest {
    /// Start the project again if the freeze stopped it (the host
    /// remembers whether it did). `false` when the project may no longer
    /// run there (the map names another host).
    #[serde(default)]
    pub restart: bool,
}

/// The answer to `POST /v1/hosts/{h}/evacuate` (master, admin): the host
/// is draining, and its projects are being moved off it, one at a time,
/// each to the host placement picks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evacuation {
    /// The host being emptied.
    pub host: HostId,
    /// The projects on it when the evacuation began, in the order they are
    /// moved.
    pub projects: Vec<ProjectId>,
    /// When it began: each project's move begins at or after this time.
    pub started: Timestamp,
}

impl Evacuation {
    /// An answer.
    pub fn new(host: HostId, projects: Vec<ProjectId>, started: Timestamp) -> Self {
        Evacuation {
            host,
            projects,
            started,
        }
    }
}
