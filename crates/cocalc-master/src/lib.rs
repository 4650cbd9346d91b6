//! # cocalc-master
//!
//! The master of a cocalc federation, as a library: the control plane that
//! decides and signs, and never carries project data.
//!
//! * [`Directory`]: users (API keys stored hashed), projects with owners and
//!   collaborators, one-time host bootstrap tokens — SQLite.
//! * [`Master`]: the operations — create users and projects, manage
//!   collaborators, **open a project** (ACL check, placement if unplaced,
//!   a connect token bound to the host and the placement generation),
//!   explain a placement, sign a user out everywhere, register hosts with a
//!   bootstrap token, renew leases, record activity, answer hosts' ACL
//!   lookups, drain hosts, rotate signing keys without cutover.
//! * [`ssh`]: users' SSH public keys (OpenSSH lines, fingerprinted) and
//!   the proxies' "may this key enter that project?" ([`Master::ssh_authorize`]).
//! * [`proxy_keys`]: API keys for proxies, good for host lookups and SSH
//!   authorizations only ([`Caller::Proxy`]).
//! * [`metrics`]: hosts, users, projects and API answers for Prometheus.
//! * [`PushHub`]: the master→host push channel (ACL changes, revocations,
//!   signing keys), one WebSocket per host.
//! * [`http::router`]: the HTTP JSON API over a `Master`;
//!   [`MasterClient`]: the same API from the caller's side;
//!   [`daemon`]: config file, start-up and serving for the `cocalc-master`
//!   binary.
//!
//! Placement, the registry and the map come from `cocalc-placement`; tokens
//! and host request signatures from `cocalc-auth`.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use cocalc_auth::KeySet;
//! use cocalc_core::{SystemClock, Clock};
//! use cocalc_master::{Directory, Master, MasterConfig};
//! use cocalc_placement::{LeastLoaded, MemoryStore, Registry, RegistryPolicy};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = Arc::new(SystemClock);
//! let master = Master::new(
//!     MasterConfig::new("admin-secret"),
//!     clock.clone(),
//!     Directory::open(None)?,
//!     Arc::new(MemoryStore::new()),
//!     Registry::new(clock.clone(), RegistryPolicy::default(), 1),
//!     Box::new(LeastLoaded::new()),
//!     KeySet::generate(clock.now()).unwrap(),
//! ).await?;
//! let admin = master.authenticate("admin-secret")?;
//! let (alice, key) = master.create_user(&admin, "alice")?;
//! let alice = master.authenticate(&key)?;
//! let project = master.create_project(&alice, "thesis", None).await?;
//! assert_eq!(project.name, "thesis");
//! let _router = cocalc_master::http::router(Arc::new(master));
//! # Ok::<(), cocalc_master::MasterError>(())
//! # }).unwrap();
//! ```

pub mod daemon;
pub mod directory;
pub mod error;
pub mod http;
pub mod master;
pub mod metrics;
pub mod moves;
pub mod proxy_keys;
pub mod push;
pub mod ssh;

pub use cocalc_client::MasterClient;
pub use directory::{Directory, Project, User};
pub use error::MasterError;
pub use master::{Caller, Master, MasterConfig};
pub use push::PushHub;
