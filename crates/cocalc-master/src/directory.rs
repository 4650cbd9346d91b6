//! The master's directory: users with API keys, projects with owners and
//! collaborators, and one-time host bootstrap tokens — in SQLite.
//!
//! API keys and bootstrap tokens are stored only as BLAKE2b-256 hashes; the
//! secret is shown once when created.
//!
//! ## Caching
//!
//! The lookups on the open-project path (API key → user, project, a user's
//! permission on a project) are answered from memory after their first
//! query. This is sound because the master is the only writer of its
//! directory database, and every write goes through [`Directory`]:
//!
//! * a statement that may change users, projects or collaborators runs under
//!   the invalidating lock (`lock`), which empties the caches when it is
//!   released, while the connection is still held, so a reader never sees
//!   an answer older than the last completed write (ACL changes and
//!   sign-outs are seen by the very next call);
//! * a cache miss queries and fills the cache under the same connection
//!   lock, so it cannot interleave with a write and cache a stale row.
//!
//! Each cache holds at most [`CACHE_CAPACITY`] entries and is emptied when
//! full (no unbounded growth from random keys or ids; unknown API keys are
//! never cached).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use cocalc_core::wire::Collaborator;
use cocalc_core::{Permission, ProjectId, Timestamp, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MasterError;

/// A user as the directory holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Unique name.
    pub name: String,
    /// Tokens issued before this are revoked ("sign out everywhere").
    pub not_before: Option<Timestamp>,
}

/// A project as the directory holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// Id.
    pub id: ProjectId,
    /// Name, unique per owner.
    pub name: String,
    /// Owner (always `admin`).
    pub owner: UserId,
    /// Requested image.
    pub image: Option<String>,
}

/// Hex BLAKE2b-256 of a secret.
pub fn hash_secret(secret: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut h = Blake2bVar::new(32).expect("valid output length");
    h.update(secret.as_bytes());
    let mut out = [0u8; 32];
    h.finalize_variable(&mut out)
        .expect("buffer has the output length");
    let mut hex = String::with_capacity(64);
    for b in out {
        hex.push(HEX[usize::from(b >> 4)] as char);
        hex.push(HEX[usize::from(b & 15)] as char);
    }
    hex
}

/// A fresh user API key (`cuk.<43 base64url characters>`).
pub fn new_api_key(random: [u8; 32]) -> String {
    format!("cuk.{}", URL_SAFE_NO_PAD.encode(random))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    not_before INTEGER
);
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    image TEXT,
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS collaborators (
    project TEXT NOT NULL,
    user TEXT NOT NULL,
    perm TEXT NOT NULL,
    PRIMARY KEY (project, user)
);
CREATE INDEX IF NOT EXISTS collaborators_user ON collaborators(user);
-- Recent sign-outs, replayed to every host whose push channel opens.
CREATE INDEX IF NOT EXISTS users_not_before ON users(not_before);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    hash TEXT PRIMARY KEY NOT NULL,
    expires INTEGER NOT NULL,
    used_at INTEGER
);
";

/// Most entries each directory cache holds before it is emptied.
pub const CACHE_CAPACITY: usize = 100_000;

/// What the open-project path reads, kept in memory (see the module docs).
#[derive(Debug, Default)]
struct Caches {
    users_by_key: HashMap<String, User>,
    projects: HashMap<ProjectId, Project>,
    permissions: HashMap<(ProjectId, UserId), Option<Permission>>,
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    map.insert(k, v);
}

/// The directory database.
#[derive(Debug, Clone)]
pub struct Directory {
    conn: Arc<Mutex<Connection>>,
    caches: Arc<RwLock<Caches>>,
}

/// The connection, held for a statement that may change users, projects or
/// collaborators: releasing it empties the caches first.
struct Write<'a> {
    conn: std::sync::MutexGuard<'a, Connection>,
    caches: &'a RwLock<Caches>,
}

impl std::ops::Deref for Write<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        // Runs before `conn` is released: no reader can refill the caches
        // from the old rows in between.
        *self.caches.write().unwrap_or_else(|p| p.into_inner()) = Caches::default();
    }
}

fn db(e: rusqlite::Error) -> MasterError {
    MasterError::Internal(format!("directory: {e}"))
}

fn parse<T: std::str::FromStr>(s: String) -> Result<T, MasterError> {
    s.parse()
        .map_err(|_| MasterError::Internal(format!("corrupt id in directory: {s}")))
}

impl Directory {
    /// Opens (creating) the directory at `path`; `None` = in memory.
    pub fn open(path: Option<&Path>) -> Result<Self, MasterError> {
        let conn = match path {
            Some(p) => Connection::open(p),
            None => Connection::open_in_memory(),
        }
        .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(crate::ssh::SCHEMA).map_err(db)?;
        conn.execute_batch(crate::proxy_keys::SCHEMA).map_err(db)?;
        Ok(Directory {
            conn: Arc::new(Mutex::new(conn)),
            caches: Arc::default(),
        })
    }

    /// The connection for any statement; empties the caches when released
    /// (the safe default for writes).
    fn lock(&self) -> Write<'_> {
        Write {
            conn: self.conn.lock().unwrap_or_else(|p| p.into_inner()),
            caches: &self.caches,
        }
    }

    /// The connection for statements that change nothing the caches hold
    /// (queries, bootstrap tokens).
    fn lock_cache_unchanged(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn caches(&self) -> std::sync::RwLockReadGuard<'_, Caches> {
        self.caches.read().unwrap_or_else(|p| p.into_inner())
    }

    fn caches_mut(&self) -> std::sync::RwLockWriteGuard<'_, Caches> {
        self.caches.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the locked connection, for tables kept by other modules
    /// that the caches do not hold (SSH keys).
    pub(crate) fn with_conn<R>(&self, f: impl FnOnce(&Connection) -> R) -> R {
        f(&self.lock_cache_unchanged())
    }

    /// How many users and projects there are.
    pub fn counts(&self) -> Result<(u64, u64), MasterError> {
        let c = self.lock_cache_unchanged();
        let count = |table: &str| -> Result<u64, MasterError> {
            c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(db)
        };
        Ok((count("users")?, count("projects")?))
    }

    /// Creates a user; `key_hash` is the hash of the API key shown to them.
    pub fn create_user(&self, id: UserId, name: &str, key_hash: &str) -> Result<User, MasterError> {
        if name.is_empty() || name.len() > 64 {
            return Err(MasterError::BadRequest(
                "user name must have 1 to 64 characters".into(),
            ));
        }
        let n = self
            .lock()
            .execute(
                "INSERT INTO users (id, name, key_hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![id.to_string(), name, key_hash],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(MasterError::Conflict(format!(
                "user name {name:?} is taken"
            )));
        }
        Ok(User {
            id,
            name: name.into(),
            not_before: None,
        })
    }

    fn user_from_row(r: (String, String, Option<i64>)) -> Result<User, MasterError> {
        Ok(User {
            id: parse(r.0)?,
            name: r.1,
            not_before: r.2.map(Timestamp),
        })
    }

    /// The user holding the API key with this hash (cached).
    pub fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, MasterError> {
        if let Some(u) = self.caches().users_by_key.get(key_hash) {
            return Ok(Some(u.clone()));
        }
        let c = self.lock_cache_unchanged();
        let user = c
            .query_row(
                "SELECT id, name, not_before FROM users WHERE key_hash = ?1",
                [key_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?
            .map(Self::user_from_row)
            .transpose()?;
        if let Some(u) = &user {
            bounded_insert(
                &mut self.caches_mut().users_by_key,
                key_hash.to_string(),
                u.clone(),
            );
        }
        drop(c);
        Ok(user)
    }

    /// A user by id or by name.
    pub fn user(&self, id_or_name: &str) -> Result<Option<User>, MasterError> {
        self.lock_cache_unchanged()
            .query_row(
                "SELECT id, name, not_before FROM users WHERE id = ?1 OR name = ?1",
                [id_or_name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?
            .map(Self::user_from_row)
            .transpose()
    }

    /// Every user whose revocation cutoff is later than `after`, with the
    /// cutoff.
    pub fn cutoffs_after(&self, after: Timestamp) -> Result<Vec<(UserId, Timestamp)>, MasterError> {
        let c = self.lock_cache_unchanged();
        let mut stmt = c
            .prepare("SELECT id, not_before FROM users WHERE not_before > ?1")
            .map_err(db)?;
        let rows = stmt
            .query_map([after.as_millis()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, t) = row.map_err(db)?;
            out.push((parse(id)?, Timestamp(t)));
        }
        Ok(out)
    }

    /// Sets the user's revocation cutoff.
    pub fn set_not_before(&self, user: UserId, t: Timestamp) -> Result<(), MasterError> {
        self.lock()
            .execute(
                "UPDATE users SET not_before = ?2 WHERE id = ?1",
                params![user.to_string(), t.as_millis()],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Creates a project owned by `owner` (who becomes its admin), in one
    /// transaction.
    pub fn create_project(
        &self,
        id: ProjectId,
        name: &str,
        owner: UserId,
        image: Option<&str>,
    ) -> Result<Project, MasterError> {
        if name.is_empty() || name.len() > 100 || name.contains('/') {
            return Err(MasterError::BadRequest(
                "project name must have 1 to 100 characters and no '/'".into(),
            ));
        }
        let mut c = self.lock();
        let tx = c.transaction().map_err(db)?;
        let n = tx
            .execute(
                "INSERT INTO projects (id, name, owner, image) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![id.to_string(), name, owner.to_string(), image],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(MasterError::Conflict(format!(
                "you already have a project named {name:?}"
            )));
        }
        tx.execute(
            "INSERT INTO collaborators (project, user, perm) VALUES (?1, ?2, 'admin')",
            params![id.to_string(), owner.to_string()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Project {
            id,
            name: name.into(),
            owner,
            image: image.map(str::to_string),
        })
    }

    fn project_from_row(
        r: (String, String, String, Option<String>),
    ) -> Result<Project, MasterError> {
        Ok(Project {
            id: parse(r.0)?,
            name: r.1,
            owner: parse(r.2)?,
            image: r.3,
        })
    }

    /// A project by id (cached).
    pub fn project(&self, id: ProjectId) -> Result<Option<Project>, MasterError> {
        if let Some(p) = self.caches().projects.get(&id) {
            return Ok(Some(p.clone()));
        }
        let c = self.lock_cache_unchanged();
        let project = c
            .query_row(
                "SELECT id, name, owner, image FROM projects WHERE id = ?1",
                [id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db)?
            .map(Self::project_from_row)
            .transpose()?;
        if let Some(p) = &project {
            bounded_insert(&mut self.caches_mut().projects, id, p.clone());
        }
        drop(c);
        Ok(project)
    }

    /// Projects `user` can access, with their permission, by name.
    pub fn projects_of(&self, user: UserId) -> Result<Vec<(Project, Permission)>, MasterError> {
        let c = self.lock_cache_unchanged();
        let mut st = c
            .prepare(
                "SELECT p.id, p.name, p.owner, p.image, c.perm FROM projects p
                 JOIN collaborators c ON c.project = p.id WHERE c.user = ?1 ORDER BY p.name",
            )
            .map_err(db)?;
        let rows = st
            .query_map([user.to_string()], |r| {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?),
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(db)?;
        rows.map(|r| {
            let (p, perm) = r.map_err(db)?;
            Ok((Self::project_from_row(p)?, parse(perm)?))
        })
        .collect()
    }

    /// `user`'s permission on `project`, if any (cached).
    pub fn permission(
        &self,
        project: ProjectId,
        user: UserId,
    ) -> Result<Option<Permission>, MasterError> {
        if let Some(p) = self.caches().permissions.get(&(project, user)) {
            return Ok(*p);
        }
        let c = self.lock_cache_unchanged();
        let perm = c
            .query_row(
                "SELECT perm FROM collaborators WHERE project = ?1 AND user = ?2",
                params![project.to_string(), user.to_string()],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(db)?
            .map(parse)
            .transpose()?;
        bounded_insert(&mut self.caches_mut().permissions, (project, user), perm);
        drop(c);
        Ok(perm)
    }

    /// Every collaborator of a project.
    pub fn collaborators(&self, project: ProjectId) -> Result<Vec<Collaborator>, MasterError> {
        let c = self.lock_cache_unchanged();
        let mut st = c
            .prepare("SELECT user, perm FROM collaborators WHERE project = ?1 ORDER BY user")
            .map_err(db)?;
        let rows = st
            .query_map([project.to_string()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db)?;
        rows.map(|r| {
            let (u, p) = r.map_err(db)?;
            Ok(Collaborator {
                user: parse(u)?,
                permission: parse(p)?,
            })
        })
        .collect()
    }

    /// Sets (or with `None` removes) a collaborator. The owner cannot be
    /// changed or removed.
    pub fn set_collaborator(
        &self,
        project: &Project,
        user: UserId,
        perm: Option<Permission>,
    ) -> Result<(), MasterError> {
        if user == project.owner {
            return Err(MasterError::BadRequest(
                "the owner's access cannot be changed".into(),
            ));
        }
        let c = self.lock();
        match perm {
            Some(p) => c.execute(
                "INSERT INTO collaborators (project, user, perm) VALUES (?1, ?2, ?3)
                 ON CONFLICT(project, user) DO UPDATE SET perm = ?3",
                params![project.id.to_string(), user.to_string(), p.as_str()],
            ),
            None => c.execute(
                "DELETE FROM collaborators WHERE project = ?1 AND user = ?2",
                params![project.id.to_string(), user.to_string()],
            ),
        }
        .map_err(db)?;
        Ok(())
    }

    /// Stores a bootstrap token's hash with its expiry.
    pub fn add_bootstrap(&self, hash: &str, expires: Timestamp) -> Result<(), MasterError> {
        self.lock_cache_unchanged()
            .execute(
                "INSERT INTO bootstrap_tokens (hash, expires) VALUES (?1, ?2)",
                params![hash, expires.as_millis()],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Uses a bootstrap token up: `Ok` only once, before it expires.
    pub fn consume_bootstrap(&self, hash: &str, now: Timestamp) -> Result<(), MasterError> {
        let n = self
            .lock_cache_unchanged()
            .execute(
                "UPDATE bootstrap_tokens SET used_at = ?2
                 WHERE hash = ?1 AND used_at IS NULL AND expires > ?2",
                params![hash, now.as_millis()],
            )
            .map_err(db)?;
        if n == 1 {
            Ok(())
        } else {
            Err(MasterError::Unauthorized(
                "bootstrap token unknown, expired or already used; mint a new one with \
                 `cocalc host bootstrap-token`"
                    .into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_lookups_see_every_write_at_once() {
        let d = Directory::open(None).unwrap();
        let (alice, bob) = (UserId::new_v4([1; 16]), UserId::new_v4([2; 16]));
        d.create_user(alice, "alice", "ha").unwrap();
        d.create_user(bob, "bob", "hb").unwrap();
        let p = d
            .create_project(ProjectId::new_v4([3; 16]), "p", alice, None)
            .unwrap();
        // Fill the caches, then change what they hold.
        assert_eq!(d.permission(p.id, bob).unwrap(), None);
        assert_eq!(d.user_by_key_hash("hb").unwrap().unwrap().not_before, None);
        assert_eq!(d.project(p.id).unwrap().unwrap(), p);
        d.set_collaborator(&p, bob, Some(Permission::Write))
            .unwrap();
        assert_eq!(d.permission(p.id, bob).unwrap(), Some(Permission::Write));
        d.set_collaborator(&p, bob, None).unwrap();
        assert_eq!(d.permission(p.id, bob).unwrap(), None);
        d.set_not_before(bob, Timestamp(7)).unwrap();
        assert_eq!(
            d.user_by_key_hash("hb").unwrap().unwrap().not_before,
            Some(Timestamp(7))
        );
        assert_eq!(
            d.cutoffs_after(Timestamp(6)).unwrap(),
            vec![(bob, Timestamp(7))]
        );
        assert_eq!(d.cutoffs_after(Timestamp(7)).unwrap(), vec![]);
        // Unknown keys are refused every time and never cached.
        assert_eq!(d.user_by_key_hash("nope").unwrap(), None);
        assert!(!d.caches().users_by_key.contains_key("nope"));
        // A clone shares the caches and the invalidation.
        let d2 = d.clone();
        assert_eq!(d2.permission(p.id, alice).unwrap(), Some(Permission::Admin));
        assert_eq!(hash_secret("x").len(), 64);
        assert_eq!(
            hash_secret(""),
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
        );
    }
}
