//! The podman API service a runner owns, and the configuration files it
//! writes for podman.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::{Docker, API_DEFAULT_VERSION};

use super::PodmanError;

/// Where podman keeps images and containers, when the runner should not use
/// podman's default storage (tests keep theirs in a temporary directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageDirs {
    /// Images and container layers (`graphroot`).
    pub graphroot: PathBuf,
    /// Runtime state (`runroot`).
    pub runroot: PathBuf,
    /// Storage driver, e.g. `"vfs"` or `"overlay"`.
    pub driver: String,
}

/// The files and environment that make every podman call (service or CLI)
/// use the runner's settings: runc, cgroupfs, `nofile`+`nproc` ulimits,
/// `netns=none`, file events, and optionally its own storage.
#[derive(Debug, Clone)]
pub struct PodmanEnv {
    containers_conf: PathBuf,
    storage_conf: Option<PathBuf>,
}

impl PodmanEnv {
    /// Writes `containers.conf` (and `storage.conf` if `storage` is given)
    /// into `state_dir`, creating it.
    pub fn write(state_dir: &Path, storage: Option<&StorageDirs>) -> Result<Self, PodmanError> {
        let io = |what: &str, e: std::io::Error| {
            PodmanError::Setup(format!("{what} in {}: {e}", state_dir.display()))
        };
        let tmp = state_dir.join("libpod-tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| io("creating libpod-tmp", e))?;
        let containers_conf = state_dir.join("containers.conf");
        let conf = format!(
            r#"# Written by cocalc-host's PodmanRunner; rewritten on every start.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = {tmp:?}
# API exec sessions are inspected right after they end; do not keep a
# conmon per exec around for podman's default 5 minutes.
exit_command_delay = 10
[engine.runtimes]
runc = ["/usr/sbin/runc", "/usr/bin/runc"]
"#,
            tmp = tmp.display().to_string(),
        );
        write_file(&containers_conf, &conf).map_err(|e| io("writing containers.conf", e))?;
        let storage_conf = match storage {
            None => None,
            Some(s) => {
                let p = state_dir.join("storage.conf");
                let text = format!(
                    "[storage]\ndriver = {:?}\ngraphroot = {:?}\nrunroot = {:?}\n",
                    s.driver,
                    s.graphroot.display().to_string(),
                    s.runroot.display().to_string(),
                );
                write_file(&p, &text).map_err(|e| io("writing storage.conf", e))?;
                Some(p)
            }
        };
        Ok(PodmanEnv {
            containers_conf,
            storage_conf,
        })
    }

    /// Adds the environment variables to a command.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", &self.containers_conf);
        if let Some(s) = &self.storage_conf {
            cmd.env("CONTAINERS_STORAGE_CONF", s);
        }
    }

    /// The same for a tokio command.
    pub fn apply_tokio(&self, cmd: &mut tokio::process::Command) {
        cmd.env("CONTAINERS_CONF", &self.containers_conf);
        if let Some(s) = &self.storage_conf {
            cmd.env("CONTAINERS_STORAGE_CONF", s);
        }
    }
}

fn write_file(p: &Path, text: &str) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, p)
}

/// A `podman system service` process started by the runner; stopped
/// (`SIGTERM`, then `SIGKILL` after 5 s) when dropped, and only then: it
/// runs in a process group of its own, so signals sent to its owner's group
/// (a terminal's Ctrl-C) leave it to answer the owner's shutdown.
#[derive(Debug)]
pub struct PodmanService {
    child: Child,
    socket: PathBuf,
}

impl PodmanService {
    /// Starts `podman system service --time=0 unix://SOCKET` with `env` and
    /// waits (up to 30 s) until it answers a ping. Its log goes to
    /// `service.log` beside the socket.
    pub async fn start(socket: &Path, env: &PodmanEnv) -> Result<(Self, Docker), PodmanError> {
        let _ = std::fs::remove_file(socket);
        let dir = socket.parent().unwrap_or(Path::new("."));
        let log = std::fs::File::create(dir.join("service.log"))
            .map_err(|e| PodmanError::Setup(format!("creating service.log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| PodmanError::Setup(format!("service.log: {e}")))?;
        let mut cmd = Command::new("podman");
        cmd.args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a terminal's Ctrl-C reaches the whole
            // foreground group at once, and the service must outlive its
            // owner's shutdown long enough to stop the containers.
            .process_group(0);
        env.apply(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| PodmanError::Setup(format!("starting `podman system service`: {e}")))?;
        let mut svc = PodmanService {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = svc.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("service.log")).unwrap_or_default();
                return Err(PodmanError::Setup(format!(
                    "`podman system service` exited with {status}: {}",
                    log.trim()
                )));
            }
            if socket.exists() {
                if let Ok(d) = connect(socket) {
                    if d.ping().await.is_ok() {
                        return Ok((svc, d));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(PodmanError::Setup(format!(
                    "podman service did not answer on {} within 30 s",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Connects bollard to a podman socket (no version negotiation: podman
/// reports API 1.41 but accepts bollard's paths).
pub fn connect(socket: &Path) -> Result<Docker, PodmanError> {
    let path = socket
        .to_str()
        .ok_or_else(|| PodmanError::Setup(format!("socket path {socket:?} is not UTF-8")))?;
    Docker::connect_with_socket(path, 120, API_DEFAULT_VERSION)
        .map_err(|e| PodmanError::Setup(format!("connecting to {path}: {e}")))
}
