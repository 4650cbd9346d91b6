//! Per-project serialisation: calls on one project queue, others proceed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cocalc_core::ProjectId;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// One async mutex per project, created on first use.
#[derive(Debug, Default)]
pub(crate) struct ProjectLocks {
    map: Mutex<HashMap<ProjectId, Arc<AsyncMutex<()>>>>,
}

impl ProjectLocks {
    /// Waits for, and holds, `project`'s lock.
    pub(crate) async fn lock(&self, project: ProjectId) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(project).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Holds two projects' locks, always taken in id order (no deadlock).
    pub(crate) async fn lock_two(
        &self,
        a: ProjectId,
        b: ProjectId,
    ) -> (OwnedMutexGuard<()>, Option<OwnedMutexGuard<()>>) {
        if a == b {
            return (self.lock(a).await, None);
        }
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let g1 = self.lock(first).await;
        let g2 = self.lock(second).await;
        (g1, Some(g2))
    }
}
