//! File access confined to one project's home directory, for the host's data
//! plane.
//!
//! [`ProjectFiles`] opens the home once as a [`cap_std::fs::Dir`] and does
//! every operation relative to that handle, so no path can leave the home:
//! `..` components and absolute paths are refused before the disk is touched
//! ([`FileError::Escape`]), and symlinks (absolute ones, or relative ones that
//! climb out) are never followed outside — cap-std refuses them, and that
//! refusal is reported as [`FileError::Escape`] too. A symlink whose target
//! stays inside the home is followed as usual.
//!
//! Paths are `/`-separated and relative to the home; `""` and `"."` name the
//! home itself, empty and `.` components are ignored (`"a//./b/"` is
//! `"a/b"`). Paths longer than [`MAX_PATH_BYTES`] or containing NUL bytes are
//! [`FileError::Invalid`].
//!
//! Every call runs the blocking file-system work on tokio's blocking pool.
//! Error messages name the path as the caller gave it, never the host path
//! of the home.
//!
//! ```
//! use cocalc_host::files::{FileError, FileKind, ProjectFiles};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let home = tempfile::tempdir().unwrap();
//! let files = ProjectFiles::open(home.path())?;
//! files.mkdir("notes").await?;
//! files.write("notes/a.txt", b"hello".to_vec()).await?;
//! assert_eq!(files.read("notes/a.txt", 1024).await?, b"hello");
//! assert_eq!(files.stat("notes/a.txt").await?.kind, FileKind::File);
//! assert!(matches!(files.read("../etc/passwd", 1024).await, Err(FileError::Escape(_))));
//! # Ok::<(), FileError>(())
//! # }).unwrap();
//! ```

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cap_std::fs::{Dir, Metadata, MetadataExt, OpenOptions, OpenOptionsExt, PermissionsExt};

/// The longest path, in bytes, that [`ProjectFiles`] accepts.
pub const MAX_PATH_BYTES: usize = 4096;

/// One project's home directory, opened once; every operation stays inside
/// it. Cheap to clone (the directory handle is shared).
#[derive(Debug, Clone)]
pub struct ProjectFiles {
    home: Arc<Dir>,
}

pub use cocalc_core::wire::{FileEntry, FileKind};

/// Why a [`ProjectFiles`] operation failed. Messages name paths relative to
/// the home, as the caller gave them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The path (or one of its parents) does not exist. Holds the path.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// The path would leave the project home: absolute, `..`, or through a
    /// symlink pointing outside. Holds the whole message.
    #[error("{0}")]
    Escape(String),
    /// Something is already there. Holds the path.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A directory was needed (the path or one of its parents is not one).
    /// Holds the path.
    #[error("not a directory: {0}")]
    NotADirectory(String),
    /// A file was needed and this is a directory. Holds the path.
    #[error("is a directory: {0}")]
    IsADirectory(String),
    /// The file is larger than the caller's limit.
    #[error("{path} is {size} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size in bytes (at least `max + 1` when it grew while read).
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The request itself is invalid: NUL bytes, an over-long path or name,
    /// an operation that makes no sense on this path. Holds the message.
    #[error("{0}")]
    Invalid(String),
    /// The operating system refused access (`EACCES`/`EPERM`) to a path
    /// inside the home. Holds the path.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Any other I/O failure (disk full, quota, hardware). Holds the message.
    #[error("{0}")]
    Io(String),
}

impl FileError {
    /// The stable snake_case code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            FileError::NotFound(_) => "file_not_found",
            FileError::Escape(_) => "path_escape",
            FileError::AlreadyExists(_) => "already_exists",
            FileError::NotADirectory(_) => "not_a_directory",
            FileError::IsADirectory(_) => "is_a_directory",
            FileError::TooLarge { .. } => "file_too_large",
            FileError::Invalid(_) => "invalid_path",
            FileError::PermissionDenied(_) => "permission_denied",
            FileError::Io(_) => "file_io",
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            FileError::NotFound(_) => 404,
            FileError::Escape(_) => 403,
            FileError::AlreadyExists(_) => 409,
            FileError::NotADirectory(_) => 409,
            FileError::IsADirectory(_) => 409,
            FileError::TooLarge { .. } => 413,
            FileError::Invalid(_) => 400,
            FileError::PermissionDenied(_) => 403,
            FileError::Io(_) => 500,
        }
    }
}

impl From<&FileError> for cocalc_core::ApiError {
    fn from(e: &FileError) -> Self {
        let err = cocalc_core::ApiError::new(e.http_status(), e.code(), e.to_string());
        match e {
            FileError::Escape(_) => err.with_hint(
                "paths are relative to the project home; `..`, absolute paths and \
                 symlinks that point outside the home are refused",
            ),
            FileError::TooLarge { .. } => {
                err.with_hint("download it in another way, or ask for a larger limit")
            }
            _ => err,
        }
    }
}

impl ProjectFiles {
    /// Opens `home` (a directory on the host) as the root of every later
    /// operation. `home` itself is resolved with the host's ambient
    /// authority, once; nothing after that is.
    pub fn open(home: &Path) -> Result<Self, FileError> {
        let dir = Dir::open_ambient_dir(home, cap_std::ambient_authority()).map_err(|e| {
            let shown = home.display().to_string();
            match map_io(e, &shown) {
                // Outside the sandbox there is no escape; a refusal here is
                // the host's own permissions.
                FileError::Escape(_) => FileError::PermissionDenied(shown),
                other => other,
            }
        })?;
        Ok(ProjectFiles {
            home: Arc::new(dir),
        })
    }

    /// Lists a directory, sorted by name (byte order). Entries are
    /// described without following symlinks; the directory itself may be
    /// reached through symlinks that stay inside the home. Names that are
    /// not UTF-8 are converted lossily.
    pub async fn list(&self, path: &str) -> Result<Vec<FileEntry>, FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            let rd = home.read_dir(&p.rel).map_err(|e| map_io(e, &p.shown))?;
            let mut out = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|e| map_io(e, &p.shown))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                match entry.metadata() {
                    Ok(meta) => out.push(entry_from(name, &meta)),
                    // Removed between readdir and stat: it is gone, skip it.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(map_io(e, &p.shown)),
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    /// Describes one path, without following a final symlink (a symlink is
    /// reported as [`FileKind::Symlink`]).
    pub async fn stat(&self, path: &str) -> Result<FileEntry, FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            let meta = if p.is_home() {
                home.dir_metadata()
            } else {
                home.symlink_metadata(&p.rel)
            }
            .map_err(|e| map_io(e, &p.shown))?;
            Ok(entry_from(p.name().to_owned(), &meta))
        })
        .await
    }

    /// Reads a whole regular file. Files larger than `max_bytes` are refused
    /// with [`FileError::TooLarge`] (also when the file grows past the limit
    /// while being read); directories with [`FileError::IsADirectory`];
    /// FIFOs, sockets and devices with [`FileError::Invalid`] (they are
    /// opened non-blocking, so a FIFO cannot hang the host).
    pub async fn read(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            if p.is_home() {
                return Err(FileError::IsADirectory(p.shown.clone()));
            }
            let mut opts = OpenOptions::new();
            opts.read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
            let file = home
                .open_with(&p.rel, &opts)
                .map_err(|e| map_io(e, &p.shown))?;
            let meta = file.metadata().map_err(|e| map_io(e, &p.shown))?;
            if meta.is_dir() {
                return Err(FileError::IsADirectory(p.shown.clone()));
            }
            if !meta.is_file() {
                return Err(FileError::Invalid(format!(
                    "not a regular file: {}",
                    p.shown
                )));
            }
            let too_large = |size| FileError::TooLarge {
                path: p.shown.clone(),
                size,
                max: max_bytes,
            };
            if meta.len() > max_bytes {
                return Err(too_large(meta.len()));
            }
            let mut buf = Vec::with_capacity(meta.len() as usize);
            file.take(max_bytes.saturating_add(1))
                .read_to_end(&mut buf)
                .map_err(|e| map_io(e, &p.shown))?;
            if buf.len() as u64 > max_bytes {
                return Err(too_large(buf.len() as u64));
            }
            Ok(buf)
        })
        .await
    }

    /// Creates or replaces a file atomically: the data goes to a temporary
    /// file in the same directory, which is synced and then renamed over
    /// the target, so readers see the old or the new content, never a mix.
    /// The parent directory must exist. A replaced file keeps its
    /// permission bits and owner; a new one gets `0o644` (less the umask)
    /// and, when the host may `chown`, the owner of its directory. A final
    /// symlink is replaced by the file, not followed. The temporary file is
    /// removed on every failure.
    pub async fn write(&self, path: &str, data: Vec<u8>) -> Result<(), FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            let Some((parent, name)) = p.split() else {
                return Err(FileError::IsADirectory(p.shown.clone()));
            };
            let dir = home.open_dir(&parent).map_err(|e| map_io(e, &p.shown))?;
            let existing = match dir.symlink_metadata(name) {
                Ok(meta) if meta.is_dir() => {
                    return Err(FileError::IsADirectory(p.shown.clone()));
                }
                Ok(meta) if meta.is_file() => Some(meta),
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(map_io(e, &p.shown)),
            };
            let owner = match &existing {
                Some(meta) => Some((meta.uid(), meta.gid())),
                None => dir.dir_metadata().ok().map(|m| (m.uid(), m.gid())),
            };

            let tmp = temp_name();
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true).mode(0o644);
            let mut file = dir
                .open_with(&tmp, &opts)
                .map_err(|e| map_io(e, &p.shown))?;
            let result = (|| {
                file.write_all(&data)?;
                if let Some(meta) = &existing {
                    file.set_permissions(cap_std::fs::Permissions::from_mode(
                        meta.mode() & 0o7777,
                    ))?;
                }
                if let Some((uid, gid)) = owner {
                    // Best effort: only a privileged host may give files away.
                    let _ = rustix::fs::fchown(
                        &file,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    );
                }
                file.sync_all()?;
                drop(file);
                dir.rename(&tmp, &dir, name)
            })();
            if let Err(e) = result {
                let _ = dir.remove_file(&tmp);
                return Err(map_io(e, &p.shown));
            }
            Ok(())
        })
        .await
    }

    /// Creates a directory and any missing parents (`create_dir_all`
    /// semantics: an existing directory is fine, an existing non-directory
    /// is [`FileError::AlreadyExists`]). New directories get `0o755` (less
    /// the umask) and, when the host may `chown`, the owner of their
    /// parent.
    pub async fn mkdir(&self, path: &str) -> Result<(), FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            let mut prefix = PathBuf::new();
            let mut owner = home.dir_metadata().ok().map(|m| (m.uid(), m.gid()));
            for comp in &p.components {
                let parent = prefix.clone();
                prefix.push(comp);
                match home.create_dir(&prefix) {
                    Ok(()) => {
                        if let Some((uid, gid)) = owner {
                            // Best effort, and never through a symlink: the
                            // new name is one component, looked up without
                            // following in its (sandboxed) parent.
                            let parent = if parent.as_os_str().is_empty() {
                                home.try_clone()
                            } else {
                                home.open_dir(&parent)
                            };
                            if let Ok(parent) = parent {
                                let _ = rustix::fs::chownat(
                                    &parent,
                                    comp.as_str(),
                                    Some(rustix::fs::Uid::from_raw(uid)),
                                    Some(rustix::fs::Gid::from_raw(gid)),
                                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                                );
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // Follows symlinks that stay inside the home.
                        match home.metadata(&prefix) {
                            Ok(meta) if meta.is_dir() => {
                                owner = Some((meta.uid(), meta.gid()));
                            }
                            Ok(_) => {
                                return Err(FileError::AlreadyExists(
                                    prefix.to_string_lossy().into_owned(),
                                ))
                            }
                            Err(e) => {
                                return Err(map_io(e, &prefix.to_string_lossy()));
                            }
                        }
                    }
                    Err(e) => return Err(map_io(e, &prefix.to_string_lossy())),
                }
            }
            Ok(())
        })
        .await
    }

    /// Renames (moves) `from` to `to`, both inside the home, with POSIX
    /// `rename` semantics: an existing file at `to` is replaced, an
    /// existing non-empty directory is [`FileError::AlreadyExists`]. Neither
    /// may be the home itself. Symlinks are moved as themselves.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), FileError> {
        let f = RelPath::parse(from)?;
        let t = RelPath::parse(to)?;
        self.blocking(move |home| {
            if f.is_home() || t.is_home() {
                return Err(FileError::Invalid(
                    "cannot rename the project home itself".into(),
                ));
            }
            home.rename(&f.rel, home, &t.rel).map_err(|e| {
                // Blame the destination when the source is fine.
                let source_ok = home.symlink_metadata(&f.rel).is_ok();
                map_io(e, if source_ok { &t.shown } else { &f.shown })
            })
        })
        .await
    }

    /// Removes a file, a symlink (not its target) or a directory with
    /// everything in it. Removing the home itself (`""`, `"."`) is refused
    /// with [`FileError::Invalid`].
    pub async fn remove(&self, path: &str) -> Result<(), FileError> {
        let p = RelPath::parse(path)?;
        self.blocking(move |home| {
            if p.is_home() {
                return Err(FileError::Invalid(
                    "refusing to remove the project home itself".into(),
                ));
            }
            let meta = home
                .symlink_metadata(&p.rel)
                .map_err(|e| map_io(e, &p.shown))?;
            if meta.is_dir() {
                // cap-std's remove_dir_all does not follow symlinks inside.
                home.remove_dir_all(&p.rel)
            } else {
                home.remove_file(&p.rel)
            }
            .map_err(|e| map_io(e, &p.shown))
        })
        .await
    }

    /// Runs `f` on the blocking pool with the home directory.
    async fn blocking<T, F>(&self, f: F) -> Result<T, FileError>
    where
        T: Send + 'static,
        F: FnOnce(&Dir) -> Result<T, FileError> + Send + 'static,
    {
        let home = Arc::clone(&self.home);
        tokio::task::spawn_blocking(move || f(&home))
            .await
            .map_err(|e| FileError::Io(format!("file task failed: {e}")))?
    }
}

/// A checked path relative to the home.
#[derive(Debug)]
struct RelPath {
    /// Normal components only (no `""`, `.`, `..`).
    components: Vec<String>,
    /// The path for cap-std: `.` for the home.
    rel: PathBuf,
    /// The path for messages, as the caller gave it.
    shown: String,
}

impl RelPath {
    fn parse(path: &str) -> Result<Self, FileError> {
        if path.len() > MAX_PATH_BYTES {
            return Err(FileError::Invalid(format!(
                "path is {} bytes, longer than the limit of {MAX_PATH_BYTES}",
                path.len()
            )));
        }
        if path.contains('\0') {
            return Err(FileError::Invalid("path contains a NUL byte".into()));
        }
        if path.starts_with('/') {
            return Err(FileError::Escape(format!(
                "absolute paths are not allowed: {path}"
            )));
        }
        let mut components = Vec::new();
        for comp in path.split('/') {
            match comp {
                "" | "." => {}
                ".." => {
                    return Err(FileError::Escape(format!(
                        "`..` is not allowed in paths: {path}"
                    )))
                }
                c => components.push(c.to_owned()),
            }
        }
        let rel = if components.is_empty() {
            PathBuf::from(".")
        } else {
            components.iter().collect()
        };
        let shown = if path.is_empty() { "." } else { path }.to_owned();
        Ok(RelPath {
            components,
            rel,
            shown,
        })
    }

    fn is_home(&self) -> bool {
        self.components.is_empty()
    }

    /// The last component, `.` for the home.
    fn name(&self) -> &str {
        self.components.last().map_or(".", String::as_str)
    }

    /// Parent (`.` for a top-level name) and last component; `None` for the
    /// home.
    fn split(&self) -> Option<(PathBuf, &str)> {
        let (name, parents) = self.components.split_last()?;
        let parent = if parents.is_empty() {
            PathBuf::from(".")
        } else {
            parents.iter().collect()
        };
        Some((parent, name))
    }
}

/// A fresh name for a temporary file, unique within this process and
/// unlikely to collide with another's.
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(".cocalc-write.{}.{n}.{nanos:09}.tmp", std::process::id())
}

fn entry_from(name: String, meta: &Metadata) -> FileEntry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let modified_ms = meta
        .mtime()
        .checked_mul(1000)
        .map(|ms| ms.saturating_add(meta.mtime_nsec() / 1_000_000));
    FileEntry {
        name,
        kind,
        size: meta.len(),
        modified_ms,
        mode: Some(meta.mode() & 0o7777),
    }
}

/// Maps an I/O error to a [`FileError`] naming `shown`.
///
/// cap-std reports a path that would leave the sandbox (an absolute symlink,
/// a relative one that climbs out, `EXDEV` from `openat2(RESOLVE_BENEATH)`)
/// as a synthetic `io::ErrorKind::PermissionDenied` error ("a path led
/// outside of the filesystem") with no OS error number; a real `EACCES` or
/// `EPERM` carries its number. That is how the two are told apart.
fn map_io(err: io::Error, shown: &str) -> FileError {
    let shown = shown.to_owned();
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::ENOENT => FileError::NotFound(shown),
            libc::EEXIST | libc::ENOTEMPTY => FileError::AlreadyExists(shown),
            libc::ENOTDIR => FileError::NotADirectory(shown),
            libc::EISDIR => FileError::IsADirectory(shown),
            libc::EACCES | libc::EPERM => FileError::PermissionDenied(shown),
            libc::ENAMETOOLONG => FileError::Invalid(format!("name too long: {shown}")),
            libc::ELOOP => {
                FileError::Invalid(format!("too many levels of symbolic links: {shown}"))
            }
            libc::EINVAL => FileError::Invalid(format!("invalid operation on {shown}: {err}")),
            libc::EXDEV => FileError::Invalid(format!("cannot move across file systems: {shown}")),
            libc::ENOSPC | libc::EDQUOT => {
                FileError::Io(format!("no space left (disk or quota full): {shown}"))
            }
            _ => FileError::Io(format!("{shown}: {err}")),
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied => {
            FileError::Escape(format!("path leads outside the project home: {shown}"))
        }
        io::ErrorKind::NotFound => FileError::NotFound(shown),
        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
            FileError::AlreadyExists(shown)
        }
        io::ErrorKind::NotADirectory => FileError::NotADirectory(shown),
        io::ErrorKind::IsADirectory => FileError::IsADirectory(shown),
        io::ErrorKind::InvalidInput => FileError::Invalid(format!("{shown}: {err}")),
        _ => FileError::Io(format!("{shown}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap-std behaviour `map_io` relies on: a path that would leave the
    /// sandbox fails with `PermissionDenied` and no OS error number, whether
    /// the way out is an absolute symlink, a relative one, or `..`.
    #[test]
    fn cap_std_reports_escapes_as_permission_denied_without_errno() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", home.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", home.join("rel")).unwrap();
        std::os::unix::fs::symlink("..", home.join("up")).unwrap();
        let dir = Dir::open_ambient_dir(&home, cap_std::ambient_authority()).unwrap();
        let errors = [
            dir.open("abs").unwrap_err(),
            dir.open("rel").unwrap_err(),
            dir.read_dir("up").unwrap_err(),
            dir.metadata("up/secret").unwrap_err(),
            dir.open("../secret").unwrap_err(),
            dir.open("/etc/passwd").unwrap_err(),
            dir.create_dir("up/new").unwrap_err(),
            dir.remove_file("up/secret").unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert_eq!(e.raw_os_error(), None, "{e}");
            assert!(matches!(map_io(e, "x"), FileError::Escape(_)));
        }
        assert!(root.path().join("secret").exists());
        assert!(!root.path().join("new").exists());
    }

    #[test]
    fn real_os_errors_keep_their_meaning() {
        let cases = [
            (libc::EACCES, "permission_denied"),
            (libc::EPERM, "permission_denied"),
            (libc::ENOENT, "file_not_found"),
            (libc::ENOTEMPTY, "already_exists"),
            (libc::ELOOP, "invalid_path"),
            (libc::EDQUOT, "file_io"),
        ];
        for (errno, code) in cases {
            let e = map_io(io::Error::from_raw_os_error(errno), "p");
            assert_eq!(e.code(), code, "errno {errno}");
        }
    }

    #[test]
    fn paths_are_normalised() {
        let p = RelPath::parse("a//./b/").unwrap();
        assert_eq!(p.components, ["a", "b"]);
        assert_eq!(p.rel, Path::new("a/b"));
        assert_eq!(p.split().unwrap(), (PathBuf::from("a"), "b"));
        for home in ["", ".", "./", ".//."] {
            let p = RelPath::parse(home).unwrap();
            assert!(p.is_home());
            assert_eq!(p.rel, Path::new("."));
            assert!(p.split().is_none());
        }
        assert_eq!(
            RelPath::parse("top").unwrap().split().unwrap().0,
            Path::new(".")
        );
        assert!(RelPath::parse(&"a".repeat(MAX_PATH_BYTES)).is_ok());
        assert!(matches!(
            RelPath::parse(&"a".repeat(MAX_PATH_BYTES + 1)),
            Err(FileError::Invalid(_))
        ));
    }
}
