//! Moving a project between two Btrfs hosts, against its anchor: the same
//! data sent with `btrfs send | btrfs receive` between the same two pools,
//! in the same run.
//!
//! Real processes: a `cocalc-master` and two `cocalc-host`s (process
//! runner, Btrfs storage, each on its own loop-mounted pool). One project
//! holds `--mib` MiB (default 256): three quarters in 4 MiB files of
//! incompressible bytes, a quarter in 4 KiB files; 0.5 s into each move,
//! `--changed` MiB (default 16) more are written into it on the source,
//! so the last copy (while the project is stopped) is an incremental
//! stream of that much. It is moved A → B and
//! back, `--rounds` times (default 2). Each move is timed by its record
//! (the master's clock, in ms; polled every 100 ms, which the move does
//! not wait for): from `started` to its last update (`done`), and its stop
//! window from `stopped_at` (the stop on the source) to `flipped_at` (the
//! map naming the target). The anchor is
//! timed between the same pools on a read-only snapshot of the same home.
//! Every timed op starts after a `sync` and a `btrfs subvolume sync` of
//! both pools (no write-back or subvolume clean-up of an earlier op goes
//! on during it). The fastest round of each counts.
//!
//! Needs root, `btrfs-progs` and loop devices; without them it says so
//! and exits. Run: `cargo bench -p cocalc-daemons --bench move`
//! (`-- --mib 64 --rounds 1` for a quick run).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::spawn;

fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {out:?}");
}

/// Fills `home` with `mib` MiB: 4 MiB files of xorshift bytes (no two
/// alike, so nothing compresses or deduplicates) and 4 KiB text files.
fn fill(home: &Path, mib: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let big = (mib * 3 / 4) / 4;
    std::fs::create_dir_all(home.join("data")).unwrap();
    for i in 0..big {
        let mut buf = Vec::with_capacity(4 << 20);
        while buf.len() < 4 << 20 {
            buf.extend_from_slice(&next().to_le_bytes());
        }
        std::fs::write(home.join(format!("data/blob-{i:04}.bin")), buf).unwrap();
    }
    let small = (mib - big * 4) * 256;
    for i in 0..small {
        let dir = home.join(format!("notes/{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let line = format!("note {i}: {:016x}\n", next());
        std::fs::write(
            dir.join(format!("n{i}.txt")),
            line.repeat(4096 / line.len()),
        )
        .unwrap();
    }
}

/// Waits until both pools have written everything back and cleaned every
/// deleted subvolume.
fn settle(a: &Path, b: &Path) {
    run("sync");
    for p in [a, b] {
        run(&format!("btrfs subvolume sync {} >/dev/null", p.display()));
    }
    run("sync");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib = arg("--mib", 256);
    let rounds = arg("--rounds", 2).max(1);
    let changed = arg("--changed", 16);
    let root = nix::unistd::Uid::effective().is_root();
    let btrfs = Command::new("sh")
        .args(["-c", "command -v mkfs.btrfs && command -v btrfs"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && btrfs) {
        println!("move bench: needs root and btrfs-progs (mkfs.btrfs, btrfs); not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = ((mib as u64 * 3) << 20).max(1 << 30);
    let pools: Vec<_> = ["pool-a", "pool-b"]
        .iter()
        .map(|n| {
            let d = dir.path().join(n);
            std::fs::create_dir_all(&d).unwrap();
            cocalc_storage::LoopPool::create(&d, size).unwrap()
        })
        .collect();
    let (_master, murl, admin) =
        common::spawn_master(env!("CARGO_BIN_EXE_cocalc-master"), dir.path());
    let mut hosts = Vec::new();
    let mut urls = Vec::new();
    for (i, pool) in pools.iter().enumerate() {
        let token = admin.bootstrap_token().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let cfg = dir.path().join(format!("h{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\n\
                 bootstrap_token = \"{token}\"\nrunner = \"process\"\nstorage = \"btrfs\"\n\
                 btrfs_pool = \"{}\"\n",
                dir.path().join(format!("h{i}")).display(),
                pool.path().display()
            ),
        )
        .unwrap();
        let (daemon, url) = spawn(env!("CARGO_BIN_EXE_cocalc-host"), &cfg, "listening on");
        hosts.push(daemon);
        urls.push(url.trim_end_matches('/').to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let ids = loop {
        let list = admin.hosts().await.unwrap();
        if list.len() == 2 {
            break list
                .into_iter()
                .map(|h| (h.id, h.endpoint.base_url().to_string()))
                .collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "hosts did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let user = admin.create_user("bench").await.unwrap();
    let c = cocalc_client::MasterClient::new(&murl, user["api_key"].as_str().unwrap());
    c.create_project(&cocalc_core::wire::CreateProjectRequest::new("p"))
        .await
        .unwrap();
    let open = c.open("p").await.unwrap();
    let pid = open.project.to_string();
    // The first data-plane call makes the volume; then the data goes in
    // on the pool directly.
    let on =
        cocalc_client::HostClient::new(open.endpoint.base_url(), open.project, open.token.clone());
    on.write("hello.txt", b"hi\n".to_vec()).await.unwrap();
    // Hosts are listed by id; pools were made in the order the hosts
    // started: match them by URL.
    let pool_of = |host| {
        let url = &ids.iter().find(|(h, _)| *h == host).unwrap().1;
        let i = urls.iter().position(|u| u == url).unwrap();
        pools[i].path().to_path_buf()
    };
    let first = pool_of(open.host);
    fill(&first.join(format!("project-{pid}")), mib);
    run(&format!("sync -f {}", first.display()));
    println!(
        "move bench: {mib} MiB in one project, {changed} MiB written during each full copy, \
         two Btrfs hosts (process runner), {rounds} round(s) each way"
    );

    let mut best_move = [f64::MAX; 2];
    let mut best_stop = [f64::MAX; 2];
    let mut best_anchor = [f64::MAX; 2];
    for round in 0..rounds {
        for (way, _) in [(0usize, ()), (1, ())] {
            let at = admin.explain(&pid).await.unwrap().decision.host;
            let to = ids.iter().map(|(h, _)| *h).find(|h| *h != at).unwrap();
            let (from_pool, to_pool) = (pool_of(at), pool_of(to));

            // The anchor: the same home, snapshotted, sent between the
            // same pools by the btrfs command line.
            let snap = from_pool.join("anchor-snapshot");
            let recv = to_pool.join("anchor-received");
            std::fs::create_dir_all(&recv).unwrap();
            run(&format!(
                "btrfs subvolume snapshot -r {} {} >/dev/null",
                from_pool.join(format!("project-{pid}")).display(),
                snap.display()
            ));
            // Each timed op starts with nothing left to write back and no
            // deleted subvolume left to clean (the previous op's work
            // would otherwise go on during it).
            settle(&from_pool, &to_pool);
            let t = Instant::now();
            run(&format!(
                "btrfs send -q {} | btrfs receive {} >/dev/null 2>&1",
                snap.display(),
                recv.display()
            ));
            let anchor = t.elapsed().as_secs_f64();
            run(&format!(
                "btrfs subvolume delete {} {} >/dev/null",
                snap.display(),
                recv.join("anchor-snapshot").display()
            ));

            settle(&from_pool, &to_pool);
            let t = Instant::now();
            admin.move_project(&pid, Some(to)).await.unwrap();
            // The project changes while its full copy runs: the last copy,
            // made while it is stopped, carries those changes.
            let writer = {
                let file = from_pool
                    .join(format!("project-{pid}"))
                    .join(format!("changed-{round}-{way}.bin"));
                tokio::task::spawn_blocking(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ file.as_os_str().len() as u64;
                    let mut buf = Vec::with_capacity(changed << 20);
                    while buf.len() < changed << 20 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                    std::fs::write(file, buf).unwrap();
                })
            };
            let mv = loop {
                let mv = admin.project_move(&pid).await.unwrap();
                if mv.phase.is_finished() {
                    break mv;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let waited = t.elapsed().as_secs_f64();
            writer.await.unwrap();
            assert_eq!(mv.phase, cocalc_core::MovePhase::Done, "{mv:?}");
            assert!(
                changed == 0 || mv.base < mv.last,
                "the change landed before the full copy's snapshot: {mv:?}"
            );
            let (Some(stopped), Some(flipped)) = (mv.stopped_at, mv.flipped_at) else {
                panic!("a finished move has both times: {mv:?}");
            };
            let secs = |a: cocalc_core::Timestamp, b: cocalc_core::Timestamp| {
                (b.as_millis() - a.as_millis()) as f64 / 1000.0
            };
            let stop = secs(stopped, flipped);
            let total = secs(mv.started, mv.updated);
            assert!(total <= waited, "{total} s recorded, {waited} s waited");
            println!(
                "  round {round}, move {}: {total:.3} s ({:.0} MiB/s): full copy {:.3} s, \
                 stopped {stop:.3} s, clean-up {:.3} s; btrfs send | receive {anchor:.3} s",
                if way == 0 { "A → B" } else { "B → A" },
                mib as f64 / total,
                secs(mv.started, stopped),
                secs(flipped, mv.updated),
            );
            best_move[way] = best_move[way].min(total);
            best_stop[way] = best_stop[way].min(stop);
            best_anchor[way] = best_anchor[way].min(anchor);
        }
    }
    for (way, name) in ["A → B", "B → A"].iter().enumerate() {
        println!(
            "move {name}: {:.3} s, stopped {:.3} s; btrfs send | receive {:.3} s; \
             move / anchor = {:.2}× the time",
            best_move[way],
            best_stop[way],
            best_anchor[way],
            best_move[way] / best_anchor[way]
        );
    }
    drop(hosts);
    for p in pools {
        p.teardown().unwrap();
    }
}
