//! [`relay`]: one HTTP/1.1 request over an already open byte connection,
//! with protocol upgrades (WebSocket) passed through both ways. Shared by
//! the host's port proxy and the ingress.

use bytes::Bytes;
use cocalc_core::BoxedConnection;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends `req` over `conn` and returns the response with its body
/// streaming. If the response switches protocols (101) and the request came
/// from a server that can upgrade it (an `OnUpgrade` in its extensions),
/// the two upgraded connections are copied into each other until either
/// closes.
pub async fn relay<B>(
    conn: BoxedConnection,
    req: http::Request<B>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut resp = sender
        .send_request(http::Request::from_parts(parts, body))
        .await?;
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        if let Some(client) = client_upgrade {
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client.await, upstream.await) {
                    let _ = relay_upgraded(c, u).await;
                }
            });
        }
    }
    Ok(resp)
}

/// Relays two upgraded connections into each other until both are done.
///
/// When both are plain TCP sockets underneath (a client served by
/// [`serve`](crate::serve::serve) and a host or port reached over TCP),
/// the bytes move with `splice(2)` and never enter this process;
/// otherwise (a tunnel stream, a test transport) they are copied.
pub async fn relay_upgraded(client: Upgraded, upstream: Upgraded) -> std::io::Result<()> {
    // Each side as a connection, plus what its HTTP parser read past the
    // head, which belongs to the other side before anything else.
    let (mut down, down_early): (BoxedConnection, Bytes) =
        match client.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => (Box::new(p.io.into_inner()), p.read_buf),
            Err(c) => (Box::new(TokioIo::new(c)), Bytes::new()),
        };
    let (mut up, up_early): (BoxedConnection, Bytes) =
        match upstream.downcast::<TokioIo<BoxedConnection>>() {
            Ok(p) => (p.io.into_inner(), p.read_buf),
            Err(u) => (Box::new(TokioIo::new(u)), Bytes::new()),
        };
    up.write_all(&down_early).await?;
    down.write_all(&up_early).await?;
    #[cfg(target_os = "linux")]
    if let (Some(d), Some(u)) = (
        (*down).as_any_mut().downcast_mut::<TcpStream>(),
        (*up).as_any_mut().downcast_mut::<TcpStream>(),
    ) {
        // Without pipes (out of file descriptors), copy instead.
        if let Ok(s) = crate::splice::Splicer::new() {
            return s.run(d, u).await.map(|_| ());
        }
    }
    copy(&mut down, &mut up).await
}

async fn copy<A, B>(a: &mut A, b: &mut B) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER)
        .await
        .map(|_| ())
}

/// Copy buffer per direction of a relayed upgrade: 128 KiB of memory per
/// open WebSocket in each process that relays it. tokio's default, 8 KiB,
/// costs a system call per 8 KiB; in `cargo bench -p cocalc-daemons
/// --bench proxy` a bulk WebSocket through the proxy went from 692 MiB/s
/// (8 KiB) to 900 (32 KiB) and 1,050 (64 KiB).
const RELAY_BUFFER: usize = 64 << 10;
