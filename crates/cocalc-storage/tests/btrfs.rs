//! Btrfs-only behaviour: quotas (and their escape routes), clone, scratch,
//! retention through the storage, stream checks (privileged: see `common`).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use cocalc_core::{Clock, Quota, Storage, StorageError};
use cocalc_storage::{
    apply_retention, BtrfsConfig, BtrfsStorage, QuotaMode, RetentionPolicy, SendStreamCheck,
};
use cocalc_testkit::storage_contract::{collect, project, put, tree_digest};

const MIB: u64 = 1 << 20;

/// Writes up to `mib` MiB into `path`; returns the MiB written and the
/// error that stopped it, if any.
fn fill(path: &std::path::Path, mib: u64) -> (u64, Option<std::io::Error>) {
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let chunk = vec![0xa5u8; MIB as usize];
    for i in 0..mib {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            return (i, Some(e));
        }
    }
    (mib, None)
}

fn is_quota_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_edquot) if libc_edquot == nix::libc::EDQUOT || libc_edquot == nix::libc::ENOSPC
    )
}

#[tokio::test]
async fn simple_quotas_are_used_where_the_kernel_has_them() {
    let Some(env) = common::privileged("simple_quotas_are_used_where_the_kernel_has_them", 1, 256)
    else {
        return;
    };
    let s = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    let expected = if std::path::Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
        QuotaMode::Simple
    } else {
        QuotaMode::Classic
    };
    assert_eq!(s.quota_mode(), expected);
    // Opening again keeps the mode.
    let again = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    assert_eq!(again.quota_mode(), expected);
}

#[tokio::test]
async fn writes_past_the_quota_fail_inside_the_project_only() {
    let Some(env) =
        common::privileged("writes_past_the_quota_fail_inside_the_project_only", 1, 512)
    else {
        return;
    };
    let cfg = BtrfsConfig::default().with_default_quota(Some(32 * MIB));
    let s = common::btrfs(&env, 0, cfg).await;
    let (p, q) = (project(30), project(31));
    let vp = s.create(p).await.unwrap();
    let vq = s.create(q).await.unwrap();
    assert_eq!(
        s.quota(p).await.unwrap(),
        Quota {
            max_bytes: Some(32 * MIB)
        }
    );
    let (written, err) = fill(&vp.home.join("big"), 64);
    let err = err.expect("a write past the quota fails");
    assert!(is_quota_error(&err), "EDQUOT/ENOSPC, got {err}");
    assert!(written <= 32, "stopped at the quota ({written} MiB)");
    // Another project is not affected.
    let (wq, eq) = fill(&vq.home.join("fine"), 16);
    assert!(
        eq.is_none() && wq == 16,
        "other project wrote {wq} MiB: {eq:?}"
    );
    let u = s.usage(p).await.unwrap();
    assert!(
        u.referenced_bytes <= 33 * MIB && u.referenced_bytes >= 16 * MIB,
        "usage {u:?}"
    );
    // Scratch counts against the same quota.
    let (_, serr) = fill(&vp.scratch.clone().unwrap().join("t"), 8);
    assert!(
        serr.is_some_and(|e| is_quota_error(&e)),
        "scratch is inside the quota"
    );
    // Raising the quota lets the project write again.
    s.set_quota(
        p,
        Quota {
            max_bytes: Some(128 * MIB),
        },
    )
    .await
    .unwrap();
    let (w2, e2) = fill(&vp.home.join("more"), 16);
    assert!(e2.is_none() && w2 == 16, "after raising: {w2} MiB, {e2:?}");
    s.set_quota(p, Quota { max_bytes: None }).await.unwrap();
    assert_eq!(s.quota(p).await.unwrap(), Quota { max_bytes: None });
}

#[tokio::test]
async fn nested_subvolume_cannot_escape_the_quota() {
    let Some(env) = common::privileged("nested_subvolume_cannot_escape_the_quota", 1, 512) else {
        return;
    };
    let s = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    if s.quota_mode() != QuotaMode::Simple {
        panic!("nested subvolumes are only contained under simple quotas; this kernel has none");
    }
    let p = project(32);
    let v = s.create(p).await.unwrap();
    s.set_quota(
        p,
        Quota {
            max_bytes: Some(32 * MIB),
        },
    )
    .await
    .unwrap();
    // What a user inside the project could do: make a subvolume and fill it.
    let nested = v.home.join("escape");
    libbtrfsutil::create_subvolume(&nested).expect("nested subvolume");
    let deeper = nested.join("deeper");
    libbtrfsutil::create_subvolume(&deeper).expect("nested twice");
    let (written, err) = fill(&deeper.join("big"), 64);
    let err = err.expect("the nested subvolume is inside the quota");
    assert!(is_quota_error(&err), "{err}");
    assert!(written <= 32, "{written} MiB");
    // Deleting the project removes nested subvolumes too.
    s.delete(p).await.unwrap();
    assert!(!v.home.exists());
}

#[tokio::test]
async fn clone_is_a_writable_independent_copy_with_the_same_quota() {
    let Some(env) = common::privileged(
        "clone_is_a_writable_independent_copy_with_the_same_quota",
        1,
        512,
    ) else {
        return;
    };
    let s = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    let (p, c1, c2) = (project(33), project(34), project(35));
    let v = s.create(p).await.unwrap();
    let q = Quota {
        max_bytes: Some(100 * MIB),
    };
    s.set_quota(p, q).await.unwrap();
    put(&v.home, "a/f.txt", b"one");
    let snap = s.snapshot(p).await.unwrap().unwrap();
    put(&v.home, "a/f.txt", b"two");

    let from_snap = s.clone_project(p, c1, Some(&snap.name)).await.unwrap();
    assert_eq!(
        std::fs::read(from_snap.home.join("a/f.txt")).unwrap(),
        b"one"
    );
    let live = s.clone_project(p, c2, None).await.unwrap();
    assert_eq!(tree_digest(&live.home), tree_digest(&v.home));
    put(&live.home, "a/f.txt", b"clone's own");
    assert_eq!(std::fs::read(v.home.join("a/f.txt")).unwrap(), b"two");
    assert_eq!(s.quota(c1).await.unwrap(), q);
    assert!(s.snapshots(c1).await.unwrap().is_empty());
    assert!(matches!(
        s.clone_project(p, c1, None).await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert_eq!(
        s.clone_project(project(36), project(37), None).await,
        Err(StorageError::NotFound(project(36)))
    );
    let mut all = s.list().await.unwrap();
    all.sort();
    let mut want = vec![p, c1, c2];
    want.sort();
    assert_eq!(all, want);
}

#[tokio::test]
async fn cold_start_resets_scratch_and_keeps_home() {
    let Some(env) = common::privileged("cold_start_resets_scratch_and_keeps_home", 1, 256) else {
        return;
    };
    let s = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    let p = project(38);
    let v = s.create(p).await.unwrap();
    let scratch = v.scratch.clone().unwrap();
    assert!(libbtrfsutil::is_subvolume(&scratch).unwrap());
    put(&scratch, "junk/x", b"tmp");
    put(&v.home, "keep", b"home");
    s.reset_scratch(p).await.unwrap();
    assert!(std::fs::read_dir(&scratch).unwrap().next().is_none());
    assert_eq!(std::fs::read(v.home.join("keep")).unwrap(), b"home");
    assert_eq!(
        s.reset_scratch(project(39)).await,
        Err(StorageError::NotFound(project(39)))
    );
}

#[tokio::test]
async fn incremental_stream_without_its_parent_is_refused_and_leaves_nothing() {
    let Some(env) = common::privileged(
        "incremental_stream_without_its_parent_is_refused_and_leaves_nothing",
        2,
        256,
    ) else {
        return;
    };
    let a = common::btrfs(&env, 0, BtrfsConfig::default()).await;
    let b = common::btrfs(&env, 1, BtrfsConfig::default()).await;
    let p = project(40);
    let v = a.create(p).await.unwrap();
    put(&v.home, "f", b"1");
    let s1 = a.snapshot(p).await.unwrap().unwrap();
    put(&v.home, "f", b"2");
    let s2 = a.snapshot(p).await.unwrap().unwrap();
    let inc = a.send(p, &s2.name, Some(&s1.name)).await.unwrap();
    match b.receive(p, inc).await {
        Err(StorageError::StreamIncomplete(msg)) => assert!(msg.contains("removed"), "{msg}"),
        other => panic!("expected StreamIncomplete, got {other:?}"),
    }
    assert_eq!(b.volume(p).await, Err(StorageError::NotFound(p)));
    let leftovers: Vec<_> = std::fs::read_dir(env.pool(1).join("snapshots"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A sent stream passes the framing check exactly.
    let bytes = collect(a.send(p, &s1.name, None).await.unwrap())
        .await
        .unwrap();
    let mut check = SendStreamCheck::new();
    check.feed(&bytes).unwrap();
    assert!(check.is_complete());
    assert_eq!(
        a.send(p, "2000-01-01T00:00:00.000Z", None).await.err(),
        Some(StorageError::SnapshotNotFound {
            project: p,
            name: "2000-01-01T00:00:00.000Z".into()
        })
    );
}

#[tokio::test]
async fn retention_with_a_fake_clock_deletes_old_snapshots() {
    let Some(env) = common::privileged("retention_with_a_fake_clock_deletes_old_snapshots", 1, 256)
    else {
        return;
    };
    let (clock, shared) = common::clock();
    let s = BtrfsStorage::open(env.pool(0), BtrfsConfig::default(), shared)
        .await
        .unwrap();
    let p = project(41);
    let v = s.create(p).await.unwrap();
    // One snapshot every 6 hours for 5 days.
    for i in 0..20 {
        put(&v.home, "f", format!("{i}").as_bytes());
        let snap = s.snapshot(p).await.unwrap().expect("changed");
        assert_eq!(snap.created, clock.now(), "named after the injected clock");
        assert!(snap.exclusive_bytes.is_some(), "size is reported");
        clock.advance(Duration::from_secs(6 * 3600));
    }
    let policy = RetentionPolicy {
        frequent: 2,
        daily: 3,
        weekly: 0,
        monthly: 0,
    };
    let deleted = apply_retention(&s, p, &policy, clock.now()).await.unwrap();
    let left: Vec<_> = s.snapshots(p).await.unwrap();
    // 2 newest (same day) + the last of each of the 2 days before.
    assert_eq!(left.len(), 4, "{left:?}");
    assert_eq!(deleted.len(), 16);
    assert!(deleted.iter().all(|d| left.iter().all(|l| &l.name != d)));
    let again = apply_retention(&s, p, &policy, clock.now()).await.unwrap();
    assert!(again.is_empty(), "retention is idempotent");
}

#[tokio::test]
async fn storages_on_two_pools_share_nothing() {
    let Some(env) = common::privileged("storages_on_two_pools_share_nothing", 2, 256) else {
        return;
    };
    let a = Arc::new(common::btrfs(&env, 0, BtrfsConfig::default()).await);
    let b = Arc::new(common::btrfs(&env, 1, BtrfsConfig::default()).await);
    let p = project(42);
    a.create(p).await.unwrap();
    assert_eq!(b.volume(p).await, Err(StorageError::NotFound(p)));
    b.create(p).await.unwrap();
    a.delete(p).await.unwrap();
    assert!(b.volume(p).await.is_ok());
}

#[tokio::test]
async fn quota_still_holds_after_restoring_the_whole_project() {
    let Some(env) = common::privileged(
        "quota_still_holds_after_restoring_the_whole_project",
        1,
        512,
    ) else {
        return;
    };
    let cfg = BtrfsConfig::default().with_default_quota(Some(32 * MIB));
    let s = common::btrfs(&env, 0, cfg).await;
    let p = project(43);
    let v = s.create(p).await.unwrap();
    put(&v.home, "small", b"before");
    let snap = s.snapshot(p).await.unwrap().unwrap();
    put(&v.home, "small", b"after");
    s.restore(p, &snap.name, None).await.unwrap();
    let home = s.volume(p).await.unwrap().home;
    assert_eq!(std::fs::read(home.join("small")).unwrap(), b"before");
    assert_eq!(
        s.quota(p).await.unwrap(),
        Quota {
            max_bytes: Some(32 * MIB)
        }
    );
    let (written, err) = fill(&home.join("big"), 64);
    let err = err.expect("the restored home is inside the quota");
    assert!(is_quota_error(&err), "{err}");
    assert!(written <= 32, "{written} MiB");
}
