//! # cocalc-testkit
//!
//! Test support, not published: fakes behind the `cocalc-core` traits and
//! (as the storage and runner issues land) the contract suites that every
//! `Storage` and `Runner` implementation must pass.
//!
//! Today it holds [`MemoryTransport`], an in-process [`Transport`] whose
//! "hosts" are listeners registered by id, so control-plane code can be
//! tested without sockets, [`runner_contract`], the checks every
//! [`Runner`](cocalc_core::Runner) implementation must pass, and
//! [`net::tcp_timer`], which reads a connection's TCP timer off the
//! kernel's table (did a server arm keepalive on what it accepted?).
//!
//! ```
//! use cocalc_core::{HostEndpoint, HostId, Transport};
//! use cocalc_testkit::MemoryTransport;
//! # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! # rt.block_on(async {
//! let net = MemoryTransport::default();
//! let host = HostId::from_bytes([9; 16]);
//! let mut incoming = net.listen(host);
//! let _client = net.connect(host, &HostEndpoint::Tunnel("h9".into())).await.unwrap();
//! let _server_side = incoming.recv().await.unwrap();
//! # });
//! ```

pub mod net;
pub mod runner_contract;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cocalc_core::{BoxedConnection, HostEndpoint, HostId, Transport, TransportError};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

pub mod backup_contract;
pub mod storage_contract;

/// Buffer size of each in-memory connection, bytes per direction.
const PIPE_BYTES: usize = 64 * 1024;

/// An in-memory network: [`listen`](MemoryTransport::listen) registers a
/// host, [`connect`](Transport::connect) hands the host the other end of a
/// fresh duplex pipe. Any endpoint kind is accepted; routing is by host id.
/// [`cut`](MemoryTransport::cut) makes a host unreachable, as a partition
/// would. Clones share the same network.
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    hosts: Arc<Mutex<HashMap<HostId, mpsc::UnboundedSender<DuplexStream>>>>,
}

impl MemoryTransport {
    /// Registers `host` and returns the stream of its accepted connections.
    /// Listening again replaces the previous listener.
    pub fn listen(&self, host: HostId) -> mpsc::UnboundedReceiver<DuplexStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(host, tx);
        rx
    }

    /// Removes `host` from the network; later connects fail as unreachable.
    pub fn cut(&self, host: HostId) {
        self.lock().remove(&host);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<HostId, mpsc::UnboundedSender<DuplexStream>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (each operation is a single insert/remove/get).
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn connect(
        &self,
        host: HostId,
        _endpoint: &HostEndpoint,
    ) -> Result<BoxedConnection, TransportError> {
        let unreachable = || TransportError::Unreachable {
            host,
            reason: "no listener in the memory network".into(),
        };
        let tx = self.lock().get(&host).cloned().ok_or_else(unreachable)?;
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        tx.send(server).map_err(|_| unreachable())?;
        Ok(Box::new(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn carries_bytes_and_honours_cuts() {
        let net = MemoryTransport::default();
        let host = HostId::from_bytes([3; 16]);
        let ep = HostEndpoint::Url("http://unused".into());
        assert!(net.connect(host, &ep).await.is_err());
        let mut rx = net.listen(host);
        let mut c = net.connect(host, &ep).await.unwrap();
        let mut s = rx.recv().await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        net.cut(host);
        let e = net.connect(host, &ep).await.err().unwrap();
        assert!(e.is_retryable());
    }
}
