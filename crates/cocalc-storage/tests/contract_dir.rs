//! The storage contract suite against [`DirStorage`] (no privileges needed).

use std::sync::Arc;

use cocalc_core::{Storage, SystemClock};
use cocalc_storage::DirStorage;
use cocalc_testkit::storage_contract as contract;

fn storage(dir: &tempfile::TempDir, name: &str) -> DirStorage {
    DirStorage::new(dir.path().join(name), Arc::new(SystemClock)).unwrap()
}

macro_rules! one {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let d = tempfile::tempdir().unwrap();
            contract::$name(&storage(&d, "a")).await;
        }
    };
}

macro_rules! two {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let d = tempfile::tempdir().unwrap();
            contract::$name(&storage(&d, "a"), &storage(&d, "b")).await;
        }
    };
}

one!(create_is_idempotent);
one!(delete_removes_volume_and_snapshots);
one!(snapshot_only_when_changed);
one!(restore_path_and_whole_project);
one!(paths_leaving_the_project_are_refused);
one!(quota_is_supported_or_says_so);
one!(import_snapshot_round_trip);
two!(send_receive_full_then_incremental);
two!(cut_stream_leaves_nothing_behind);
two!(local_changes_survive_a_later_receive);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_are_serialised_per_project() {
    let d = tempfile::tempdir().unwrap();
    let s: Arc<dyn Storage> = Arc::new(storage(&d, "a"));
    contract::concurrent_calls_are_serialised_per_project(s).await;
}

#[tokio::test]
async fn dir_quotas_are_unsupported() {
    let d = tempfile::tempdir().unwrap();
    let s = storage(&d, "a");
    let p = contract::project(50);
    s.create(p).await.unwrap();
    assert!(matches!(
        s.quota(p).await,
        Err(cocalc_core::StorageError::Unsupported(_))
    ));
}

#[tokio::test]
async fn dir_clone_and_scratch_reset() {
    let d = tempfile::tempdir().unwrap();
    let s = storage(&d, "a");
    let (p, q) = (contract::project(51), contract::project(52));
    let v = s.create(p).await.unwrap();
    contract::put(&v.home, "f", b"1");
    contract::put(v.scratch.as_ref().unwrap(), "tmpfile", b"t");
    let snap = s.snapshot(p).await.unwrap().unwrap();
    contract::put(&v.home, "f", b"2");
    let c = s.clone_project(p, q, Some(&snap.name)).await.unwrap();
    assert_eq!(std::fs::read(c.home.join("f")).unwrap(), b"1");
    assert!(matches!(
        s.clone_project(p, q, None).await,
        Err(cocalc_core::StorageError::AlreadyExists(_))
    ));
    s.reset_scratch(p).await.unwrap();
    assert!(!v.scratch.as_ref().unwrap().join("tmpfile").exists());
    assert_eq!(std::fs::read(v.home.join("f")).unwrap(), b"2");
}
