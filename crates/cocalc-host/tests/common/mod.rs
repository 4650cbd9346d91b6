//! Shared fixtures of the runner tests: privilege gating and a podman
//! runner with its own service and storage in a temporary directory.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use cocalc_core::HostId;
use cocalc_host::podman::{PodmanConfig, PodmanRunner, StorageDirs, LABEL_HOST};
use cocalc_host::ImagePolicy;
use cocalc_testkit::runner_contract::ContractEnv;

/// The test image every podman test imports into its own storage.
pub const IMAGE: &str = "localhost/cocalc-test-busybox:1";
/// An allowed image that is never imported.
pub const MISSING_IMAGE: &str = "localhost/cocalc-test-missing:1";

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// What privileged podman tests lack here, if anything.
fn missing() -> Vec<&'static str> {
    let mut m = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        m.push("root");
    }
    if !which("podman") {
        m.push("podman (apt-get install podman)");
    }
    if !Path::new("/usr/sbin/runc").exists() && !which("runc") {
        m.push("runc (apt-get install runc)");
    }
    if !Path::new("/bin/busybox").exists() && !Path::new("/usr/bin/busybox").exists() {
        m.push("busybox (apt-get install busybox-static)");
    }
    m
}

/// `true` if privileged tests may run. With `COCALC_TEST_PRIVILEGED=require`
/// a missing prerequisite fails the test, naming it; otherwise the test
/// skips, saying why on stderr once.
pub fn privileged() -> bool {
    let m = missing();
    if m.is_empty() {
        return true;
    }
    let why = format!("privileged podman tests need: {}", m.join(", "));
    if std::env::var("COCALC_TEST_PRIVILEGED").as_deref() == Ok("require") {
        panic!("COCALC_TEST_PRIVILEGED=require but {why}");
    }
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Straight to the stderr handle: libtest captures `eprintln!` of
        // passing tests, and this note must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipping: {why} (set COCALC_TEST_PRIVILEGED=require to fail instead)"
        );
    });
    false
}

/// A unique host id per fixture, so parallel tests never see each other.
pub fn fresh_host() -> HostId {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = cocalc_testkit::runner_contract::fresh_project();
    let mut b = *p.as_bytes();
    b[0] ^= N.fetch_add(1, Ordering::SeqCst) as u8;
    HostId::new_v4(b)
}

/// A podman runner with its own service, `vfs` storage and state in a
/// temporary directory, the busybox test image imported. Dropping it removes
/// the host's containers, stops the service, unmounts anything left under
/// the directory and deletes it — also when the test panicked.
pub struct PodmanFixture {
    pub runner: Option<PodmanRunner>,
    pub host: HostId,
    pub dir: tempfile::TempDir,
    homes: AtomicU64,
}

impl PodmanFixture {
    /// Starts everything; panics (failing the test) if podman is broken.
    pub async fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cocalc-podman-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let host = fresh_host();
        let mut fx = PodmanFixture {
            runner: None,
            host,
            dir,
            homes: AtomicU64::new(0),
        };
        let runner = PodmanRunner::new(fx.config(host))
            .await
            .expect("podman runner");
        runner
            .import_busybox_image(IMAGE)
            .await
            .expect("import test image");
        fx.runner = Some(runner);
        fx
    }

    /// The configuration of this fixture's runner for `host` (a second
    /// runner with the same config re-adopts the first one's containers).
    pub fn config(&self, host: HostId) -> PodmanConfig {
        let d = self.dir.path();
        PodmanConfig::new(
            host,
            ImagePolicy::new(IMAGE, [MISSING_IMAGE.to_string()]),
            d.join("state"),
        )
        .with_storage(StorageDirs {
            graphroot: d.join("storage/root"),
            runroot: d.join("storage/run"),
            driver: "vfs".into(),
        })
    }

    pub fn runner(&self) -> &PodmanRunner {
        self.runner.as_ref().expect("runner")
    }

    /// A fresh home directory.
    pub fn home(&self) -> PathBuf {
        make_home(self.dir.path())
    }

    /// The contract environment of this fixture.
    pub fn contract_env(&self) -> ContractEnv {
        let base = self.dir.path().to_path_buf();
        ContractEnv {
            make_home: Box::new(move || make_home(&base)),
            forbidden_image: "docker.io/library/ubuntu:99.04".into(),
        }
    }

    fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", d.join("state/containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("state/storage.conf"));
        c
    }
}

pub fn make_home(base: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = base.join(format!("homes/h{}", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&p).expect("home dir");
    p
}

impl Drop for PodmanFixture {
    fn drop(&mut self) {
        // Containers of this host, through the CLI (works with or without
        // the service).
        if let Ok(out) = self
            .podman()
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label={LABEL_HOST}={}", self.host))
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let _ = self
                    .podman()
                    .args(["rm", "-f", "-t", "0"])
                    .args(&ids)
                    .output();
            }
        }
        // Stops the service the runner started.
        self.runner.take();
        // Anything still mounted under our directory (shm of containers).
        let dir = self.dir.path().to_string_lossy().into_owned();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut mounts: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|m| m.starts_with(&dir))
                .collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
