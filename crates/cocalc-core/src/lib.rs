//! # cocalc-core
//!
//! The shared vocabulary of the cocalc federation: what every other crate
//! (and every embedder) agrees on.
//!
//! * **Ids** ([`ProjectId`], [`HostId`], [`UserId`]): UUIDs in canonical
//!   lowercase form only, parsed strictly.
//! * **Records** ([`HostInfo`], [`Capacity`], [`Load`], [`ProjectPlacement`],
//!   [`Generation`], [`Permission`]): what the control plane knows.
//! * **The five seams**, each a small object-safe trait with a documented
//!   contract: [`Runner`] (a project's container), [`Storage`] (its volume),
//!   [`Placement`] (which host, and why), [`TokenVerifier`] (token → claims)
//!   and [`Transport`] (reaching a host).
//! * **Wire types** ([`wire`]) of the control-plane APIs, versioned, and
//!   [`ApiError`], the single place where typed errors map to HTTP statuses
//!   and CLI exit codes.
//! * **Time** through an injected [`Clock`], so logic can be tested and
//!   simulated without sleeping.
//!
//! This crate does no I/O and starts no runtime; it depends on serde,
//! thiserror, async-trait and the trait-only parts of tokio, bytes and
//! futures-core.
//!
//! ## Example
//!
//! ```
//! use cocalc_core::{HostEndpoint, HostId, HostInfo, Placement, PlacementRequest,
//!                   ProjectId, Region, StaticPlacement};
//!
//! let project: ProjectId = "6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse()?;
//! assert!("6BA7B810-9DAD-11D1-80B4-00C04FD430C8".parse::<ProjectId>().is_err());
//!
//! let host = HostInfo::new(
//!     HostId::new_v4([7; 16]),
//!     Region("local".into()),
//!     HostEndpoint::Url("http://127.0.0.1:8443".into()),
//! );
//! let decision = StaticPlacement.place(&PlacementRequest::new(project), &[host.clone()])?;
//! assert_eq!(decision.host, host.id);
//! println!("{}: {}", decision.strategy, decision.reason);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod backup;
pub mod config;
pub mod counters;
pub mod error;
pub mod id;
pub mod moves;
pub mod placement;
pub mod record;
pub mod runner;
pub mod storage;
pub mod stream;
pub mod time;
pub mod token;
pub mod transport;
pub mod wire;

pub use audit::{AuditOutcome, AuditRecord};
pub use backup::{BackupError, BackupInfo, BackupStore};
pub use counters::StatusCounts;
pub use error::ApiError;
pub use id::{HostId, IdError, ProjectId, UserId};
pub use moves::{MovePhase, MoveRecord};
pub use placement::{
    Candidate, Exclusion, Placement, PlacementDecision, PlacementError, PlacementRequest,
    StaticPlacement,
};
pub use record::{
    Capacity, Generation, Health, HostEndpoint, HostInfo, HostState, Load, Permission,
    ProjectPlacement, ProjectState, Region,
};
pub use runner::{
    ExecEvent, ExecRequest, ExecStream, ProjectSpec, PtyControl, PtySession, PtySize,
    ResourceLimits, ResourceUsage, RunStatus, Runner, RunnerError,
};
pub use storage::{Quota, SnapshotInfo, Storage, StorageError, Usage, VolumeInfo};
pub use stream::{BoxStream, ByteStream};
pub use time::{Clock, ManualClock, SharedClock, SystemClock, Timestamp};
pub use token::{StaticTokenVerifier, TokenClaims, TokenError, TokenVerifier};
pub use transport::{
    parse_host_url, parse_root_url, BoxedConnection, Connection, Dialer, Transport, TransportError,
};
