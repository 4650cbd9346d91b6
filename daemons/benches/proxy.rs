//! Requests/s and latency of the same small HTTP server inside a project,
//! reached three ways with the same load generator in one run: directly on
//! the host, through `cocalc-proxy`, and through nginx configured as a
//! plain reverse proxy (`bench/nginx.conf.template`).
//!
//! Run: `cargo bench -p cocalc-daemons --bench proxy` (`-- --secs 3
//! --conns 32`). Needs nginx (`apt-get install nginx`); without it the
//! nginx row is skipped and says so. Goals: proxy ≥ 1.0× nginx req/s with
//! p99 ≤ nginx's.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, spawn, Daemon};

fn arg(name: &str, default: f64) -> f64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The "server inside the project": answers every request with a small body.
async fn backend(port: u16) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"hello from the project\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn load(url: &str, token: &str, conns: usize, secs: f64) -> (f64, Duration, Duration) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (url, token) = (url.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
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
    (rate, p(0.5), p(0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = arg("--secs", 3.0);
    let conns = arg("--conns", 32.0) as usize;
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let mcfg = w(
        "m.toml",
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("m").display()
        ),
    );
    let (_m, murl) = spawn(env!("CARGO_BIN_EXE_cocalc-master"), &mcfg, "listening on");
    let admin = std::fs::read_to_string(dir.path().join("m/admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let master = cocalc_client::MasterClient::new(&murl, &admin);
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
    let (_h, hurl) = spawn(env!("CARGO_BIN_EXE_cocalc-host"), &hcfg, "listening on");
    while master.hosts().await.map(|h| h.is_empty()).unwrap_or(true) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pcfg = w(
        "p.toml",
        format!("listen = \"127.0.0.1:0\"\nmaster_url = \"{murl}\"\napi_key = \"{admin}\"\nproject_rps = 1000000\nclient_rps = 1000000\n"),
    );
    let (_p, purl) = spawn(env!("CARGO_BIN_EXE_cocalc-proxy"), &pcfg, "listening on");

    let user = master.create_user("bench").await.unwrap();
    let me = cocalc_client::MasterClient::new(&murl, user["api_key"].as_str().unwrap());
    me.create_project(&cocalc_core::wire::CreateProjectRequest::new("p"))
        .await
        .unwrap();
    let open = me.open("p").await.unwrap();
    me.start("p").await.unwrap();
    let bport = free_port();
    tokio::spawn(backend(bport));
    let path = format!("/{}/port/{bport}/", open.project);

    let nginx = Command::new("nginx").arg("-v").output().is_ok();
    let mut nginx_daemon = None;
    let mut nginx_url = None;
    if nginx {
        let nport = free_port();
        let conf = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bench/nginx.conf.template"
        ))
        .unwrap()
        .replace("@HOST_PORT@", &hport.to_string())
        .replace("@LISTEN_PORT@", &nport.to_string());
        std::fs::create_dir_all(dir.path().join("nginx/tmp")).unwrap();
        let conf_path = dir.path().join("nginx/nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .args([
                "-p",
                dir.path().join("nginx").to_str().unwrap(),
                "-c",
                conf_path.to_str().unwrap(),
                "-g",
                "daemon off;",
            ])
            .spawn()
            .unwrap();
        nginx_daemon = Some(Daemon(child));
        nginx_url = Some(format!("http://127.0.0.1:{nport}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    println!("{conns} connections, {secs} s each, GET {path} (a small body from a server in the project)");
    let mut rows = Vec::new();
    for (name, base) in [
        ("direct to the host", Some(hurl.clone())),
        ("via cocalc-proxy", Some(purl.clone())),
        ("via nginx", nginx_url.clone()),
    ] {
        let Some(base) = base else {
            println!("{name:<22} skipped: nginx not installed (apt-get install nginx)");
            continue;
        };
        let url = format!("{base}{path}");
        let _ = load(&url, &open.token, 2, 0.3).await; // warm up
        let (rate, p50, p99) = load(&url, &open.token, conns, secs).await;
        println!("{name:<22} {rate:>9.0} req/s   p50 {p50:>9.2?}   p99 {p99:>9.2?}");
        rows.push((name, rate, p99));
    }
    if let (Some(p), Some(n)) = (
        rows.iter().find(|r| r.0 == "via cocalc-proxy"),
        rows.iter().find(|r| r.0 == "via nginx"),
    ) {
        println!();
        println!("proxy / nginx req/s = {:.2}x   (goal >= 1.0)", p.1 / n.1);
        println!(
            "proxy p99 {:?} vs nginx p99 {:?}   (goal: proxy <= nginx)",
            p.2, n.2
        );
    }
    if let (Some(p), Some(d)) = (
        rows.iter().find(|r| r.0 == "via cocalc-proxy"),
        rows.iter().find(|r| r.0 == "direct to the host"),
    ) {
        println!("proxy / direct req/s = {:.2}x", p.1 / d.1);
    }
    drop(nginx_daemon);
}
