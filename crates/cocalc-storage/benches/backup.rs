//! Backup and restore times of [`RusticBackups`] (rustic_core, in process)
//! against the restic command (Debian's `restic`, the reference
//! implementation of the repository format) on the same tree, to local
//! directory repositories, and `cp -a` of the tree as the floor for a first
//! copy.
//!
//! Run (restic must be installed: `apt-get install restic`):
//!
//! ```text
//! cargo bench -p cocalc-storage --bench backup              # 256 MiB, ~16,400 files
//! cargo bench -p cocalc-storage --bench backup -- --small   # 32 MiB, ~2,050 files
//! ```
//!
//! Options: `--small`, `--dir PATH` (scratch; default `/var/tmp`),
//! `--rounds N` (default 2; each op's fastest round counts, fresh
//! repositories every round, the two tools alternating).
//!
//! Ops: a first backup into an empty repository; a backup with nothing
//! changed; a backup after an 8 MiB file and 20 small files changed; a
//! restore of the newest backup into an empty directory.
//!
//! What the comparison is: each restic op is one run of the command, as a
//! script or cron job would use it, so it includes starting the process,
//! deriving the key from the password (scrypt) and loading the index;
//! `RusticBackups` is opened once (key derived once) and each op is a call.
//! That is how a host uses each, and it is most of the difference on the
//! small ops. Neither keeps a local cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cocalc_core::{BackupStore, HostId, ProjectId, SnapshotInfo, Timestamp};
use cocalc_storage::backup::{RusticBackups, RusticConfig};

const PASSWORD: &str = "bench password";

/// Pseudo-random, incompressible bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A project-like tree of about `mib` MiB: three quarters in files of
/// 1–8 MiB of incompressible data, a quarter in 4 KiB text files (which
/// compress) spread over directories. Returns the file count.
fn make_tree(root: &Path, mib: usize) -> usize {
    let mut files = 0;
    let big_bytes = (mib * 3 / 4) << 20;
    let mut written = 0;
    let mut i = 0u64;
    while written < big_bytes {
        let len = (((i % 8) + 1) as usize) << 20;
        let p = root.join(format!("data/blob{i}.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, noise(i + 1, len)).unwrap();
        written += len;
        files += 1;
        i += 1;
    }
    let small = (mib << 20) / 4 / 4096;
    for k in 0..small {
        let p = root.join(format!("src/d{}/f{k}.txt", k % 64));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let line = format!("line {k}: the quick brown fox jumps over the lazy dog\n");
        std::fs::write(&p, &line.repeat(4096 / line.len() + 1).as_bytes()[..4096]).unwrap();
        files += 1;
    }
    files
}

/// Changes an 8 MiB file and 20 small files.
fn change_tree(root: &Path, round: u64) {
    std::fs::write(root.join("data/changed.bin"), noise(1000 + round, 8 << 20)).unwrap();
    for k in 0..20 {
        let p = root.join(format!("src/d{}/f{k}.txt", k % 64));
        std::fs::write(&p, format!("changed in round {round}\n").repeat(100)).unwrap();
    }
}

fn restic(repo: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("restic")
        .arg("--repo")
        .arg(repo)
        .args(["--no-cache", "--quiet"])
        .args(args)
        .env("RESTIC_PASSWORD", PASSWORD)
        .output()
        .expect("running restic (apt-get install restic)");
    let d = t.elapsed();
    assert!(out.status.success(), "restic {args:?}: {out:?}");
    d
}

#[derive(Default, Clone, Copy)]
struct Times {
    first: Duration,
    unchanged: Duration,
    changed: Duration,
    restore: Duration,
}

impl Times {
    fn min(self, o: Times) -> Times {
        Times {
            first: self.first.min(o.first),
            unchanged: self.unchanged.min(o.unchanged),
            changed: self.changed.min(o.changed),
            restore: self.restore.min(o.restore),
        }
    }
}

fn ours(rt: &tokio::runtime::Runtime, scratch: &Path, tree: &Path, round: u64) -> Times {
    let repo = scratch.join(format!("cocalc-repo-{round}"));
    let project: ProjectId = "6ba7b810-9dad-41d1-80b4-00c04fd430c8".parse().unwrap();
    let host: HostId = "7d444840-9dc0-41d1-b245-5ffdce74fad2".parse().unwrap();
    rt.block_on(async {
        let store =
            RusticBackups::open_or_init(RusticConfig::new(repo.to_string_lossy(), PASSWORD))
                .await
                .unwrap();
        let snap = |n: i64| {
            SnapshotInfo::new(
                format!("2026-01-01T00:00:0{n}.000Z"),
                Timestamp(1_767_225_600_000 + n * 1000),
                None,
            )
        };
        let mut t = Times::default();
        let at = Instant::now();
        store.backup(project, host, &snap(1), tree).await.unwrap();
        t.first = at.elapsed();
        let at = Instant::now();
        store.backup(project, host, &snap(2), tree).await.unwrap();
        t.unchanged = at.elapsed();
        change_tree(tree, round * 2);
        let at = Instant::now();
        let last = store.backup(project, host, &snap(3), tree).await.unwrap();
        t.changed = at.elapsed();
        let into = scratch.join(format!("cocalc-restore-{round}"));
        let at = Instant::now();
        store.restore(project, &last.id, &into).await.unwrap();
        t.restore = at.elapsed();
        let _ = std::fs::remove_dir_all(&into);
        t
    })
}

fn theirs(scratch: &Path, tree: &Path, round: u64) -> Times {
    let repo = scratch.join(format!("restic-repo-{round}"));
    restic(&repo, &["init"]);
    let tree_s = tree.to_str().unwrap();
    let mut t = Times {
        first: restic(&repo, &["backup", "--host", "h", tree_s]),
        unchanged: restic(&repo, &["backup", "--host", "h", tree_s]),
        ..Times::default()
    };
    change_tree(tree, round * 2 + 1);
    t.changed = restic(&repo, &["backup", "--host", "h", tree_s]);
    let into = scratch.join(format!("restic-restore-{round}"));
    t.restore = restic(
        &repo,
        &["restore", "latest", "--target", into.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(&into);
    t
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = args.iter().any(|a| a == "--small");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let base = PathBuf::from(value("--dir").unwrap_or_else(|| "/var/tmp".into()));
    let rounds: u64 = value("--rounds").map_or(2, |v| v.parse().expect("--rounds N"));
    let mib = if small { 32 } else { 256 };
    let scratch = base.join(format!("cocalc-backup-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let tree = scratch.join("tree");
    let files = make_tree(&tree, mib);
    println!("tree: {mib} MiB in {files} files; {rounds} rounds, fastest counts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut cp = Duration::MAX;
    let mut a: Option<Times> = None;
    let mut b: Option<Times> = None;
    for round in 0..rounds {
        let dst = scratch.join("cp");
        let at = Instant::now();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&tree)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(ok.success());
        cp = cp.min(at.elapsed());
        let _ = std::fs::remove_dir_all(&dst);
        let x = ours(&rt, &scratch, &tree, round);
        let y = theirs(&scratch, &tree, round);
        a = Some(a.map_or(x, |a| a.min(x)));
        b = Some(b.map_or(y, |b| b.min(y)));
    }
    let (a, b) = (a.unwrap(), b.unwrap());
    let mibs = |d: Duration| mib as f64 / d.as_secs_f64();
    println!();
    println!("| op | cocalc RusticBackups | restic 0.14 CLI | restic time / ours |");
    println!("| --- | --- | --- | --- |");
    for (op, x, y) in [
        ("first backup", a.first, b.first),
        ("nothing changed", a.unchanged, b.unchanged),
        ("8 MiB + 20 files changed", a.changed, b.changed),
        ("restore the newest", a.restore, b.restore),
    ] {
        println!(
            "| {op} | {:.3} s | {:.3} s | {:.2}× |",
            x.as_secs_f64(),
            y.as_secs_f64(),
            y.as_secs_f64() / x.as_secs_f64()
        );
    }
    println!();
    println!(
        "first backup {:.0} MiB/s (restic {:.0} MiB/s); cp -a of the tree {:.3} s ({:.0} MiB/s): ours takes {:.2}× cp's time",
        mibs(a.first),
        mibs(b.first),
        cp.as_secs_f64(),
        mibs(cp),
        a.first.as_secs_f64() / cp.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
