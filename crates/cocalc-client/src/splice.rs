//! Zero-copy relay of two TCP connections with `splice(2)` (Linux).
//!
//! A relayed WebSocket or SSH session through the proxy or a host's port
//! proxy is two TCP sockets copied into each other until both are done.
//! Copying through user space costs two copies of every byte in the
//! relaying process; `splice` moves the bytes socket → pipe → socket
//! inside the kernel instead (the pipe holds page references, not
//! copies, on current kernels). [`Splicer`] does this with
//! tokio's readiness, so it never blocks a worker thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for per direction. Linux's default is 64 KiB;
/// a larger pipe moves more per system call. If the kernel refuses (an
/// unprivileged user over its pipe quota), the default stays.
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe for splicing one direction (its read and write ends, and what
/// it holds). [`Splicer`] makes two; [`splice_exact`] takes one a caller
/// keeps between calls.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe not yet moved out.
    held: usize,
}

impl Pipe {
    /// A pipe of 1 MiB (or the kernel's default when it refuses
    /// more); fails only when out of file descriptors.
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }
}

/// Empty pipes kept for reuse by [`Pipe::take`] and [`Pipe::give_back`].
static SPARE: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());
/// Most pipes kept spare: enough for the bodies a busy relay splices at
/// once, few enough that idle ones cost little kernel memory.
const SPARE_PIPES: usize = 32;

impl Pipe {
    /// A spare empty pipe, or a new one ([`Pipe::new`]).
    pub fn take() -> io::Result<Self> {
        let spare = SPARE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match spare {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Keeps an empty pipe for the next [`Pipe::take`] (while fewer than
    /// a few dozen are kept); a pipe still holding bytes is closed.
    pub fn give_back(self) {
        if self.held == 0 {
            let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_PIPES {
                spare.push(self);
            }
        }
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn would_block(e: Errno) -> io::Error {
    if e == Errno::EAGAIN {
        io::ErrorKind::WouldBlock.into()
    } else {
        e.into()
    }
}

/// Moves what `pipe` holds to `dst`, adding to `moved` what went out.
async fn drain(pipe: &mut Pipe, dst: &TcpStream, moved: &mut u64) -> io::Result<()> {
    while pipe.held > 0 {
        // The pipe holds `held` bytes, so EAGAIN can only mean "the
        // socket's send buffer is full".
        let m = dst
            .async_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst.as_fd(), None, pipe.held, flags()).map_err(would_block)
            })
            .await?;
        pipe.held -= m;
        *moved += m as u64;
    }
    Ok(())
}

/// Moves bytes from `src` to `dst` until `src` ends, then shuts down the
/// write side of `dst` (so the far end sees the end too). Adds to `moved`
/// the bytes written to `dst` as they go, so it also says how far a
/// relay that failed got.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Pipe,
    moved: &mut u64,
) -> io::Result<()> {
    loop {
        // The pipe is empty here, so EAGAIN can only mean "no data yet".
        let n = src
            .async_io(Interest::READABLE, || {
                splice(
                    src.as_fd(),
                    None,
                    &pipe.write,
                    None,
                    usize::MAX >> 1,
                    flags(),
                )
                .map_err(would_block)
            })
            .await?;
        if n == 0 {
            nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                .or_else(|e| if e == Errno::ENOTCONN { Ok(()) } else { Err(e) })?;
            return Ok(());
        }
        pipe.held = n;
        drain(pipe, dst, moved).await?;
    }
}

/// Moves exactly `n` bytes from `src` to `dst` through `pipe`, which must
/// be empty (as every call leaves it when it succeeds), adding to `moved`
/// the bytes written to `dst` as they go (so after an error it says how
/// many got out). Fails with
/// `UnexpectedEof` if `src` ends first; after any error the pipe may hold
/// bytes and must not be used again. Unlike [`Splicer::run`] it shuts
/// nothing down: both sockets stay usable for what comes after (the next
/// response on a keep-alive connection).
pub async fn splice_exact(
    src: &TcpStream,
    dst: &TcpStream,
    mut n: u64,
    pipe: &mut Pipe,
    moved: &mut u64,
) -> io::Result<()> {
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX >> 1);
        let got = src
            .async_io(Interest::READABLE, || {
                splice(src.as_fd(), None, &pipe.write, None, want, flags()).map_err(would_block)
            })
            .await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection before the body's end",
            ));
        }
        pipe.held = got;
        drain(pipe, dst, moved).await?;
        n -= got as u64;
    }
    Ok(())
}

/// The two pipes of one relay, made before any byte moves so a caller
/// can fall back to copying when they cannot be made.
pub struct Splicer {
    ab: Pipe,
    ba: Pipe,
}

impl Splicer {
    /// Makes the pipes; fails only when the process is out of file
    /// descriptors (or pipes).
    pub fn new() -> io::Result<Self> {
        Ok(Splicer {
            ab: Pipe::new()?,
            ba: Pipe::new()?,
        })
    }

    /// Relays `a` and `b` into each other with `splice(2)` until both
    /// directions have ended, as [`tokio::io::copy_bidirectional`] does:
    /// when one side ends, the other's write side is shut down and the
    /// other direction goes on. Adds to `moved` the bytes moved a → b and
    /// b → a as they go, so after an error too it says how far each
    /// direction got; the first error ends both directions.
    pub async fn run(
        mut self,
        a: &TcpStream,
        b: &TcpStream,
        moved: &mut (u64, u64),
    ) -> io::Result<()> {
        let (ab, ba) = (&mut moved.0, &mut moved.1);
        tokio::try_join!(
            one_way(a, b, &mut self.ab, ab),
            one_way(b, a, &mut self.ba, ba)
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// client ⇄ [relay_a ⇄ relay_b] ⇄ server: the client's and the
    /// server's ends, and the relay's outcome with what it moved.
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(io::Result<()>, (u64, u64))>,
    ) {
        let (client, relay_a) = pair().await;
        let (relay_b, server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut moved = (0, 0);
            let r = Splicer::new()
                .unwrap()
                .run(&relay_a, &relay_b, &mut moved)
                .await;
            (r, moved)
        });
        (client, server, relay)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_ends_propagate() {
        let (mut client, mut server, relay) = relayed().await;
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let srv = tokio::spawn(async move {
            let (mut r, mut w) = server.split();
            let send = async {
                w.write_all(&down2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = async { r.read_to_end(&mut got).await.unwrap() };
            tokio::join!(send, recv);
            assert_eq!(got, up2, "server received the client's bytes intact");
        });
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&up).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = async { r.read_to_end(&mut got).await.unwrap() };
        tokio::join!(send, recv);
        assert_eq!(got, down, "client received the server's bytes intact");
        srv.await.unwrap();
        let (r, moved) = relay.await.unwrap();
        r.unwrap();
        assert_eq!(
            moved,
            (up.len() as u64, down.len() as u64),
            "the relay counts what it moved"
        );
    }

    #[tokio::test]
    async fn a_half_closed_side_still_receives() {
        let (mut client, mut server, _relay) = relayed().await;
        // The client says all it has, then waits for the answer.
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut q = Vec::new();
        server.read_to_end(&mut q).await.unwrap();
        assert_eq!(q, b"question");
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut a = Vec::new();
        client.read_to_end(&mut a).await.unwrap();
        assert_eq!(a, b"answer");
    }

    #[tokio::test]
    async fn a_relay_that_fails_midway_says_how_far_it_got() {
        let (mut client, mut server, relay) = relayed().await;
        // The server sends without end; the client reads 1 MB and resets
        // the connection (SO_LINGER 0), so the relay's writes to it fail.
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            while server.write_all(&chunk).await.is_ok() {}
        });
        let mut got = vec![0u8; 1 << 20];
        client.read_exact(&mut got).await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        let (r, (up, down)) = relay.await.unwrap();
        assert!(r.is_err(), "the relay saw the reset: {r:?}");
        assert_eq!(up, 0);
        assert!(down >= 1 << 20, "at least what the client read: {down}");
    }
}
