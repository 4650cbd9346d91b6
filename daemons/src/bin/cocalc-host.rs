//! `cocalc-host -c host.toml`: a project-host. Wiring only; the logic is in
//! `cocalc_host`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cocalc_host::daemon::{self, HostConfig, HostDaemonError};

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
    cocalc_daemons::init_logging();
    let args = Args::parse();
    let cfg = match HostConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cocalc-host: {e}");
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
            eprintln!("cocalc-host: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), HostDaemonError> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| HostDaemonError::Start(format!("listen on {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HostDaemonError::Start(e.to_string()))?;
        let public = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let host = daemon::build(&cfg, public.clone()).await?;
        eprintln!("cocalc-host: {} listening on {public}", host.agent.host());
        host.run(listener, cocalc_daemons::shutdown_signal())
            .await
            .map_err(|e| HostDaemonError::Start(e.to_string()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocalc-host: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
