//! Helpers shared by the tests that run the daemon and CLI binaries.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the `cocalc` CLI against `master` with API key `key`, feeding it
/// `stdin` (or nothing), and returns what it did.
pub(crate) fn cocalc(master: &str, key: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    cocalc_env(master, key, args, stdin, &[])
}

/// [`cocalc`] with more environment variables.
pub(crate) fn cocalc_env(
    master: &str,
    key: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &std::path::Path)],
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args(args)
        .env("COCALC_MASTER", master)
        .env("COCALC_API_KEY", key)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon started by [`spawn`]: killed when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    /// The stderr line [`spawn`] waited for.
    pub(crate) line: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin -c cfg` and waits for a stderr line starting with `prefix`.
pub(crate) fn spawn(bin: &str, cfg: &Path, prefix: &str) -> Proc {
    spawn_with(bin, cfg, prefix, &[])
}

/// [`spawn`] with more environment variables.
pub(crate) fn spawn_with(bin: &str, cfg: &Path, prefix: &str, env: &[(&str, &Path)]) -> Proc {
    let mut child = Command::new(bin)
        .args(["-c", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{bin} exited before printing {prefix:?}"))
            .unwrap();
        if line.starts_with(prefix) {
            break line;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Proc { child, line }
}

/// A master with its data in `d/m`, started with `env`: the process, its
/// URL and the admin key.
pub(crate) fn start_master(d: &Path, env: &[(&str, &Path)]) -> (Proc, String, String) {
    std::fs::write(
        d.join("master.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            d.join("m").display()
        ),
    )
    .unwrap();
    let master = spawn_with(
        env!("CARGO_BIN_EXE_cocalc-master"),
        &d.join("master.toml"),
        "cocalc-master: listening on ",
        env,
    );
    let murl = master
        .line
        .trim_start_matches("cocalc-master: listening on ")
        .to_string();
    let admin = std::fs::read_to_string(d.join("m/admin.key"))
        .unwrap()
        .trim()
        .to_string();
    (master, murl, admin)
}

pub(crate) fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rows of `/proc/net/tcp{,6}` for sockets that `pid` holds, as
/// (local address, remote address, state) in the kernel's hex notation.
pub(crate) fn tcp_sockets(pid: u32) -> Vec<(String, String, String)> {
    let mut mine = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                mine.insert(inode.to_string());
            }
        }
    }
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // Column 9 is the inode.
            if cols.len() > 9 && mine.contains(cols[9]) {
                found.push((cols[1].into(), cols[2].into(), cols[3].into()));
            }
        }
    }
    found
}

/// Local addresses of `pid`'s TCP listeners (state 0A).
pub(crate) fn listening_sockets(pid: u32) -> Vec<String> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|s| s.2 == "0A")
        .map(|s| s.0)
        .collect()
}

/// How many established (state 01) TCP connections `pid` has to `port`.
pub(crate) fn connections_to(pid: u32, port: u16) -> usize {
    let suffix = format!(":{port:04X}");
    tcp_sockets(pid)
        .iter()
        .filter(|s| s.2 == "01" && s.1.ends_with(&suffix))
        .count()
}

/// Writes `d/host.toml` for a host with the process runner and directory
/// storage, its data in `d/h`: `reach` (its `listen` or `tunnel_url`
/// line, and any others), the master at `murl` and a bootstrap token.
/// Returns the file.
pub(crate) fn host_config(d: &Path, reach: &str, murl: &str, bootstrap: &str) -> PathBuf {
    let cfg = d.join("host.toml");
    std::fs::write(
        &cfg,
        format!(
            "{reach}\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\n\
             bootstrap_token = \"{bootstrap}\"\nrunner = \"process\"\nstorage = \"dir\"\n",
            d.join("h").display()
        ),
    )
    .unwrap();
    cfg
}

/// Waits until the master at `murl` lists a host as up (asked with the
/// admin key).
pub(crate) fn wait_for_host_up(murl: &str, admin: &str) {
    eventually("the host is up", Duration::from_secs(20), || {
        let o = cocalc(murl, admin, &["host", "list", "--json"], None);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .is_some_and(|a| a.iter().any(|h| h["state"] == "up"))
    });
}

/// Creates the project `name` as the user of `key` and opens it: the
/// project's id and a connect token.
pub(crate) fn create_and_open(murl: &str, key: &str, name: &str) -> (String, String) {
    ok(&cocalc(murl, key, &["project", "create", name], None));
    let open: serde_json::Value = serde_json::from_str(&ok(&cocalc(
        murl,
        key,
        &["project", "open", name, "--json"],
        None,
    )))
    .unwrap();
    let field = |k: &str| open[k].as_str().unwrap().to_string();
    (field("project"), field("token"))
}

/// A new Ed25519 key pair at `path` (and `path.pub`), by `ssh-keygen`.
pub(crate) fn ssh_keygen(path: &Path) {
    let k = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(k.status.success(), "{k:?}");
}

/// A new Ed25519 key pair at `path`, registered with the master at
/// `murl` as an SSH key of the user whose API key is `user`.
pub(crate) fn registered_ssh_key(murl: &str, user: &str, path: &Path) {
    ssh_keygen(path);
    let public = path.with_extension("pub");
    ok(&cocalc(
        murl,
        user,
        &["ssh-key", "add", public.to_str().unwrap()],
        None,
    ));
}

/// Runs `command` in `project` with `ssh` (OpenSSH, as a script would:
/// no config, no prompts), through the SSH ingress on `port`, logging in
/// with `key`.
pub(crate) fn ssh_exec(port: u16, key: &Path, project: &str, command: &str) -> Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .args(["-p", &port.to_string()])
        .arg(format!("project-{project}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (openssh-client) is needed")
}

/// Starts `cocalc-proxy -c cfg`, once it says it listens.
pub(crate) fn spawn_proxy(cfg: &Path) -> Proc {
    spawn(
        env!("CARGO_BIN_EXE_cocalc-proxy"),
        cfg,
        "cocalc-proxy: listening on ",
    )
}

/// A host bootstrap token from the master at `murl` (admin key `admin`).
pub(crate) fn bootstrap_token(murl: &str, admin: &str) -> String {
    ok(&cocalc(murl, admin, &["host", "bootstrap-token"], None))
        .trim()
        .to_string()
}

/// Starts `cocalc-host -c cfg`, once it says it serves.
pub(crate) fn spawn_host(cfg: &Path) -> Proc {
    spawn(env!("CARGO_BIN_EXE_cocalc-host"), cfg, "cocalc-host: ")
}

/// The `api_key` of what `cocalc … create … --json` printed (a user, a
/// proxy key), after checking it succeeded.
pub(crate) fn api_key_of(o: &Output) -> String {
    let v: serde_json::Value = serde_json::from_str(&ok(o)).unwrap();
    v["api_key"].as_str().unwrap().to_string()
}

/// POST JSON with a bearer key; the JSON answer (blocking, for tests).
pub(crate) fn blocking_post(url: &str, key: &str, body: serde_json::Value) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}
