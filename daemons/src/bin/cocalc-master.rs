//! `cocalc-master -c master.toml`: the federation's control plane.
//! Wiring only; the logic is in `cocalc_master`.

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
    cocalc_daemons::init_logging();
    let args = Args::parse();
    let cfg = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cocalc-master: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if args.check_config {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocalc-master: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let master = daemon::build(&cfg).await?;
        let listener = daemon::bind(&cfg).await?;
        let addr = listener.local_addr().map_err(|e| daemon::DaemonError::Listen {
            addr: cfg.listen,
            message: e.to_string(),
        })?;
        tracing::info!(%addr, admin_key_file = %cfg.admin_key_path().display(), "cocalc-master listening");
        eprintln!("cocalc-master: listening on http://{addr}");
        daemon::serve(master, listener, daemon::shutdown_signal())
            .await
            .map_err(|e| daemon::DaemonError::Listen {
                addr,
                message: e.to_string(),
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocalc-master: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
