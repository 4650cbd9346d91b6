//! Pieces both backends share: the pool layout, copies, path restore.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cocalc_core::{ProjectId, StorageError, VolumeInfo};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, mkdirat, Mode};
use nix::unistd::{fchownat, geteuid, unlinkat, Gid, Uid, UnlinkatFlags};
use tokio::process::Command;

use crate::names::parse_snapshot_name;
use crate::paths::{clean_relative, resolve_inside};

/// Where things live under a pool (or a [`DirStorage`](crate::DirStorage) root):
///
/// ```text
/// project-<uuid>/                 the project's home (a subvolume on Btrfs)
/// scratch/project-<uuid>/         its /tmp, reset on cold start
/// snapshots/project-<uuid>/<UTC>  read-only snapshots
/// meta/project-<uuid>             backend bookkeeping (the quota group)
/// incoming/, trash/               work areas of receive and restore
/// ```
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
}

pub(crate) const PREFIX: &str = "project-";

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout { root }
    }
    pub(crate) fn home(&self, p: ProjectId) -> PathBuf {
        self.root.join(format!("{PREFIX}{p}"))
    }
    pub(crate) fn scratch(&self, p: ProjectId) -> PathBuf {
        self.root.join("scratch").join(format!("{PREFIX}{p}"))
    }
    pub(crate) fn snapdir(&self, p: ProjectId) -> PathBuf {
        self.root.join("snapshots").join(format!("{PREFIX}{p}"))
    }
    pub(crate) fn meta(&self, p: ProjectId) -> PathBuf {
        self.root.join("meta").join(format!("{PREFIX}{p}"))
    }
    pub(crate) fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    pub(crate) fn trash(&self) -> PathBuf {
        self.root.join("trash")
    }
    /// A snapshot's path; names that are not snapshot names never match.
    pub(crate) fn snapshot(&self, p: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        if parse_snapshot_name(name).is_none() {
            return Err(StorageError::SnapshotNotFound {
                project: p,
                name: name.to_string(),
            });
        }
        Ok(self.snapdir(p).join(name))
    }
    pub(crate) fn volume_info(&self, p: ProjectId) -> VolumeInfo {
        VolumeInfo::new(p, self.home(p), Some(self.scratch(p)))
    }
    /// Creates the fixed directories.
    pub(crate) fn create_dirs(&self) -> io::Result<()> {
        for d in ["scratch", "snapshots", "meta", "incoming", "trash"] {
            std::fs::create_dir_all(self.root.join(d))?;
        }
        Ok(())
    }
    /// Projects with a home here.
    pub(crate) fn list(&self) -> Result<Vec<ProjectId>, StorageError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).map_err(|e| io_err(&self.root, e))? {
            let e = e.map_err(|e| io_err(&self.root, e))?;
            if let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|s| s.parse::<ProjectId>().ok())
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }
    /// Snapshot names of a project, oldest first.
    pub(crate) fn snapshot_names(&self, p: ProjectId) -> Result<Vec<String>, StorageError> {
        let dir = self.snapdir(p);
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&dir, e)),
        };
        for e in rd {
            let e = e.map_err(|e| io_err(&dir, e))?;
            if let Some(n) = e.file_name().to_str() {
                if parse_snapshot_name(n).is_some() {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Checks an import's name, that no snapshot has it yet, and its source
/// tree; returns where the snapshot would go.
pub(crate) fn importable(
    layout: &Layout,
    p: ProjectId,
    name: &str,
    tree: &Path,
) -> Result<PathBuf, StorageError> {
    if parse_snapshot_name(name).is_none() {
        return Err(StorageError::InvalidSnapshotName(name.to_string()));
    }
    match std::fs::symlink_metadata(tree) {
        Ok(m) if m.is_dir() => {
            let dst = layout.snapdir(p).join(name);
            if dst.exists() {
                return Err(StorageError::AlreadyExists(format!(
                    "snapshot {name} of project {p}"
                )));
            }
            Ok(dst)
        }
        Ok(_) => Err(StorageError::Io(format!(
            "{}: not a directory, nothing imported",
            tree.display()
        ))),
        Err(e) => Err(io_err(tree, e)),
    }
}

/// An I/O error with the path it concerns.
pub(crate) fn io_err(path: &Path, e: io::Error) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

/// A join error of a blocking task as a storage error.
pub(crate) fn join_err(e: tokio::task::JoinError) -> StorageError {
    StorageError::Io(format!("storage task failed: {e}"))
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(join_err)?
}

/// A name unique within this process, for temporary entries.
pub(crate) fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        ".cocalc-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `cp -a --reflink=auto src dst`: shares extents where the filesystem can
/// (Btrfs, XFS), copies otherwise; never follows symlinks in the tree.
/// A copy that runs out of quota is [`StorageError::QuotaExceeded`].
pub(crate) async fn copy_tree(
    project: ProjectId,
    src: &Path,
    dst: &Path,
) -> Result<(), StorageError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--no-target-directory")
        .arg(src)
        .arg(dst)
        .output()
        .await
        .map_err(|e| StorageError::Io(format!("cp: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Disk quota exceeded") || err.contains("No space left") {
        return Err(StorageError::QuotaExceeded(project));
    }
    Err(StorageError::Io(format!(
        "copying {} to {}: {}",
        src.display(),
        dst.display(),
        err.trim()
    )))
}

/// Removes a file, link or directory tree if it exists.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// How every directory under a project's home is opened: by the kernel,
/// beneath the home, with no magic links. A symlink (even one swapped in
/// while this runs) that leads out fails with `EXDEV`.
fn beneath() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

fn nix_err(rel: &str, what: &str, e: Errno) -> StorageError {
    match e {
        Errno::EXDEV | Errno::ELOOP => StorageError::PathEscape(rel.to_string()),
        e => StorageError::Io(format!("{rel}: {what}: {e}")),
    }
}

fn dot_if_empty(p: &Path) -> &Path {
    if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    }
}

/// Opens `parent` (relative, cleaned) beneath `home`, creating missing
/// directories (owned like the directory they are made in).
fn open_parent(home: &File, parent: &Path, rel: &str) -> Result<OwnedFd, StorageError> {
    match openat2(home, dot_if_empty(parent), beneath()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(nix_err(rel, "opening parent", e)),
    }
    let mut prefix = PathBuf::new();
    for c in parent.components() {
        let up = openat2(home, dot_if_empty(&prefix), beneath())
            .map_err(|e| nix_err(rel, "opening parent", e))?;
        prefix.push(c);
        match openat2(home, &prefix, beneath()) {
            Ok(_) => continue,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(nix_err(rel, "opening parent", e)),
        }
        match mkdirat(&up, c.as_os_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(nix_err(rel, "creating parent", e)),
        }
        if let Ok(st) = fstat(&up) {
            let _ = fchownat(
                &up,
                c.as_os_str(),
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
    }
    openat2(home, dot_if_empty(parent), beneath()).map_err(|e| nix_err(rel, "opening parent", e))
}

/// Restores `rel` from the snapshot tree `snap` into `home`: the old entry
/// (if any) is replaced only once the copy is complete.
///
/// Safe against a running project racing the restore: the destination's
/// parent is opened by the kernel beneath the home (`openat2` with
/// `RESOLVE_BENEATH`), the copy lands in a root-only (0700) staging
/// directory reached through its file descriptor, and the final moves are
/// `renameat` calls relative to those descriptors. The snapshot side is
/// immutable and checked with [`resolve_inside`].
pub(crate) async fn restore_path(
    project: ProjectId,
    home: &Path,
    snap: &Path,
    snapshot_name: &str,
    rel: &str,
) -> Result<(), StorageError> {
    let clean = clean_relative(rel)?;
    let src = resolve_inside(snap, &clean, rel)?;
    if std::fs::symlink_metadata(&src).is_err() {
        return Err(StorageError::Io(format!(
            "{rel}: not in snapshot {snapshot_name} of project {project}"
        )));
    }
    let name = clean
        .file_name()
        .ok_or_else(|| StorageError::PathEscape(rel.to_string()))?
        .to_os_string();
    let home_fd = File::open(home).map_err(|e| io_err(home, e))?;
    let parent_fd = open_parent(&home_fd, clean.parent().unwrap_or(Path::new("")), rel)?;

    let stage = unique("restore");
    mkdirat(&parent_fd, stage.as_str(), Mode::from_bits_truncate(0o700))
        .map_err(|e| nix_err(rel, "creating staging directory", e))?;
    let stage_fd = openat(
        &parent_fd,
        stage.as_str(),
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| nix_err(rel, "opening staging directory", e))?;
    let st = fstat(&stage_fd).map_err(|e| nix_err(rel, "staging directory", e))?;
    if st.st_uid != geteuid().as_raw() || st.st_mode & 0o777 != 0o700 {
        return Err(StorageError::PathEscape(rel.to_string()));
    }
    let stage_path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        stage_fd.as_raw_fd()
    ));
    let result = async {
        copy_tree(project, &src, &stage_path.join("item")).await?;
        let had_old = match renameat(&parent_fd, name.as_os_str(), &stage_fd, "old") {
            Ok(()) => true,
            Err(Errno::ENOENT) => false,
            Err(e) => return Err(nix_err(rel, "moving the old entry aside", e)),
        };
        if let Err(e) = renameat(&stage_fd, "item", &parent_fd, name.as_os_str()) {
            if had_old {
                let _ = renameat(&stage_fd, "old", &parent_fd, name.as_os_str());
            }
            return Err(nix_err(rel, "putting the restored entry in place", e));
        }
        Ok(())
    }
    .await;
    let _ = remove_any(&stage_path.join("item"));
    let _ = remove_any(&stage_path.join("old"));
    let _ = unlinkat(&parent_fd, stage.as_str(), UnlinkatFlags::RemoveDir);
    result
}
