//! SSH ingress end to end: a master, a host (plain processes) and the
//! proxy's SSH server on loopback, driven by the OpenSSH client
//! (`ssh`, `sftp`, `ssh-keygen` from `openssh-client`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocalc_core::wire::CreateProjectRequest;
use cocalc_core::ExecRequest;
use cocalc_host::daemon::{self as host_daemon, HostConfig};
use cocalc_master::daemon::{self as master_daemon, DaemonConfig};
use cocalc_master::MasterClient;
use tokio::process::Command;
use tokio::sync::watch;

fn toml_cfg<T: serde::de::DeserializeOwned>(s: &str) -> T {
    toml::from_str(s).unwrap()
}

/// Fails with a clear message when the OpenSSH client is missing
/// (`scripts/test` installs `openssh-client`).
fn require_openssh() {
    for bin in ["ssh", "sftp", "ssh-keygen"] {
        let found = std::process::Command::new(bin)
            .arg("-V")
            .output()
            .map(|_| true)
            .unwrap_or(false);
        assert!(
            found,
            "`{bin}` is missing: install the OpenSSH client (apt-get install openssh-client)"
        );
    }
}

/// A federation with an SSH-enabled proxy, and a user owning project `p`
/// with a registered key.
struct Fed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    master_url: String,
    admin: MasterClient,
    user: MasterClient,
    pid: String,
    key: PathBuf,
    ssh_port: u16,
    ssh: Arc<cocalc_proxy::SshIngress>,
    /// The proxy's clock (starts at the real time).
    clock: cocalc_core::ManualClock,
    /// The proxy's audit records.
    audit: Arc<cocalc_auth::MemoryAuditSink>,
    stops: Vec<watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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

fn keygen(path: &Path) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test@cocalc", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

async fn federation() -> Fed {
    federation_capped(cocalc_proxy::IngressConfig::new("", "").client_connections).await
}

/// [`federation`] with the proxy's per-client connection cap at `cap`.
async fn federation_capped(cap: u32) -> Fed {
    federation_with(cap, false).await
}

/// [`federation`] with the proxy's per-client connection cap at `cap`,
/// and, if `proxy_protocol`, 127.0.0.1 a trusted load balancer whose SSH
/// connections begin with a PROXY protocol header.
async fn federation_with(cap: u32, proxy_protocol: bool) -> Fed {
    require_openssh();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (mut stops, mut tasks) = (Vec::new(), Vec::new());

    // Master.
    let mdir = root.join("master");
    let cfg: DaemonConfig = toml_cfg(&format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        mdir.display()
    ));
    let master = master_daemon::build(&cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let master_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, mut rx) = watch::channel(false);
    tasks.push(tokio::spawn(async move {
        master_daemon::serve(master, listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .unwrap();
    }));
    stops.push(stop);
    let admin_key = std::fs::read_to_string(mdir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let admin = MasterClient::new(&master_url, &admin_key);

    // Host (plain processes).
    let t = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let hcfg: HostConfig = toml_cfg(&format!(
        "listen = \"127.0.0.1:0\"\nmaster_url = \"{master_url}\"\ndata_dir = \"{}\"\n\
         bootstrap_token = \"{t}\"\nacl_ttl_secs = 300\nrunner = \"process\"\nstorage = \"dir\"\n\
         access_log = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n",
        root.join("host").display(),
        root.join("host-access.log").display()
    ));
    hcfg.check().unwrap();
    let listener = tokio::net::TcpListener::bind(hcfg.listen.unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let host = host_daemon::build(&hcfg, url).await.unwrap();
    let (stop, mut rx) = watch::channel(false);
    tasks.push(tokio::spawn(async move {
        host.run(listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .unwrap();
    }));
    stops.push(stop);
    eventually("host up", Duration::from_secs(15), || async {
        admin.hosts().await.map(|v| v.len() == 1).unwrap_or(false)
    })
    .await;

    // Proxy: HTTP ingress state + SSH server, with a proxy key (host
    // lookups and SSH authorizations only), as deployments should.
    let proxy_key = admin.create_proxy_key("edge").await.unwrap().api_key;
    use cocalc_core::Clock as _;
    let manual = cocalc_core::ManualClock::new(cocalc_core::SystemClock.now());
    let clock: cocalc_core::SharedClock = Arc::new(manual.clone());
    let audit = Arc::new(cocalc_auth::MemoryAuditSink::new());
    let mut icfg = cocalc_proxy::IngressConfig::new(&master_url, &proxy_key);
    icfg.client_connections = cap;
    if proxy_protocol {
        icfg.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    }
    let ingress = cocalc_proxy::Ingress::with_audit(
        icfg,
        Arc::new(cocalc_proxy::TcpTransport::default()),
        clock.clone(),
        audit.clone(),
    )
    .await
    .unwrap();
    let host_key =
        cocalc_proxy::ssh::load_or_generate_host_key(&root.join("proxy_ssh_ed25519")).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ssh_port = l.local_addr().unwrap().port();
    let l = ingress.listener(l, "ssh", proxy_protocol);
    let ssh = cocalc_proxy::SshIngress::new(ingress, host_key, clock);
    let (stop, mut rx) = watch::channel(false);
    let served = ssh.clone();
    tasks.push(tokio::spawn(async move {
        served
            .serve(l, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
    }));
    stops.push(stop);

    // A user with a project and a registered key.
    let u = admin.create_user("alice").await.unwrap();
    let user = MasterClient::new(&master_url, u["api_key"].as_str().unwrap());
    let p = user
        .create_project(&CreateProjectRequest::new("p"))
        .await
        .unwrap();
    let key = root.join("alice_key");
    let line = keygen(&key);
    let added = user.add_ssh_key(&line).await.unwrap();
    assert!(added.fingerprint.starts_with("SHA256:"), "{added:?}");
    Fed {
        _dir: dir,
        root,
        master_url,
        admin,
        user,
        pid: p.id.to_string(),
        key,
        ssh_port,
        ssh,
        clock: manual,
        audit,
        stops,
        tasks,
    }
}

impl Fed {
    fn ssh_args(&self, key: &Path) -> Vec<String> {
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-F",
            "/dev/null",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([key.display().to_string()])
        .collect()
    }

    /// `ssh USER@127.0.0.1 -p PORT ARGS…` with `stdin`.
    async fn ssh(&self, key: &Path, user: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_args(key))
            .args(["-p", &self.ssh_port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut w = child.stdin.take().unwrap();
            w.write_all(input).await.unwrap();
            drop(w);
        }
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("ssh did not finish within 60 s")
            .unwrap()
    }

    fn user_name(&self) -> String {
        format!("project-{}", self.pid)
    }

    async fn shut_down(self) {
        for s in &self.stops {
            let _ = s.send(true);
        }
        for t in self.tasks.into_iter().rev() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// What the OpenSSH client prints for a refusal, with the user name and
/// port taken out (the rest must not tell one refusal from another).
fn refusal_text(out: &Output, user: &str) -> String {
    String::from_utf8_lossy(&out.stderr).replace(user, "USER")
}

/// The first bytes the SSH ingress on `port` sends on a new connection
/// after `first` was sent on it ("" if it closes it), and the connection.
async fn greeting(port: u16, first: &[u8]) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(first).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the server answers or closes")
        .unwrap_or(0);
    buf.truncate(n);
    (String::from_utf8_lossy(&buf).into_owned(), s)
}

/// SSH sessions count under the proxy's per-client connection cap: over
/// it a connection is closed before the server's version line, counted
/// and audited; a slot comes back when a session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_connections_per_client_are_capped() {
    let f = federation_capped(2).await;
    let (g1, s1) = greeting(f.ssh_port, b"").await;
    let (g2, _s2) = greeting(f.ssh_port, b"").await;
    assert!(g1.starts_with("SSH-2.0-cocalc-proxy"), "{g1:?}");
    assert!(g2.starts_with("SSH-2.0-cocalc-proxy"), "{g2:?}");
    let (g3, _) = greeting(f.ssh_port, b"").await;
    assert_eq!(g3, "", "closed before the version line");
    assert_eq!(
        f.ssh
            .refusals()
            .too_many_connections
            .load(Ordering::Relaxed),
        1
    );
    assert!(f
        .audit
        .records()
        .iter()
        .any(|r| r.action == "ssh" && r.reason == "too_many_connections"));
    // One session ends: its slot is given back.
    drop(s1);
    eventually("a slot comes back", Duration::from_secs(10), || async {
        let (g, _) = greeting(f.ssh_port, b"").await;
        g.starts_with("SSH-2.0-cocalc-proxy")
    })
    .await;
    f.shut_down().await;
}

/// Behind a TCP load balancer sending the PROXY protocol, the client the
/// header names is the one capped: two clients through the one balancer
/// each have their own slots. The balancer's connection without a header
/// is closed before the version line, counted and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_behind_a_balancer_caps_the_clients_its_headers_name() {
    let f = federation_with(1, true).await;
    let greeting = |header: &'static [u8]| greeting(f.ssh_port, header);
    let (a, _a) = greeting(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 22\r\n").await;
    let (b, _b) = greeting(b"PROXY TCP4 203.0.113.8 127.0.0.1 5556 22\r\n").await;
    assert!(a.starts_with("SSH-2.0-cocalc-proxy"), "{a:?}");
    assert!(b.starts_with("SSH-2.0-cocalc-proxy"), "{b:?}");
    let (again, _) = greeting(b"PROXY TCP4 203.0.113.7 127.0.0.1 5557 22\r\n").await;
    assert_eq!(again, "", "203.0.113.7 holds its one slot");
    assert!(f
        .audit
        .records()
        .iter()
        .any(|r| r.reason == "too_many_connections"
            && r.detail.starts_with("client 203.0.113.7:5557")));
    // The balancer's own connections (a header naming no client) carry
    // many clients: not capped.
    let (l1, _l1) = greeting(b"PROXY UNKNOWN\r\n").await;
    let (l2, _l2) = greeting(b"PROXY UNKNOWN\r\n").await;
    assert!(l1.starts_with("SSH-2.0-cocalc-proxy"), "{l1:?}");
    assert!(l2.starts_with("SSH-2.0-cocalc-proxy"), "{l2:?}");
    let (bare, _) = greeting(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    assert_eq!(bare, "", "no header from the balancer: closed");
    let refused = f
        .audit
        .records()
        .into_iter()
        .filter(|r| r.reason == "bad_proxy_header")
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].detail.contains("ssh listener"), "{refused:?}");
    f.shut_down().await;
}

/// With the master away nobody can check a key: a login is let in only
/// with a grant the master gave this proxy for that project and key
/// before, while its token has a minute left. Every other login is
/// refused, a registered key's as a stranger's, and none is audited as a
/// grant. (Logins used to be let in as "pending", as when the master
/// checked the key but could not open the project yet.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_logins_while_the_master_is_away_need_an_earlier_grant() {
    let mut f = federation().await;
    let user = f.user_name();
    let ok = f.ssh(&f.key, &user, &["echo in"], None).await;
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "in\n", "{ok:?}");
    // A second registered key, never used through this proxy.
    let unused = f.root.join("unused_key");
    f.user.add_ssh_key(&keygen(&unused)).await.unwrap();
    // The master is the first task of the fixture.
    let _ = f.stops[0].send(true);
    let master = f.tasks.remove(0);
    let _ = tokio::time::timeout(Duration::from_secs(10), master).await;
    let grants = |f: &Fed| {
        f.audit
            .records()
            .into_iter()
            .filter(|r| r.reason == "granted")
            .collect::<Vec<_>>()
    };
    let granted_before = grants(&f).len();

    let again = f.ssh(&f.key, &user, &["echo in"], None).await;
    assert_eq!(
        (again.status.code(), String::from_utf8_lossy(&again.stdout)),
        (Some(0), "in\n".into()),
        "{again:?}"
    );
    let granted = grants(&f);
    assert_eq!(granted.len(), granted_before + 1, "{granted:?}");
    assert!(
        granted[granted_before].detail.contains("earlier grant"),
        "{:?}",
        granted[granted_before]
    );
    assert_eq!(f.ssh.earlier_grant_logins(), 1);

    let stranger = f.root.join("stranger_key");
    keygen(&stranger);
    let registered = f.ssh(&unused, &user, &["echo in"], None).await;
    let unknown = f.ssh(&stranger, &user, &["echo in"], None).await;
    for o in [&registered, &unknown] {
        assert_eq!(o.status.code(), Some(255), "{o:?}");
        assert!(o.stdout.is_empty(), "{o:?}");
    }
    assert_eq!(
        refusal_text(&registered, &user),
        refusal_text(&unknown, &user),
        "the registered key is not told apart"
    );
    // Past its token's life the earlier grant is not used either.
    f.clock.advance(Duration::from_secs(11 * 60));
    let late = f.ssh(&f.key, &user, &["echo in"], None).await;
    assert_eq!(late.status.code(), Some(255), "{late:?}");
    assert_eq!(
        refusal_text(&late, &user),
        refusal_text(&unknown, &user),
        "refused alike"
    );
    assert_eq!(grants(&f).len(), granted_before + 1, "no other grant");
    assert!(f.audit.records().iter().any(|r| r.reason == "master_error"));
    f.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_exec_matches_direct_exec_and_refusals_look_alike() {
    let f = federation().await;
    let user = f.user_name();

    // The same command through the master and through SSH: same bytes,
    // same exit code.
    let cmd = "printf 'a\\0b\\n'; echo err-$((40+2)) >&2; exit 4";
    let direct = f
        .user
        .exec(
            &f.pid,
            &ExecRequest::new(vec!["sh".into(), "-c".into(), cmd.into()]),
        )
        .await
        .unwrap();
    let via = f.ssh(&f.key, &user, &[cmd], None).await;
    assert_eq!(direct.exit_code, 4);
    assert_eq!(via.status.code(), Some(direct.exit_code), "{via:?}");
    assert_eq!(via.stdout, direct.stdout);
    assert_eq!(via.stderr, direct.stderr);
    // The bare uuid works as the user name too; stdin reaches the command.
    let up = f
        .ssh(&f.key, &f.pid, &["tr a-z A-Z"], Some(b"hello ssh\n"))
        .await;
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout), "HELLO SSH\n");

    // Standard input streams: an answer comes back before more input is
    // sent, and EOF reaches the command.
    let mut child = Command::new("ssh")
        .args(f.ssh_args(&f.key))
        .args(["-p", &f.ssh_port.to_string()])
        .arg(format!("{user}@127.0.0.1"))
        .arg("read a; echo got-$a; cat; echo end")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        stdin.write_all(b"one\n").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("no answer while stdin is still open")
            .unwrap();
        assert_eq!(first.as_deref(), Some("got-one"));
        stdin.write_all(b"two\n").await.unwrap();
        drop(stdin);
        let mut rest = Vec::new();
        while let Some(l) = lines.next_line().await.unwrap() {
            rest.push(l);
        }
        assert_eq!(rest, ["two", "end"]);
    }
    assert!(child.wait().await.unwrap().success());

    // rsync over SSH (an interactive protocol on stdin/stdout).
    let src = f.root.join("rsync-src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("sub/b.txt"), b"beta\n").unwrap();
    let rsh = format!("ssh {} -p {}", f.ssh_args(&f.key).join(" "), f.ssh_port);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("rsync")
            .args(["-a", "-e", &rsh])
            .arg(format!("{}/", src.display()))
            .arg(format!("{user}@127.0.0.1:synced/"))
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("rsync did not finish")
    .expect("rsync is needed (scripts/test installs it)");
    assert!(out.status.success(), "{out:?}");
    let back = f
        .ssh(&f.key, &user, &["cat synced/a.txt synced/sub/b.txt"], None)
        .await;
    assert_eq!(
        String::from_utf8_lossy(&back.stdout),
        "alpha\nbeta\n",
        "{back:?}"
    );

    // Refusals: a wrong key, an unknown project, a malformed user name, a
    // key of a user who is not a collaborator. All look the same.
    let stranger = f.root.join("stranger_key");
    keygen(&stranger);
    let other_user = f.admin.create_user("bob").await.unwrap();
    let bob = MasterClient::new(&f.master_url, other_user["api_key"].as_str().unwrap());
    let bob_key = f.root.join("bob_key");
    bob.add_ssh_key(&keygen(&bob_key)).await.unwrap();
    let unknown = "project-6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    let cases = [
        (&stranger, user.as_str()),
        (&f.key, unknown),
        (&f.key, "root"),
        (&f.key, "project-not-a-uuid"),
        (&bob_key, user.as_str()),
    ];
    let mut texts = Vec::new();
    for (key, name) in cases {
        let out = f.ssh(key, name, &["echo should-not-run"], None).await;
        assert_eq!(out.status.code(), Some(255), "{name}: {out:?}");
        assert!(out.stdout.is_empty(), "{name}: {out:?}");
        let text = refusal_text(&out, name);
        assert!(
            text.contains("Permission denied (publickey)"),
            "{name}: {text}"
        );
        texts.push(text);
    }
    assert!(
        texts.windows(2).all(|w| w[0] == w[1]),
        "refusals differ: {texts:#?}"
    );
    let r = f.ssh.refusals();
    assert_eq!(r.bad_user.load(Ordering::Relaxed), 2);
    assert_eq!(r.not_authorized.load(Ordering::Relaxed), 3);
    assert_eq!(r.master_error.load(Ordering::Relaxed), 0);
    // Each refusal is an audit record with its reason; logins are too.
    let records = f.audit.records();
    let refused: Vec<&str> = records
        .iter()
        .filter(|r| r.action == "ssh" && r.outcome == cocalc_core::AuditOutcome::Refuse)
        .map(|r| r.reason.as_str())
        .collect();
    assert_eq!(
        refused.iter().filter(|r| **r == "bad_user").count(),
        2,
        "{refused:?}"
    );
    assert_eq!(
        refused.iter().filter(|r| **r == "not_authorized").count(),
        3,
        "{refused:?}"
    );
    assert!(
        records.iter().any(|r| r.action == "ssh"
            && r.outcome == cocalc_core::AuditOutcome::Grant
            && r.project.map(|p| p.to_string()) == Some(f.pid.clone())),
        "{records:?}"
    );

    // The key is listed, and once removed it no longer lets anyone in.
    let keys = f.user.ssh_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    f.user.remove_ssh_key(&keys[0].fingerprint).await.unwrap();
    assert!(f.user.ssh_keys().await.unwrap().is_empty());
    let out = f.ssh(&f.key, &user, &["true"], None).await;
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    f.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_starts_a_stopped_project_and_runs_a_shell() {
    let f = federation().await;
    let user = f.user_name();
    // No host can take the unplaced project yet: the login is accepted
    // (the key is good) and the command says why it cannot run.
    let host = f.admin.hosts().await.unwrap()[0].id;
    f.admin.drain(host, true).await.unwrap();
    let out = f.ssh(&f.key, &user, &["echo placed"], None).await;
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.starts_with("cocalc: "), "{out:?}");
    assert!(!why.contains("Permission denied"), "{out:?}");
    f.admin.drain(host, false).await.unwrap();
    f.user.start(&f.pid).await.unwrap();
    f.user.stop(&f.pid).await.unwrap();
    let out = f.ssh(&f.key, &user, &["echo started"], None).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    let status = f.user.start(&f.pid).await.unwrap();
    assert_eq!(status.state, cocalc_core::ProjectState::Running);

    // An interactive shell with a pty: typed input runs, output comes back.
    let out = f
        .ssh(
            &f.key,
            &user,
            &["-tt"],
            Some(b"echo shell-$((6*7))\nstty size\nexit\n"),
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shell-42"), "{out:?}");
    // No local terminal: the pty gets the default size.
    assert!(text.contains("24 80"), "{out:?}");
    f.shut_down().await;
}

/// One SSH connection outlives the key's removal only while its token is
/// fresh: a channel opened after that asks the master again and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_channels_after_token_expiry_are_authorized_again() {
    let f = federation().await;
    let user = f.user_name();
    let control = f.root.join("cm.sock");
    let mux = |extra: &[&str]| {
        let mut c = Command::new("ssh");
        c.args(f.ssh_args(&f.key))
            .args(["-p", &f.ssh_port.to_string(), "-S"])
            .arg(&control)
            .args(extra)
            .arg(format!("{user}@127.0.0.1"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let _master = mux(&["-M", "-N"]).spawn().unwrap();
    eventually("the control socket", Duration::from_secs(20), || async {
        control.exists()
    })
    .await;
    let run = |cmd: &'static str| {
        let mut c = mux(&["-o", "ControlMaster=no"]);
        c.arg(cmd);
        async move {
            tokio::time::timeout(Duration::from_secs(30), c.output())
                .await
                .expect("ssh over the shared connection hung")
                .unwrap()
        }
    };
    let out = run("echo one").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n", "{out:?}");
    let keys = f.user.ssh_keys().await.unwrap();
    f.user.remove_ssh_key(&keys[0].fingerprint).await.unwrap();
    // The token from the login is still fresh: the connection goes on.
    let out = run("echo two").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n", "{out:?}");
    // Past the token's lifetime the proxy asks the master again: refused.
    f.clock.advance(Duration::from_secs(11 * 60));
    let out = run("echo three").await;
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorized"),
        "{out:?}"
    );
    f.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_forwards_ports_and_serves_sftp() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = federation().await;
    let user = f.user_name();

    // A server "in the project" (the process runner shares the host's
    // loopback): an echo server that upper-cases.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let up = buf[..n].to_ascii_uppercase();
                    if s.write_all(&up).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_port = free.local_addr().unwrap().port();
    drop(free);
    let mut fwd = Command::new("ssh")
        .args(f.ssh_args(&f.key))
        .args([
            "-p",
            &f.ssh_port.to_string(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .arg("-L")
        .arg(format!("127.0.0.1:{local_port}:localhost:{server_port}"))
        .arg(format!("{user}@127.0.0.1"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut conn = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while conn.is_none() {
        assert!(Instant::now() < deadline, "the forward never listened");
        conn = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
            .await
            .ok();
        if conn.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut conn = conn.unwrap();
    conn.write_all(b"ping through ssh").await.unwrap();
    let mut got = vec![0u8; 16];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut got))
        .await
        .expect("no answer through the forward")
        .unwrap();
    assert_eq!(&got, b"PING THROUGH SSH");
    drop(conn);
    let _ = fwd.kill().await;

    // SFTP: put, get, mkdir, ls, rename, rm, against the files API.
    let local = f.root.join("local.txt");
    std::fs::write(&local, b"sent by sftp\n").unwrap();
    let o = f.user.open(&f.pid).await.unwrap();
    let endpoint = match &o.endpoint {
        cocalc_core::HostEndpoint::Url(u) => u.clone(),
        other => panic!("unexpected endpoint {other:?}"),
    };
    let host = cocalc_client::HostClient::new(endpoint, o.project, o.token.clone());
    host.write("hello.txt", b"from the project\n".to_vec())
        .await
        .unwrap();
    let down = f.root.join("down.txt");
    let batch = f.root.join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} up.txt\nget hello.txt {}\nmkdir d\nrename up.txt d/moved.txt\nls -l d\nls /\nrm hello.txt\n",
            local.display(),
            down.display()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("sftp")
            .args(f.ssh_args(&f.key))
            // From another loopback address, to tell the SSH client from
            // the proxy in the host's access log.
            .args(["-o", "BindAddress=127.0.0.2"])
            .args(["-P", &f.ssh_port.to_string(), "-b"])
            .arg(&batch)
            .arg(format!("{user}@127.0.0.1"))
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("sftp did not finish")
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&down).unwrap(), b"from the project\n");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("moved.txt"), "{out:?}");
    // The home is the root: `ls /` lists it.
    assert!(
        listed
            .lines()
            .skip_while(|l| !l.starts_with("sftp> ls /"))
            .any(|l| l.contains("hello.txt")),
        "{out:?}"
    );
    assert_eq!(host.read("d/moved.txt").await.unwrap(), b"sent by sftp\n");
    assert_eq!(host.read("hello.txt").await.unwrap_err().status, 404);
    // The host saw the SSH client behind the proxy (X-Forwarded-For) on
    // SFTP's file requests too.
    let log = f.root.join("host-access.log");
    let put = |text: &str| {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["method"] == "PUT" && l["target"].as_str().unwrap().ends_with("/up.txt"))
    };
    eventually(
        "the host logs SFTP's put",
        Duration::from_secs(10),
        || async { put(&std::fs::read_to_string(&log).unwrap_or_default()).is_some() },
    )
    .await;
    let line = put(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(line["client"], "127.0.0.2", "{line}");
    // scp (OpenSSH's scp speaks SFTP).
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("scp")
            .args(f.ssh_args(&f.key))
            .args(["-P", &f.ssh_port.to_string()])
            .arg(&local)
            .arg(format!("{user}@127.0.0.1:d/by-scp.txt"))
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("scp did not finish")
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(host.read("d/by-scp.txt").await.unwrap(), b"sent by sftp\n");
    f.shut_down().await;
}
