//! Start-up cost of [`PodmanRunner`] against bare `podman run`.
//!
//! 1. **Cold start → first exec finished**: `start` of a new project, then
//!    `exec true` to its exit code; against `podman run --rm IMAGE true` with
//!    the same image, storage, limits, user, mounts and network mode
//!    (goal: ratio ≤ 1.3).
//! 2. **Warm start**: `start` of a project that is already running
//!    (goal: p99 ≤ 5 ms).
//!
//! Needs root, podman, runc and busybox (like the privileged tests); prints
//! why and exits 0 without them. Run with
//! `cargo bench -p cocalc-host --bench podman_start`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cocalc_core::{ExecEvent, ExecRequest, Generation, HostId, ProjectId, ProjectSpec, Runner};
use cocalc_host::podman::{PodmanConfig, PodmanRunner, StorageDirs};
use cocalc_host::ImagePolicy;
use futures_util::StreamExt;

const IMAGE: &str = "localhost/cocalc-bench-busybox:1";
const COLD_RUNS: usize = 15;
const WARM_RUNS: usize = 2000;

fn main() {
    if !nix::unistd::Uid::effective().is_root()
        || Command::new("podman").arg("--version").output().is_err()
    {
        eprintln!("podman_start bench skipped: needs root and podman");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::Builder::new()
        .prefix("cocalc-podman-bench-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    rt.block_on(bench(dir.path()));
    drop(rt);
    // Conmon runs podman's cleanup of exec sessions and `run --rm` up to
    // 10 s after they end (`exit_command_delay`), which writes into the
    // storage: wait for those processes before deleting the directory.
    let d = dir.path().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && processes_mentioning(&d) > 0 {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Leftover shm mounts of removed containers, if any.
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        for m in info.lines().filter_map(|l| l.split_whitespace().nth(4)) {
            if m.starts_with(&d) {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn processes_mentioning(path: &str) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(path))
        .count()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn bench(dir: &Path) {
    let cfg = PodmanConfig::new(
        HostId::new_v4(*ProjectId::from_bytes([0x5a; 16]).as_bytes()),
        ImagePolicy::single(IMAGE),
        dir.join("state"),
    )
    .with_storage(StorageDirs {
        graphroot: dir.join("storage/root"),
        runroot: dir.join("storage/run"),
        driver: "vfs".into(),
    });
    let runner = PodmanRunner::new(cfg).await.expect("runner");
    runner.import_busybox_image(IMAGE).await.expect("image");
    let home_base = dir.join("homes");
    let mut n = 0u8;
    let mut new_spec = || {
        n = n.wrapping_add(1);
        let home = home_base.join(format!("h{n}"));
        std::fs::create_dir_all(&home).expect("home");
        let mut b = [0u8; 16];
        b[0] = n;
        b[1] = 0xbe;
        let mut s = ProjectSpec::new(ProjectId::new_v4(b), Generation(1), home);
        s.hostname = "bench".into();
        s
    };

    // Warm both paths once (page cache, podman's first-use setup).
    let s = new_spec();
    runner.start(&s).await.expect("warm-up start");
    runner.stop(s.project, Duration::ZERO).await.expect("stop");

    // 1a. Our cold start → first exec finished.
    let mut ours = Vec::new();
    for _ in 0..COLD_RUNS {
        let s = new_spec();
        let t0 = Instant::now();
        runner.start(&s).await.expect("start");
        let mut out = runner
            .exec(s.project, ExecRequest::new(vec!["true".into()]))
            .await
            .expect("exec");
        let mut code = None;
        while let Some(ev) = out.next().await {
            if let ExecEvent::Exit(c) = ev.expect("event") {
                code = Some(c);
            }
        }
        ours.push(t0.elapsed());
        assert_eq!(code, Some(0));
        runner.stop(s.project, Duration::ZERO).await.expect("stop");
    }

    // 1b. Bare `podman run --rm` with the same settings.
    let mut bare = Vec::new();
    for _ in 0..COLD_RUNS {
        let s = new_spec();
        let mut cmd = Command::new("podman");
        runner.podman_env().apply(&mut cmd);
        cmd.args(["run", "--rm", "--network", "none", "--user", "2001:2001"])
            .args(["--memory", &s.limits.memory_bytes.to_string()])
            .args(["--memory-swap", &s.limits.memory_bytes.to_string()])
            .args([
                "--cpus",
                &format!("{}", s.limits.cpu_millis as f64 / 1000.0),
            ])
            .args(["--pids-limit", &s.limits.pids.to_string()])
            .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
            .args(["--hostname", "bench", "-w", "/home/user"])
            .args(["-v", &format!("{}:/home/user:rw", s.home.display())])
            .args(["--tmpfs", "/tmp:rw,size=64m"])
            .args([IMAGE, "true"]);
        let t0 = Instant::now();
        let st = cmd.status().expect("podman run");
        bare.push(t0.elapsed());
        assert!(st.success());
    }

    // 2. Warm start of a running project.
    let s = new_spec();
    runner.start(&s).await.expect("start");
    let mut warm = Vec::with_capacity(WARM_RUNS);
    for _ in 0..WARM_RUNS {
        let t0 = Instant::now();
        runner.start(&s).await.expect("warm start");
        warm.push(t0.elapsed());
    }
    runner.stop(s.project, Duration::ZERO).await.expect("stop");
    warm.sort();
    let p = |q: f64| warm[((warm.len() as f64 * q) as usize).min(warm.len() - 1)];

    let (o, b) = (median(&mut ours), median(&mut bare));
    println!("cold start → first exec finished (median of {COLD_RUNS}):");
    println!("  PodmanRunner start+exec : {:8.1} ms", ms(o));
    println!("  podman run --rm true    : {:8.1} ms", ms(b));
    println!(
        "  ratio                   : {:8.2}  (goal ≤ 1.30)",
        o.as_secs_f64() / b.as_secs_f64()
    );
    println!("warm start on a running project ({WARM_RUNS} calls):");
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms  (goal p99 ≤ 5 ms)",
        ms(p(0.50)),
        ms(p(0.99)),
        ms(warm[warm.len() - 1])
    );
}
