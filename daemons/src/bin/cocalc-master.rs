//! `cocalc-master -c master.toml`: the federation's control plane.
//! Wiring only; the logic is in `cocalc_master::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cocalc_master::daemon::{self, DaemonConfig};

#[derive(Parser)]
#[command(
    name = "cocalc-master",
    version,
    about = "The cocalc federation's master"
)]
struct Args {
    /// Config file (TOML; see the cocalc_master::daemon docs).
    #[arg(short, long)]
    config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cocalc_daemons::daemon_main(
        "cocalc-master",
        &args.config,
        args.check_config,
        DaemonConfig::load,
        |cfg, signals| daemon::run(cfg, signals.nth(1)),
    )
}
