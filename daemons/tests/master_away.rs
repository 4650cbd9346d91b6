//! The proxy while the master is away, with the real daemons as separate
//! processes: a proxy with a `state_dir` keeps the master's signing keys,
//! the hosts' addresses and hidden hosts' keys on disk, so that restarted
//! while the master is down it starts, takes hidden hosts' tunnels back,
//! and serves the projects it knew; one without cannot start, and says
//! why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{
    api_key_of, blocking_post, bootstrap_token, cocalc, create_and_open, eventually, free_port,
    host_config, registered_ssh_key, spawn_host, spawn_proxy, ssh_exec, start_master,
    wait_for_host_up, Proc,
};

/// A master, a proxy with a state directory, and one host (hidden, dialling
/// the proxy, or with a URL) holding alice's project.
struct Fed {
    master: Option<Proc>,
    _host: Proc,
    proxy: Proc,
    /// The proxy's config file (with `state_dir`) and port.
    proxy_cfg: PathBuf,
    port: u16,
    state: PathBuf,
    project: String,
    token: String,
    /// The master's URL, alice's API key, and the proxy's SSH and
    /// metrics ports.
    murl: String,
    alice: String,
    ssh: u16,
    metrics: u16,
}

fn federation(d: &Path, hidden: bool) -> Fed {
    let (master, murl, admin) = start_master(d, &[]);
    let cli = |key: &str, args: &[&str]| cocalc(&murl, key, args, None);
    let proxy_key = api_key_of(&cli(&admin, &["proxy-key", "create", "edge", "--json"]));
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"]));
    let (port, ssh, metrics) = (free_port(), free_port(), free_port());
    let state = d.join("proxy-state");
    let proxy_cfg = d.join("proxy.toml");
    std::fs::write(
        &proxy_cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n\
             key_refresh_secs = 1\nstate_dir = \"{}\"\nssh_listen = \"127.0.0.1:{ssh}\"\n\
             ssh_host_key_file = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n",
            state.display(),
            d.join("proxy_ssh_ed25519").display()
        ),
    )
    .unwrap();
    let proxy = spawn_proxy(&proxy_cfg);
    let bootstrap = bootstrap_token(&murl, &admin);
    let reach = if hidden {
        format!("tunnel_url = \"http://127.0.0.1:{port}\"")
    } else {
        format!("listen = \"127.0.0.1:{}\"", free_port())
    };
    let host = spawn_host(&host_config(d, &reach, &murl, &bootstrap));
    wait_for_host_up(&murl, &admin);
    let (project, token) = create_and_open(&murl, &alice, "p");
    Fed {
        master: Some(master),
        _host: host,
        proxy,
        proxy_cfg,
        port,
        state,
        project,
        token,
        murl,
        alice,
        ssh,
        metrics,
    }
}

impl Fed {
    /// The same exec through the proxy, as JSON.
    fn exec_via_proxy(&self) -> serde_json::Value {
        blocking_post(
            &format!("http://127.0.0.1:{}/{}/exec", self.port, self.project),
            &self.token,
            serde_json::json!({ "argv": ["sh", "-c", "echo still-$((40+2))"] }),
        )
    }

    /// The proxy's saved state, once it holds what `ready` asks for.
    fn wait_for_saved(&self, file: &str, ready: impl Fn(&serde_json::Value) -> bool) {
        let path = self.state.join(file);
        eventually(
            &format!("the proxy saved {file}"),
            Duration::from_secs(10),
            || {
                std::fs::read(&path)
                    .ok()
                    .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| ready(&v))
            },
        );
    }

    /// Stops the proxy and the master, then starts the proxy again.
    fn restart_proxy_without_master(&mut self) {
        let _ = self.proxy.child.kill();
        let _ = self.proxy.child.wait();
        self.master = None;
        self.proxy = spawn_proxy(&self.proxy_cfg);
    }
}

#[test]
fn proxy_restarted_while_the_master_is_away_serves_from_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut f = federation(d, false);
    let before = f.exec_via_proxy();
    assert_eq!(before["exit_code"], 0, "{before}");
    // Saved every key refresh (1 s here): the keys, and the host's route.
    f.wait_for_saved(cocalc_proxy::ingress::STATE_FILE, |v| {
        v["routes"].as_array().is_some_and(|r| r.len() == 1)
            && v["signing_keys"].as_array().is_some_and(|k| !k.is_empty())
    });
    f.restart_proxy_without_master();
    let after = f.exec_via_proxy();
    assert_eq!(after, before, "the same answer with the master away");

    // Without saved state a proxy cannot start, and says why.
    let bare = d.join("bare.toml");
    let cfg = std::fs::read_to_string(&f.proxy_cfg).unwrap();
    let without_state: String = cfg
        .lines()
        .filter(|l| !l.starts_with("state_dir") && !l.starts_with("listen"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &bare,
        format!("listen = \"127.0.0.1:{}\"\n{without_state}", free_port()),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-proxy"))
        .args(["-c", bare.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reaching the master"),
        "{o:?}"
    );
}

/// A hidden host's tunnel comes back to a proxy restarted while the
/// master is away: the proxy checks its handshake with the host key it
/// saved.
#[test]
fn hidden_host_redials_a_proxy_restarted_while_the_master_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = federation(dir.path(), true);
    // "Up" at the master can come before the tunnel is open.
    let mut before = serde_json::Value::Null;
    eventually("exec through the tunnel", Duration::from_secs(20), || {
        before = f.exec_via_proxy();
        before["exit_code"] == 0
    });
    f.wait_for_saved(cocalc_proxy::tunnel::HOST_KEYS_FILE, |v| {
        v.as_object().is_some_and(|keys| keys.len() == 1)
    });
    f.wait_for_saved(cocalc_proxy::ingress::STATE_FILE, |v| {
        v["routes"].as_array().is_some_and(|r| r.len() == 1)
    });
    f.restart_proxy_without_master();
    let mut last = serde_json::Value::Null;
    eventually(
        "the hidden host's tunnel is back and serves",
        Duration::from_secs(30),
        || {
            last = f.exec_via_proxy();
            last == before
        },
    );
}

/// SSH logins while the master is away: a key the master granted for
/// the project through this proxy logs in again with that grant while
/// its token lives; a key it never granted here is refused.
#[test]
fn ssh_logins_granted_before_go_on_while_the_master_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut f = federation(d, false);
    let (used, unused) = (d.join("used_ed25519"), d.join("unused_ed25519"));
    registered_ssh_key(&f.murl, &f.alice, &used);
    registered_ssh_key(&f.murl, &f.alice, &unused);
    let ssh = |key: &Path| ssh_exec(f.ssh, key, &f.project, "echo via-$((6*7))");
    let o = ssh(&used);
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"via-42\n"[..]),
        "{o:?}"
    );
    f.master = None;
    for _ in 0..2 {
        let o = ssh(&used);
        assert_eq!(
            (o.status.code(), o.stdout.as_slice()),
            (Some(0), &b"via-42\n"[..]),
            "with the master away: {o:?}"
        );
    }
    let o = ssh(&unused);
    assert_eq!(o.status.code(), Some(255), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{o:?}"
    );
    // Counted: two logins from the earlier grant, one refusal.
    let metrics = {
        use std::io::{Read, Write};
        let mut m = std::net::TcpStream::connect(("127.0.0.1", f.metrics)).unwrap();
        m.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        m.read_to_string(&mut text).unwrap();
        text
    };
    for line in [
        "cocalc_proxy_ssh_earlier_grant_logins_total 2",
        "cocalc_proxy_ssh_refusals_total{reason=\"master_error\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}
