//! Shared wiring for the cocalc binaries: argument types and the mapping of
//! failures to exit codes. Logic belongs in the library crates; this holds
//! only what the command line itself needs.

use std::time::Duration;

pub mod dev;
pub mod shell;

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resident set size of a process in KiB (`VmRSS` of `/proc/<pid>/status`),
/// 0 if it cannot be read. Used by the memory benchmarks.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A daemon's start-up failure, with the exit code it maps to.
pub trait DaemonFailure: std::fmt::Display {
    /// Process exit code (2: configuration, 1: anything else).
    fn exit_code(&self) -> u8;
}

impl DaemonFailure for cocalc_master::daemon::DaemonError {
    fn exit_code(&self) -> u8 {
        cocalc_master::daemon::DaemonError::exit_code(self)
    }
}

impl DaemonFailure for cocalc_proxy::daemon::ProxyDaemonError {
    fn exit_code(&self) -> u8 {
        cocalc_proxy::daemon::ProxyDaemonError::exit_code(self)
    }
}

impl DaemonFailure for cocalc_host::daemon::HostDaemonError {
    fn exit_code(&self) -> u8 {
        cocalc_host::daemon::HostDaemonError::exit_code(self)
    }
}

/// The whole `main` of a daemon: logging, config (or `--check-config`),
/// a runtime, `run` with the stop signals it is to obey ([`StopSignals`]),
/// and the exit code.
pub fn daemon_main<C, E: DaemonFailure, F>(
    name: &str,
    config: &std::path::Path,
    check_only: bool,
    load: impl FnOnce(&std::path::Path) -> Result<C, E>,
    run: impl FnOnce(C, StopSignals) -> F,
) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
{
    use std::process::ExitCode;
    init_logging();
    let cfg = match load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if check_only {
        println!("{}: ok", config.display());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(async { run(cfg, StopSignals::listen()).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// SIGINT and SIGTERM as they arrive, counted, so a daemon can tell the
/// first stop signal (stop in order) from a second (stop sooner).
#[derive(Clone)]
pub struct StopSignals {
    count: tokio::sync::watch::Receiver<u32>,
}

impl StopSignals {
    /// Starts counting stop signals in a task; call it inside a tokio
    /// runtime. Signals before this call are not counted.
    pub fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, count) = tokio::sync::watch::channel(0u32);
        // Registered here, not in the task, so a signal right after
        // `listen` returns is already counted.
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int)) = (term, int) else {
                // No signal handling (never on Linux): no count ever.
                return std::future::pending().await;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        StopSignals { count }
    }

    /// Completes once `n` stop signals have arrived (`n` = 1: the first).
    pub fn nth(&self, n: u32) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let mut count = self.count.clone();
        Box::pin(async move {
            // An error means the counting task is gone: no more signals.
            if count.wait_for(|c| *c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Parses a duration written as a number with an optional unit:
/// `90` or `90s` (seconds), `10m` (minutes), `2h` (hours), `1d` (days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number with unit s, m, h or d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: use s, m, h or d"
            ))
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// A command-line failure: what to print and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// One line for stderr.
    pub message: String,
    /// Process exit code (see [`cocalc_core::ApiError::exit_code`]).
    pub code: i32,
}

impl CliError {
    /// A usage or input error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 2,
        }
    }

    /// An error carrying the exit code of an API error.
    pub fn api(e: &cocalc_core::ApiError) -> Self {
        CliError {
            message: e.message.clone(),
            code: e.exit_code(),
        }
    }

    /// A local I/O or environment failure (exit code 1).
    pub fn local(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10 minutes").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
