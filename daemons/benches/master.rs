//! The master daemon under load, measured in one run against anchors from
//! the same run:
//!
//! 1. `open project` requests/s over HTTP (16 concurrent keep-alive
//!    connections, no pipelining) and p50/p99 latency, vs raw Ed25519
//!    signatures/s on this machine (one thread, measured right before and
//!    right after, the ratio against their mean) — goal ≥ 0.5×;
//! 2. the master's CPU while 10,000 registered hosts send 2,000 signed
//!    keepalives/s — goal < 20 % of one core — as HTTP requests, and as
//!    frames on the hosts' push channels (what hosts do while connected). CPU is read from
//!    `/proc/<pid>/task/*/schedstat` of the master process only (the load
//!    generator runs in this process).
//!
//! The load generator shares the machine with the master, so it is kept
//! cheap: kept-alive HTTP/1.1 connections, one request at a time each
//! (prepared request bytes for open, bare hyper for keepalives).
//!
//! Run: `cargo bench -p cocalc-daemons --bench master`
//! (`-- --hosts 2000 --secs 2` for a quicker run).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocalc_auth::host_auth::sign_request;
use cocalc_auth::paserk;
use cocalc_core::wire::{KeepaliveRequest, RegisterHostRequest};
use cocalc_core::{Capacity, Health, HostEndpoint, HostId, Load, Region, Timestamp};
use ed25519_dalek::{Signer, SigningKey};

fn arg(name: &str, default: f64) -> f64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// The first three fields of `/proc/loadavg` (other work on the machine
/// shows in every figure; printed with them).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    )
}

fn start(dir: &Path) -> (Daemon, String, String) {
    use std::io::{BufRead, BufReader};
    let cfg = dir.join("m.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocalc-master"))
        .args(["-c", cfg.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let l = lines.next().expect("master exited").unwrap();
        if let Some(u) = l.strip_prefix("cocalc-master: listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let admin = std::fs::read_to_string(dir.join("data/admin.key"))
        .unwrap()
        .trim()
        .to_string();
    (Daemon(child), url, admin)
}

fn host(i: usize) -> (HostId, SigningKey) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    (HostId::new_v4(b), SigningKey::from_bytes(&seed))
}

/// One kept-alive HTTP/1.1 connection to the master (bare hyper: the
/// cheapest client, so the load generator leaves the CPU to the master).
struct Conn {
    tx: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    authority: String,
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let authority = url.trim_start_matches("http://").to_string();
        let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn { tx, authority }
    }

    /// Sends one request; returns the status and the body.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, bytes::Bytes) {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        self.tx.ready().await.unwrap();
        let resp = self.tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }
}

/// The cheapest client for the open-project loop: one kept-alive TCP
/// connection, a request written as prepared bytes, the response read up
/// to its `content-length` (the master still parses and answers full
/// HTTP/1.1; only the load generator's share of the two cores shrinks).
struct RawConn {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn open(url: &str) -> RawConn {
        let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        RawConn {
            tcp,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Writes `request`, reads one response; returns its status.
    async fn round_trip(&mut self, request: &[u8]) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.tcp.write_all(request).await.unwrap();
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "master closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&self.buf[..end]).unwrap();
            let status = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if self.buf.len() >= end + 4 + len {
                assert_eq!(self.buf.len(), end + 4 + len, "one response at a time");
                return status;
            }
        }
    }
}

/// Raw Ed25519 signatures per second on one thread, for `secs`.
fn sign_rate(secs: f64) -> f64 {
    let sk = SigningKey::from_bytes(&[1; 32]);
    let msg = [0u8; 400];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..100 {
            std::hint::black_box(sk.sign(std::hint::black_box(&msg)));
        }
        n += 100;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let load_at_start = load_average();
    let n_hosts = arg("--hosts", 10_000.0) as usize;
    let secs = arg("--secs", 3.0);
    let dir = tempfile::tempdir().unwrap();
    let (daemon, url, admin) = start(dir.path());
    let pid = daemon.0.id();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    // Register the fleet (bootstrap token per host, as in production).
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..n_hosts {
        let (http, url, admin, sem) = (http.clone(), url.clone(), admin.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let tok: serde_json::Value = http
                .post(format!("{url}/v1/admin/bootstrap-tokens"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let (id, key) = host(i);
            let req = RegisterHostRequest::new(
                id,
                paserk::encode_public(&key.verifying_key()),
                tok["token"].as_str().map(str::to_string),
                Region(["eu", "us"][i % 2].into()),
                HostEndpoint::Url(format!("http://10.0.{}.{}:8443", i / 250, i % 250)),
                Capacity {
                    project_slots: 100,
                    disk_free_bytes: 500 << 30,
                    disk_total_bytes: 1000 << 30,
                    ..Capacity::default()
                },
            );
            let s = http
                .post(format!("{url}/v1/hosts/register"))
                .json(&req)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(s, 200);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "registered {n_hosts} hosts in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rss_after_registration = cocalc_daemons::rss_kib(pid);

    // A user and a project, opened once so it is placed.
    let user: serde_json::Value = http
        .post(format!("{url}/v1/users"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"name": "bench"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = user["api_key"].as_str().unwrap().to_string();
    let p: serde_json::Value = http
        .post(format!("{url}/v1/projects"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"name": "p"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let open_path = format!("/v1/projects/{}/open", p["id"].as_str().unwrap());
    let auth = format!("Bearer {key}");
    let (s, body) = Conn::open(&url)
        .await
        .send("POST", &open_path, &[("authorization", &auth)], Vec::new())
        .await;
    assert_eq!(s, 200);
    println!("open answer: {} bytes", body.len());

    // 1. open project throughput and latency, between two anchor runs.
    let sign_before = sign_rate(1.0);
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(RawConn::open(&url).await);
    }
    let request: Arc<[u8]> = format!(
        "POST {open_path} HTTP/1.1\r\nhost: {}\r\nauthorization: {auth}\r\ncontent-length: 0\r\n\r\n",
        url.trim_start_matches("http://")
    )
    .into_bytes()
    .into();
    let open_cpu0 = cpu_ns(pid);
    let gen_cpu0 = cpu_ns(std::process::id());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for mut conn in conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                assert_eq!(conn.round_trip(&request).await, 200);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let open_rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    let open_cpu_us = (cpu_ns(pid) - open_cpu0) as f64 / 1e3 / lat.len() as f64;
    let gen_cpu_us = (cpu_ns(std::process::id()) - gen_cpu0) as f64 / 1e3 / lat.len() as f64;
    lat.sort();
    let sign_after = sign_rate(1.0);
    let sign_rate = (sign_before + sign_after) / 2.0;

    // 2. keepalive CPU at 2,000/s: 20 kept-alive connections, each sending
    //    one signed keepalive every 10 ms for its share of the hosts.
    let rate = 2_000u64;
    let senders = 20u64;
    let sent = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..senders {
        conns.push(Conn::open(&url).await);
    }
    let cpu0 = cpu_ns(pid);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(senders as f64 / rate as f64));
            let mut i = w;
            while t0.elapsed() < Duration::from_secs_f64(secs) {
                tick.tick().await;
                let (id, key) = host(i % n_hosts);
                i += senders as usize;
                let path = format!("/v1/hosts/{id}/keepalive");
                let body = serde_json::to_vec(&KeepaliveRequest::new(
                    id,
                    Health::Ok,
                    Capacity::default(),
                    Load::default(),
                ))
                .unwrap();
                let signed = sign_request(&key, id, "POST", &path, now(), &body);
                let mut headers = vec![("content-type", "application/json")];
                headers.extend(signed.iter().map(|(k, v)| (*k, v.as_str())));
                let (s, _) = conn.send("POST", &path, &headers, body).await;
                assert_eq!(s, 200);
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let ka = sent.load(Ordering::Relaxed) as f64 / wall;

    // 3. The same 2,000 keepalives/s as frames on the hosts' push channels
    //    (one WebSocket per host, opened with a signed upgrade).
    let ws_hosts = n_hosts;
    let mut senders = Vec::with_capacity(ws_hosts);
    let opened = Instant::now();
    let ws_url = url.replacen("http://", "ws://", 1);
    for i in 0..ws_hosts {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let (id, key) = host(i);
        let path = format!("/v1/hosts/{id}/push");
        let mut req = format!("{ws_url}{path}").into_client_request().unwrap();
        for (k, v) in sign_request(&key, id, "GET", &path, now(), b"") {
            req.headers_mut().insert(k, v.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let (tx, mut rx) = ws.split();
        // Drain the lease frames.
        tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        senders.push((id, tx));
    }
    println!(
        "opened {ws_hosts} push channels in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    let frames = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_ns(pid);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut i = 0usize;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        tick.tick().await;
        for _ in 0..rate / 100 {
            use futures_util::SinkExt;
            let (id, tx) = &mut senders[i % ws_hosts];
            i += 1;
            let msg = cocalc_core::wire::HostMessage::Keepalive {
                keepalive: KeepaliveRequest::new(
                    *id,
                    Health::Ok,
                    Capacity::default(),
                    Load::default(),
                ),
            };
            let text = serde_json::to_string(&msg).unwrap();
            tx.send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
                .await
                .unwrap();
            frames.fetch_add(1, Ordering::Relaxed);
        }
    }
    let ws_wall = t0.elapsed().as_secs_f64();
    let ws_cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let ws_rate = frames.load(Ordering::Relaxed) as f64 / ws_wall;
    let rss_with_channels = cocalc_daemons::rss_kib(pid);

    println!();
    println!(
        "load average (1, 5, 15 min) at start {load_at_start}, at end {}",
        load_average()
    );
    println!(
        "raw ed25519 sign (1 thread)            {sign_rate:>10.0} /s   (before {sign_before:.0}, after {sign_after:.0})"
    );
    println!(
        "open project over HTTP (16 conns)      {open_rate:>10.0} /s   p50 {:?}  p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "  ratio open / raw sign = {:.3}x   (goal >= 0.5)",
        open_rate / sign_rate
    );
    println!(
        "  master CPU per open {open_cpu_us:.1} µs = {:.2} raw signatures (less sensitive to other load than the ratio)",
        open_cpu_us * sign_rate / 1e6
    );
    println!("  load generator CPU per open {gen_cpu_us:.1} µs (same two cores)");
    println!(
        "keepalives: {ka:.0}/s from {n_hosts} hosts for {wall:.1} s; master CPU {cpu:.2} s = {:.1} % of one core   (goal < 20 %)",
        100.0 * cpu / wall
    );
    println!(
        "keepalives on push channels: {ws_rate:.0}/s from {ws_hosts} hosts for {ws_wall:.1} s; master CPU {ws_cpu:.2} s = {:.1} % of one core   (goal < 20 %)",
        100.0 * ws_cpu / ws_wall
    );
    println!(
        "master RSS with {ws_hosts} hosts holding push channels: {:.1} MiB",
        rss_with_channels as f64 / 1024.0
    );
    println!(
        "master RSS with {n_hosts} registered hosts: {:.1} MiB (after the load: {:.1} MiB)   (goal <= 300 MB at 10,000)",
        rss_after_registration as f64 / 1024.0,
        cocalc_daemons::rss_kib(pid) as f64 / 1024.0
    );
    drop(daemon);
}
