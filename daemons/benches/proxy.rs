//! The same server inside a project, reached four ways with the same load
//! generator in one run: directly on the host, through `cocalc-proxy`,
//! through nginx configured as a plain reverse proxy
//! (`bench/nginx.conf.template`), through both over TLS (a self-signed
//! certificate, rustls in the proxy, OpenSSL in nginx; keep-alive
//! connections, so few handshakes; WebSockets over `wss://`), and through `cocalc-proxy` to a
//! *hidden* host over its reverse tunnel. An anchor row, "via bare splice
//! relay", puts the least a relaying process can do in front of the host:
//! a TCP relay that splices bytes with no HTTP at all (this bench run
//! again with `--splice-relay`); its bytes/s against direct is what any
//! relay costs on the machine, and the proxy's against it what the proxy
//! adds. Measured:
//!
//! * small requests: req/s, p50 and p99;
//! * HTTP download bytes/s (64 MiB responses, 1 and 4 at a time);
//! * WebSocket bytes/s (1 MiB binary messages from the server).
//!
//! Over TLS, the proxy and nginx are also measured with HTTP/2 as a
//! browser speaks it (the "HTTP/2" rows): every client of the run shares
//! one connection, each request a stream of its own (the 4 downloads of
//! "x4" too). The other TLS rows stay HTTP/1.1, a connection per client.
//! WebSockets are HTTP/1.1 on every row but the proxy's HTTP/2 one, where
//! the WebSocket rides an HTTP/2 connection (RFC 8441, extended CONNECT,
//! as Chrome and Firefox use it when offered); nginx's HTTP/2 row keeps
//! an HTTP/1.1 WebSocket.
//!
//! Run: `cargo bench -p cocalc-daemons --bench proxy` (`-- --secs 3
//! --conns 32`, `--only tunnel` for the routes whose name contains
//! "tunnel" (`--only direct,proxy,bare` for any of several), `--rounds 3` to measure every route three times in turn and
//! compare medians; `--callgrind` for instructions per request of the
//! proxy and nginx, `--callgrind-host` for the host's too; `--access-log`
//! to have the proxy and nginx each write an access log). Needs nginx
//! (`apt-get install nginx`); without it the nginx row is skipped and
//! says so. Goals: proxy ≥ 1.0× nginx req/s with
//! p99 ≤ nginx's; WebSocket and tunnel bytes/s ≥ 0.8× direct.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{
    callgrind_dump, callgrind_ir, callgrind_zero, cpu_time, free_port, own_cpu_time, spawn,
    spawn_under, Daemon,
};

/// The bench's self-signed certificate (DER), which its clients trust.
static ROOT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// A client builder trusting [`ROOT`] (HTTP/1.1: the bench builds
/// reqwest without HTTP/2; the HTTP/2 rows use [`H2`]).
fn client() -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder();
    match ROOT.get() {
        Some(der) => b.add_root_certificate(reqwest::Certificate::from_der(der).unwrap()),
        None => b,
    }
}

/// Whether a route is measured over HTTP/2 (by its name).
fn is_h2(route: &str) -> bool {
    route.ends_with("HTTP/2")
}

/// A request sender on one HTTP/2 connection.
type H2Send = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// One HTTP/2 connection (hyper's client over TLS, `h2` by ALPN), which
/// any number of tasks send requests on at once. When the server closes
/// it (nginx does after `keepalive_requests`, 1,000 by default), the
/// first task to notice opens a new one and the requests that did not
/// make it are sent again on that, as a browser does; the time that takes
/// counts in their latency.
#[derive(Clone)]
struct H2 {
    url: std::sync::Arc<str>,
    /// The connection, and how many came before it.
    conn: std::sync::Arc<std::sync::Mutex<(u64, H2Send)>>,
    /// Held while a new connection is opened, so only one is.
    reconnecting: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl H2 {
    /// Connects to the authority of `url` (`https://IP:PORT/…`).
    async fn connect(url: &str) -> H2 {
        H2 {
            url: url.into(),
            conn: std::sync::Arc::new(std::sync::Mutex::new((0, Self::open(url).await))),
            reconnecting: Default::default(),
        }
    }

    /// A new connection to the authority of `url`.
    async fn open(url: &str) -> H2Send {
        let uri: hyper::Uri = url.parse().unwrap();
        let tls = tls_connect_alpn(uri.authority().unwrap().as_str(), &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "{url}");
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .adaptive_window(true)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    /// `GET url` with the bearer `token`: the answer, checked to be a 200
    /// over HTTP/2.
    async fn get(&mut self, url: &str, token: &str) -> hyper::Response<hyper::body::Incoming> {
        for _ in 0..3 {
            let (generation, mut send) = self.conn.lock().unwrap().clone();
            let req = hyper::Request::get(url)
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let sent = async {
                send.ready().await?;
                send.send_request(req).await
            };
            match sent.await {
                Ok(r) => {
                    assert_eq!(r.status(), 200, "{url}");
                    assert_eq!(r.version(), hyper::Version::HTTP_2, "{url}");
                    return r;
                }
                // Closed by the server: a new connection, once.
                Err(_) => {
                    let _one = self.reconnecting.lock().await;
                    if self.conn.lock().unwrap().0 == generation {
                        let fresh = Self::open(&self.url).await;
                        *self.conn.lock().unwrap() = (generation + 1, fresh);
                    }
                }
            }
        }
        panic!("{url}: three HTTP/2 connections in a row failed the same request");
    }
}

/// Bytes of `body` read until it ends or `deadline` passes.
async fn drain(body: hyper::body::Incoming, deadline: Option<Instant>) -> usize {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    n
}

/// A TLS connection to `addr` (an IP and port) trusting only [`ROOT`].
async fn tls_connect(addr: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_alpn(addr, &[]).await
}

/// [`tls_connect`] offering the application protocols `alpn`.
async fn tls_connect_alpn(
    addr: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ROOT.get().unwrap().clone(),
        ))
        .unwrap();
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
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::from(addr.ip()), tcp)
        .await
        .unwrap()
}

fn arg(name: &str, default: f64) -> f64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Size of one `/big` response.
const BIG: usize = 64 << 20;
/// Size of one WebSocket message from `/ws`.
const WS_MSG: usize = 1 << 20;

/// The "server inside the project": `/big` answers 64 MiB, `/ws` is a
/// WebSocket that sends 1 MiB binary messages until the client leaves,
/// anything else a small body.
async fn backend(port: u16) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let big = bytes::Bytes::from(vec![7u8; BIG]);
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let big = big.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let big = big.clone();
                async move {
                    let body = match req.uri().path() {
                        "/big" => big,
                        "/ws" => return Ok(ws_upgrade(req)),
                        _ => bytes::Bytes::from_static(b"hello from the project\n"),
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(body),
                    ))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// Accepts a WebSocket and floods it with binary messages.
fn ws_upgrade(
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    tokio::spawn(async move {
        let Ok(io) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(io),
            Role::Server,
            None,
        )
        .await;
        let msg = bytes::Bytes::from(vec![9u8; WS_MSG]);
        while ws.send(Message::Binary(msg.clone())).await.is_ok() {}
    });
    hyper::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", key)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

/// HTTP download rate: `streams` clients each fetching `/big` again and
/// again for `secs` (over HTTP/2 if `h2`: streams of one connection);
/// bytes/s over all.
async fn download(url: &str, token: &str, streams: usize, secs: f64, h2: bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let shared = if h2 {
        Some(H2::connect(url).await)
    } else {
        None
    };
    for _ in 0..streams {
        let (url, token) = (url.to_string(), token.to_string());
        if let Some(mut conn) = shared.clone() {
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    let r = conn.get(&url, &token).await;
                    n += drain(r.into_body(), Some(deadline)).await;
                }
                n
            }));
            continue;
        }
        tasks.push(tokio::spawn(async move {
            let c = client().build().unwrap();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let mut r = c.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(r.status(), 200, "{url}");
                while let Some(chunk) = r.chunk().await.unwrap() {
                    n += chunk.len();
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// WebSocket receive rate from `/ws` for `secs`, bytes/s.
async fn websocket(url: &str, token: &str, secs: f64) -> f64 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = url.starts_with("https://");
    let mut req = url
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if tls {
        let authority = req.uri().authority().unwrap().to_string();
        let stream = tls_connect(&authority).await;
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        receive(ws, secs).await
    } else {
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        receive(ws, secs).await
    }
}

/// [`websocket`] on an HTTP/2 connection (RFC 8441: extended CONNECT):
/// a GET of `url` first, so the client has the server's settings (which
/// allow extended CONNECT), then `CONNECT {url}ws` with `:protocol =
/// websocket` on the same connection.
async fn websocket_h2(url: &str, token: &str, secs: f64) -> f64 {
    let h2 = H2::connect(url).await;
    drain(h2.clone().get(url, token).await.into_body(), None).await;
    let (_, mut send) = h2.conn.lock().unwrap().clone();
    let mut req = hyper::Request::connect(format!("{url}ws"))
        .header("authorization", format!("Bearer {token}"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200, "{url}ws over HTTP/2");
    let stream = hyper::upgrade::on(r).await.unwrap();
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    receive(ws, secs).await
}

/// Bytes/s received on `ws` over `secs`.
async fn receive<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, secs: f64) -> f64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        match ws.next().await {
            Some(Ok(m)) => n += m.len(),
            other => panic!("websocket ended: {other:?}"),
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn mib(bps: f64) -> String {
    format!("{:>8.0} MiB/s", bps / (1 << 20) as f64)
}

/// `conns` clients sending small requests for `secs` (each on a
/// connection of its own; over HTTP/2 if `h2`, all on one connection):
/// requests per second, p50, p99 and the number of requests sent.
async fn load(
    url: &str,
    token: &str,
    conns: usize,
    secs: f64,
    h2: bool,
) -> (f64, Duration, Duration, usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    let shared = if h2 {
        Some(H2::connect(url).await)
    } else {
        None
    };
    for _ in 0..conns {
        let (url, token) = (url.to_string(), token.to_string());
        if let Some(mut conn) = shared.clone() {
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = conn.get(&url, &token).await;
                    drain(r.into_body(), None).await;
                    lat.push(t.elapsed());
                }
                lat
            }));
            continue;
        }
        tasks.push(tokio::spawn(async move {
            let c = client().pool_max_idle_per_host(1).build().unwrap();
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = c.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(r.status(), 200, "{url}");
                let _ = r.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    (rate, p(0.5), p(0.99), lat.len())
}

/// `--splice-relay PORT TARGET`: this bench run again as the anchor row
/// "via bare splice relay", the least any relaying process can do: it
/// accepts on 127.0.0.1:PORT, connects each client to TARGET and splices
/// the two sockets both ways (`cocalc_client::splice`, as the proxy does
/// for bodies and WebSockets), with no HTTP, no routing, no tokens. Its
/// bytes/s against direct is what a relay costs on this machine; the
/// proxy's against it is what the proxy adds.
async fn splice_relay(port: u16, target: String) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let mut moved = (0, 0);
            if let Ok(s) = cocalc_client::splice::Splicer::new() {
                let _ = s.run(&client, &upstream, &mut moved).await;
            }
        });
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--splice-relay") {
        let port = args[i + 1].parse().unwrap();
        splice_relay(port, args[i + 2].clone()).await;
        return;
    }
    let secs = arg("--secs", 3.0);
    let conns = arg("--conns", 32.0) as usize;
    let rounds = arg("--rounds", 1.0).max(1.0) as usize;
    // `--callgrind`: run the proxy and nginx under valgrind's callgrind
    // and count the instructions each executes per small request, which
    // is repeatable where timings on shared cores are not.
    // `--callgrind-host`: the same, with the host under callgrind too, so
    // "direct" counts the host's own relay (every route crosses the host,
    // which is slower then, and the relays in front of it wait more).
    let callgrind_host = std::env::args().any(|a| a == "--callgrind-host");
    let callgrind = callgrind_host || std::env::args().any(|a| a == "--callgrind");
    let dir = tempfile::tempdir().unwrap();
    // `--callgrind-out DIR` keeps the profiles of the measured requests
    // there, for `callgrind_annotate`.
    let cg_dir = std::env::args()
        .skip_while(|a| a != "--callgrind-out")
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    let cg_out = format!("--callgrind-out-file={}/callgrind.%p", cg_dir.display());
    let valgrind: Vec<&str> = if callgrind {
        vec!["valgrind", "--tool=callgrind", &cg_out]
    } else {
        Vec::new()
    };
    let w = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (_m, murl, master) = common::spawn_master(env!("CARGO_BIN_EXE_cocalc-master"), dir.path());
    let token = master.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let hport = free_port();
    let hcfg = w(
        "h.toml",
        format!(
            "listen = \"127.0.0.1:{hport}\"\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\nbootstrap_token = \"{token}\"\nidle_timeout_secs = 0\n",
            dir.path().join("h").display()
        ),
    );
    let (host_daemon, hurl) = spawn_under(
        if callgrind_host { &valgrind } else { &[] },
        env!("CARGO_BIN_EXE_cocalc-host"),
        &hcfg,
        "listening on",
    );
    while master.hosts().await.map(|h| h.is_empty()).unwrap_or(true) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pport = free_port();
    let pkey = master.create_proxy_key("bench").await.unwrap().api_key;
    // TLS for the proxy and nginx alike: a self-signed certificate.
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = w("tls.crt", ck.cert.pem());
    let key = w("tls.pem", ck.key_pair.serialize_pem());
    let _ = ROOT.set(ck.cert.der().to_vec());
    let ptls = free_port();
    // `--access-log`: the proxy and nginx each write one, to measure
    // what it costs them.
    let (proxy_log, nginx_log) = if std::env::args().any(|a| a == "--access-log") {
        (
            format!(
                "access_log = \"{}\"\n",
                dir.path().join("proxy-access.log").display()
            ),
            dir.path().join("nginx-access.log").display().to_string(),
        )
    } else {
        (String::new(), "off".to_string())
    };
    let pcfg = w(
        "p.toml",
        format!(
            "listen = \"127.0.0.1:{pport}\"\nmaster_url = \"{murl}\"\napi_key = \"{pkey}\"\n\
             project_rps = 1000000\nclient_rps = 1000000\ntls_listen = \"127.0.0.1:{ptls}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{proxy_log}",
            cert.display(),
            key.display()
        ),
    );
    let (proxy_daemon, purl) = spawn_under(
        &valgrind,
        env!("CARGO_BIN_EXE_cocalc-proxy"),
        &pcfg,
        "listening on",
    );
    // A hidden host: no listening socket, served through the proxy's tunnel.
    let token2 = master.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let tcfg = w(
        "t.toml",
        format!(
            "tunnel_url = \"{purl}\"\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\nbootstrap_token = \"{token2}\"\nidle_timeout_secs = 0\n",
            dir.path().join("t").display()
        ),
    );
    let (_t, _) = spawn(env!("CARGO_BIN_EXE_cocalc-host"), &tcfg, "hidden");
    let hosts = loop {
        let h = master.hosts().await.unwrap_or_default();
        if h.len() == 2 {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let visible = hosts.iter().find(|h| !h.endpoint.is_tunnel()).unwrap().id;
    let hidden = hosts.iter().find(|h| h.endpoint.is_tunnel()).unwrap().id;

    let user = master.create_user("bench").await.unwrap();
    let me = cocalc_client::MasterClient::new(&murl, user["api_key"].as_str().unwrap());
    me.create_project(&cocalc_core::wire::CreateProjectRequest::new("p"))
        .await
        .unwrap();
    me.create_project(&cocalc_core::wire::CreateProjectRequest::new("q"))
        .await
        .unwrap();
    // p on the visible host, q on the hidden one.
    master.drain(hidden, true).await.unwrap();
    let open = me.open("p").await.unwrap();
    master.drain(hidden, false).await.unwrap();
    master.drain(visible, true).await.unwrap();
    let open_q = me.open("q").await.unwrap();
    master.drain(visible, false).await.unwrap();
    assert_eq!(open.host, visible);
    assert_eq!(open_q.host, hidden);
    me.start("p").await.unwrap();
    let t0 = Instant::now();
    while me.start("q").await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the tunnel never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bport = free_port();
    tokio::spawn(backend(bport));
    let path = format!("/{}/port/{bport}/", open.project);
    let path_q = format!("/{}/port/{bport}/", open_q.project);

    let nginx = Command::new("nginx").arg("-v").output().is_ok();
    let mut nginx_daemon: Option<Daemon> = None;
    let mut nginx_url = None;
    let mut nginx_tls_url = None;
    if nginx {
        let nport = free_port();
        let ntls = free_port();
        let conf = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bench/nginx.conf.template"
        ))
        .unwrap()
        .replace("@HOST_PORT@", &hport.to_string())
        .replace("@LISTEN_PORT@", &nport.to_string())
        .replace("@TLS_PORT@", &ntls.to_string())
        .replace("@CERT@", cert.to_str().unwrap())
        .replace("@KEY@", key.to_str().unwrap())
        .replace("@ACCESS_LOG@", &nginx_log);
        std::fs::create_dir_all(dir.path().join("nginx/tmp")).unwrap();
        let conf_path = dir.path().join("nginx/nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        // Under callgrind nginx runs as one process (no master), so the
        // process counted is the one serving.
        let (cmd, globals) = match valgrind.split_first() {
            Some((vg, args)) => {
                let mut c = Command::new(vg);
                c.args(args).arg("nginx");
                (c, "daemon off; master_process off;")
            }
            None => (Command::new("nginx"), "daemon off;"),
        };
        let mut cmd = cmd;
        let child = cmd
            .args([
                "-p",
                dir.path().join("nginx").to_str().unwrap(),
                "-c",
                conf_path.to_str().unwrap(),
                "-g",
                globals,
            ])
            .spawn()
            .unwrap();
        nginx_daemon = Some(Daemon(child));
        nginx_url = Some(format!("http://127.0.0.1:{nport}"));
        nginx_tls_url = Some(format!("https://127.0.0.1:{ntls}"));
        tokio::time::sleep(Duration::from_millis(if callgrind { 3000 } else { 300 })).await;
    }

    // The anchor relay (see `splice_relay`), in front of the host as the
    // proxy and nginx are. Not under callgrind: it has no HTTP to count.
    let rport = free_port();
    let splice_daemon = Daemon(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--splice-relay",
                &rport.to_string(),
                &format!("127.0.0.1:{hport}"),
            ])
            .spawn()
            .unwrap(),
    );
    while std::net::TcpStream::connect(("127.0.0.1", rport)).is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("{conns} connections, {secs} s each, GET {path} (a small body from a server in the project)");
    // Each route, and the process in the middle whose CPU time per
    // request is measured (none for direct).
    let proxy_pid = Some(proxy_daemon.0.id());
    let host_pid_raw = host_daemon.0.id();
    let host_pid = Some(host_pid_raw);
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let nginx_pid = nginx_daemon.as_ref().map(|d| d.0.id());
    let routes = [
        (
            "direct to the host",
            Some(format!("{hurl}{path}")),
            &open.token,
            callgrind_host.then_some(host_pid).flatten(),
        ),
        (
            "via cocalc-proxy",
            Some(format!("{purl}{path}")),
            &open.token,
            proxy_pid,
        ),
        (
            "via bare splice relay",
            Some(format!("http://127.0.0.1:{rport}{path}")),
            &open.token,
            (!callgrind).then_some(splice_daemon.0.id()),
        ),
        (
            "via nginx",
            nginx_url.as_ref().map(|n| format!("{n}{path}")),
            &open.token,
            nginx_pid,
        ),
        (
            "via tunnel (hidden)",
            Some(format!("{purl}{path_q}")),
            &open_q.token,
            proxy_pid,
        ),
        (
            "via cocalc-proxy TLS",
            Some(format!("https://127.0.0.1:{ptls}{path}")),
            &open.token,
            proxy_pid,
        ),
        (
            "via nginx TLS",
            nginx_tls_url.as_ref().map(|n| format!("{n}{path}")),
            &open.token,
            nginx_pid,
        ),
        (
            "via cocalc-proxy HTTP/2",
            Some(format!("https://127.0.0.1:{ptls}{path}")),
            &open.token,
            proxy_pid,
        ),
        (
            "via nginx HTTP/2",
            nginx_tls_url.as_ref().map(|n| format!("{n}{path}")),
            &open.token,
            nginx_pid,
        ),
    ];
    // `--only tunnel` (a substring of the route names; several separated
    // by commas) measures just those.
    let only = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .unwrap_or_default();
    let routes: Vec<_> = routes
        .into_iter()
        .filter(|r| only.split(',').any(|o| r.0.contains(o)))
        .collect();
    if callgrind {
        instructions_per_request(&routes, conns, secs).await;
        return;
    }
    // Rounds measure every route in turn, so a slow moment of the machine
    // (2 shared cores) hits all routes alike; the summary takes medians.
    let mut req_runs: Vec<Vec<(f64, Duration)>> = vec![Vec::new(); routes.len()];
    // CPU time of the middle process per request, µs.
    let mut cpu_runs: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let mut byte_runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); routes.len()];
    for round in 1..=rounds {
        if rounds > 1 {
            println!();
            println!("round {round} of {rounds}");
        }
        for (i, (name, url, token, relay)) in routes.iter().enumerate() {
            let Some(url) = url else {
                println!("{name:<24} skipped: nginx not installed (apt-get install nginx)");
                continue;
            };
            let h2 = is_h2(name);
            let _ = load(url, token, 2, 0.3, h2).await; // warm up
            let before = relay.map(cpu_time);
            // Where the rest of the machine's time goes: the host, and this
            // process (load generator and the server in the project).
            let (host_before, own_before) = (cpu_time(host_pid_raw), own_cpu_time());
            let t = Instant::now();
            let (rate, p50, p99, _) = load(url, token, conns, secs, h2).await;
            let wall = t.elapsed().as_secs_f64();
            let per_req = |d: Duration| d.as_secs_f64() * 1e6 / (rate * wall);
            let host_us = per_req(cpu_time(host_pid_raw) - host_before);
            let own_us = per_req(own_cpu_time() - own_before);
            let cpu = match (relay, before) {
                (Some(pid), Some(b)) => {
                    let us = per_req(cpu_time(*pid) - b);
                    cpu_runs[i].push(us);
                    let busy = (us + host_us + own_us) * rate / 1e6 / cores;
                    format!(
                        "   relay CPU {us:>5.1} µs/req (host {host_us:.1}, client+backend \
                         {own_us:.1}; cores {:.0}% busy)",
                        busy * 100.0
                    )
                }
                _ => format!("   (host CPU {host_us:.1} µs/req, client+backend {own_us:.1})"),
            };
            println!("{name:<24} {rate:>9.0} req/s   p50 {p50:>9.2?}   p99 {p99:>9.2?}{cpu}");
            req_runs[i].push((rate, p99));
        }
        println!(
            "bytes/s: GET big (64 MiB responses) x1 and x4, and a WebSocket of 1 MiB messages"
        );
        for (i, (name, url, token, relay)) in routes.iter().enumerate() {
            let Some(url) = url else { continue };
            // CPU per byte of the one-stream download, per process.
            let before = (relay.map(cpu_time), cpu_time(host_pid_raw), own_cpu_time());
            let t = Instant::now();
            let h2 = is_h2(name);
            let one = download(&format!("{url}big"), token, 1, secs, h2).await;
            let gib = one * t.elapsed().as_secs_f64() / f64::from(1u32 << 30);
            let ms_per_gib = |d: Duration| d.as_secs_f64() * 1e3 / gib;
            let relay_cpu = match (relay, before.0) {
                (Some(pid), Some(b)) => format!("relay {:.0}, ", ms_per_gib(cpu_time(*pid) - b)),
                _ => String::new(),
            };
            let cpu = format!(
                "CPU ms/GiB at x1: {relay_cpu}host {:.0}, client+backend {:.0}",
                ms_per_gib(cpu_time(host_pid_raw) - before.1),
                ms_per_gib(own_cpu_time() - before.2),
            );
            let four = download(&format!("{url}big"), token, 4, secs, h2).await;
            // The proxy's HTTP/2 row opens its WebSocket on an HTTP/2
            // connection (RFC 8441), as Chrome and Firefox do there.
            let ws = if *name == "via cocalc-proxy HTTP/2" {
                websocket_h2(url, token, secs).await
            } else {
                websocket(&format!("{url}ws"), token, secs).await
            };
            println!(
                "{name:<24} x1 {}   x4 {}   websocket {}   ({cpu})",
                mib(one),
                mib(four),
                mib(ws)
            );
            byte_runs[i].push((one, four, ws));
        }
    }
    fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    let mut rows = Vec::new();
    let mut bytes_rows = Vec::new();
    for (i, (name, _, _, _)) in routes.iter().enumerate() {
        if req_runs[i].is_empty() {
            continue;
        }
        rows.push((
            *name,
            median(req_runs[i].iter().map(|r| r.0).collect()),
            median(req_runs[i].iter().map(|r| r.1).collect()),
        ));
        bytes_rows.push((
            *name,
            median(byte_runs[i].iter().map(|r| r.0).collect()),
            median(byte_runs[i].iter().map(|r| r.1).collect()),
            median(byte_runs[i].iter().map(|r| r.2).collect()),
        ));
    }
    println!();
    if rounds > 1 {
        println!("medians of {rounds} rounds:");
        for ((name, rate, p99), (_, one, four, ws)) in rows.iter().zip(&bytes_rows) {
            println!(
                "{name:<24} {rate:>9.0} req/s   p99 {p99:>9.2?}   x1 {}   x4 {}   websocket {}",
                mib(*one),
                mib(*four),
                mib(*ws)
            );
        }
        println!();
    }
    let cpu = |name: &str| {
        let i = routes.iter().position(|r| r.0 == name)?;
        (!cpu_runs[i].is_empty()).then(|| median(cpu_runs[i].clone()))
    };
    for (proxy, nginx, over) in [
        ("via cocalc-proxy", "via nginx", ""),
        ("via cocalc-proxy TLS", "via nginx TLS", " over TLS"),
        (
            "via cocalc-proxy HTTP/2",
            "via nginx HTTP/2",
            " over HTTP/2",
        ),
    ] {
        let (Some(p), Some(n)) = (
            rows.iter().find(|r| r.0 == proxy),
            rows.iter().find(|r| r.0 == nginx),
        ) else {
            continue;
        };
        println!(
            "proxy / nginx req/s{over} = {:.2}x   (goal >= 1.0)",
            p.1 / n.1
        );
        if let (Some(pc), Some(nc)) = (cpu(proxy), cpu(nginx)) {
            println!(
                "relay CPU per request{over}: proxy {pc:.1} µs, nginx {nc:.1} µs = {:.2}x   \
                 (median; on 2 shared cores req/s follows this)",
                pc / nc
            );
        }
        println!(
            "proxy p99 {:?} vs nginx p99 {:?}{over}   (goal: proxy <= nginx)",
            p.2, n.2
        );
    }
    if let (Some(p), Some(d)) = (
        rows.iter().find(|r| r.0 == "via cocalc-proxy"),
        rows.iter().find(|r| r.0 == "direct to the host"),
    ) {
        println!("proxy / direct req/s = {:.2}x", p.1 / d.1);
    }
    if let (Some(t), Some(d)) = (
        rows.iter().find(|r| r.0 == "via tunnel (hidden)"),
        rows.iter().find(|r| r.0 == "direct to the host"),
    ) {
        println!("tunnel / direct req/s = {:.2}x", t.1 / d.1);
    }
    if let (Some(p), Some(b)) = (
        rows.iter().find(|r| r.0 == "via cocalc-proxy"),
        rows.iter().find(|r| r.0 == "via bare splice relay"),
    ) {
        println!("proxy / bare splice relay req/s = {:.2}x", p.1 / b.1);
    }
    let d = bytes_rows
        .iter()
        .find(|r| r.0 == "direct to the host")
        .copied();
    for name in [
        "via cocalc-proxy",
        "via nginx",
        "via tunnel (hidden)",
        "via cocalc-proxy TLS",
        "via nginx TLS",
        "via cocalc-proxy HTTP/2",
        "via nginx HTTP/2",
    ] {
        if let (Some(r), Some(d)) = (bytes_rows.iter().find(|r| r.0 == name), d) {
            println!(
                "{name} / direct bytes/s: x1 {:.2}x   x4 {:.2}x   websocket {:.2}x   (goal >= 0.8)",
                r.1 / d.1,
                r.2 / d.2,
                r.3 / d.3
            );
        }
    }
    // The anchor: what relaying itself costs, and what the proxy adds.
    let bare = bytes_rows
        .iter()
        .find(|r| r.0 == "via bare splice relay")
        .copied();
    if let (Some(b), Some(d)) = (bare, d) {
        println!(
            "bare splice relay / direct bytes/s: x1 {:.2}x   x4 {:.2}x   websocket {:.2}x   \
             (the least any relay costs here)",
            b.1 / d.1,
            b.2 / d.2,
            b.3 / d.3
        );
    }
    for name in ["via cocalc-proxy", "via tunnel (hidden)"] {
        if let (Some(r), Some(b)) = (bytes_rows.iter().find(|r| r.0 == name), bare) {
            println!(
                "{name} / bare splice relay bytes/s: x1 {:.2}x   x4 {:.2}x   websocket {:.2}x",
                r.1 / b.1,
                r.2 / b.2,
                r.3 / b.3
            );
        }
    }
    drop(nginx_daemon);
    drop(splice_daemon);
}

/// The `--callgrind` report: for each route with a process in the middle
/// (running under callgrind), the user-space instructions that process
/// executes per small request, and the proxy's count against nginx's. With
/// `--callgrind-host`, "direct" counts the host, relaying to the server in
/// the project.
async fn instructions_per_request(
    routes: &[(&str, Option<String>, &String, Option<u32>)],
    conns: usize,
    secs: f64,
) {
    println!("user-space instructions per request of the process in the middle (callgrind):");
    let mut counts = Vec::new();
    for (name, url, token, relay) in routes {
        let (Some(url), Some(pid)) = (url, relay) else {
            continue;
        };
        // Warm up: pooled connections, caches, lazy statics.
        let h2 = is_h2(name);
        let _ = load(url, token, conns, 2.0, h2).await;
        callgrind_zero(*pid);
        let (_, _, _, n) = load(url, token, conns, secs, h2).await;
        let ir = callgrind_ir(*pid) as f64 / n as f64;
        callgrind_dump(*pid);
        println!("{name:<24} {ir:>9.0} instructions/request   ({n} requests)");
        counts.push((*name, ir));
    }
    let find = |n: &str| counts.iter().find(|c| c.0 == n).map(|c| c.1);
    if let (Some(p), Some(n)) = (find("via cocalc-proxy"), find("via nginx")) {
        println!("proxy / nginx instructions per request = {:.2}x", p / n);
    }
    if let (Some(p), Some(n)) = (find("via cocalc-proxy TLS"), find("via nginx TLS")) {
        println!(
            "over TLS: proxy / nginx instructions per request = {:.2}x",
            p / n
        );
    }
    if let (Some(p), Some(n)) = (find("via cocalc-proxy HTTP/2"), find("via nginx HTTP/2")) {
        println!(
            "over HTTP/2: proxy / nginx instructions per request = {:.2}x",
            p / n
        );
    }
}
