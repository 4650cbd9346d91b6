//! A hidden host behind a reverse tunnel, with the real daemons as separate
//! processes: `cocalc-master`, `cocalc-proxy`, and a `cocalc-host` that has
//! no listening socket at all. Users reach it through the proxy only; the
//! tunnel survives `kill -9` of the proxy and of the host, and requests in
//! flight when either dies fail promptly instead of hanging.

use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::{
    api_key_of, blocking_post, bootstrap_token, cocalc, connections_to, eventually, free_port,
    host_config, listening_sockets, ok, spawn_host, spawn_proxy, start_master, tcp_sockets, Proc,
};

#[test]
fn hidden_host_is_served_through_the_tunnel_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let (master, murl, admin) = start_master(d, &[]);
    let create = |args: &[&str]| api_key_of(&cocalc(&murl, &admin, args, None));
    let proxy_key = create(&["proxy-key", "create", "edge", "--json"]);
    let alice = create(&["user", "create", "alice", "--json"]);

    // Proxy, on a port it keeps across restarts.
    let port = free_port();
    let purl = format!("http://127.0.0.1:{port}");
    std::fs::write(
        d.join("proxy.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n"
        ),
    )
    .unwrap();
    let start_proxy = || spawn_proxy(&d.join("proxy.toml"));
    let mut proxy = start_proxy();
    assert_eq!(proxy.line, format!("cocalc-proxy: listening on {purl}"));

    // A hidden host: tunnel_url and no listen address.
    let token = bootstrap_token(&murl, &admin);
    let host_cfg = host_config(d, &format!("tunnel_url = \"{purl}\""), &murl, &token);
    let start_host = || spawn_host(&host_cfg);
    let mut host = start_host();
    assert!(host.line.contains("hidden"), "{}", host.line);

    // The master records the tunnel handle, not a URL.
    eventually("the hidden host is up", Duration::from_secs(20), || {
        let o = cocalc(&murl, &admin, &["host", "list", "--json"], None);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter().any(|h| {
                h["state"] == "up"
                    && h["endpoint"]["kind"] == "tunnel"
                    && h["endpoint"]["value"] == purl.as_str()
            })
        })
    });
    // It listens nowhere.
    assert_eq!(
        listening_sockets(host.child.id()),
        Vec::<String>::new(),
        "a hidden host must have no listening socket"
    );

    // The operator's view says so.
    let list = ok(&cocalc(&murl, &admin, &["host", "list"], None));
    assert!(
        list.contains(&format!("hidden, tunnel at {purl}")),
        "{list}"
    );
    assert!(list.contains(" up "), "{list}");

    // Placement and open work as for any host; the data path goes through
    // the proxy (the CLI follows the endpoint).
    ok(&cocalc(&murl, &alice, &["project", "create", "p"], None));
    let open: serde_json::Value = serde_json::from_str(&ok(&cocalc(
        &murl,
        &alice,
        &["project", "open", "p", "--json"],
        None,
    )))
    .unwrap();
    assert_eq!(open["endpoint"]["kind"], "tunnel");
    let exec_ok = || {
        let o = cocalc(
            &murl,
            &alice,
            &[
                "project",
                "exec",
                "p",
                "--",
                "sh",
                "-c",
                "echo via-tunnel; exit 3",
            ],
            None,
        );
        o.status.code() == Some(3) && String::from_utf8_lossy(&o.stdout) == "via-tunnel\n"
    };
    eventually("exec through the tunnel", Duration::from_secs(20), exec_ok);
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    ok(&cocalc(
        &murl,
        &alice,
        &["file", "put", "p", "big.bin"],
        Some(&big),
    ));
    let got = cocalc(&murl, &alice, &["file", "get", "p", "big.bin"], None);
    assert!(got.status.success());
    assert!(
        got.stdout == big,
        "file came back different through the tunnel"
    );
    // Besides its tunnel, the host dialled connections back to the proxy
    // for those requests (the proxy keeps them for the next ones).
    assert!(
        connections_to(host.child.id(), port) >= 2,
        "expected the tunnel and at least one dial-back connection: {:?}",
        tcp_sockets(host.child.id())
    );

    // The master's one-call exec reaches the hidden host too (via the proxy).
    let pid = open["project"].as_str().unwrap().to_string();
    let r: serde_json::Value = blocking_post(
        &format!("{murl}/v1/projects/{pid}/exec"),
        &alice,
        serde_json::json!({ "argv": ["echo", "from-master"] }),
    );
    assert_eq!(r["exit_code"], 0, "{r}");

    // kill -9 the proxy while a request is in flight: the request fails
    // promptly; a new proxy on the same port gets the tunnel back.
    let o = kill_mid_request(&murl, &alice, &mut proxy);
    assert!(!o.status.success(), "the in-flight exec cannot succeed");
    // Without its tunnel the hidden host reports itself failing at once
    // (so nothing new is placed there), and ok again when it is back.
    let health_is = |want: &'static str| {
        let (murl, admin) = (murl.clone(), admin.clone());
        move || {
            let o = cocalc(&murl, &admin, &["host", "list", "--json"], None);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            v.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["health"] == want)
        }
    };
    eventually(
        "health failing without a tunnel",
        Duration::from_secs(5),
        health_is("failing"),
    );
    proxy = start_proxy();
    eventually(
        "the tunnel is back after a proxy restart",
        Duration::from_secs(30),
        exec_ok,
    );
    eventually(
        "health ok with the tunnel back",
        Duration::from_secs(5),
        health_is("ok"),
    );

    // kill -9 the host while a request is in flight: the proxy answers at
    // once; the restarted host dials back in and still has the data.
    let o = kill_mid_request(&murl, &alice, &mut host);
    assert!(!o.status.success(), "the in-flight exec cannot succeed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("host"), "{err}");
    host = start_host();
    eventually(
        "the tunnel is back after a host restart",
        Duration::from_secs(30),
        exec_ok,
    );
    let got = cocalc(&murl, &alice, &["file", "get", "p", "big.bin"], None);
    assert!(got.stdout == big, "data survived the host restart");
    drop(host);
    drop(proxy);
    drop(master);
}

/// Starts `sleep 60` in project `p`, `kill -9`s `victim` 1.5 s later, and
/// returns the exec's outcome, asserting it ended within 20 s (no hang).
fn kill_mid_request(master: &str, key: &str, victim: &mut Proc) -> Output {
    let slow = {
        let (master, key) = (master.to_string(), key.to_string());
        std::thread::spawn(move || {
            let t = Instant::now();
            let args = ["project", "exec", "p", "--", "sleep", "60"];
            (cocalc(&master, &key, &args, None), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    let (o, took) = slow.join().unwrap();
    assert!(
        took < Duration::from_secs(20),
        "in-flight request hung for {took:?}"
    );
    o
}

/// The hidden host's tunnel and dial-backs over TLS: the proxy serves
/// `https://` (a self-signed certificate the host is told to trust with
/// `tunnel_ca_file`; the master and CLI trust it through `SSL_CERT_FILE`),
/// and the host never touches the proxy's plain port. A second proxy that
/// trusts the certificate (`hosts_ca_file`) reaches the host through the
/// first one's `https://` handle.
#[test]
fn hidden_host_tunnels_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (d.join("proxy.crt"), d.join("proxy.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let trust = [("SSL_CERT_FILE", cert.as_path())];

    let (_master, murl, admin) = start_master(d, &trust);
    let cli = |key: &str, args: &[&str], stdin: Option<&[u8]>| -> Output {
        common::cocalc_env(&murl, key, args, stdin, &trust)
    };

    let json = |o: Output| -> serde_json::Value { serde_json::from_str(&ok(&o)).unwrap() };
    let proxy_key = api_key_of(&cli(
        &admin,
        &["proxy-key", "create", "edge", "--json"],
        None,
    ));
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"], None));

    let (plain, tls) = (free_port(), free_port());
    let handle = format!("https://127.0.0.1:{tls}");
    std::fs::write(
        d.join("proxy.toml"),
        format!(
            "listen = \"127.0.0.1:{plain}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n\
             public_url = \"{handle}\"\ntls_listen = \"127.0.0.1:{tls}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let _proxy = spawn_proxy(&d.join("proxy.toml"));
    let token = bootstrap_token(&murl, &admin);
    let host = spawn_host(&host_config(
        d,
        &format!(
            "tunnel_url = \"{handle}\"\ntunnel_ca_file = \"{}\"",
            cert.display()
        ),
        &murl,
        &token,
    ));
    assert!(host.line.contains("hidden"), "{}", host.line);
    eventually(
        "the hidden host is up over TLS",
        Duration::from_secs(20),
        || {
            let o = cli(&admin, &["host", "list", "--json"], None);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            v.as_array().is_some_and(|a| {
                a.iter().any(|h| {
                    h["state"] == "up"
                        && h["endpoint"]["kind"] == "tunnel"
                        && h["endpoint"]["value"] == handle.as_str()
                })
            })
        },
    );

    ok(&cli(&alice, &["project", "create", "p"], None));
    let open = json(cli(&alice, &["project", "open", "p", "--json"], None));
    assert_eq!(open["endpoint"]["value"], handle.as_str());
    eventually(
        "exec through the TLS tunnel",
        Duration::from_secs(20),
        || {
            let o = cli(
                &alice,
                &[
                    "project",
                    "exec",
                    "p",
                    "--",
                    "sh",
                    "-c",
                    "echo via-tls; exit 3",
                ],
                None,
            );
            o.status.code() == Some(3) && String::from_utf8_lossy(&o.stdout) == "via-tls\n"
        },
    );
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    ok(&cli(&alice, &["file", "put", "p", "big.bin"], Some(&big)));
    let got = cli(&alice, &["file", "get", "p", "big.bin"], None);
    assert!(got.status.success());
    assert!(got.stdout == big, "the file came back different");
    // The master's one-call exec reaches the hidden host through the
    // https handle too.
    let project = open["project"].as_str().unwrap().to_string();
    let r = blocking_post(
        &format!("{murl}/v1/projects/{project}/exec"),
        &alice,
        serde_json::json!({ "argv": ["echo", "from-master"] }),
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    // The tunnel and the dial-backs all went to the TLS port.
    let pid = host.child.id();
    assert!(
        connections_to(pid, tls) >= 2,
        "the tunnel and a dial-back, over TLS: {:?}",
        tcp_sockets(pid)
    );
    assert_eq!(connections_to(pid, plain), 0, "{:?}", tcp_sockets(pid));
    assert_eq!(listening_sockets(pid), Vec::<String>::new());

    // A second proxy, told to trust the first one's certificate, reaches
    // the host through the first one's https:// handle.
    let other = free_port();
    std::fs::write(
        d.join("proxy-b.toml"),
        format!(
            "listen = \"127.0.0.1:{other}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n\
             hosts_ca_file = \"{}\"\n",
            cert.display()
        ),
    )
    .unwrap();
    let _other = spawn_proxy(&d.join("proxy-b.toml"));
    let r = blocking_post(
        &format!("http://127.0.0.1:{other}/{project}/exec"),
        open["token"].as_str().unwrap(),
        serde_json::json!({ "argv": ["echo", "via-b"] }),
    );
    // Standard output comes in base64: "via-b\n".
    assert_eq!(
        (&r["exit_code"], &r["stdout"]),
        (&0.into(), &"dmlhLWIK".into()),
        "{r}"
    );
}
