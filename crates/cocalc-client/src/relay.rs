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
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
    }
    Ok(resp)
}
