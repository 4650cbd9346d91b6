//! [`RusticBackups`]: a restic-format repository through `rustic_core`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cocalc_core::{
    BackupError, BackupInfo, BackupStore, HostId, ProjectId, SnapshotInfo, Timestamp,
};
use rustic_backend::BackendOptions;
use rustic_core::repofile::SnapshotFile;
use rustic_core::{
    BackupOptions, ConfigOptions, Credentials, KeyOptions, LocalDestination, LsOptions, PathList,
    PruneOptions, Repository, RepositoryBackends, RepositoryOptions, RestoreOptions,
    SnapshotOptions,
};

use super::{empty_destination, source_tree};
use crate::common::PREFIX;

/// Where a [`RusticBackups`] repository is and how to open it.
///
/// `repository` is what rustic takes: a local path (`/srv/backups`) or
/// `opendal:<service>` with `options`; for S3-compatible storage,
/// `opendal:s3` with `bucket`, `root`, `endpoint`, `region`,
/// `access_key_id` and `secret_access_key`.
#[derive(Clone)]
#[non_exhaustive]
pub struct RusticConfig {
    /// The repository (a path, or `opendal:<service>`).
    pub repository: String,
    /// Backend options (OpenDAL's, for `opendal:` repositories).
    pub options: BTreeMap<String, String>,
    /// The repository's password (its key is encrypted with it).
    pub password: String,
    /// Where rustic keeps its local cache; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
}

impl RusticConfig {
    /// A repository at `repository` opened with `password`, without a
    /// cache and with no backend options.
    pub fn new(repository: impl Into<String>, password: impl Into<String>) -> Self {
        RusticConfig {
            repository: repository.into(),
            options: BTreeMap::new(),
            password: password.into(),
            cache_dir: None,
        }
    }

    /// Sets a backend option.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Keeps rustic's cache in `dir`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }
}

impl std::fmt::Debug for RusticConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Options may hold secrets (S3 keys): print their names only.
        f.debug_struct("RusticConfig")
            .field("repository", &self.repository)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// Backups in a restic-format repository (deduplicated by content-defined
/// chunks, compressed, encrypted), shared by every host that is given the
/// same repository.
///
/// Each backup is a rustic snapshot of one project snapshot's tree, stored
/// under the path `/project-<uuid>` with label `project-<uuid>`, hostname
/// the host id, and tag `cocalc-snapshot:<snapshot name>`; its time is the
/// snapshot's. Owners are restored by number (`numeric-id`), so files keep
/// the ids the container sees. Forgetting prunes with rustic's defaults:
/// packs are deleted 23 h after they were marked, so backups that other
/// hosts are writing meanwhile stay whole.
///
/// All repository work runs on tokio's blocking pool; calls from this
/// value are serialised (rustic holds no repository lock).
pub struct RusticBackups {
    inner: Arc<Inner>,
}

struct Inner {
    backends: RepositoryBackends,
    options: RepositoryOptions,
    /// The master key, found once from the password: deriving a key from
    /// a password (scrypt) is slow on purpose.
    key: Credentials,
    lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for RusticBackups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RusticBackups").finish_non_exhaustive()
    }
}

fn repo_err(e: impl std::fmt::Display) -> BackupError {
    BackupError::Repository(e.to_string())
}

fn label(p: ProjectId) -> String {
    format!("{PREFIX}{p}")
}

const SNAPSHOT_TAG: &str = "cocalc-snapshot:";

fn info_of(p: ProjectId, s: &SnapshotFile) -> Option<BackupInfo> {
    let host: HostId = s.hostname.parse().ok()?;
    let snapshot = s
        .tags
        .iter()
        .find_map(|t| t.strip_prefix(SNAPSHOT_TAG))?
        .to_string();
    let ms = s.time.timestamp().as_millisecond();
    let (files, bytes, added) = s
        .summary
        .as_ref()
        .map(|m| {
            (
                m.total_files_processed,
                m.total_bytes_processed,
                m.data_added,
            )
        })
        .unwrap_or_default();
    Some(BackupInfo::new(
        full_id(s),
        p,
        host,
        snapshot,
        Timestamp(ms),
        files,
        bytes,
        added,
    ))
}

/// A snapshot's whole id, 64 hex digits (rustic prints 8).
fn full_id(s: &SnapshotFile) -> String {
    s.id.to_hex().as_str().to_string()
}

type Open = Repository<rustic_core::OpenStatus>;

impl Inner {
    fn open(&self) -> Result<Open, BackupError> {
        Repository::new(&self.options, &self.backends)
            .map_err(repo_err)?
            .open(&self.key)
            .map_err(repo_err)
    }

    /// The project's backups as rustic snapshots, oldest first.
    fn snapshots(&self, repo: &Open, p: ProjectId) -> Result<Vec<SnapshotFile>, BackupError> {
        let l = label(p);
        let mut v = repo
            .get_matching_snapshots(|s| s.label == l)
            .map_err(repo_err)?;
        v.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
        Ok(v)
    }
}

/// Backup `id` among `held`, the project's snapshots.
fn find<'a>(
    held: &'a [SnapshotFile],
    p: ProjectId,
    id: &str,
) -> Result<&'a SnapshotFile, BackupError> {
    held.iter()
        .find(|s| full_id(s) == id)
        .ok_or_else(|| BackupError::NotFound {
            project: p,
            id: id.to_string(),
        })
}

impl RusticBackups {
    /// Opens the repository, initialising it first if it holds none (a new
    /// directory or an empty bucket). A repository that exists but does not
    /// open with the password is an error, never re-initialised.
    pub async fn open_or_init(config: RusticConfig) -> Result<Self, BackupError> {
        tokio::task::spawn_blocking(move || {
            let backends = BackendOptions::default()
                .repository(config.repository.clone())
                .options(config.options.clone())
                .to_backends()
                .map_err(|e| {
                    BackupError::Invalid(format!("repository {}: {e}", config.repository))
                })?;
            let mut options = RepositoryOptions::default();
            match &config.cache_dir {
                Some(d) => options = options.cache_dir(d.clone()),
                None => options = options.no_cache(true),
            }
            let credentials = Credentials::password(&config.password);
            let fresh = Repository::new(&options, &backends).map_err(repo_err)?;
            let repo = if fresh.config_id().map_err(repo_err)?.is_none() {
                fresh.init(
                    &credentials,
                    &KeyOptions::default(),
                    &ConfigOptions::default(),
                )
            } else {
                fresh.open(&credentials)
            }
            .map_err(repo_err)?;
            let inner = Inner {
                backends,
                options,
                key: Credentials::Masterkey(repo.key()),
                lock: std::sync::Mutex::new(()),
            };
            Ok(RusticBackups {
                inner: Arc::new(inner),
            })
        })
        .await
        .map_err(|e| BackupError::Io(format!("backup task: {e}")))?
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackupError> + Send + 'static,
    ) -> Result<T, BackupError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _g = inner.lock.lock().unwrap_or_else(|p| p.into_inner());
            f(&inner)
        })
        .await
        .map_err(|e| BackupError::Io(format!("backup task: {e}")))?
    }
}

#[async_trait]
impl BackupStore for RusticBackups {
    async fn backup(
        &self,
        project: ProjectId,
        host: HostId,
        snapshot: &SnapshotInfo,
        tree: &Path,
    ) -> Result<BackupInfo, BackupError> {
        source_tree(tree)?;
        let tree = tree.to_path_buf();
        let snapshot = snapshot.clone();
        self.run(move |i| {
            let repo = i.open()?.to_indexed_ids().map_err(repo_err)?;
            let ms = snapshot.created.as_millis();
            let time = rustic_core::jiff::Timestamp::from_millisecond(ms)
                .map_err(|e| BackupError::Invalid(format!("snapshot time: {e}")))?
                .to_zoned(rustic_core::jiff::tz::TimeZone::UTC);
            let snap = SnapshotOptions::default()
                .label(label(project))
                .host(host.to_string())
                .time(time)
                .add_tags(&format!("{SNAPSHOT_TAG}{}", snapshot.name))
                .map_err(|e| BackupError::Invalid(format!("tag: {e}")))?
                .to_snapshot()
                .map_err(repo_err)?;
            let source = PathList::from_iter([tree.clone()])
                .sanitize()
                .map_err(|e| BackupError::Invalid(format!("{}: {e}", tree.display())))?;
            let opts =
                BackupOptions::default().as_path(PathBuf::from(format!("/{}", label(project))));
            let saved = repo.backup(&opts, &source, snap).map_err(repo_err)?;
            info_of(project, &saved)
                .ok_or_else(|| BackupError::Repository("the saved snapshot lacks its tags".into()))
        })
        .await
    }

    async fn backups(&self, project: ProjectId) -> Result<Vec<BackupInfo>, BackupError> {
        self.run(move |i| {
            let repo = i.open()?;
            Ok(i.snapshots(&repo, project)?
                .iter()
                .filter_map(|s| info_of(project, s))
                .collect())
        })
        .await
    }

    async fn restore(
        &self,
        project: ProjectId,
        id: &str,
        into: &Path,
    ) -> Result<BackupInfo, BackupError> {
        let id = id.to_string();
        let into = into.to_path_buf();
        self.run(move |i| {
            let repo = i.open()?;
            let snap = find(&i.snapshots(&repo, project)?, project, &id)?.clone();
            let info = info_of(project, &snap).ok_or_else(|| BackupError::NotFound {
                project,
                id: id.clone(),
            })?;
            empty_destination(&into)?;
            let repo = repo.to_indexed().map_err(repo_err)?;
            let node = repo
                .node_from_snapshot_and_path(&snap, &label(project))
                .map_err(repo_err)?;
            let ls = repo.ls(&node, &LsOptions::default()).map_err(repo_err)?;
            let dest = LocalDestination::new(&into.to_string_lossy(), true, !node.is_dir())
                .map_err(|e| BackupError::Io(format!("{}: {e}", into.display())))?;
            let opts = RestoreOptions::default().numeric_id(true);
            let plan = repo
                .prepare_restore(&opts, ls.clone(), &dest, false)
                .map_err(repo_err)?;
            repo.restore(plan, &opts, ls, &dest).map_err(repo_err)?;
            Ok(info)
        })
        .await
    }

    async fn forget(&self, project: ProjectId, ids: &[String]) -> Result<(), BackupError> {
        let ids = ids.to_vec();
        self.run(move |i| {
            let repo = i.open()?;
            // One listing for all of them: each reads every snapshot file.
            let held = i.snapshots(&repo, project)?;
            let found = ids
                .iter()
                .map(|id| find(&held, project, id).map(|s| s.id))
                .collect::<Result<Vec<_>, _>>()?;
            if found.is_empty() {
                return Ok(());
            }
            repo.delete_snapshots(&found).map_err(repo_err)?;
            let opts = PruneOptions::default();
            let plan = repo.prune_plan(&opts).map_err(repo_err)?;
            repo.prune(&opts, plan).map_err(repo_err)
        })
        .await
    }
}
