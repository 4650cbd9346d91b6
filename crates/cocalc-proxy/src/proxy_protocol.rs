//! The client's address from a TCP load balancer, by the PROXY protocol
//! (HAProxy's, versions 1 and 2).
//!
//! A load balancer that forwards TCP (HAProxy in `mode tcp`, AWS's
//! Network Load Balancer, …) hides its clients: every connection comes
//! from the balancer. An HTTP balancer can say who the client was in
//! `X-Forwarded-For`, but one in front of SSH, or of HTTPS it does not
//! terminate, cannot. With the PROXY protocol the balancer begins each
//! connection with a header naming the client — `PROXY TCP4 203.0.113.7
//! 10.0.0.2 51234 443\r\n` in version 1, a binary equivalent in version 2
//! — before any of the client's bytes.
//!
//! [`ProxiedListener`] accepts connections and, from the balancers it
//! trusts, reads that header off the front and gives the connection out
//! with the client's address as its peer, so per-client rate limits,
//! connection caps, `X-Forwarded-For` and audit records see the client.
//! It reads exactly the header's bytes, so what follows (HTTP, TLS, SSH)
//! is untouched, and each header in a task of its own, within
//! [`HEADER_TIMEOUT`], so a slow one does not hold up other connections.
//! A connection from a trusted balancer that does not begin with a valid
//! header is closed and reported (the balancer is misconfigured, or
//! someone else shares its address); a header that names no client
//! (version 1 `UNKNOWN`, version 2 `LOCAL`: the balancer's own health
//! checks) leaves the balancer as the peer, and one closed before its
//! first byte (a plain TCP health check) is just closed. Connections from
//! anyone else
//! are given out as they are: their first bytes are the protocol's own,
//! and a header there is just bytes that protocol refuses.
//!
//! Parsing is the `ppp` crate's; this module frames the header and owns
//! the policy.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cocalc_proxy::proxy_protocol::ProxiedListener;
//! # async fn demo() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:2222").await?;
//! let balancer: std::net::IpAddr = "10.0.0.5".parse().unwrap();
//! let mut listener = ProxiedListener::new(
//!     listener,
//!     Arc::new(move |ip| ip == balancer),
//!     Arc::new(|peer, why: &str| eprintln!("{peer}: {why}")),
//! );
//! use cocalc_client::serve::Accept;
//! let (_tcp, client) = listener.accept().await?; // the client, not 10.0.0.5
//! # Ok(()) }
//! ```

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cocalc_client::serve::Accept;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a trusted balancer has to send its whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 2's 12-byte signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 header, `\r\n` included (the specification's
/// 107 bytes).
const V1_MAX: usize = 107;

/// The most address and TLV bytes taken from a version 2 header (its
/// length field allows 65,535; balancers send a few hundred at most).
const V2_MAX_PAYLOAD: usize = 4096;

/// Whether connections from an address begin with a PROXY header.
pub type Trusts = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Told of each connection closed for a missing or bad header: the
/// balancer's address and what was wrong.
pub type Refused = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// A listener that reads PROXY headers from trusted balancers (see the
/// module overview). Dropping it stops accepting and closes the socket.
pub struct ProxiedListener {
    local: io::Result<SocketAddr>,
    ready: mpsc::Receiver<io::Result<(TcpStream, SocketAddr)>>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for ProxiedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxiedListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl ProxiedListener {
    /// Accepts on `listener`; connections from addresses `trusts` says
    /// yes to must begin with a PROXY header, and those that do not are
    /// closed and told to `refused`. Spawns the accepting task, so call
    /// it within a Tokio runtime.
    pub fn new(listener: TcpListener, trusts: Trusts, refused: Refused) -> Self {
        let local = listener.local_addr();
        // Enough room that accepting runs ahead of a busy server a little;
        // beyond that, connections wait in the kernel's backlog.
        let (tx, ready) = mpsc::channel(64);
        let task = tokio::spawn(accept_all(listener, trusts, refused, tx)).abort_handle();
        ProxiedListener { local, ready, task }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

impl Drop for ProxiedListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Accept for ProxiedListener {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        match self.ready.recv().await {
            Some(r) => r,
            // The accepting task ended: only when it was aborted.
            None => Err(io::Error::other("the listener is closed")),
        }
    }
}

/// A listener that reads PROXY headers, or a plain one: what a server
/// configured either way accepts on.
#[derive(Debug)]
pub enum Listener {
    /// Every connection as it comes.
    Plain(TcpListener),
    /// Trusted balancers' connections after their headers.
    Proxied(ProxiedListener),
}

impl Listener {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Plain(l) => l.local_addr(),
            Listener::Proxied(l) => l.local_addr(),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Plain(l)
    }
}

impl Accept for Listener {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            Listener::Plain(l) => l.accept().await,
            Listener::Proxied(l) => l.accept().await,
        }
    }
}

/// Accepts until the receiving side is gone, handing trusted connections
/// to tasks that read their headers.
async fn accept_all(
    listener: TcpListener,
    trusts: Trusts,
    refused: Refused,
    tx: mpsc::Sender<io::Result<(TcpStream, SocketAddr)>>,
) {
    loop {
        let (mut tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // The serving loop decides what an error means (and
                // pauses on the ones that call for it).
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !trusts(peer.ip()) {
            if tx.send(Ok((tcp, peer))).await.is_err() {
                return;
            }
            continue;
        }
        let (tx, refused) = (tx.clone(), refused.clone());
        tokio::spawn(async move {
            let got = tokio::time::timeout(HEADER_TIMEOUT, async {
                let mut first = [0u8; 1];
                match tcp.peek(&mut first).await {
                    // Closed (or reset) before a byte: a balancer's TCP
                    // health check (AWS's send no header), not a refusal.
                    Ok(0) | Err(_) => None,
                    Ok(_) => Some(read_header(&mut tcp).await),
                }
            })
            .await;
            match got {
                Ok(None) => {}
                Ok(Some(Ok(client))) => {
                    let _ = tx.send(Ok((tcp, client.unwrap_or(peer)))).await;
                }
                Ok(Some(Err(why))) => refused(peer, &why),
                Err(_) => refused(
                    peer,
                    &format!("no complete PROXY protocol header within {HEADER_TIMEOUT:?}"),
                ),
            }
        });
    }
}

/// Reads one PROXY header (version 1 or 2) off the front of `tcp`, and
/// not a byte more: the client's address it names, or `None` when it
/// names none (version 1 `UNKNOWN`, version 2 `LOCAL` or an address
/// family other than IP). The error says what was wrong.
pub async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    let io = |e: io::Error| format!("reading the PROXY protocol header: {e}");
    // 15 bytes are in every header of either version ("PROXY UNKNOWN\r\n"
    // is the shortest), and tell the versions apart.
    let mut buf = vec![0u8; 15];
    tcp.read_exact(&mut buf).await.map_err(io)?;
    if buf.starts_with(b"PROXY ") {
        read_v1_rest(tcp, &mut buf).await.map_err(io)?;
    } else if buf.starts_with(V2_SIGNATURE) {
        buf.resize(16, 0);
        tcp.read_exact(&mut buf[15..]).await.map_err(io)?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(format!(
                "the PROXY protocol header announces {len} bytes of addresses, more than \
                 {V2_MAX_PAYLOAD}"
            ));
        }
        buf.resize(16 + len, 0);
        tcp.read_exact(&mut buf[16..]).await.map_err(io)?;
    } else {
        return Err("the connection does not begin with a PROXY protocol header".into());
    }
    client_of(&buf)
}

/// Reads the rest of a version 1 header, whose first bytes are in `buf`,
/// through its `\r\n`: bytes are peeked, and only those up to the line's
/// end taken.
async fn read_v1_rest(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let mut peeked = [0u8; V1_MAX];
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            return if i + 1 == buf.len() && buf.ends_with(b"\r\n") {
                Ok(())
            } else {
                Err(invalid("a version 1 header must end with \\r\\n".into()))
            };
        }
        if buf.len() >= V1_MAX {
            return Err(invalid(format!(
                "a version 1 header longer than {V1_MAX} bytes"
            )));
        }
        let n = tcp.peek(&mut peeked[..V1_MAX - buf.len()]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Every byte up to the first '\n' is the header's; without one,
        // all of these are, and the next peek waits for more.
        let take = peeked[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let at = buf.len();
        buf.resize(at + take, 0);
        tcp.read_exact(&mut buf[at..]).await?;
    }
}

/// The client's address in a whole header.
fn client_of(header: &[u8]) -> Result<Option<SocketAddr>, String> {
    use ppp::{v1, v2, HeaderResult};
    let bad = |e: &dyn std::fmt::Display| format!("a malformed PROXY protocol header: {e}");
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => None,
            (_, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (_, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(bad(&e)),
        HeaderResult::V2(Err(e)) => Err(bad(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sends `bytes` then `after` on a fresh connection, and returns what
    /// `read_header` made of it and the bytes left unread after it.
    async fn read(bytes: &[u8], after: &[u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        c.write_all(bytes).await.unwrap();
        c.write_all(after).await.unwrap();
        c.shutdown().await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let r = read_header(&mut s).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        (r, rest)
    }

    /// A version 2 header: `command` (0 LOCAL, 1 PROXY), address family
    /// and protocol byte, and the address bytes.
    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[tokio::test]
    async fn headers_give_the_client_and_leave_the_rest_unread() {
        let (r, rest) = read(
            b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 443\r\n",
            b"SSH-2.0-x\r\n",
        )
        .await;
        assert_eq!(r, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-x\r\n");

        let (r, rest) = read(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 22\r\n",
            b"GET / HTTP/1.1\r\n",
        )
        .await;
        assert_eq!(r, Ok(Some("[2001:db8::1]:4000".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        // The shortest header, with bytes after it that end in \r\n too.
        let (r, rest) = read(b"PROXY UNKNOWN\r\n", b"x\r\n").await;
        assert_eq!(r, Ok(None));
        assert_eq!(rest, b"x\r\n");

        // Version 2, PROXY over TCP/IPv4 (family 0x11), with a TLV
        // (type 4, NOOP) after the addresses.
        let mut a = vec![198, 51, 100, 9, 10, 0, 0, 2];
        a.extend_from_slice(&7000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        a.extend_from_slice(&[4, 0, 1, 0]);
        let (r, rest) = read(&v2(1, 0x11, &a), b"\x16\x03\x01").await;
        assert_eq!(r, Ok(Some("198.51.100.9:7000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01");

        // Version 2 over TCP/IPv6 (0x21).
        let mut a = Vec::new();
        a.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a.extend_from_slice(&[0; 16]);
        a.extend_from_slice(&[0x1f, 0x40, 0, 22]);
        let (r, _) = read(&v2(1, 0x21, &a), b"").await;
        assert_eq!(r, Ok(Some("[2001:db8::7]:8000".parse().unwrap())));

        // LOCAL (a balancer's health check): no client named.
        let (r, rest) = read(&v2(0, 0x00, &[]), b"GET").await;
        assert_eq!(r, Ok(None));
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn bad_headers_are_refused_with_a_reason() {
        let (r, _) = read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"").await;
        assert!(r.unwrap_err().contains("does not begin with a PROXY"));

        let (r, _) = read(b"PROXY TCP4 203.0.113.7 10.0.0.2 51234\r\n", b"").await;
        assert!(r.unwrap_err().contains("malformed"));

        let (r, _) = read(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"").await;
        assert!(r.unwrap_err().contains("\\r\\n"));

        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        let (r, _) = read(long.as_bytes(), b"").await;
        assert!(r.unwrap_err().contains("longer than 107"));

        // Cut short by the balancer closing.
        let (r, _) = read(b"PROXY TCP4 203.0.113.7 10.0", b"").await;
        assert!(r.unwrap_err().contains("reading the PROXY protocol header"));

        let huge = {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
            h
        };
        let (r, _) = read(&huge, b"").await;
        assert!(r.unwrap_err().contains("65535 bytes"));

        // Version 2 with addresses too short for its family.
        let (r, _) = read(&v2(1, 0x11, &[1, 2, 3]), b"").await;
        assert!(r.unwrap_err().contains("malformed"));
    }

    #[tokio::test]
    async fn the_listener_reads_trusted_peers_only_and_reports_refusals() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let refusals = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = refusals.clone();
        let trusted: IpAddr = "127.0.0.1".parse().unwrap();
        let mut pl = ProxiedListener::new(
            l,
            Arc::new(move |ip| ip == trusted),
            Arc::new(move |_, why: &str| seen.lock().unwrap().push(why.to_string())),
        );
        assert_eq!(pl.local_addr().unwrap(), addr);

        // From a trusted address: the header's client is the peer.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 443\r\nhello")
            .await
            .unwrap();
        let (mut s, peer) = pl.accept().await.unwrap();
        assert_eq!(peer, "203.0.113.7:51234".parse().unwrap());
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");

        // A trusted address that connects and closes without a byte (a
        // TCP health check): nothing to report.
        drop(TcpStream::connect(addr).await.unwrap());
        // A trusted address without a header: closed and reported; the
        // next connection is served.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        let (_s, peer) = pl.accept().await.unwrap();
        assert_eq!(
            peer.ip(),
            trusted,
            "UNKNOWN leaves the balancer as the peer"
        );
        let mut buf = [0u8; 1];
        // Closed (reset, since it had sent more than was read).
        assert!(matches!(bad.read(&mut buf).await, Ok(0) | Err(_)));
        assert_eq!(refusals.lock().unwrap().len(), 1);
        assert!(refusals.lock().unwrap()[0].contains("does not begin"));

        // From another address, a header is not read: it is the
        // connection's first bytes, and the peer is its own.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = other.connect(addr).await.unwrap();
        c.write_all(b"PROXY TCP4 203.0.113.9 10.0.0.2 1 2\r\n")
            .await
            .unwrap();
        let (mut s, peer) = pl.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        let mut first = [0u8; 6];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"PROXY ");
    }
}
