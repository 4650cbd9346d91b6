//! [`BackupStore`] implementations, and backup retention.
//!
//! | type | where backups go | for |
//! | --- | --- | --- |
//! | [`RusticBackups`] (feature `rustic`) | a restic-format repository through `rustic_core`: a local directory, or S3-compatible object storage through OpenDAL; deduplicated, compressed, encrypted | production |
//! | [`DirBackups`] | plain copies in a directory, one per backup | development and tests |
//!
//! A host backs up a snapshot's tree
//! ([`Storage::snapshot_tree`](cocalc_core::Storage::snapshot_tree)), and
//! brings one back by restoring it into an empty directory and importing
//! that as a snapshot
//! ([`Storage::import_snapshot`](cocalc_core::Storage::import_snapshot)).
//! [`forget_by_retention`] thins a project's backups with the same
//! [`RetentionPolicy`] as snapshots.

mod dir;
#[cfg(feature = "rustic")]
mod rustic;

pub use cocalc_core::backup::*;
pub use dir::DirBackups;
#[cfg(feature = "rustic")]
pub use rustic::{RusticBackups, RusticConfig};

use std::path::Path;

use cocalc_core::{ProjectId, Timestamp};

use crate::retention::RetentionPolicy;

/// Forgets the backups of `project` that `policy` does not keep at `now`
/// (counting backups from every host as one history); returns their ids.
/// The newest backup is always kept.
pub async fn forget_by_retention(
    store: &dyn BackupStore,
    project: ProjectId,
    policy: &RetentionPolicy,
    now: Timestamp,
) -> Result<Vec<String>, BackupError> {
    let list = store.backups(project).await?;
    let times: Vec<Timestamp> = list.iter().map(|b| b.taken).collect();
    let plan = policy.select(&times, now);
    let ids: Vec<String> = plan.delete.iter().map(|&i| list[i].id.clone()).collect();
    if !ids.is_empty() {
        store.forget(project, &ids).await?;
    }
    Ok(ids)
}

/// Refuses a restore destination that exists and is not an empty
/// directory; creates it (and its parents) otherwise.
pub(crate) fn empty_destination(into: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(into) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(BackupError::Invalid(format!(
                    "{}: not empty; a backup is restored into an empty directory",
                    into.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(into)
            .map_err(|e| BackupError::Io(format!("{}: {e}", into.display()))),
        Err(e) => Err(BackupError::Invalid(format!("{}: {e}", into.display()))),
    }
}

/// Refuses a backup source that is not a directory.
pub(crate) fn source_tree(tree: &Path) -> Result<(), BackupError> {
    match std::fs::symlink_metadata(tree) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(BackupError::Invalid(format!(
            "{}: not a directory",
            tree.display()
        ))),
        Err(e) => Err(BackupError::Invalid(format!("{}: {e}", tree.display()))),
    }
}
