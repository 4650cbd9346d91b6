//! Reads that tell the runtime when a TCP socket was drained.
//!
//! tokio keeps a socket marked readable until a read fails with
//! `WouldBlock`, so after every read that got data, the next wait for
//! data first costs a system call that finds nothing. A relay does that
//! twice per request (the client's socket after its request head, the
//! host's after its answer). A read that returns fewer bytes than it had
//! room for emptied the socket's receive queue at that moment, as nginx
//! also assumes; [`poll_read`] then clears the readiness itself, using
//! the readiness seen *before* the read, so data that arrived during or
//! after the read (a new edge from the kernel) is never lost.

use std::io;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Reads what `tcp` has into `buf`'s spare room (which the caller
/// provides), as `poll_read_buf` does; `Ready(Ok(0))` at the end of the
/// stream. A short read marks the socket not readable, so the next call
/// waits for new data without a system call.
pub(crate) fn poll_read(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        let mut short = None;
        let r = tcp.try_io(Interest::READABLE, || {
            let room = buf.capacity() - buf.len();
            let n = tcp.try_read_buf(buf)?;
            if n > 0 && n < room {
                // Drained: the runtime clears the readiness it saw before
                // this read (only if nothing new arrived since).
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, short) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Ok(n), None) => return Poll::Ready(Ok(n)),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Poll::Ready(Err(e)),
        }
    }
}

/// [`poll_read`] on a boxed connection when it is a bare TCP socket; any
/// other connection is read as it is.
pub(crate) fn poll_read_conn(
    io: &mut cocalc_core::BoxedConnection,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if let Some(tcp) = (**io).as_any_mut().downcast_mut::<TcpStream>() {
        return poll_read(tcp, cx, buf);
    }
    tokio_util::io::poll_read_buf(std::pin::Pin::new(io), cx, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn data_after_a_short_read_still_wakes_the_reader() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut w = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (r, _) = l.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(1 << 16);
        for round in 0..200u32 {
            let msg = round.to_string();
            w.write_all(msg.as_bytes()).await.unwrap();
            let start = buf.len();
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                std::future::poll_fn(|cx| poll_read(&r, cx, &mut buf)),
            )
            .await
            .expect("woken for new data after a short read")
            .unwrap();
            assert_eq!(&buf[start..start + n], msg.as_bytes());
        }
        drop(w);
        let n = std::future::poll_fn(|cx| poll_read(&r, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(n, 0, "the end of the stream");
    }
}
