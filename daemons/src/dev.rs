//! `cocalc dev up`: a whole federation on this machine in one process — a
//! master and N hosts on loopback, a demo user and project — until Ctrl-C.
//!
//! Backends: with root, podman and Btrfs tools present, each host gets a
//! loop-mounted Btrfs pool and runs projects in podman containers (the
//! default image is built from busybox on first use); otherwise plain
//! directories and plain processes (no isolation: development only).
//! Ctrl-C stops every project, every host and the master, and removes the
//! loop pools, so no container, mount or loop device is left behind.
//!
//! With a proxy, `hidden_hosts` more hosts run hidden: no listening socket,
//! reachable only through the reverse tunnel each dials to the proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cocalc_core::wire::CreateProjectRequest;
use cocalc_core::{HostEndpoint, HostState};
use cocalc_host::daemon::{self as host_daemon, HostConfig};
use cocalc_master::daemon::{self as master_daemon, DaemonConfig};
use cocalc_master::MasterClient;
use tokio::sync::watch;

/// What `dev up` runs.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State directory (reused across runs for the master and host identities).
    pub dir: PathBuf,
    /// Master port on 127.0.0.1.
    pub port: u16,
    /// Number of hosts.
    pub hosts: usize,
    /// `auto`, `process` or `podman`.
    pub backend: String,
    /// Port of the ingress proxy on 127.0.0.1 (0: no proxy).
    pub proxy_port: u16,
    /// Hidden hosts besides `hosts`: they listen nowhere and serve through
    /// a reverse tunnel to the proxy (needs the proxy).
    pub hidden_hosts: usize,
    /// Port of the proxy's SSH ingress on 127.0.0.1 (0: no SSH; needs the
    /// proxy).
    pub ssh_port: u16,
}

/// Why `dev up` failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DevError(pub String);

/// The name of the proxy key `dev up` gives its proxy.
const DEV_PROXY_KEY: &str = "dev-proxy";

fn err(what: &str, e: impl std::fmt::Display) -> DevError {
    DevError(format!("{what}: {e}"))
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
}

/// The backend `auto` resolves to on this machine, and why.
pub fn detect_backend() -> (&'static str, String) {
    let root = nix::unistd::geteuid().is_root();
    // busybox (static) builds the default project image when it is missing.
    let missing: Vec<&str> = ["podman", "runc", "mkfs.btrfs", "busybox"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    match (root, missing.is_empty()) {
        (true, true) => ("podman", "root with podman and Btrfs tools".into()),
        (false, _) => (
            "process",
            "not root: plain processes and directories".into(),
        ),
        (true, false) => (
            "process",
            format!(
                "{} missing: plain processes and directories",
                missing.join(", ")
            ),
        ),
    }
}

/// Runs the federation until `shutdown` completes.
pub async fn up(
    opts: DevOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DevError> {
    let backend = match opts.backend.as_str() {
        "auto" => {
            let (b, why) = detect_backend();
            eprintln!("dev up: backend {b} ({why})");
            b
        }
        "process" => "process",
        "podman" => "podman",
        other => {
            return Err(DevError(format!(
                "backend {other:?}: expected auto, process or podman"
            )))
        }
    };
    if opts.hidden_hosts > 0 && opts.proxy_port == 0 {
        return Err(DevError(
            "hidden hosts need the proxy (their tunnels land there): set a proxy port".into(),
        ));
    }
    std::fs::create_dir_all(&opts.dir).map_err(|e| err(&opts.dir.display().to_string(), e))?;

    // Master.
    eprintln!("dev up: starting the master on 127.0.0.1:{}", opts.port);
    let mcfg: DaemonConfig = toml::from_str(&format!(
        "listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
        opts.port,
        opts.dir.join("master").display()
    ))
    .map_err(|e| err("master config", e))?;
    let master = master_daemon::build(&mcfg)
        .await
        .map_err(|e| err("master", e))?;
    let listener = master_daemon::bind(&mcfg)
        .await
        .map_err(|e| err("master", e))?;
    let url = format!("http://127.0.0.1:{}", opts.port);
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let master_task = tokio::spawn(master_daemon::serve(
        master,
        listener,
        wait(stop_rx.clone()),
    ));
    let admin_key = std::fs::read_to_string(mcfg.admin_key_path())
        .map_err(|e| err("admin key", e))?
        .trim()
        .to_string();
    let admin = MasterClient::new(&url, &admin_key);

    // The ingress proxy, with a proxy key of its own (made afresh each
    // time: the secret is shown only once), never the admin key.
    let ssh_on = opts.proxy_port != 0 && opts.ssh_port != 0;
    let proxy_task = if opts.proxy_port != 0 {
        match admin.revoke_proxy_key(DEV_PROXY_KEY).await {
            Ok(()) => {}
            Err(e) if e.status == 404 => {}
            Err(e) => return Err(err("revoking the old dev proxy key", e.message)),
        }
        let proxy_key = admin
            .create_proxy_key(DEV_PROXY_KEY)
            .await
            .map_err(|e| err("creating the dev proxy key", e.message))?
            .api_key;
        let ssh = if ssh_on {
            format!(
                "ssh_listen = \"127.0.0.1:{}\"\nssh_host_key_file = \"{}\"\n",
                opts.ssh_port,
                opts.dir.join("proxy_ssh_ed25519").display()
            )
        } else {
            String::new()
        };
        let pcfg: cocalc_proxy::daemon::ProxyConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:{}\"\nmaster_url = \"{url}\"\napi_key = \"{proxy_key}\"\n{ssh}",
            opts.proxy_port
        ))
        .map_err(|e| err("proxy config", e))?;
        eprintln!(
            "dev up: starting the proxy on 127.0.0.1:{}",
            opts.proxy_port
        );
        Some(tokio::spawn(cocalc_proxy::daemon::run(
            pcfg,
            wait(stop_rx.clone()),
        )))
    } else {
        None
    };

    // Hosts, one after the other (the first may build the default image).
    let mut pools = Vec::new();
    let mut hosts = Vec::new();
    let proxy_url = format!("http://127.0.0.1:{}", opts.proxy_port);
    let all_hosts = opts.hosts + opts.hidden_hosts;
    let mut tunnels = Vec::new();
    // Every host backs up to one rustic repository under the dev directory,
    // so a project can be brought back on any of them.
    let backup = dev_backup_table(&opts.dir)?;
    for i in 1..=all_hosts {
        let hidden = i > opts.hosts;
        let hdir = opts.dir.join(format!("host-{i}"));
        std::fs::create_dir_all(&hdir).map_err(|e| err(&hdir.display().to_string(), e))?;
        let token = if hdir.join("host.key").exists() {
            None
        } else {
            Some(
                admin
                    .bootstrap_token()
                    .await
                    .map_err(|e| err("bootstrap token", e.message))?["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        let storage = if backend == "podman" {
            let pool_dir = hdir.join("pool");
            std::fs::create_dir_all(&pool_dir).map_err(|e| err("pool dir", e))?;
            eprintln!("dev up: host {i}: creating a 2 GiB loop-mounted Btrfs pool");
            let pool = cocalc_storage::LoopPool::create(&pool_dir, 2 << 30)
                .map_err(|e| err("btrfs pool", e))?;
            let s = format!(
                "storage = \"btrfs\"\nbtrfs_pool = \"{}\"\n",
                pool.path().display()
            );
            pools.push(pool);
            s
        } else {
            "storage = \"dir\"\n".to_string()
        };
        let token_line = token
            .map(|t| format!("bootstrap_token = \"{t}\"\n"))
            .unwrap_or_default();
        let place = if hidden {
            format!("tunnel_url = \"{proxy_url}\"\n")
        } else {
            "listen = \"127.0.0.1:0\"\n".to_string()
        };
        let hcfg: HostConfig = toml::from_str(&format!(
            "{place}master_url = \"{url}\"\ndata_dir = \"{}\"\nrunner = \"{backend}\"\n{storage}{token_line}{backup}",
            hdir.display()
        ))
        .map_err(|e| err("host config", e))?;
        hcfg.check().map_err(|e| err("host config", e))?;
        let (host, listener) = host_daemon::start(&hcfg)
            .await
            .map_err(|e| err(&format!("host {i}"), e))?;
        match host.endpoint() {
            HostEndpoint::Tunnel(_) => eprintln!(
                "dev up: starting host {i}, hidden: it listens nowhere and dials the proxy's tunnel"
            ),
            other => eprintln!("dev up: starting host {i} on {}", other.base_url()),
        }
        tunnels.extend(host.tunnel().cloned());
        let agent = host.agent.clone();
        let task = tokio::spawn(host.serve(listener, wait(stop_rx.clone())));
        hosts.push((agent, task));
    }

    // Wait for every host to check in.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = admin
            .hosts()
            .await
            .map(|h| h.iter().filter(|h| h.state == HostState::Up).count())
            .unwrap_or(0);
        if up >= all_hosts {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(DevError(format!(
                "only {up} of {all_hosts} hosts registered within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And for every hidden host's tunnel (before anything is placed there).
    while !tunnels.iter().all(|t| t.is_connected()) {
        if std::time::Instant::now() > deadline {
            return Err(DevError(format!(
                "a hidden host's tunnel to the proxy at {proxy_url} did not come up within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The demo user and project.
    let key_path = opts.dir.join("demo.key");
    let demo_key = match std::fs::read_to_string(&key_path) {
        Ok(k) => k.trim().to_string(),
        Err(_) => {
            let u = admin
                .create_user("demo")
                .await
                .map_err(|e| err("demo user", e.message))?;
            let k = u["api_key"].as_str().unwrap_or_default().to_string();
            std::fs::write(&key_path, format!("{k}\n")).map_err(|e| err("demo key", e))?;
            k
        }
    };
    let demo = MasterClient::new(&url, &demo_key);
    let projects = demo
        .projects()
        .await
        .map_err(|e| err("projects", e.message))?;
    if !projects.iter().any(|p| p.name == "demo") {
        demo.create_project(&CreateProjectRequest::new("demo"))
            .await
            .map_err(|e| err("demo project", e.message))?;
    }

    let demo_id = demo
        .projects()
        .await
        .ok()
        .and_then(|ps| ps.into_iter().find(|p| p.name == "demo"))
        .map(|p| p.id.to_string())
        .unwrap_or_else(|| "<project id>".into());

    let isolation = if backend == "podman" {
        "podman containers on Btrfs subvolumes"
    } else {
        "plain processes in plain directories, NO isolation (development only)"
    };
    println!();
    let hidden_note = if opts.hidden_hosts > 0 {
        format!(" + {} hidden behind the proxy's tunnel", opts.hidden_hosts)
    } else {
        String::new()
    };
    println!(
        "cocalc federation is up: master {url}, {} hosts{hidden_note} ({isolation})",
        opts.hosts
    );
    println!("In another terminal:");
    println!(
        "  export COCALC_MASTER={url} COCALC_API_KEY=$(cat {})",
        key_path.display()
    );
    println!("  cocalc project exec demo -- sh -c 'echo hello from $(hostname)'");
    println!("  echo hi | cocalc file put demo hello.txt && cocalc file get demo hello.txt");
    println!("  cocalc file ls demo");
    println!("  cocalc project explain demo");
    println!("  cocalc project backup demo && cocalc project backups demo");
    println!("  cocalc project stop demo");
    if opts.proxy_port != 0 {
        println!(
            "Through the proxy: http://127.0.0.1:{}/<project id>/... with the token from `cocalc project open demo`",
            opts.proxy_port
        );
    }
    if ssh_on {
        println!("SSH through the proxy (register a public key first):");
        println!("  cocalc ssh-key add ~/.ssh/id_ed25519.pub");
        println!(
            "  ssh -p {} project-{demo_id}@127.0.0.1 'echo hello over ssh'",
            opts.ssh_port
        );
    }
    println!(
        "Admin key: {}   Ctrl-C stops everything.",
        mcfg.admin_key_path().display()
    );

    shutdown.await;
    eprintln!("dev up: stopping projects, hosts and the master…");
    let stops = hosts.iter().map(|(agent, _)| agent.stop_all());
    for stopped in futures_util::future::join_all(stops).await {
        match stopped {
            Ok(failed) => {
                for (p, e) in failed {
                    eprintln!("dev up: stopping project {p}: {e}");
                }
            }
            Err(e) => eprintln!("dev up: listing a host's projects to stop them: {e}"),
        }
    }
    let _ = stop_tx.send(true);
    for (agent, task) in hosts {
        let _ = task.await;
        drop(agent);
    }
    if let Some(t) = proxy_task {
        let _ = t.await;
    }
    let _ = master_task.await;
    for pool in pools {
        if let Err(e) = pool.teardown() {
            eprintln!("dev up: removing a loop pool: {e}");
        }
    }
    eprintln!("dev up: stopped");
    Ok(())
}

/// The default state directory: `$XDG_STATE_HOME/cocalc-dev` or
/// `~/.local/state/cocalc-dev`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cocalc-dev")
}

/// The `[backup]` table of `dev up`'s hosts: a rustic repository at
/// `<dir>/backups`, with a password made on first use and kept in
/// `<dir>/backup-password` (mode 0600).
fn dev_backup_table(dir: &std::path::Path) -> Result<String, DevError> {
    use std::os::unix::fs::OpenOptionsExt;
    let pw = dir.join("backup-password");
    if !pw.exists() {
        let mut bytes = [0u8; 24];
        getrandom::getrandom(&mut bytes).map_err(|e| err("backup password", e))?;
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pw)
            .map_err(|e| err("backup password", e))?;
        std::io::Write::write_all(&mut f, format!("{text}\n").as_bytes())
            .map_err(|e| err("backup password", e))?;
    }
    Ok(format!(
        "[backup]\nrepository = \"{}\"\npassword_file = \"{}\"\n",
        dir.join("backups").display(),
        pw.display()
    ))
}
