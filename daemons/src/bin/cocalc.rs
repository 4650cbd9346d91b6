//! `cocalc`: the operator's and user's command-line client.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cocalc_auth::keys::load_secret_file;
use cocalc_auth::{KeySet, MintRequest, Minter, Verifier};
use cocalc_core::{
    ApiError, Clock, Generation, HostId, Permission, ProjectId, SystemClock, UserId,
};
use cocalc_daemons::{parse_duration, CliError};

#[derive(Parser)]
#[command(
    name = "cocalc",
    version,
    about = "Command-line client of the cocalc federation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a token-signing keypair as PASERK files in a directory.
    Keygen {
        /// Directory to write `k4-<ms>.secret` (mode 0600) and `.public` into.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Mint and verify connect tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a connect token and print it.
    Mint {
        /// A `k4-*.secret` file, or a key directory (its newest key signs).
        #[arg(long)]
        key: PathBuf,
        /// User id (canonical UUID).
        #[arg(long)]
        user: UserId,
        /// Project id (canonical UUID).
        #[arg(long)]
        project: ProjectId,
        /// Host id the token is for (canonical UUID).
        #[arg(long)]
        host: HostId,
        /// read, write or admin.
        #[arg(long, default_value = "write")]
        perm: Permission,
        /// Lifetime: 90s, 10m, 1h (60 s to 30 min).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: Duration,
        /// The project's placement generation.
        #[arg(long, default_value_t = 1)]
        generation: u64,
        /// Issuer name.
        #[arg(long, default_value = "cocalc-master")]
        issuer: String,
    },
    /// Verify a token: prints its claims as JSON, or one line saying why not.
    Verify {
        /// Key directory with the trusted `k4-*.public` files.
        #[arg(long)]
        keys: PathBuf,
        /// This host's id: tokens for other hosts are refused.
        #[arg(long)]
        host: HostId,
        /// The token.
        token: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocalc: {}", e.message);
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let clock = Arc::new(SystemClock);
    match cli.command {
        Command::Keygen { dir } => {
            let keys = KeySet::generate(clock.now()).map_err(|e| CliError::local(e.to_string()))?;
            keys.save_dir(&dir)
                .map_err(|e| CliError::local(e.to_string()))?;
            let k = &keys.keys()[0];
            println!("{}", k.kid);
            eprintln!(
                "wrote {}/k4-{}.secret (mode 0600) and .public",
                dir.display(),
                k.created.as_millis()
            );
            Ok(())
        }
        Command::Token { command } => match command {
            TokenCommand::Mint {
                key,
                user,
                project,
                host,
                perm,
                ttl,
                generation,
                issuer,
            } => {
                let keys = load_signing_keys(&key)?;
                let minter = Minter::new(issuer, keys, clock);
                let (token, _) = minter
                    .mint(&MintRequest {
                        user,
                        project,
                        host,
                        generation: Generation(generation),
                        permission: perm,
                        ttl,
                    })
                    .map_err(|e| CliError::usage(e.to_string()))?;
                println!("{token}");
                Ok(())
            }
            TokenCommand::Verify { keys, host, token } => {
                let keys = KeySet::load_dir(&keys).map_err(|e| CliError::local(e.to_string()))?;
                let verifier = Verifier::new(host, keys, clock);
                match verifier.verify_uncached(token.trim()) {
                    Ok(claims) => {
                        let json = serde_json::to_string_pretty(&claims)
                            .map_err(|e| CliError::local(e.to_string()))?;
                        println!("{json}");
                        Ok(())
                    }
                    Err(e) => {
                        let api = ApiError::from(&e);
                        Err(CliError {
                            message: format!("token refused ({}): {e}", api.code),
                            code: api.exit_code(),
                        })
                    }
                }
            }
        },
    }
}

fn load_signing_keys(path: &Path) -> Result<KeySet, CliError> {
    let local = |e: cocalc_auth::KeyError| CliError::local(e.to_string());
    if path.is_dir() {
        return KeySet::load_dir(path).map_err(local);
    }
    let entry = load_secret_file(path).map_err(local)?;
    let mut set = KeySet::new();
    let sk = entry
        .secret
        .ok_or_else(|| CliError::local("no secret key in file"))?;
    set.insert_secret(sk, entry.created);
    Ok(set)
}
