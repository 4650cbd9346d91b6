//! The proxy while the master is away, with the real daemons as separate
//! processes: a proxy with a `state_dir` keeps the master's signing keys
//! and the hosts' addresses on disk, so that restarted while the master is
//! down it starts and serves the projects it knew; one without cannot
//! start, and says why.

use std::process::Command;
use std::time::Duration;

mod common;
use common::{api_key_of, blocking_post, cocalc, eventually, free_port, ok, spawn, start_master};

#[test]
fn proxy_restarted_while_the_master_is_away_serves_from_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (master, murl, admin) = start_master(d, &[]);
    let cli = |key: &str, args: &[&str]| cocalc(&murl, key, args, None);
    let proxy_key = api_key_of(&cli(&admin, &["proxy-key", "create", "edge", "--json"]));
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"]));
    let token = ok(&cli(&admin, &["host", "bootstrap-token"]))
        .trim()
        .to_string();
    std::fs::write(
        d.join("host.toml"),
        format!(
            "listen = \"127.0.0.1:{}\"\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\n\
             bootstrap_token = \"{token}\"\nrunner = \"process\"\nstorage = \"dir\"\n",
            free_port(),
            d.join("h").display()
        ),
    )
    .unwrap();
    let _host = spawn(
        env!("CARGO_BIN_EXE_cocalc-host"),
        &d.join("host.toml"),
        "cocalc-host: ",
    );
    let port = free_port();
    let state = d.join("proxy-state");
    let write_proxy_cfg = |name: &str, state_dir: Option<&std::path::Path>| {
        let cfg = d.join(name);
        let extra = state_dir.map_or(String::new(), |s| {
            format!("state_dir = \"{}\"\n", s.display())
        });
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n\
                 key_refresh_secs = 1\n{extra}"
            ),
        )
        .unwrap();
        cfg
    };
    let with_state = write_proxy_cfg("proxy.toml", Some(&state));
    let proxy = spawn(
        env!("CARGO_BIN_EXE_cocalc-proxy"),
        &with_state,
        "cocalc-proxy: listening on ",
    );

    ok(&cli(&alice, &["project", "create", "p"]));
    let open: serde_json::Value =
        serde_json::from_str(&ok(&cli(&alice, &["project", "open", "p", "--json"]))).unwrap();
    let (project, connect_token) = (
        open["project"].as_str().unwrap().to_string(),
        open["token"].as_str().unwrap().to_string(),
    );
    let exec_via_proxy = || {
        blocking_post(
            &format!("http://127.0.0.1:{port}/{project}/exec"),
            &connect_token,
            serde_json::json!({ "argv": ["sh", "-c", "echo still-$((40+2))"] }),
        )
    };
    let before = exec_via_proxy();
    assert_eq!(before["exit_code"], 0, "{before}");
    // Saved every key refresh (1 s here): the keys, and the host's route.
    let saved = state.join(cocalc_proxy::ingress::STATE_FILE);
    eventually(
        "the proxy saved the host's route",
        Duration::from_secs(10),
        || {
            std::fs::read(&saved)
                .ok()
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|v| {
                    v["routes"].as_array().is_some_and(|r| r.len() == 1)
                        && v["signing_keys"].as_array().is_some_and(|k| !k.is_empty())
                })
        },
    );

    drop(proxy);
    drop(master);

    // Without saved state the proxy cannot start, and says why.
    let o = Command::new(env!("CARGO_BIN_EXE_cocalc-proxy"))
        .args(["-c", write_proxy_cfg("bare.toml", None).to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reaching the master"),
        "{o:?}"
    );

    // With it, the proxy starts and serves the project as before.
    let _proxy = spawn(
        env!("CARGO_BIN_EXE_cocalc-proxy"),
        &with_state,
        "cocalc-proxy: listening on ",
    );
    let after = exec_via_proxy();
    assert_eq!(after, before, "the same answer with the master away");
}
