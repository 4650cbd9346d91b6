//! `cocalc-proxy -c proxy.toml`: HTTP/WebSocket ingress into projects.
//! Wiring only; the logic is in `cocalc_proxy`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cocalc_proxy::daemon::{self, ProxyConfig};

/// mimalloc rather than the system allocator: about 1,200 fewer
/// instructions per proxied request (`cargo bench -p cocalc-daemons --bench
/// proxy -- --callgrind`), where every request allocates a few dozen times.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cocalc-proxy", version, about = "Ingress into cocalc projects")]
struct Args {
    /// Config file (TOML; see the cocalc_proxy::daemon docs).
    #[arg(short, long)]
    config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cocalc_daemons::daemon_main(
        "cocalc-proxy",
        &args.config,
        args.check_config,
        ProxyConfig::load,
        // The first signal starts the drain, a second ends it.
        |cfg, signals| daemon::run_until(cfg, signals.nth(1), signals.nth(2)),
    )
}
