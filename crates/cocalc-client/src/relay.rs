//! [`relay`]: one HTTP/1.1 request over an already open byte connection,
//! with protocol upgrades (WebSocket) passed through both ways. Shared by
//! the host's port proxy and the ingress.

use cocalc_core::BoxedConnection;
use hyper_util::rt::TokioIo;

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
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut TokioIo::new(c),
                        &mut TokioIo::new(u),
                        RELAY_BUFFER,
                        RELAY_BUFFER,
                    )
                    .await;
                }
            });
        }
    }
    Ok(resp)
}

/// Copy buffer per direction of a relayed upgrade: 128 KiB of memory per
/// open WebSocket in each process that relays it. tokio's default, 8 KiB,
/// costs a system call per 8 KiB; in `cargo bench -p cocalc-daemons
/// --bench proxy` a bulk WebSocket through the proxy went from 692 MiB/s
/// (8 KiB) to 900 (32 KiB) and 1,050 (64 KiB).
const RELAY_BUFFER: usize = 64 << 10;
