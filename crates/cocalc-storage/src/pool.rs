//! Pools: the Btrfs directory a host owns, and loop-file pools for
//! development and tests.
//!
//! * [`init_pool`] prepares a directory on an existing Btrfs mount: checks
//!   the filesystem type, creates the layout and turns quotas on (simple
//!   quotas where the kernel has them, classic qgroups otherwise).
//! * [`LoopPool`] makes a Btrfs filesystem in a sparse file, mounts it with
//!   `-o loop`, and unmounts and detaches it when dropped — also when a test
//!   fails or panics.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocalc_btrfs_ioctl::{quota_enable, QuotaEnableMode};
use cocalc_core::StorageError;

use crate::common::Layout;

/// Why setting up or tearing down a pool failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The path is not on a Btrfs filesystem.
    #[error("{0}: not on a Btrfs filesystem")]
    NotBtrfs(PathBuf),
    /// Loop pools need root.
    #[error("creating a loop-mounted pool needs root (running as uid {0})")]
    NotRoot(u32),
    /// A required program is not installed.
    #[error("{0} not found: install {1}")]
    MissingTool(&'static str, &'static str),
    /// A program failed; its stderr is in the message.
    #[error("{command} failed: {message}")]
    Command {
        /// What ran.
        command: String,
        /// Its error output.
        message: String,
    },
    /// Quotas could not be enabled.
    #[error("enabling Btrfs quotas on {path}: {message}")]
    Quota {
        /// The pool.
        path: PathBuf,
        /// The kernel's answer.
        message: String,
    },
    /// Another I/O failure.
    #[error("{0}")]
    Io(String),
}

impl From<PoolError> for StorageError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::NotBtrfs(_) | PoolError::MissingTool(..) | PoolError::NotRoot(_) => {
                StorageError::Unsupported("this pool needs root, Btrfs and btrfs-progs")
            }
            other => StorageError::Io(other.to_string()),
        }
    }
}

/// Which quota accounting a pool should use when quotas are still off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaPreference {
    /// Simple quotas if the kernel has them (`/sys/fs/btrfs/features/simple_quota`),
    /// classic qgroups otherwise.
    #[default]
    Auto,
    /// Simple quotas or fail.
    Simple,
    /// Classic qgroups.
    Classic,
}

/// Which quota accounting is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Simple quotas: charged to the subvolume that wrote the extent, cheap;
    /// subvolumes created inside a project join its quota group by themselves.
    Simple,
    /// Classic qgroups: full back-reference accounting. Subvolumes a user
    /// creates inside a project do *not* join its quota group in this mode.
    Classic,
}

/// A pool that [`init_pool`] prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    /// The pool directory.
    pub path: PathBuf,
    /// The quota mode now on.
    pub quota_mode: QuotaMode,
    /// `/sys/fs/btrfs/<fs uuid>`: where usage and limits are read.
    pub sysfs: PathBuf,
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn read_mode(sysfs: &Path) -> Option<QuotaMode> {
    let q = sysfs.join("qgroups");
    if !q.is_dir() {
        return None;
    }
    match std::fs::read_to_string(q.join("mode")) {
        Ok(m) if m.trim() == "squota" => Some(QuotaMode::Simple),
        _ => Some(QuotaMode::Classic),
    }
}

/// Prepares `path` (created if missing) on an existing Btrfs mount as a
/// pool and turns quotas on if they are off. Idempotent; a filesystem whose
/// quotas are already on keeps its mode.
pub fn init_pool(path: &Path, pref: QuotaPreference) -> Result<PoolInfo, PoolError> {
    let ioe = |e: io::Error| PoolError::Io(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(path).map_err(ioe)?;
    let st = nix::sys::statfs::statfs(path)
        .map_err(|e| PoolError::Io(format!("{}: {e}", path.display())))?;
    if st.filesystem_type() != nix::sys::statfs::BTRFS_SUPER_MAGIC {
        return Err(PoolError::NotBtrfs(path.to_path_buf()));
    }
    Layout::new(path.to_path_buf()).create_dirs().map_err(ioe)?;
    let fd = std::fs::File::open(path).map_err(ioe)?;
    let uuid = cocalc_btrfs_ioctl::fs_uuid(&fd).map_err(|e| PoolError::Quota {
        path: path.to_path_buf(),
        message: format!("reading the filesystem uuid: {e}"),
    })?;
    let sysfs = Path::new("/sys/fs/btrfs").join(uuid_string(&uuid));
    let quota_mode = match read_mode(&sysfs) {
        Some(m) => m,
        None => {
            let simple = Path::new("/sys/fs/btrfs/features/simple_quota").exists();
            let mode = match (pref, simple) {
                (QuotaPreference::Classic, _) | (QuotaPreference::Auto, false) => {
                    QuotaEnableMode::Classic
                }
                (QuotaPreference::Simple, false) => {
                    return Err(PoolError::Quota {
                        path: path.to_path_buf(),
                        message: "this kernel has no simple quotas".into(),
                    })
                }
                _ => QuotaEnableMode::Simple,
            };
            quota_enable(&fd, mode).map_err(|e| PoolError::Quota {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            read_mode(&sysfs).ok_or_else(|| PoolError::Quota {
                path: path.to_path_buf(),
                message: format!("{} shows no qgroups after enabling", sysfs.display()),
            })?
        }
    };
    Ok(PoolInfo {
        path: path.to_path_buf(),
        quota_mode,
        sysfs,
    })
}

fn run(cmd: &mut Command, tool: &'static str, package: &'static str) -> Result<(), PoolError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            PoolError::MissingTool(tool, package)
        } else {
            PoolError::Io(format!("{tool}: {e}"))
        }
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PoolError::Command {
            command: format!("{cmd:?}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A Btrfs filesystem in a sparse file, loop-mounted, for development and
/// tests. Dropping it unmounts the filesystem, detaches the loop device and
/// removes the file, whatever state the pool's content is in.
#[derive(Debug)]
pub struct LoopPool {
    image: PathBuf,
    mount: PathBuf,
    mounted: bool,
}

impl LoopPool {
    /// Creates `dir/pool.img` of `size_bytes` (sparse), makes a Btrfs
    /// filesystem on it and mounts it on `dir/mnt` (`-o loop,noatime`).
    /// `dir` must exist and be this pool's own (e.g. a fresh temp dir).
    pub fn create(dir: &Path, size_bytes: u64) -> Result<LoopPool, PoolError> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            return Err(PoolError::NotRoot(uid.as_raw()));
        }
        let image = dir.join("pool.img");
        let mount = dir.join("mnt");
        let f = std::fs::File::create(&image)
            .map_err(|e| PoolError::Io(format!("{}: {e}", image.display())))?;
        f.set_len(size_bytes)
            .map_err(|e| PoolError::Io(format!("{}: {e}", image.display())))?;
        drop(f);
        let mut pool = LoopPool {
            image,
            mount,
            mounted: false,
        };
        run(
            Command::new("mkfs.btrfs").arg("-q").arg(&pool.image),
            "mkfs.btrfs",
            "btrfs-progs",
        )?;
        std::fs::create_dir_all(&pool.mount)
            .map_err(|e| PoolError::Io(format!("{}: {e}", pool.mount.display())))?;
        run(
            Command::new("mount")
                .arg("-o")
                .arg("loop,noatime")
                .arg(&pool.image)
                .arg(&pool.mount),
            "mount",
            "mount",
        )?;
        pool.mounted = true;
        Ok(pool)
    }

    /// The mount point (the pool is a directory under it, or it itself).
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Unmounts and detaches now, reporting failures (dropping does the
    /// same silently).
    pub fn teardown(mut self) -> Result<(), PoolError> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<(), PoolError> {
        let mut result = Ok(());
        if self.mounted {
            if let Err(e) = run(Command::new("umount").arg(&self.mount), "umount", "mount") {
                // Something still holds it: detach lazily, never leave it mounted.
                let _ = run(
                    Command::new("umount").arg("-l").arg(&self.mount),
                    "umount",
                    "mount",
                );
                result = Err(e);
            }
            self.mounted = false;
        }
        // `mount -o loop` sets autoclear; detach explicitly in case it did not.
        if let Ok(out) = Command::new("losetup")
            .arg("-j")
            .arg(&self.image)
            .arg("-O")
            .arg("NAME")
            .arg("-n")
            .output()
        {
            for dev in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("losetup").arg("-d").arg(dev).output();
            }
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
        result
    }
}

impl Drop for LoopPool {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_formatted_like_sysfs() {
        let u = [
            0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4,
            0x30, 0xc8,
        ];
        assert_eq!(uuid_string(&u), "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
    }

    #[test]
    fn a_plain_directory_is_not_a_pool() {
        let d = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let st = nix::sys::statfs::statfs(d.path()).unwrap();
        if st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
            return; // the temp dir is on Btrfs here: nothing to refuse
        }
        assert_eq!(
            init_pool(d.path(), QuotaPreference::Auto),
            Err(PoolError::NotBtrfs(d.path().to_path_buf()))
        );
    }
}
