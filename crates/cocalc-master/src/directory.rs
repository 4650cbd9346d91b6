//! The master's directory: users with API keys, projects with owners and
//! collaborators, and one-time host bootstrap tokens — in SQLite.
//!
//! API keys and bootstrap tokens are stored only as BLAKE2b-256 hashes; the
//! secret is shown once when created.

use std::path::Path;
use std::sync::{Arc, Mutex};

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
    let mut h = Blake2bVar::new(32).expect("valid output length");
    h.update(secret.as_bytes());
    let mut out = [0u8; 32];
    h.finalize_variable(&mut out)
        .expect("buffer has the output length");
    out.iter().map(|b| format!("{b:02x}")).collect()
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
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    hash TEXT PRIMARY KEY NOT NULL,
    expires INTEGER NOT NULL,
    used_at INTEGER
);
";

/// The directory database.
#[derive(Debug, Clone)]
pub struct Directory {
    conn: Arc<Mutex<Connection>>,
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
        Ok(Directory {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The user holding the API key with this hash.
    pub fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, MasterError> {
        self.lock()
            .query_row(
                "SELECT id, name, not_before FROM users WHERE key_hash = ?1",
                [key_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?
            .map(Self::user_from_row)
            .transpose()
    }

    /// A user by id or by name.
    pub fn user(&self, id_or_name: &str) -> Result<Option<User>, MasterError> {
        self.lock()
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

    /// A project by id.
    pub fn project(&self, id: ProjectId) -> Result<Option<Project>, MasterError> {
        self.lock()
            .query_row(
                "SELECT id, name, owner, image FROM projects WHERE id = ?1",
                [id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db)?
            .map(Self::project_from_row)
            .transpose()
    }

    /// Projects `user` can access, with their permission, by name.
    pub fn projects_of(&self, user: UserId) -> Result<Vec<(Project, Permission)>, MasterError> {
        let c = self.lock();
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

    /// `user`'s permission on `project`, if any.
    pub fn permission(
        &self,
        project: ProjectId,
        user: UserId,
    ) -> Result<Option<Permission>, MasterError> {
        self.lock()
            .query_row(
                "SELECT perm FROM collaborators WHERE project = ?1 AND user = ?2",
                params![project.to_string(), user.to_string()],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(db)?
            .map(parse)
            .transpose()
    }

    /// Every collaborator of a project.
    pub fn collaborators(&self, project: ProjectId) -> Result<Vec<Collaborator>, MasterError> {
        let c = self.lock();
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
        self.lock()
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
            .lock()
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
