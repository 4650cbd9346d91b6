//! The simulated network's ends, in the shapes the real code takes:
//! a [`Dialer`] for the host's master link and an axum
//! [`Listener`](axum::serve::Listener) for the master's HTTP API.

use std::time::Duration;

use cocalc_core::{BoxedConnection, Clock, Dialer, Timestamp};

/// Dials one simulated address (`"master"`, port 8080) through turmoil's
/// TCP. Fails like a real dial when the link is partitioned or the peer is
/// down: after [`SimDialer::CONNECT_TIMEOUT`] of simulated time at most.
#[derive(Debug, Clone)]
pub struct SimDialer {
    host: String,
    port: u16,
}

impl SimDialer {
    /// How long a dial waits for a partitioned or silent peer.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A dialer for `host:port` in the simulation.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        SimDialer {
            host: host.into(),
            port,
        }
    }
}

#[async_trait::async_trait]
impl Dialer for SimDialer {
    async fn dial(&self) -> std::io::Result<BoxedConnection> {
        let connect = turmoil::net::TcpStream::connect((self.host.as_str(), self.port));
        match tokio::time::timeout(Self::CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {}:{} timed out", self.host, self.port),
            )),
        }
    }
}

/// turmoil's TCP listener as an axum listener, so the master's real
/// router serves in the simulation.
pub struct SimListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimListener")
            .field(&self.0.local_addr())
            .finish()
    }
}

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(pair) => return pair,
                // A failed accept is retried, as axum's own TCP listener
                // does; a short pause keeps a persistent error from spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The simulation's logical time as a [`Clock`]: milliseconds since the
/// Unix epoch by turmoil, the same on every simulated machine. Read outside
/// a simulated host (no simulation current), it answers the last time it
/// read inside one.
#[derive(Debug, Default)]
pub struct SimClock {
    last: std::sync::atomic::AtomicI64,
}

impl SimClock {
    /// A clock reading the simulation's time.
    pub fn new() -> Self {
        SimClock::default()
    }
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        use std::sync::atomic::Ordering;
        match turmoil::since_epoch() {
            Some(d) => {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                self.last.fetch_max(ms, Ordering::Relaxed);
                Timestamp(ms)
            }
            None => Timestamp(self.last.load(Ordering::Relaxed)),
        }
    }
}
