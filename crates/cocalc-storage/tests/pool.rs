//! Pool set-up: loop pools clean up after themselves, classic qgroups work
//! where chosen (privileged: see `common`).

mod common;

use std::io::Write;

use cocalc_core::{Quota, Storage};
use cocalc_storage::{init_pool, BtrfsConfig, LoopPool, QuotaMode, QuotaPreference};
use cocalc_testkit::storage_contract::project;

fn mounted(path: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

#[test]
fn loop_pool_is_unmounted_and_detached_even_when_a_test_panics() {
    let Some(env) = common::privileged(
        "loop_pool_is_unmounted_and_detached_even_when_a_test_panics",
        0,
        0,
    ) else {
        return;
    };
    let dir = env.dir.path().join("panicky");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.clone();
    let r = std::thread::spawn(move || {
        let pool = LoopPool::create(&d, 256 << 20).unwrap();
        assert!(mounted(pool.path()));
        std::fs::write(pool.path().join("busy"), b"x").unwrap();
        panic!("test failure while the pool is mounted");
    })
    .join();
    assert!(r.is_err(), "the thread panicked");
    let mnt = dir.join("mnt");
    assert!(!mounted(&mnt), "unmounted after the panic");
    assert!(!dir.join("pool.img").exists(), "image removed");
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(
        !loops.contains(&*dir.to_string_lossy()),
        "loop device detached: {loops}"
    );
}

#[tokio::test]
async fn classic_qgroups_enforce_the_quota_when_chosen() {
    let Some(env) = common::privileged("classic_qgroups_enforce_the_quota_when_chosen", 1, 512)
    else {
        return;
    };
    let pool = env.pool(0);
    let info = init_pool(&pool, QuotaPreference::Classic).unwrap();
    assert_eq!(info.quota_mode, QuotaMode::Classic);
    // Opening with another preference keeps what the filesystem has.
    let cfg = BtrfsConfig::default()
        .with_quota_preference(QuotaPreference::Simple)
        .with_default_quota(Some(24 << 20));
    let s = cocalc_storage::BtrfsStorage::open(
        &pool,
        cfg,
        std::sync::Arc::new(cocalc_core::SystemClock),
    )
    .await
    .unwrap();
    assert_eq!(s.quota_mode(), QuotaMode::Classic);
    let p = project(60);
    let v = s.create(p).await.unwrap();
    assert_eq!(
        s.quota(p).await.unwrap(),
        Quota {
            max_bytes: Some(24 << 20)
        }
    );
    let mut f = std::fs::File::create(v.home.join("big")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut failed = None;
    for i in 0..64 {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            failed = Some((i, e));
            break;
        }
    }
    let (at, e) = failed.expect("the quota stops the writer");
    assert!(at <= 24, "stopped at {at} MiB: {e}");
    let u = s.usage(p).await.unwrap();
    assert!(u.referenced_bytes <= 25 << 20, "{u:?}");
    s.delete(p).await.unwrap();
}

#[test]
fn a_directory_that_is_not_btrfs_is_refused() {
    let d = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let st = nix::sys::statfs::statfs(d.path()).unwrap();
    if st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
        eprintln!("temp dir is on Btrfs: nothing to refuse");
        return;
    }
    let err = init_pool(d.path(), QuotaPreference::Auto).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: not on a Btrfs filesystem", d.path().display())
    );
}
