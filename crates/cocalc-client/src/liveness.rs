//! Dead-peer detection on TCP connections that may live for hours.
//!
//! A relayed WebSocket, a terminal or a pooled connection to a host can
//! sit idle for a long time. If the machine at the other end loses power
//! or the network between drops it, nothing arrives to say so: an idle
//! socket waits forever, and one with unacknowledged data retransmits for
//! about 15 minutes (Linux's default `tcp_retries2`) before it fails. A
//! relay in between holds both sockets (and, when it splices, two pipes)
//! for that long, and the project's side never learns that its user is
//! gone.
//!
//! [`Liveness`] turns on TCP keepalive — after [`Liveness::idle`] without
//! traffic, a probe every [`Liveness::interval`], [`Liveness::probes`]
//! of them — and sets `TCP_USER_TIMEOUT` to the same total
//! ([`Liveness::deadline`]), so data sent but not acknowledged, or not
//! sent because the peer's window stayed shut, for that long also ends
//! the connection. A dead peer then makes the socket's next read or write
//! fail with `ETIMEDOUT`, which ends the relay using it like any other
//! error. A live peer answers probes from its kernel, whatever its
//! program is doing, so an idle connection to a live peer is never
//! closed by this. A peer that keeps its receive window shut — a client
//! that stops reading a download — is dropped after the same time, as
//! nginx's `send_timeout` (60 s by default, per its documentation) drops
//! one.
//!
//! [`tune`] applies [`Liveness::DEFAULT`] (and `TCP_NODELAY`); the
//! servers of [`serve`](crate::serve) and [`lean`](crate::lean) call it on
//! every connection they accept, and the proxy's and hidden hosts'
//! dialled connections do too.
//!
//! ```
//! # async fn demo() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let tcp = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
//! cocalc_client::liveness::tune(&tcp)?;
//! assert_eq!(
//!     cocalc_client::liveness::Liveness::DEFAULT.deadline(),
//!     std::time::Duration::from_secs(120)
//! );
//! # Ok(()) }
//! ```

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// When a silent peer is declared dead (see the module overview).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time without any traffic before the first probe (the kernel takes
    /// whole seconds: rounded down, at least one).
    pub idle: Duration,
    /// Time between probes (whole seconds, as for `idle`).
    pub interval: Duration,
    /// Unanswered probes after which the connection is dropped (at least
    /// one).
    pub probes: u32,
}

impl Liveness {
    /// What every connection gets from [`tune`]: a first probe after 60 s
    /// of silence, then one every 10 s, and the connection dropped after
    /// 6 unanswered ones — 2 minutes in all. Loose enough that a peer
    /// busy for a minute or on a slow link is not mistaken for a dead one;
    /// tight enough that a vanished client's relay and project session
    /// end within minutes.
    pub const DEFAULT: Liveness = Liveness {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        probes: 6,
    };

    /// How long a silent peer has before its connection is dropped:
    /// `idle + interval × probes`, which is also the `TCP_USER_TIMEOUT`
    /// for data it does not acknowledge.
    pub fn deadline(&self) -> Duration {
        let (idle, interval, probes) = self.kernel_values();
        Duration::from_secs(u64::from(idle) + u64::from(interval) * u64::from(probes))
    }

    /// The values the kernel takes: whole seconds (at least one) and at
    /// least one probe.
    fn kernel_values(&self) -> (u32, u32, u32) {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        (secs(self.idle), secs(self.interval), self.probes.max(1))
    }

    /// Sets keepalive and `TCP_USER_TIMEOUT` on `tcp`. Fails only if the
    /// kernel refuses an option (not on Linux for a TCP socket).
    #[cfg(target_os = "linux")]
    pub fn apply(&self, tcp: &TcpStream) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        let (idle, interval, probes) = self.kernel_values();
        let millis = u32::try_from(self.deadline().as_millis()).unwrap_or(u32::MAX);
        setsockopt(tcp, sockopt::TcpKeepIdle, &idle)?;
        setsockopt(tcp, sockopt::TcpKeepInterval, &interval)?;
        setsockopt(tcp, sockopt::TcpKeepCount, &probes)?;
        setsockopt(tcp, sockopt::TcpUserTimeout, &millis)?;
        setsockopt(tcp, sockopt::KeepAlive, &true)?;
        Ok(())
    }

    /// Elsewhere: keepalive with the system's timings only.
    #[cfg(not(target_os = "linux"))]
    pub fn apply(&self, tcp: &TcpStream) -> io::Result<()> {
        let _ = tcp;
        Ok(())
    }
}

/// Prepares a connection that carries relayed traffic: `TCP_NODELAY`
/// (small writes such as keystrokes and request heads go out at once) and
/// [`Liveness::DEFAULT`].
pub fn tune(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    Liveness::DEFAULT.apply(tcp)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use cocalc_testkit::net::{tcp_timer, KEEPALIVE_TIMER};
    use nix::sys::socket::{getsockopt, sockopt};

    #[tokio::test]
    async fn tune_sets_keepalive_and_the_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        assert!(!getsockopt(&c, sockopt::KeepAlive).unwrap());
        tune(&c).unwrap();
        assert!(c.nodelay().unwrap());
        assert!(getsockopt(&c, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&c, sockopt::TcpKeepIdle).unwrap(), 60);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepCount).unwrap(), 6);
        assert_eq!(getsockopt(&c, sockopt::TcpUserTimeout).unwrap(), 120_000);

        // Sub-second timings round up to the kernel's whole seconds.
        let quick = Liveness {
            idle: Duration::from_millis(300),
            interval: Duration::from_millis(200),
            probes: 0,
        };
        quick.apply(&c).unwrap();
        assert_eq!(getsockopt(&c, sockopt::TcpKeepIdle).unwrap(), 1);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepInterval).unwrap(), 1);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepCount).unwrap(), 1);
        assert_eq!(quick.deadline(), Duration::from_secs(2));
        assert_eq!(getsockopt(&c, sockopt::TcpUserTimeout).unwrap(), 2_000);
    }

    #[tokio::test]
    async fn the_proc_table_shows_a_keepalive_timer_only_where_one_is_armed() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        let (here, there) = (a.local_addr().unwrap(), a.peer_addr().unwrap());
        assert_eq!(tcp_timer(here, there), Some((0, 0)), "no timer yet");
        tune(&a).unwrap();
        let (kind, ticks) = tcp_timer(here, there).unwrap();
        assert_eq!(kind, KEEPALIVE_TIMER);
        assert!(
            (5_000..=6_000).contains(&ticks),
            "{ticks} ticks to the first probe"
        );
        assert_eq!(
            tcp_timer(there, here),
            Some((0, 0)),
            "the other end has none"
        );
        drop(c);
    }
}
