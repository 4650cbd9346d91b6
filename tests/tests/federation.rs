//! A whole federation on loopback: one master and two hosts, built from the
//! same library calls as the daemons (plain processes and directories, so
//! this runs anywhere; the podman/Btrfs backends have their own suites).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cocalc_core::wire::{CreateProjectRequest, ExecResult, OpenProjectResponse};
use cocalc_core::{HostEndpoint, HostId};
use cocalc_host::daemon::{self as host_daemon, HostConfig};
use cocalc_master::daemon::{self as master_daemon, DaemonConfig};
use cocalc_master::MasterClient;
use serde_json::{json, Value};
use tokio::sync::watch;

struct Master {
    url: String,
    addr: SocketAddr,
    admin: String,
    /// The master itself, for driving its move coordinator directly.
    lib: std::sync::Arc<cocalc_master::Master>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_master(dir: &Path, addr: &str) -> Master {
    let cfg: DaemonConfig = toml_cfg(&format!(
        "listen = \"{addr}\"\ndata_dir = \"{}\"\n",
        dir.display()
    ));
    let master = master_daemon::build(&cfg).await.unwrap();
    let lib = master.clone();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        master_daemon::serve(master, listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .unwrap();
    });
    let admin = std::fs::read_to_string(dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    Master {
        url: format!("http://{addr}"),
        addr,
        admin,
        lib,
        stop,
        task,
    }
}

impl Master {
    async fn shut_down(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn toml_cfg<T: serde::de::DeserializeOwned>(s: &str) -> T {
    toml::from_str(s).unwrap()
}

struct Host {
    id: HostId,
    url: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_host(dir: &Path, master: &str, token: &str, grace_secs: u64) -> Host {
    start_host_with(
        dir,
        master,
        token,
        &format!("offline_grace_secs = {grace_secs}\n"),
    )
    .await
}

async fn start_host_with(dir: &Path, master: &str, token: &str, extra: &str) -> Host {
    let cfg: HostConfig = toml_cfg(&format!(
        "listen = \"127.0.0.1:0\"\nmaster_url = \"{master}\"\ndata_dir = \"{}\"\n\
         bootstrap_token = \"{token}\"\nacl_ttl_secs = 300\n{extra}",
        dir.display()
    ));
    cfg.check().unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen.unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let host = host_daemon::build(&cfg, url.clone()).await.unwrap();
    let id = host.agent.host();
    let (stop, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        host.run(listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .unwrap();
    });
    Host {
        id,
        url,
        stop,
        task,
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exec(url: &str, project: &str, token: &str, argv: &[&str]) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/{project}/exec"))
        .bearer_auth(token)
        .json(&json!({ "argv": argv }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A GET sent byte for byte as given (no client-side path normalisation).
async fn raw_get(url: &str, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn stdout(v: &Value) -> String {
    let r: ExecResult = serde_json::from_value(v.clone()).unwrap();
    String::from_utf8(r.stdout).unwrap()
}

fn url_of(o: &OpenProjectResponse) -> String {
    match &o.endpoint {
        HostEndpoint::Url(u) => u.clone(),
        other => panic!("unexpected endpoint {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let m = start_master(&dir.path().join("master"), "127.0.0.1:0").await;
    // The master arms keepalive on what it accepts (a host's push
    // channel whose machine vanished must not stay open for ever).
    let raw = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let me = raw.local_addr().unwrap();
    eventually(
        "keepalive on the master's side",
        Duration::from_secs(5),
        || async {
            cocalc_testkit::net::tcp_timer(m.addr, me).map(|t| t.0)
                == Some(cocalc_testkit::net::KEEPALIVE_TIMER)
        },
    )
    .await;
    drop(raw);
    let admin = MasterClient::new(&m.url, &m.admin);
    let t1 = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let t2 = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let h1 = start_host(&dir.path().join("h1"), &m.url, &t1, 4).await;
    let h2 = start_host(&dir.path().join("h2"), &m.url, &t2, 4).await;
    eventually("both hosts up", Duration::from_secs(15), || async {
        admin
            .hosts()
            .await
            .map(|h| {
                h.iter()
                    .filter(|h| h.state == cocalc_core::HostState::Up)
                    .count()
                    == 2
            })
            .unwrap_or(false)
    })
    .await;

    // A user, a project, opened: placed on one of the hosts.
    let alice_new = admin.create_user("alice").await.unwrap();
    let alice_key = alice_new["api_key"].as_str().unwrap().to_string();
    let alice = MasterClient::new(&m.url, &alice_key);
    let p = alice
        .create_project(&CreateProjectRequest::new("thesis"))
        .await
        .unwrap();
    let pid = p.id.to_string();
    let open = alice.open("thesis").await.unwrap();
    let (here, other) = if open.host == h1.id {
        (&h1, &h2)
    } else {
        (&h2, &h1)
    };
    assert_eq!(url_of(&open), here.url);

    // exec → write a file → read it back.
    let (s, v) = exec(
        &here.url,
        &pid,
        &open.token,
        &["sh", "-c", "echo hello > notes.txt && cat notes.txt"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "hello\n");

    // The same through the master, for callers that want one call.
    let mut req = cocalc_core::ExecRequest::new(vec!["cat".into(), "notes.txt".into()]);
    req.cwd = None;
    let r = alice.exec("thesis", &req).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"hello\n"[..]));
    assert_eq!(
        alice.start("thesis").await.unwrap().state,
        cocalc_core::ProjectState::Running
    );

    // A terminal over WebSocket: input, output, resize, close.
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let url = format!(
            "{}/{pid}/terminal?rows=30&cols=100",
            here.url.replacen("http://", "ws://", 1)
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_request(url, &open.token))
            .await
            .unwrap();
        ws.send(Message::Text(r#"{"resize":{"rows":40,"cols":120}}"#.into()))
            .await
            .unwrap();
        ws.send(Message::Binary(
            b"stty size; echo term-$((6*7))\n".to_vec().into(),
        ))
        .await
        .unwrap();
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(seen.contains("term-42") && seen.contains("40 120")) {
            assert!(Instant::now() < deadline, "terminal output: {seen:?}");
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => panic!("terminal ended early: {other:?}; output {seen:?}"),
            }
        }
        ws.close(None).await.unwrap();
    }
    // Without a token there is no terminal.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/{pid}/terminal",
            here.url.replacen("http://", "ws://", 1)
        );
        let req = url.into_client_request().unwrap();
        assert!(tokio_tungstenite::connect_async(req).await.is_err());
    }

    // HTTP into a server inside the project: /port/ strips the prefix,
    // /server/ keeps it; the user's token never reaches the server.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let echo = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_HEAD(self):
        self.send_response(200); self.send_header("content-length", "0"); self.send_header("x-path", self.path); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let r = reqwest::Client::new()
        .put(format!("{}/{pid}/files/echo.py", here.url))
        .bearer_auth(&open.token)
        .body(echo)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let start = format!("nohup python3 echo.py {port} >/dev/null 2>&1 &");
    let (s, v) = exec(&here.url, &pid, &open.token, &["sh", "-c", &start]).await;
    assert_eq!(s, 200, "{v}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer: Value = loop {
        let r = http
            .get(format!("{}/{pid}/port/{port}/echo?x=1", here.url))
            .bearer_auth(&open.token)
            .header("cookie", "theirs=1")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break r.json().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "server in the project never answered: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer["path"], "/echo?x=1", "{answer}");
    assert!(
        answer["headers"].get("authorization").is_none(),
        "token leaked: {answer}"
    );
    assert_eq!(answer["headers"]["cookie"], "theirs=1");
    assert_eq!(
        answer["headers"]["x-forwarded-prefix"],
        format!("/{pid}/port/{port}")
    );
    let kept: Value = http
        .get(format!("{}/{pid}/server/{port}/app/", here.url))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["path"], format!("/{pid}/server/{port}/app/"));
    // A token in the query (a HEAD: no cookie exchange) is taken out of
    // it; the rest of the query passes in its order.
    for (route, seen) in [
        (format!("port/{port}/echo"), "/echo".to_string()),
        (
            format!("server/{port}/app/"),
            format!("/{pid}/server/{port}/app/"),
        ),
    ] {
        let r = http
            .head(format!(
                "{}/{pid}/{route}?a=1&token={}&b=2",
                here.url, open.token
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{route}");
        assert_eq!(r.headers()["x-path"], format!("{seen}?a=1&b=2"), "{route}");
    }
    let r = http
        .get(format!("{}/{pid}/port/0/", here.url))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/{pid}/port/{port}/", here.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token, no port");

    // The token names its host: the other host refuses it.
    let (s, v) = exec(&other.url, &pid, &open.token, &["true"]).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], "token_wrong_host");
    // No token, garbage token, malformed project id.
    assert_eq!(exec(&here.url, &pid, "", &["true"]).await.0, 401);
    assert_eq!(
        exec(&here.url, &pid, "v4.public.nope", &["true"]).await.0,
        401
    );
    let (s, v) = exec(&here.url, &pid.to_uppercase(), &open.token, &["true"]).await;
    assert_eq!(s, 400, "{v}");

    // Files: put, get, list, stat; escapes refused; project B's token
    // cannot read project A's files.
    let http = reqwest::Client::new();
    let furl = |path: &str| format!("{}/{pid}/files/{path}", here.url);
    let r = http
        .put(furl("docs/a.txt"))
        .bearer_auth(&open.token)
        .body("A")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "parent must exist");
    let r = http
        .post(furl("docs?op=mkdir"))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .put(furl("docs/a.txt"))
        .bearer_auth(&open.token)
        .body(vec![0u8, 1, 2, 255])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let got = http
        .get(furl("docs/a.txt"))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &[0u8, 1, 2, 255]);
    let list: Value = http
        .get(furl("docs"))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["name"], "a.txt");
    let stat: Value = http
        .get(furl("docs/a.txt?stat"))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stat["size"], 4);
    let (s, _) = exec(
        &here.url,
        &pid,
        &open.token,
        &["ln", "-s", "/etc/passwd", "leak"],
    )
    .await;
    assert_eq!(s, 200);
    // Sent raw: HTTP clients would normalise `..` away before sending.
    for bad in [
        "leak",
        "../../etc/passwd",
        "%2E%2E/%2E%2E/etc/passwd",
        "docs/..%2F..%2Fx",
    ] {
        let (status, body) = raw_get(&here.url, &format!("/{pid}/files/{bad}"), &open.token).await;
        assert_eq!(status, 403, "{bad}: {body}");
        assert!(body.contains("path_escape"), "{bad}: {body}");
        assert!(!body.contains("root:"), "{bad} leaked /etc/passwd");
    }
    let q = alice
        .create_project(&CreateProjectRequest::new("other"))
        .await
        .unwrap();
    let q_open = alice.open("other").await.unwrap();
    let r = http
        .get(furl("docs/a.txt"))
        .bearer_auth(&q_open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "a token for project {} reads nothing of {pid}",
        q.id
    );
    let r = http
        .delete(furl("docs"))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // Browser flow: the token once in the query becomes a project cookie.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect
        .get(format!("{}/{pid}/status?token={}", here.url, open.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/{pid}/status"));
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains(&format!("Path=/{pid}/")),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = http
        .get(format!("{}/{pid}/status", here.url))
        .header("cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Stop, open again: the data is still there.
    let r = reqwest::Client::new()
        .post(format!("{}/{pid}/stop", here.url))
        .bearer_auth(&open.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let open2 = alice.open(&pid).await.unwrap();
    assert_eq!(open2.host, open.host, "placement is sticky");
    let (s, v) = exec(&here.url, &pid, &open2.token, &["cat", "notes.txt"]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "hello\n");

    // A collaborator removed on the master is refused by the host within 1 s.
    let bob = admin.create_user("bob").await.unwrap();
    let bob_c = MasterClient::new(&m.url, bob["api_key"].as_str().unwrap());
    let s = http
        .put(format!("{}/v1/projects/{pid}/collaborators/bob", m.url))
        .bearer_auth(&alice_key)
        .json(&json!({"permission": "write"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    let bob_open = bob_c.open(&pid).await.unwrap();
    let (s, v) = exec(&here.url, &pid, &bob_open.token, &["true"]).await;
    assert_eq!(s, 200, "{v}");
    let s = http
        .delete(format!("{}/v1/projects/{pid}/collaborators/bob", m.url))
        .bearer_auth(&alice_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    let removed = Instant::now();
    eventually("bob refused", Duration::from_secs(1), || async {
        exec(&here.url, &pid, &bob_open.token, &["true"]).await.0 == 403
    })
    .await;
    assert!(removed.elapsed() < Duration::from_secs(1));

    // Master down: existing tokens keep working from the ACL cache, new
    // opens fail at once with a clear error.
    let addr = m.addr;
    let master_url = m.url.clone();
    let master_dir = dir.path().join("master");
    m.shut_down().await;
    let (s, v) = exec(&here.url, &pid, &open2.token, &["true"]).await;
    assert_eq!(s, 200, "cached access while the master is away: {v}");
    let e = alice.open(&pid).await.unwrap_err();
    assert_eq!(e.code, "master_unreachable");

    // The host is restarted while the master is away: it serves at once
    // from what it saved (signing keys, ACL cache, generations), and its
    // running project is still there.
    let here_id = here.id;
    let (old, keep) = if here_id == h1.id { (h1, h2) } else { (h2, h1) };
    let here_dir = ["h1", "h2"]
        .iter()
        .map(|d| dir.path().join(d))
        .find(|d| {
            std::fs::read_to_string(d.join("host.id"))
                .is_ok_and(|s| s.trim() == here_id.to_string())
        })
        .expect("the host's state directory");
    let _ = old.stop.send(true);
    let _ = old.task.await;
    let here = start_host(&here_dir, &master_url, "", 4).await;
    assert_eq!(here.id, here_id, "same identity after the restart");
    let (s, v) = exec(&here.url, &pid, &open2.token, &["cat", "notes.txt"]).await;
    assert_eq!(s, 200, "restarted host, master away: {v}");
    assert_eq!(stdout(&v), "hello\n");

    // After the offline grace (4 s here) the host refuses, saying the
    // master is unreachable.
    eventually(
        "offline grace runs out",
        Duration::from_secs(15),
        || async {
            let (s, v) = exec(&here.url, &pid, &open2.token, &["true"]).await;
            s == 503 && v["code"] == "master_unreachable"
        },
    )
    .await;

    // The master comes back on the same address: hosts reconnect by
    // themselves and the cached access serves again.
    let m2 = start_master(&master_dir, &addr.to_string()).await;
    eventually("hosts reconnect", Duration::from_secs(20), || async {
        exec(&here.url, &pid, &open2.token, &["true"]).await.0 == 200
    })
    .await;

    for h in [here, keep] {
        let _ = h.stop.send(true);
        let _ = h.task.await;
    }
    m2.shut_down().await;
}

/// A master, one host (with `extra` config lines) that is up, and a user
/// `u` with a project `p` opened on it.
struct Solo {
    m: Master,
    h: Host,
    c: MasterClient,
    o: cocalc_core::wire::OpenProjectResponse,
}

async fn one_host_one_project(dir: &Path, extra: &str) -> Solo {
    let m = start_master(&dir.join("master"), "127.0.0.1:0").await;
    let admin = MasterClient::new(&m.url, &m.admin);
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let h = start_host_with(&dir.join("h"), &m.url, &t, extra).await;
    eventually("host up", Duration::from_secs(15), || async {
        admin.hosts().await.map(|v| v.len() == 1).unwrap_or(false)
    })
    .await;
    let u = admin.create_user("u").await.unwrap();
    let c = MasterClient::new(&m.url, u["api_key"].as_str().unwrap());
    c.create_project(&CreateProjectRequest::new("p"))
        .await
        .unwrap();
    let o = c.open("p").await.unwrap();
    Solo { m, h, c, o }
}

/// A port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP connection to `addr` from the loopback address `local` (any of
/// 127.0.0.0/8), to be a client other than 127.0.0.1.
async fn connect_from(local: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// `GET path` from `local` to `addr` on a connection of its own, with the
/// header lines `extra` (each ending in CRLF): the whole answer.
async fn get_from(local: &str, addr: SocketAddr, path: &str, extra: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(local, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Writes `body` to the file `name` of project `pid` through the files
/// API at `base` (a host's or the proxy's URL), checking it was stored.
async fn put_file(base: &str, pid: &str, token: &str, name: &str, body: Vec<u8>) {
    let r = reqwest::Client::new()
        .put(format!("{base}/{pid}/files/{name}"))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "PUT {base}/{pid}/files/{name}");
}

/// A host's own listener caps the connections one client address holds
/// (`client_connections`): WebSockets count until they close, one more
/// connection is answered 429 `too_many_connections` and closed, and the
/// proxies in `trusted_proxies` are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_caps_connections_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let Solo { m: _m, h, c: _c, o } = one_host_one_project(
        dir.path(),
        &format!(
            "client_connections = 2\ntrusted_proxies = [\"127.0.0.1\"]\n\
             metrics_listen = \"127.0.0.1:{mport}\"\n"
        ),
    )
    .await;
    let metrics = || async move {
        reqwest::get(format!("http://127.0.0.1:{mport}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let addr: SocketAddr = h.url.trim_start_matches("http://").parse().unwrap();
    let pid = o.project.to_string();
    // Connections from 127.0.0.2 (a client) and 127.0.0.1 (the trusted
    // proxy).
    let terminal = |local: &'static str| {
        let (pid, token) = (pid.clone(), o.token.clone());
        async move {
            let req = ws_request(format!("ws://{addr}/{pid}/terminal"), &token);
            tokio_tungstenite::client_async(req, connect_from(local, addr).await)
                .await
                .unwrap()
                .0
        }
    };
    // A status request on a connection of its own: the whole answer.
    let status = |local: &'static str| {
        let path = format!("/{pid}/status");
        let auth = format!("Authorization: Bearer {}\r\n", o.token);
        async move { get_from(local, addr, &path, &auth).await }
    };

    let first = terminal("127.0.0.2").await;
    let _second = terminal("127.0.0.2").await;
    let refused = status("127.0.0.2").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    let m = metrics().await;
    assert!(m.contains("cocalc_host_client_connections 2\n"), "{m}");
    assert!(
        m.contains("cocalc_host_client_connections_refused_total 1\n"),
        "{m}"
    );
    // The trusted proxy is not counted: three more of its own.
    let _p1 = terminal("127.0.0.1").await;
    let _p2 = terminal("127.0.0.1").await;
    assert!(status("127.0.0.1").await.starts_with("HTTP/1.1 200"));
    // A WebSocket that closes gives its place back.
    drop(first);
    eventually("a slot comes back", Duration::from_secs(10), || async {
        status("127.0.0.2").await.starts_with("HTTP/1.1 200")
    })
    .await;
}

/// A host with `access_log` logs each request on its listener, the lean
/// port relay's and the router's, refusals included, with the client a
/// trusted proxy names and the bytes of body it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_access_log_records_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("host-access.log");
    let mport = free_port();
    let Solo { m: _m, h, c: _c, o } = one_host_one_project(
        dir.path(),
        &format!(
            "access_log = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n\
             metrics_listen = \"127.0.0.1:{mport}\"\n",
            log_path.display()
        ),
    )
    .await;
    let addr: SocketAddr = h.url.trim_start_matches("http://").parse().unwrap();
    let pid = o.project.to_string();
    let hport = headers_server().await;
    // One request from `local` on a connection of its own: the status,
    // and the size of the body (each is framed by Content-Length).
    let get = |local: &'static str, path: String, extra: String| async move {
        let answer = get_from(local, addr, &path, &extra).await;
        let body = answer.find("\r\n\r\n").map(|i| answer.len() - i - 4);
        (answer[9..12].parse::<u16>().unwrap(), body.unwrap())
    };
    let auth = format!("Authorization: Bearer {}\r\n", o.token);
    let (s1, n1) = get("127.0.0.2", format!("/{pid}/status"), auth.clone()).await;
    let (s2, n2) = get("127.0.0.2", format!("/{pid}/port/{hport}/a"), auth.clone()).await;
    let via_proxy = format!("{auth}X-Forwarded-For: 198.51.100.7\r\n");
    let (s3, n3) = get("127.0.0.1", format!("/{pid}/status"), via_proxy).await;
    let (s4, n4) = get("127.0.0.2", format!("/{pid}/status"), String::new()).await;
    assert_eq!([s1, s2, s3, s4], [200, 200, 200, 401]);
    assert!([n1, n2, n3, n4].iter().all(|n| *n > 0));
    // A WebSocket through the port relay: logged when it closes, with
    // what was relayed to the client.
    let echo = websocket_echo_server().await;
    {
        use futures_util::{SinkExt, StreamExt};
        let tcp = connect_from("127.0.0.2", addr).await;
        let req = ws_request(format!("ws://{addr}/{pid}/port/{echo}/ws"), &o.token);
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let msg = tokio_tungstenite::tungstenite::Message::binary(vec![2u8; 1_000]);
        ws.send(msg).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().len(), 1_000);
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    // The host's own WebSockets (here an exec stream) are logged when they
    // close too, with the bytes of every frame the client received.
    let exec_bytes = {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let tcp = connect_from("127.0.0.2", addr).await;
        let req = ws_request(format!("ws://{addr}/{pid}/exec-stream"), &o.token);
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let run = serde_json::json!({"argv": ["sh", "-c", "head -c 70000 /dev/zero; echo done"]});
        ws.send(Message::text(run.to_string())).await.unwrap();
        let (mut received, mut stdout, mut exit) = (0, 0, None);
        while let Some(msg) = ws.next().await {
            let msg = msg.unwrap();
            let payload = match &msg {
                Message::Close(c) => c.as_ref().map_or(0, |c| 2 + c.reason.len()),
                m => m.len(),
            };
            // A server's frame: the payload after a 2, 4 or 10-byte header.
            received +=
                payload + [2, 4, 10][usize::from(payload > 125) + usize::from(payload > 0xffff)];
            match msg {
                Message::Binary(b) => stdout += b.len() - 1, // a tag byte, then output
                Message::Text(t) => exit = Some(t.to_string()),
                _ => {}
            }
        }
        assert_eq!(stdout, 70_005, "70,000 zeros and done\\n");
        assert_eq!(exit.as_deref(), Some(r#"{"exit":0}"#));
        received
    };

    let host = h.id.to_string();
    let expect = [
        ("127.0.0.2", format!("/{pid}/status"), 200, n1),
        ("127.0.0.2", format!("/{pid}/port/{hport}/a"), 200, n2),
        ("198.51.100.7", format!("/{pid}/status"), 200, n3),
        ("127.0.0.2", format!("/{pid}/status"), 401, n4),
        // 1,000 bytes echoed in a frame with a 4-byte header (the echo
        // server hangs up on the client's close without answering it).
        ("127.0.0.2", format!("/{pid}/port/{echo}/ws"), 101, 1_004),
        ("127.0.0.2", format!("/{pid}/exec-stream"), 101, exec_bytes),
    ];
    eventually("six lines written", Duration::from_secs(10), || async {
        std::fs::read_to_string(&log_path).is_ok_and(|t| t.lines().count() == expect.len())
    })
    .await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    for (line, (client, target, status, bytes)) in text.lines().zip(expect) {
        let line: Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["client"], client, "{line}");
        assert_eq!(line["bytes"], bytes, "{line}");
        assert!(
            line["total_micros"].as_u64().unwrap() >= line["micros"].as_u64().unwrap(),
            "{line}"
        );
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["target"], target.as_str(), "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["version"], "HTTP/1.1", "{line}");
        assert_eq!(line["tls"], false, "{line}");
        assert_eq!(line["project"], pid.as_str(), "{line}");
        assert_eq!(line["host"], host.as_str(), "{line}");
    }
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(!text.contains(&o.token));
    let metrics = reqwest::get(format!("http://127.0.0.1:{mport}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cocalc_host_access_log_lines_total{result=\"written\"} 6\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_reaches_the_master_and_idle_projects_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let Solo { m, h, c, o } = one_host_one_project(
        dir.path(),
        "idle_timeout_secs = 2\nactivity_interval_secs = 1\n",
    )
    .await;
    let pid = o.project.to_string();
    let (s, v) = exec(&h.url, &pid, &o.token, &["true"]).await;
    assert_eq!(s, 200, "{v}");
    // The host reports the use; the master records it.
    eventually(
        "activity recorded on the master",
        Duration::from_secs(10),
        || async {
            c.projects()
                .await
                .map(|p| p[0].last_activity.is_some())
                .unwrap_or(false)
        },
    )
    .await;
    // Nothing uses the project now: the culler stops it.
    eventually("idle project stopped", Duration::from_secs(15), || async {
        let r: Value = reqwest::Client::new()
            .get(format!("{}/{}/status", h.url, o.project))
            .bearer_auth(&o.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["state"] == "stopped"
    })
    .await;
    let _ = h.stop.send(true);
    let _ = h.task.await;
    m.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_metrics_show_projects_answers_and_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Solo { m, h, c: _, o } = one_host_one_project(
        dir.path(),
        &format!("metrics_listen = \"127.0.0.1:{port}\"\nproject_slots = 7\n"),
    )
    .await;
    let pid = o.project.to_string();
    let (s, v) = exec(&h.url, &pid, &o.token, &["true"]).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = exec(&h.url, &pid, "v4.public.bogus", &["true"]).await;
    assert_eq!(s, 401);
    let scrape = || async move {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    // The running count is refreshed every 5 s.
    eventually("one running project", Duration::from_secs(15), || async {
        value(&scrape().await, "cocalc_host_running_projects") == Some(1.0)
    })
    .await;
    let text = scrape().await;
    assert_eq!(
        value(&text, "cocalc_host_project_slots"),
        Some(7.0),
        "{text}"
    );
    assert!(
        value(&text, "cocalc_host_http_responses_total{code=\"200\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "cocalc_host_http_responses_total{code=\"401\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(&text, "cocalc_host_master_lease_age_seconds").is_some_and(|s| s < 60.0),
        "{text}"
    );
    assert!(
        !text.contains("cocalc_host_tunnel"),
        "not a hidden host: {text}"
    );
    let _ = h.stop.send(true);
    let _ = h.task.await;
    m.shut_down().await;
}

/// The same federation with the production backends: podman containers on
/// a loop-mounted Btrfs pool. Runs as root; with COCALC_TEST_PRIVILEGED=require
/// (as `scripts/test` sets it) a missing environment is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_with_podman_and_btrfs() {
    let required = std::env::var("COCALC_TEST_PRIVILEGED").is_ok_and(|v| v == "require");
    let root = nix_is_root();
    let tools = ["podman", "runc", "mkfs.btrfs"].iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && tools) {
        let why = if root {
            "podman/runc/mkfs.btrfs missing"
        } else {
            "not root"
        };
        assert!(!required, "COCALC_TEST_PRIVILEGED=require but {why}");
        eprintln!("skipping federation_with_podman_and_btrfs: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let pool = cocalc_storage::LoopPool::create(&pool_dir, 2 << 30).unwrap();
    let m = start_master(&dir.path().join("master"), "127.0.0.1:0").await;
    let admin = MasterClient::new(&m.url, &m.admin);
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(dir.path().join("backup-password"), "pw").unwrap();
    let backend = format!(
        "runner = \"podman\"\nstorage = \"btrfs\"\nbtrfs_pool = \"{}\"\n\
         [backup]\nrepository = \"{}\"\npassword_file = \"{}\"\n",
        pool.path().display(),
        dir.path().join("repo").display(),
        dir.path().join("backup-password").display()
    );
    let hdir = dir.path().join("h");
    let h = start_host_with(&hdir, &m.url, &t, &backend).await;
    eventually("host up", Duration::from_secs(30), || async {
        admin.hosts().await.map(|v| v.len() == 1).unwrap_or(false)
    })
    .await;
    let u = admin.create_user("u").await.unwrap();
    let c = MasterClient::new(&m.url, u["api_key"].as_str().unwrap());
    c.create_project(&CreateProjectRequest::new("a"))
        .await
        .unwrap();
    c.create_project(&CreateProjectRequest::new("b"))
        .await
        .unwrap();
    let a = c.open("a").await.unwrap();
    let b = c.open("b").await.unwrap();
    let (pa, pb) = (a.project.to_string(), b.project.to_string());

    // exec in a container, as the unprivileged user, on its subvolume.
    let (s, v) = exec(
        &h.url,
        &pa,
        &a.token,
        &["sh", "-c", "id -u; echo data > f.txt; cat f.txt"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "2001\ndata\n");
    // Project b cannot see a's files, by path tricks or by its token.
    let (s, v) = exec(
        &h.url,
        &pb,
        &b.token,
        &["sh", "-c", "ls /home/user; cat ../*/f.txt 2>&1 || true"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(!stdout(&v).contains("data"), "{v}");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/{pa}/files/f.txt", h.url))
        .bearer_auth(&b.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Host restart with the project running: the container is adopted, not
    // duplicated, and keeps serving.
    let _ = h.stop.send(true);
    let _ = h.task.await;
    let h = start_host_with(&hdir, &m.url, "", &backend).await;
    let (s, v) = exec(&h.url, &pa, &a.token, &["cat", "f.txt"]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "data\n");
    let ps = std::process::Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=org.cocalc.project={pa}"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&ps.stdout);
    assert_eq!(
        names.lines().count(),
        1,
        "one container for the project: {names}"
    );

    // Stop, open again: data still there.
    for (p, tok) in [(&pa, &a.token), (&pb, &b.token)] {
        let r = http
            .post(format!("{}/{p}/stop", h.url))
            .bearer_auth(tok)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let a2 = c.open("a").await.unwrap();
    let (s, v) = exec(&h.url, &pa, &a2.token, &["cat", "f.txt"]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "data\n");

    // Backups of a Btrfs snapshot: one file back while the container
    // runs, with the owner the container gave it; then the whole project,
    // stopped.
    let ha = cocalc_client::HostClient::new(h.url.clone(), a.project, a2.token.clone());
    let backup = ha.backup().await.unwrap();
    assert_eq!(backup.files, 1, "{backup:?}");
    let (s, v) = exec(
        &h.url,
        &pa,
        &a2.token,
        &["sh", "-c", "echo changed > f.txt; echo new > g.txt"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let r = ha.restore_backup(&backup.id, Some("f.txt")).await.unwrap();
    assert!(!r.fetched, "the host still has the snapshot: {r:?}");
    let (s, v) = exec(
        &h.url,
        &pa,
        &a2.token,
        &["sh", "-c", "stat -c %u f.txt; cat f.txt g.txt"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "2001\ndata\nnew\n");
    let e = ha.restore_backup(&backup.id, None).await.unwrap_err();
    assert_eq!(e.code, "project_running", "{e:?}");
    ha.stop().await.unwrap();
    // Drop the local snapshots, so the whole restore comes from the store.
    for s in std::fs::read_dir(pool.path().join("snapshots").join(format!("project-{pa}"))).unwrap()
    {
        let s = s.unwrap().path();
        let out = std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&s)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let r = ha.restore_backup(&backup.id, None).await.unwrap();
    assert!(r.fetched, "{r:?}");
    let (s, v) = exec(
        &h.url,
        &pa,
        &a2.token,
        &["sh", "-c", "stat -c %u f.txt; cat f.txt; ls"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "2001\ndata\nf.txt\n");

    // A move to a second Btrfs host while the container runs: a full
    // `btrfs send` of a snapshot, a write, then the changes since as an
    // incremental stream; owners kept; the first host's subvolumes gone.
    let pool2_dir = dir.path().join("pool2");
    std::fs::create_dir_all(&pool2_dir).unwrap();
    let pool2 = cocalc_storage::LoopPool::create(&pool2_dir, 1 << 30).unwrap();
    let t2 = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let backend2 = backend.replace(
        &pool.path().display().to_string(),
        &pool2.path().display().to_string(),
    );
    let h2 = start_host_with(&dir.path().join("h2"), &m.url, &t2, &backend2).await;
    eventually("second host up", Duration::from_secs(30), || async {
        admin.hosts().await.map(|v| v.len() == 2).unwrap_or(false)
    })
    .await;
    let mv = move_with_a_write_between(&m, a.project, h2.id, ha.clone()).await;
    assert_eq!(mv.phase, cocalc_core::MovePhase::Done, "{mv:?}");
    assert!(mv.was_running && mv.base < mv.last, "{mv:?}");
    let a3 = c.open("a").await.unwrap();
    assert_eq!(a3.host, h2.id);
    let (s, v) = exec(
        &h2.url,
        &pa,
        &a3.token,
        &["sh", "-c", "stat -c %u f.txt; cat f.txt between.txt"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(stdout(&v), "2001\ndata\nwritten during the copy");
    assert!(!pool.path().join(format!("project-{pa}")).exists());
    assert!(
        !pool
            .path()
            .join("snapshots")
            .join(format!("project-{pa}"))
            .exists()
            || std::fs::read_dir(pool.path().join("snapshots").join(format!("project-{pa}")))
                .unwrap()
                .next()
                .is_none()
    );
    let (s, v) = exec(&h.url, &pa, &a2.token, &["true"]).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("stale_generation")),
        "{v}"
    );
    let r = http
        .post(format!("{}/{pa}/stop", h2.url))
        .bearer_auth(&a3.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let _ = h2.stop.send(true);
    let _ = h2.task.await;
    let _ = h.stop.send(true);
    let _ = h.task.await;
    m.shut_down().await;
    pool2.teardown().unwrap();
    pool.teardown().unwrap();
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A master, one host and an ingress in front of it (plain TCP to the
/// host, refusals kept in memory), for the ingress tests.
struct IngressFixture {
    m: Master,
    admin: MasterClient,
    h: Host,
    ingress: std::sync::Arc<cocalc_proxy::Ingress>,
    audit: std::sync::Arc<cocalc_auth::MemoryAuditSink>,
}

/// A master, one host and an ingress (not served yet) whose config
/// `tune` adjusts.
async fn ingress_fixture(
    dir: &Path,
    tune: impl FnOnce(&mut cocalc_proxy::IngressConfig),
) -> IngressFixture {
    let m = start_master(&dir.join("master"), "127.0.0.1:0").await;
    let admin = MasterClient::new(&m.url, &m.admin);
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let h = start_host(&dir.join("h"), &m.url, &t, 60).await;
    eventually("host up", Duration::from_secs(15), || async {
        admin.hosts().await.map(|v| v.len() == 1).unwrap_or(false)
    })
    .await;
    let proxy_user = admin.create_user("proxy").await.unwrap();
    let mut icfg =
        cocalc_proxy::IngressConfig::new(&m.url, proxy_user["api_key"].as_str().unwrap());
    icfg.client_rps = 1000;
    tune(&mut icfg);
    let audit = std::sync::Arc::new(cocalc_auth::MemoryAuditSink::new());
    let ingress = cocalc_proxy::Ingress::with_audit(
        icfg,
        std::sync::Arc::new(cocalc_proxy::TcpTransport::default()),
        std::sync::Arc::new(cocalc_core::SystemClock),
        audit.clone(),
    )
    .await
    .unwrap();
    IngressFixture {
        m,
        admin,
        h,
        ingress,
        audit,
    }
}

/// A WebSocket handshake request for `url`, carrying `token`.
fn ws_request(
    url: String,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Serves `ingress` as the daemon does ([`cocalc_proxy::serve_ingress`])
/// on a loopback port: its address, and the task.
async fn serve_ingress_on_loopback(
    ingress: &std::sync::Arc<cocalc_proxy::Ingress>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ingress = ingress.clone();
    let served = tokio::spawn(async move {
        cocalc_proxy::serve_ingress(
            listener,
            ingress,
            axum::Router::new(),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (addr, served)
}

/// A new user "u" with the projects `names`, as a client of the master.
async fn user_with_projects(m: &Master, admin: &MasterClient, names: &[&str]) -> MasterClient {
    let u = admin.create_user("u").await.unwrap();
    let c = MasterClient::new(&m.url, u["api_key"].as_str().unwrap());
    for name in names {
        c.create_project(&CreateProjectRequest::new(*name))
            .await
            .unwrap();
    }
    c
}

/// While the master is away the ingress keeps routing to the hosts it
/// knows, for `route_grace` past the routes' TTL; after that their
/// requests fail with the master's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_routes_without_the_master_for_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    // The host stays up (dropping it would stop it).
    let IngressFixture {
        m,
        admin,
        ingress,
        h: _h,
        audit,
    } = ingress_fixture(dir.path(), |c| {
        c.route_ttl = Duration::from_millis(200);
        c.route_grace = Duration::from_secs(8);
    })
    .await;
    let (addr, _served) = serve_ingress_on_loopback(&ingress).await;
    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let argv = ["sh", "-c", "echo still-$((40+2))"];
    let purl = format!("http://{addr}");
    let ok = exec(&purl, &pid, &o.token, &argv).await;
    assert_eq!(ok.0, 200, "{ok:?}");
    let stats = ingress.route_stats();
    assert_eq!((stats.fresh, stats.stale, stats.master_away), (1, 0, false));
    let started = Instant::now();
    let m_addr = m.addr;
    m.shut_down().await;

    // Past the TTL, the master gone: routed with the known address, by
    // the lean path and by hyper's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(exec(&purl, &pid, &o.token, &argv).await, ok);
        let r = reqwest::Client::new()
            .get(format!("{purl}/{pid}/status"))
            .bearer_auth(&o.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // What an operator sees meanwhile.
    eventually(
        "the failed lookup is seen",
        Duration::from_secs(5),
        || async { ingress.route_stats().master_away },
    )
    .await;
    let stats = ingress.route_stats();
    assert_eq!((stats.fresh, stats.stale), (0, 1));
    assert!(stats.lookup_failures >= 1);
    proxy_metrics_show(
        &ingress,
        &[
            "cocalc_proxy_master_away 1",
            "cocalc_proxy_routes{state=\"stale\"} 1",
        ],
    );
    // Past the TTL and the grace: the master's error.
    let over = Duration::from_millis(200 + 8000 + 300);
    tokio::time::sleep(over.saturating_sub(started.elapsed())).await;
    let (code, body) = exec(&purl, &pid, &o.token, &argv).await;
    assert_eq!(
        (code, &body["code"]),
        (503, &json!("master_unreachable")),
        "{body}"
    );
    // Telling the client what failed, not where the master is.
    let said = body["message"].as_str().unwrap();
    assert!(said.contains("cannot ask the master"), "{body}");
    assert!(!said.contains(&m_addr.to_string()), "{body}");
    assert!(body.get("hint").is_none(), "{body}");
    // Counted and audited.
    assert!(audit
        .records()
        .iter()
        .any(|r| r.reason == "master_unreachable"));
}

/// Behind a load balancer (`trusted_proxies`), the per-client limit keys
/// on the address the balancer forwarded for, its connections are not
/// capped, and its `X-Forwarded-Proto` passes; anyone else's forwarding
/// headers change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_believes_forwarding_headers_from_trusted_proxies_only() {
    let dir = tempfile::tempdir().unwrap();
    let IngressFixture {
        m,
        admin,
        ingress,
        h: _h,
        audit,
    } = ingress_fixture(dir.path(), |c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        // One request a second per client: the checks below come well
        // within a second of each other.
        c.client_rps = 1;
    })
    .await;
    let (addr, _served) = serve_ingress_on_loopback(&ingress).await;
    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let hport = headers_server().await;
    // The balancer is 127.0.0.1; 127.0.0.2 (loopback too) is a stranger.
    let lb = reqwest::Client::new();
    let stranger = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let get = |http: &reqwest::Client, path: &str, xff: &str, proto: &str| {
        http.get(format!("http://{addr}/{pid}/{path}"))
            .bearer_auth(&o.token)
            .header("x-forwarded-for", xff)
            .header("x-forwarded-proto", proto)
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();

    // Each forwarded client has a budget of its own.
    let client_a = "203.0.113.7";
    assert_eq!(
        status(get(&lb, "status", client_a, "http").await.unwrap()),
        200
    );
    assert_eq!(
        status(get(&lb, "status", client_a, "http").await.unwrap()),
        429
    );
    // The right-most address that is not the balancer's counts.
    let chain = "198.51.100.1, 127.0.0.1";
    assert_eq!(
        status(get(&lb, "status", chain, "http").await.unwrap()),
        200
    );
    // The project's server sees the balancer's scheme.
    let seen = get(&lb, &format!("port/{hport}/h"), "203.0.113.8", "https")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        seen.lines().any(|l| l == "x-forwarded-proto: https"),
        "{seen}"
    );
    assert_eq!(
        ingress.connections_held(),
        (0, 0),
        "the balancer is not capped"
    );

    // A stranger's headers are not believed: its own address counts, and
    // the scheme is the one it came in with.
    let seen = get(
        &stranger,
        &format!("port/{hport}/h"),
        "203.0.113.9",
        "https",
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(
        seen.lines().any(|l| l == "x-forwarded-proto: http"),
        "{seen}"
    );
    assert_eq!(
        status(
            get(&stranger, "status", "203.0.113.11", "http")
                .await
                .unwrap()
        ),
        429,
        "a new X-Forwarded-For does not buy a new budget"
    );
    // The stranger's connections count under its own address, never under
    // the addresses it claimed. (How many: one or two, as its client's pool
    // happens to reuse or open a connection; CI saw both.)
    let stranger_ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    assert!(ingress.connections_of(stranger_ip) >= 1);
    for claimed in ["203.0.113.9", "203.0.113.11"] {
        assert_eq!(
            ingress.connections_of(claimed.parse().unwrap()),
            0,
            "{claimed}"
        );
    }
    // Refusals name the forwarded client and the balancer it came through.
    let details: Vec<String> = audit
        .records()
        .into_iter()
        .filter(|r| r.reason == "rate_limited")
        .map(|r| r.detail)
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.starts_with(&format!("client {client_a} (via 127.0.0.1:"))),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.starts_with("client 127.0.0.2:")),
        "{details:?}"
    );
}

/// Behind a TCP load balancer that sends the PROXY protocol (a trusted
/// proxy, on a listener that expects it), the client the header names is
/// the peer: it is what the project sees in `X-Forwarded-For` and what
/// holds the connection under the per-client cap. The balancer's
/// connection without a header is closed and counted; a stranger's
/// header is not read, just refused as HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_takes_clients_from_proxy_protocol_headers() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let IngressFixture {
        m,
        admin,
        ingress,
        h: _h,
        audit,
    } = ingress_fixture(dir.path(), |c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(cocalc_proxy::serve_ingress(
        ingress.listener(listener, "http", true),
        ingress.clone(),
        axum::Router::new(),
        std::future::pending(),
    ));
    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let hport = headers_server().await;

    // A connection from the balancer: its header, then HTTP.
    let via_balancer = |header: Vec<u8>| {
        let (pid, token) = (pid.clone(), o.token.clone());
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&header).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            let conn = tokio::spawn(conn);
            let req = http::Request::get(format!("/{pid}/port/{hport}/h"))
                .header("host", addr.to_string())
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            let r = send.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            let seen = r.into_body().collect().await.unwrap().to_bytes();
            // `send` and `conn` keep the connection open.
            (String::from_utf8(seen.to_vec()).unwrap(), send, conn)
        }
    };
    let (seen, _open, _conn) =
        via_balancer(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n".to_vec()).await;
    assert!(
        seen.lines().any(|l| l == "x-forwarded-for: 203.0.113.7"),
        "{seen}"
    );
    assert_eq!(ingress.connections_of("203.0.113.7".parse().unwrap()), 1);
    assert_eq!(ingress.connections_of("127.0.0.1".parse().unwrap()), 0);

    // Version 2, an IPv6 client.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(
        &"2001:db8::5"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(&[0; 16]);
    v2.extend_from_slice(&[0x1f, 0x90, 0x00, 0x50]);
    let (seen, _open6, _conn6) = via_balancer(v2).await;
    assert!(
        seen.lines().any(|l| l == "x-forwarded-for: 2001:db8::5"),
        "{seen}"
    );

    // The balancer's address without a header: closed, counted, audited.
    let mut bare = tokio::net::TcpStream::connect(addr).await.unwrap();
    bare.write_all(format!("GET /{pid}/status HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = bare.read_to_end(&mut answer).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(
        ingress
            .refusals()
            .bad_proxy_header
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        audit
            .records()
            .iter()
            .any(|r| r.reason == "bad_proxy_header"
                && r.detail.contains("http listener")
                && r.detail
                    .contains("does not begin with a PROXY protocol header")),
        "{:?}",
        audit.records()
    );

    // A stranger's header is not read: it is a bad request line.
    let stranger = tokio::net::TcpSocket::new_v4().unwrap();
    stranger.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = stranger.connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(ingress.connections_of("203.0.113.9".parse().unwrap()), 0);
    served.abort();
}

/// One client address holds at most `client_connections` connections with
/// project requests on them: a WebSocket counts until it closes, one more
/// connection is answered 429 `too_many_connections` and closed (counted
/// and audited), a slot comes back when a connection ends, and
/// connections that only carry the proxy's own `/.cocalc/` paths do not
/// count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_caps_connections_per_client() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let IngressFixture {
        m,
        admin,
        h: _h,
        ingress,
        audit,
    } = ingress_fixture(dir.path(), |c| c.client_connections = 3).await;
    let (addr, _served) = serve_ingress_on_loopback(&ingress).await;
    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let held = || ingress.connections_of(addr.ip());

    // One keep-alive connection per call; `get` sends on it.
    type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;
    let connect = || async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
        let done = tokio::spawn(async move {
            let _ = conn.await;
        });
        (send, done)
    };
    let get = |send: &mut Conn, path: String| {
        let req = hyper::Request::get(path)
            .header("host", "proxy")
            .header("authorization", format!("Bearer {}", o.token))
            .body(http_body_util::Empty::new())
            .unwrap();
        let sent = send.send_request(req);
        async move {
            use http_body_util::BodyExt;
            let r = sent.await.unwrap();
            let head = r.headers().clone();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, head, body)
        }
    };
    let status = format!("/{pid}/status");

    let (mut c1, _) = connect().await;
    let (mut c2, _) = connect().await;
    assert_eq!(get(&mut c1, status.clone()).await.0, 200);
    assert_eq!(get(&mut c2, status.clone()).await.0, 200);
    assert_eq!(get(&mut c1, status.clone()).await.0, 200, "reused");
    assert_eq!(held(), 2);

    // A WebSocket through the ingress holds its slot after the handshake.
    let echo_port = websocket_echo_server().await;
    let req = ws_request(format!("ws://{addr}/{pid}/port/{echo_port}/"), &o.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("still here".into())
    );
    assert_eq!(held(), 3);
    assert_eq!(ingress.connections_held(), (1, 3));

    // The proxy's own paths are not project traffic: not counted, not capped.
    let (mut own, _) = connect().await;
    let (code, _, body) = get(&mut own, "/.cocalc/nothing".into()).await;
    assert_eq!(code, 400, "{body:?}");
    assert_eq!(held(), 3);

    // A fourth connection with project requests is refused and closed.
    let (mut c4, c4_done) = connect().await;
    let (code, head, body) = get(&mut c4, status.clone()).await;
    assert_eq!(code, 429, "{body:?}");
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["code"], "too_many_connections", "{e}");
    assert_eq!(head["retry-after"], "1");
    assert_eq!(head["connection"], "close");
    tokio::time::timeout(Duration::from_secs(5), c4_done)
        .await
        .expect("the refused connection is closed")
        .unwrap();
    assert_eq!(held(), 3, "a refused connection holds nothing");
    assert_eq!(
        ingress
            .refusals()
            .too_many_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(audit
        .records()
        .iter()
        .any(|r| r.reason == "too_many_connections"));

    // Closing the WebSocket gives its slot back.
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(
        "the WebSocket's slot comes back",
        Duration::from_secs(10),
        || async { held() == 2 },
    )
    .await;
    let (mut c5, _) = connect().await;
    assert_eq!(get(&mut c5, status.clone()).await.0, 200);
    assert_eq!(held(), 3);
    // So does a connection that ends.
    drop(c1);
    eventually(
        "a closed connection's slot comes back",
        Duration::from_secs(10),
        || async { held() == 2 },
    )
    .await;
    assert_eq!(get(&mut c2, status).await.0, 200, "the others still serve");
}

/// A "server in a project" (the host's loopback, as the process runner
/// gives projects) that echoes WebSocket messages; its port.
async fn websocket_echo_server() -> u16 {
    use futures_util::{SinkExt, StreamExt};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A server in a project that answers every request with the request's
/// headers, one `name: value` per line; its port.
async fn headers_server() -> u16 {
    let hl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hl.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|h: axum::http::HeaderMap| async move {
            h.iter()
                .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                .collect::<String>()
        });
        axum::serve(hl, app).await.unwrap();
    });
    port
}

/// The same requests directly to the host and through the ingress give the
/// same answers; the ingress refuses malformed paths and bad tokens itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_matches_direct_and_refuses_bad_input() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let IngressFixture {
        m,
        admin,
        h,
        ingress,
        audit,
    } = ingress_fixture(dir.path(), |c| c.project_rps = 20).await;
    // Served as the daemon serves it, so WebSockets below are relayed by
    // splice(2) at the proxy as well as at the host.
    let (addr, served) = serve_ingress_on_loopback(&ingress).await;
    let purl = format!("http://{addr}");

    let c = user_with_projects(&m, &admin, &["p", "q"]).await;
    let o = c.open("p").await.unwrap();
    let oq = c.open("q").await.unwrap();
    let pid = o.project.to_string();

    // Same exec, same answer.
    let argv = ["sh", "-c", "printf 'a\\0b'; echo err >&2; exit 4"];
    let direct = exec(&h.url, &pid, &o.token, &argv).await;
    let proxied = exec(&purl, &pid, &o.token, &argv).await;
    assert_eq!(direct.0, 200, "{direct:?}");
    assert_eq!(direct, proxied);
    // Same file, byte for byte, streamed.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let http = reqwest::Client::new();
    put_file(&purl, &pid, &o.token, "big.bin", big.clone()).await;
    let got = http
        .get(format!("{}/{pid}/files/big.bin", h.url))
        .bearer_auth(&o.token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), big.as_slice());
    // Read back through the ingress (a request without a body, so the
    // lean upstream client): the same bytes, and HEAD the same headers.
    let via = http
        .get(format!("{purl}/{pid}/files/big.bin"))
        .bearer_auth(&o.token)
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    assert_eq!(via.bytes().await.unwrap().as_ref(), big.as_slice());
    for base in [&h.url, &purl] {
        let head = http
            .head(format!("{base}/{pid}/files/big.bin"))
            .bearer_auth(&o.token)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "{base}");
        assert_eq!(
            head.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap()),
            Some("3000000"),
            "HEAD via {base}"
        );
        assert_eq!(head.bytes().await.unwrap().len(), 0);
    }
    // A terminal through the ingress.
    let req = ws_request(
        format!("{}/{pid}/terminal", purl.replacen("http://", "ws://", 1)),
        &o.token,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::Binary(b"echo via-$((40+2))\n".to_vec().into()))
        .await
        .unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("via-42") {
        assert!(Instant::now() < deadline, "{seen:?}");
        if let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await
        {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    ws.close(None).await.unwrap();

    // A WebSocket echo server inside the project: the same frames come
    // back, in the same order, directly and through the ingress.
    let echo_port = websocket_echo_server().await;
    let frames = vec![
        Message::Text("hello".into()),
        Message::Binary(
            (0..70_000u32)
                .map(|i| (i % 256) as u8)
                .collect::<Vec<u8>>()
                .into(),
        ),
        Message::Text("é✓".into()),
        Message::Binary(Vec::new().into()),
    ];
    let mut echoed = Vec::new();
    for base in [&h.url, &purl] {
        let req = ws_request(
            format!(
                "{}/{pid}/port/{echo_port}/",
                base.replacen("http://", "ws://", 1)
            ),
            &o.token,
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut got = Vec::new();
        for f in &frames {
            ws.send(f.clone()).await.unwrap();
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.push(m);
        }
        ws.close(None).await.unwrap();
        assert_eq!(got, frames, "echo via {base}");
        echoed.push(got);
    }
    assert_eq!(echoed[0], echoed[1], "direct and proxied echoes differ");

    // What a server in the project sees of the request through the
    // ingress: the client's Host as X-Forwarded-Host (never one the client
    // sent itself), its address appended to X-Forwarded-For, the scheme,
    // and never the token; the same for a GET (the lean upstream client)
    // and a POST with a body (hyper's).
    let hport = headers_server().await;
    let headers_seen = |base: String, method: reqwest::Method| {
        let (http, token, pid) = (http.clone(), o.token.clone(), pid.clone());
        async move {
            let body = if method == reqwest::Method::POST {
                "x"
            } else {
                ""
            };
            let r = http
                .request(method, format!("{base}/{pid}/port/{hport}/headers"))
                .bearer_auth(token)
                .header("host", "app.example")
                .header("x-forwarded-for", "10.1.2.3")
                .header("x-forwarded-host", "evil.example")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let via = headers_seen(purl.clone(), method.clone()).await;
        assert!(has(&via, "x-forwarded-for: 10.1.2.3, 127.0.0.1"), "{via}");
        assert!(has(&via, "x-forwarded-host: app.example"), "{via}");
        assert!(!via.contains("evil.example"), "{method} {via}");
        assert!(has(&via, "x-forwarded-proto: http"), "{via}");
        assert!(!via.contains("authorization"), "{via}");
        let direct = headers_seen(h.url.clone(), method).await;
        assert!(has(&direct, "x-forwarded-for: 10.1.2.3"), "{direct}");
        assert!(has(&direct, "x-forwarded-host: evil.example"), "{direct}");
        assert!(!direct.contains("authorization"), "{direct}");
    }

    // Refused by the ingress itself, with a reason.
    let short = &pid[..35];
    let cases = [
        format!("/{short}/exec"),
        format!("/{pid}0/exec"),
        format!("/{}/exec", pid.to_uppercase()),
        format!("/{pid}/../{}/exec", oq.project),
        format!("/{pid}/files/a%2Fb"),
    ];
    for path in &cases {
        let (status, body) = raw_get(&purl, path, &o.token).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("bad_path"), "{path}: {body}");
    }
    // No token, a bad token, another project's token: never forwarded.
    assert_eq!(exec(&purl, &pid, "", &["true"]).await.0, 401);
    assert_eq!(exec(&purl, &pid, "v4.public.junk", &["true"]).await.0, 401);
    let (s, v) = exec(&purl, &pid, &oq.token, &["true"]).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], "token_wrong_project");
    assert!(
        ingress
            .refusals()
            .bad_path
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );

    // Rate limits: a noisy project gets 429 with Retry-After; another
    // project on the same ingress is not affected.
    let mut limited = None;
    for _ in 0..60 {
        let r = http
            .get(format!("{purl}/{pid}/status"))
            .bearer_auth(&o.token)
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the noisy project was never limited");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // Every refusal above is an audit record with its reason.
    let reasons: Vec<String> = audit.records().into_iter().map(|r| r.reason).collect();
    for want in [
        "bad_path",
        "token_missing",
        "token_wrong_project",
        "rate_limited",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{want} not audited: {reasons:?}"
        );
    }
    assert!(audit
        .records()
        .iter()
        .all(|r| r.outcome == cocalc_core::AuditOutcome::Refuse && r.action == "ingress"));
    let qid = oq.project.to_string();
    let r = http
        .get(format!("{purl}/{qid}/status"))
        .bearer_auth(&oq.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another project is not limited");

    served.abort();
    let _ = h.stop.send(true);
    let _ = h.task.await;
    m.shut_down().await;
}

/// A self-signed certificate for 127.0.0.1 written to `dir` as PEM: the
/// certificate and key files, and the certificate for a client's roots.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.join("proxy.crt"), dir.join("proxy.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// Serves `ingress` over TLS with `tls` on a loopback port: its address,
/// and the task.
async fn serve_tls_on_loopback(
    ingress: &std::sync::Arc<cocalc_proxy::Ingress>,
    tls: std::sync::Arc<rustls::ServerConfig>,
) -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(cocalc_proxy::tls::serve_ingress_tls(
        listener,
        tls,
        ingress.clone(),
        axum::Router::new(),
        std::future::pending(),
    ));
    (addr, served)
}

/// Checks that the metrics of a proxy serving `ingress` (and no tunnels)
/// have each of `lines`.
fn proxy_metrics_show(ingress: &std::sync::Arc<cocalc_proxy::Ingress>, lines: &[&str]) {
    let tunnels = cocalc_proxy::TunnelHub::new(
        cocalc_proxy::TunnelConfig::new("http://unused"),
        MasterClient::new("http://127.0.0.1:9", "unused"),
        std::sync::Arc::new(cocalc_core::SystemClock),
    );
    let text = cocalc_proxy::metrics::ProxyMetrics::new(ingress.clone(), tunnels).render();
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "{line} in:\n{text}");
    }
}

/// Sends `f` on `ws` and checks that it comes back (within 10 s).
async fn echoed<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    f: &tokio_tungstenite::tungstenite::Message,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    ws.send(f.clone()).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&back, f);
}

/// A TLS connection to `addr` trusting only `root`.
async fn tls_connect(
    addr: SocketAddr,
    root: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_trusting(addr, &[root]).await
}

/// A TLS connection to `addr` trusting only the certificates `trusted`.
async fn tls_connect_trusting(
    addr: SocketAddr,
    trusted: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_offering(addr, trusted, &[]).await
}

/// An HTTP/2 connection to `addr` over TLS trusting only `root`, as a
/// browser makes it (ALPN `h2`, then `http/1.1`); fails unless the server
/// chose `h2`.
async fn h2_connect(
    addr: SocketAddr,
    root: &[u8],
) -> hyper::client::conn::http2::SendRequest<String> {
    let tls = tls_connect_offering(addr, &[root], &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// A TLS connection to `addr` trusting only the certificates `trusted`,
/// offering the protocols `alpn` (none: no ALPN).
async fn tls_connect_offering(
    addr: SocketAddr,
    trusted: &[&[u8]],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for root in trusted {
        roots
            .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
            .unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut cfg = cfg;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::from(addr.ip()), tcp)
        .await
        .unwrap()
}

/// One HTTPS request: status, headers and the whole body.
async fn https(
    addr: SocketAddr,
    root: &[u8],
    req: http::Request<String>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    let tls = tls_connect(addr, root).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = send.send_request(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status.as_u16(), parts.headers, body)
}

/// With an access log, every project request the ingress answers is a
/// JSON line: the lean path's and hyper's, refusals, HTTP/2 over TLS, and
/// ones whose client gave up (499, with the host it waited on; an HTTP/2
/// stream reset and an HTTP/1.1 connection closed); tokens in
/// the query are redacted; the metrics count the lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_access_log_records_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let log = cocalc_client::access_log::AccessLog::open(cocalc_client::access_log::Target::File(
        log_path.clone(),
    ))
    .unwrap();
    let IngressFixture {
        m,
        admin,
        h,
        ingress,
        ..
    } = ingress_fixture(dir.path(), |c| c.access_log = Some(log.clone())).await;
    let (paddr, served) = serve_ingress_on_loopback(&ingress).await;
    let purl = format!("http://{paddr}");
    let (cert, key, root) = self_signed(dir.path());
    let tls = cocalc_proxy::tls::server_config(&cocalc_proxy::tls::TlsFiles {
        cert_file: cert,
        key_file: key,
    })
    .unwrap();
    let (taddr, served_tls) = serve_tls_on_loopback(&ingress, tls).await;

    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let hport = headers_server().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // 1. The lean path, the token in the query: the host's cookie
    // exchange (303 to the same path without it).
    let r = http
        .get(format!("{purl}/{pid}/port/{hport}/x?a=1&token={}", o.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // 2. Hyper's path: a request with a body.
    let (status, _) = exec(&purl, &pid, &o.token, &["true"]).await;
    assert_eq!(status, 200);
    // 3. A bad path and 4. no token: refusals.
    let r = http.get(format!("{purl}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{purl}/{pid}/port/{hport}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // 5. HTTP/2 over TLS.
    let mut h2 = h2_connect(taddr, &root).await;
    let r = h2
        .send_request(
            http::Request::builder()
                .uri(format!("https://app.example/{pid}/port/{hport}/y"))
                .header("authorization", format!("Bearer {}", o.token))
                .body(String::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // 6. A client that gives up on a server in the project that never
    // answers (an HTTP/2 stream reset): 499, with the host it waited on.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let waiting = h2.send_request(
        http::Request::builder()
            .uri(format!("https://app.example/{pid}/port/{silent_port}/z"))
            .header("authorization", format!("Bearer {}", o.token))
            .body(String::new())
            .unwrap(),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting)
            .await
            .is_err(),
        "the silent server answered"
    );
    // 7. The same over HTTP/1.1 (the lean path): the client closes its
    // connection while it waits.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(paddr).await.unwrap();
        let req = format!(
            "GET /{pid}/port/{silent_port}/w HTTP/1.1\r\nHost: {paddr}\r\n\
             Authorization: Bearer {}\r\n\r\n",
            o.token
        );
        s.write_all(req.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 8. A file of 300 kB (put straight to the host, not logged here),
    // read through the proxy: the lean path splices it, and the line
    // counts its bytes.
    let big = vec![7u8; 300_000];
    put_file(&h.url, &pid, &o.token, "big.bin", big.clone()).await;
    let r = http
        .get(format!("{purl}/{pid}/files/big.bin"))
        .bearer_auth(&o.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), big.len());
    // 9. A WebSocket to a server in the project: logged when it closes,
    // with the bytes relayed to the client (frames and their headers).
    let echo = websocket_echo_server().await;
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let url = format!("ws://{paddr}/{pid}/port/{echo}/ws");
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_request(url, &o.token))
            .await
            .unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        ws.send(Message::binary(vec![1u8; 10_000])).await.unwrap();
        for want in [5, 10_000] {
            assert_eq!(ws.next().await.unwrap().unwrap().len(), want);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Everything queued so far is written; the WebSocket is not.
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            !text.contains(&format!("/port/{echo}/ws")),
            "a WebSocket logged before it closed:\n{text}"
        );
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    // 10. The same WebSocket over HTTP/2 (RFC 8441): logged as its
    // client sent it and saw it answered (CONNECT, 200).
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let mut connect = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://app.example/{pid}/port/{echo}/h2ws"))
            .header("authorization", format!("Bearer {}", o.token))
            .header("sec-websocket-version", "13")
            .body(String::new())
            .unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let r = h2.send_request(connect).await.unwrap();
        assert_eq!(r.status(), 200, "{r:?}");
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(hyper::upgrade::on(r).await.unwrap()),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        ws.send(Message::text("hello")).await.unwrap();
        ws.send(Message::binary(vec![1u8; 10_000])).await.unwrap();
        for want in [5, 10_000] {
            assert_eq!(ws.next().await.unwrap().unwrap().len(), want);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    // 11. A download of 48 MiB the client leaves after 1 MiB (it resets
    // the connection): spliced too, and the line counts what got out,
    // more than the client read (socket buffers) and less than all.
    let huge_len = 48 << 20;
    put_file(&h.url, &pid, &o.token, "huge.bin", vec![9u8; huge_len]).await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(paddr).await.unwrap();
        let req = format!(
            "GET /{pid}/files/huge.bin HTTP/1.1\r\nHost: {paddr}\r\n\
             Authorization: Bearer {}\r\n\r\n",
            o.token
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut first = vec![0u8; 1 << 20];
        s.read_exact(&mut first).await.unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        s.set_zero_linger().unwrap();
    }

    eventually("eleven lines written", Duration::from_secs(10), || async {
        log.written() == 11
    })
    .await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains(&o.token), "a token in the log:\n{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let host = h.id.to_string();
    let expect = [
        (
            "GET",
            format!("/{pid}/port/{hport}/x?a=1&token=REDACTED"),
            303,
            true,
            false,
            "HTTP/1.1",
        ),
        ("POST", format!("/{pid}/exec"), 200, true, false, "HTTP/1.1"),
        ("GET", "/nope".to_string(), 400, false, false, "HTTP/1.1"),
        (
            "GET",
            format!("/{pid}/port/{hport}/"),
            401,
            false,
            false,
            "HTTP/1.1",
        ),
        (
            "GET",
            format!("/{pid}/port/{hport}/y"),
            200,
            true,
            true,
            "HTTP/2",
        ),
        (
            "GET",
            format!("/{pid}/port/{silent_port}/z"),
            499,
            true,
            true,
            "HTTP/2",
        ),
        (
            "GET",
            format!("/{pid}/port/{silent_port}/w"),
            499,
            true,
            false,
            "HTTP/1.1",
        ),
        (
            "GET",
            format!("/{pid}/files/big.bin"),
            200,
            true,
            false,
            "HTTP/1.1",
        ),
        (
            "GET",
            format!("/{pid}/port/{echo}/ws"),
            101,
            true,
            false,
            "HTTP/1.1",
        ),
        (
            "CONNECT",
            format!("/{pid}/port/{echo}/h2ws"),
            200,
            true,
            true,
            "HTTP/2",
        ),
        (
            "GET",
            format!("/{pid}/files/huge.bin"),
            200,
            true,
            false,
            "HTTP/1.1",
        ),
    ];
    assert_eq!(lines.len(), expect.len(), "{text}");
    for (line, (method, target, status, via_host, tls, version)) in lines.iter().zip(expect) {
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["target"], target.as_str(), "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["tls"], tls, "{line}");
        assert_eq!(line["version"], version, "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        // Answers count their body's bytes and the time to its end;
        // requests the client left before an answer have neither.
        let micros = line["micros"].as_u64().unwrap();
        if status == 499 {
            assert!(line.get("bytes").is_none(), "{line}");
            assert!(line.get("total_micros").is_none(), "{line}");
        } else {
            assert!(line["bytes"].as_u64().is_some(), "{line}");
            assert!(line["total_micros"].as_u64().unwrap() >= micros, "{line}");
        }
        if status == 400 || status == 401 {
            // The JSON refusal.
            assert!(line["bytes"].as_u64().unwrap() > 20, "{line}");
        }
        if target.ends_with("/big.bin") {
            assert_eq!(line["bytes"], 300_000, "{line}");
        }
        if target.ends_with("/huge.bin") {
            let n = line["bytes"].as_u64().unwrap();
            assert!((1 << 20..huge_len as u64).contains(&n), "{line}");
        }
        if target.ends_with("ws") {
            // 5 + 10,000 bytes echoed, with frame headers and the close.
            let n = line["bytes"].as_u64().unwrap();
            assert!((10_005..10_100).contains(&n), "{line}");
            assert!(line["total_micros"].as_u64().unwrap() >= 200_000, "{line}");
        }
        let project = if target == "/nope" {
            Value::Null
        } else {
            json!(pid)
        };
        assert_eq!(
            line.get("project").cloned().unwrap_or(Value::Null),
            project,
            "{line}"
        );
        let to = if via_host { json!(host) } else { Value::Null };
        assert_eq!(
            line.get("host").cloned().unwrap_or(Value::Null),
            to,
            "{line}"
        );
    }
    proxy_metrics_show(
        &ingress,
        &[
            "cocalc_proxy_access_log_lines_total{result=\"written\"} 11",
            "cocalc_proxy_access_log_lines_total{result=\"dropped\"} 0",
        ],
    );

    served.abort();
    served_tls.abort();
    h.stop.send(true).unwrap();
    let _ = h.task.await;
    m.shut_down().await;
}

/// Checks what `headers_server` answered to a request for `app.example`
/// through the HTTPS ingress: the scheme, the client's Host and address,
/// and no token.
fn seen_over_https(status: u16, body: Vec<u8>) {
    let seen = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{seen}");
    for line in [
        "x-forwarded-proto: https",
        "x-forwarded-host: app.example",
        "x-forwarded-for: 127.0.0.1",
    ] {
        assert!(seen.lines().any(|l| l == line), "{line} in {seen}");
    }
    assert!(!seen.contains("authorization"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_over_https_answers_as_over_http() {
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let IngressFixture {
        m,
        admin,
        h,
        ingress,
        audit,
    } = ingress_fixture(dir.path(), |_| {}).await;
    let (cert, key, root) = self_signed(dir.path());
    let certs = cocalc_proxy::tls::CertStore::load(cocalc_proxy::tls::TlsFiles {
        cert_file: cert.clone(),
        key_file: key.clone(),
    })
    .unwrap();
    let tls = certs
        .server_config(cocalc_proxy::tls::HttpVersions::default())
        .unwrap();
    let (paddr, served) = serve_tls_on_loopback(&ingress, tls).await;

    let c = user_with_projects(&m, &admin, &["p"]).await;
    let o = c.open("p").await.unwrap();
    let pid = o.project.to_string();
    let request = |method: &str, path: String, body: String| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "app.example")
            .header("authorization", format!("Bearer {}", o.token))
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };

    // Exec (a request with a body): the same answer as directly.
    let argv = ["sh", "-c", "printf 'a\\0b'; echo err >&2; exit 4"];
    let direct = exec(&h.url, &pid, &o.token, &argv).await;
    assert_eq!(direct.0, 200, "{direct:?}");
    let (status, _, body) = https(
        paddr,
        &root,
        request(
            "POST",
            format!("/{pid}/exec"),
            json!({ "argv": argv }).to_string(),
        ),
    )
    .await;
    assert_eq!(
        (status, serde_json::from_slice::<Value>(&body).unwrap()),
        direct
    );

    // A server in the project sees the scheme, the client's Host and
    // address, and no token.
    let hport = headers_server().await;
    let (status, _, body) = https(
        paddr,
        &root,
        request("GET", format!("/{pid}/port/{hport}/h"), String::new()),
    )
    .await;
    seen_over_https(status, body);

    // A WebSocket through TLS to an echo server in the project.
    let echo_port = websocket_echo_server().await;
    let req = ws_request(format!("wss://{paddr}/{pid}/port/{echo_port}/"), &o.token);
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls_connect(paddr, &root).await)
        .await
        .unwrap();
    let frames = [
        Message::Text("over tls".into()),
        Message::Binary((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>().into()),
    ];
    for f in &frames {
        echoed(&mut ws, f).await;
    }
    ws.close(None).await.unwrap();

    // HTTP/2, as browsers ask for it: the same answers, with the client's
    // `:authority` as its Host, many requests at once on one connection.
    let h2 = h2_connect(paddr, &root).await;
    let h2_request = |method: &str, path: String, body: String| {
        http::Request::builder()
            .method(method)
            .uri(format!("https://app.example{path}"))
            .header("authorization", format!("Bearer {}", o.token))
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };
    let h2_send = |req: http::Request<String>| {
        let mut h2 = h2.clone();
        async move {
            use http_body_util::BodyExt;
            let r = h2.send_request(req).await.unwrap();
            assert_eq!(r.version(), http::Version::HTTP_2);
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
            (status, body)
        }
    };
    let (status, body) = h2_send(h2_request(
        "POST",
        format!("/{pid}/exec"),
        json!({ "argv": argv }).to_string(),
    ))
    .await;
    assert_eq!(
        (status, serde_json::from_slice::<Value>(&body).unwrap()),
        direct
    );
    let mut at_once = tokio::task::JoinSet::new();
    for _ in 0..8 {
        at_once.spawn(h2_send(h2_request(
            "GET",
            format!("/{pid}/port/{hport}/h"),
            String::new(),
        )));
    }
    while let Some(answer) = at_once.join_next().await {
        let (status, body) = answer.unwrap();
        seen_over_https(status, body);
    }
    // Cookies come in several headers over HTTP/2: the token is found in
    // any of them, and the project's server gets the others in one.
    let cookie = cocalc_core::wire::token_cookie_name(o.project);
    let req = http::Request::builder()
        .uri(format!("https://app.example/{pid}/port/{hport}/h"))
        .header("cookie", "theme=dark")
        .header("cookie", format!("{cookie}={}", o.token))
        .header("cookie", "lang=en")
        .body(String::new())
        .unwrap();
    let (status, body) = h2_send(req).await;
    let seen = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{seen}");
    assert!(
        seen.lines().any(|l| l == "cookie: theme=dark; lang=en"),
        "{seen}"
    );
    // Refusals are the same too.
    let (status, body) = h2_send(h2_request(
        "GET",
        format!("/{}/exec", pid.to_uppercase()),
        String::new(),
    ))
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("bad_path"));
    let mut no_token = h2_request("GET", format!("/{pid}/port/{hport}/h"), String::new());
    no_token.headers_mut().remove("authorization");
    let (status, _) = h2_send(no_token).await;
    assert_eq!(status, 401);
    // A WebSocket on the same HTTP/2 connection (RFC 8441), to the echo
    // server in the project, while the connection serves requests too.
    let websocket = |token: Option<&str>| {
        let mut connect = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://app.example/{pid}/port/{echo_port}/"))
            .header("sec-websocket-version", "13");
        if let Some(t) = token {
            connect = connect.header("authorization", format!("Bearer {t}"));
        }
        let mut connect = connect.body(String::new()).unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        h2.clone().send_request(connect)
    };
    let r = websocket(Some(&o.token)).await.unwrap();
    assert_eq!(r.status(), 200, "{r:?}");
    let stream = hyper::upgrade::on(r).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    for f in &frames {
        echoed(&mut ws, f).await;
        let (status, body) = h2_send(h2_request(
            "GET",
            format!("/{pid}/port/{hport}/h"),
            String::new(),
        ))
        .await;
        seen_over_https(status, body);
    }
    ws.close(None).await.unwrap();
    // Without a token it is refused like any request.
    let r = websocket(None).await.unwrap();
    assert_eq!(r.status(), 401, "{r:?}");

    // A client that offers only HTTP/1.1 gets it on the same listener.
    let tls = tls_connect_offering(paddr, &[&root], &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // Paths under /.cocalc/ that the proxy does not serve (here: none)
    // are bad paths, as over HTTP.
    let (status, _, body) = https(
        paddr,
        &root,
        request("GET", "/.cocalc/tunnel".into(), String::new()),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // Plain HTTP to the TLS port: no answer, the connection closed, and
    // a refusal counted and audited.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(paddr).await.unwrap();
        s.write_all(format!("GET /{pid}/exec HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the connection is closed");
        assert!(
            !got.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    eventually(
        "the handshake refusal counted",
        Duration::from_secs(5),
        || async {
            ingress
                .refusals()
                .tls_handshake
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        },
    )
    .await;
    assert!(audit
        .records()
        .iter()
        .any(|r| r.reason == "tls_handshake" && r.detail.contains("127.0.0.1")));

    // A renewed certificate: new connections get it after a reload, a
    // connection opened before goes on with the old one.
    let before = tls_connect(paddr, &root).await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(before))
            .await
            .unwrap();
    tokio::spawn(conn);
    let renewed = tempfile::tempdir().unwrap();
    let (new_cert, new_key, new_root) = self_signed(renewed.path());
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert!(certs.reload().unwrap());
    let after = tls_connect_trusting(paddr, &[&root, &new_root]).await;
    let presented = after.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(presented, new_root);
    let r = send
        .send_request(request(
            "GET",
            format!("/{pid}/port/{hport}/h"),
            String::new(),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the connection from before still serves");

    served.abort();
    h.stop.send(true).unwrap();
    let _ = h.task.await;
    m.shut_down().await;
}

/// Backups end to end, on two hosts sharing one rustic repository: a host
/// backs a project up when asked (once per change), restores one path
/// from its own snapshot, refuses bad requests; then the host is lost
/// with its disk, the project is placed on the other host, and comes back
/// whole there from the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_bring_a_project_back_on_another_host() {
    use cocalc_client::HostClient;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("backup-password"), "correct horse\n").unwrap();
    let backup = format!(
        "[backup]\nrepository = \"{}\"\npassword_file = \"{}\"\n",
        d.path().join("repo").display(),
        d.path().join("backup-password").display()
    );
    let Solo { m, h: a, c, o } = one_host_one_project(d.path(), &backup).await;
    let admin = MasterClient::new(&m.url, &m.admin);
    let on_a = HostClient::new(url_of(&o), o.project, o.token.clone());

    on_a.write("notes.txt", b"v1".to_vec()).await.unwrap();
    on_a.mkdir("data").await.unwrap();
    on_a.write("data/table.csv", b"a,b\n".to_vec())
        .await
        .unwrap();
    let b1 = on_a.backup().await.unwrap();
    assert_eq!(
        (b1.project, b1.host, b1.files),
        (o.project, a.id, 2),
        "{b1:?}"
    );
    assert_eq!(
        on_a.backup().await.unwrap(),
        b1,
        "nothing changed: same backup"
    );
    on_a.write("notes.txt", b"v2".to_vec()).await.unwrap();
    on_a.remove("data/table.csv").await.unwrap();
    // Asked twice at once, the host backs the change up once.
    let (b2, again) = tokio::join!(on_a.backup(), on_a.backup());
    let b2 = b2.unwrap();
    assert_eq!(again.unwrap(), b2);
    assert_ne!(b2.id, b1.id);
    assert!(b2.snapshot > b1.snapshot);
    assert_eq!(on_a.backups().await.unwrap(), vec![b1.clone(), b2.clone()]);

    // One path back from the first backup, with the project running; the
    // host still has that snapshot, so nothing is fetched.
    let (status, _) = exec(&url_of(&o), &o.project.to_string(), &o.token, &["true"]).await;
    assert_eq!(status, 200);
    let r = on_a
        .restore_backup(&b1.id, Some("notes.txt"))
        .await
        .unwrap();
    assert_eq!(
        (r.backup.snapshot.as_str(), r.fetched),
        (b1.snapshot.as_str(), false)
    );
    let before = r.previous.expect("the state before is kept");
    assert!(before >= b2.snapshot, "{before} vs {}", b2.snapshot);
    assert_eq!(on_a.read("notes.txt").await.unwrap(), b"v1");
    assert!(on_a.read("data/table.csv").await.is_err(), "only the path");

    // Bad requests change nothing.
    let e = on_a.restore_backup("0123abcd", None).await.unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (404, "backup_not_found"),
        "{e:?}"
    );
    let e = on_a
        .restore_backup(&b1.id, Some("../escape"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "path_escape", "{e:?}");
    let e = on_a.restore_backup("../../x", None).await.unwrap_err();
    assert_eq!(e.status, 400, "{e:?}");
    let e = on_a.restore_backup(&b1.id, None).await.unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (409, "project_running"),
        "{e:?}"
    );
    assert_eq!(on_a.read("notes.txt").await.unwrap(), b"v1");

    // Host A is lost with its disk; the project is placed on B.
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let b = start_host_with(&d.path().join("b"), &m.url, &t, &backup).await;
    admin.drain(a.id, true).await.unwrap();
    let _ = a.stop.send(true);
    let _ = a.task.await;
    std::fs::remove_dir_all(d.path().join("h")).unwrap();
    let placed = admin.replace(&o.project.to_string()).await.unwrap();
    assert_eq!(placed.decision.host, b.id);
    let o2 = c.open("p").await.unwrap();
    assert_eq!(url_of(&o2), b.url);
    let on_b = HostClient::new(url_of(&o2), o2.project, o2.token.clone());
    assert_eq!(
        on_b.backups().await.unwrap(),
        vec![b1.clone(), b2.clone()],
        "B sees A's backups"
    );
    let _ = on_b.stop().await;
    let r = on_b.restore_backup(&b2.id, None).await.unwrap();
    assert_eq!(
        (r.backup.snapshot.as_str(), r.fetched),
        (b2.snapshot.as_str(), true)
    );
    assert_eq!(on_b.read("notes.txt").await.unwrap(), b"v2");
    assert!(on_b.read("data/table.csv").await.is_err());
    // And one path from the older backup, which B fetches in turn (named
    // by the start of its id, as `cocalc project restore` allows).
    assert_eq!(b1.id.len(), 64, "{b1:?}");
    let r = on_b
        .restore_backup(&b1.id[..8], Some("data/table.csv"))
        .await
        .unwrap();
    assert!(r.fetched && r.previous.is_some(), "{r:?}");
    assert_eq!(on_b.read("data/table.csv").await.unwrap(), b"a,b\n");
    let (status, v) = exec(
        &url_of(&o2),
        &o2.project.to_string(),
        &o2.token,
        &["cat", "notes.txt"],
    )
    .await;
    assert_eq!((status, stdout(&v).as_str()), (200, "v2"), "{v}");
    let b3 = on_b.backup().await.unwrap();
    assert_eq!(b3.host, b.id);
    assert_eq!(on_b.backups().await.unwrap().len(), 3);

    let _ = b.stop.send(true);
    let _ = b.task.await;
    m.shut_down().await;
}

/// Scheduled backups: with `every_secs`, a host backs each changed
/// project up by itself, not an unchanged one again, and keeps what `keep`
/// says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_follow_changes_and_retention() {
    use cocalc_client::HostClient;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("pw"), "pw").unwrap();
    let mport = free_port();
    let backup = format!(
        "metrics_listen = \"127.0.0.1:{mport}\"\n\
         [backup]\nrepository = \"{}\"\npassword_file = \"{}\"\nevery_secs = 1\n\
         keep = {{ frequent = 2 }}\n",
        d.path().join("repo").display(),
        d.path().join("pw").display()
    );
    let Solo { m, h, o, .. } = one_host_one_project(d.path(), &backup).await;
    let on = HostClient::new(url_of(&o), o.project, o.token.clone());
    let mut seen = Vec::new();
    for round in 0..3 {
        on.write("f.txt", format!("round {round}").into_bytes())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let b = loop {
            let list = on.backups().await.unwrap();
            match list.last() {
                Some(b) if !seen.contains(&b.id) => break b.clone(),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no scheduled backup of round {round}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let r = d.path().join(format!("r{round}"));
        // The backup holds this round's content.
        let store = cocalc_storage::backup::RusticBackups::open_or_init(
            cocalc_storage::backup::RusticConfig::new(
                d.path().join("repo").to_string_lossy(),
                "pw",
            ),
        )
        .await
        .unwrap();
        cocalc_core::BackupStore::restore(&store, o.project, &b.id, &r)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("f.txt")).unwrap(),
            format!("round {round}")
        );
        seen.push(b.id);
    }
    // Unchanged: more rounds pass and nothing new is stored; retention
    // keeps the two newest.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ids: Vec<String> = on
        .backups()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(ids, seen[1..].to_vec());
    let text = reqwest::get(format!("http://127.0.0.1:{mport}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("cocalc_host_backups_stored_total 3\n"),
        "{text}"
    );
    assert!(
        text.contains("cocalc_host_backup_failures_total 0\n"),
        "{text}"
    );
    assert!(
        !text.contains("cocalc_host_backups_unchanged_total 0\n"),
        "{text}"
    );
    assert!(
        text.contains("cocalc_host_backup_last_success_timestamp_seconds "),
        "{text}"
    );

    let _ = h.stop.send(true);
    let _ = h.task.await;
    m.shut_down().await;
}

/// A second host (plain config) for `m`, up when this returns.
async fn second_host(m: &Master, admin: &MasterClient, dir: &Path) -> Host {
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let h = start_host_with(dir, &m.url, &t, "").await;
    eventually("two hosts up", Duration::from_secs(15), || async {
        admin.hosts().await.map(|v| v.len() == 2).unwrap_or(false)
    })
    .await;
    h
}

/// Waits for the latest move of `project` to finish and answers it.
async fn move_finished(admin: &MasterClient, project: &str) -> cocalc_core::MoveRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mv = admin.project_move(project).await.unwrap();
        if mv.phase.is_finished() {
            return mv;
        }
        assert!(Instant::now() < deadline, "move still {}: {mv:?}", mv.phase);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Moving a project: its files and its running state go to the other
/// host, the map flips with the next generation, the old host deletes its
/// copy and refuses the old tokens; the host calls of a move take the
/// master's tokens only; a move the target cannot take rolls back and
/// leaves both hosts as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_carry_a_project_to_another_host_or_roll_back() {
    use cocalc_client::HostClient;
    use cocalc_core::MovePhase;
    let d = tempfile::tempdir().unwrap();
    let Solo { m, h: a, c, o } = one_host_one_project(d.path(), "").await;
    let admin = MasterClient::new(&m.url, &m.admin);
    let pid = o.project.to_string();
    let on_a = HostClient::new(url_of(&o), o.project, o.token.clone());
    on_a.write("notes.txt", b"before the move".to_vec())
        .await
        .unwrap();
    on_a.mkdir("data").await.unwrap();
    on_a.write("data/big.bin", vec![7u8; 3 << 20])
        .await
        .unwrap();
    let (status, _) = exec(&url_of(&o), &pid, &o.token, &["true"]).await;
    assert_eq!(status, 200, "the project runs on A");

    // Refusals, before there is anywhere to go.
    let e = admin.move_project(&pid, None).await.unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (503, "no_eligible_host"),
        "{e:?}"
    );
    let e = admin.move_project(&pid, Some(a.id)).await.unwrap_err();
    assert_eq!(e.status, 409, "{e:?}");
    let e = c.move_project(&pid, None).await.unwrap_err();
    assert_eq!(e.status, 403, "users cannot move projects: {e:?}");
    let e = admin.project_move(&pid).await.unwrap_err();
    assert_eq!(e.status, 404, "{e:?}");
    // A user's admin-level token cannot make a move's host calls.
    let e = on_a.move_snapshot(true).await.unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (403, "master_only"), "{e:?}");
    let e = on_a.move_release().await.unwrap_err();
    assert_eq!(e.code, "master_only", "{e:?}");
    assert!(on_a.move_stream("x", None).await.is_err());
    assert_eq!(on_a.read("notes.txt").await.unwrap(), b"before the move");

    let b = second_host(&m, &admin, &d.path().join("b")).await;
    let e = admin
        .move_project(&pid, Some(HostId::new_v4([9; 16])))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409, "unknown target: {e:?}");

    // The move: placement picks B, the only other host.
    let begun = admin.move_project(&pid, None).await.unwrap();
    assert_eq!((begun.from, begun.to), (a.id, b.id));
    assert_eq!(begun.phase, MovePhase::Copying);
    let e = admin.move_project(&pid, None).await.unwrap_err();
    assert_eq!(e.status, 409, "one move at a time: {e:?}");
    let mv = move_finished(&admin, &pid).await;
    assert_eq!(mv.phase, MovePhase::Done, "{mv:?}");
    assert!(
        mv.was_running && mv.base.is_some() && mv.last.is_some(),
        "{mv:?}"
    );
    assert_eq!(mv.error, None);
    assert!(
        mv.started <= mv.stopped_at.unwrap() && mv.stopped_at <= mv.flipped_at,
        "{mv:?}"
    );

    let o2 = c.open("p").await.unwrap();
    assert_eq!((o2.host, url_of(&o2)), (b.id, b.url.clone()));
    assert_eq!(o2.generation, o.generation.next());
    let on_b = HostClient::new(url_of(&o2), o2.project, o2.token.clone());
    assert_eq!(
        on_b.status().await.unwrap().state,
        cocalc_core::ProjectState::Running,
        "it ran before, so it runs on B"
    );
    assert_eq!(on_b.read("notes.txt").await.unwrap(), b"before the move");
    assert_eq!(on_b.read("data/big.bin").await.unwrap(), vec![7u8; 3 << 20]);
    let snaps = on_b.snapshots().await.unwrap();
    assert!(
        snaps.iter().any(|s| Some(&s.name) == mv.last.as_ref()),
        "{snaps:?}"
    );
    let x = admin.explain(&pid).await.unwrap();
    assert_eq!(x.decision.host, b.id);
    // A deleted its copy and refuses the old placement's tokens.
    let a_home = d.path().join("h/projects").join(format!("project-{pid}"));
    assert!(!a_home.exists(), "{} is left", a_home.display());
    let (status, v) = exec(&url_of(&o), &pid, &o.token, &["true"]).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (409, Some("stale_generation")),
        "{v}"
    );

    // Back to A, which now holds a stale copy the move must not touch:
    // the target refuses the full copy, the move rolls back, B keeps the
    // project running and A's copy is as it was.
    std::fs::create_dir_all(&a_home).unwrap();
    std::fs::write(a_home.join("stale.txt"), b"keep me").unwrap();
    let begun = admin.move_project(&pid, Some(a.id)).await.unwrap();
    assert_eq!(begun.to, a.id);
    let mv = move_finished(&admin, &pid).await;
    assert_eq!(mv.phase, MovePhase::RolledBack, "{mv:?}");
    let why = mv.error.clone().unwrap();
    assert!(why.contains("volume_exists"), "{why}");
    assert_eq!(
        (mv.stopped_at, mv.flipped_at),
        (None, None),
        "never stopped"
    );
    assert_eq!(std::fs::read(a_home.join("stale.txt")).unwrap(), b"keep me");
    let o3 = c.open("p").await.unwrap();
    assert_eq!((o3.host, o3.generation), (b.id, o2.generation));
    assert_eq!(on_b.read("notes.txt").await.unwrap(), b"before the move");
    assert_eq!(
        on_b.status().await.unwrap().state,
        cocalc_core::ProjectState::Running
    );

    // Without the stale copy, a stopped project moves back and stays
    // stopped; what is written between the two copies arrives too.
    // The stale copy goes by the API; the live copy cannot.
    let e = admin.discard_copy(b.id, &pid).await.unwrap_err();
    assert_eq!(e.status, 409, "the live copy: {e:?}");
    let e = c.discard_copy(a.id, &pid).await.unwrap_err();
    assert_eq!(e.status, 403, "{e:?}");
    admin.discard_copy(a.id, &pid).await.unwrap();
    assert!(!a_home.exists(), "{}", a_home.display());
    assert_eq!(on_b.read("notes.txt").await.unwrap(), b"before the move");
    on_b.stop().await.unwrap();
    on_b.write("notes.txt", b"after".to_vec()).await.unwrap();
    let mv = move_with_a_write_between(&m, o.project, a.id, on_b.clone()).await;
    assert_eq!(mv.phase, MovePhase::Done, "{mv:?}");
    assert!(mv.base < mv.last && !mv.was_running, "{mv:?}");
    let o4 = c.open("p").await.unwrap();
    assert_eq!((o4.host, o4.generation), (a.id, o2.generation.next()));
    let on_a = HostClient::new(url_of(&o4), o4.project, o4.token.clone());
    assert_eq!(
        on_a.status().await.unwrap().state,
        cocalc_core::ProjectState::Stopped,
        "it was stopped, so it stays stopped"
    );
    assert_eq!(on_a.read("notes.txt").await.unwrap(), b"after");
    assert_eq!(
        on_a.read("between.txt").await.unwrap(),
        b"written during the copy"
    );
    let b_home = d.path().join("b/projects").join(format!("project-{pid}"));
    assert!(!b_home.exists());
    let metrics = cocalc_master::metrics::MasterMetrics::new(m.lib.clone()).render();
    for line in [
        "cocalc_master_moves_begun_total 3",
        "cocalc_master_moves_ended_total{outcome=\"done\"} 2",
        "cocalc_master_moves_ended_total{outcome=\"rolled_back\"} 1",
        "cocalc_master_moves_running 0",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    let _ = b.stop.send(true);
    let _ = b.task.await;
    let _ = a.stop.send(true);
    let _ = a.task.await;
    m.shut_down().await;
}

/// The master's own move steps, with a write into the project on the
/// source right after the full copy, so that the last copy has changes to
/// carry (an incremental stream on Btrfs).
struct WriteAfterFullCopy {
    inner: cocalc_master::moves::HostSteps,
    source: cocalc_client::HostClient,
}

#[async_trait::async_trait]
impl cocalc_placement::MoveSteps for WriteAfterFullCopy {
    async fn snapshot(
        &self,
        mv: &cocalc_core::MoveRecord,
        freeze: bool,
    ) -> Result<cocalc_core::moves::MoveSnapshot, cocalc_core::ApiError> {
        self.inner.snapshot(mv, freeze).await
    }

    async fn pull(
        &self,
        mv: &cocalc_core::MoveRecord,
        snapshot: &str,
        parent: Option<&str>,
        last: bool,
    ) -> Result<(), cocalc_core::ApiError> {
        self.inner.pull(mv, snapshot, parent, last).await?;
        if parent.is_none() {
            self.source
                .write("between.txt", b"written during the copy".to_vec())
                .await?;
        }
        Ok(())
    }

    async fn target_snapshots(
        &self,
        mv: &cocalc_core::MoveRecord,
    ) -> Result<Vec<String>, cocalc_core::ApiError> {
        self.inner.target_snapshots(mv).await
    }

    async fn thaw(
        &self,
        mv: &cocalc_core::MoveRecord,
        restart: bool,
    ) -> Result<(), cocalc_core::ApiError> {
        self.inner.thaw(mv, restart).await
    }

    async fn discard(&self, mv: &cocalc_core::MoveRecord) -> Result<(), cocalc_core::ApiError> {
        self.inner.discard(mv).await
    }

    async fn release(
        &self,
        mv: &cocalc_core::MoveRecord,
        generation: cocalc_core::Generation,
    ) -> Result<(), cocalc_core::ApiError> {
        self.inner.release(mv, generation).await
    }

    async fn start(
        &self,
        mv: &cocalc_core::MoveRecord,
        generation: cocalc_core::Generation,
    ) -> Result<(), cocalc_core::ApiError> {
        self.inner.start(mv, generation).await
    }
}

/// Moves `project` to `to` through the master's coordinator with
/// [`WriteAfterFullCopy`] (`source` reaches the project where it is now,
/// with write access); answers the finished move.
async fn move_with_a_write_between(
    m: &Master,
    project: cocalc_core::ProjectId,
    to: HostId,
    source: cocalc_client::HostClient,
) -> cocalc_core::MoveRecord {
    let now = m.lib.now();
    let at = m.lib.store().placement(project).await.unwrap().unwrap();
    let decision =
        cocalc_core::PlacementDecision::new(to, "test", "a move with a write", vec![], vec![]);
    let mv = cocalc_core::MoveRecord::new(project, at.host, at.generation, decision, now);
    let mv = m.lib.moves().begin(mv).await.unwrap();
    let steps = WriteAfterFullCopy {
        inner: cocalc_master::moves::HostSteps::new(m.lib.clone()),
        source,
    };
    m.lib.moves().run(mv, &steps).await.unwrap()
}

/// Evacuating a host: it is drained and every project on it moves to the
/// other host, with its files; refusals for users and unknown hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuating_a_host_moves_every_project_off_it() {
    use cocalc_client::HostClient;
    let d = tempfile::tempdir().unwrap();
    let Solo { m, h: a, c, o } = one_host_one_project(d.path(), "").await;
    let admin = MasterClient::new(&m.url, &m.admin);
    c.create_project(&CreateProjectRequest::new("q"))
        .await
        .unwrap();
    let oq = c.open("q").await.unwrap();
    assert_eq!(oq.host, a.id);
    for (open, text) in [(&o, "in p"), (&oq, "in q")] {
        HostClient::new(url_of(open), open.project, open.token.clone())
            .write("where.txt", text.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let b = second_host(&m, &admin, &d.path().join("b")).await;

    let e = c.evacuate(a.id).await.unwrap_err();
    assert_eq!(e.status, 403, "{e:?}");
    let e = admin.evacuate(HostId::new_v4([9; 16])).await.unwrap_err();
    assert_eq!(e.status, 404, "{e:?}");
    // With B draining there is nowhere to go: refused, and A not drained.
    admin.drain(b.id, true).await.unwrap();
    let e = admin.evacuate(a.id).await.unwrap_err();
    assert_eq!(e.status, 409, "{e:?}");
    let hosts = admin.hosts().await.unwrap();
    let a_state = hosts.iter().find(|h| h.id == a.id).unwrap().state;
    assert_eq!(a_state, cocalc_core::HostState::Up);
    admin.drain(b.id, false).await.unwrap();

    let ev = admin.evacuate(a.id).await.unwrap();
    let mut expected = vec![o.project, oq.project];
    expected.sort();
    let mut got = ev.projects.clone();
    got.sort();
    assert_eq!((ev.host, got), (a.id, expected));
    let hosts = admin.hosts().await.unwrap();
    let state_of_a = hosts.iter().find(|h| h.id == a.id).unwrap().state;
    assert_eq!(state_of_a, cocalc_core::HostState::Draining);
    for p in &ev.projects {
        eventually("moved off A", Duration::from_secs(30), || async {
            admin
                .explain(&p.to_string())
                .await
                .is_ok_and(|x| x.decision.host == b.id)
        })
        .await;
        let mv = move_finished(&admin, &p.to_string()).await;
        assert_eq!(
            (mv.phase, mv.from, mv.to),
            (cocalc_core::MovePhase::Done, a.id, b.id),
            "{mv:?}"
        );
    }
    for (name, text) in [("p", "in p"), ("q", "in q")] {
        let open = c.open(name).await.unwrap();
        assert_eq!(open.host, b.id);
        let on_b = HostClient::new(url_of(&open), open.project, open.token.clone());
        assert_eq!(on_b.read("where.txt").await.unwrap(), text.as_bytes());
    }
    // Nothing new lands on the drained host.
    c.create_project(&CreateProjectRequest::new("r"))
        .await
        .unwrap();
    assert_eq!(c.open("r").await.unwrap().host, b.id);

    // Re-placing projects away from a host that still listens. Project r
    // was used there (its access is cached, its generation seen): the
    // push channel's `Fence` makes the host refuse the old placement's
    // token at once, not after the cache's TTL. Project s never was: the
    // host asks the master, which says it is not placed there, and the
    // host refuses with that (403), its link to the master still up.
    let or = c.open("r").await.unwrap();
    let (status, v) = exec(&url_of(&or), &or.project.to_string(), &or.token, &["true"]).await;
    assert_eq!(status, 200, "{v}");
    c.create_project(&CreateProjectRequest::new("s"))
        .await
        .unwrap();
    let os = c.open("s").await.unwrap();
    assert_eq!((or.host, os.host), (b.id, b.id));
    admin.drain(a.id, false).await.unwrap();
    admin.drain(b.id, true).await.unwrap();
    for o in [&or, &os] {
        let placed = admin.replace(&o.project.to_string()).await.unwrap();
        assert_eq!(placed.decision.host, a.id);
    }
    eventually(
        "B refuses r's old placement",
        Duration::from_secs(10),
        || {
            let (url, token, id) = (url_of(&or), or.token.clone(), or.project.to_string());
            async move {
                let (status, v) = exec(&url, &id, &token, &["true"]).await;
                status == 409 && v["code"] == "stale_generation"
            }
        },
    )
    .await;
    let (status, v) = exec(&url_of(&os), &os.project.to_string(), &os.token, &["true"]).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("master_refused")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("not placed on host"),
        "{v}"
    );
    // The link stayed up: r's new placement on A works, and B still
    // serves a project it holds (p, opened again after the re-placements).
    let on_b_p = c.open("p").await.unwrap();
    let (status, v) = exec(
        &url_of(&on_b_p),
        &on_b_p.project.to_string(),
        &on_b_p.token,
        &["true"],
    )
    .await;
    assert_eq!((on_b_p.host, status), (b.id, 200), "{v}");

    let _ = b.stop.send(true);
    let _ = b.task.await;
    let _ = a.stop.send(true);
    let _ = a.task.await;
    m.shut_down().await;
}
