//! `cocalc-host -c host.toml`: a project-host. Wiring only; the logic is in
//! `cocalc_host::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cocalc_host::daemon::{self, HostConfig};

#[derive(Parser)]
#[command(name = "cocalc-host", version, about = "A cocalc project-host")]
struct Args {
    /// Config file (TOML; see the cocalc_host::daemon docs).
    #[arg(short, long)]
    config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cocalc_daemons::daemon_main(
        "cocalc-host",
        &args.config,
        args.check_config,
        HostConfig::load,
        |cfg, signals| daemon::run(cfg, signals.nth(1)),
    )
}
