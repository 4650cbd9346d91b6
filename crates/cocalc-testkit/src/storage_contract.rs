//! The storage contract suite: behaviour every [`Storage`] implementation
//! must show, written once and run against each backend.
//!
//! Each check is an async function that panics (with a message saying which
//! promise broke) on failure. The checks that move data between hosts take
//! two storages (`a` sends, `b` receives). Files are written through the
//! paths in [`VolumeInfo`](cocalc_core::VolumeInfo), as a project would.
//! Every check uses its own project ids, so all of them may share storages.
//!
//! ```text
//! // In a backend's tests (see cocalc-storage/tests/contract_*.rs):
//! #[tokio::test]
//! async fn snapshot_only_when_changed() {
//!     let s = make_storage();
//!     cocalc_testkit::storage_contract::snapshot_only_when_changed(&s).await;
//! }
//! ```

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cocalc_core::{ByteStream, ProjectId, Quota, Storage, StorageError};
use sha2::{Digest, Sha256};

/// A project id unique to one check (`n` distinguishes checks).
pub fn project(n: u8) -> ProjectId {
    ProjectId::from_bytes(canonical(0xc0, n))
}

/// A host id unique to one check.
pub fn host(n: u8) -> cocalc_core::HostId {
    cocalc_core::HostId::from_bytes(canonical(0xb0, n))
}

/// Version 4, RFC 4122 variant bytes (a canonical id) from a tag and `n`.
fn canonical(tag: u8, n: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = tag;
    b[15] = n;
    b[6] = 0x40;
    b[8] = 0x80;
    b
}

/// A digest of a tree: every path, its type, mode, content or link target.
pub fn tree_digest(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.insert(r, format!("link {}", t.display()));
            } else if m.is_dir() {
                out.insert(r.clone(), format!("dir {mode:o}"));
                walk(&e.path(), &r, out);
            } else {
                let data = std::fs::read(e.path()).unwrap();
                let h = Sha256::digest(&data);
                let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                out.insert(r, format!("file {mode:o} {hex}"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Writes a file (creating parents) under `root`.
pub fn put(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

/// Reads a whole stream into memory.
pub async fn collect(mut s: ByteStream) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    while let Some(chunk) = std::future::poll_fn(|cx| s.as_mut().poll_next(cx)).await {
        v.extend_from_slice(&chunk?);
    }
    Ok(v)
}

/// A stream of `data` in 64 KiB chunks, ending with `end` (e.g. an error).
pub fn stream_of(data: Vec<u8>, end: Option<io::Error>) -> ByteStream {
    let mut items: Vec<io::Result<Bytes>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    if let Some(e) = end {
        items.push(Err(e));
    }
    Box::pin(Iter(items.into_iter()))
}

struct Iter(std::vec::IntoIter<io::Result<Bytes>>);

impl futures_core::Stream for Iter {
    type Item = io::Result<Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// `create` twice returns the same volume and keeps its content; `list`
/// shows it; `volume` of an unknown project is `NotFound`.
pub async fn create_is_idempotent(s: &dyn Storage) {
    let p = project(1);
    let v1 = s.create(p).await.expect("create");
    assert!(v1.home.is_dir(), "home exists after create");
    put(&v1.home, "keep.txt", b"mine");
    let v2 = s.create(p).await.expect("create again");
    assert_eq!(v1, v2, "create is idempotent");
    assert_eq!(std::fs::read(v2.home.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(s.volume(p).await.unwrap(), v1);
    assert!(s.list().await.unwrap().contains(&p));
    let unknown = project(201);
    assert_eq!(
        s.volume(unknown).await,
        Err(StorageError::NotFound(unknown))
    );
    assert_eq!(s.delete(unknown).await, Ok(()), "delete of unknown is Ok");
}

/// `delete` removes the volume and its snapshots, and is idempotent.
pub async fn delete_removes_volume_and_snapshots(s: &dyn Storage) {
    let p = project(2);
    let v = s.create(p).await.unwrap();
    put(&v.home, "a/b.txt", b"x");
    s.snapshot(p).await.unwrap().expect("first snapshot");
    s.delete(p).await.expect("delete");
    assert!(!v.home.exists(), "home gone");
    assert_eq!(s.volume(p).await, Err(StorageError::NotFound(p)));
    assert!(!s.list().await.unwrap().contains(&p));
    assert_eq!(s.snapshots(p).await, Err(StorageError::NotFound(p)));
    s.delete(p).await.expect("second delete is Ok");
    // A new volume under the same id starts empty, without old snapshots.
    let v = s.create(p).await.unwrap();
    assert!(std::fs::read_dir(&v.home).unwrap().next().is_none());
    assert!(s.snapshots(p).await.unwrap().is_empty());
    s.delete(p).await.unwrap();
}

/// A snapshot is taken only when something changed since the newest one;
/// names are increasing UTC times and `snapshots` lists oldest first.
pub async fn snapshot_only_when_changed(s: &dyn Storage) {
    let p = project(3);
    let v = s.create(p).await.unwrap();
    put(&v.home, "f.txt", b"1");
    let a = s.snapshot(p).await.unwrap().expect("changed: snapshot");
    assert_eq!(s.snapshot(p).await.unwrap(), None, "unchanged: no snapshot");
    // Reading changes nothing.
    let _ = std::fs::read(v.home.join("f.txt")).unwrap();
    assert_eq!(s.snapshot(p).await.unwrap(), None, "read-only access");
    put(&v.home, "f.txt", b"22");
    let b = s.snapshot(p).await.unwrap().expect("changed again");
    assert!(
        b.name > a.name && b.created > a.created,
        "{b:?} after {a:?}"
    );
    assert_eq!(b.name.len(), "2026-01-01T00:00:00.000Z".len());
    assert!(b.name.ends_with('Z'));
    let list = s.snapshots(p).await.unwrap();
    let names: Vec<_> = list.iter().map(|x| x.name.clone()).collect();
    assert_eq!(names, vec![a.name.clone(), b.name.clone()]);
    s.delete_snapshot(p, &a.name).await.unwrap();
    let names: Vec<_> = s
        .snapshots(p)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.name)
        .collect();
    assert_eq!(names, vec![b.name.clone()]);
    assert_eq!(
        s.delete_snapshot(p, &a.name).await,
        Err(StorageError::SnapshotNotFound {
            project: p,
            name: a.name.clone()
        })
    );
    s.delete(p).await.unwrap();
}

/// `restore` of one path brings back that path only; of everything, the
/// whole home as it was.
pub async fn restore_path_and_whole_project(s: &dyn Storage) {
    let p = project(4);
    let v = s.create(p).await.unwrap();
    put(&v.home, "a.txt", b"a1");
    put(&v.home, "b.txt", b"b1");
    put(&v.home, "dir/x.txt", b"x1");
    put(&v.home, "dir/y.txt", b"y1");
    let before = tree_digest(&v.home);
    let snap = s.snapshot(p).await.unwrap().unwrap();
    put(&v.home, "a.txt", b"a2");
    std::fs::remove_file(v.home.join("b.txt")).unwrap();
    std::fs::remove_dir_all(v.home.join("dir")).unwrap();
    put(&v.home, "c.txt", b"c2");

    s.restore(p, &snap.name, Some("a.txt")).await.unwrap();
    assert_eq!(std::fs::read(v.home.join("a.txt")).unwrap(), b"a1");
    assert!(!v.home.join("b.txt").exists(), "only the asked path");
    s.restore(p, &snap.name, Some("dir/x.txt")).await.unwrap();
    assert_eq!(std::fs::read(v.home.join("dir/x.txt")).unwrap(), b"x1");
    assert!(!v.home.join("dir/y.txt").exists());
    s.restore(p, &snap.name, Some("./dir")).await.unwrap();
    assert_eq!(std::fs::read(v.home.join("dir/y.txt")).unwrap(), b"y1");
    assert!(v.home.join("c.txt").exists());

    let leftovers: Vec<_> = std::fs::read_dir(&v.home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cocalc"))
        .collect();
    assert!(leftovers.is_empty(), "restore cleans up: {leftovers:?}");
    s.restore(p, &snap.name, None).await.unwrap();
    let home = s.volume(p).await.unwrap().home;
    assert_eq!(tree_digest(&home), before, "whole project restored");
    let missing = "2001-01-01T00:00:00.000Z";
    assert_eq!(
        s.restore(p, missing, None).await,
        Err(StorageError::SnapshotNotFound {
            project: p,
            name: missing.into()
        })
    );
    assert!(s
        .restore(p, &snap.name, Some("no/such/file"))
        .await
        .is_err());
    s.delete(p).await.unwrap();
}

/// Paths with `..`, absolute paths and symlinked parents that point out of
/// the project are refused with `PathEscape`, and touch nothing.
pub async fn paths_leaving_the_project_are_refused(s: &dyn Storage) {
    let p = project(5);
    let v = s.create(p).await.unwrap();
    let outside = tempfile_dir("escape-target");
    put(&outside, "victim.txt", b"untouched");
    std::os::unix::fs::symlink(&outside, v.home.join("out")).unwrap();
    std::os::unix::fs::symlink("/", v.home.join("root")).unwrap();
    put(&v.home, "victim.txt", b"from snapshot");
    put(&v.home, "real/x.txt", b"x1");
    std::os::unix::fs::symlink("real", v.home.join("inside")).unwrap();
    let snap = s.snapshot(p).await.unwrap().unwrap();
    for bad in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "..",
        "",
        "out/victim.txt",
        "root/etc/passwd",
    ] {
        match s.restore(p, &snap.name, Some(bad)).await {
            Err(StorageError::PathEscape(_)) => {}
            other => panic!("restore {bad:?}: expected PathEscape, got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read(outside.join("victim.txt")).unwrap(),
        b"untouched"
    );
    // A snapshot name that is a path is no snapshot at all.
    for bad in ["../snapshots", "/", "."] {
        assert!(matches!(
            s.restore(p, bad, None).await,
            Err(StorageError::SnapshotNotFound { .. })
        ));
    }
    // The project swaps a directory of the snapshot for a link out: the
    // restore must not follow it.
    std::fs::remove_dir_all(v.home.join("real")).unwrap();
    std::os::unix::fs::symlink(&outside, v.home.join("real")).unwrap();
    match s.restore(p, &snap.name, Some("real/x.txt")).await {
        Err(StorageError::PathEscape(_)) => {}
        other => panic!("restore through a swapped link: {other:?}"),
    }
    assert!(!outside.join("x.txt").exists(), "nothing written outside");
    std::fs::remove_file(v.home.join("real")).unwrap();
    s.restore(p, &snap.name, Some("real")).await.unwrap();
    // A symlinked parent that stays inside the project is fine.
    put(&v.home, "real/x.txt", b"x2");
    s.restore(p, &snap.name, Some("inside/x.txt"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(v.home.join("real/x.txt")).unwrap(), b"x1");
    // The link itself (last component) may be restored: it is not followed.
    std::fs::remove_file(v.home.join("out")).unwrap();
    s.restore(p, &snap.name, Some("out")).await.unwrap();
    assert!(std::fs::symlink_metadata(v.home.join("out"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_dir_all(&outside).unwrap();
    s.delete(p).await.unwrap();
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "cocalc-contract-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sample_tree(home: &Path) {
    put(home, "README.md", b"# project\n");
    put(home, "src/main.rs", b"fn main() {}\n");
    put(home, "data/big.bin", &vec![0x5a; 3 << 20]);
    let mut varied = Vec::with_capacity(1 << 20);
    for i in 0..(1u32 << 18) {
        varied.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    }
    put(home, "data/varied.bin", &varied);
    std::fs::create_dir_all(home.join("empty")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", home.join("link")).unwrap();
    let exe = home.join("run.sh");
    std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A full send from `a`, received by `b`, creates the project there with
/// equal content; an incremental send (parent = the first snapshot) adds
/// the second snapshot, whose content is equal too.
pub async fn send_receive_full_then_incremental(a: &dyn Storage, b: &dyn Storage) {
    let p = project(6);
    let va = a.create(p).await.unwrap();
    sample_tree(&va.home);
    let first = tree_digest(&va.home);
    let s1 = a.snapshot(p).await.unwrap().unwrap();
    let got = b
        .receive(p, a.send(p, &s1.name, None).await.unwrap())
        .await
        .expect("full receive");
    assert_eq!(got.name, s1.name);
    let vb = b.volume(p).await.expect("receive created the volume");
    assert_eq!(tree_digest(&vb.home), first, "full: same content");

    put(&va.home, "src/main.rs", b"fn main() { println!(\"2\"); }\n");
    std::fs::remove_file(va.home.join("README.md")).unwrap();
    put(&va.home, "data/new.bin", &vec![7; 1 << 20]);
    let second = tree_digest(&va.home);
    let s2 = a.snapshot(p).await.unwrap().unwrap();
    let got2 = b
        .receive(p, a.send(p, &s2.name, Some(&s1.name)).await.unwrap())
        .await
        .expect("incremental receive");
    assert_eq!(got2.name, s2.name);
    let names: Vec<_> = b
        .snapshots(p)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.name)
        .collect();
    assert_eq!(names, vec![s1.name.clone(), s2.name.clone()]);
    // Receiving into an existing volume keeps its home; restore adopts it.
    assert_eq!(tree_digest(&vb.home), first);
    b.restore(p, &s2.name, None).await.unwrap();
    let vb = b.volume(p).await.unwrap();
    assert_eq!(tree_digest(&vb.home), second, "incremental: same content");
    // The same snapshot again is refused, not duplicated.
    let again = b
        .receive(p, a.send(p, &s2.name, Some(&s1.name)).await.unwrap())
        .await;
    assert!(
        matches!(again, Err(StorageError::AlreadyExists(_))),
        "duplicate receive: {again:?}"
    );
    assert_eq!(b.snapshots(p).await.unwrap().len(), 2);
    a.delete(p).await.unwrap();
    b.delete(p).await.unwrap();
}

/// Changes made on the receiving side are not hidden by a snapshot that
/// arrives later: the next `snapshot` there still sees them.
pub async fn local_changes_survive_a_later_receive(a: &dyn Storage, b: &dyn Storage) {
    let p = project(10);
    let va = a.create(p).await.unwrap();
    put(&va.home, "f", b"1");
    let s1 = a.snapshot(p).await.unwrap().unwrap();
    b.receive(p, a.send(p, &s1.name, None).await.unwrap())
        .await
        .unwrap();
    let vb = b.volume(p).await.unwrap();
    put(&vb.home, "local.txt", b"written on b");
    put(&va.home, "f", b"2");
    let s2 = a.snapshot(p).await.unwrap().unwrap();
    b.receive(p, a.send(p, &s2.name, Some(&s1.name)).await.unwrap())
        .await
        .unwrap();
    let s3 = b.snapshot(p).await.unwrap();
    assert!(
        s3.is_some(),
        "b's home changed after its newest (received) snapshot"
    );
    b.restore(p, &s3.unwrap().name, Some("local.txt"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(vb.home.join("local.txt")).unwrap(),
        b"written on b"
    );
    a.delete(p).await.unwrap();
    b.delete(p).await.unwrap();
}

/// A stream cut halfway (ending in an error, or just ending early) and a
/// stream of garbage leave nothing behind and say `StreamIncomplete`.
pub async fn cut_stream_leaves_nothing_behind(a: &dyn Storage, b: &dyn Storage) {
    let p = project(7);
    let va = a.create(p).await.unwrap();
    sample_tree(&va.home);
    let s1 = a.snapshot(p).await.unwrap().unwrap();
    let whole = collect(a.send(p, &s1.name, None).await.unwrap())
        .await
        .expect("send stream");
    assert!(whole.len() > 1 << 20, "stream has the data");
    let half = whole[..whole.len() / 2].to_vec();
    let cases: Vec<(&str, ByteStream)> = vec![
        (
            "error halfway",
            stream_of(half.clone(), Some(io::Error::other("connection reset"))),
        ),
        ("ends halfway", stream_of(half, None)),
        (
            "ends 1 byte early",
            stream_of(whole[..whole.len() - 1].to_vec(), None),
        ),
        ("garbage", stream_of(vec![0x42; 100_000], None)),
        ("empty", stream_of(Vec::new(), None)),
    ];
    for (what, stream) in cases {
        match b.receive(p, stream).await {
            Err(StorageError::StreamIncomplete(msg)) => assert!(!msg.is_empty()),
            other => panic!("{what}: expected StreamIncomplete, got {other:?}"),
        }
        assert_eq!(b.volume(p).await, Err(StorageError::NotFound(p)), "{what}");
        assert!(!b.list().await.unwrap().contains(&p), "{what}");
    }
    // The intact stream still works afterwards.
    b.receive(p, stream_of(whole, None))
        .await
        .expect("whole stream");
    assert_eq!(
        tree_digest(&b.volume(p).await.unwrap().home),
        tree_digest(&va.home)
    );
    a.delete(p).await.unwrap();
    b.delete(p).await.unwrap();
}

/// Concurrent calls on one project are serialised (of many simultaneous
/// snapshots after one change, exactly one is taken); different projects
/// proceed side by side.
pub async fn concurrent_calls_are_serialised_per_project(s: Arc<dyn Storage>) {
    let p = project(8);
    let v = s.create(p).await.unwrap();
    for round in 0..3 {
        put(&v.home, "f.txt", format!("round {round}").as_bytes());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.snapshot(p).await })
            })
            .collect();
        let mut taken = 0;
        for t in tasks {
            if t.await.unwrap().unwrap().is_some() {
                taken += 1;
            }
        }
        assert_eq!(taken, 1, "round {round}: exactly one snapshot");
    }
    assert_eq!(s.snapshots(p).await.unwrap().len(), 3);

    let tasks: Vec<_> = (0..6u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let q = project(100 + i);
                let v = s.create(q).await?;
                put(&v.home, "own.txt", &[i; 1000]);
                let snap = s.snapshot(q).await?.expect("changed");
                put(&v.home, "own.txt", b"changed");
                s.restore(q, &snap.name, Some("own.txt")).await?;
                assert_eq!(
                    std::fs::read(v.home.join("own.txt")).unwrap(),
                    vec![i; 1000]
                );
                s.delete(q).await?;
                Ok::<_, StorageError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("parallel projects");
    }
    s.delete(p).await.unwrap();
}

/// Quotas are either supported (set and read back) or `Unsupported`.
pub async fn quota_is_supported_or_says_so(s: &dyn Storage) {
    let p = project(9);
    let v = s.create(p).await.unwrap();
    put(&v.home, "mib.bin", &vec![1; 1 << 20]);
    let q = Quota {
        max_bytes: Some(64 << 20),
    };
    match s.set_quota(p, q).await {
        Ok(()) => {
            assert_eq!(s.quota(p).await.unwrap(), q);
            s.set_quota(p, Quota { max_bytes: None }).await.unwrap();
            assert_eq!(s.quota(p).await.unwrap(), Quota { max_bytes: None });
        }
        Err(StorageError::Unsupported(_)) => {
            assert!(matches!(
                s.quota(p).await,
                Err(StorageError::Unsupported(_))
            ));
        }
        Err(e) => panic!("set_quota: {e}"),
    }
    let u = s.usage(p).await.unwrap();
    assert!(
        u.referenced_bytes >= 1 << 20,
        "usage counts the file: {u:?}"
    );
    assert!(u.exclusive_bytes <= u.referenced_bytes, "{u:?}");
    s.delete(p).await.unwrap();
}

/// A snapshot's tree ([`Storage::snapshot_tree`]) reads as the home did;
/// [`Storage::import_snapshot`] makes a snapshot from a tree, creating the
/// volume of a project new here, and restores work from it; bad names,
/// names already taken and missing trees are refused with nothing left
/// behind.
pub async fn import_snapshot_round_trip(s: &dyn Storage) {
    let (p, q) = (project(11), project(12));
    let v = s.create(p).await.unwrap();
    put(&v.home, "dir/a.txt", b"hello");
    put(&v.home, "c.txt", b"one");
    std::fs::set_permissions(v.home.join("c.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("dir/a.txt", v.home.join("link")).unwrap();
    let snap = s.snapshot(p).await.unwrap().expect("changed");
    let tree = s.snapshot_tree(p, &snap.name).await.unwrap();
    assert_eq!(tree_digest(&tree), tree_digest(&v.home), "tree = home");
    let missing = "2001-02-03T04:05:06.007Z";
    assert_eq!(
        s.snapshot_tree(p, missing).await,
        Err(StorageError::SnapshotNotFound {
            project: p,
            name: missing.to_string()
        })
    );

    // A project with no volume here gets one, made from the snapshot.
    assert!(matches!(s.volume(q).await, Err(StorageError::NotFound(_))));
    let got = s.import_snapshot(q, &snap.name, &tree).await.unwrap();
    assert_eq!(got.name, snap.name);
    assert_eq!(got.created, snap.created);
    let qv = s.volume(q).await.unwrap();
    assert_eq!(tree_digest(&qv.home), tree_digest(&tree), "new home");
    let names = |l: Vec<cocalc_core::SnapshotInfo>| -> Vec<String> {
        l.into_iter().map(|x| x.name).collect()
    };
    assert_eq!(
        names(s.snapshots(q).await.unwrap()),
        vec![snap.name.clone()]
    );
    put(&qv.home, "c.txt", b"q's own");

    // Refusals leave the snapshot list as it was.
    assert!(
        matches!(
            s.import_snapshot(q, &snap.name, &tree).await,
            Err(StorageError::AlreadyExists(_))
        ),
        "a name already taken"
    );
    for bad in ["latest", "../x", "2001-02-03T04:05:06Z", ""] {
        assert_eq!(
            s.import_snapshot(q, bad, &tree).await,
            Err(StorageError::InvalidSnapshotName(bad.to_string())),
            "{bad:?}"
        );
    }
    let nowhere = tree.join("no-such-dir");
    assert!(s.import_snapshot(q, missing, &nowhere).await.is_err());
    assert!(s
        .import_snapshot(q, missing, &tree.join("c.txt"))
        .await
        .is_err());
    assert_eq!(
        names(s.snapshots(q).await.unwrap()),
        vec![snap.name.clone()]
    );
    assert_eq!(std::fs::read(qv.home.join("c.txt")).unwrap(), b"q's own");

    // Into a project that exists: an older snapshot, listed in time order,
    // that restores as any snapshot does.
    put(&v.home, "c.txt", b"two");
    let later = s.snapshot(p).await.unwrap().expect("changed");
    let old = s.import_snapshot(q, missing, &tree).await.unwrap();
    assert_eq!(old.name, missing);
    assert_eq!(
        names(s.snapshots(q).await.unwrap()),
        [missing.to_string(), snap.name.clone()]
    );
    s.restore(q, missing, Some("c.txt")).await.unwrap();
    assert_eq!(std::fs::read(qv.home.join("c.txt")).unwrap(), b"one");
    // The imported copy is its own: the source's later state is not in it.
    let later_tree = s.snapshot_tree(p, &later.name).await.unwrap();
    assert_eq!(std::fs::read(later_tree.join("c.txt")).unwrap(), b"two");
    assert_eq!(
        std::fs::read(s.snapshot_tree(q, missing).await.unwrap().join("c.txt")).unwrap(),
        b"one"
    );
    s.delete(p).await.unwrap();
    s.delete(q).await.unwrap();
}
