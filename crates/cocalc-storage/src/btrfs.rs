//! [`BtrfsStorage`]: one Btrfs subvolume per project on a pool this host owns.
//!
//! * Subvolumes and snapshots are made, inspected and deleted through
//!   `libbtrfsutil`; quota groups through the ioctls in
//!   `cocalc-btrfs-ioctl`; usage and limits are read from
//!   `/sys/fs/btrfs/<uuid>/qgroups`. No CLI output is parsed.
//! * Each project has a level-1 quota group `1/<id>` (stored in
//!   `meta/project-<uuid>`) holding its home and scratch subvolumes; the
//!   quota is that group's referenced-bytes limit. Under simple quotas, a
//!   subvolume a user creates inside the home joins the group by itself, so
//!   it cannot escape the quota.
//! * Snapshots are read-only subvolumes named by UTC time; one is taken only
//!   when the home's generation moved past the newest snapshot's creation
//!   transaction.
//! * Send and receive run `btrfs send` / `btrfs receive` with piped stdio:
//!   neither libbtrfsutil nor an ioctl wrapper offers them (the send ioctl
//!   writes to a pipe fd and receive is a userspace replay of the stream).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cocalc_btrfs_ioctl::{qgroup_assign, qgroup_create, qgroup_destroy, qgroup_limit, NO_LIMIT};
use cocalc_core::{
    ByteStream, ProjectId, Quota, SharedClock, SnapshotInfo, Storage, StorageError, Timestamp,
    Usage, VolumeInfo,
};
use libbtrfsutil::{
    CreateSnapshotOptions, CreateSubvolumeOptions, DeleteSubvolumeOptions, QgroupInherit,
};
use tokio::process::Command;

use crate::common::{blocking, copy_tree, importable, io_err, restore_path, unique, Layout};
use crate::locks::ProjectLocks;
use crate::names::{parse_snapshot_name, snapshot_name};
use crate::pool::{init_pool, PoolInfo, QuotaMode, QuotaPreference};
use crate::stream::{command_stream, feed_command, FeedError, SendStreamCheck};

/// How a [`BtrfsStorage`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BtrfsConfig {
    /// Quota given to every new project; `None`: no limit.
    pub default_quota: Option<u64>,
    /// Quota accounting to enable if the filesystem has none yet.
    pub quota: QuotaPreference,
}

impl BtrfsConfig {
    /// This config with `bytes` as the quota of new projects.
    pub fn with_default_quota(mut self, bytes: Option<u64>) -> Self {
        self.default_quota = bytes;
        self
    }

    /// This config with another quota preference.
    pub fn with_quota_preference(mut self, pref: QuotaPreference) -> Self {
        self.quota = pref;
        self
    }
}

/// Projects as Btrfs subvolumes in a pool directory.
///
/// * Subvolumes and snapshots are made, inspected and deleted through
///   `libbtrfsutil`; quota groups through the ioctls in
///   `cocalc-btrfs-ioctl`; usage and limits are read from
///   `/sys/fs/btrfs/<uuid>/qgroups`. No CLI output is parsed.
/// * Each project has a level-1 quota group `1/<id>` holding its home and
///   scratch subvolumes; the quota is that group's referenced-bytes limit.
///   Under simple quotas ([`QuotaMode::Simple`]), a subvolume a user creates
///   inside the home joins the group by itself, so it cannot escape the
///   quota; under classic qgroups it would.
/// * Snapshots are read-only subvolumes named by UTC time (from the
///   injected clock); one is taken only when the home's generation moved
///   past the creation transaction of its newest snapshot. Mount pools with
///   `noatime`, or reading files counts as a change.
/// * Send and receive run `btrfs send` / `btrfs receive` with piped stdio
///   (no library call exists for either); the receiving side checks the
///   stream's framing itself and deletes anything a failed receive left.
/// * Calls on one project are serialised by a per-project async lock;
///   blocking work runs on tokio's blocking pool.
#[derive(Debug)]
pub struct BtrfsStorage {
    inner: Arc<Inner>,
    clock: SharedClock,
    locks: ProjectLocks,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    pool: PoolInfo,
    default_quota: Option<u64>,
}

fn lib_err(what: &Path, e: libbtrfsutil::Error) -> StorageError {
    StorageError::Io(format!("{}: {e}", what.display()))
}

fn level1(id: u64) -> u64 {
    (1 << 48) | id
}

fn qgroup_dir(sysfs: &Path, qgroupid: u64) -> PathBuf {
    sysfs
        .join("qgroups")
        .join(format!("{}_{}", qgroupid >> 48, qgroupid & ((1 << 48) - 1)))
}

fn read_u64(path: &Path) -> Result<u64, StorageError> {
    let s = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    s.trim()
        .parse()
        .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))
}

fn is_subvol(path: &Path) -> bool {
    path.exists() && libbtrfsutil::is_subvolume(path).unwrap_or(false)
}

impl Inner {
    fn pool_fd(&self) -> Result<File, StorageError> {
        File::open(&self.layout.root).map_err(|e| io_err(&self.layout.root, e))
    }

    fn require(&self, p: ProjectId) -> Result<PathBuf, StorageError> {
        let home = self.layout.home(p);
        if is_subvol(&home) {
            Ok(home)
        } else {
            Err(StorageError::NotFound(p))
        }
    }

    fn snapshot_path(&self, p: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        let path = self.layout.snapshot(p, name)?;
        if is_subvol(&path) {
            Ok(path)
        } else {
            Err(StorageError::SnapshotNotFound {
                project: p,
                name: name.to_string(),
            })
        }
    }

    /// The project's level-1 quota group, if it has one.
    fn group(&self, p: ProjectId) -> Result<Option<u64>, StorageError> {
        let meta = self.layout.meta(p);
        match std::fs::read_to_string(&meta) {
            Ok(s) => s
                .trim()
                .strip_prefix("qgroup=")
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| StorageError::Io(format!("{}: malformed", meta.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&meta, e)),
        }
    }

    /// The project's quota group, created (with home and scratch as
    /// members) if it has none.
    fn ensure_group(&self, p: ProjectId) -> Result<u64, StorageError> {
        if let Some(g) = self.group(p)? {
            return Ok(g);
        }
        let home = self.layout.home(p);
        let id = libbtrfsutil::subvolume_id(&home).map_err(|e| lib_err(&home, e))?;
        let g = level1(id);
        let fd = self.pool_fd()?;
        match qgroup_create(&fd, g) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(StorageError::Io(format!("creating qgroup for {p}: {e}"))),
        }
        qgroup_assign(&fd, id, g)
            .map_err(|e| StorageError::Io(format!("assigning {p}'s home to its qgroup: {e}")))?;
        let scratch = self.layout.scratch(p);
        if is_subvol(&scratch) {
            let sid = libbtrfsutil::subvolume_id(&scratch).map_err(|e| lib_err(&scratch, e))?;
            let _ = qgroup_assign(&fd, sid, g);
        }
        let meta = self.layout.meta(p);
        let tmp = meta.with_extension("tmp");
        std::fs::write(&tmp, format!("qgroup={g}\n")).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &meta).map_err(|e| io_err(&meta, e))?;
        Ok(g)
    }

    fn inherit(g: u64, what: &Path) -> Result<QgroupInherit, StorageError> {
        let mut q = QgroupInherit::new().map_err(|e| lib_err(what, e))?;
        q.add_group(g).map_err(|e| lib_err(what, e))?;
        Ok(q)
    }

    fn make_scratch(&self, p: ProjectId, g: u64) -> Result<(), StorageError> {
        let scratch = self.layout.scratch(p);
        if is_subvol(&scratch) {
            return Ok(());
        }
        CreateSubvolumeOptions::new()
            .qgroup(Some(Self::inherit(g, &scratch)?))
            .create(&scratch)
            .map_err(|e| lib_err(&scratch, e))
    }

    fn set_limit(&self, g: u64, bytes: Option<u64>) -> Result<(), StorageError> {
        let fd = self.pool_fd()?;
        qgroup_limit(&fd, g, bytes.unwrap_or(NO_LIMIT))
            .map_err(|e| StorageError::Io(format!("setting qgroup limit: {e}")))
    }

    fn limit(&self, g: u64) -> Result<Option<u64>, StorageError> {
        let dir = qgroup_dir(&self.pool.sysfs, g);
        let flags = read_u64(&dir.join("limit_flags"))?;
        if flags & 1 == 0 {
            return Ok(None);
        }
        let max = read_u64(&dir.join("max_referenced"))?;
        Ok((max != NO_LIMIT).then_some(max))
    }

    /// Home exists: give it scratch, snapshot dir, quota group and `limit`.
    /// On failure, everything made here and the home itself are removed.
    fn finish_volume(&self, p: ProjectId, limit: Option<u64>) -> Result<(), StorageError> {
        let r = (|| {
            let g = self.ensure_group(p)?;
            self.make_scratch(p, g)?;
            let dir = self.layout.snapdir(p);
            std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            if limit.is_some() {
                self.set_limit(g, limit)?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.delete_volume(p, false);
        }
        r
    }

    fn delete_subvol(path: &Path) -> Result<(), StorageError> {
        if !is_subvol(path) {
            return Ok(());
        }
        DeleteSubvolumeOptions::new()
            .recursive(true)
            .delete(path)
            .map_err(|e| lib_err(path, e))
    }

    /// Deletes home and scratch (and with `snapshots`, every snapshot).
    /// Best effort: reports the first failure.
    fn delete_volume(&self, p: ProjectId, snapshots: bool) -> Option<StorageError> {
        // Deleting needs a little metadata reservation, which a project at
        // its quota would be refused: lift the limit first.
        if let Ok(Some(g)) = self.group(p) {
            let _ = self.set_limit(g, None);
        }
        let mut first = None;
        let mut note = |r: Result<(), StorageError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if snapshots {
            let dir = self.layout.snapdir(p);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    note(Self::delete_subvol(&e.path()));
                }
            }
            if dir.exists() {
                note(std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e)));
            }
        }
        note(Self::delete_subvol(&self.layout.home(p)));
        note(Self::delete_subvol(&self.layout.scratch(p)));
        if first.is_some() {
            // Keep the quota group and its record for the retry.
            return first;
        }
        if let Ok(Some(g)) = self.group(p) {
            // Fails while the cleaner still holds the group's extents; an
            // empty level-1 group left behind costs nothing.
            if let Ok(fd) = self.pool_fd() {
                let _ = qgroup_destroy(&fd, g);
            }
        }
        let meta = self.layout.meta(p);
        if meta.exists() {
            if let Err(e) = std::fs::remove_file(&meta) {
                first = Some(io_err(&meta, e));
            }
        }
        first
    }

    fn snapshot_infos(&self, p: ProjectId) -> Result<Vec<SnapshotInfo>, StorageError> {
        let dir = self.layout.snapdir(p);
        let mut out = Vec::new();
        for name in self.layout.snapshot_names(p)? {
            let Some(t) = parse_snapshot_name(&name) else {
                continue;
            };
            let path = dir.join(&name);
            let excl = libbtrfsutil::subvolume_id(&path)
                .ok()
                .and_then(|id| read_u64(&qgroup_dir(&self.pool.sysfs, id).join("exclusive")).ok());
            out.push(SnapshotInfo::new(name, t, excl));
        }
        Ok(out)
    }
}

impl BtrfsStorage {
    /// Opens (and if needed initialises, see [`init_pool`]) the pool at
    /// `pool`, which must be on Btrfs. Snapshot names come from `clock`.
    pub async fn open(
        pool: impl Into<PathBuf>,
        config: BtrfsConfig,
        clock: SharedClock,
    ) -> Result<Self, StorageError> {
        let pool = pool.into();
        let pref = config.quota;
        let info = blocking(move || init_pool(&pool, pref).map_err(StorageError::from)).await?;
        Ok(BtrfsStorage {
            inner: Arc::new(Inner {
                layout: Layout::new(info.path.clone()),
                pool: info,
                default_quota: config.default_quota,
            }),
            clock,
            locks: ProjectLocks::default(),
        })
    }

    /// The quota accounting in force on this pool.
    pub fn quota_mode(&self) -> QuotaMode {
        self.inner.pool.quota_mode
    }

    /// The pool directory.
    pub fn pool(&self) -> &Path {
        &self.inner.layout.root
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        blocking(move || f(&inner)).await
    }

    /// Replaces the project's scratch subvolume (its `/tmp`) by an empty
    /// one, as a cold start does. Call it while the project is stopped.
    pub async fn reset_scratch(&self, project: ProjectId) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            let g = i.ensure_group(project)?;
            Inner::delete_subvol(&i.layout.scratch(project))?;
            i.make_scratch(project, g)
        })
        .await
    }

    /// A new project `to` whose home is a writable snapshot of `from`'s
    /// home (now) or of its snapshot `snapshot`, with `from`'s quota.
    /// [`StorageError::AlreadyExists`] if `to` exists.
    pub async fn clone_project(
        &self,
        from: ProjectId,
        to: ProjectId,
        snapshot: Option<&str>,
    ) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock_two(from, to).await;
        let snapshot = snapshot.map(str::to_string);
        self.run(move |i| {
            let home = i.require(from)?;
            let dst = i.layout.home(to);
            if dst.exists() {
                return Err(StorageError::AlreadyExists(format!("project {to}")));
            }
            let src = match &snapshot {
                Some(name) => i.snapshot_path(from, name)?,
                None => home,
            };
            let limit = match i.group(from)? {
                Some(g) => i.limit(g)?,
                None => i.default_quota,
            };
            CreateSnapshotOptions::new()
                .create(&src, &dst)
                .map_err(|e| lib_err(&dst, e))?;
            i.finish_volume(to, limit)?;
            Ok(i.layout.volume_info(to))
        })
        .await
    }
}

#[async_trait]
impl Storage for BtrfsStorage {
    async fn create(&self, project: ProjectId) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            let home = i.layout.home(project);
            if is_subvol(&home) {
                return Ok(i.layout.volume_info(project));
            }
            if home.exists() {
                return Err(StorageError::AlreadyExists(format!(
                    "{} exists and is not a subvolume",
                    home.display()
                )));
            }
            CreateSubvolumeOptions::new()
                .create(&home)
                .map_err(|e| lib_err(&home, e))?;
            i.finish_volume(project, i.default_quota)?;
            Ok(i.layout.volume_info(project))
        })
        .await
    }

    async fn volume(&self, project: ProjectId) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            Ok(i.layout.volume_info(project))
        })
        .await
    }

    async fn delete(&self, project: ProjectId) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| match i.delete_volume(project, true) {
            None => Ok(()),
            Some(e) => Err(e),
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ProjectId>, StorageError> {
        self.run(|i| i.layout.list()).await
    }

    async fn set_quota(&self, project: ProjectId, quota: Quota) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            let g = i.ensure_group(project)?;
            i.set_limit(g, quota.max_bytes)
        })
        .await
    }

    async fn quota(&self, project: ProjectId) -> Result<Quota, StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            let max_bytes = match i.group(project)? {
                Some(g) => i.limit(g)?,
                None => None,
            };
            Ok(Quota { max_bytes })
        })
        .await
    }

    async fn usage(&self, project: ProjectId) -> Result<Usage, StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            let g = i.ensure_group(project)?;
            // Quota numbers are updated when a transaction commits.
            libbtrfsutil::sync(&i.layout.root).map_err(|e| lib_err(&i.layout.root, e))?;
            let dir = qgroup_dir(&i.pool.sysfs, g);
            Ok(Usage {
                referenced_bytes: read_u64(&dir.join("referenced"))?,
                exclusive_bytes: read_u64(&dir.join("exclusive"))?,
            })
        })
        .await
    }

    async fn snapshot(&self, project: ProjectId) -> Result<Option<SnapshotInfo>, StorageError> {
        let _g = self.locks.lock(project).await;
        let now = self.clock.now();
        self.run(move |i| {
            let home = i.require(project)?;
            let names = i.layout.snapshot_names(project)?;
            let mut t = now;
            if let Some(last) = names.last() {
                let path = i.layout.snapdir(project).join(last);
                // The root item's generation is written at commit: commit
                // first so that writes not yet on disk count as changes.
                libbtrfsutil::sync(&home).map_err(|e| lib_err(&home, e))?;
                let snap = libbtrfsutil::subvolume_info(&path).map_err(|e| lib_err(&path, e))?;
                let cur = libbtrfsutil::subvolume_info(&home).map_err(|e| lib_err(&home, e))?;
                // Taking a snapshot leaves the source's generation equal to
                // the snapshot's creation transaction; any write moves it.
                // That holds only for a snapshot of *this* home: after a
                // receive or a whole restore, the newest snapshot may come
                // from elsewhere, and then the home counts as changed.
                let of_this_home = snap.parent_uuid() == Some(cur.uuid());
                if of_this_home && cur.generation() <= snap.otransid() {
                    return Ok(None);
                }
                if let Some(lt) = parse_snapshot_name(last) {
                    if lt >= t {
                        t = Timestamp(lt.as_millis() + 1);
                    }
                }
            }
            let name = snapshot_name(t);
            let dir = i.layout.snapdir(project);
            std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            let dst = dir.join(&name);
            CreateSnapshotOptions::new()
                .readonly(true)
                .create(&home, &dst)
                .map_err(|e| lib_err(&dst, e))?;
            let excl = libbtrfsutil::subvolume_id(&dst)
                .ok()
                .and_then(|id| read_u64(&qgroup_dir(&i.pool.sysfs, id).join("exclusive")).ok());
            Ok(Some(SnapshotInfo::new(name, t, excl)))
        })
        .await
    }

    async fn snapshots(&self, project: ProjectId) -> Result<Vec<SnapshotInfo>, StorageError> {
        let _g = self.locks.lock(project).await;
        self.run(move |i| {
            i.require(project)?;
            i.snapshot_infos(project)
        })
        .await
    }

    async fn delete_snapshot(&self, project: ProjectId, name: &str) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        let name = name.to_string();
        self.run(move |i| {
            i.require(project)?;
            let path = i.snapshot_path(project, &name)?;
            libbtrfsutil::delete_subvolume(&path).map_err(|e| lib_err(&path, e))
        })
        .await
    }

    async fn restore(
        &self,
        project: ProjectId,
        snapshot: &str,
        path: Option<&str>,
    ) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        let name = snapshot.to_string();
        let (home, snap) = self
            .run({
                let name = name.clone();
                move |i| Ok((i.require(project)?, i.snapshot_path(project, &name)?))
            })
            .await?;
        if let Some(rel) = path {
            return restore_path(project, &home, &snap, &name, rel).await;
        }
        self.run(move |i| {
            let g = i.ensure_group(project)?;
            let fresh = i.layout.trash().join(unique("restore"));
            CreateSnapshotOptions::new()
                .qgroup(Some(Inner::inherit(g, &fresh)?))
                .create(&snap, &fresh)
                .map_err(|e| lib_err(&fresh, e))?;
            let old = i.layout.trash().join(unique("old-home"));
            if let Err(e) = std::fs::rename(&home, &old) {
                let _ = Inner::delete_subvol(&fresh);
                return Err(io_err(&home, e));
            }
            if let Err(e) = std::fs::rename(&fresh, &home) {
                let _ = std::fs::rename(&old, &home);
                let _ = Inner::delete_subvol(&fresh);
                return Err(io_err(&home, e));
            }
            Inner::delete_subvol(&old)
        })
        .await
    }

    async fn snapshot_tree(&self, project: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        let _g = self.locks.lock(project).await;
        let name = name.to_string();
        self.run(move |i| {
            i.require(project)?;
            i.snapshot_path(project, &name)
        })
        .await
    }

    /// The tree is copied (with reflinks where it is on the same pool) into
    /// a new subvolume, which is made read-only and then moved into place.
    async fn import_snapshot(
        &self,
        project: ProjectId,
        name: &str,
        tree: &Path,
    ) -> Result<SnapshotInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        let dst = importable(&self.inner.layout, project, name, tree)?;
        let staging = self.inner.layout.incoming().join(unique("import"));
        blocking({
            let staging = staging.clone();
            move || libbtrfsutil::create_subvolume(&staging).map_err(|e| lib_err(&staging, e))
        })
        .await?;
        let copied = copy_tree(project, tree, &staging).await;
        let name = name.to_string();
        let t = parse_snapshot_name(&name).unwrap_or_default();
        let moved = match copied {
            Err(e) => Err(e),
            Ok(()) => {
                let staging = staging.clone();
                let dst = dst.clone();
                // Btrfs will not move a read-only subvolume to another
                // directory (its `..` would change): move it, then seal it.
                self.run(move |i| {
                    let dir = i.layout.snapdir(project);
                    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
                    std::fs::rename(&staging, &dst).map_err(|e| io_err(&dst, e))?;
                    libbtrfsutil::set_subvolume_read_only(&dst, true).map_err(|e| {
                        let _ = std::fs::rename(&dst, &staging);
                        lib_err(&dst, e)
                    })
                })
                .await
            }
        };
        if let Err(e) = moved {
            let _ = blocking(move || Inner::delete_subvol(&staging)).await;
            return Err(e);
        }
        let imported = dst.clone();
        let made = self
            .run(move |i| {
                let home = i.layout.home(project);
                if !home.exists() {
                    CreateSnapshotOptions::new()
                        .create(&dst, &home)
                        .map_err(|e| lib_err(&home, e))?;
                    i.finish_volume(project, i.default_quota)?;
                }
                let excl = libbtrfsutil::subvolume_id(&dst)
                    .ok()
                    .and_then(|id| read_u64(&qgroup_dir(&i.pool.sysfs, id).join("exclusive")).ok());
                Ok(SnapshotInfo::new(name, t, excl))
            })
            .await;
        if made.is_err() {
            let _ = blocking(move || Inner::delete_subvol(&imported)).await;
        }
        made
    }

    /// The stream is produced after this call returns, without holding the
    /// project's lock (a long first send of a move must not stop snapshots).
    /// The kernel refuses to delete a snapshot while it is being sent.
    /// Dropping the stream stops `btrfs send`.
    async fn send(
        &self,
        project: ProjectId,
        snapshot: &str,
        parent: Option<&str>,
    ) -> Result<ByteStream, StorageError> {
        let _g = self.locks.lock(project).await;
        let (snapshot, parent) = (snapshot.to_string(), parent.map(str::to_string));
        let (snap, parent) = self
            .run(move |i| {
                i.require(project)?;
                let snap = i.snapshot_path(project, &snapshot)?;
                let parent = match parent {
                    Some(p) => Some(i.snapshot_path(project, &p)?),
                    None => None,
                };
                Ok((snap, parent))
            })
            .await?;
        // No library call sends a subvolume: run `btrfs send` with piped stdout.
        let mut cmd = Command::new("btrfs");
        cmd.arg("send").arg("-q");
        if let Some(p) = &parent {
            cmd.arg("-p").arg(p);
        }
        cmd.arg(&snap);
        command_stream(cmd, "btrfs send").map_err(|e| StorageError::Io(format!("btrfs send: {e}")))
    }

    /// Receives into the project's snapshot directory. If the project has
    /// no volume here, its home becomes a writable snapshot of the received
    /// one (with the default quota); otherwise the home is left as it is
    /// and [`restore`](Storage::restore) adopts the received state (what a
    /// move does after its final incremental). A duplicate name is
    /// [`StorageError::AlreadyExists`]; a cut, corrupt or refused stream
    /// (e.g. an incremental whose parent is not here) is
    /// [`StorageError::StreamIncomplete`] after the partial subvolume was
    /// deleted.
    async fn receive(
        &self,
        project: ProjectId,
        stream: ByteStream,
    ) -> Result<SnapshotInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        let dir = self.inner.layout.snapdir(project);
        let before = {
            let dir = dir.clone();
            blocking(move || {
                std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
                entries(&dir)
            })
            .await?
        };
        // No library call receives a stream: run `btrfs receive` with piped
        // stdin, checking the framing ourselves (it accepts a cut stream that
        // stops between two commands).
        let mut cmd = Command::new("btrfs");
        cmd.arg("receive").arg(&dir);
        let mut check = SendStreamCheck::new();
        let fed = feed_command(cmd, stream, Some(&mut check), "btrfs receive").await;
        let after = {
            let dir = dir.clone();
            blocking(move || entries(&dir)).await?
        };
        let new: Vec<String> = after.into_iter().filter(|n| !before.contains(n)).collect();
        let cleanup = |new: Vec<String>, dir: PathBuf| {
            blocking(move || {
                for n in new {
                    let p = dir.join(n);
                    if is_subvol(&p) {
                        Inner::delete_subvol(&p)?;
                    } else {
                        crate::common::remove_any(&p).map_err(|e| io_err(&p, e))?;
                    }
                }
                Ok(())
            })
        };
        let fail = match fed {
            Err(FeedError::Spawn(e)) => Some(StorageError::Io(format!("btrfs receive: {e}"))),
            Err(FeedError::Incomplete(msg)) if msg.contains("File exists") => {
                Some(StorageError::AlreadyExists(format!(
                    "a snapshot of that name is already here: {msg}"
                )))
            }
            Err(FeedError::Incomplete(msg)) => Some(StorageError::StreamIncomplete(format!(
                "{msg}; the partial snapshot was removed"
            ))),
            Ok(()) if new.len() != 1 => Some(StorageError::StreamIncomplete(format!(
                "expected one received snapshot, found {new:?}; removed"
            ))),
            Ok(()) if parse_snapshot_name(&new[0]).is_none() => {
                Some(StorageError::StreamIncomplete(format!(
                    "received subvolume {:?} is not a snapshot name; removed",
                    new[0]
                )))
            }
            Ok(()) => None,
        };
        if let Some(e) = fail {
            cleanup(new, dir).await?;
            return Err(e);
        }
        let name = new[0].clone();
        let t = parse_snapshot_name(&name).unwrap_or_default();
        let r = self
            .run({
                let name = name.clone();
                move |i| {
                    let snap = dir.join(&name);
                    let ro =
                        libbtrfsutil::subvolume_read_only(&snap).map_err(|e| lib_err(&snap, e))?;
                    if !ro {
                        return Err(StorageError::StreamIncomplete(format!(
                            "{name} was not finished by btrfs receive"
                        )));
                    }
                    let home = i.layout.home(project);
                    if !home.exists() {
                        CreateSnapshotOptions::new()
                            .create(&snap, &home)
                            .map_err(|e| lib_err(&home, e))?;
                        i.finish_volume(project, i.default_quota)?;
                    }
                    let excl = libbtrfsutil::subvolume_id(&snap).ok().and_then(|id| {
                        read_u64(&qgroup_dir(&i.pool.sysfs, id).join("exclusive")).ok()
                    });
                    Ok(SnapshotInfo::new(name, t, excl))
                }
            })
            .await;
        if r.is_err() {
            cleanup(vec![name], self.inner.layout.snapdir(project)).await?;
        }
        r
    }
}

fn entries(dir: &Path) -> Result<Vec<String>, StorageError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        v.push(e.file_name().to_string_lossy().into_owned());
    }
    Ok(v)
}
