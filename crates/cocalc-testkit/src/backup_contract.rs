//! The backup contract suite: behaviour every
//! [`BackupStore`](cocalc_core::BackupStore) must show, written once and run
//! against each implementation (see `cocalc-storage/tests/backup_*.rs`).
//!
//! Each check takes the store and a scratch directory of its own; trees
//! stand in for snapshots. Every check uses its own project ids, so all of
//! them may share one store.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use cocalc_core::{BackupError, BackupStore, SnapshotInfo, Timestamp};

use crate::storage_contract::{host, project, put, tree_digest};

fn snap(name: &str, ms: i64) -> SnapshotInfo {
    SnapshotInfo::new(name.to_string(), Timestamp(ms), None)
}

/// A tree with what projects hold: nested files, an empty directory, a
/// symlink, modes, a 1 MiB file, and (as root) files of another owner.
fn sample_tree(root: &Path) {
    put(root, "notes.txt", b"first version");
    put(root, "src/main.py", b"print('hi')\n");
    put(root, "src/deep/er/data.csv", b"a,b\n1,2\n");
    let big: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    put(root, "big.bin", &big);
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("src/main.py", root.join("link")).unwrap();
    let run = root.join("run.sh");
    put(root, "run.sh", b"#!/bin/sh\necho run\n");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(root.join("src"), std::fs::Permissions::from_mode(0o700)).unwrap();
    if nix_is_root() {
        std::os::unix::fs::lchown(root.join("notes.txt"), Some(2001), Some(2002)).unwrap();
        std::os::unix::fs::lchown(root.join("src"), Some(2001), Some(2001)).unwrap();
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Owners and modification times of every entry, by path.
fn owners_and_times(root: &Path) -> Vec<(String, u32, u32, i64)> {
    let mut out = Vec::new();
    for rel in tree_digest(root).keys() {
        let m = std::fs::symlink_metadata(root.join(rel)).unwrap();
        let mtime = if m.is_dir() { 0 } else { m.mtime() };
        out.push((rel.clone(), m.uid(), m.gid(), mtime));
    }
    out
}

/// Backups list oldest first with what they hold; a restore reproduces the
/// tree (contents, modes, symlinks, owners, times); other projects see
/// nothing of them.
pub async fn backup_list_restore(b: &dyn BackupStore, scratch: &Path) {
    let (p, q, h) = (project(101), project(102), host(1));
    assert_eq!(
        b.backups(p).await.unwrap(),
        vec![],
        "a new project has none"
    );
    let t1 = scratch.join("t1");
    sample_tree(&t1);
    let s1 = snap("2026-01-02T03:04:05.006Z", 1_767_323_045_006);
    let b1 = b.backup(p, h, &s1, &t1).await.unwrap();
    assert_eq!((b1.project, b1.host), (p, h));
    assert_eq!(
        (b1.snapshot.as_str(), b1.taken),
        (s1.name.as_str(), s1.created)
    );
    assert_eq!(b1.files, 6, "files, symlinks included: {b1:?}");
    assert!(b1.bytes >= 1 << 20, "{b1:?}");
    assert!(b1.added_bytes > 0, "{b1:?}");

    let t2 = scratch.join("t2");
    sample_tree(&t2);
    put(&t2, "notes.txt", b"second version");
    put(&t2, "new.txt", b"new");
    let s2 = snap("2026-01-02T04:04:05.006Z", 1_767_326_645_006);
    let b2 = b.backup(p, h, &s2, &t2).await.unwrap();
    assert_ne!(b1.id, b2.id);
    let list = b.backups(p).await.unwrap();
    assert_eq!(
        list,
        vec![b1.clone(), b2.clone()],
        "oldest first, as returned"
    );
    assert_eq!(b.backups(q).await.unwrap(), vec![], "not another project's");

    let r1 = scratch.join("r1");
    assert_eq!(b.restore(p, &b1.id, &r1).await.unwrap(), b1);
    assert_eq!(tree_digest(&r1), tree_digest(&t1), "the first tree, whole");
    assert_eq!(
        owners_and_times(&r1),
        owners_and_times(&t1),
        "owners, times"
    );
    let r2 = scratch.join("r2");
    std::fs::create_dir_all(&r2).unwrap();
    b.restore(p, &b2.id, &r2).await.unwrap();
    assert_eq!(tree_digest(&r2), tree_digest(&t2), "the second tree");

    // Refusals.
    assert!(
        matches!(
            b.restore(p, &b1.id, &r2).await,
            Err(BackupError::Invalid(_))
        ),
        "into a directory that is not empty"
    );
    assert_eq!(tree_digest(&r2), tree_digest(&t2), "left as it was");
    let nowhere = scratch.join("r3");
    for id in [b1.id.as_str(), "0123abcd", "", "../x"] {
        let e = b.restore(q, id, &nowhere).await.unwrap_err();
        assert!(matches!(e, BackupError::NotFound { .. }), "{id:?}: {e}");
    }
    assert!(!nowhere.exists(), "nothing written for a missing backup");
    let file = t1.join("notes.txt");
    let e = b.backup(q, h, &s1, &file).await.unwrap_err();
    assert!(matches!(e, BackupError::Invalid(_)), "a file as tree: {e}");
    let e = b
        .backup(q, h, &s1, &scratch.join("missing"))
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Invalid(_)), "a missing tree: {e}");
    assert_eq!(b.backups(q).await.unwrap(), vec![], "no backup listed");
}

/// `forget` removes exactly the named backups of that project; ids it does
/// not hold are refused and nothing is removed.
pub async fn forget_removes_only_what_it_names(b: &dyn BackupStore, scratch: &Path) {
    let (p, q, h) = (project(103), project(104), host(2));
    let mut made = Vec::new();
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let t = scratch.join(format!("t{i}"));
        put(&t, "f.txt", text.as_bytes());
        let s = snap(
            &format!("2026-02-0{}T00:00:00.000Z", i + 1),
            1_769_904_000_000 + i as i64 * 86_400_000,
        );
        made.push(b.backup(p, h, &s, &t).await.unwrap());
    }
    let tq = scratch.join("tq");
    put(&tq, "g.txt", b"q");
    let bq = b
        .backup(
            q,
            h,
            &snap("2026-02-01T00:00:00.000Z", 1_769_904_000_000),
            &tq,
        )
        .await
        .unwrap();

    let e = b
        .forget(p, &[made[0].id.clone(), bq.id.clone()])
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::NotFound { .. }), "{e}");
    assert_eq!(b.backups(p).await.unwrap().len(), 3, "nothing removed");
    assert_eq!(b.backups(q).await.unwrap(), vec![bq.clone()]);

    b.forget(p, &[made[0].id.clone(), made[2].id.clone()])
        .await
        .unwrap();
    assert_eq!(b.backups(p).await.unwrap(), vec![made[1].clone()]);
    assert_eq!(b.backups(q).await.unwrap(), vec![bq], "q's untouched");
    let r = scratch.join("r");
    b.restore(p, &made[1].id, &r).await.unwrap();
    assert_eq!(std::fs::read(r.join("f.txt")).unwrap(), b"two");
    b.forget(p, &[]).await.unwrap();
    assert_eq!(b.backups(p).await.unwrap().len(), 1);
}
