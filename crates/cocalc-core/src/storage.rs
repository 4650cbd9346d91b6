//! The [`Storage`] trait: one volume per project, with quota, snapshots and
//! send/receive streams.
//!
//! Implementations: `BtrfsStorage` (a subvolume per project) and `DirStorage`
//! (plain directories, for development) in `cocalc-storage`, and an in-memory
//! fake in `cocalc-testkit`; every one must pass the storage contract suite.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::id::ProjectId;
use crate::stream::ByteStream;
use crate::time::Timestamp;

/// Where a project's volume lives on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VolumeInfo {
    /// The project.
    pub project: ProjectId,
    /// Its home directory (the container's `/home/user`).
    pub home: PathBuf,
    /// Its scratch directory (the container's `/tmp`), if the backend has one.
    pub scratch: Option<PathBuf>,
}

impl VolumeInfo {
    /// A volume record.
    pub fn new(project: ProjectId, home: PathBuf, scratch: Option<PathBuf>) -> Self {
        VolumeInfo {
            project,
            home,
            scratch,
        }
    }
}

/// A size limit on a project's volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Most bytes the project may hold; `None` means no limit.
    pub max_bytes: Option<u64>,
}

/// Bytes a project uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes referenced by the volume (what the user sees).
    pub referenced_bytes: u64,
    /// Bytes only this volume holds (freed if it were deleted).
    pub exclusive_bytes: u64,
}

/// A read-only snapshot of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Name: the UTC time it was taken, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub name: String,
    /// When it was taken.
    pub created: Timestamp,
    /// Bytes it holds exclusively, where the backend can tell.
    pub exclusive_bytes: Option<u64>,
}

impl SnapshotInfo {
    /// A snapshot record.
    pub fn new(name: String, created: Timestamp, exclusive_bytes: Option<u64>) -> Self {
        SnapshotInfo {
            name,
            created,
            exclusive_bytes,
        }
    }
}

/// Why a storage call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// No volume for this project.
    #[error("no volume for project {0}")]
    NotFound(ProjectId),
    /// A volume, or a snapshot of that name, already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// No snapshot with that name.
    #[error("no snapshot {name} of project {project}")]
    SnapshotNotFound {
        /// The project.
        project: ProjectId,
        /// The snapshot name asked for.
        name: String,
    },
    /// A name given as a snapshot's is not one (snapshot names are UTC
    /// times, `YYYY-MM-DDTHH:MM:SS.mmmZ`).
    #[error("not a snapshot name: {0:?}")]
    InvalidSnapshotName(String),
    /// A path leaves the project (`..`, absolute, symlink out).
    #[error("path escapes the project: {0}")]
    PathEscape(String),
    /// A write would exceed the project's quota.
    #[error("quota exceeded for project {0}")]
    QuotaExceeded(ProjectId),
    /// The backend cannot do this (e.g. quotas on plain directories).
    #[error("unsupported by this backend: {0}")]
    Unsupported(&'static str),
    /// A send/receive stream was cut or corrupt; nothing was left behind.
    #[error("stream incomplete: {0}")]
    StreamIncomplete(String),
    /// The underlying filesystem failed; may succeed if retried.
    #[error("storage I/O error: {0}")]
    Io(String),
}

impl StorageError {
    /// True when retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Io(_))
    }
}

/// Project volumes on one host.
///
/// Contract for every implementation:
/// - [`create`](Storage::create) is idempotent: creating an existing volume
///   returns it unchanged. [`delete`](Storage::delete) removes the volume and
///   all its snapshots and is `Ok` for an unknown project.
/// - Calls on one project are serialised; different projects proceed in
///   parallel.
/// - [`snapshot`](Storage::snapshot) returns `None` when nothing changed since
///   the newest snapshot.
/// - A [`receive`](Storage::receive) whose stream ends early or fails leaves
///   no partial volume or snapshot and returns
///   [`StorageError::StreamIncomplete`].
/// - Paths are relative to the project's home; any path that would leave it
///   is refused with [`StorageError::PathEscape`].
#[async_trait]
pub trait Storage: Send + Sync {
    /// Creates the project's volume (idempotent).
    async fn create(&self, project: ProjectId) -> Result<VolumeInfo, StorageError>;

    /// The project's volume, or [`StorageError::NotFound`].
    async fn volume(&self, project: ProjectId) -> Result<VolumeInfo, StorageError>;

    /// Deletes the volume with all its snapshots (idempotent).
    async fn delete(&self, project: ProjectId) -> Result<(), StorageError>;

    /// Every project with a volume here.
    async fn list(&self) -> Result<Vec<ProjectId>, StorageError>;

    /// Sets the quota. Default: [`StorageError::Unsupported`].
    async fn set_quota(&self, project: ProjectId, quota: Quota) -> Result<(), StorageError> {
        let _ = (project, quota);
        Err(StorageError::Unsupported("quotas"))
    }

    /// Reads the quota. Default: [`StorageError::Unsupported`].
    async fn quota(&self, project: ProjectId) -> Result<Quota, StorageError> {
        let _ = project;
        Err(StorageError::Unsupported("quotas"))
    }

    /// Bytes used.
    async fn usage(&self, project: ProjectId) -> Result<Usage, StorageError>;

    /// Takes a read-only snapshot if anything changed since the last one.
    async fn snapshot(&self, project: ProjectId) -> Result<Option<SnapshotInfo>, StorageError>;

    /// Snapshots, oldest first.
    async fn snapshots(&self, project: ProjectId) -> Result<Vec<SnapshotInfo>, StorageError>;

    /// Deletes one snapshot.
    async fn delete_snapshot(&self, project: ProjectId, name: &str) -> Result<(), StorageError>;

    /// Restores `path` (relative to home; `None` = everything) from a snapshot.
    async fn restore(
        &self,
        project: ProjectId,
        snapshot: &str,
        path: Option<&str>,
    ) -> Result<(), StorageError>;

    /// A stream of snapshot `snapshot`, incremental against `parent` if given.
    async fn send(
        &self,
        project: ProjectId,
        snapshot: &str,
        parent: Option<&str>,
    ) -> Result<ByteStream, StorageError>;

    /// The read-only directory tree of snapshot `name`, for tools that read
    /// a snapshot in place (backups). It stays valid until the snapshot is
    /// deleted. Default: [`StorageError::Unsupported`].
    async fn snapshot_tree(&self, project: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        let _ = (project, name);
        Err(StorageError::Unsupported("reading snapshots in place"))
    }

    /// Makes a read-only snapshot of `project` named `name` (a snapshot
    /// name: a UTC time) from the directory `tree`, which is copied, not
    /// moved; a backup brought back comes in this way. Creates the volume
    /// from it if the project has none here, as
    /// [`receive`](Storage::receive) does. A snapshot of that name already
    /// here is [`StorageError::AlreadyExists`]; on any failure nothing is
    /// left behind. Default: [`StorageError::Unsupported`].
    async fn import_snapshot(
        &self,
        project: ProjectId,
        name: &str,
        tree: &std::path::Path,
    ) -> Result<SnapshotInfo, StorageError> {
        let _ = (project, name, tree);
        Err(StorageError::Unsupported("importing snapshots"))
    }

    /// Turns a stream from [`send`](Storage::send) into a snapshot of
    /// `project` on this host (creating the volume from it if it is new).
    async fn receive(
        &self,
        project: ProjectId,
        stream: ByteStream,
    ) -> Result<SnapshotInfo, StorageError>;
}
