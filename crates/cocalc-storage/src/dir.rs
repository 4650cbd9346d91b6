//! [`DirStorage`]: the [`Storage`] contract on plain directories, for
//! development machines and tests on any filesystem.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use cocalc_core::{
    ByteStream, ProjectId, SharedClock, SnapshotInfo, Storage, StorageError, Timestamp, Usage,
    VolumeInfo,
};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::common::{
    blocking, copy_tree, importable, io_err, remove_any, restore_path, unique, Layout,
};
use crate::locks::ProjectLocks;
use crate::names::{parse_snapshot_name, snapshot_name};
use crate::stream::ChannelStream;

/// Name of the last entry of every [`DirStorage`] stream; its content is the
/// snapshot name. A stream without it was cut.
const END_MARKER: &str = ".cocalc-stream-end";

/// Projects as plain directories under one root.
///
/// * Layout as on a Btrfs pool: `project-<uuid>/` (home),
///   `scratch/project-<uuid>/`, `snapshots/project-<uuid>/<UTC time>/`.
/// * Snapshots are copies (`cp -a --reflink=auto`: shared extents where the
///   filesystem offers reflinks, full copies elsewhere). They are not
///   enforced read-only. "Changed since the last snapshot" compares a
///   fingerprint of names, types, sizes, modes, link targets and file
///   modification times.
/// * [`send`](Storage::send) produces a tar stream (always complete: a
///   `parent` is accepted and ignored), ending with an end-marker entry that
///   [`receive`](Storage::receive) requires.
/// * Quotas are [`StorageError::Unsupported`]; usage sums file sizes.
#[derive(Debug)]
pub struct DirStorage {
    layout: Layout,
    clock: SharedClock,
    locks: ProjectLocks,
}

impl DirStorage {
    /// Storage under `root`, which is created if missing. Snapshot names
    /// come from `clock`.
    pub fn new(root: impl Into<PathBuf>, clock: SharedClock) -> Result<Self, StorageError> {
        let layout = Layout::new(root.into());
        std::fs::create_dir_all(&layout.root).map_err(|e| io_err(&layout.root, e))?;
        layout.create_dirs().map_err(|e| io_err(&layout.root, e))?;
        Ok(DirStorage {
            layout,
            clock,
            locks: ProjectLocks::default(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// Empties the project's scratch directory (its `/tmp`), as a cold start does.
    pub async fn reset_scratch(&self, project: ProjectId) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let s = self.layout.scratch(project);
        blocking(move || {
            remove_any(&s).map_err(|e| io_err(&s, e))?;
            std::fs::create_dir_all(&s).map_err(|e| io_err(&s, e))
        })
        .await
    }

    /// Copies project `from` (its home now, or snapshot `snapshot`) to a new
    /// project `to`; [`StorageError::AlreadyExists`] if `to` exists.
    pub async fn clone_project(
        &self,
        from: ProjectId,
        to: ProjectId,
        snapshot: Option<&str>,
    ) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock_two(from, to).await;
        self.require(from)?;
        let dst = self.layout.home(to);
        if dst.exists() {
            return Err(StorageError::AlreadyExists(format!("project {to}")));
        }
        let src = match snapshot {
            Some(name) => self.existing_snapshot(from, name)?,
            None => self.layout.home(from),
        };
        let tmp = self.layout.trash().join(unique("clone"));
        if let Err(e) = copy_tree(to, &src, &tmp).await {
            let _ = remove_any(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dst).map_err(|e| io_err(&dst, e))?;
        self.make_aux(to)?;
        Ok(self.layout.volume_info(to))
    }

    fn require(&self, project: ProjectId) -> Result<(), StorageError> {
        if self.layout.home(project).is_dir() {
            Ok(())
        } else {
            Err(StorageError::NotFound(project))
        }
    }

    fn make_aux(&self, project: ProjectId) -> Result<(), StorageError> {
        for d in [self.layout.scratch(project), self.layout.snapdir(project)] {
            std::fs::create_dir_all(&d).map_err(|e| io_err(&d, e))?;
        }
        Ok(())
    }

    fn existing_snapshot(&self, project: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        let p = self.layout.snapshot(project, name)?;
        if p.is_dir() {
            Ok(p)
        } else {
            Err(StorageError::SnapshotNotFound {
                project,
                name: name.to_string(),
            })
        }
    }

    fn next_name(&self, project: ProjectId) -> Result<(String, Timestamp), StorageError> {
        let mut t = self.clock.now();
        if let Some(last) = self.layout.snapshot_names(project)?.last() {
            if let Some(lt) = parse_snapshot_name(last) {
                if lt >= t {
                    t = Timestamp(lt.as_millis() + 1);
                }
            }
        }
        Ok((snapshot_name(t), t))
    }
}

/// A fingerprint of a tree's visible state (not directory times).
fn fingerprint(root: &Path) -> io::Result<u64> {
    fn walk(dir: &Path, rel: &Path, h: &mut DefaultHasher) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let m = e.metadata()?;
            let r = rel.join(e.file_name());
            r.hash(h);
            m.mode().hash(h);
            if m.is_dir() {
                walk(&e.path(), &r, h)?;
            } else {
                m.len().hash(h);
                m.mtime().hash(h);
                m.mtime_nsec().hash(h);
                if m.file_type().is_symlink() {
                    std::fs::read_link(e.path())?.hash(h);
                }
            }
        }
        Ok(())
    }
    let mut h = DefaultHasher::new();
    walk(root, Path::new(""), &mut h)?;
    Ok(h.finish())
}

fn tree_bytes(root: &Path) -> io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            tree_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

/// A `Write` that sends what it gets as chunks of a [`ByteStream`].
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= crate::stream::CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut self.buf));
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "receiver gone"))?;
        }
        Ok(())
    }
}

fn write_tar(snap: &Path, name: &str, w: ChannelWriter) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.append_dir_all(name, snap)?;
    let mut h = tar::Header::new_gnu();
    h.set_size(name.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, END_MARKER, name.as_bytes())?;
    let mut w = b.into_inner()?;
    w.flush()
}

/// Unpacks a stream into `staging`; returns the snapshot name it carried.
fn read_tar(r: impl Read, staging: &Path) -> Result<String, String> {
    let mut a = tar::Archive::new(Counting(r, 0));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    let mut name: Option<String> = None;
    let mut expected_total = 0u64;
    for entry in a.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if name.is_some() {
            return Err("data after the end marker".into());
        }
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path == Path::new(END_MARKER) {
            let mut s = String::new();
            entry.read_to_string(&mut s).map_err(|e| e.to_string())?;
            if parse_snapshot_name(&s).is_none() {
                return Err(format!("bad snapshot name in stream: {s:?}"));
            }
            // Marker header, its padded content, then the two zero blocks
            // that end every archive: a stream one byte short is cut.
            expected_total =
                entry.raw_header_position() + 512 + (s.len() as u64).div_ceil(512) * 512 + 1024;
            name = Some(s);
            continue;
        }
        if !entry.unpack_in(staging).map_err(|e| e.to_string())? {
            return Err(format!("entry leaves the snapshot: {}", path.display()));
        }
    }
    let name = name.ok_or_else(|| "stream ended before its end marker".to_string())?;
    // A stream that fails after the archive is still a cut stream.
    let mut rest = a.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| e.to_string())?;
    if rest.1 != expected_total {
        return Err(format!(
            "stream is {} bytes, its archive needs {expected_total}",
            rest.1
        ));
    }
    Ok(name)
}

/// A reader that counts what passed through it.
struct Counting<R>(R, u64);

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}

#[async_trait]
impl Storage for DirStorage {
    async fn create(&self, project: ProjectId) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        let home = self.layout.home(project);
        if !home.is_dir() {
            std::fs::create_dir_all(&home).map_err(|e| io_err(&home, e))?;
        }
        self.make_aux(project)?;
        Ok(self.layout.volume_info(project))
    }

    async fn volume(&self, project: ProjectId) -> Result<VolumeInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        Ok(self.layout.volume_info(project))
    }

    async fn delete(&self, project: ProjectId) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        let paths = [
            self.layout.home(project),
            self.layout.scratch(project),
            self.layout.snapdir(project),
        ];
        blocking(move || {
            for p in paths {
                remove_any(&p).map_err(|e| io_err(&p, e))?;
            }
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ProjectId>, StorageError> {
        self.layout.list()
    }

    async fn usage(&self, project: ProjectId) -> Result<Usage, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let home = self.layout.home(project);
        let scratch = self.layout.scratch(project);
        let bytes = blocking(move || {
            let a = tree_bytes(&home).map_err(|e| io_err(&home, e))?;
            let b = tree_bytes(&scratch).unwrap_or(0);
            Ok(a + b)
        })
        .await?;
        Ok(Usage {
            referenced_bytes: bytes,
            exclusive_bytes: bytes,
        })
    }

    async fn snapshot(&self, project: ProjectId) -> Result<Option<SnapshotInfo>, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let home = self.layout.home(project);
        if let Some(last) = self.layout.snapshot_names(project)?.last() {
            let last = self.layout.snapdir(project).join(last);
            let h = home.clone();
            let same = blocking(move || {
                let a = fingerprint(&h).map_err(|e| io_err(&h, e))?;
                let b = fingerprint(&last).map_err(|e| io_err(&last, e))?;
                Ok(a == b)
            })
            .await?;
            if same {
                return Ok(None);
            }
        }
        let (name, t) = self.next_name(project)?;
        let dir = self.layout.snapdir(project);
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let tmp = dir.join(unique("snapshot"));
        if let Err(e) = copy_tree(project, &home, &tmp).await {
            let _ = remove_any(&tmp);
            return Err(e);
        }
        let dst = dir.join(&name);
        std::fs::rename(&tmp, &dst).map_err(|e| io_err(&dst, e))?;
        Ok(Some(SnapshotInfo::new(name, t, None)))
    }

    async fn snapshots(&self, project: ProjectId) -> Result<Vec<SnapshotInfo>, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        Ok(self
            .layout
            .snapshot_names(project)?
            .into_iter()
            .filter_map(|n| parse_snapshot_name(&n).map(|t| SnapshotInfo::new(n, t, None)))
            .collect())
    }

    async fn delete_snapshot(&self, project: ProjectId, name: &str) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let p = self.existing_snapshot(project, name)?;
        blocking(move || std::fs::remove_dir_all(&p).map_err(|e| io_err(&p, e))).await
    }

    async fn restore(
        &self,
        project: ProjectId,
        snapshot: &str,
        path: Option<&str>,
    ) -> Result<(), StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let snap = self.existing_snapshot(project, snapshot)?;
        let home = self.layout.home(project);
        match path {
            Some(rel) => restore_path(project, &home, &snap, snapshot, rel).await,
            None => {
                let tmp = self.layout.trash().join(unique("restore"));
                if let Err(e) = copy_tree(project, &snap, &tmp).await {
                    let _ = remove_any(&tmp);
                    return Err(e);
                }
                let old = self.layout.trash().join(unique("old-home"));
                std::fs::rename(&home, &old).map_err(|e| io_err(&home, e))?;
                if let Err(e) = std::fs::rename(&tmp, &home) {
                    let _ = std::fs::rename(&old, &home);
                    return Err(io_err(&home, e));
                }
                blocking(move || remove_any(&old).map_err(|e| io_err(&old, e))).await
            }
        }
    }

    async fn snapshot_tree(&self, project: ProjectId, name: &str) -> Result<PathBuf, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        self.existing_snapshot(project, name)
    }

    async fn import_snapshot(
        &self,
        project: ProjectId,
        name: &str,
        tree: &Path,
    ) -> Result<SnapshotInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        importable(&self.layout, project, name, tree)?;
        let staging = self.layout.incoming().join(unique("import"));
        std::fs::create_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
        let result = match copy_tree(project, tree, &staging.join(name)).await {
            Ok(()) => self.adopt(project, &staging, name.to_string()).await,
            Err(e) => Err(e),
        };
        let _ = blocking(move || remove_any(&staging).map_err(|e| io_err(&staging, e))).await;
        result
    }

    async fn send(
        &self,
        project: ProjectId,
        snapshot: &str,
        _parent: Option<&str>,
    ) -> Result<ByteStream, StorageError> {
        let _g = self.locks.lock(project).await;
        self.require(project)?;
        let snap = self.existing_snapshot(project, snapshot)?;
        let name = snapshot.to_string();
        let (tx, rx) = mpsc::channel(8);
        let err_tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(crate::stream::CHUNK),
            };
            if let Err(e) = write_tar(&snap, &name, w) {
                let _ = err_tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(ChannelStream(rx)))
    }

    async fn receive(
        &self,
        project: ProjectId,
        stream: ByteStream,
    ) -> Result<SnapshotInfo, StorageError> {
        let _g = self.locks.lock(project).await;
        let staging = self.layout.incoming().join(unique("receive"));
        std::fs::create_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
        let reader = SyncIoBridge::new(StreamReader::new(stream));
        let st = staging.clone();
        let unpacked = tokio::task::spawn_blocking(move || read_tar(reader, &st))
            .await
            .map_err(crate::common::join_err)?;
        let result = match unpacked {
            Err(msg) => Err(StorageError::StreamIncomplete(format!(
                "{msg}; nothing was kept"
            ))),
            Ok(name) => self.adopt(project, &staging, name).await,
        };
        let _ = remove_any(&staging);
        result
    }
}

impl DirStorage {
    async fn adopt(
        &self,
        project: ProjectId,
        staging: &Path,
        name: String,
    ) -> Result<SnapshotInfo, StorageError> {
        let t = parse_snapshot_name(&name)
            .ok_or_else(|| StorageError::StreamIncomplete(format!("bad snapshot name {name}")))?;
        let src = staging.join(&name);
        if !src.is_dir() {
            std::fs::create_dir_all(&src).map_err(|e| io_err(&src, e))?;
        }
        let dir = self.layout.snapdir(project);
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let dst = dir.join(&name);
        if dst.exists() {
            return Err(StorageError::AlreadyExists(format!(
                "snapshot {name} of project {project}"
            )));
        }
        std::fs::rename(&src, &dst).map_err(|e| io_err(&dst, e))?;
        let home = self.layout.home(project);
        if !home.exists() {
            let tmp = self.layout.trash().join(unique("home"));
            if let Err(e) = copy_tree(project, &dst, &tmp).await {
                let _ = remove_any(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, &home).map_err(|e| io_err(&home, e))?;
            self.make_aux(project)?;
        }
        Ok(SnapshotInfo::new(name, t, None))
    }
}
