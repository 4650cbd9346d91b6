//! Privileged test environment: loop-mounted Btrfs pools this test made.
//!
//! With `COCALC_TEST_PRIVILEGED=require`, a missing environment (not root,
//! no mkfs.btrfs, loop mount failing) fails the test naming what is
//! missing; without it the test is skipped with the reason on stderr once.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::{Arc, Once};

use cocalc_core::{ManualClock, SharedClock, Timestamp};
use cocalc_storage::{BtrfsConfig, BtrfsStorage, LoopPool};

/// Pools first: they must be unmounted before the temp dir is removed.
pub struct Env {
    pub pools: Vec<LoopPool>,
    pub dir: tempfile::TempDir,
}

impl Env {
    /// The pool directory inside pool `i`'s mount.
    pub fn pool(&self, i: usize) -> PathBuf {
        self.pools[i].path().join("pool")
    }
}

static SKIP_NOTICE: Once = Once::new();

/// `n` fresh loop pools of `mib` MiB each, or `None` (skip) when the
/// environment is missing and not required.
pub fn privileged(test: &str, n: usize, mib: u64) -> Option<Env> {
    let required = std::env::var("COCALC_TEST_PRIVILEGED").as_deref() == Ok("require");
    match try_env(n, mib) {
        Ok(env) => Some(env),
        Err(why) if required => panic!(
            "{test}: COCALC_TEST_PRIVILEGED=require but the Btrfs test environment is missing: {why}"
        ),
        Err(why) => {
            SKIP_NOTICE.call_once(|| {
                // Straight to stderr: libtest captures `eprintln!` of passing tests.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping privileged Btrfs tests ({why}); set COCALC_TEST_PRIVILEGED=require to make this an error"
                );
            });
            None
        }
    }
}

fn try_env(n: usize, mib: u64) -> Result<Env, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("cocalc-storage-test-")
        .tempdir_in("/var/tmp")
        .map_err(|e| format!("temp dir in /var/tmp: {e}"))?;
    let mut pools = Vec::new();
    for i in 0..n {
        let d = dir.path().join(format!("p{i}"));
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        pools.push(LoopPool::create(&d, mib << 20).map_err(|e| e.to_string())?);
    }
    Ok(Env { pools, dir })
}

/// A clock at 2026-11-24T00:00:00Z that tests move by hand.
pub fn clock() -> (ManualClock, SharedClock) {
    let c = ManualClock::new(Timestamp::from_secs(1_795_478_400));
    (c.clone(), Arc::new(c))
}

/// A Btrfs storage on pool `i` of `env`, with the real clock.
pub async fn btrfs(env: &Env, i: usize, config: BtrfsConfig) -> BtrfsStorage {
    BtrfsStorage::open(env.pool(i), config, Arc::new(cocalc_core::SystemClock))
        .await
        .expect("open pool")
}
