//! The backup contract suite against [`DirBackups`], and backup retention.

use cocalc_core::{BackupStore, HostId, SnapshotInfo, Timestamp};
use cocalc_storage::backup::{forget_by_retention, DirBackups};
use cocalc_storage::RetentionPolicy;
use cocalc_testkit::backup_contract as contract;
use cocalc_testkit::storage_contract::{project, put};

#[tokio::test]
async fn backup_list_restore() {
    let d = tempfile::tempdir().unwrap();
    let b = DirBackups::new(d.path().join("store")).unwrap();
    contract::backup_list_restore(&b, &d.path().join("scratch")).await;
}

#[tokio::test]
async fn forget_removes_only_what_it_names() {
    let d = tempfile::tempdir().unwrap();
    let b = DirBackups::new(d.path().join("store")).unwrap();
    contract::forget_removes_only_what_it_names(&b, &d.path().join("scratch")).await;
}

/// Hourly backups over ten days, thinned with 2 frequent and 3 daily: the
/// two newest and the newest of each of the three latest days stay.
#[tokio::test]
async fn retention_thins_backups_across_hosts() {
    let d = tempfile::tempdir().unwrap();
    let b = DirBackups::new(d.path().join("store")).unwrap();
    let p = project(120);
    let tree = d.path().join("t");
    put(&tree, "f", b"x");
    let hosts: [HostId; 2] = [
        "7d444840-9dc0-11d1-b245-5ffdce74fad2".parse().unwrap(),
        "7d444840-9dc0-11d1-b245-5ffdce74fad3".parse().unwrap(),
    ];
    let start = 1_767_225_600_000i64; // 2026-01-01T00:00:00Z
    let hour = 3_600_000i64;
    // Six a day at 00, 04, ... 20 h for ten days, alternating hosts (the
    // project moved back and forth).
    for i in 0..60i64 {
        let t = Timestamp(start + i * 4 * hour);
        let name = cocalc_storage::names::snapshot_name(t);
        let s = SnapshotInfo::new(name, t, None);
        b.backup(p, hosts[(i % 2) as usize], &s, &tree)
            .await
            .unwrap();
    }
    let now = Timestamp(start + 60 * 4 * hour);
    let policy = RetentionPolicy {
        frequent: 2,
        daily: 3,
        weekly: 0,
        monthly: 0,
    };
    let gone = forget_by_retention(&b, p, &policy, now).await.unwrap();
    let left = b.backups(p).await.unwrap();
    assert_eq!(gone.len() + left.len(), 60);
    let names: Vec<&str> = left.iter().map(|x| x.snapshot.as_str()).collect();
    assert_eq!(
        names,
        [
            "2026-01-08T20:00:00.000Z",
            "2026-01-09T20:00:00.000Z",
            "2026-01-10T16:00:00.000Z",
            "2026-01-10T20:00:00.000Z",
        ]
    );
    assert!(left.iter().all(|x| !gone.contains(&x.id)));
    // Nothing more to forget at the same time.
    assert_eq!(
        forget_by_retention(&b, p, &policy, now).await.unwrap(),
        Vec::<String>::new()
    );
}
