//! Small helpers over `/proc` shared by the runners.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Sends `SIGKILL` to `leader` and to every process whose session id is
/// `leader` (a terminal's shell and everything it started), by host pid.
pub(crate) fn kill_session(leader: i32) {
    let mut victims = vec![leader];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if stat_fields(pid).and_then(|f| f.get(3).and_then(|s| s.parse::<i32>().ok()))
                == Some(leader)
            {
                victims.push(pid);
            }
        }
    }
    for v in victims {
        let _ = kill(Pid::from_raw(v), Signal::SIGKILL);
    }
}

/// The fields of `/proc/PID/stat` after the parenthesised command name:
/// index 0 is the state (field 3 in proc(5)), 1 ppid, 2 pgrp, 3 session,
/// 11 utime, 12 stime, 13 cutime, 14 cstime, 19 starttime.
pub(crate) fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// Pids of every process in process group `pgid`.
pub(crate) fn group_members(pgid: i32) -> Vec<i32> {
    members(2, pgid)
}

/// Pids of every process in session `sid`.
pub(crate) fn session_members(sid: i32) -> Vec<i32> {
    members(3, sid)
}

fn members(field: usize, id: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if stat_fields(pid).and_then(|f| f.get(field).and_then(|s| s.parse::<i32>().ok()))
                == Some(id)
            {
                out.push(pid);
            }
        }
    }
    out
}
