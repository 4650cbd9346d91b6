//! The backup contract suite against [`RusticBackups`]: on a local
//! directory repository, and on S3 (a local S3-compatible server that
//! `scripts/test` starts and names in `COCALC_TEST_S3`).

use std::io::{Read, Write};
use std::path::Path;

use cocalc_core::{BackupError, BackupStore, HostId, SnapshotInfo, Timestamp};
use cocalc_storage::backup::{RusticBackups, RusticConfig};
use cocalc_testkit::backup_contract as contract;
use cocalc_testkit::storage_contract::{project, put, tree_digest};

async fn local(dir: &Path) -> RusticBackups {
    RusticBackups::open_or_init(RusticConfig::new(dir.to_string_lossy(), "test password"))
        .await
        .unwrap()
}

#[tokio::test]
async fn backup_list_restore() {
    let d = tempfile::tempdir().unwrap();
    let b = local(&d.path().join("repo")).await;
    contract::backup_list_restore(&b, &d.path().join("scratch")).await;
}

#[tokio::test]
async fn forget_removes_only_what_it_names() {
    let d = tempfile::tempdir().unwrap();
    let b = local(&d.path().join("repo")).await;
    contract::forget_removes_only_what_it_names(&b, &d.path().join("scratch")).await;
}

fn host(s: &str) -> HostId {
    s.parse().unwrap()
}

/// Unchanged data is stored once: a second backup of the same 8 MiB adds
/// almost nothing, and a wrong password never opens (nor re-creates) the
/// repository.
#[tokio::test]
async fn unchanged_data_is_stored_once_and_the_password_matters() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let b = local(&repo).await;
    let p = project(130);
    let h = host("7d444840-9dc0-11d1-b245-5ffdce74fad2");
    let tree = d.path().join("t");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    put(&tree, "data.bin", &data);
    let s1 = SnapshotInfo::new(
        "2026-03-01T00:00:00.000Z".into(),
        Timestamp(1_772_323_200_000),
        None,
    );
    let first = b.backup(p, h, &s1, &tree).await.unwrap();
    put(&tree, "small.txt", b"a new small file");
    let s2 = SnapshotInfo::new(
        "2026-03-01T01:00:00.000Z".into(),
        Timestamp(1_772_326_800_000),
        None,
    );
    let second = b.backup(p, h, &s2, &tree).await.unwrap();
    assert!(first.added_bytes >= 8 << 20, "{first:?}");
    assert_eq!(second.bytes, (8 << 20) + 16);
    assert!(
        second.added_bytes < 64 << 10,
        "the second backup re-stored data: {second:?}"
    );

    let wrong = RusticBackups::open_or_init(RusticConfig::new(repo.to_string_lossy(), "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(wrong, BackupError::Repository(_)), "{wrong}");
    assert_eq!(
        b.backups(p).await.unwrap().len(),
        2,
        "the repository is intact"
    );
}

/// The S3 server `scripts/test` started, or `None` (with a note) when this
/// is a plain `cargo test` without one.
fn s3_endpoint() -> Option<String> {
    match std::env::var("COCALC_TEST_S3") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("COCALC_TEST_PRIVILEGED").as_deref() == Ok("require") => panic!(
            "COCALC_TEST_S3 is not set: scripts/test starts a local S3 server (moto) \
             and names its URL there; this test needs it"
        ),
        _ => {
            eprintln!(
                "skipping the S3 backup test: COCALC_TEST_S3 is not set (scripts/test sets it)"
            );
            None
        }
    }
}

/// Creates a bucket on a local S3-compatible server (moto takes an
/// unsigned `PUT /<bucket>`).
fn create_bucket(endpoint: &str, bucket: &str) {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "creating bucket {bucket}: {answer}"
    );
}

fn s3_config(endpoint: &str, bucket: &str) -> RusticConfig {
    RusticConfig::new("opendal:s3", "s3 test password")
        .option("bucket", bucket)
        .option("root", "/cocalc")
        .option("endpoint", endpoint)
        .option("region", "us-east-1")
        .option("access_key_id", "test")
        .option("secret_access_key", "test")
}

/// On S3: the contract, and two hosts sharing one repository, each seeing
/// and restoring the other's backups (a project brought back on another
/// host after its own is lost).
#[tokio::test]
async fn on_s3_two_hosts_share_one_repository() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let bucket = format!("cocalc-test-{}", std::process::id());
    create_bucket(&endpoint, &bucket);
    let d = tempfile::tempdir().unwrap();
    let a = RusticBackups::open_or_init(
        s3_config(&endpoint, &bucket).cache_dir(d.path().join("cache-a")),
    )
    .await
    .unwrap();
    contract::backup_list_restore(&a, &d.path().join("scratch1")).await;
    contract::forget_removes_only_what_it_names(&a, &d.path().join("scratch2")).await;

    // A second host opens the same repository (it exists: no re-init).
    let b = RusticBackups::open_or_init(s3_config(&endpoint, &bucket))
        .await
        .unwrap();
    let p = project(131);
    let tree = d.path().join("t");
    put(&tree, "thesis/chapter1.tex", b"\\section{One}");
    put(&tree, "thesis/refs.bib", b"@book{x}");
    let s = SnapshotInfo::new(
        "2026-04-01T00:00:00.000Z".into(),
        Timestamp(1_775_001_600_000),
        None,
    );
    let made = a
        .backup(p, host("7d444840-9dc0-11d1-b245-5ffdce74fad2"), &s, &tree)
        .await
        .unwrap();
    assert_eq!(b.backups(p).await.unwrap(), vec![made.clone()]);
    let r = d.path().join("restored");
    b.restore(p, &made.id, &r).await.unwrap();
    assert_eq!(tree_digest(&r), tree_digest(&tree));
}
