//! Byte streams between processes and the async world, and the framing
//! check that tells a complete `btrfs send` stream from a cut one.

use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use cocalc_core::ByteStream;
use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Size of the chunks read from a producer process.
pub(crate) const CHUNK: usize = 1 << 20;

/// Bytes a pipe to or from a child process may hold (Linux default: 64 KiB).
const PIPE_BYTES: i32 = 1 << 20;

/// Enlarges a pipe so that a producer and a consumer on different threads
/// switch less often; failure (e.g. over `/proc/sys/fs/pipe-max-size`) only
/// costs speed.
fn widen_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// A [`ByteStream`] fed through a channel.
pub(crate) struct ChannelStream(pub(crate) mpsc::Receiver<io::Result<Bytes>>);

impl Stream for ChannelStream {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// The next item of a stream.
pub(crate) async fn next_chunk(stream: &mut ByteStream) -> Option<io::Result<Bytes>> {
    std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await
}

/// Copies `reader` into a channel in chunks; an error ends the stream.
pub(crate) async fn pump(
    mut reader: impl AsyncRead + Unpin,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> Result<u64, ()> {
    let mut total = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        while buf.len() < CHUNK {
            match reader.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return Err(());
                }
            }
        }
        if buf.is_empty() {
            return Ok(total);
        }
        total += buf.len() as u64;
        let last = buf.len() < CHUNK;
        if tx.send(Ok(buf.freeze())).await.is_err() {
            return Err(()); // consumer went away
        }
        if last {
            return Ok(total);
        }
    }
}

/// Runs `cmd` and streams its stdout. The stream ends with `Err` if the
/// process fails (its stderr becomes the message); dropping the stream kills
/// the process.
pub(crate) fn command_stream(mut cmd: Command, what: &'static str) -> io::Result<ByteStream> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    widen_pipe(&stdout);
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let err_task = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let pumped = pump(stdout, &tx).await;
        if pumped.is_err() {
            let _ = child.start_kill();
        }
        let status = child.wait().await;
        let err = err_task.await.unwrap_or_default();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                let _ = tx
                    .send(Err(io::Error::other(format!(
                        "{what} failed ({s}): {}",
                        err.trim()
                    ))))
                    .await;
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(format!("{what}: {e}")))).await;
            }
        }
    });
    Ok(Box::pin(ChannelStream(rx)))
}

/// `BTRFS_SEND_C_END`: the last command of every complete send stream.
const SEND_C_END: u16 = 21;
/// `btrfs-stream\0` followed by a little-endian u32 version.
const SEND_MAGIC: &[u8; 13] = b"btrfs-stream\0";
const SEND_HEADER: usize = 17;
const CMD_HEADER: usize = 10;

/// Follows the framing of a `btrfs send` stream as it passes: a 17-byte
/// header, then commands (`u32 len, u16 cmd, u32 crc`, `len` bytes). The
/// stream is complete only when it ends exactly after the END command.
/// (`btrfs receive` itself accepts a stream cut between two commands.)
#[derive(Debug, Default)]
pub struct SendStreamCheck {
    header: Vec<u8>,
    seen_header: bool,
    skip: u64,
    ended: bool,
    bytes: u64,
}

impl SendStreamCheck {
    /// A check at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Feeds the next chunk; `Err` if the bytes cannot be a send stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            if self.ended {
                return Err("data after the end of the send stream".into());
            }
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let want = if self.seen_header {
                CMD_HEADER
            } else {
                SEND_HEADER
            };
            let n = (want - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < want {
                continue;
            }
            if !self.seen_header {
                if &self.header[..13] != SEND_MAGIC {
                    return Err("not a btrfs send stream (bad magic)".into());
                }
                self.seen_header = true;
            } else {
                let h = &self.header;
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                let cmd = u16::from_le_bytes([h[4], h[5]]);
                self.skip = u64::from(len);
                if cmd == SEND_C_END {
                    self.ended = true;
                    if len != 0 {
                        return Err("malformed end command".into());
                    }
                }
            }
            self.header.clear();
        }
        Ok(())
    }

    /// True when the stream so far is a whole send stream.
    pub fn is_complete(&self) -> bool {
        self.ended && self.skip == 0 && self.header.is_empty()
    }
}

/// What [`feed_command`] saw.
pub(crate) enum FeedError {
    /// The stream was cut, corrupt or refused; the message says how.
    Incomplete(String),
    /// Could not start the process.
    Spawn(io::Error),
}

/// Feeds `stream` into `cmd`'s stdin. `check` (if any) sees every chunk
/// and must report the stream complete at its end; otherwise, or if the
/// stream yields `Err`, the process is killed. Returns once the process has
/// exited successfully.
pub(crate) async fn feed_command(
    mut cmd: Command,
    mut stream: ByteStream,
    mut check: Option<&mut SendStreamCheck>,
    what: &str,
) -> Result<(), FeedError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(FeedError::Spawn)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    widen_pipe(&stdin);
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut bytes = 0u64;
    let outcome: Result<(), String> = loop {
        match next_chunk(&mut stream).await {
            Some(Ok(chunk)) => {
                if let Some(c) = check.as_deref_mut() {
                    if let Err(e) = c.feed(&chunk) {
                        break Err(format!("{e} (after {bytes} bytes)"));
                    }
                }
                bytes += chunk.len() as u64;
                if let Err(e) = stdin.write_all(&chunk).await {
                    break Err(format!("{what} stopped reading after {bytes} bytes: {e}"));
                }
            }
            Some(Err(e)) => break Err(format!("stream failed after {bytes} bytes: {e}")),
            None => match check.as_deref() {
                Some(c) if !c.is_complete() => {
                    break Err(format!(
                        "stream ended after {bytes} bytes, before its end marker"
                    ))
                }
                _ => break Ok(()),
            },
        }
    };
    drop(stdin);
    if let Err(msg) = outcome {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let err = err_task.await.unwrap_or_default();
        let err = err.trim();
        return Err(FeedError::Incomplete(if err.is_empty() {
            msg
        } else {
            format!("{msg}; {what}: {err}")
        }));
    }
    let status = child.wait().await;
    let err = err_task.await.unwrap_or_default();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(FeedError::Incomplete(format!(
            "{what} refused the stream ({s}): {}",
            err.trim()
        ))),
        Err(e) => Err(FeedError::Incomplete(format!("{what}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(code: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&code.to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(payload);
        v
    }

    fn whole() -> Vec<u8> {
        let mut s = SEND_MAGIC.to_vec();
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend(cmd(1, b"subvol-attrs"));
        s.extend(cmd(15, &[7; 300]));
        s.extend(cmd(SEND_C_END, b""));
        s
    }

    #[test]
    fn complete_stream_in_any_chunking() {
        let s = whole();
        for size in [1, 3, 10, 17, 64, s.len()] {
            let mut c = SendStreamCheck::new();
            for chunk in s.chunks(size) {
                c.feed(chunk).unwrap();
            }
            assert!(c.is_complete(), "chunk size {size}");
            assert_eq!(c.bytes(), s.len() as u64);
        }
    }

    #[test]
    fn cut_streams_are_incomplete_even_between_commands() {
        let s = whole();
        for cut in [0, 5, 17, 27, 30, s.len() - 10] {
            let mut c = SendStreamCheck::new();
            c.feed(&s[..cut]).unwrap();
            assert!(!c.is_complete(), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_and_trailing_data_are_refused() {
        assert!(SendStreamCheck::new().feed(&[0u8; 40]).is_err());
        let mut s = whole();
        s.push(0);
        assert!(SendStreamCheck::new().feed(&s).is_err());
    }
}
