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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> ProjectId {
        let mut b = [0u8; 16];
        b[6] = 0x40;
        b[8] = 0x80;
        b[15] = n;
        ProjectId::from_bytes(b)
    }

    #[tokio::test]
    async fn same_project_waits_other_projects_do_not() {
        let locks = ProjectLocks::default();
        let held = locks.lock(id(1)).await;
        // Another project: at once.
        tokio::time::timeout(Duration::from_millis(100), locks.lock(id(2)))
            .await
            .expect("a different project is not blocked");
        // The same project: only after the holder lets go.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locks.lock(id(1)))
                .await
                .is_err(),
            "the same project waits"
        );
        drop(held);
        tokio::time::timeout(Duration::from_millis(100), locks.lock(id(1)))
            .await
            .expect("free again");
    }

    #[tokio::test]
    async fn two_locks_in_either_order_do_not_deadlock() {
        let locks = Arc::new(ProjectLocks::default());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let locks = locks.clone();
            tasks.push(tokio::spawn(async move {
                let (a, b) = if i % 2 == 0 {
                    (id(1), id(2))
                } else {
                    (id(2), id(1))
                };
                let _g = locks.lock_two(a, b).await;
                tokio::task::yield_now().await;
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("no deadlock")
                .unwrap();
        }
        let (_g, none) = locks.lock_two(id(3), id(3)).await;
        assert!(none.is_none(), "one lock for the same project");
    }
}
