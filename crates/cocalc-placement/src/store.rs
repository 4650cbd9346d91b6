//! The durable project→host map and host records: [`MapStore`], with
//! [`SqliteStore`] (the default, WAL mode) and [`MemoryStore`] (tests,
//! development).
//!
//! ## Consistency
//!
//! Every change is one transaction. [`MapStore::assign`] reads the current
//! generation, checks it against the caller's expectation (compare-and-set),
//! writes the new assignment with generation + 1 and stores the placement
//! decision in the same transaction — so after a crash at any point the map
//! holds the previous or the next assignment, never a mix, and the number of
//! stored decisions of a project equals its generation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use cocalc_core::{
    Generation, HostId, MoveRecord, PlacementDecision, ProjectId, ProjectPlacement, ProjectState,
    Timestamp,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::registry::HostRecord;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The project's generation is not the one the caller expected: someone
    /// else assigned or moved it first.
    #[error("project {project} is at generation {current}, expected {expected}")]
    Conflict {
        /// The project.
        project: ProjectId,
        /// The generation the caller expected.
        expected: Generation,
        /// The generation in the map.
        current: Generation,
    },
    /// The project has no map entry.
    #[error("project {0} is not placed")]
    NotPlaced(ProjectId),
    /// The database failed; may succeed if retried.
    #[error("map store: {0}")]
    Backend(String),
}

/// A stored placement decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDecision {
    /// The generation it produced.
    pub generation: Generation,
    /// The decision.
    pub decision: PlacementDecision,
    /// When it was made.
    pub decided_at: Timestamp,
}

/// The durable map. Implementations are safe to share between tasks.
#[async_trait]
pub trait MapStore: Send + Sync {
    /// Assigns `project` to `host`, bumping its generation by one.
    /// With `expected = Some(g)` the call fails with
    /// [`StoreError::Conflict`] unless the current generation is `g` (use
    /// `Generation(0)` for "not placed yet"). The decision is stored with it.
    async fn assign(
        &self,
        project: ProjectId,
        host: HostId,
        expected: Option<Generation>,
        decision: PlacementDecision,
        now: Timestamp,
    ) -> Result<ProjectPlacement, StoreError>;

    /// The project's entry, if placed.
    async fn placement(&self, project: ProjectId) -> Result<Option<ProjectPlacement>, StoreError>;

    /// The decision behind the current generation.
    async fn decision(&self, project: ProjectId) -> Result<Option<StoredDecision>, StoreError>;

    /// Records the project's state.
    async fn set_state(&self, project: ProjectId, state: ProjectState) -> Result<(), StoreError>;

    /// Records the last activity a host reported (later times only).
    async fn record_activity(&self, project: ProjectId, at: Timestamp) -> Result<(), StoreError>;

    /// Every project assigned to `host`.
    async fn projects_on(&self, host: HostId) -> Result<Vec<ProjectPlacement>, StoreError>;

    /// Creates or replaces a host record.
    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError>;

    /// Every host record.
    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;

    /// Stores `mv` as its project's latest move (replacing an earlier
    /// record of that project), durably before it returns: the move
    /// coordinator stores every phase before doing its work.
    async fn put_move(&self, mv: &MoveRecord) -> Result<(), StoreError>;

    /// The latest move of `project`, finished or not.
    async fn move_of(&self, project: ProjectId) -> Result<Option<MoveRecord>, StoreError>;

    /// Every move that is not finished, oldest first.
    async fn unfinished_moves(&self) -> Result<Vec<MoveRecord>, StoreError>;
}

fn state_str(s: ProjectState) -> &'static str {
    match s {
        ProjectState::Unplaced => "unplaced",
        ProjectState::Stopped => "stopped",
        ProjectState::Starting => "starting",
        ProjectState::Running => "running",
        ProjectState::Stopping => "stopping",
        ProjectState::Moving => "moving",
        ProjectState::Failed => "failed",
    }
}

fn parse_state(s: &str) -> ProjectState {
    match s {
        "stopped" => ProjectState::Stopped,
        "starting" => ProjectState::Starting,
        "running" => ProjectState::Running,
        "stopping" => ProjectState::Stopping,
        "moving" => ProjectState::Moving,
        "failed" => ProjectState::Failed,
        _ => ProjectState::Unplaced,
    }
}

fn placement_new(
    project: ProjectId,
    host: HostId,
    generation: Generation,
    state: ProjectState,
    last_activity: Option<Timestamp>,
) -> ProjectPlacement {
    ProjectPlacement::new(project, host, generation, state, last_activity)
}

/// The map in memory: the development and test implementation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    map: HashMap<ProjectId, ProjectPlacement>,
    decisions: HashMap<ProjectId, StoredDecision>,
    hosts: HashMap<HostId, HostRecord>,
    moves: HashMap<ProjectId, MoveRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl MapStore for MemoryStore {
    async fn assign(
        &self,
        project: ProjectId,
        host: HostId,
        expected: Option<Generation>,
        decision: PlacementDecision,
        now: Timestamp,
    ) -> Result<ProjectPlacement, StoreError> {
        let mut g = self.lock();
        let current = g.map.get(&project).map_or(Generation(0), |p| p.generation);
        if let Some(expected) = expected {
            if expected != current {
                return Err(StoreError::Conflict {
                    project,
                    expected,
                    current,
                });
            }
        }
        let last = g.map.get(&project).and_then(|p| p.last_activity);
        let p = placement_new(project, host, current.next(), ProjectState::Stopped, last);
        g.map.insert(project, p.clone());
        g.decisions.insert(
            project,
            StoredDecision {
                generation: p.generation,
                decision,
                decided_at: now,
            },
        );
        Ok(p)
    }

    async fn placement(&self, project: ProjectId) -> Result<Option<ProjectPlacement>, StoreError> {
        Ok(self.lock().map.get(&project).cloned())
    }

    async fn decision(&self, project: ProjectId) -> Result<Option<StoredDecision>, StoreError> {
        Ok(self.lock().decisions.get(&project).cloned())
    }

    async fn set_state(&self, project: ProjectId, state: ProjectState) -> Result<(), StoreError> {
        let mut g = self.lock();
        let p = g
            .map
            .get_mut(&project)
            .ok_or(StoreError::NotPlaced(project))?;
        p.state = state;
        Ok(())
    }

    async fn record_activity(&self, project: ProjectId, at: Timestamp) -> Result<(), StoreError> {
        let mut g = self.lock();
        let p = g
            .map
            .get_mut(&project)
            .ok_or(StoreError::NotPlaced(project))?;
        if p.last_activity.is_none_or(|t| t < at) {
            p.last_activity = Some(at);
        }
        Ok(())
    }

    async fn projects_on(&self, host: HostId) -> Result<Vec<ProjectPlacement>, StoreError> {
        let mut v: Vec<_> = self
            .lock()
            .map
            .values()
            .filter(|p| p.host == host)
            .cloned()
            .collect();
        v.sort_by_key(|p| p.project);
        Ok(v)
    }

    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.lock().hosts.insert(host.info.id, host.clone());
        Ok(())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let mut v: Vec<_> = self.lock().hosts.values().cloned().collect();
        v.sort_by_key(|h| h.info.id);
        Ok(v)
    }

    async fn put_move(&self, mv: &MoveRecord) -> Result<(), StoreError> {
        self.lock().moves.insert(mv.project, mv.clone());
        Ok(())
    }

    async fn move_of(&self, project: ProjectId) -> Result<Option<MoveRecord>, StoreError> {
        Ok(self.lock().moves.get(&project).cloned())
    }

    async fn unfinished_moves(&self) -> Result<Vec<MoveRecord>, StoreError> {
        let mut v: Vec<_> = self
            .lock()
            .moves
            .values()
            .filter(|m| !m.phase.is_finished())
            .cloned()
            .collect();
        v.sort_by_key(|m| (m.started, m.project));
        Ok(v)
    }
}

/// The map in SQLite (WAL mode, `synchronous=FULL`): the default store of
/// a single master.
///
/// With [`SqliteStore::cached`], [`MapStore::placement`] answers from memory
/// after the first query of a project (the open-project path reads it on
/// every call). Every write of this store removes the project's entry
/// while it still holds the connection, after the commit, and a miss fills
/// the entry under the same lock, so a cached answer is never older than
/// the last write *through this store*: turn it on only where this store is
/// the database's only writer (one master on its own SQLite file, as the
/// master daemon runs it).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    placements: Option<Arc<RwLock<PlacementCache>>>,
}

/// Most placements [`SqliteStore::cached`] keeps; the cache is emptied when
/// full.
pub const PLACEMENT_CACHE_CAPACITY: usize = 100_000;

type PlacementCache = HashMap<ProjectId, Option<ProjectPlacement>>;

/// Removes `project` from the cache, if there is one (called with the
/// connection held, after the write).
fn forget(cache: &Option<Arc<RwLock<PlacementCache>>>, project: ProjectId) {
    if let Some(c) = cache {
        c.write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&project);
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS project_map (
    project TEXT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL,
    generation INTEGER NOT NULL CHECK (generation > 0),
    state TEXT NOT NULL,
    last_activity INTEGER
);
CREATE INDEX IF NOT EXISTS project_map_host ON project_map(host);
CREATE TABLE IF NOT EXISTS placement_decisions (
    project TEXT NOT NULL,
    generation INTEGER NOT NULL,
    host TEXT NOT NULL,
    decision TEXT NOT NULL,
    decided_at INTEGER NOT NULL,
    PRIMARY KEY (project, generation)
);
CREATE TABLE IF NOT EXISTS hosts (
    host TEXT PRIMARY KEY NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    project TEXT PRIMARY KEY NOT NULL,
    phase TEXT NOT NULL,
    started INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS moves_unfinished ON moves(started)
    WHERE phase NOT IN ('done', 'rolled_back');
";

fn decode_move(json: &str) -> Result<MoveRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Backend(format!("corrupt move record: {e}")))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db_err)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(db_err)?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            placements: None,
        })
    }

    /// This store with placements cached in memory. Only for a store that
    /// is the sole writer of its database (see the type's docs).
    pub fn cached(mut self) -> Self {
        self.placements = Some(Arc::default());
        self
    }

    /// Runs `f` on the connection on a blocking thread.
    /// Runs one `UPDATE` of a placed project's row (`?1` the project,
    /// `?2` the value) and forgets its cached placement, also when the
    /// update fails; no row is [`StoreError::NotPlaced`].
    async fn update_placed(
        &self,
        project: ProjectId,
        sql: &'static str,
        value: rusqlite::types::Value,
    ) -> Result<(), StoreError> {
        let cache = self.placements.clone();
        self.with(move |c| {
            let n = c
                .execute(sql, params![project.to_string(), value])
                .map_err(db_err);
            forget(&cache, project);
            if n? == 0 {
                return Err(StoreError::NotPlaced(project));
            }
            Ok(())
        })
        .await
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// Synchronous assign on a bare connection, for callers outside a
    /// runtime (and the async one). It bypasses any [`SqliteStore::cached`]
    /// store on the same file: use it only where no such store runs.
    pub fn assign_blocking(
        conn: &mut Connection,
        project: ProjectId,
        host: HostId,
        expected: Option<Generation>,
        decision: &PlacementDecision,
        now: Timestamp,
    ) -> Result<ProjectPlacement, StoreError> {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let pkey = project.to_string();
        let row: Option<(i64, Option<i64>)> = tx
            .query_row(
                "SELECT generation, last_activity FROM project_map WHERE project = ?1",
                [&pkey],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err)?;
        let current = Generation(row.map_or(0, |(g, _)| g as u64));
        if let Some(expected) = expected {
            if expected != current {
                return Err(StoreError::Conflict {
                    project,
                    expected,
                    current,
                });
            }
        }
        let next = current.next();
        let json = serde_json::to_string(decision)
            .map_err(|e| StoreError::Backend(format!("encode decision: {e}")))?;
        tx.execute(
            "INSERT INTO project_map (project, host, generation, state) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(project) DO UPDATE SET host = ?2, generation = ?3, state = ?4",
            params![
                pkey,
                host.to_string(),
                next.0 as i64,
                state_str(ProjectState::Stopped)
            ],
        )
        .map_err(db_err)?;
        tx.execute(
            "INSERT INTO placement_decisions (project, generation, host, decision, decided_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![pkey, next.0 as i64, host.to_string(), json, now.as_millis()],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(placement_new(
            project,
            host,
            next,
            ProjectState::Stopped,
            row.and_then(|(_, a)| a).map(Timestamp),
        ))
    }
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| StoreError::Backend(format!("corrupt id in database: {e}")))
}

fn row_to_placement(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, i64, String, Option<i64>)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_placement(
    (p, h, g, s, a): (String, String, i64, String, Option<i64>),
) -> Result<ProjectPlacement, StoreError> {
    Ok(placement_new(
        parse_id(&p)?,
        parse_id(&h)?,
        Generation(g as u64),
        parse_state(&s),
        a.map(Timestamp),
    ))
}

#[async_trait]
impl MapStore for SqliteStore {
    async fn assign(
        &self,
        project: ProjectId,
        host: HostId,
        expected: Option<Generation>,
        decision: PlacementDecision,
        now: Timestamp,
    ) -> Result<ProjectPlacement, StoreError> {
        let cache = self.placements.clone();
        self.with(move |c| {
            let r = Self::assign_blocking(c, project, host, expected, &decision, now);
            forget(&cache, project);
            r
        })
        .await
    }

    async fn placement(&self, project: ProjectId) -> Result<Option<ProjectPlacement>, StoreError> {
        if let Some(cache) = &self.placements {
            if let Some(p) = cache
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&project)
            {
                return Ok(p.clone());
            }
        }
        let cache = self.placements.clone();
        self.with(move |c| {
            let p = c
                .query_row(
                    "SELECT project, host, generation, state, last_activity FROM project_map WHERE project = ?1",
                    [project.to_string()],
                    row_to_placement,
                )
                .optional()
                .map_err(db_err)?
                .map(to_placement)
                .transpose()?;
            if let Some(cache) = cache {
                // Still under the connection lock: no write can come between.
                let mut g = cache.write().unwrap_or_else(|p| p.into_inner());
                if g.len() >= PLACEMENT_CACHE_CAPACITY {
                    g.clear();
                }
                g.insert(project, p.clone());
            }
            Ok(p)
        })
        .await
    }

    async fn decision(&self, project: ProjectId) -> Result<Option<StoredDecision>, StoreError> {
        self.with(move |c| {
            let row: Option<(i64, String, i64)> = c
                .query_row(
                    "SELECT d.generation, d.decision, d.decided_at FROM placement_decisions d
                     JOIN project_map m ON m.project = d.project AND m.generation = d.generation
                     WHERE d.project = ?1",
                    [project.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(db_err)?;
            row.map(|(g, json, at)| {
                Ok(StoredDecision {
                    generation: Generation(g as u64),
                    decision: serde_json::from_str(&json)
                        .map_err(|e| StoreError::Backend(format!("corrupt decision: {e}")))?,
                    decided_at: Timestamp(at),
                })
            })
            .transpose()
        })
        .await
    }

    async fn set_state(&self, project: ProjectId, state: ProjectState) -> Result<(), StoreError> {
        self.update_placed(
            project,
            "UPDATE project_map SET state = ?2 WHERE project = ?1",
            state_str(state).to_string().into(),
        )
        .await
    }

    async fn record_activity(&self, project: ProjectId, at: Timestamp) -> Result<(), StoreError> {
        self.update_placed(
            project,
            "UPDATE project_map SET last_activity = MAX(COALESCE(last_activity, ?2), ?2)
             WHERE project = ?1",
            at.as_millis().into(),
        )
        .await
    }

    async fn projects_on(&self, host: HostId) -> Result<Vec<ProjectPlacement>, StoreError> {
        self.with(move |c| {
            let mut st = c
                .prepare(
                    "SELECT project, host, generation, state, last_activity FROM project_map
                     WHERE host = ?1 ORDER BY project",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([host.to_string()], row_to_placement)
                .map_err(db_err)?;
            rows.map(|r| r.map_err(db_err).and_then(to_placement))
                .collect()
        })
        .await
    }

    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let id = host.info.id.to_string();
        let json = serde_json::to_string(host)
            .map_err(|e| StoreError::Backend(format!("encode host: {e}")))?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO hosts (host, record) VALUES (?1, ?2)
                 ON CONFLICT(host) DO UPDATE SET record = ?2",
                params![id, json],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare("SELECT record FROM hosts ORDER BY host")
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.map(|r| {
                let json = r.map_err(db_err)?;
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::Backend(format!("corrupt host record: {e}")))
            })
            .collect()
        })
        .await
    }

    async fn put_move(&self, mv: &MoveRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(mv)
            .map_err(|e| StoreError::Backend(format!("encode move: {e}")))?;
        let (project, phase, started) = (
            mv.project.to_string(),
            mv.phase.as_str(),
            mv.started.as_millis(),
        );
        self.with(move |c| {
            c.execute(
                "INSERT INTO moves (project, phase, started, record) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(project) DO UPDATE SET phase = ?2, started = ?3, record = ?4",
                params![project, phase, started, json],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn move_of(&self, project: ProjectId) -> Result<Option<MoveRecord>, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT record FROM moves WHERE project = ?1",
                [project.to_string()],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(db_err)?
            .map(|json| decode_move(&json))
            .transpose()
        })
        .await
    }

    async fn unfinished_moves(&self) -> Result<Vec<MoveRecord>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT record FROM moves WHERE phase NOT IN ('done', 'rolled_back')
                     ORDER BY started, project",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.map(|r| decode_move(&r.map_err(db_err)?)).collect()
        })
        .await
    }
}
