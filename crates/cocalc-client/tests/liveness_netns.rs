//! A peer that vanishes is noticed: connections from inside a network
//! namespace, whose link is then brought down (the peer's machine gone,
//! as far as this side can tell), fail on this side within
//! [`Liveness::deadline`] when [`Liveness`] is applied — idle or with
//! data in flight — and stay open forever without it.
//!
//! Privileged (root, `ip` from iproute2). With
//! `COCALC_TEST_PRIVILEGED=require` (as `scripts/test` sets it) a missing
//! prerequisite fails the test, naming it; otherwise it skips, saying so.
#![cfg(target_os = "linux")]

use std::process::Command;
use std::time::{Duration, Instant};

use cocalc_client::liveness::Liveness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `true` if the test may run (see the module overview).
fn privileged() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        missing.push("ip (apt-get install iproute2)");
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("the network namespace test needs {}", missing.join(", "));
    if std::env::var("COCALC_TEST_PRIVILEGED").as_deref() == Ok("require") {
        panic!("COCALC_TEST_PRIVILEGED=require but {why}");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipping: {why} (set COCALC_TEST_PRIVILEGED=require to fail instead)"
    );
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace joined to this one by a veth pair: `outer` here, `inner`
/// in the namespace. Deleted on drop, also when the test fails.
struct Netns {
    name: String,
    outer_link: String,
    inner_link: String,
    outer: std::net::Ipv4Addr,
}

impl Netns {
    fn new() -> Self {
        let pid = std::process::id();
        let n = Netns {
            name: format!("cocalc-live-{pid}"),
            outer_link: format!("clv{}o", pid % 1_000_000),
            inner_link: format!("clv{}i", pid % 1_000_000),
            outer: std::net::Ipv4Addr::new(10, 251, (pid % 250) as u8, 1),
        };
        let inner = std::net::Ipv4Addr::new(10, 251, (pid % 250) as u8, 2);
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link",
            "add",
            &n.outer_link,
            "type",
            "veth",
            "peer",
            "name",
            &n.inner_link,
        ]);
        ip(&["link", "set", &n.inner_link, "netns", &n.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", n.outer),
            "dev",
            &n.outer_link,
        ]);
        ip(&["link", "set", &n.outer_link, "up"]);
        n.inside(&["addr", "add", &format!("{inner}/30"), "dev", &n.inner_link]);
        n.inside(&["link", "set", &n.inner_link, "up"]);
        n.inside(&["link", "set", "lo", "up"]);
        n
    }

    /// `ip args…` inside the namespace.
    fn inside(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `count` connections to `to`, made from inside the namespace (a
    /// socket stays in the namespace it was made in).
    fn connect_from_inside(
        &self,
        to: std::net::SocketAddr,
        count: usize,
    ) -> Vec<std::net::TcpStream> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            (0..count)
                .map(|_| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap())
                .collect()
        })
        .join()
        .unwrap()
    }

    /// The namespace's end of the link goes down: nothing sent to it is
    /// answered any more.
    fn cut(&self) {
        self.inside(&["link", "set", &self.inner_link, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer_link])
            .status();
    }
}

/// Reads `s` until it fails; the error and how long that took.
async fn read_until_error(s: &mut TcpStream, within: Duration) -> (std::io::Error, Duration) {
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(within, s.read(&mut buf)).await;
    match r {
        Ok(Err(e)) => (e, t.elapsed()),
        Ok(Ok(n)) => panic!("read {n} bytes from a peer that is gone"),
        Err(_) => panic!("no error within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_vanished_is_noticed_within_the_deadline() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let l = TcpListener::bind((ns.outer, 0)).await.unwrap();
    let clients = ns.connect_from_inside(l.local_addr().unwrap(), 3);
    let mut accepted = Vec::new();
    for _ in 0..3 {
        accepted.push(l.accept().await.unwrap().0);
    }
    let (mut plain, mut busy, mut idle) = (
        accepted.pop().unwrap(),
        accepted.pop().unwrap(),
        accepted.pop().unwrap(),
    );
    let quick = Liveness {
        idle: Duration::from_secs(1),
        interval: Duration::from_secs(1),
        probes: 2,
    };
    assert_eq!(quick.deadline(), Duration::from_secs(3));
    quick.apply(&idle).unwrap();
    quick.apply(&busy).unwrap();

    // The path works before the cut, both ways.
    let busy_peer = busy.peer_addr().unwrap();
    let mut client = clients
        .iter()
        .find(|c| c.local_addr().unwrap() == busy_peer)
        .unwrap();
    busy.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    {
        use std::io::{Read, Write};
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        client.write_all(b"pong").unwrap();
    }
    busy.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");

    ns.cut();
    // Data in flight that will never be acknowledged.
    busy.write_all(&[7u8; 4096]).await.unwrap();

    let (e, took) = read_until_error(&mut idle, Duration::from_secs(20)).await;
    assert_eq!(e.raw_os_error(), Some(nix::libc::ETIMEDOUT), "idle: {e}");
    assert!(
        took < Duration::from_secs(15),
        "idle: noticed after {took:?}"
    );
    let (e, took_busy) = read_until_error(&mut busy, Duration::from_secs(20)).await;
    assert_eq!(e.raw_os_error(), Some(nix::libc::ETIMEDOUT), "busy: {e}");
    eprintln!(
        "a vanished peer was noticed after {took:?} (idle) and by {:?} (data in flight)",
        took + took_busy
    );

    // Without it, the same dead peer goes unnoticed.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), plain.read(&mut buf))
            .await
            .is_err(),
        "a connection without keepalive still waits"
    );
    drop(clients);
}
