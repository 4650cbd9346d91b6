//! Two `cocalc-proxy` daemons in front of one hidden host whose tunnel
//! lands at the first: a user who reaches the second one (another DNS
//! answer, another balancer target) is served all the same — HTTP with
//! and without a body, a server in the project, SSH — through the first.
//! The project's server sees the client's `Host` and address as if there
//! were one proxy; a request that one proxy already forwarded is never
//! forwarded again. And a hidden host that lists both proxies moves its
//! tunnel to the second when the first dies, and tells the master; the
//! first request after that at other proxies whose routes still name the
//! dead one follows at once, whatever it is: without a body, with one, a
//! WebSocket, an SSH session.

use std::time::Duration;

mod common;
use common::{
    api_key_of, bootstrap_token, cocalc, create_and_open, eventually, free_port, host_config,
    registered_ssh_key, spawn_host, spawn_proxy, ssh_exec, start_master, Proc,
};

/// A server for the project: `GET` answers with the request's headers,
/// one `name: value` line each, names in lowercase.
const HEADERS_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items()).encode()
        self.send_response(200); self.send_header("content-length", str(len(b))); self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A request from the local address `from` with a bearer token and the
/// headers `extra`: the status and the body (blocking, for tests).
fn request(
    from: &str,
    method: reqwest::Method,
    url: &str,
    token: &str,
    json: Option<serde_json::Value>,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .local_address(from.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let mut req = client.request(method, url).bearer_auth(token);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if let Some(body) = json {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The access log's lines at `path` whose target contains `needle`.
fn logged(path: &std::path::Path, needle: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["target"].as_str().unwrap().contains(needle))
        .collect()
}

/// Starts a proxy named `name` (its config file `d/<name>.toml`) on
/// loopback port `port`, with the config lines `extra`.
fn start_proxy(d: &std::path::Path, name: &str, port: u16, common: &str, extra: &str) -> Proc {
    let cfg = d.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:{port}\"\n{common}{extra}"),
    )
    .unwrap();
    spawn_proxy(&cfg)
}

/// The config lines every proxy of a test shares: the master and the
/// proxy key.
fn proxy_common(murl: &str, admin: &str) -> String {
    let o = cocalc(
        murl,
        admin,
        &["proxy-key", "create", "edge", "--json"],
        None,
    );
    let key = api_key_of(&o);
    format!("master_url = \"{murl}\"\napi_key = \"{key}\"\n")
}

/// Opens a WebSocket to the project's terminal through the proxy on
/// loopback `port`, and returns the head of the answer (then closes).
fn websocket_head(port: u16, project: &str, token: &str) -> String {
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    answer_head(port, &format!("/{project}/terminal"), token, upgrade)
}

/// Sends `GET path` with `token` and the header lines `extra` over
/// HTTP/1.1 to the proxy on loopback `port`, and returns the head of the
/// answer.
fn answer_head(port: u16, path: &str, token: &str, extra: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Authorization: Bearer {token}\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The master's record of its only host, once there is one.
/// Starts a hidden host that dials the proxies `proxies`, in that order.
fn hidden_host(d: &std::path::Path, murl: &str, admin: &str, proxies: &[&str]) -> Proc {
    let bootstrap = bootstrap_token(murl, admin);
    let reach = match proxies {
        [one] => format!("tunnel_url = \"{one}\""),
        many => format!("tunnel_url = {many:?}"),
    };
    spawn_host(&host_config(d, &reach, murl, &bootstrap))
}

/// Whether the master lists the host `h` up and healthy, with its tunnel
/// at the proxy `purl`.
fn listed_at(h: &serde_json::Value, purl: &str) -> bool {
    h["state"] == "up" && h["health"] == "ok" && h["endpoint"]["value"] == purl
}

fn the_host(murl: &str, admin: &str) -> Option<serde_json::Value> {
    let o = cocalc(murl, admin, &["host", "list", "--json"], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?.first().cloned()
}

#[test]
fn a_hidden_host_is_reached_through_any_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_master, murl, admin) = start_master(d, &[]);
    let cli = |key: &str, args: &[&str]| cocalc(&murl, key, args, None);
    let common = proxy_common(&murl, &admin);
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"]));

    // Proxy A holds the tunnel; it believes what the other proxy (on
    // 127.0.0.1) says about its clients. Proxy B also speaks SSH.
    let (a, b, b_ssh, b_metrics) = (free_port(), free_port(), free_port(), free_port());
    let (a_log, b_log) = (d.join("a-access.log"), d.join("b-access.log"));
    let a_extra = format!(
        "trusted_proxies = [\"127.0.0.1\"]\naccess_log = \"{}\"\n",
        a_log.display()
    );
    let _proxy_a = start_proxy(d, "a", a, &common, &a_extra);
    let b_extra = format!(
        "ssh_listen = \"127.0.0.1:{b_ssh}\"\nssh_host_key_file = \"{}\"\n\
         access_log = \"{}\"\nmetrics_listen = \"127.0.0.1:{b_metrics}\"\n",
        d.join("b_ssh_ed25519").display(),
        b_log.display()
    );
    let _proxy_b = start_proxy(d, "b", b, &common, &b_extra);

    let purl_a = format!("http://127.0.0.1:{a}");
    let _host = hidden_host(d, &murl, &admin, &[&purl_a]);
    let mut host_id = String::new();
    eventually(
        "the hidden host is up with its tunnel at proxy A",
        Duration::from_secs(20),
        || {
            let Some(h) = the_host(&murl, &admin) else {
                return false;
            };
            host_id = h["id"].as_str().unwrap_or_default().to_string();
            h["state"] == "up" && h["endpoint"]["value"] == purl_a.as_str()
        },
    );
    let (project, token) = create_and_open(&murl, &alice, "p");
    let token = token.as_str();
    let via_b = format!("http://127.0.0.1:{b}/{project}");
    let from = "127.0.0.2";

    // A request with a body (hyper's path) through B.
    let exec = |script: &str| {
        request(
            from,
            reqwest::Method::POST,
            &format!("{via_b}/exec"),
            token,
            Some(serde_json::json!({ "argv": ["sh", "-c", script] })),
            &[],
        )
    };
    // (The master may list the host before its tunnel is up.)
    let mut answer = (0, String::new());
    eventually("exec through B", Duration::from_secs(20), || {
        answer = exec("echo through-b");
        answer.0 == 200
    });
    let body = answer.1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The exec API answers with standard output in base64.
    assert_eq!(
        (&v["exit_code"], &v["stdout"]),
        (
            &serde_json::json!(0),
            &serde_json::json!("dGhyb3VnaC1iCg==")
        ),
        "\"through-b\\n\" expected: {v}"
    );

    // A server in the project, reached through B by plain GETs (the lean
    // path): it sees the client's Host and address, as behind one proxy,
    // and neither the token nor the proxies' own header.
    let app = free_port();
    let start = format!(
        "cat > headers.py <<'EOF'\n{HEADERS_SERVER}\nEOF\nnohup python3 headers.py {app} >/dev/null 2>&1 &"
    );
    let (s, body) = exec(&start);
    assert_eq!(s, 200, "{body}");
    let get = |url: &str, extra: &[(&str, &str)]| {
        request(from, reqwest::Method::GET, url, token, None, extra)
    };
    let page = format!("{via_b}/port/{app}/hello");
    eventually(
        "the project's server answers through B",
        Duration::from_secs(10),
        || get(&page, &[]).0 == 200,
    );
    let (s, seen) = get(&page, &[]);
    assert_eq!(s, 200, "{seen}");
    let header = |name: &str| {
        seen.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_string)
    };
    assert_eq!(
        header("x-forwarded-host").as_deref(),
        Some(format!("127.0.0.1:{b}").as_str()),
        "the Host the client sent to B:\n{seen}"
    );
    let xff = header("x-forwarded-for").unwrap_or_default();
    assert!(xff.starts_with(from), "the client first: {xff:?}\n{seen}");
    assert_eq!(
        header("x-forwarded-proto").as_deref(),
        Some("http"),
        "{seen}"
    );
    assert_eq!(header("x-cocalc-via-proxy"), None, "{seen}");
    assert!(
        !seen.contains(token),
        "the token reached the project:\n{seen}"
    );

    // Both proxies log the request (the last GET; earlier ones may have
    // come before the server listened), with the client and the host: A
    // with the client B forwarded for (B is a trusted proxy there).
    let last = |log: &std::path::Path| logged(log, "/hello").pop();
    eventually(
        "both access logs have the GET",
        Duration::from_secs(5),
        || {
            [&a_log, &b_log]
                .iter()
                .all(|log| last(log).is_some_and(|l| l["status"] == 200))
        },
    );
    for line in [last(&a_log).unwrap(), last(&b_log).unwrap()] {
        assert_eq!(line["client"], from, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["host"], host_id.as_str(), "{line}");
        assert_eq!(line["project"], project.as_str(), "{line}");
    }

    // SSH through B: a WebSocket to the host's exec-stream, through A.
    let key = d.join("alice_ed25519");
    registered_ssh_key(&murl, &alice, &key);
    let o = ssh_exec(b_ssh, &key, &project, "echo ssh-through-b; exit 4");
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(4), &b"ssh-through-b\n"[..]),
        "{o:?}"
    );

    // A request one proxy forwarded already is not forwarded again: B,
    // which would have to, refuses it and says why ...
    let hop = [("x-cocalc-via-proxy", "http://127.0.0.1:1")];
    let (s, body) = get(&page, &hop);
    assert_eq!(s, 502, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "tunnel_elsewhere", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains(&purl_a),
        "names where this proxy places the tunnel: {e}"
    );
    // ... and it does not stick: the next request without it is served.
    let (s, body) = get(&page, &[]);
    assert_eq!(s, 200, "{body}");
    // A, which holds the tunnel, serves it; the header stops there.
    let (s, seen) = get(&format!("{purl_a}/{project}/port/{app}/hello"), &hop);
    assert_eq!(s, 200, "{seen}");
    assert!(!seen.contains("x-cocalc-via-proxy"), "{seen}");

    // B's metrics count what it forwarded to A (two execs, the GETs, the
    // SSH session's connections) and the refusal.
    let metrics_url = format!("http://127.0.0.1:{b_metrics}/metrics");
    let (_, metrics) = request(from, reqwest::Method::GET, &metrics_url, "", None, &[]);
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
    };
    let forwards = sample("cocalc_proxy_peer_forwards_total").unwrap_or(0);
    assert!(forwards >= 5, "{forwards} forwards:\n{metrics}");
    assert_eq!(
        sample("cocalc_proxy_http_refusals_total{reason=\"tunnel_elsewhere\"}"),
        Some(1),
        "{metrics}"
    );
}

#[test]
fn a_hidden_host_moves_its_tunnel_when_its_proxy_dies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Fleet {
        _master,
        murl,
        admin,
        common,
        alice,
    } = fleet(d);
    let (a, b) = (free_port(), free_port());
    let (purl_a, purl_b) = (
        format!("http://127.0.0.1:{a}"),
        format!("http://127.0.0.1:{b}"),
    );
    let mut proxy_a = start_proxy(d, "a", a, &common, "");
    let _proxy_b = start_proxy(d, "b", b, &common, "");
    // C, D, E and F are in no host's list: they only ever forward. Each
    // sends one kind of request first after the move: C one without a
    // body, D one with a body, E a WebSocket, F an SSH session.
    let f_ssh = free_port();
    let others: Vec<(u16, String, Proc)> = ["c", "d", "e", "f"]
        .into_iter()
        .map(|name| {
            let port = free_port();
            let extra = if name == "f" {
                format!(
                    "ssh_listen = \"127.0.0.1:{f_ssh}\"\nssh_host_key_file = \"{}\"\n",
                    d.join("f_ssh_ed25519").display()
                )
            } else {
                String::new()
            };
            let p = start_proxy(d, name, port, &common, &extra);
            (port, format!("http://127.0.0.1:{port}"), p)
        })
        .collect();

    // The host lists both proxies, A first.
    let _host = hidden_host(d, &murl, &admin, &[&purl_a, &purl_b]);
    let at = |purl: &str| the_host(&murl, &admin).is_some_and(|h| listed_at(&h, purl));
    eventually("the tunnel at A", Duration::from_secs(20), || at(&purl_a));
    let (project, token) = create_and_open(&murl, &alice, "p");
    let exec_at = |purl: &str| exec_through(purl, &project, &token).is_ok();
    // (The master may list the host before its tunnel is up.)
    eventually("exec through A", Duration::from_secs(20), || {
        exec_at(&purl_a)
    });
    assert!(exec_at(&purl_b), "B forwards to A");
    for (_, purl, _) in &others {
        assert!(exec_at(purl), "{purl} forwards to A");
    }
    let key = d.join("alice_ed25519");
    registered_ssh_key(&murl, &alice, &key);

    // A dies: the host's tunnel moves to B, and the master is told.
    proxy_a.child.kill().unwrap();
    proxy_a.child.wait().unwrap();
    let killed = std::time::Instant::now();
    eventually(
        "the master has the tunnel at B",
        Duration::from_secs(20),
        || at(&purl_b),
    );
    eprintln!(
        "the master had the tunnel at B {:?} after A died",
        killed.elapsed()
    );
    // C, D, E and F's cached routes still say A. Their first requests
    // are served all the same: the connect to A fails (nothing was sent),
    // the proxy asks the master, and forwards the request to B (whose
    // route says A too, and which asks the master before refusing a
    // forwarded request). Proxies ask again at most once a second per host
    // (REASK_AFTER): wait that long since they asked.
    std::thread::sleep(Duration::from_millis(1_100));
    let (s, body) = request(
        "127.0.0.1",
        reqwest::Method::GET,
        &format!("{}/{project}/status", others[0].1),
        &token,
        None,
        &[],
    );
    assert_eq!(s, 200, "the first request at C after the move: {body}");
    assert!(
        exec_at(&others[1].1),
        "the first request at D after the move"
    );
    let head = websocket_head(others[2].0, &project, &token);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "the first WebSocket at E after the move: {head}"
    );
    let o = ssh_exec(f_ssh, &key, &project, "echo after-the-move");
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"after-the-move\n"[..]),
        "the first SSH session at F after the move: {o:?}"
    );
    eventually(
        "B serves the host from its own tunnel",
        Duration::from_secs(20),
        || exec_at(&purl_b),
    );

    // A comes back: the host stays at B (no flapping back), and A serves
    // it through B.
    drop(proxy_a);
    let _proxy_a = start_proxy(d, "a", a, &common, "");
    eventually("A forwards to B", Duration::from_secs(20), || {
        exec_at(&purl_a)
    });
    assert!(at(&purl_b), "{:?}", the_host(&murl, &admin));
}

/// A proxy stopped behind a load balancer drains first (`drain_secs`):
/// SIGTERM turns its health check to 503 while it goes on serving
/// project requests, also into a hidden host's tunnel, and it exits once
/// the drain is over.
#[test]
fn a_stopping_proxy_drains_before_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Fleet {
        _master,
        murl,
        admin,
        common,
        alice,
    } = fleet(d);
    let (port, ssh) = (free_port(), free_port());
    let purl = format!("http://127.0.0.1:{port}");
    let extra = format!(
        "drain_secs = 3\nssh_listen = \"127.0.0.1:{ssh}\"\nssh_host_key_file = \"{}\"\n",
        d.join("p_ssh_ed25519").display()
    );
    let mut proxy = start_proxy(d, "p", port, &common, &extra);
    let _host = hidden_host(d, &murl, &admin, &[&purl]);
    let (project, token) = create_and_open(&murl, &alice, "p");
    let exec = || exec_through(&purl, &project, &token).is_ok();
    let health = || {
        let url = format!("{purl}/.cocalc/health");
        let (s, body) = request("127.0.0.1", reqwest::Method::GET, &url, "", None, &[]);
        (s, serde_json::from_str::<serde_json::Value>(&body).unwrap())
    };
    eventually("exec through the proxy", Duration::from_secs(20), exec);
    let (s, h) = health();
    assert_eq!(s, 200, "{h}");
    assert_eq!(
        (&h["ok"], &h["draining"]),
        (&true.into(), &false.into()),
        "{h}"
    );
    assert!(h["signing_keys"].as_u64().unwrap() >= 1, "{h}");
    let status = format!("/{project}/status");
    let closes = |head: &str| {
        head.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n")
    };
    let head = answer_head(port, &status, &token, "");
    assert!(head.starts_with("HTTP/1.1 200") && !closes(&head), "{head}");
    // An SSH session opened before the stop, which lasts into the drain.
    let key = d.join("alice_ed25519");
    registered_ssh_key(&murl, &alice, &key);
    let session = {
        let (key, project) = (key.clone(), project.clone());
        std::thread::spawn(move || ssh_exec(ssh, &key, &project, "sleep 1; echo still-here"))
    };
    let ssh_hex = format!(":{ssh:04X}");
    let proxy_pid = proxy.child.id();
    eventually(
        "the SSH session is accepted",
        Duration::from_secs(10),
        || {
            common::tcp_sockets(proxy_pid)
                .iter()
                .any(|s| s.2 == "01" && s.0.ends_with(&ssh_hex))
        },
    );

    let pid = nix::unistd::Pid::from_raw(proxy.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped_at = std::time::Instant::now();
    eventually(
        "the health check says draining",
        Duration::from_secs(2),
        || health().0 == 503,
    );
    let (_, h) = health();
    assert_eq!(
        (&h["ok"], &h["draining"]),
        (&false.into(), &true.into()),
        "{h}"
    );
    assert!(exec(), "a request while draining is served");
    // Keep-alive clients are told to connect again (to another proxy).
    let head = answer_head(port, &status, &token, "");
    assert!(head.starts_with("HTTP/1.1 200") && closes(&head), "{head}");
    // The SSH port is closed (a TCP balancer's check fails), and the
    // session opened before goes on to its end.
    let listening = common::listening_sockets(proxy_pid);
    assert!(
        !listening.iter().any(|l| l.ends_with(&ssh_hex)),
        "SSH still listens while draining: {listening:?}"
    );
    let o = session.join().unwrap();
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"still-here\n"[..]),
        "{o:?}"
    );
    stops_cleanly(&mut proxy, stopped_at);
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(2_900),
        "stopped {:?} after SIGTERM, before the 3 s drain",
        stopped_at.elapsed()
    );
}

/// A second stop signal ends a long drain at once, and the proxy still
/// stops in order (here: its access log is flushed).
#[test]
fn a_second_stop_signal_ends_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = fleet(d);
    let port = free_port();
    let log = d.join("access.log");
    let extra = format!("drain_secs = 600\naccess_log = \"{}\"\n", log.display());
    let mut proxy = start_proxy(d, "p", port, &fleet.common, &extra);
    let health = || {
        let url = format!("http://127.0.0.1:{port}/.cocalc/health");
        request("127.0.0.1", reqwest::Method::GET, &url, "", None, &[]).0
    };
    eventually("the proxy answers", Duration::from_secs(20), || {
        health() == 200
    });
    // A refused request, so the access log has a line to flush.
    let target = "/00000000-0000-4000-8000-000000000000/status";
    let url = format!("http://127.0.0.1:{port}{target}");
    let (s, body) = request("127.0.0.1", reqwest::Method::GET, &url, "", None, &[]);
    assert_eq!(s, 401, "{body}");

    let pid = nix::unistd::Pid::from_raw(proxy.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually("the proxy drains", Duration::from_secs(5), || {
        health() == 503
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy stopped without waiting out its drain"
    );
    // A second Ctrl-C, as an operator at a terminal sends it.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let second = std::time::Instant::now();
    stops_cleanly(&mut proxy, second);
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "stopped {:?} after the second signal",
        second.elapsed()
    );
    let lines = logged(&log, target);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 401, "{lines:?}");
}

/// A hidden host asked to move while its next proxy is down stays at the
/// draining proxy, whose tunnel still serves, until that proxy stops; then
/// it is down, and lands at the next proxy once that one is up.
#[test]
fn a_host_whose_next_proxy_is_down_stays_at_the_draining_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Fleet {
        _master,
        murl,
        admin,
        common,
        alice,
    } = fleet(d);
    let (a, b, c) = (free_port(), free_port(), free_port());
    let [purl_a, purl_b, purl_c] = [a, b, c].map(|p| format!("http://127.0.0.1:{p}"));
    let mut proxy_a = start_proxy(d, "a", a, &common, "drain_secs = 5\n");
    // C is not one of the host's proxies: it reaches the host wherever
    // the master says its tunnel is. Nothing listens at B yet.
    let _proxy_c = start_proxy(d, "c", c, &common, "");
    let _host = hidden_host(d, &murl, &admin, &[&purl_a, &purl_b]);
    let at = |purl: &str| the_host(&murl, &admin).is_some_and(|h| listed_at(&h, purl));
    let at_a = |h: &serde_json::Value| listed_at(h, &purl_a);
    let (project, token) = create_and_open(&murl, &alice, "p");
    eventually("exec through C, to A", Duration::from_secs(20), || {
        at(&purl_a) && exec_through(&purl_c, &project, &token).is_ok()
    });

    let pid = nix::unistd::Pid::from_raw(proxy_a.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped_at = std::time::Instant::now();
    // The host tries B (refused: nothing listens) and A (503 draining)
    // while A drains; all the while it stays at A, and is served there
    // (looked at until 3 s into the 5 s drain, leaving slow calls room).
    // A read that does not show it there is repeated once, 200 ms later:
    // one CI run saw a single such read that did not come back (it printed
    // the host up at its endpoint, health ok, on the read after), while
    // without the fix every read from the first 100 ms on fails.
    let mut served = 0;
    while stopped_at.elapsed() < Duration::from_secs(3) {
        let first = the_host(&murl, &admin);
        if !first.as_ref().is_some_and(&at_a) {
            std::thread::sleep(Duration::from_millis(200));
            let again = the_host(&murl, &admin);
            assert!(
                again.as_ref().is_some_and(&at_a),
                "{:?} after SIGTERM to A ({purl_a}; B {purl_b}): {first:?}, then {again:?}",
                stopped_at.elapsed()
            );
        }
        exec_through(&purl_c, &project, &token).unwrap();
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served >= 5, "{served} requests through C while A drained");
    stops_cleanly(&mut proxy_a, stopped_at);
    eventually("the host is down", Duration::from_secs(10), || {
        the_host(&murl, &admin).is_some_and(|h| h["health"] != "ok" || h["state"] != "up")
    });
    let _proxy_b = start_proxy(d, "b", b, &common, "");
    eventually("the tunnel at B", Duration::from_secs(60), || at(&purl_b));
    exec_through(&purl_c, &project, &token).unwrap();
}

/// A master and what every test here needs of it.
struct Fleet {
    _master: Proc,
    murl: String,
    admin: String,
    /// The config lines every proxy shares ([`proxy_common`]).
    common: String,
    /// The API key of the user `alice`.
    alice: String,
}

/// Starts a master in `d` with a proxy key and the user `alice`.
fn fleet(d: &std::path::Path) -> Fleet {
    let (_master, murl, admin) = start_master(d, &[]);
    let common = proxy_common(&murl, &admin);
    let alice = api_key_of(&cocalc(
        &murl,
        &admin,
        &["user", "create", "alice", "--json"],
        None,
    ));
    Fleet {
        _master,
        murl,
        admin,
        common,
        alice,
    }
}

/// Waits (up to 15 s after `since`) for `proxy` to exit, and checks it
/// exited 0.
fn stops_cleanly(proxy: &mut Proc, since: std::time::Instant) {
    let status = loop {
        if let Some(s) = proxy.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "the proxy did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// `POST {purl}/{project}/exec` of `true`: whether it answered 200 with
/// exit code 0 (else the status and body).
fn exec_through(purl: &str, project: &str, token: &str) -> Result<(), String> {
    let (s, body) = request(
        "127.0.0.1",
        reqwest::Method::POST,
        &format!("{purl}/{project}/exec"),
        token,
        Some(serde_json::json!({ "argv": ["true"] })),
        &[],
    );
    if s == 200 && body.contains("\"exit_code\":0") {
        Ok(())
    } else {
        Err(format!("{s} {body}"))
    }
}

/// A proxy that drains before a stop asks the hidden hosts whose tunnels
/// land at it to move, and a host that lists another proxy moves *before*
/// its old tunnel closes: the master has it at the other proxy while the
/// first still drains, and requests through a third proxy, sent all along,
/// never fail.
#[test]
fn a_draining_proxy_moves_its_hidden_hosts_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Fleet {
        _master,
        murl,
        admin,
        common,
        alice,
    } = fleet(d);
    let (a, b, c) = (free_port(), free_port(), free_port());
    let [purl_a, purl_b, purl_c] = [a, b, c].map(|p| format!("http://127.0.0.1:{p}"));
    // A asks the master again every second: while it drains, it learns
    // that the host's tunnel is at B, and still serves what C forwards
    // through the old tunnel the host keeps open.
    let a_metrics = free_port();
    let a_log = d.join("a-access.log");
    let a_extra = format!(
        "drain_secs = 4\nroute_ttl_secs = 1\nmetrics_listen = \"127.0.0.1:{a_metrics}\"\n\
         access_log = \"{}\"\n",
        a_log.display()
    );
    let mut proxy_a = start_proxy(d, "a", a, &common, &a_extra);
    let _proxy_b = start_proxy(d, "b", b, &common, "");
    let _proxy_c = start_proxy(d, "c", c, &common, "");
    let _host = hidden_host(d, &murl, &admin, &[&purl_a, &purl_b]);
    let at = |purl: &str| the_host(&murl, &admin).is_some_and(|h| listed_at(&h, purl));
    // Up at A by A's own count (the master lists the endpoint before the
    // tunnel is up).
    let a_metrics_url = format!("http://127.0.0.1:{a_metrics}/metrics");
    let a_metrics = || {
        request(
            "127.0.0.1",
            reqwest::Method::GET,
            &a_metrics_url,
            "",
            None,
            &[],
        )
        .1
    };
    eventually("the tunnel at A", Duration::from_secs(20), || {
        at(&purl_a)
            && a_metrics()
                .lines()
                .any(|l| l == "cocalc_proxy_tunnels_connected 1")
    });
    let (project, token) = create_and_open(&murl, &alice, "p");
    eventually("exec through A", Duration::from_secs(20), || {
        exec_through(&purl_a, &project, &token).is_ok()
    });
    exec_through(&purl_c, &project, &token).unwrap();

    // C sends a request every 20 ms from now until after A has stopped.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (done, purl_c, project, token) =
            (done.clone(), purl_c.clone(), project.clone(), token.clone());
        std::thread::spawn(move || {
            let (mut sent, mut failed) = (0, Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = exec_through(&purl_c, &project, &token) {
                    failed.push(e);
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (sent, failed)
        })
    };
    let pid = nix::unistd::Pid::from_raw(proxy_a.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped_at = std::time::Instant::now();
    eventually(
        "the master has the tunnel at B while A drains",
        Duration::from_secs(3),
        || at(&purl_b),
    );
    eprintln!(
        "the tunnel was at B {:?} after SIGTERM to A",
        stopped_at.elapsed()
    );
    assert!(
        proxy_a.child.try_wait().unwrap().is_none(),
        "A drains for 4 s"
    );
    // A refuses new tunnels while it drains, and still serves.
    let upgrade = [("connection", "upgrade"), ("upgrade", "cocalc-tunnel/1")];
    let url = format!("{purl_a}/.cocalc/tunnel");
    let (s, body) = request("127.0.0.1", reqwest::Method::GET, &url, "", None, &upgrade);
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    exec_through(&purl_a, &project, &token).unwrap();
    let metrics = a_metrics();
    for line in [
        "cocalc_proxy_draining 1",
        "cocalc_proxy_tunnel_moves_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    // A told C it drains (in its answers to what C forwarded), so C asked
    // the master again and sends to B now: from 2 s into the drain to
    // 3.5 s, A gets nothing more from C (at most one in flight).
    let at_a = || logged(&a_log, "/exec").len();
    let two_s_in = stopped_at + Duration::from_secs(2);
    std::thread::sleep(two_s_in.saturating_duration_since(std::time::Instant::now()));
    let before = at_a();
    std::thread::sleep(Duration::from_millis(1_500));
    let later = at_a();
    assert!(
        later <= before + 1,
        "A still got {} requests from C",
        later - before
    );
    assert!(before > 0, "A's access log has C's requests from before");
    exec_through(&purl_b, &project, &token).unwrap();
    stops_cleanly(&mut proxy_a, stopped_at);
    std::thread::sleep(Duration::from_secs(1));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = hammer.join().unwrap();
    // About 110 on an idle machine; fewer when other tests load it.
    assert!(sent >= 50, "{sent} requests through C");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(at(&purl_b), "{:?}", the_host(&murl, &admin));
}
