//! A host whose program hangs while its kernel still accepts connections
//! (here: stopped with `SIGSTOP`), under a real proxy: requests waiting on
//! it end with 504 `host_not_responding` once its health check goes
//! unanswered, instead of waiting without end; a project's slow server on a
//! live host is still waited for; an SSH command's channel ends the same
//! way; the master's one-call exec ends when the host's lease runs out;
//! and the host serves again once it runs.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{
    api_key_of, bootstrap_token, cocalc, create_and_open, eventually, free_port, host_config,
    registered_ssh_key, spawn_host, spawn_proxy, ssh_exec, start_master, wait_for_host_up,
};

/// GET with a bearer token: the status and the body (blocking, for tests).
fn get(url: &str, token: &str) -> (u16, String) {
    request(reqwest::Method::GET, url, token, None)
}

fn request(
    method: reqwest::Method,
    url: &str,
    token: &str,
    json: Option<serde_json::Value>,
) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = reqwest::Client::new()
            .request(method, url)
            .bearer_auth(token);
        if let Some(body) = json {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The value of the metric sample `line` starts with, or 0.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success(), "kill {sig} {pid}");
}

/// A server for the project: `GET /<s>` answers `slow-ok` after `s`
/// seconds; any `POST` answers 4,000,000 bytes, of which it sends
/// 100,000 and then, a minute later, the rest.
const SLOW_SERVER: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(float(self.path.strip("/") or 0))
        self.send_response(200); self.send_header("content-length", "7"); self.end_headers()
        self.wfile.write(b"slow-ok")
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "4000000"); self.end_headers()
        self.wfile.write(b"p" * 100000); self.wfile.flush()
        time.sleep(60)
        self.wfile.write(b"p" * 3900000)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

#[test]
fn requests_to_a_hung_host_end_and_slow_projects_are_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_master, murl, admin) = start_master(d, &[]);
    let cli = |key: &str, args: &[&str]| cocalc(&murl, key, args, None);
    let proxy_key = api_key_of(&cli(&admin, &["proxy-key", "create", "edge", "--json"]));
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"]));
    let (port, metrics_port, ssh_port) = (free_port(), free_port(), free_port());
    let proxy_cfg = d.join("proxy.toml");
    std::fs::write(
        &proxy_cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmaster_url = \"{murl}\"\napi_key = \"{proxy_key}\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             ssh_listen = \"127.0.0.1:{ssh_port}\"\nssh_host_key_file = \"{}\"\n\
             host_check_after_secs = 1\nhost_check_timeout_secs = 1\n",
            d.join("proxy_ssh_ed25519").display()
        ),
    )
    .unwrap();
    let _proxy = spawn_proxy(&proxy_cfg);
    let bootstrap = bootstrap_token(&murl, &admin);
    let reach = format!("listen = \"127.0.0.1:{}\"", free_port());
    let host = spawn_host(&host_config(d, &reach, &murl, &bootstrap));
    wait_for_host_up(&murl, &admin);
    let (project, token) = create_and_open(&murl, &alice, "p");
    let token = token.as_str();
    let via_proxy = format!("http://127.0.0.1:{port}/{project}");
    let metrics = || get(&format!("http://127.0.0.1:{metrics_port}/metrics"), "").1;
    let exec = |script: &str| {
        request(
            reqwest::Method::POST,
            &format!("{via_proxy}/exec"),
            token,
            Some(serde_json::json!({ "argv": ["sh", "-c", script] })),
        )
    };

    // A slow server in the project, taking 3 s per answer: the proxy
    // checks the host after 1 s, finds it answering, and waits on.
    let app = free_port();
    let start = format!(
        "cat > slow.py <<'EOF'\n{SLOW_SERVER}\nEOF\nnohup python3 slow.py {app} >/dev/null 2>&1 &"
    );
    let (s, body) = exec(&start);
    assert_eq!(s, 200, "{body}");
    eventually(
        "the project's server answers",
        Duration::from_secs(10),
        || get(&format!("{via_proxy}/port/{app}/0"), token).0 == 200,
    );
    let (s, body) = get(&format!("{via_proxy}/port/{app}/3"), token);
    assert_eq!((s, body.as_str()), (200, "slow-ok"));
    let m = metrics();
    assert!(
        metric(&m, "cocalc_proxy_host_checks_total{result=\"answered\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "cocalc_proxy_host_checks_total{result=\"silent\"}"),
        0.0
    );

    // Alice's key, for SSH through the proxy.
    let key = d.join("alice_ed25519");
    registered_ssh_key(&murl, &alice, &key);
    let o = ssh_exec(ssh_port, &key, &project, "echo hi");
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"hi\n"[..]),
        "{o:?}"
    );

    // A download under way when the host stops (64 MiB: more than the
    // socket buffers and the proxy's pipe hold), its first MiB read.
    let (s, body) = exec("head -c 67108864 /dev/zero > big.bin");
    assert_eq!(s, 200, "{body}");
    let mut download = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "GET /{project}/files/big.bin HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut first = vec![0u8; 1 << 20];
        c.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"), "{:?}", &first[..64]);
        c
    };

    // And an answer to a POST (hyper's path), its first 100,000 bytes
    // read, the rest a minute off.
    let mut posted = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /{project}/port/{app}/stream HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {token}\r\n\
             content-length: 1\r\n\r\nx"
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let body_at = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n").map(|h| h + 4);
        while body_at(&got).is_none_or(|b| got.len() - b < 100_000) {
            let n = c.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(&got[..got.len().min(200)])
            );
            got.extend_from_slice(&buf[..n]);
        }
        // (HTTP/1.0: the version the project's server answers in.)
        assert!(
            got.starts_with(b"HTTP/1.") && got[8..].starts_with(b" 200 "),
            "{:?}",
            String::from_utf8_lossy(&got[..64])
        );
        c
    };

    // The host's program stops; its kernel still accepts connections.
    signal(host.child.id(), "-STOP");
    let started = Instant::now();
    // An SSH command's channel to the host ends, and says why (first,
    // while the master still holds the host's lease).
    let o = ssh_exec(ssh_port, &key, &project, "echo never");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(255), "{o:?}");
    assert!(err.contains("not its health check either"), "{err}");
    // The lean path (no body) and hyper's (a body) both end.
    let (s, body) = get(&format!("{via_proxy}/status"), token);
    assert_eq!(s, 504, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "host_not_responding", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("GET /health"),
        "{e}"
    );
    let (s, body) = exec("echo never");
    assert_eq!(s, 504, "{body}");
    // Neither waited for anything like a default TCP timeout: the check's
    // 1 + 1 s each, with room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let m = metrics();
    assert!(
        metric(
            &m,
            "cocalc_proxy_http_refusals_total{reason=\"host_not_responding\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "cocalc_proxy_host_checks_total{result=\"silent\"}") >= 1.0,
        "{m}"
    );

    // The download and the POST's answer end cut short rather than wait
    // without end (here read after the checks above, so within the time
    // they took).
    for (what, conn, whole) in [
        ("the download", &mut download, 64 << 20),
        ("the POST's answer", &mut posted, 4_000_000),
    ] {
        use std::io::Read;
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        let r = conn.read_to_end(&mut rest);
        assert!(
            !r.as_ref().is_err_and(|e| matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )),
            "{what} still waits: {r:?} after {} more bytes",
            rest.len()
        );
        assert!(
            rest.len() < whole,
            "all of {what} came ({} bytes) from a stopped host",
            rest.len()
        );
    }

    // The master's one-call exec to the stopped host ends once the host's
    // lease runs out (15 s or so here), with the same code.
    let (s, body) = request(
        reqwest::Method::POST,
        &format!("{murl}/v1/projects/{project}/exec"),
        &alice,
        Some(serde_json::json!({ "argv": ["echo", "never"] })),
    );
    assert_eq!(s, 504, "{body}");
    assert!(body.contains("host_not_responding"), "{body}");
    assert!(body.contains("stopped renewing its lease"), "{body}");

    // Running again, the host answers through the proxy as before.
    signal(host.child.id(), "-CONT");
    eventually("the host answers again", Duration::from_secs(20), || {
        let (s, body) = exec("echo back-$((40+2))");
        s == 200
            && serde_json::from_str::<cocalc_core::wire::ExecResult>(&body)
                .is_ok_and(|r| r.exit_code == 0 && r.stdout == b"back-42\n")
    });
}
