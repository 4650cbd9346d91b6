//! [`HostModel`]: what a simulated host runs, driven by the real master
//! link's events.
//!
//! The link, the ACL cache and the master are the real code; the agent
//! with its runner and storage is not (a thousand podman hosts do not fit
//! in a test). The model keeps the agent's rule that matters to the
//! control plane, the generation fence: a start at a generation older
//! than one the host has seen is refused, and a fence stops a project
//! running at an older generation.

use std::collections::HashMap;
use std::sync::Mutex;

use cocalc_auth::KeySet;
use cocalc_core::{Generation, ProjectId};
use cocalc_host::master_link::HostEvents;

/// Why the model refused a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("project {project}: generation {asked} is older than {seen}, which this host has seen")]
pub struct StaleGeneration {
    /// The project.
    pub project: ProjectId,
    /// The generation asked for.
    pub asked: Generation,
    /// The newest generation this host has seen.
    pub seen: Generation,
}

#[derive(Debug, Default)]
struct State {
    running: HashMap<ProjectId, Generation>,
    seen: HashMap<ProjectId, Generation>,
    key_sets: u64,
    stops: u64,
    fences: u64,
}

/// One simulated host's projects, as the agent would hold them.
#[derive(Debug, Default)]
pub struct HostModel {
    state: Mutex<State>,
}

impl HostModel {
    /// An empty host.
    pub fn new() -> Self {
        HostModel::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `project` at `generation`, as a user's first request with a
    /// token of that generation would; refused below a generation seen.
    pub fn start(&self, project: ProjectId, generation: Generation) -> Result<(), StaleGeneration> {
        let mut s = self.lock();
        let seen = s.seen.get(&project).copied().unwrap_or(Generation(0));
        if generation < seen {
            return Err(StaleGeneration {
                project,
                asked: generation,
                seen,
            });
        }
        s.seen.insert(project, generation);
        s.running.insert(project, generation);
        Ok(())
    }

    /// The generation `project` runs at here, if it runs.
    pub fn running(&self, project: ProjectId) -> Option<Generation> {
        self.lock().running.get(&project).copied()
    }

    /// Every project running here, with its generation.
    pub fn running_projects(&self) -> Vec<(ProjectId, Generation)> {
        self.lock().running.iter().map(|(p, g)| (*p, *g)).collect()
    }

    /// Every project this host has seen, with the newest generation seen.
    pub fn known_generations(&self) -> Vec<(ProjectId, Generation)> {
        self.lock().seen.iter().map(|(p, g)| (*p, *g)).collect()
    }

    /// How many times the master's signing keys arrived.
    pub fn key_sets(&self) -> u64 {
        self.lock().key_sets
    }

    /// How many stops and fences the master sent.
    pub fn stops_and_fences(&self) -> (u64, u64) {
        let s = self.lock();
        (s.stops, s.fences)
    }
}

impl HostEvents for HostModel {
    fn signing_keys(&self, _keys: &KeySet) {
        self.lock().key_sets += 1;
    }

    fn start(&self, project: ProjectId, generation: Generation) {
        // A refused start is what the agent does too; nothing to report.
        let _ = HostModel::start(self, project, generation);
    }

    fn held(&self) -> Vec<(ProjectId, Generation)> {
        self.known_generations()
    }

    fn stop(&self, project: ProjectId) {
        let mut s = self.lock();
        s.stops += 1;
        s.running.remove(&project);
    }

    fn fence(&self, project: ProjectId, generation: Generation) {
        let mut s = self.lock();
        s.fences += 1;
        let seen = s.seen.entry(project).or_insert(generation);
        *seen = (*seen).max(generation);
        if s.running.get(&project).is_some_and(|g| *g < generation) {
            s.running.remove(&project);
        }
    }
}
