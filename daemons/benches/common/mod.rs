//! Helpers shared by the benches that run the daemon binaries.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A daemon process, stopped when dropped: SIGTERM first (so nginx's
/// master takes its workers down with it), SIGKILL after 3 s.
pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin -c cfg` and waits for a stderr line containing `ready`;
/// returns the daemon and the line's last word (its URL).
pub(crate) fn spawn(bin: &str, cfg: &Path, ready: &str) -> (Daemon, String) {
    spawn_under(&[], bin, cfg, ready)
}

/// Like [`spawn`], with the daemon started under `wrapper` (a command and
/// its arguments, such as valgrind's) when that is not empty.
pub(crate) fn spawn_under(
    wrapper: &[&str],
    bin: &str,
    cfg: &Path,
    ready: &str,
) -> (Daemon, String) {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut child = cmd
        .args(["-c", cfg.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = loop {
        let l = lines.next().expect("daemon exited").unwrap();
        if l.contains(ready) {
            break l;
        }
    };
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = line.rsplit(' ').next().unwrap().to_string();
    (Daemon(child), url)
}

/// Starts a `cocalc-master` (its own binary, `master_bin`) with its data
/// in `dir/m`; returns it, its URL and an admin client.
pub(crate) fn spawn_master(
    master_bin: &str,
    dir: &Path,
) -> (Daemon, String, cocalc_client::MasterClient) {
    let cfg = dir.join("m.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.join("m").display()
        ),
    )
    .unwrap();
    let (daemon, url) = spawn(master_bin, &cfg, "listening on");
    let admin = std::fs::read_to_string(dir.join("m/admin.key")).unwrap();
    let client = cocalc_client::MasterClient::new(&url, admin.trim());
    (daemon, url, client)
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU time (user + system) used so far by `pid` and all its child
/// processes that are still running (nginx's workers), from `/proc`.
pub(crate) fn cpu_time(pid: u32) -> std::time::Duration {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // Fields after the command name: state is 1st, ppid 2nd, utime 12th,
    // stime 13th (proc(5), counting from state).
    let fields = |p: &str| -> Option<Vec<String>> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        Some(rest.split(' ').map(str::to_string).collect())
    };
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(f) = fields(&name) else { continue };
        if name == pid.to_string() || f.get(1).map(String::as_str) == Some(&pid.to_string()) {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += n(11) + n(12);
        }
    }
    std::time::Duration::from_secs_f64(ticks as f64 / tick)
}

/// CPU time (user + system) used so far by this process alone (all its
/// threads, none of its children), from `/proc/self/stat`.
#[allow(dead_code)] // used by some of the benches that share this module
pub(crate) fn own_cpu_time() -> std::time::Duration {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rfind(')').map_or("", |i| &s[i + 2..]);
    let f: Vec<u64> = rest.split(' ').map(|v| v.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    std::time::Duration::from_secs_f64(ticks as f64 / tick)
}

/// Instructions executed in user space by `pid` — a process running
/// under `valgrind --tool=callgrind` — since its counters were last
/// zeroed, summed over its threads as `callgrind_control -e Ir` reports
/// them.
pub(crate) fn callgrind_ir(pid: u32) -> u64 {
    let out = Command::new("callgrind_control")
        .args(["-e", "Ir", &pid.to_string()])
        .output()
        .expect("callgrind_control (valgrind) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    // One line per thread after "Totals:": "Th <n> <count>".
    let counts: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("Totals:"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("Th")).then_some(())?;
            w.nth(1)?.replace(',', "").parse().ok()
        })
        .collect();
    assert!(
        !counts.is_empty(),
        "no per-thread totals in callgrind_control output: {text}"
    );
    counts.iter().sum()
}

/// Zeroes the event counters of `pid`, a process under callgrind.
pub(crate) fn callgrind_zero(pid: u32) {
    callgrind_control("-z", pid);
}

/// Writes the profile of `pid` (a process under callgrind) since its
/// counters were last zeroed to its output file, and zeroes them.
pub(crate) fn callgrind_dump(pid: u32) {
    callgrind_control("--dump", pid);
}

fn callgrind_control(action: &str, pid: u32) {
    let ok = Command::new("callgrind_control")
        .args([action, &pid.to_string()])
        .output()
        .expect("callgrind_control (valgrind) is installed")
        .status
        .success();
    assert!(ok, "callgrind_control {action} {pid} failed");
}
