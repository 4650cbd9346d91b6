//! The [`BackupStore`] trait: project snapshots copied off the host, so a
//! project outlives the disk (or the host) it lives on.
//!
//! A host backs up a *snapshot*, never a live volume: the tree it reads
//! does not change under it, and the backup is named by the snapshot it
//! came from. Bringing a backup back is the reverse: the store writes its
//! tree into an empty directory and the host's [`Storage`](crate::Storage)
//! imports that as a snapshot
//! ([`import_snapshot`](crate::Storage::import_snapshot)), from which any
//! path, or the whole project, is restored as from any other snapshot.
//!
//! Implementations: `RusticBackups` (a restic-format repository through
//! `rustic_core`: a local directory or S3-compatible object storage) and
//! `DirBackups` (plain copies in a directory, for development) in
//! `cocalc-storage`; both pass the backup contract suite in
//! `cocalc-testkit`.

use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId};
use crate::storage::SnapshotInfo;
use crate::time::Timestamp;

/// One backup of a project in a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackupInfo {
    /// The store's id for it (unique within the store; hex for rustic).
    pub id: String,
    /// The project it belongs to.
    pub project: ProjectId,
    /// The host that took it.
    pub host: HostId,
    /// The snapshot it was taken from (a UTC time, as snapshot names are).
    pub snapshot: String,
    /// When that snapshot was taken.
    pub taken: Timestamp,
    /// Files in it.
    pub files: u64,
    /// Bytes of file data in it.
    pub bytes: u64,
    /// Bytes this backup added to the store (data no earlier backup had).
    pub added_bytes: u64,
}

impl BackupInfo {
    /// A backup record.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        project: ProjectId,
        host: HostId,
        snapshot: String,
        taken: Timestamp,
        files: u64,
        bytes: u64,
        added_bytes: u64,
    ) -> Self {
        BackupInfo {
            id,
            project,
            host,
            snapshot,
            taken,
            files,
            bytes,
            added_bytes,
        }
    }
}

/// Why a backup call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The project has no backup with that id in this store.
    #[error("no backup {id} of project {project}")]
    NotFound {
        /// The project.
        project: ProjectId,
        /// The id asked for.
        id: String,
    },
    /// The store could not be reached or refused the call (network,
    /// credentials, a repository being locked); may succeed if retried.
    #[error("backup repository: {0}")]
    Repository(String),
    /// Reading the source or writing a restore failed on this host.
    #[error("backup I/O error: {0}")]
    Io(String),
    /// The call was refused before anything was read or written (a
    /// destination that is not empty, a tree that is not a directory).
    #[error("invalid backup request: {0}")]
    Invalid(String),
}

impl BackupError {
    /// True when retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BackupError::Repository(_) | BackupError::Io(_))
    }
}

/// Where a host's backups go.
///
/// Contract for every implementation:
/// - [`backup`](BackupStore::backup) stores the whole tree (contents, modes,
///   numeric owners, times, symlinks) and returns the new backup; data an
///   earlier backup already holds is not stored again. A backup that fails
///   leaves no backup listed.
/// - [`backups`](BackupStore::backups) lists a project's backups from every
///   host that uses the store, oldest first, and nothing of other projects.
/// - [`restore`](BackupStore::restore) writes a backup's tree into `into`,
///   which must not exist or be an empty directory
///   ([`BackupError::Invalid`] otherwise), and reproduces what was backed up.
/// - [`forget`](BackupStore::forget) removes the named backups of that
///   project and frees data no remaining backup uses; ids of other projects
///   are refused with [`BackupError::NotFound`] and nothing is removed.
#[async_trait]
pub trait BackupStore: Send + Sync {
    /// Backs up `tree`, the read-only tree of `snapshot` of `project`,
    /// taken on `host`.
    async fn backup(
        &self,
        project: ProjectId,
        host: HostId,
        snapshot: &SnapshotInfo,
        tree: &Path,
    ) -> Result<BackupInfo, BackupError>;

    /// The project's backups, oldest first.
    async fn backups(&self, project: ProjectId) -> Result<Vec<BackupInfo>, BackupError>;

    /// Writes backup `id` of `project` into `into` (created if missing; it
    /// must be empty). Returns what was restored.
    async fn restore(
        &self,
        project: ProjectId,
        id: &str,
        into: &Path,
    ) -> Result<BackupInfo, BackupError>;

    /// Removes backups `ids` of `project` and the data only they used.
    async fn forget(&self, project: ProjectId, ids: &[String]) -> Result<(), BackupError>;
}
