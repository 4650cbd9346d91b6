//! `cocalc dev up` (the README's first command) brings a federation up,
//! the printed next steps work, and Ctrl-C stops it cleanly. Uses the
//! process backend so it runs anywhere; `scripts/test` also runs the podman
//! + Btrfs backend through the same steps when it is root (see below).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::free_port;

struct DevUp {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    proxy_port: u16,
    ssh_port: u16,
}

impl DevUp {
    /// What a terminal's Ctrl-C does: SIGINT to the whole foreground process
    /// group, `dev up` and every child it left in its group alike.
    fn ctrl_c(&self) -> nix::Result<()> {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT)
    }
}

impl Drop for DevUp {
    /// Even when a test fails: Ctrl-C first, so containers, mounts and loop
    /// devices are cleaned up; SIGKILL only if that does not finish.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.ctrl_c();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(backend: &str) -> DevUp {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let proxy_port = free_port();
    let ssh_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args([
            "dev",
            "up",
            "--dir",
            dir.path().to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--proxy-port",
            &proxy_port.to_string(),
            "--ssh-port",
            &ssh_port.to_string(),
            "--backend",
            backend,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A group of its own, as a shell's job: Ctrl-C goes to the group.
        .process_group(0)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "dev up did not come up");
        let line = lines.next().expect("dev up exited early").unwrap();
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    DevUp {
        child,
        dir,
        port,
        proxy_port,
        ssh_port,
    }
}

fn cocalc(d: &DevUp, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let key = std::fs::read_to_string(d.dir.path().join("demo.key")).unwrap();
    let master = format!("http://127.0.0.1:{}", d.port);
    common::cocalc(&master, key.trim(), args, stdin)
}

fn next_steps_work_and_ctrl_c_stops(backend: &str) {
    let mut d = start(backend);
    let o = cocalc(
        &d,
        &[
            "project",
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2; exit 7",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");
    let o = cocalc(&d, &["file", "put", "demo", "hello.txt"], Some(b"hi\n"));
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["file", "get", "demo", "hello.txt"], None);
    assert_eq!(o.stdout, b"hi\n");
    let o = cocalc(
        &d,
        &["project", "exec", "demo", "--", "cat", "hello.txt"],
        None,
    );
    assert_eq!(o.stdout, b"hi\n", "{o:?}");
    let o = cocalc(&d, &["file", "ls", "demo"], None);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("hello.txt"),
        "{o:?}"
    );
    let o = cocalc(&d, &["file", "get", "demo", "../../etc/passwd"], None);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let o = cocalc(&d, &["project", "explain", "demo"], None);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("chosen by"),
        "{o:?}"
    );
    let o = cocalc(&d, &["shell", "demo"], Some(b"echo shell-$((40+2))\n"));
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("shell-42"),
        "{o:?}"
    );
    // The same project through the proxy dev up started.
    let o = cocalc(&d, &["project", "open", "demo", "--json"], None);
    let open: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let via_proxy = common::blocking_post(
        &format!(
            "http://127.0.0.1:{}/{}/exec",
            d.proxy_port,
            open["project"].as_str().unwrap()
        ),
        open["token"].as_str().unwrap(),
        serde_json::json!({"argv": ["cat", "hello.txt"]}),
    );
    assert_eq!(via_proxy["exit_code"], 0, "{via_proxy}");
    assert_eq!(
        via_proxy["stdout"], "aGkK",
        "base64 of \"hi\\n\": {via_proxy}"
    );
    // SSH through the proxy, with a key registered by `cocalc ssh-key add`.
    let key = d.dir.path().join("id_ed25519");
    common::ssh_keygen(&key);
    let pubkey = key.with_extension("pub");
    let o = cocalc(&d, &["ssh-key", "add", pubkey.to_str().unwrap()], None);
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["ssh-key", "list", "--json"], None);
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    let o = common::ssh_exec(
        d.ssh_port,
        &key,
        open["project"].as_str().unwrap(),
        "cat hello.txt; exit 3",
    );
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(o.stdout, b"hi\n", "{o:?}");
    // Backups to the repository dev up made: back up, change, restore
    // one path, then the whole (stopped) project.
    let o = cocalc(&d, &["project", "backup", "demo", "--json"], None);
    assert!(o.status.success(), "{o:?}");
    let backup: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = backup["id"].as_str().unwrap().to_string();
    let o = cocalc(
        &d,
        &["file", "put", "demo", "hello.txt"],
        Some(b"changed\n"),
    );
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["file", "put", "demo", "later.txt"], Some(b"later\n"));
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["project", "backups", "demo"], None);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id), "{o:?}");
    let o = cocalc(
        &d,
        &["project", "restore", "demo", &id, "--path", "hello.txt"],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("restored hello.txt from backup"),
        "{o:?}"
    );
    let o = cocalc(&d, &["file", "get", "demo", "hello.txt"], None);
    assert_eq!(o.stdout, b"hi\n", "{o:?}");
    let o = cocalc(&d, &["project", "restore", "demo", &id], None);
    assert!(!o.status.success(), "the project runs: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop it first"),
        "{o:?}"
    );
    let o = cocalc(&d, &["project", "stop", "demo"], None);
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["project", "restore", "demo", &id], None);
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["file", "get", "demo", "later.txt"], None);
    assert!(!o.status.success(), "the whole project is as it was: {o:?}");
    let o = cocalc(&d, &["project", "stop", "demo"], None);
    assert!(o.status.success(), "{o:?}");

    // The hidden host dev up started: with the other hosts draining, a new
    // project lands on it and works through the proxy's tunnel.
    let admin_key = std::fs::read_to_string(d.dir.path().join("master/admin.key")).unwrap();
    let as_admin = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cocalc"))
            .args(args)
            .env("COCALC_MASTER", format!("http://127.0.0.1:{}", d.port))
            .env("COCALC_API_KEY", admin_key.trim())
            .output()
            .unwrap()
    };
    let hosts: serde_json::Value =
        serde_json::from_slice(&as_admin(&["host", "list", "--json"]).stdout).unwrap();
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 3, "two hosts and one hidden host: {hosts:?}");
    let visible: Vec<String> = hosts
        .iter()
        .filter(|h| h["endpoint"]["kind"] == "url")
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(visible.len(), 2, "{hosts:?}");
    for h in &visible {
        assert!(as_admin(&["host", "drain", h]).status.success());
    }
    let o = cocalc(&d, &["project", "create", "behind-nat"], None);
    assert!(o.status.success(), "{o:?}");
    let o = cocalc(&d, &["project", "open", "behind-nat", "--json"], None);
    let open: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        open["endpoint"],
        serde_json::json!({"kind": "tunnel", "value": format!("http://127.0.0.1:{}", d.proxy_port)})
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = cocalc(
            &d,
            &[
                "project",
                "exec",
                "behind-nat",
                "--",
                "echo",
                "through-the-tunnel",
            ],
            None,
        );
        if o.status.success() {
            assert_eq!(o.stdout, b"through-the-tunnel\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hidden host never answered: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SSH reaches the hidden host too, through the same tunnel.
    let o = common::ssh_exec(
        d.ssh_port,
        &key,
        open["project"].as_str().unwrap(),
        "echo over-ssh-$((40+2))",
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(o.stdout, b"over-ssh-42\n", "{o:?}");
    let fp = keys[0]["fingerprint"].as_str().unwrap();
    let o = cocalc(&d, &["ssh-key", "rm", fp], None);
    assert!(o.status.success(), "{o:?}");
    for h in &visible {
        assert!(as_admin(&["host", "undrain", h]).status.success());
    }
    // `cocalc project move`, out of the hidden host (the target pulls
    // through the proxy's tunnel) and back into it (the master reaches the
    // target through the tunnel), with the project running.
    let hidden = hosts
        .iter()
        .find(|h| h["endpoint"]["kind"] == "tunnel")
        .map(|h| h["id"].as_str().unwrap().to_string())
        .unwrap();
    let nat_id = open["project"].as_str().unwrap();
    let o = cocalc(
        &d,
        &["file", "put", "behind-nat", "moved.txt"],
        Some(b"moved\n"),
    );
    assert!(o.status.success(), "{o:?}");
    for to in [&visible[0], &hidden] {
        let o = as_admin(&["project", "move", nat_id, "--to", to]);
        assert!(o.status.success(), "{o:?}");
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(said.contains(&format!("to host {to}: done")), "{said}");
        let o = cocalc(
            &d,
            &["project", "exec", "behind-nat", "--", "cat", "moved.txt"],
            None,
        );
        assert_eq!(
            (o.status.success(), o.stdout.as_slice()),
            (true, &b"moved\n"[..]),
            "{o:?}"
        );
    }
    let o = as_admin(&["project", "move-status", nat_id, "--json"]);
    let mv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (mv["phase"].as_str(), mv["to"].as_str()),
        (Some("done"), Some(hidden.as_str())),
        "{mv}"
    );
    let o = as_admin(&["project", "move", nat_id, "--to", &hidden]);
    assert!(!o.status.success(), "already there: {o:?}");
    // `cocalc host evacuate` on the host of "demo": drained, and "demo"
    // goes elsewhere with its files.
    let o = cocalc(&d, &["project", "explain", "demo", "--json"], None);
    let x: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let demo_host = x["decision"]["host"].as_str().unwrap().to_string();
    let o = as_admin(&["host", "evacuate", &demo_host]);
    assert!(o.status.success(), "{o:?}");
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains(&format!("host {demo_host} is empty")),
        "{said}"
    );
    let o = cocalc(&d, &["project", "explain", "demo", "--json"], None);
    let x: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_ne!(x["decision"]["host"].as_str(), Some(demo_host.as_str()));
    let o = cocalc(&d, &["file", "get", "demo", "hello.txt"], None);
    assert_eq!(o.stdout, b"hi\n", "{o:?}");
    assert!(as_admin(&["host", "undrain", &demo_host]).status.success());
    let o = cocalc(&d, &["project", "stop", "behind-nat"], None);
    assert!(o.status.success(), "{o:?}");

    // Ctrl-C with two projects running, one on a visible host and one on
    // the hidden host: it stops them, every host and the master, and the
    // process exits cleanly.
    let mut running = Vec::new();
    for name in ["demo", "behind-nat"] {
        let o = cocalc(&d, &["project", "exec", name, "--", "true"], None);
        assert!(o.status.success(), "{o:?}");
        let o = cocalc(&d, &["project", "open", name, "--json"], None);
        let open: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        running.push(open["project"].as_str().unwrap().to_string());
    }
    if backend == "podman" {
        for id in &running {
            assert_eq!(containers_named(id), 1, "project {id} runs");
        }
    }
    d.ctrl_c().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dev up did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    let dir = d.dir.path().to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(dir), "a mount was left behind");
    let left = processes_working_in(d.dir.path());
    assert!(left.is_empty(), "processes left running in {dir}: {left:?}");
    if backend == "podman" {
        for id in &running {
            assert_eq!(
                containers_named(id),
                0,
                "project {id}'s container left behind"
            );
        }
        let losetup = Command::new("losetup").arg("-a").output().unwrap();
        assert!(losetup.status.success(), "{losetup:?}");
        let losetup = String::from_utf8_lossy(&losetup.stdout);
        assert!(!losetup.contains(dir), "loop device left behind: {losetup}");
    }
}

/// The processes (pid and command line) whose working directory is `dir`
/// or below it: a process-backend project's shell works in its home.
fn processes_working_in(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue; // gone meanwhile
        };
        if cwd.starts_with(dir) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

/// How many podman containers (running or not) have `project` in their name.
fn containers_named(project: &str) -> usize {
    let o = Command::new("podman")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("name={project}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).lines().count()
}

#[test]
fn dev_up_with_processes() {
    next_steps_work_and_ctrl_c_stops("process");
}

/// With COCALC_TEST_PRIVILEGED=require (as `scripts/test` sets it, as
/// root) the podman + Btrfs backend runs through the same steps, and no
/// container or loop device may be left behind.
#[test]
fn dev_up_with_podman_and_btrfs() {
    let required = std::env::var("COCALC_TEST_PRIVILEGED").is_ok_and(|v| v == "require");
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(!required, "COCALC_TEST_PRIVILEGED=require but not running as root: podman/Btrfs dev up needs root");
        eprintln!("skipping dev_up_with_podman_and_btrfs: not root (set COCALC_TEST_PRIVILEGED=require to make this fail)");
        return;
    }
    next_steps_work_and_ctrl_c_stops("podman");
}
