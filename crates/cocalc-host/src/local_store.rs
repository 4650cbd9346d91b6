//! [`LocalStore`]: the project-host's local SQLite cache, so that a
//! restarted host serves at once (within the offline grace) and never
//! forgets the newest placement generation it has seen for a project.
//!
//! ## What it holds
//!
//! | table | what | written by |
//! | --- | --- | --- |
//! | `projects` | the projects this host holds: generation, image, last use | [`admit`](LocalStore::admit), [`touch`](LocalStore::touch), [`forget`](LocalStore::forget) |
//! | `fences` | the newest generation this host has seen of every project it ever held, kept after the project leaves | [`admit`](LocalStore::admit), [`forget`](LocalStore::forget) |
//! | `acl` | a snapshot of the [`AclCache`](cocalc_auth::AclCache) entries, with their write times | [`save_acl`](LocalStore::save_acl) |
//! | `user_cutoffs`, `revoked_tokens` | the revocations in force | [`save_revocations`](LocalStore::save_revocations) |
//!
//! ## Fencing (DESIGN promise 1)
//!
//! A host refuses to start a project at a generation older than one it has
//! seen. [`admit`](LocalStore::admit) enforces it against the `fences`
//! table, which only ever grows:
//!
//! * while the host holds the project, the same generation is admitted again
//!   (idempotent) and a newer one replaces it;
//! * an older one is refused with [`LocalStoreError::StaleGeneration`];
//! * once the project was [`forget`](LocalStore::forget)ten (moved away,
//!   deleted), its generation is over on this host: only a strictly newer
//!   one is admitted, so a delayed or replayed "start at generation g"
//!   cannot bring the project back here while another host runs it.
//!
//! ## Crash safety
//!
//! The database runs in WAL mode with `synchronous=FULL`; every change is
//! one `IMMEDIATE` transaction, so a crash (or `SIGKILL`) at any point
//! leaves the state before or after the change, never a mix, and a
//! committed change survives power loss. Every fence is at least the
//! generation of the project's row.
//!
//! Calls run on tokio's blocking pool (`spawn_blocking`), so the async API
//! needs a tokio runtime; the store is cheap to clone and share.
//!
//! ## Example
//!
//! ```
//! use cocalc_core::{Generation, ProjectId};
//! use cocalc_host::local_store::{LocalStore, LocalStoreError};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = LocalStore::open_in_memory()?;
//! let p = ProjectId::from_bytes([7; 16]);
//! store.admit(p, Generation(3), None).await?;
//! let stale = store.admit(p, Generation(2), None).await.unwrap_err();
//! assert!(matches!(stale, LocalStoreError::StaleGeneration { .. }));
//! # Ok::<(), LocalStoreError>(())
//! # }).unwrap();
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};

use cocalc_auth::AclEntry;
use cocalc_core::{Generation, Permission, ProjectId, Timestamp, UserId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// One project this host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalProject {
    /// The project.
    pub project: ProjectId,
    /// The placement generation this host holds it at.
    pub generation: Generation,
    /// The image it was admitted with (`None`: the host's default).
    pub image: Option<String>,
    /// The latest activity recorded with [`LocalStore::touch`], if any.
    pub last_use: Option<Timestamp>,
}

/// Why a [`LocalStore`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalStoreError {
    /// The generation is older than one this host has seen (or equal to the
    /// one of a project it has since given up): starting the project could
    /// run it on two hosts at once.
    #[error(
        "project {project}: generation {got} refused, this host has already seen generation \
         {seen}; ask the master where the project runs now"
    )]
    StaleGeneration {
        /// The project.
        project: ProjectId,
        /// The generation that was offered.
        got: Generation,
        /// The newest generation this host has seen.
        seen: Generation,
    },
    /// The database failed (or holds something this build cannot read).
    #[error("local store: {0}")]
    Backend(String),
}

/// The host's local SQLite cache (WAL mode, `synchronous=FULL`). Cheap to
/// clone: clones share one connection.
#[derive(Debug, Clone)]
pub struct LocalStore {
    conn: Arc<Mutex<Connection>>,
}

/// The schema version this build writes and reads (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projects (
    project TEXT PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 0),
    image TEXT,
    last_use INTEGER
);
CREATE TABLE IF NOT EXISTS fences (
    project TEXT PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 0)
);
CREATE TABLE IF NOT EXISTS acl (
    project TEXT NOT NULL,
    user TEXT NOT NULL,
    permission TEXT CHECK (permission IN ('read', 'write', 'admin')),
    written INTEGER NOT NULL,
    PRIMARY KEY (project, user)
);
CREATE TABLE IF NOT EXISTS user_cutoffs (
    user TEXT PRIMARY KEY NOT NULL,
    not_before INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    token_id TEXT PRIMARY KEY NOT NULL,
    expires INTEGER NOT NULL
);
";

fn db_err(e: rusqlite::Error) -> LocalStoreError {
    LocalStoreError::Backend(e.to_string())
}

/// A generation as SQLite stores it. Generations past `i64::MAX` cannot be
/// stored faithfully (and never occur: they grow by one per move).
fn gen_to_sql(g: Generation) -> Result<i64, LocalStoreError> {
    i64::try_from(g.0).map_err(|_| {
        LocalStoreError::Backend(format!(
            "generation {g} is out of range for the local store (at most {})",
            i64::MAX
        ))
    })
}

fn gen_from_sql(v: i64) -> Result<Generation, LocalStoreError> {
    u64::try_from(v)
        .map(Generation)
        .map_err(|_| LocalStoreError::Backend(format!("corrupt generation in database: {v}")))
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, LocalStoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| LocalStoreError::Backend(format!("corrupt id in database: {e}")))
}

type ProjectRow = (String, i64, Option<String>, Option<i64>);

fn project_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProjectRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn to_project((p, g, image, last_use): ProjectRow) -> Result<LocalProject, LocalStoreError> {
    Ok(LocalProject {
        project: parse_id(&p)?,
        generation: gen_from_sql(g)?,
        image,
        last_use: last_use.map(Timestamp),
    })
}

impl LocalStore {
    /// Opens (creating if needed) the database at `path`. Fails if the file
    /// is not a database or was written by a newer build with a schema this
    /// one does not know.
    pub fn open(path: &Path) -> Result<Self, LocalStoreError> {
        let conn = Connection::open(path)
            .map_err(|e| LocalStoreError::Backend(format!("open {}: {e}", path.display())))?;
        Self::init(conn)
    }

    /// A private in-memory database (tests, hosts without a state directory).
    /// Nothing survives the process.
    pub fn open_in_memory() -> Result<Self, LocalStoreError> {
        Self::init(Connection::open_in_memory().map_err(db_err)?)
    }

    fn init(mut conn: Connection) -> Result<Self, LocalStoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(LocalStoreError::Backend(format!(
                "schema version {version} is newer than this build understands \
                 ({SCHEMA_VERSION}); upgrade the host agent"
            )));
        }
        tx.execute_batch(SCHEMA).map_err(db_err)?;
        if version < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(LocalStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, LocalStoreError> + Send + 'static,
    ) -> Result<T, LocalStoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` drops its transaction, which rolls back:
            // the connection is consistent even if the mutex is poisoned.
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| LocalStoreError::Backend(format!("local store task failed: {e}")))?
    }

    /// Runs `f` in one `IMMEDIATE` transaction, committed if `f` succeeds
    /// and rolled back otherwise.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, LocalStoreError> + Send + 'static,
    ) -> Result<T, LocalStoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let out = f(&tx)?;
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
    }

    /// Records that this host holds `project` at `generation`, in one
    /// transaction, and returns the stored row.
    ///
    /// * A generation older than the newest this host has seen of the
    ///   project is refused with [`LocalStoreError::StaleGeneration`].
    /// * The generation the host holds is admitted again (idempotent); the
    ///   image is replaced by `image` and the last use is kept.
    /// * A newer generation replaces the held one (image replaced, last use
    ///   kept) and raises the fence.
    /// * After [`forget`](LocalStore::forget) only a strictly newer
    ///   generation than the one forgotten is admitted.
    pub async fn admit(
        &self,
        project: ProjectId,
        generation: Generation,
        image: Option<String>,
    ) -> Result<LocalProject, LocalStoreError> {
        let g = gen_to_sql(generation)?;
        self.write(move |tx| {
            let key = project.to_string();
            let held: Option<(i64, Option<i64>)> = tx
                .query_row(
                    "SELECT generation, last_use FROM projects WHERE project = ?1",
                    [&key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_err)?;
            let fence: Option<i64> = tx
                .query_row(
                    "SELECT generation FROM fences WHERE project = ?1",
                    [&key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let seen = fence.max(held.map(|(g, _)| g));
            if let Some(seen) = seen {
                // Held: equal is fine. Not held (forgotten): must be newer.
                let ok = if held.is_some() { g >= seen } else { g > seen };
                if !ok {
                    return Err(LocalStoreError::StaleGeneration {
                        project,
                        got: generation,
                        seen: gen_from_sql(seen)?,
                    });
                }
            }
            tx.execute(
                "INSERT INTO projects (project, generation, image) VALUES (?1, ?2, ?3)
                 ON CONFLICT(project) DO UPDATE SET generation = ?2, image = ?3",
                params![key, g, image],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO fences (project, generation) VALUES (?1, ?2)
                 ON CONFLICT(project) DO UPDATE SET generation = MAX(generation, ?2)",
                params![key, g],
            )
            .map_err(db_err)?;
            Ok(LocalProject {
                project,
                generation,
                image,
                last_use: held.and_then(|(_, t)| t).map(Timestamp),
            })
        })
        .await
    }

    /// The project's row, if this host holds it.
    pub async fn project(
        &self,
        project: ProjectId,
    ) -> Result<Option<LocalProject>, LocalStoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT project, generation, image, last_use FROM projects WHERE project = ?1",
                [project.to_string()],
                project_row,
            )
            .optional()
            .map_err(db_err)?
            .map(to_project)
            .transpose()
        })
        .await
    }

    /// Every project this host holds, sorted by id.
    pub async fn projects(&self) -> Result<Vec<LocalProject>, LocalStoreError> {
        let mut v = self
            .with(|c| {
                let mut st = c
                    .prepare("SELECT project, generation, image, last_use FROM projects")
                    .map_err(db_err)?;
                let rows = st.query_map([], project_row).map_err(db_err)?;
                rows.map(|r| r.map_err(db_err).and_then(to_project))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        v.sort_by_key(|p| p.project);
        Ok(v)
    }

    /// The project moved away or was deleted: drops its row in one
    /// transaction but keeps (raising it if needed) its fence, so neither
    /// the forgotten generation nor an older one is ever admitted again.
    /// Forgetting a project this host does not hold changes nothing.
    pub async fn forget(&self, project: ProjectId) -> Result<(), LocalStoreError> {
        self.write(move |tx| {
            let key = project.to_string();
            tx.execute(
                "INSERT INTO fences (project, generation)
                 SELECT project, generation FROM projects WHERE project = ?1
                 ON CONFLICT(project) DO UPDATE SET generation = MAX(generation, excluded.generation)",
                [&key],
            )
            .map_err(db_err)?;
            tx.execute("DELETE FROM projects WHERE project = ?1", [&key])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Records activity: `last_use` becomes the later of the stored one and
    /// `at` (it never moves back). A project this host does not hold is
    /// ignored, so activity that races with [`forget`](LocalStore::forget)
    /// does not fail.
    pub async fn touch(&self, project: ProjectId, at: Timestamp) -> Result<(), LocalStoreError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE projects SET last_use = MAX(COALESCE(last_use, ?2), ?2) WHERE project = ?1",
                params![project.to_string(), at.0],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Replaces the stored ACL snapshot with `entries` (typically
    /// [`AclCache::entries`](cocalc_auth::AclCache::entries)) in one
    /// transaction: afterwards the store holds exactly these entries, with
    /// their write times and `None` ("no access") kept as such. Of two
    /// entries for the same project and user, the later in the slice wins.
    pub async fn save_acl(&self, entries: &[AclEntry]) -> Result<(), LocalStoreError> {
        let entries = entries.to_vec();
        self.write(move |tx| {
            tx.execute("DELETE FROM acl", []).map_err(db_err)?;
            let mut st = tx
                .prepare(
                    "INSERT INTO acl (project, user, permission, written) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(project, user) DO UPDATE SET permission = ?3, written = ?4",
                )
                .map_err(db_err)?;
            for e in &entries {
                st.execute(params![
                    e.project.to_string(),
                    e.user.to_string(),
                    e.permission.map(Permission::as_str),
                    e.written.0
                ])
                .map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    /// The stored ACL snapshot, sorted by project then user; feed it to
    /// [`AclCache::restore`](cocalc_auth::AclCache::restore).
    pub async fn load_acl(&self) -> Result<Vec<AclEntry>, LocalStoreError> {
        let mut v = self
            .with(|c| {
                let mut st = c
                    .prepare("SELECT project, user, permission, written FROM acl")
                    .map_err(db_err)?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<String>>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .map_err(db_err)?;
                rows.map(|r| {
                    let (p, u, perm, written) = r.map_err(db_err)?;
                    Ok(AclEntry {
                        project: parse_id(&p)?,
                        user: parse_id(&u)?,
                        permission: perm
                            .map(|s| {
                                s.parse::<Permission>().map_err(|e| {
                                    LocalStoreError::Backend(format!(
                                        "corrupt permission in database: {e}"
                                    ))
                                })
                            })
                            .transpose()?,
                        written: Timestamp(written),
                    })
                })
                .collect::<Result<Vec<_>, LocalStoreError>>()
            })
            .await?;
        v.sort_by_key(|e| (e.project, e.user));
        Ok(v)
    }

    /// Replaces the stored revocations in one transaction: per-user "not
    /// before" cutoffs and revoked token ids with their expiry. Of two
    /// entries for the same user (or token) the later time is kept, so a
    /// revocation never shrinks.
    pub async fn save_revocations(
        &self,
        user_cutoffs: &[(UserId, Timestamp)],
        tokens: &[(String, Timestamp)],
    ) -> Result<(), LocalStoreError> {
        let users = user_cutoffs.to_vec();
        let tokens = tokens.to_vec();
        self.write(move |tx| {
            tx.execute("DELETE FROM user_cutoffs", []).map_err(db_err)?;
            tx.execute("DELETE FROM revoked_tokens", [])
                .map_err(db_err)?;
            let mut st = tx
                .prepare(
                    "INSERT INTO user_cutoffs (user, not_before) VALUES (?1, ?2)
                     ON CONFLICT(user) DO UPDATE SET not_before = MAX(not_before, ?2)",
                )
                .map_err(db_err)?;
            for (user, not_before) in &users {
                st.execute(params![user.to_string(), not_before.0])
                    .map_err(db_err)?;
            }
            let mut st = tx
                .prepare(
                    "INSERT INTO revoked_tokens (token_id, expires) VALUES (?1, ?2)
                     ON CONFLICT(token_id) DO UPDATE SET expires = MAX(expires, ?2)",
                )
                .map_err(db_err)?;
            for (token_id, expires) in &tokens {
                st.execute(params![token_id, expires.0]).map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    /// The stored revocations: user cutoffs sorted by user, revoked tokens
    /// sorted by token id. Feed them to
    /// [`AclCache::revoke_user`](cocalc_auth::AclCache::revoke_user) and
    /// [`AclCache::revoke_token`](cocalc_auth::AclCache::revoke_token).
    pub async fn load_revocations(
        &self,
    ) -> Result<(Vec<(UserId, Timestamp)>, Vec<(String, Timestamp)>), LocalStoreError> {
        self.with(|c| {
            let mut st = c
                .prepare("SELECT user, not_before FROM user_cutoffs")
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err)?;
            let mut users = rows
                .map(|r| {
                    let (u, t) = r.map_err(db_err)?;
                    Ok((parse_id::<UserId>(&u)?, Timestamp(t)))
                })
                .collect::<Result<Vec<_>, LocalStoreError>>()?;
            users.sort();
            let mut st = c
                .prepare("SELECT token_id, expires FROM revoked_tokens ORDER BY token_id")
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err)?;
            let mut tokens = rows
                .map(|r| r.map(|(t, e)| (t, Timestamp(e))).map_err(db_err))
                .collect::<Result<Vec<_>, _>>()?;
            tokens.sort();
            Ok((users, tokens))
        })
        .await
    }
}
