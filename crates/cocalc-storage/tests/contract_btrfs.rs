//! The storage contract suite against [`BtrfsStorage`] on loop-mounted
//! Btrfs pools (privileged: see `common`).

mod common;

use std::sync::Arc;

use cocalc_core::Storage;
use cocalc_storage::BtrfsConfig;
use cocalc_testkit::storage_contract as contract;

macro_rules! one {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let Some(env) = common::privileged(stringify!($name), 1, 512) else {
                return;
            };
            let s = common::btrfs(&env, 0, BtrfsConfig::default()).await;
            contract::$name(&s).await;
        }
    };
}

macro_rules! two {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let Some(env) = common::privileged(stringify!($name), 2, 512) else {
                return;
            };
            let a = common::btrfs(&env, 0, BtrfsConfig::default()).await;
            let b = common::btrfs(&env, 1, BtrfsConfig::default()).await;
            contract::$name(&a, &b).await;
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
    let Some(env) = common::privileged("concurrent_calls_are_serialised_per_project", 1, 512)
    else {
        return;
    };
    let s: Arc<dyn Storage> = Arc::new(common::btrfs(&env, 0, BtrfsConfig::default()).await);
    contract::concurrent_calls_are_serialised_per_project(s).await;
}
