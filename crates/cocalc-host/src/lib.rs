//! # cocalc-host
//!
//! The project-host agent as a library: everything a host does, composable
//! by an embedder (the `cocalc-host` daemon is [`daemon`] plus argument
//! parsing).
//!
//! | item | what it is | feature |
//! | --- | --- | --- |
//! | [`HostAgent`] | one host's projects: every request checked (token, project, revocations, ACL fetched from the master when stale, **generation fence**), start on demand, exec, terminals, stop | always |
//! | [`dataplane`] | the HTTP/WebSocket data plane over an agent: exec, files, terminals, `/port/<p>/` and `/server/<p>/` into the project, browser token → cookie exchange | always |
//! | [`backups`] | backups of projects to a [`BackupStore`](cocalc_core::BackupStore) (a snapshot each, once per change), and restores of a path or a whole project from one, on this host or another | always (`rustic` for rustic repositories in the daemon) |
//! | [`moving`] | the host's part in moving a project to another host: snapshot and freeze on the source, the send stream, pull and receive on the target, thaw, discard and release; master tokens only | always |
//! | [`admission`] | the cap on connections one client address holds on the host's listener (WebSockets until they close), the proxies in front not counted | always |
//! | [`files`] | [`ProjectFiles`](files::ProjectFiles): file access confined to a project's home with `cap-std` (`..`, absolute paths and symlinks out are refused) | always |
//! | [`MasterLink`] | registration with a bootstrap token, signed keepalives, the push channel (ACL changes, revocations, keys, start/stop), ACL lookups, activity; reconnects with backoff and drives the ACL cache's offline grace | always |
//! | [`local_store`] | the host's SQLite cache: generation fences, ACL entries and revocations, so a restarted host serves at once | always |
//! | [`metrics`] | running projects, the master lease's age, a hidden host's tunnel, data-plane answers, for Prometheus | always |
//! | [`daemon`] | config file, host identity on disk, building and running a whole host | always |
//! | [`PodmanRunner`] | one podman container per project through podman's Docker-compatible API (bollard): per-host labels, limits, no network, exec, terminals, re-adoption after a restart, ports reached with `setns` ([`PodmanRunner::connect_port`]), a busybox test image builder | `podman` (default) |
//! | [`ProcessRunner`] | projects as plain process groups, for development machines without podman. **No isolation at all.** | always |
//! | [`ImagePolicy`] | the image allowlist with a default | always |
//! | [`activity`] | activity samples (CPU, processes, connections), the pure culling decision [`decide`](activity::decide) and the [`IdleCuller`] driver | always |
//! | [`started_at`] | RFC 3339 parsing of podman's timestamps | always |
//!
//! Feature `btrfs` (default) lets the daemon use Btrfs project storage.
//!
//! Both runners stream exec output as it is produced; dropping an
//! [`ExecStream`] before its end kills the command. Both implement
//! [`ActivitySource`], so the culler works the same on either.
//!
//! What the runners promise is the contract on [`Runner`] (idempotent
//! `start`/`stop`, `status` never fails for an unknown project, generations
//! that only move forward); `cocalc-testkit`'s `runner_contract` checks it
//! against both implementations.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use cocalc_core::{ExecEvent, ExecRequest, Generation, ProjectId, ProjectSpec, SystemClock};
//! use cocalc_host::{ImagePolicy, ProcessRunner, Runner};
//! use futures_util::StreamExt;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let runner = ProcessRunner::new(ImagePolicy::single("host"), Arc::new(SystemClock));
//! let home = std::env::temp_dir();
//! let project = ProjectId::from_bytes([7; 16]);
//! runner.start(&ProjectSpec::new(project, Generation(1), home)).await?;
//!
//! let mut out = runner.exec(project, ExecRequest::new(vec!["echo".into(), "hi".into()])).await?;
//! let mut events = Vec::new();
//! while let Some(ev) = out.next().await {
//!     events.push(ev?);
//! }
//! assert_eq!(events.last(), Some(&ExecEvent::Exit(0)));
//!
//! runner.stop(project, std::time::Duration::from_secs(1)).await?;
//! # Ok::<(), cocalc_core::RunnerError>(())
//! # }).unwrap();
//! ```

pub mod activity;
pub mod admission;
pub mod agent;
pub mod backups;
pub mod daemon;
pub mod dataplane;
pub mod files;
pub mod image;
pub mod local_store;
pub mod master_link;
pub mod metrics;
pub mod moving;
#[cfg(feature = "podman")]
pub mod podman;
pub mod process;
mod procfs;
pub mod started_at;
pub mod tunnel;

pub use activity::{ActivitySample, ActivitySource, CullDecision, CullPolicy, IdleCuller};
pub use agent::{AgentConfig, AgentError, HostAgent};
pub use cocalc_client::HostClient;
pub use cocalc_core::runner::*;
pub use image::ImagePolicy;
pub use master_link::{HostEvents, LinkConfig, LinkError, MasterLink};
#[cfg(feature = "podman")]
pub use podman::{PodmanConfig, PodmanRunner};
pub use process::ProcessRunner;
