//! `cocalc`: the operator's and user's command-line client.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cocalc_auth::keys::load_secret_file;
use cocalc_auth::{KeySet, MintRequest, Minter, Verifier};
use cocalc_core::wire::CreateProjectRequest;
use cocalc_core::{
    ApiError, Clock, ExecRequest, Generation, HostEndpoint, HostId, Permission, ProjectId,
    SystemClock, UserId,
};
use cocalc_daemons::{parse_duration, CliError};
use cocalc_host::HostClient;
use cocalc_master::MasterClient;

#[derive(Parser)]
#[command(
    name = "cocalc",
    version,
    about = "Command-line client of the cocalc federation"
)]
struct Cli {
    /// The master's base URL.
    #[arg(
        long,
        global = true,
        env = "COCALC_MASTER",
        default_value = "http://127.0.0.1:8080"
    )]
    master: String,
    /// API key for the master (a user's key, or the admin key).
    #[arg(long, global = true, env = "COCALC_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
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
    /// Users (admin).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Projects.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Hosts (admin).
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// The master's signing keys (admin).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// API keys for proxies: host and signing-key lookups and SSH
    /// authorizations only (admin).
    ProxyKey {
        #[command(subcommand)]
        command: ProxyKeyCommand,
    },
    /// Your SSH public keys (for `ssh project-<uuid>@proxy`).
    SshKey {
        #[command(subcommand)]
        command: SshKeyCommand,
    },
    /// Files of a project.
    File {
        #[command(subcommand)]
        command: FileCommand,
    },
    /// An interactive terminal in a project.
    Shell {
        /// Project name or id.
        project: String,
    },
    /// A local federation for development.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start a master and hosts on loopback with a demo user and project;
    /// Ctrl-C stops everything.
    Up {
        /// State directory (default ~/.local/state/cocalc-dev).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Master port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Number of hosts.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// auto (podman + Btrfs when root and present), process or podman.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Port of the ingress proxy (0: none; default: the master's port + 1).
        #[arg(long)]
        proxy_port: Option<u16>,
        /// Hidden hosts besides --hosts: no listening socket, served through
        /// a reverse tunnel to the proxy (default 1 with a proxy, 0 without).
        #[arg(long)]
        hidden_hosts: Option<usize>,
        /// Port of the proxy's SSH server (0: none; default: the master's port + 2).
        #[arg(long)]
        ssh_port: Option<u16>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; prints its id and API key (shown only once).
    Create {
        /// Unique user name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project you own.
    Create {
        /// Its name (unique among your projects).
        name: String,
        /// Image to run (default: the host's).
        #[arg(long)]
        image: Option<String>,
    },
    /// List your projects.
    List,
    /// Open a project: place it if needed; prints its host and a connect token.
    Open {
        /// Project name or id.
        project: String,
    },
    /// Explain why a project is on its host.
    Explain {
        /// Project name or id.
        project: String,
    },
    /// Run a command in a project; prints its output and exits with its code.
    Exec {
        /// Project name or id.
        project: String,
        /// Kill the command after this long (90s, 10m).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Re-place a project whose host is down or draining (admin; bumps the
    /// generation, the old host refuses it from then on).
    Replace {
        /// Project id.
        project: String,
    },
    /// Move a project to another host with its data (admin): a full copy
    /// while it runs, a short stop for the changes since, then the map
    /// flips and the old host's copy is deleted. Waits for the end unless
    /// --no-wait; a move that fails is rolled back (exit status 1).
    Move {
        /// Project id.
        project: String,
        /// The target host's id; by default placement picks one.
        #[arg(long)]
        to: Option<HostId>,
        /// Answer once the move has begun (see `cocalc project move-status`).
        #[arg(long)]
        no_wait: bool,
    },
    /// The latest move of a project (admin).
    MoveStatus {
        /// Project id.
        project: String,
    },
    /// Start a project (idempotent).
    Start {
        /// Project name or id.
        project: String,
    },
    /// Stop a project.
    Stop {
        /// Project name or id.
        project: String,
    },
    /// Show a project's state on its host.
    Status {
        /// Project name or id.
        project: String,
    },
    /// Back a project up now (its host must have a `[backup]` store).
    Backup {
        /// Project name or id.
        project: String,
    },
    /// List a project's backups, oldest first (from every host).
    Backups {
        /// Project name or id.
        project: String,
    },
    /// Restore a path, or the whole (stopped) project, from a backup. The
    /// state before is kept as a snapshot.
    Restore {
        /// Project name or id.
        project: String,
        /// Backup id (from `cocalc project backups`).
        backup: String,
        /// Only this path, relative to the project's home.
        #[arg(long)]
        path: Option<String>,
    },
}

#[derive(Subcommand)]
enum FileCommand {
    /// List a directory of a project.
    Ls {
        /// Project name or id.
        project: String,
        /// Directory (default: the home).
        #[arg(default_value = "")]
        path: String,
    },
    /// Write a file's content to stdout.
    Get {
        /// Project name or id.
        project: String,
        /// File path in the project.
        path: String,
    },
    /// Replace a file with stdin.
    Put {
        /// Project name or id.
        project: String,
        /// File path in the project.
        path: String,
    },
    /// Remove a file or directory tree.
    Rm {
        /// Project name or id.
        project: String,
        /// Path in the project.
        path: String,
    },
    /// Create a directory (and its parents).
    Mkdir {
        /// Project name or id.
        project: String,
        /// Path in the project.
        path: String,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// List hosts with state, load and lease.
    List,
    /// Stop placing new projects on a host.
    Drain {
        /// Host id.
        host: HostId,
    },
    /// Resume placing projects on a host.
    Undrain {
        /// Host id.
        host: HostId,
    },
    /// Drain a host and move every project off it, one at a time, each to
    /// the host placement picks (see `cocalc project move`). Waits until
    /// each has left (or its move rolled back) unless --no-wait; exit
    /// status 1 if any is still there.
    Evacuate {
        /// Host id.
        host: HostId,
        /// Answer once the evacuation has begun.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (30m, 2h); the moves go on.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        timeout: Duration,
    },
    /// Delete the copy of a project a host holds although the project
    /// lives elsewhere (left by an earlier placement; a move into that host
    /// refuses it with volume_exists). Refused for the live copy.
    DiscardCopy {
        /// Host id.
        host: HostId,
        /// Project id.
        project: String,
    },
    /// Mint a one-time token a new host registers with (valid 24 h).
    BootstrapToken,
}

#[derive(Subcommand)]
enum SshKeyCommand {
    /// Register a public key (one OpenSSH line, e.g. ~/.ssh/id_ed25519.pub).
    Add {
        /// The `.pub` file, or `-` for stdin (default: ~/.ssh/id_ed25519.pub).
        file: Option<PathBuf>,
    },
    /// List your keys with their fingerprints.
    List,
    /// Remove a key by its fingerprint (`SHA256:…`).
    Rm {
        /// Fingerprint as `cocalc ssh-key list` or `ssh-keygen -l` prints it.
        fingerprint: String,
    },
}

#[derive(Subcommand)]
enum ProxyKeyCommand {
    /// Create a key; prints it (shown only once) for the proxy's
    /// `api_key_file`.
    Create {
        /// Unique name, e.g. the proxy's host name.
        name: String,
    },
    /// List keys by name.
    List,
    /// Revoke a key: the proxy holding it is refused from its next call.
    Revoke {
        /// The key's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Add a new signing key; older keys keep verifying until retired.
    Rotate,
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
            if !e.message.is_empty() {
                eprintln!("cocalc: {}", e.message);
            }
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let clock = Arc::new(SystemClock);
    let Cli {
        master,
        api_key,
        json,
        command,
    } = cli;
    match command {
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
                let (keys, host, token) = (keys, host, token);
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
        Command::Dev {
            command:
                DevCommand::Up {
                    dir,
                    port,
                    hosts,
                    backend,
                    proxy_port,
                    hidden_hosts,
                    ssh_port,
                },
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::local(e.to_string()))?;
            let proxy_port = proxy_port.unwrap_or(port.saturating_add(1));
            let opts = cocalc_daemons::dev::DevOptions {
                dir: dir.unwrap_or_else(cocalc_daemons::dev::default_dir),
                port,
                hosts: hosts.max(1),
                backend,
                proxy_port,
                // One hidden host by default, when there is a proxy for it.
                hidden_hosts: hidden_hosts.unwrap_or(usize::from(proxy_port != 0)),
                ssh_port: ssh_port.unwrap_or(port.saturating_add(2)),
            };
            rt.block_on(cocalc_daemons::dev::up(
                opts,
                cocalc_daemons::shutdown_signal(),
            ))
            .map_err(|e| CliError::local(e.to_string()))
        }
        remote => run_remote(master, api_key, json, remote),
    }
}

/// Commands that talk to the master.
fn run_remote(
    master: String,
    api_key: Option<String>,
    json: bool,
    command: Command,
) -> Result<(), CliError> {
    let key = api_key
        .ok_or_else(|| CliError::usage("no API key: pass --api-key or set COCALC_API_KEY"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::local(e.to_string()))?;
    let client = MasterClient::new(master, key);
    let api = |e: ApiError| {
        let mut c = CliError::api(&e);
        if let Some(h) = &e.hint {
            c.message = format!("{} ({h})", c.message);
        }
        c
    };
    // The data path: open on the master, then talk to the host directly
    // (or to the proxy that holds a hidden host's tunnel: same paths).
    let host_of = |project: &str| -> Result<HostClient, CliError> {
        let o = rt.block_on(client.open(project)).map_err(api)?;
        Ok(HostClient::new(
            o.endpoint.base_url().to_string(),
            o.project,
            o.token,
        ))
    };
    match &command {
        Command::Shell { project } => {
            let o = rt.block_on(client.open(project)).map_err(api)?;
            let url = o.endpoint.base_url();
            rt.block_on(cocalc_daemons::shell::shell(url, o.project, &o.token))
                .map_err(CliError::local)?;
        }
        Command::File { command } => match command {
            FileCommand::Ls { project, path } => {
                let h = host_of(project)?;
                let entries = rt.block_on(h.list(path)).map_err(api)?;
                if json {
                    print_json(&entries)?;
                } else {
                    for e in entries {
                        let kind = match e.kind {
                            cocalc_host::files::FileKind::Dir => "d",
                            cocalc_host::files::FileKind::Symlink => "l",
                            _ => "-",
                        };
                        println!("{kind} {:>10}  {}", e.size, e.name);
                    }
                }
            }
            FileCommand::Get { project, path } => {
                let h = host_of(project)?;
                let data = rt.block_on(h.read(path)).map_err(api)?;
                use std::io::Write;
                std::io::stdout()
                    .write_all(&data)
                    .map_err(|e| CliError::local(format!("stdout: {e}")))?;
            }
            FileCommand::Put { project, path } => {
                use std::io::Read;
                let mut data = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut data)
                    .map_err(|e| CliError::local(format!("stdin: {e}")))?;
                let n = data.len();
                let h = host_of(project)?;
                rt.block_on(h.write(path, data)).map_err(api)?;
                if !json {
                    eprintln!("wrote {n} bytes to {path}");
                }
            }
            FileCommand::Rm { project, path } => {
                let h = host_of(project)?;
                rt.block_on(h.remove(path)).map_err(api)?;
            }
            FileCommand::Mkdir { project, path } => {
                let h = host_of(project)?;
                rt.block_on(h.mkdir(path)).map_err(api)?;
            }
        },
        Command::User { command } => match command {
            UserCommand::Create { name } => {
                let v = rt.block_on(client.create_user(name)).map_err(api)?;
                if json {
                    print_json(&v)?;
                } else {
                    println!(
                        "user {} created: id {}",
                        v["name"].as_str().unwrap_or(""),
                        v["id"].as_str().unwrap_or("")
                    );
                    println!(
                        "api key (shown once): {}",
                        v["api_key"].as_str().unwrap_or("")
                    );
                }
            }
        },
        Command::Project { command } => match command {
            ProjectCommand::Create { name, image } => {
                let mut req = CreateProjectRequest::new(name.clone());
                req.image = image.clone();
                let p = rt.block_on(client.create_project(&req)).map_err(api)?;
                if json {
                    print_json(&p)?;
                } else {
                    println!("project {} created: id {}", p.name, p.id);
                }
            }
            ProjectCommand::List => {
                let ps = rt.block_on(client.projects()).map_err(api)?;
                if json {
                    print_json(&ps)?;
                } else {
                    for p in ps {
                        let host = p.host.map_or("-".to_string(), |h| h.to_string());
                        println!("{}  {:<24} host {host} gen {}", p.id, p.name, p.generation);
                    }
                }
            }
            ProjectCommand::Open { project } => {
                let o = rt.block_on(client.open(project)).map_err(api)?;
                if json {
                    print_json(&o)?;
                } else {
                    let ep = match &o.endpoint {
                        HostEndpoint::Url(u) => u.clone(),
                        HostEndpoint::Tunnel(t) => format!("hidden, via the tunnel at {t}"),
                        other => format!("{other:?}"),
                    };
                    println!(
                        "project {} on host {} ({ep}), generation {}",
                        o.project, o.host, o.generation
                    );
                    println!("token: {}", o.token);
                }
            }
            ProjectCommand::Exec {
                project,
                timeout,
                argv,
            } => {
                let h = host_of(project)?;
                let mut req = ExecRequest::new(argv.clone());
                req.timeout = *timeout;
                let r = rt.block_on(h.exec(&req)).map_err(api)?;
                if json {
                    print_json(&r)?;
                } else {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&r.stdout);
                    let _ = std::io::stderr().write_all(&r.stderr);
                    if r.truncated {
                        eprintln!("cocalc: output truncated by the host");
                    }
                }
                if r.exit_code != 0 {
                    return Err(CliError {
                        message: String::new(),
                        code: r.exit_code.clamp(1, 255),
                    });
                }
            }
            ProjectCommand::Start { project } | ProjectCommand::Status { project } => {
                let h = host_of(project)?;
                let st = if matches!(command, ProjectCommand::Start { .. }) {
                    rt.block_on(h.start())
                } else {
                    rt.block_on(h.status())
                }
                .map_err(api)?;
                if json {
                    print_json(&st)?;
                } else {
                    println!(
                        "project {} is {}",
                        st.project,
                        format!("{:?}", st.state).to_lowercase()
                    );
                }
            }
            ProjectCommand::Backup { project } => {
                let b = rt.block_on(host_of(project)?.backup()).map_err(api)?;
                if json {
                    print_json(&b)?;
                } else {
                    println!(
                        "backup {} of snapshot {}: {} files, {} bytes ({} bytes new in the store)",
                        b.id, b.snapshot, b.files, b.bytes, b.added_bytes
                    );
                }
            }
            ProjectCommand::Backups { project } => {
                let list = rt.block_on(host_of(project)?.backups()).map_err(api)?;
                if json {
                    print_json(&list)?;
                } else if list.is_empty() {
                    println!("no backups");
                } else {
                    for b in list {
                        println!(
                            "{}  {}  host {}  {} files  {} bytes",
                            b.id, b.snapshot, b.host, b.files, b.bytes
                        );
                    }
                }
            }
            ProjectCommand::Restore {
                project,
                backup,
                path,
            } => {
                let h = host_of(project)?;
                let r = rt
                    .block_on(h.restore_backup(backup, path.as_deref()))
                    .map_err(api)?;
                if json {
                    print_json(&r)?;
                } else {
                    let what = path.as_deref().unwrap_or("the whole project");
                    let from = if r.fetched {
                        "brought back from the store"
                    } else {
                        "still on the host"
                    };
                    println!(
                        "restored {what} from backup {} (snapshot {}, {from})",
                        r.backup.id, r.backup.snapshot
                    );
                    if let Some(p) = r.previous {
                        println!("the state before is snapshot {p}");
                    }
                }
            }
            ProjectCommand::Stop { project } => {
                let h = host_of(project)?;
                rt.block_on(h.stop()).map_err(api)?;
                if !json {
                    println!("stopped");
                }
            }
            ProjectCommand::Replace { project } => {
                let x = rt.block_on(client.replace(project)).map_err(api)?;
                if json {
                    print_json(&x)?;
                } else {
                    println!(
                        "project {} re-placed on host {} (generation {}): {}",
                        x.project, x.decision.host, x.generation, x.decision.reason
                    );
                }
            }
            ProjectCommand::Move {
                project,
                to,
                no_wait,
            } => {
                let mut mv = rt
                    .block_on(client.move_project(project, *to))
                    .map_err(api)?;
                if !*no_wait {
                    mv = rt.block_on(client.wait_move(project)).map_err(api)?;
                }
                if json {
                    print_json(&mv)?;
                } else {
                    print_move(&mv);
                }
                if mv.phase == cocalc_core::MovePhase::RolledBack {
                    return Err(CliError::local(format!(
                        "the move was rolled back: {}",
                        mv.error.as_deref().unwrap_or("no reason recorded")
                    )));
                }
            }
            ProjectCommand::MoveStatus { project } => {
                let mv = rt.block_on(client.project_move(project)).map_err(api)?;
                if json {
                    print_json(&mv)?;
                } else {
                    print_move(&mv);
                }
            }
            ProjectCommand::Explain { project } => {
                let x = rt.block_on(client.explain(project)).map_err(api)?;
                if json {
                    print_json(&x)?;
                } else {
                    let d = &x.decision;
                    println!(
                        "project {} generation {}: host {} chosen by {}",
                        x.project, x.generation, d.host, d.strategy
                    );
                    println!("  why: {}", d.reason);
                    for c in &d.candidates {
                        println!("  candidate {} score {:.3} ({})", c.host, c.score, c.note);
                    }
                    for e in &d.excluded {
                        println!("  excluded {}: {}", e.hosts, e.reason);
                    }
                }
            }
        },
        Command::Host { command } => match command {
            HostCommand::List => {
                let hs = rt.block_on(client.hosts()).map_err(api)?;
                if json {
                    print_json(&hs)?;
                } else {
                    for h in hs {
                        let reach = match &h.endpoint {
                            HostEndpoint::Tunnel(t) => format!("hidden, tunnel at {t}"),
                            other => other.base_url().to_string(),
                        };
                        println!(
                            "{}  {:<9} {:<9} region {:<8} running {}/{} cpu {:.2}  {reach}",
                            h.id,
                            format!("{:?}", h.state).to_lowercase(),
                            format!("{:?}", h.health).to_lowercase(),
                            h.region,
                            h.load.running_projects,
                            h.capacity.project_slots,
                            h.load.cpu
                        );
                    }
                }
            }
            HostCommand::Drain { host } | HostCommand::Undrain { host } => {
                let drain = matches!(command, HostCommand::Drain { .. });
                let h = rt.block_on(client.drain(*host, drain)).map_err(api)?;
                if json {
                    print_json(&h)?;
                } else {
                    println!(
                        "host {} is {}",
                        h.id,
                        format!("{:?}", h.state).to_lowercase()
                    );
                }
            }
            HostCommand::Evacuate {
                host,
                no_wait,
                timeout,
            } => {
                let ev = rt.block_on(client.evacuate(*host)).map_err(api)?;
                if *no_wait {
                    if json {
                        print_json(&ev)?;
                    } else {
                        println!(
                            "host {} is draining; moving {} project(s) off it",
                            ev.host,
                            ev.projects.len()
                        );
                    }
                    return Ok(());
                }
                let out = rt
                    .block_on(client.wait_evacuation(&ev, *timeout))
                    .map_err(api)?;
                if json {
                    print_json(&out)?;
                } else {
                    for (p, to) in &out.moved {
                        println!("project {p}: moved to host {to}");
                    }
                    for (p, why) in &out.failed {
                        println!("project {p}: not moved: {why}");
                    }
                }
                if !out.failed.is_empty() || !out.left.is_empty() {
                    return Err(CliError::local(format!(
                        "host {host}: {} project(s) moved, {} rolled back, {} still there",
                        out.moved.len(),
                        out.failed.len(),
                        out.left.len()
                    )));
                }
                if !json {
                    println!("host {host} is empty: {} project(s) moved", out.moved.len());
                }
            }
            HostCommand::DiscardCopy { host, project } => {
                rt.block_on(client.discard_copy(*host, project))
                    .map_err(api)?;
                if !json {
                    println!("host {host}: copy of project {project} deleted");
                }
            }
            HostCommand::BootstrapToken => {
                let v = rt.block_on(client.bootstrap_token()).map_err(api)?;
                if json {
                    print_json(&v)?;
                } else {
                    println!("{}", v["token"].as_str().unwrap_or(""));
                }
            }
        },
        Command::ProxyKey { command } => match command {
            ProxyKeyCommand::Create { name } => {
                let k = rt.block_on(client.create_proxy_key(name)).map_err(api)?;
                if json {
                    print_json(&k)?;
                } else {
                    println!("{}", k.api_key);
                }
            }
            ProxyKeyCommand::List => {
                let keys = rt.block_on(client.proxy_keys()).map_err(api)?;
                if json {
                    print_json(&keys)?;
                } else {
                    for k in keys {
                        println!(
                            "{}  created at {} s (Unix time)",
                            k.name,
                            k.created.as_secs()
                        );
                    }
                }
            }
            ProxyKeyCommand::Revoke { name } => {
                rt.block_on(client.revoke_proxy_key(name)).map_err(api)?;
                if json {
                    print_json(&serde_json::json!({ "revoked": name }))?;
                }
            }
        },
        Command::SshKey { command } => match command {
            SshKeyCommand::Add { file } => {
                let line = read_public_key(file.as_deref())?;
                let k = rt.block_on(client.add_ssh_key(&line)).map_err(api)?;
                if json {
                    print_json(&k)?;
                } else {
                    println!("{} {} {}", k.fingerprint, k.key_type, k.comment);
                }
            }
            SshKeyCommand::List => {
                let keys = rt.block_on(client.ssh_keys()).map_err(api)?;
                if json {
                    print_json(&keys)?;
                } else {
                    for k in keys {
                        println!("{} {} {}", k.fingerprint, k.key_type, k.comment);
                    }
                }
            }
            SshKeyCommand::Rm { fingerprint } => {
                rt.block_on(client.remove_ssh_key(fingerprint.trim()))
                    .map_err(api)?;
                if json {
                    print_json(&serde_json::json!({ "removed": fingerprint.trim() }))?;
                }
            }
        },
        Command::Key {
            command: KeyCommand::Rotate,
        } => {
            let v = rt.block_on(client.rotate_key()).map_err(api)?;
            if json {
                print_json(&v)?;
            } else {
                println!("new signing key {}", v["key_id"].as_str().unwrap_or(""));
            }
        }
        Command::Keygen { .. } | Command::Token { .. } | Command::Dev { .. } => {
            return Err(CliError::local("not a master command"));
        }
    }
    Ok(())
}

/// The public key line from `file`, stdin (`-`), or ~/.ssh/id_ed25519.pub.
fn read_public_key(file: Option<&Path>) -> Result<String, CliError> {
    use std::io::Read;
    let path = match file {
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::local(format!("reading stdin: {e}")))?;
            return Ok(s);
        }
        Some(p) => p.to_path_buf(),
        None => {
            let home = std::env::var_os("HOME")
                .ok_or_else(|| CliError::usage("no key file given and HOME is not set"))?;
            PathBuf::from(home).join(".ssh/id_ed25519.pub")
        }
    };
    std::fs::read_to_string(&path).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// One line per fact of a move, for people.
fn print_move(mv: &cocalc_core::MoveRecord) {
    println!(
        "project {}: move from host {} to host {}: {}",
        mv.project, mv.from, mv.to, mv.phase
    );
    if let Some(b) = &mv.base {
        println!("  copied in full: snapshot {b}");
    }
    if let Some(l) = &mv.last {
        println!("  last changes:   snapshot {l}");
    }
    if let (Some(s), Some(f)) = (mv.stopped_at, mv.flipped_at) {
        println!(
            "  stopped for:    {} ms (until the map named the target)",
            f.as_millis().saturating_sub(s.as_millis())
        );
    }
    if let Some(e) = &mv.error {
        println!("  error: {e}");
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::local(e.to_string()))?;
    println!("{s}");
    Ok(())
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
