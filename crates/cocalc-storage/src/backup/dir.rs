//! [`DirBackups`]: each backup a plain copy in a directory.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cocalc_core::{BackupError, BackupInfo, BackupStore, HostId, ProjectId, SnapshotInfo};

use super::{empty_destination, source_tree};
use crate::common::{blocking, copy_tree, remove_any, unique, PREFIX};

/// Backups as plain copies (`cp -a`, reflinks where the filesystem has
/// them) under one directory, for development and tests. No
/// deduplication, compression or encryption: use
/// [`RusticBackups`](super::RusticBackups) for anything real.
///
/// Layout: `<root>/project-<uuid>/<id>/tree` and `<id>/info.json`. A
/// backup is copied under a hidden name and renamed into place, so a
/// failed or interrupted one is never listed.
#[derive(Debug, Clone)]
pub struct DirBackups {
    root: PathBuf,
}

impl DirBackups {
    /// Backups under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, BackupError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        Ok(DirBackups { root })
    }

    fn project_dir(&self, p: ProjectId) -> PathBuf {
        self.root.join(format!("{PREFIX}{p}"))
    }

    /// The backup's directory, if `id` names one of `p`'s backups.
    fn existing(&self, p: ProjectId, id: &str) -> Result<PathBuf, BackupError> {
        let ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
        let dir = self.project_dir(p).join(id);
        if ok && dir.join("info.json").is_file() {
            Ok(dir)
        } else {
            Err(BackupError::NotFound {
                project: p,
                id: id.to_string(),
            })
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(format!("{}: {e}", path.display()))
}

fn from_storage(e: cocalc_core::StorageError) -> BackupError {
    BackupError::Io(e.to_string())
}

/// A backup's record, from its `info.json`.
fn read_info(f: &Path) -> Result<BackupInfo, BackupError> {
    let data = std::fs::read(f).map_err(|e| io(f, e))?;
    serde_json::from_slice(&data).map_err(|e| BackupError::Io(format!("{}: {e}", f.display())))
}

/// Files and bytes of file data under `dir`.
fn count(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        if m.is_dir() {
            let (f, b) = count(&e.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes))
}

#[async_trait]
impl BackupStore for DirBackups {
    async fn backup(
        &self,
        project: ProjectId,
        host: HostId,
        snapshot: &SnapshotInfo,
        tree: &Path,
    ) -> Result<BackupInfo, BackupError> {
        source_tree(tree)?;
        let dir = self.project_dir(project);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let id = format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 96));
        let staging = dir.join(unique("backup"));
        let result = async {
            std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
            copy_tree(project, tree, &staging.join("tree"))
                .await
                .map_err(from_storage)?;
            let t = staging.join("tree");
            let (files, bytes) = blocking(move || {
                count(&t).map_err(|e| cocalc_core::StorageError::Io(e.to_string()))
            })
            .await
            .map_err(from_storage)?;
            let info = BackupInfo::new(
                id.clone(),
                project,
                host,
                snapshot.name.clone(),
                snapshot.created,
                files,
                bytes,
                bytes,
            );
            let json = serde_json::to_vec_pretty(&info).expect("a BackupInfo serialises");
            let f = staging.join("info.json");
            std::fs::write(&f, json).map_err(|e| io(&f, e))?;
            let dst = dir.join(&id);
            std::fs::rename(&staging, &dst).map_err(|e| io(&dst, e))?;
            Ok(info)
        }
        .await;
        if result.is_err() {
            let _ = remove_any(&staging);
        }
        result
    }

    async fn backups(&self, project: ProjectId) -> Result<Vec<BackupInfo>, BackupError> {
        let dir = self.project_dir(project);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir, e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| io(&dir, e))?;
            let f = e.path().join("info.json");
            if e.file_name().to_string_lossy().starts_with('.') || !f.is_file() {
                continue;
            }
            out.push(read_info(&f)?);
        }
        out.sort_by(|a, b| a.taken.cmp(&b.taken).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn restore(
        &self,
        project: ProjectId,
        id: &str,
        into: &Path,
    ) -> Result<BackupInfo, BackupError> {
        let dir = self.existing(project, id)?;
        let info = read_info(&dir.join("info.json"))?;
        empty_destination(into)?;
        copy_tree(project, &dir.join("tree"), into)
            .await
            .map_err(from_storage)?;
        Ok(info)
    }

    async fn forget(&self, project: ProjectId, ids: &[String]) -> Result<(), BackupError> {
        let dirs = ids
            .iter()
            .map(|id| self.existing(project, id))
            .collect::<Result<Vec<_>, _>>()?;
        for d in dirs {
            blocking(move || {
                remove_any(&d).map_err(|e| cocalc_core::StorageError::Io(e.to_string()))
            })
            .await
            .map_err(from_storage)?;
        }
        Ok(())
    }
}
