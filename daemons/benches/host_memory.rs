//! Resident memory of the `cocalc-host` daemon holding 1,000 registered,
//! stopped projects (goal ≤ 50 MB), measured on real processes: a
//! `cocalc-master` and one `cocalc-host` (process runner, directory
//! storage), 1,000 projects created, opened and touched through the data
//! plane (so each has a volume, a generation fence and an ACL entry on the
//! host), none started.
//!
//! Run: `cargo bench -p cocalc-daemons --bench host_memory` (`-- --projects 200` for a quick run).

use std::time::{Duration, Instant};

mod common;
use common::spawn;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--projects")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let (_master, murl, master) =
        common::spawn_master(env!("CARGO_BIN_EXE_cocalc-master"), dir.path());
    let token = master.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let hcfg = dir.path().join("h.toml");
    std::fs::write(
        &hcfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmaster_url = \"{murl}\"\ndata_dir = \"{}\"\nbootstrap_token = \"{token}\"\n",
            dir.path().join("h").display()
        ),
    )
    .unwrap();
    let (host, _) = spawn(env!("CARGO_BIN_EXE_cocalc-host"), &hcfg, "listening on");
    let host_pid = host.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while master.hosts().await.map(|h| h.is_empty()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "host never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = cocalc_daemons::rss_kib(host_pid);
    let user = master.create_user("bench").await.unwrap();
    let me = cocalc_client::MasterClient::new(&murl, user["api_key"].as_str().unwrap());
    let t = Instant::now();
    for i in 0..n {
        let name = format!("p{i}");
        me.create_project(&cocalc_core::wire::CreateProjectRequest::new(name.clone()))
            .await
            .unwrap();
        let o = me.open(&name).await.unwrap();
        let cocalc_core::HostEndpoint::Url(url) = &o.endpoint else {
            panic!("url endpoint")
        };
        let h = cocalc_client::HostClient::new(url.clone(), o.project, o.token);
        h.list("").await.unwrap();
    }
    let elapsed = t.elapsed();
    let loaded = cocalc_daemons::rss_kib(host_pid);
    println!(
        "{n} projects created, opened and touched in {:.1} s",
        elapsed.as_secs_f64()
    );
    println!("cocalc-host RSS: idle {:.1} MiB, with {n} registered stopped projects {:.1} MiB   (goal <= 50 MB at 1,000)",
        idle as f64 / 1024.0, loaded as f64 / 1024.0);
}
