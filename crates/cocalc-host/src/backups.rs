//! Backups of a host's projects: a project snapshot copied to a
//! [`BackupStore`], and brought back as a snapshot to restore from.
//!
//! [`HostAgent::backup`](crate::agent::HostAgent::backup) takes a snapshot
//! if the project changed since its newest one and backs that snapshot
//! up; asked again with nothing changed it answers the same backup
//! without storing anything. [`HostAgent::restore_backup`](crate::agent::HostAgent::restore_backup)
//! first snapshots the project as it is (so a restore can be undone),
//! then uses the backup's own snapshot if this host still has it, or
//! restores the backup from the store into a staging directory and
//! imports it as that snapshot, and finally restores one path, or the
//! whole project, from it. A project with no volume here (its host was
//! lost, and it was placed on this one) gets its volume from the backup.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cocalc_core::wire::RestoredBackup;
use cocalc_core::{
    BackupInfo, BackupStore, HostId, ProjectId, SnapshotInfo, Storage, StorageError,
};

use crate::agent::AgentError;

/// A host's backup store and what it needs beside it.
pub struct Backups {
    store: Arc<dyn BackupStore>,
    staging: PathBuf,
    /// The newest backup this host made of each project (its snapshot's
    /// name and the backup), so an unchanged project costs no store query.
    last: Mutex<HashMap<ProjectId, BackupInfo>>,
    /// One backup or restore at a time on this host: two backups of one
    /// unchanged project must not both store it, and the store works one
    /// call at a time anyway.
    busy: tokio::sync::Mutex<()>,
    stats: Stats,
}

/// Counts of what a host's backups did since it started, for its metrics.
#[derive(Debug, Default)]
struct Stats {
    stored: AtomicU64,
    unchanged: AtomicU64,
    failed: AtomicU64,
    restored: AtomicU64,
    restore_failed: AtomicU64,
    /// Unix seconds of the last backup that succeeded (stored or not).
    last_ok: AtomicU64,
}

/// A reading of [`Backups`]' counters ([`Backups::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupStats {
    /// Backups that stored a new snapshot.
    pub stored: u64,
    /// Backups asked for with nothing changed (the last one answered).
    pub unchanged: u64,
    /// Backups that failed.
    pub failed: u64,
    /// Restores done.
    pub restored: u64,
    /// Restores that failed (refusals of bad requests included).
    pub restore_failed: u64,
    /// Unix seconds of the last backup that succeeded, if any.
    pub last_success: Option<u64>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("staging", &self.staging)
            .finish_non_exhaustive()
    }
}

impl Backups {
    /// Backups to `store`; restores are staged in directories under
    /// `staging` (best on the same filesystem as the projects, so imports
    /// can share extents), each removed when its restore ends.
    pub fn new(store: Arc<dyn BackupStore>, staging: impl Into<PathBuf>) -> Self {
        Backups {
            store,
            staging: staging.into(),
            last: Mutex::new(HashMap::new()),
            busy: tokio::sync::Mutex::new(()),
            stats: Stats::default(),
        }
    }

    /// What backups and restores did since this value was made.
    pub fn stats(&self) -> BackupStats {
        let s = &self.stats;
        let last = s.last_ok.load(Ordering::Relaxed);
        BackupStats {
            stored: s.stored.load(Ordering::Relaxed),
            unchanged: s.unchanged.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            restored: s.restored.load(Ordering::Relaxed),
            restore_failed: s.restore_failed.load(Ordering::Relaxed),
            last_success: (last > 0).then_some(last),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn BackupStore> {
        &self.store
    }

    /// A backup of `project`, and whether it stored anything new.
    pub(crate) async fn backup(
        &self,
        storage: &dyn Storage,
        host: HostId,
        project: ProjectId,
    ) -> Result<(BackupInfo, bool), AgentError> {
        let _one = self.busy.lock().await;
        let r = self.backup_locked(storage, host, project).await;
        let s = &self.stats;
        match &r {
            Ok((_, stored)) => {
                let n = if *stored { &s.stored } else { &s.unchanged };
                n.fetch_add(1, Ordering::Relaxed);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                s.last_ok.store(now, Ordering::Relaxed);
            }
            Err(_) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// A backup, and whether it stored anything new.
    async fn backup_locked(
        &self,
        storage: &dyn Storage,
        host: HostId,
        project: ProjectId,
    ) -> Result<(BackupInfo, bool), AgentError> {
        storage.volume(project).await?;
        let snap: SnapshotInfo = match storage.snapshot(project).await? {
            Some(s) => s,
            None => storage
                .snapshots(project)
                .await?
                .pop()
                .ok_or(AgentError::Storage(StorageError::NotFound(project)))?,
        };
        let remembered = self.last.lock().unwrap().get(&project).cloned();
        if let Some(b) = remembered.filter(|b| b.snapshot == snap.name) {
            return Ok((b, false));
        }
        let done = self
            .store
            .backups(project)
            .await?
            .into_iter()
            .rev()
            .find(|b| b.host == host && b.snapshot == snap.name);
        let (info, stored) = match done {
            Some(b) => (b, false),
            None => {
                let tree = storage.snapshot_tree(project, &snap.name).await?;
                (self.store.backup(project, host, &snap, &tree).await?, true)
            }
        };
        self.last.lock().unwrap().insert(project, info.clone());
        Ok((info, stored))
    }

    pub(crate) async fn restore(
        &self,
        storage: &dyn Storage,
        project: ProjectId,
        id: &str,
        path: Option<&str>,
        running: bool,
    ) -> Result<RestoredBackup, AgentError> {
        let _one = self.busy.lock().await;
        let r = self
            .restore_locked(storage, project, id, path, running)
            .await;
        let n = match r {
            Ok(_) => &self.stats.restored,
            Err(_) => &self.stats.restore_failed,
        };
        n.fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn restore_locked(
        &self,
        storage: &dyn Storage,
        project: ProjectId,
        id: &str,
        path: Option<&str>,
        running: bool,
    ) -> Result<RestoredBackup, AgentError> {
        let info = pick(self.store.backups(project).await?, project, id)?;
        let id = info.id.as_str();
        if running {
            return Err(AgentError::Running(project));
        }
        let exists = match storage.volume(project).await {
            Ok(_) => true,
            Err(StorageError::NotFound(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if exists {
            storage.snapshot(project).await?;
        } else if path.is_some() {
            storage.create(project).await?;
        }
        let here = if exists || path.is_some() {
            storage.snapshots(project).await?
        } else {
            Vec::new()
        };
        // The newest snapshot: the one just taken, or the state it would
        // have taken (nothing changed since).
        let previous = here.last().filter(|_| exists).map(|s| s.name.clone());
        // Within one project, snapshot names are unique across hosts: a
        // project is on one host at a time and names are times to the
        // millisecond. A snapshot of that name here is the backup's own.
        let fetched = !here.iter().any(|s| s.name == info.snapshot);
        if fetched {
            let dir = self.staging.join(format!(
                "restore-{project}-{}-{}",
                std::process::id(),
                STAGE.fetch_add(1, Ordering::Relaxed)
            ));
            let r = async {
                self.store.restore(project, id, &dir).await?;
                storage
                    .import_snapshot(project, &info.snapshot, &dir)
                    .await?;
                Ok::<_, AgentError>(())
            }
            .await;
            let d = dir.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
            r?;
        }
        // A volume made just now from the imported snapshot is already the
        // whole restore.
        if exists || path.is_some() {
            storage.restore(project, &info.snapshot, path).await?;
        }
        Ok(RestoredBackup::new(info, fetched, previous))
    }
}

static STAGE: AtomicU64 = AtomicU64::new(0);

/// The backup `id` names: its whole id, or (as with git) a prefix of at
/// least [`MIN_PREFIX`] characters that only one of them has.
fn pick(list: Vec<BackupInfo>, project: ProjectId, id: &str) -> Result<BackupInfo, AgentError> {
    let not_found = || {
        AgentError::Backup(cocalc_core::BackupError::NotFound {
            project,
            id: id.to_string(),
        })
    };
    if let Some(b) = list.iter().find(|b| b.id == id) {
        return Ok(b.clone());
    }
    if id.len() < MIN_PREFIX {
        return Err(not_found());
    }
    let mut hits = list.into_iter().filter(|b| b.id.starts_with(id));
    match (hits.next(), hits.next()) {
        (Some(b), None) => Ok(b),
        (None, _) => Err(not_found()),
        (Some(_), Some(_)) => Err(AgentError::Backup(cocalc_core::BackupError::Invalid(
            format!("{id} is the start of several backups' ids; give more of it"),
        ))),
    }
}

/// The shortest id prefix a restore accepts.
pub const MIN_PREFIX: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use cocalc_core::Timestamp;

    fn info(id: &str) -> BackupInfo {
        let p: ProjectId = "6ba7b810-9dad-41d1-80b4-00c04fd430c8".parse().unwrap();
        let h: HostId = "7d444840-9dc0-41d1-b245-5ffdce74fad2".parse().unwrap();
        BackupInfo::new(
            id.into(),
            p,
            h,
            "2026-01-01T00:00:00.000Z".into(),
            Timestamp(0),
            0,
            0,
            0,
        )
    }

    #[test]
    fn ids_or_unique_prefixes_of_eight_name_a_backup() {
        let list = vec![info("abcdef0123"), info("abcdef0199"), info("12345678ff")];
        let p = list[0].project;
        let got = |id: &str| pick(list.clone(), p, id).map(|b| b.id);
        assert_eq!(got("abcdef0199").unwrap(), "abcdef0199");
        assert_eq!(got("12345678").unwrap(), "12345678ff");
        let short = got("1234567").unwrap_err();
        assert!(
            matches!(
                short,
                AgentError::Backup(cocalc_core::BackupError::NotFound { .. })
            ),
            "{short}"
        );
        let both = got("abcdef01").unwrap_err();
        assert!(both.to_string().contains("several"), "{both}");
        assert!(matches!(
            got("ffffffff"),
            Err(AgentError::Backup(
                cocalc_core::BackupError::NotFound { .. }
            ))
        ));
    }
}
