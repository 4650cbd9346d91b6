//! [`ProcessRunner`]: projects as plain process groups, for development.
//!
//! # ⚠ No isolation
//!
//! **This runner isolates nothing.** A project's programs run as the agent's
//! own user, see the whole file system, every other project and the host's
//! network, and no resource limit is applied ([`ProjectSpec::limits`] is
//! ignored). Use it on a developer's laptop without podman, never on a
//! machine that runs other people's code.
//!
//! Each project is a process group led by a small keep-alive shell started
//! in the project's home directory; [`exec`](Runner::exec) runs commands in
//! that group with `HOME` set to the home, and [`stop`](Runner::stop) signals
//! the whole group (`SIGTERM`, then `SIGKILL` after the grace). Images are
//! only names here: the [`ImagePolicy`] is checked so that callers see the
//! same errors as with podman, but nothing is pulled or run from an image.
//! Projects do not survive the runner: dropping it kills every group, and
//! [`list`](Runner::list) knows only the projects this instance started.
//! Terminals ([`pty`](Runner::pty)) are `setsid -c /bin/sh -i` on a
//! pseudo-terminal, each in its own session, killed on `close` and on stop.
//! [`ActivitySource`] samples count CPU time and processes of the group;
//! connections cannot be told apart from the host's and count as 0.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cocalc_core::{
    ExecEvent, ExecRequest, ExecStream, Generation, ProjectId, ProjectSpec, ProjectState,
    PtyControl, PtySession, PtySize, RunStatus, Runner, RunnerError, SharedClock, Timestamp,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::activity::{ActivitySample, ActivitySource};
use crate::image::ImagePolicy;

/// The keep-alive leader of every project group: sleeps until told to stop.
const KEEPALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

struct Proc {
    leader: Child,
    pgid: Pid,
    home: PathBuf,
    image: String,
    started_at: Timestamp,
    /// Session leaders of the project's terminals (each in its own session).
    terminals: Arc<Mutex<Vec<i32>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
        for t in lock(&self.terminals).drain(..) {
            crate::procfs::kill_session(t);
        }
    }
}

/// Runs each project as a process group on the host. **No isolation**: see
/// the [module documentation](self).
pub struct ProcessRunner {
    images: ImagePolicy,
    clock: SharedClock,
    procs: Mutex<HashMap<ProjectId, Proc>>,
    generations: Mutex<HashMap<ProjectId, Generation>>,
    project_locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ProcessRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRunner")
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

impl ProcessRunner {
    /// A runner that accepts the images of `images` (names only) and stamps
    /// start times from `clock`.
    pub fn new(images: ImagePolicy, clock: SharedClock) -> Self {
        ProcessRunner {
            images,
            clock,
            procs: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            project_locks: Mutex::new(HashMap::new()),
        }
    }

    fn project_lock(&self, p: ProjectId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.project_locks).entry(p).or_default().clone()
    }

    /// Status of a live entry, reaping it if the leader has exited.
    fn live_status(&self, project: ProjectId) -> RunStatus {
        let mut procs = lock(&self.procs);
        let alive = match procs.get_mut(&project) {
            Some(p) => matches!(p.leader.try_wait(), Ok(None)),
            None => false,
        };
        if !alive {
            procs.remove(&project);
            return RunStatus::stopped(project);
        }
        let p = &procs[&project];
        let mut st = RunStatus::stopped(project);
        st.state = ProjectState::Running;
        st.started_at = Some(p.started_at);
        st.image = Some(p.image.clone());
        st
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation: a panic cannot leave
    // the map half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks the generation rule shared by both runners: refuse older than
/// seen, remember newer.
pub(crate) fn check_generation(
    seen: &Mutex<HashMap<ProjectId, Generation>>,
    spec: &ProjectSpec,
) -> Result<(), RunnerError> {
    let mut seen = lock(seen);
    let entry = seen.entry(spec.project).or_insert(spec.generation);
    if spec.generation < *entry {
        return Err(RunnerError::StaleGeneration {
            project: spec.project,
            got: spec.generation,
            seen: *entry,
        });
    }
    *entry = spec.generation;
    Ok(())
}

#[async_trait]
impl Runner for ProcessRunner {
    async fn start(&self, spec: &ProjectSpec) -> Result<RunStatus, RunnerError> {
        let image = self.images.resolve(spec.image.as_deref())?;
        check_generation(&self.generations, spec)?;
        let guard = self.project_lock(spec.project);
        let _g = guard.lock().await;
        let st = self.live_status(spec.project);
        if st.state == ProjectState::Running {
            return Ok(st);
        }
        if !spec.home.is_dir() {
            return Err(RunnerError::InvalidRequest(format!(
                "home {} is not a directory",
                spec.home.display()
            )));
        }
        let leader = Command::new("/bin/sh")
            .arg("-c")
            .arg(KEEPALIVE)
            .current_dir(&spec.home)
            .env("HOME", &spec.home)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RunnerError::Backend(format!("spawning the project's shell: {e}")))?;
        let pid = leader
            .id()
            .ok_or_else(|| RunnerError::Backend("project shell exited at once".into()))?;
        let proc = Proc {
            leader,
            pgid: Pid::from_raw(pid as i32),
            home: spec.home.clone(),
            image,
            started_at: self.clock.now(),
            terminals: Arc::default(),
        };
        lock(&self.procs).insert(spec.project, proc);
        Ok(self.live_status(spec.project))
    }

    async fn stop(&self, project: ProjectId, grace: Duration) -> Result<(), RunnerError> {
        let guard = self.project_lock(project);
        let _g = guard.lock().await;
        let Some(mut proc) = lock(&self.procs).remove(&project) else {
            return Ok(());
        };
        let _ = killpg(proc.pgid, Signal::SIGTERM);
        if tokio::time::timeout(grace, proc.leader.wait())
            .await
            .is_err()
        {
            let _ = killpg(proc.pgid, Signal::SIGKILL);
            let _ = proc.leader.wait().await;
        }
        // Children that ignored SIGTERM go too (Proc's Drop sends SIGKILL).
        drop(proc);
        Ok(())
    }

    async fn status(&self, project: ProjectId) -> Result<RunStatus, RunnerError> {
        Ok(self.live_status(project))
    }

    async fn exec(&self, project: ProjectId, req: ExecRequest) -> Result<ExecStream, RunnerError> {
        self.run_command(project, req, None).await
    }

    async fn exec_streaming(
        &self,
        project: ProjectId,
        req: ExecRequest,
        input: cocalc_core::ByteStream,
    ) -> Result<ExecStream, RunnerError> {
        self.run_command(project, req, Some(input)).await
    }

    /// Projects share the host's network here: this connects to the host's
    /// own `127.0.0.1:port` (no isolation, as documented above).
    async fn connect_port(
        &self,
        project: ProjectId,
        port: u16,
    ) -> Result<cocalc_core::BoxedConnection, RunnerError> {
        if self.live_status(project).state != ProjectState::Running {
            return Err(RunnerError::NotRunning(project));
        }
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| {
                RunnerError::Backend(format!(
                    "connecting to port {port} of project {project}: {e}"
                ))
            })?;
        // Relayed traffic (a WebSocket's small frames) goes out at once.
        let _ = cocalc_client::liveness::tune(&s);
        Ok(Box::new(s))
    }

    async fn pty(&self, project: ProjectId, size: PtySize) -> Result<PtySession, RunnerError> {
        let (home, terminals) = {
            if self.live_status(project).state != ProjectState::Running {
                return Err(RunnerError::NotRunning(project));
            }
            let procs = lock(&self.procs);
            let p = &procs[&project];
            (p.home.clone(), p.terminals.clone())
        };
        let io = |what: &str, e: std::io::Error| RunnerError::Backend(format!("{what}: {e}"));
        let master = open_pty_master().map_err(|e| io("opening a pseudo-terminal", e))?;
        set_size(&master, size)?;
        let slave = open_pty_slave(&master).map_err(|e| io("opening the terminal", e))?;
        let mut cmd = std::process::Command::new("setsid");
        cmd.args(["-c", "/bin/sh", "-i"])
            .current_dir(&home)
            .env("HOME", &home)
            .env("TERM", "xterm-256color")
            .stdin(slave.try_clone().map_err(|e| io("dup", e))?)
            .stdout(slave.try_clone().map_err(|e| io("dup", e))?)
            .stderr(slave);
        let mut child = cmd.spawn().map_err(|e| io("starting the shell", e))?;
        drop(cmd); // our copies of the terminal's slave side
        let pid = child.id() as i32;
        lock(&terminals).push(pid);
        let master = Arc::new(master);
        let reader = master.try_clone().map_err(|e| io("dup", e))?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(64);
        std::thread::Builder::new()
            .name(format!("pty-{pid}"))
            .spawn(move || {
                use std::io::Read;
                let mut reader = reader;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx
                                .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                                .is_err()
                            {
                                break;
                            }
                        }
                        // EIO: every slave side is closed (the shell is gone).
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            break;
                        }
                    }
                }
                let _ = child.wait();
                lock(&terminals).retain(|t| *t != pid);
            })
            .map_err(|e| io("starting the terminal reader", e))?;
        Ok(PtySession {
            output: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
            control: Box::new(ProcessPty { master, pid }),
        })
    }

    async fn list(&self) -> Result<Vec<RunStatus>, RunnerError> {
        let ids: Vec<ProjectId> = lock(&self.procs).keys().copied().collect();
        Ok(ids
            .into_iter()
            .map(|p| self.live_status(p))
            .filter(|s| s.state == ProjectState::Running)
            .collect())
    }
}

#[async_trait]
impl ActivitySource for ProcessRunner {
    async fn sample(&self, project: ProjectId) -> Result<Option<ActivitySample>, RunnerError> {
        if self.live_status(project).state != ProjectState::Running {
            return Ok(None);
        }
        let (pgid, terminals) = {
            let procs = lock(&self.procs);
            let Some(p) = procs.get(&project) else {
                return Ok(None);
            };
            let terminals: Vec<i32> = lock(&p.terminals).clone();
            (p.pgid.as_raw(), terminals)
        };
        let tick_us = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(t)) if t > 0 => 1_000_000 / t as u64,
            _ => 10_000,
        };
        let mut pids = crate::procfs::group_members(pgid);
        for t in terminals {
            pids.extend(crate::procfs::session_members(t));
        }
        pids.sort_unstable();
        pids.dedup();
        let mut ticks = 0u64;
        for pid in &pids {
            if let Some(f) = crate::procfs::stat_fields(*pid) {
                // utime, stime, and the reaped children's cutime, cstime.
                ticks += (11..=14)
                    .filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
                    .sum::<u64>();
            }
        }
        Ok(Some(ActivitySample {
            cpu_time_us: ticks * tick_us,
            processes: pids.len() as u64,
            connections: 0,
        }))
    }
}

/// The input side of a [`ProcessRunner`] terminal.
struct ProcessPty {
    master: Arc<std::fs::File>,
    pid: i32,
}

#[async_trait]
impl PtyControl for ProcessPty {
    async fn write(&self, data: Bytes) -> Result<(), RunnerError> {
        let master = self.master.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            (&*master).write_all(&data)
        })
        .await
        .map_err(|e| RunnerError::Backend(format!("terminal writer: {e}")))?
        .map_err(|e| RunnerError::Backend(format!("writing to terminal: {e}")))
    }

    async fn resize(&self, size: PtySize) -> Result<(), RunnerError> {
        set_size(&self.master, size)
    }

    async fn close(&self) -> Result<(), RunnerError> {
        crate::procfs::kill_session(self.pid);
        Ok(())
    }
}

fn open_pty_master() -> std::io::Result<std::fs::File> {
    use rustix::pty::{grantpt, openpt, unlockpt, OpenptFlags};
    let fd = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&fd)?;
    unlockpt(&fd)?;
    Ok(std::fs::File::from(fd))
}

fn open_pty_slave(master: &std::fs::File) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = rustix::pty::ptsname(master, Vec::new())?;
    let path = name
        .to_str()
        .map_err(|_| std::io::Error::other("terminal name is not UTF-8"))?
        .to_string();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        // Never become the agent's own controlling terminal.
        .custom_flags(libc::O_NOCTTY)
        .open(path)
}

fn set_size(master: &std::fs::File, size: PtySize) -> Result<(), RunnerError> {
    let ws = rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, ws)
        .map_err(|e| RunnerError::Backend(format!("resizing terminal: {e}")))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn pump<R: AsyncRead + Unpin + Send + 'static>(
    mut r: R,
    tx: mpsc::Sender<Result<ExecEvent, RunnerError>>,
    wrap: fn(Bytes) -> ExecEvent,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .send(Ok(wrap(Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(RunnerError::Backend(format!("reading output: {e}"))))
                        .await;
                    return;
                }
            }
        }
    })
}

/// `cwd` relative to the home (absolute paths must lie inside it); `..` is
/// refused.
fn resolve_cwd(home: &Path, cwd: Option<&str>) -> Result<PathBuf, RunnerError> {
    let Some(cwd) = cwd else {
        return Ok(home.to_path_buf());
    };
    let p = Path::new(cwd);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(RunnerError::InvalidRequest(format!(
            "cwd {cwd:?} leaves the project"
        )));
    }
    let full = if p.is_absolute() {
        if !p.starts_with(home) {
            return Err(RunnerError::InvalidRequest(format!(
                "cwd {cwd:?} is outside the project's home"
            )));
        }
        p.to_path_buf()
    } else {
        home.join(p)
    };
    Ok(full)
}

impl ProcessRunner {
    /// An exec; with `input`, stdin stays open and carries it.
    async fn run_command(
        &self,
        project: ProjectId,
        req: ExecRequest,
        input: Option<cocalc_core::ByteStream>,
    ) -> Result<ExecStream, RunnerError> {
        if req.argv.is_empty() {
            return Err(RunnerError::InvalidRequest("empty argv".into()));
        }
        let (pgid, home) = {
            let st = self.live_status(project);
            if st.state != ProjectState::Running {
                return Err(RunnerError::NotRunning(project));
            }
            let procs = lock(&self.procs);
            let p = &procs[&project];
            (p.pgid, p.home.clone())
        };
        let cwd = resolve_cwd(&home, req.cwd.as_deref())?;
        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..])
            .current_dir(cwd)
            .env("HOME", &home)
            .envs(&req.env)
            .process_group(pgid.as_raw())
            .stdin(if req.stdin.is_some() || input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RunnerError::InvalidRequest(format!("command not found: {}", req.argv[0]))
            }
            _ => RunnerError::Backend(format!("spawning {}: {e}", req.argv[0])),
        })?;
        if let Some(mut w) = child.stdin.take() {
            let first = req.stdin;
            tokio::spawn(async move {
                use futures_util::StreamExt;
                if let Some(data) = first {
                    if w.write_all(&data).await.is_err() {
                        return;
                    }
                }
                if let Some(mut input) = input {
                    while let Some(Ok(chunk)) = input.next().await {
                        if w.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
        let (tx, rx) = mpsc::channel(64);
        let out = child
            .stdout
            .take()
            .map(|o| pump(o, tx.clone(), ExecEvent::Stdout));
        let err = child
            .stderr
            .take()
            .map(|e| pump(e, tx.clone(), ExecEvent::Stderr));
        let timeout = req.timeout;
        tokio::spawn(async move {
            let wait = async {
                if let Some(o) = out {
                    let _ = o.await;
                }
                if let Some(e) = err {
                    let _ = e.await;
                }
                child.wait().await
            };
            // The reader gone (a dropped stream, a closed exec socket) ends
            // the command like a timeout: `child` is dropped, kill_on_drop.
            let limit = timeout.unwrap_or(Duration::MAX);
            let res = tokio::select! {
                r = tokio::time::timeout(limit, wait) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = tx.send(Err(RunnerError::Timeout(limit))).await;
                        return;
                    }
                },
                _ = tx.closed() => return,
            };
            let ev = match res {
                Ok(status) => Ok(ExecEvent::Exit(exit_code(status))),
                Err(e) => Err(RunnerError::Backend(format!("waiting for command: {e}"))),
            };
            let _ = tx.send(ev).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cwd_stays_inside_the_home() {
        let home = Path::new("/srv/p");
        assert_eq!(resolve_cwd(home, None).unwrap(), home);
        assert_eq!(resolve_cwd(home, Some("a/b")).unwrap(), home.join("a/b"));
        assert!(resolve_cwd(home, Some("../x")).is_err());
        assert!(resolve_cwd(home, Some("/etc")).is_err());
        assert_eq!(
            resolve_cwd(home, Some("/srv/p/x")).unwrap(),
            Path::new("/srv/p/x")
        );
    }
}
