//! Connecting to a port inside a project's network namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

/// Opens a TCP connection to `127.0.0.1:port` inside the network namespace
/// of host process `pid`.
///
/// `setns` changes the namespace of the calling *thread*, so this runs on a
/// dedicated thread that ends right after connecting; the socket stays in
/// the namespace it was created in and is handed to tokio.
pub async fn connect_in_netns(
    pid: u32,
    port: u16,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns-connect-{pid}"))
        .spawn(move || {
            let res: std::io::Result<TcpStream> = (|| {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let s = TcpStream::connect_timeout(&addr, timeout)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })();
            let _ = tx.send(res);
        })?;
    let std_stream = rx
        .await
        .map_err(|_| std::io::Error::other("netns connect thread died"))??;
    tokio::net::TcpStream::from_std(std_stream)
}
