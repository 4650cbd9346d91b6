//! `cocalc-master` started from its config file with one command, driven by
//! the `cocalc` CLI as an operator and a user would.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use cocalc_auth::paserk;
use cocalc_core::wire::RegisterHostRequest;
use cocalc_core::{Capacity, HostEndpoint, HostId, Region};

struct Daemon {
    child: Child,
    url: String,
    metrics_url: String,
    admin_key: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped (also when a test panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_master() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("master.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nplacement = \"data-aware\"\n\
             metrics_listen = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocalc-master"))
        .args(["-c", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut metrics_url = None;
    let url = loop {
        let line = lines
            .next()
            .expect("master exited before listening")
            .unwrap();
        if let Some(u) = line.strip_prefix("cocalc-master: metrics on ") {
            metrics_url = Some(u.to_string());
        }
        if let Some(u) = line.strip_prefix("cocalc-master: listening on ") {
            break u.to_string();
        }
    };
    let metrics_url = metrics_url.expect("the master says where its metrics are");
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let admin_key = std::fs::read_to_string(dir.path().join("data/admin.key"))
        .unwrap()
        .trim()
        .to_string();
    Daemon {
        child,
        url,
        metrics_url,
        admin_key,
        _dir: dir,
    }
}

fn cocalc(d: &Daemon, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args(args)
        .env("COCALC_MASTER", &d.url)
        .env("COCALC_API_KEY", key)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[test]
fn master_starts_from_config_and_serves_the_cli() {
    let d = start_master();
    let admin = d.admin_key.clone();

    // Operator: a user, a bootstrap token.
    let alice = json(&cocalc(&d, &admin, &["user", "create", "alice", "--json"]));
    let alice_key = alice["api_key"].as_str().unwrap().to_string();
    let token = ok(&cocalc(&d, &admin, &["host", "bootstrap-token"]))
        .trim()
        .to_string();
    assert!(token.starts_with("cbt."), "{token}");

    // User: a project; opening it with no host is a clear refusal.
    let p = json(&cocalc(
        &d,
        &alice_key,
        &["project", "create", "thesis", "--json"],
    ));
    assert_eq!(p["name"], "thesis");
    let o = cocalc(&d, &alice_key, &["project", "open", "thesis"]);
    assert_eq!(o.status.code(), Some(5));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no hosts are registered"), "{err}");

    // A host registers with the bootstrap token (as the host agent will).
    let host_key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let host = HostId::new_v4([5; 16]);
    let req = RegisterHostRequest::new(
        host,
        paserk::encode_public(&host_key.verifying_key()),
        Some(token.clone()),
        Region("local".into()),
        HostEndpoint::Url("http://127.0.0.1:9".into()),
        Capacity {
            project_slots: 10,
            disk_free_bytes: 100 << 30,
            disk_total_bytes: 200 << 30,
            ..Capacity::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/hosts/register", d.url))
            .json(&req)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);

    // Now open works, explains itself, and the host list shows the host.
    let o = json(&cocalc(
        &d,
        &alice_key,
        &["project", "open", "thesis", "--json"],
    ));
    assert_eq!(o["host"], host.to_string());
    assert_eq!(o["generation"], 1);
    let text = ok(&cocalc(&d, &alice_key, &["project", "explain", "thesis"]));
    assert!(text.contains("chosen by data-aware"), "{text}");
    assert!(text.contains("no host holds data yet"), "{text}");
    let hosts = json(&cocalc(&d, &admin, &["host", "list", "--json"]));
    assert_eq!(hosts[0]["state"], "up");
    let drained = ok(&cocalc(&d, &admin, &["host", "drain", &host.to_string()]));
    assert!(drained.contains("draining"), "{drained}");

    // Key rotation, and the admin-only guard.
    let rotated = json(&cocalc(&d, &admin, &["key", "rotate", "--json"]));
    assert_eq!(rotated["signing_keys"].as_array().unwrap().len(), 2);
    let o = cocalc(&d, &alice_key, &["key", "rotate"]);
    assert_eq!(o.status.code(), Some(3));
    // A wrong key is refused with a hint.
    let o = cocalc(&d, "cuk.wrong", &["project", "list"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown API key"));

    // The metrics show all of it.
    let metrics = rt.block_on(async {
        let r = reqwest::get(&d.metrics_url).await.unwrap();
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        r.text().await.unwrap()
    });
    for line in [
        "cocalc_master_hosts{state=\"draining\",health=\"ok\"} 1".to_string(),
        "cocalc_master_hosts{state=\"up\",health=\"ok\"} 0".to_string(),
        format!("cocalc_master_host_project_slots{{host=\"{host}\"}} 10"),
        "cocalc_master_users 1".to_string(),
        "cocalc_master_projects 1".to_string(),
        "cocalc_master_http_responses_total{code=\"401\"} 1".to_string(),
        "cocalc_master_http_responses_total{code=\"403\"} 1".to_string(),
        "cocalc_master_http_responses_total{code=\"503\"} 1".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} not in:\n{metrics}"
        );
    }
}

#[test]
fn bad_config_is_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\nplacement = \"random\"\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-master"))
        .args(["-c", cfg.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("placement \"random\""));
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-master"))
        .args(["-c", cfg.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(o.status.success());
    // No master listening: the CLI says so.
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args([
            "--master",
            "http://127.0.0.1:9",
            "--api-key",
            "x",
            "project",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the master"));
}

#[test]
fn proxy_starts_from_config_and_refuses_at_the_edge() {
    let d = start_master();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:0\"\nmaster_url = \"{}\"\n", d.url),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-proxy"))
        .args(["-c", cfg.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "no API key is a config error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("api_key"));
    // HTTPS needs a certificate and key that load, checked before start.
    let missing = dir.path().join("missing.crt");
    for (extra, says) in [
        (
            "tls_listen = \"127.0.0.1:0\"\n".to_string(),
            "tls_listen needs tls_cert_file and tls_key_file".to_string(),
        ),
        (
            format!(
                "tls_listen = \"127.0.0.1:0\"\ntls_cert_file = \"{0}\"\ntls_key_file = \"{0}\"\n",
                missing.display()
            ),
            missing.display().to_string(),
        ),
        (
            format!("tls_cert_file = \"{}\"\n", missing.display()),
            "go with tls_listen".to_string(),
        ),
        // An access log in a directory that is not there.
        (
            format!(
                "access_log = \"{}\"\n",
                dir.path().join("no-dir").join("access.log").display()
            ),
            format!("{} is not a directory", dir.path().join("no-dir").display()),
        ),
        // Load balancers in front: addresses or ranges.
        (
            "trusted_proxies = [\"10.0.0.0/8\", \"lb.example\"]\n".to_string(),
            "trusted_proxies: \"lb.example\" is not an address or a range".to_string(),
        ),
        // The PROXY protocol: on listeners that exist, from someone.
        (
            "trusted_proxies = [\"10.0.0.5\"]\nproxy_protocol = [\"smtp\"]\n".to_string(),
            "proxy_protocol: unknown listener \"smtp\"".to_string(),
        ),
        (
            "trusted_proxies = [\"10.0.0.5\"]\nproxy_protocol = [\"ssh\"]\n".to_string(),
            "\"ssh\" is listed but ssh_listen is not set".to_string(),
        ),
        (
            "trusted_proxies = [\"10.0.0.5\"]\nproxy_protocol = [\"https\"]\n".to_string(),
            "\"https\" is listed but tls_listen is not set".to_string(),
        ),
        (
            "proxy_protocol = [\"http\"]\n".to_string(),
            "proxy_protocol needs trusted_proxies".to_string(),
        ),
        // The CA that hosts with https:// URLs must chain to.
        (
            format!("hosts_ca_file = \"{}\"\n", missing.display()),
            format!("hosts_ca_file: CA file {}", missing.display()),
        ),
        // The handle hidden hosts dial and other proxies forward to.
        (
            "public_url = \"proxy.example:8000\"\n".to_string(),
            "public_url \"proxy.example:8000\": ".to_string(),
        ),
        (
            "public_url = \"https://proxy.example/edge\"\n".to_string(),
            "a path, query or fragment is not supported".to_string(),
        ),
    ] {
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nmaster_url = \"{}\"\napi_key = \"k\"\n{extra}",
                d.url
            ),
        )
        .unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_cocalc-proxy"))
            .args(["-c", cfg.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(&says), "{extra}: {err}");
    }
    // The proxy gets a proxy key of its own, from the CLI, in a file.
    let created = json(&cocalc(
        &d,
        &d.admin_key,
        &["proxy-key", "create", "edge", "--json"],
    ));
    assert_eq!(created["key"]["name"], "edge");
    let key_file = dir.path().join("proxy.key");
    std::fs::write(&key_file, created["api_key"].as_str().unwrap()).unwrap();
    // A state_dir that cannot be made stops the start, naming it.
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, "").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmaster_url = \"{}\"\napi_key_file = \"{}\"\n\
             state_dir = \"{}/state\"\n",
            d.url,
            key_file.display(),
            blocked.display()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-proxy"))
        .args(["-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains(&format!("state_dir {}/state", blocked.display())),
        "{o:?}"
    );
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmaster_url = \"{}\"\napi_key_file = \"{}\"\n\
             metrics_listen = \"127.0.0.1:0\"\n",
            d.url,
            key_file.display()
        ),
    )
    .unwrap();
    // Started as systemd starts services: a low soft limit on open files
    // under a higher hard one; the proxy raises its own.
    let mut child = Killed(
        Command::new("sh")
            .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_cocalc-proxy"))
            .args(["-c", cfg.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut metrics_url = None;
    let url = loop {
        let line = lines.next().expect("proxy exited").unwrap();
        if let Some(u) = line.strip_prefix("cocalc-proxy: metrics on ") {
            metrics_url = Some(u.to_string());
        }
        if let Some(u) = line.strip_prefix("cocalc-proxy: listening on ") {
            break u.to_string();
        }
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let open_files: Vec<u64> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .unwrap()
        .split_whitespace()
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        open_files[1] > 256,
        "the hard limit must be above the test's 256: {limits}"
    );
    assert_eq!(
        open_files[0],
        open_files[1].min(nr_open),
        "the proxy raised its soft limit on open files: {limits}"
    );
    let metrics_url = metrics_url.expect("the proxy says where its metrics are");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bad, internal, missing, metrics) = rt.block_on(async {
        let c = reqwest::Client::new();
        let bad = c
            .get(format!("{url}/not-a-project/exec"))
            .send()
            .await
            .unwrap();
        // Under /.cocalc/ only the tunnel endpoints exist; anything else
        // is a bad path like any other.
        let internal = c
            .get(format!("{url}/.cocalc/nothing-here"))
            .send()
            .await
            .unwrap();
        let internal = (
            internal.status().as_u16(),
            internal.json::<serde_json::Value>().await.unwrap(),
        );
        let missing = c
            .post(format!("{url}/6ba7b810-9dad-41d1-80b4-00c04fd430c8/exec"))
            .send()
            .await
            .unwrap();
        let metrics = c.get(&metrics_url).send().await.unwrap();
        assert!(metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        let text = metrics.text().await.unwrap();
        (
            bad.status().as_u16(),
            internal,
            missing.status().as_u16(),
            text,
        )
    });
    drop(child);
    assert_eq!(bad, 400);
    assert_eq!(internal.0, 400, "{:?}", internal.1);
    assert_eq!(internal.1["code"], "bad_path");
    assert_eq!(missing, 401);
    let listed = ok(&cocalc(&d, &d.admin_key, &["proxy-key", "list"]));
    assert!(listed.starts_with("edge  created at "), "{listed}");
    ok(&cocalc(&d, &d.admin_key, &["proxy-key", "revoke", "edge"]));
    assert_eq!(ok(&cocalc(&d, &d.admin_key, &["proxy-key", "list"])), "");
    let again = cocalc(&d, &d.admin_key, &["proxy-key", "revoke", "edge"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no proxy key named \"edge\""),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Each refusal is counted by reason.
    for line in [
        "cocalc_proxy_http_refusals_total{reason=\"bad_path\"} 2",
        "cocalc_proxy_http_refusals_total{reason=\"bad_token\"} 1",
        "cocalc_proxy_http_refusals_total{reason=\"rate_limited\"} 0",
        "cocalc_proxy_tunnels_connected 0",
        "cocalc_proxy_dial_backs_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} not in:\n{metrics}"
        );
    }
}
