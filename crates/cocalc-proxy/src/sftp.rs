//! The `sftp` subsystem of the SSH ingress: an SFTP server
//! ([russh_sftp]) backed by the host's files API
//! (`/{project}/files/{path}`).
//!
//! The project's home is the SFTP root `/`; paths are normalised here
//! (`.`, `..` and repeated slashes resolved, never above `/`) and checked
//! again by the host, which confines every path to the home. The files
//! API moves whole files: a file opened for reading is fetched once (at
//! most the host's 64 MiB limit) and served from memory; a file opened
//! for writing is collected and stored atomically on close.
//! `setstat` is accepted and ignored; symlinks are not created.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use cocalc_client::encode_path;
use cocalc_core::wire::{FileEntry, FileKind};
use cocalc_core::ApiError;
use russh::server::Msg;
use russh::Channel;
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;

/// The answer of one host request: status and body.
type Answer = Result<(u16, bytes::Bytes), ApiError>;

/// Sends one request (`method`, path under `/{project}`, body) to the
/// project's host.
pub(crate) type RequestFn = Box<
    dyn Fn(http::Method, String, Vec<u8>) -> Pin<Box<dyn Future<Output = Answer> + Send>>
        + Send
        + Sync,
>;

/// The host's files API for one project.
pub(crate) struct HostFiles {
    request: RequestFn,
}

impl HostFiles {
    /// Files reached through `request`.
    pub(crate) fn new(request: RequestFn) -> Self {
        HostFiles { request }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        query: &str,
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, StatusReply> {
        // The home itself is `/files` (the router has no `/files/` route).
        let url = if path.is_empty() {
            format!("/files{query}")
        } else {
            format!("/files/{}{query}", encode_path(path))
        };
        let (status, body) = (self.request)(method, url, body)
            .await
            .map_err(|e| reply(e.status, &e.message))?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(reply(status, &message))
    }

    async fn stat(&self, path: &str) -> Result<FileEntry, StatusReply> {
        let body = self
            .call(http::Method::GET, path, "?stat", Vec::new())
            .await?;
        serde_json::from_slice(&body).map_err(|e| failure(&format!("bad stat answer: {e}")))
    }
}

fn reply(status: u16, message: &str) -> StatusReply {
    let code = match status {
        404 => StatusCode::NoSuchFile,
        401 | 403 => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    StatusReply::new(code).with_message(message)
}

fn failure(message: &str) -> StatusReply {
    StatusReply::new(StatusCode::Failure).with_message(message)
}

/// An SFTP path as a path relative to the home (`""` for the home):
/// `.` and empty names dropped, `..` goes up but never above the root.
pub(crate) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

fn attrs_of(e: &FileEntry) -> FileAttributes {
    let kind = match e.kind {
        FileKind::Dir => 0o040000,
        FileKind::Symlink => 0o120000,
        FileKind::File => 0o100000,
        _ => 0,
    };
    let default_mode = if e.kind == FileKind::Dir {
        0o755
    } else {
        0o644
    };
    let mut a = FileAttributes::empty();
    a.size = Some(e.size);
    a.permissions = Some(kind | e.mode.unwrap_or(default_mode));
    a.uid = Some(0);
    a.gid = Some(0);
    let mtime = e
        .modified_ms
        .map(|m| u32::try_from(m.div_euclid(1000)).unwrap_or(0));
    a.mtime = mtime;
    a.atime = mtime;
    a
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

enum Open {
    Read(bytes::Bytes),
    Write { path: String, data: Vec<u8> },
    Dir { entries: Vec<FileEntry>, done: bool },
}

/// One SFTP session.
struct Sftp {
    files: HostFiles,
    handles: HashMap<String, Open>,
    next: u64,
}

impl Sftp {
    fn add(&mut self, open: Open) -> String {
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        h
    }
}

/// Most handles open at once in one session.
const MAX_HANDLES: usize = 256;

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(failure("too many open handles"));
        }
        let path = normalize(&filename);
        let writing = pflags.intersects(OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::APPEND);
        let open = if writing {
            let data = if pflags.contains(OpenFlags::TRUNCATE) {
                Vec::new()
            } else {
                match self.files.stat(&path).await {
                    Ok(e) if e.kind == FileKind::Dir => return Err(failure("is a directory")),
                    Ok(_) => self
                        .files
                        .call(http::Method::GET, &path, "", Vec::new())
                        .await?
                        .to_vec(),
                    Err(e) if e.status_code == StatusCode::NoSuchFile => {
                        if !pflags.contains(OpenFlags::CREATE) {
                            return Err(e);
                        }
                        Vec::new()
                    }
                    Err(e) => return Err(e),
                }
            };
            Open::Write { path, data }
        } else {
            if self.files.stat(&path).await?.kind == FileKind::Dir {
                return Err(failure("is a directory"));
            }
            Open::Read(
                self.files
                    .call(http::Method::GET, &path, "", Vec::new())
                    .await?,
            )
        };
        let handle = self.add(open);
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::Write { path, data }) => {
                self.files.call(http::Method::PUT, &path, "", data).await?;
                Ok(ok(id))
            }
            Some(_) => Ok(ok(id)),
            None => Err(failure("unknown handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let data = match self.handles.get(&handle) {
            Some(Open::Read(d)) => d.clone(),
            Some(Open::Write { data, .. }) => bytes::Bytes::from(data.clone()),
            _ => return Err(failure("not a file handle")),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= data.len() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        let end = start.saturating_add(len as usize).min(data.len());
        Ok(Data {
            id,
            data: data[start..end].to_vec(),
        })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let Some(Open::Write { data, .. }) = self.handles.get_mut(&handle) else {
            return Err(failure("not a handle opened for writing"));
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(bytes.len());
        if end > 64 << 20 {
            return Err(failure("files over 64 MiB cannot be written over SFTP"));
        }
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(&bytes);
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let e = self.files.stat(&normalize(&path)).await?;
        Ok(Attrs {
            id,
            attrs: attrs_of(&e),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        self.lstat(id, path).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let size = match self.handles.get(&handle) {
            Some(Open::Read(d)) => d.len(),
            Some(Open::Write { data, .. }) => data.len(),
            _ => return Err(failure("not a file handle")),
        };
        let entry = FileEntry {
            name: String::new(),
            kind: FileKind::File,
            size: size as u64,
            modified_ms: None,
            mode: None,
        };
        Ok(Attrs {
            id,
            attrs: attrs_of(&entry),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        _path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        _handle: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(failure("too many open handles"));
        }
        let path = normalize(&path);
        if self.files.stat(&path).await?.kind != FileKind::Dir {
            return Err(failure("not a directory"));
        }
        let body = self
            .files
            .call(http::Method::GET, &path, "", Vec::new())
            .await?;
        let entries: Vec<FileEntry> = serde_json::from_slice(&body)
            .map_err(|e| failure(&format!("bad directory listing: {e}")))?;
        let handle = self.add(Open::Dir {
            entries,
            done: false,
        });
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir { entries, done }) = self.handles.get_mut(&handle) else {
            return Err(failure("not a directory handle"));
        };
        if *done {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        *done = true;
        let files = entries
            .iter()
            .map(|e| File::new(e.name.clone(), attrs_of(e)))
            .collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let path = normalize(&filename);
        if self.files.stat(&path).await?.kind == FileKind::Dir {
            return Err(failure("is a directory; use rmdir"));
        }
        self.files
            .call(http::Method::DELETE, &path, "", Vec::new())
            .await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        self.files
            .call(
                http::Method::POST,
                &normalize(&path),
                "?op=mkdir",
                Vec::new(),
            )
            .await?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let path = normalize(&path);
        if path.is_empty() {
            return Err(StatusReply::new(StatusCode::PermissionDenied)
                .with_message("the home cannot be removed"));
        }
        let body = self
            .files
            .call(http::Method::GET, &path, "", Vec::new())
            .await?;
        match serde_json::from_slice::<Vec<FileEntry>>(&body) {
            Ok(list) if list.is_empty() => {}
            Ok(_) => return Err(failure("directory not empty")),
            Err(_) => return Err(failure("not a directory")),
        }
        self.files
            .call(http::Method::DELETE, &path, "", Vec::new())
            .await?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let abs = format!("/{}", normalize(&path));
        Ok(Name {
            id,
            files: vec![File::dummy(abs)],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let to = encode_path(&normalize(&newpath));
        self.files
            .call(
                http::Method::POST,
                &normalize(&oldpath),
                &format!("?op=rename&to={to}"),
                Vec::new(),
            )
            .await?;
        Ok(ok(id))
    }
}

/// Serves SFTP on `channel` until the client closes it, then ends the
/// channel with exit status 0 (scp needs one).
pub(crate) async fn run(files: HostFiles, mut channel: Channel<Msg>) {
    use russh::ChannelMsg;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sftp = Sftp {
        files,
        handles: HashMap::new(),
        next: 0,
    };
    let (ours, theirs) = tokio::io::duplex(256 << 10);
    russh_sftp::server::run(theirs, sftp).await;
    let (mut rd, mut wr) = tokio::io::split(ours);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if channel.data(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                // The server answers what it has, then sees the end.
                Some(ChannelMsg::Eof) => {
                    let _ = wr.shutdown().await;
                }
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
        }
    }
    let _ = channel.exit_status(0).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sftp_paths_stay_under_the_home() {
        assert_eq!(normalize("/"), "");
        assert_eq!(normalize("."), "");
        assert_eq!(normalize("/a//b/./c"), "a/b/c");
        assert_eq!(normalize("a/../../.."), "");
        assert_eq!(normalize("/../etc/passwd"), "etc/passwd");
        assert_eq!(encode_path("a b/c%d"), "a%20b/c%25d");
    }
}
