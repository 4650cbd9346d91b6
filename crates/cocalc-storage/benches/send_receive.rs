//! Send → receive throughput of [`BtrfsStorage`] between two loop pools,
//! against the raw `btrfs send | btrfs receive` pipe on the same data, and
//! an incremental send of a 10 MiB change against rsync of the same tree.
//!
//! Needs root, btrfs-progs and rsync. Run:
//!
//! ```text
//! cargo bench -p cocalc-storage --bench send_receive            # ~1 GiB, ~100k files
//! cargo bench -p cocalc-storage --bench send_receive -- --small # ~64 MiB, ~5k files
//! ```
//!
//! Options: `--small`, `--dir PATH` (where the pool images go; default
//! `/var/tmp`). Transfers are timed warm (after one unmeasured send to
//! warm the page cache); each is run three times, alternating, and the
//! fastest counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocalc_core::{ByteStream, ProjectId, Storage, SystemClock};
use cocalc_storage::{BtrfsConfig, BtrfsStorage, LoopPool};

struct Counted(ByteStream, Arc<AtomicU64>);

impl futures_core::Stream for Counted {
    type Item = std::io::Result<bytes::Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let r = self.0.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(b))) = &r {
            self.1.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        r
    }
}

fn sh(script: &str) -> Duration {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .expect("sh");
    assert!(st.success(), "{script} failed");
    t.elapsed()
}

/// A deterministic pseudo-random filler (xorshift64*).
fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        let v = seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn make_tree(home: &Path, files: u64, total: u64) {
    let per = (total / files) as usize;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; per];
    for i in 0..files {
        let dir = home.join(format!("d{:03}", i % 500));
        if i < 500 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        // Sizes vary around the mean: half, mean, 1.5×.
        let len = per / 2 + (i as usize % 3) * per / 2;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        fill(&mut buf[..len], &mut seed);
        std::fs::write(dir.join(format!("f{i}.dat")), &buf[..len]).unwrap();
    }
}

fn rate(bytes: u64, d: Duration) -> String {
    format!(
        "{:.1} MiB/s",
        bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
    )
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let small = args.iter().any(|a| a == "--small");
    let base = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let (files, total) = if small {
        (5_000u64, 64u64 << 20)
    } else {
        (100_000, 1 << 30)
    };
    let pool_size = (total * 6).max(1 << 30) + (1 << 30);
    let dir = tempfile::Builder::new()
        .prefix("cocalc-storage-bench-")
        .tempdir_in(&base)
        .expect("temp dir");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let pa = LoopPool::create(&dir.path().join("a"), pool_size).expect("pool a (root needed)");
    let pb = LoopPool::create(&dir.path().join("b"), pool_size).expect("pool b");
    let clock = Arc::new(SystemClock);
    let a = BtrfsStorage::open(
        pa.path().join("pool"),
        BtrfsConfig::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    let b = BtrfsStorage::open(pb.path().join("pool"), BtrfsConfig::default(), clock)
        .await
        .unwrap();
    let p: ProjectId = "6ba7b810-9dad-41d1-80b4-00c04fd430c8".parse().unwrap();

    let v = a.create(p).await.unwrap();
    let t = Instant::now();
    let home = v.home.clone();
    tokio::task::spawn_blocking(move || make_tree(&home, files, total))
        .await
        .unwrap();
    let data = du(&v.home);
    println!(
        "data: {files} files, {:.1} MiB (written in {:.1?})",
        data as f64 / (1 << 20) as f64,
        t.elapsed()
    );
    let s1 = a.snapshot(p).await.unwrap().unwrap();
    let snap1 = a
        .pool()
        .join("snapshots")
        .join(format!("project-{p}"))
        .join(&s1.name);
    sh(&format!("btrfs send -q {} > /dev/null", snap1.display())); // warm the cache

    // Full: library vs raw pipe, best of two each, alternating.
    let raw_dir = pb.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let mut lib_best = Duration::MAX;
    let mut raw_best = Duration::MAX;
    let mut stream_bytes = 0;
    for round in 0..3 {
        if round > 0 {
            b.delete(p).await.unwrap();
        }
        let counter = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let s = a.send(p, &s1.name, None).await.unwrap();
        b.receive(p, Box::pin(Counted(s, counter.clone())))
            .await
            .unwrap();
        lib_best = lib_best.min(t.elapsed());
        stream_bytes = counter.load(Ordering::Relaxed);

        let target = raw_dir.join(format!("r{round}"));
        std::fs::create_dir_all(&target).unwrap();
        raw_best = raw_best.min(sh(&format!(
            "btrfs send -q {} | btrfs receive -q {}",
            snap1.display(),
            target.display()
        )));
    }
    // Keep one raw copy (the parent of the raw incremental) to save space.
    for r in ["r0", "r1"] {
        let path = raw_dir.join(r).join(&s1.name);
        libbtrfsutil::delete_subvolume(&path).expect("delete a raw copy");
    }
    println!(
        "full send→receive, library: {:.2?} = {} of data ({} stream)",
        lib_best,
        rate(data, lib_best),
        rate(stream_bytes, lib_best)
    );
    println!(
        "full send|receive, raw pipe: {:.2?} = {} of data",
        raw_best,
        rate(data, raw_best)
    );
    println!(
        "ratio library/raw throughput: {:.2}× (goal ≥ 0.9×)",
        raw_best.as_secs_f64() / lib_best.as_secs_f64()
    );

    // rsync baseline: an initial full copy, then the same 10 MiB change.
    let rs_target = pb.path().join("rsync");
    let rs_full = sh(&format!(
        "rsync -a --delete {}/ {}/",
        snap1.display(),
        rs_target.display()
    ));

    // A 10 MiB change: one new 8 MiB file and 2 MiB rewritten across files.
    let home = v.home.clone();
    tokio::task::spawn_blocking(move || {
        let mut seed = 42u64;
        let mut buf = vec![0u8; 8 << 20];
        fill(&mut buf, &mut seed);
        std::fs::write(home.join("d000/new.dat"), &buf).unwrap();
        let mut small = vec![0u8; 8 << 10];
        for i in 0..256u64 {
            fill(&mut small, &mut seed);
            let f = home.join(format!("d{:03}/f{}.dat", i % 500, i * 7));
            std::fs::write(f, &small).unwrap();
        }
    })
    .await
    .unwrap();
    let s2 = a.snapshot(p).await.unwrap().unwrap();
    let snap2 = a
        .pool()
        .join("snapshots")
        .join(format!("project-{p}"))
        .join(&s2.name);
    sh(&format!(
        "btrfs send -q -p {} {} > /dev/null",
        snap1.display(),
        snap2.display()
    ));
    let counter = Arc::new(AtomicU64::new(0));
    let mut inc_lib = Duration::MAX;
    let mut inc_raw = Duration::MAX;
    let raw_s2 = raw_dir.join("r2").join(&s2.name);
    for round in 0..3 {
        if round > 0 {
            b.delete_snapshot(p, &s2.name).await.unwrap();
            libbtrfsutil::delete_subvolume(&raw_s2).unwrap();
        }
        counter.store(0, Ordering::Relaxed);
        let t = Instant::now();
        let s = a.send(p, &s2.name, Some(&s1.name)).await.unwrap();
        b.receive(p, Box::pin(Counted(s, counter.clone())))
            .await
            .unwrap();
        inc_lib = inc_lib.min(t.elapsed());
        inc_raw = inc_raw.min(sh(&format!(
            "btrfs send -q -p {} {} | btrfs receive -q {}",
            snap1.display(),
            snap2.display(),
            raw_dir.join("r2").display()
        )));
    }
    let inc_rsync = sh(&format!(
        "rsync -a --delete {}/ {}/",
        snap2.display(),
        rs_target.display()
    ));
    println!(
        "incremental (10 MiB change, {:.1} MiB stream): library {:.3?}, raw pipe {:.3?}, rsync {:.3?} (rsync full copy took {:.2?})",
        counter.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        inc_lib,
        inc_raw,
        inc_rsync,
        rs_full
    );
    println!(
        "ratio rsync time / library incremental time: {:.1}× faster",
        inc_rsync.as_secs_f64() / inc_lib.as_secs_f64()
    );
    drop((a, b));
    pb.teardown().expect("teardown b");
    pa.teardown().expect("teardown a");
}
