//! # cocalc-placement
//!
//! The master's control-plane logic, as a library:
//!
//! * [`Registry`]: registered hosts, leases renewed by keepalives, states
//!   `up` / `draining` / `down` derived from the lease and the drain flag,
//!   and a keepalive interval that grows with the fleet
//!   ([`keepalive_interval`]) so the total keepalive rate stays flat;
//! * [`MapStore`]: the durable project→host map with a generation per
//!   project and the decision behind each assignment — [`SqliteStore`]
//!   (WAL, one transaction per change) and [`MemoryStore`];
//! * placement strategies implementing [`Placement`]: [`LeastLoaded`] (with
//!   region preference) and [`DataAware`] (prefers hosts holding the
//!   project's data, skips hosts below a disk-headroom floor), both able to
//!   score a seeded random sample of hosts at fleet scale.
//!
//! Time comes from an injected clock and randomness from a seeded
//! [`SeededRng`], so the control-plane simulator can drive all of it.
//! The HTTP API, bootstrap tokens and the push channel live in
//! `cocalc-master` (host request signatures in `cocalc-auth`).
//!
//! * [`MoveCoordinator`]: moves a project between hosts as a persisted
//!   state machine (full copy while it runs, stop, incremental copy,
//!   validation, compare-and-set flip of the map, then deletion of the
//!   source's copy; rollback before the flip), with the hosts' calls
//!   behind [`MoveSteps`].
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use cocalc_core::wire::RegisterHostRequest;
//! use cocalc_core::{Capacity, HostEndpoint, HostId, ManualClock, PlacementRequest,
//!                   ProjectId, Region, Timestamp};
//! use cocalc_placement::{Placement, LeastLoaded, Registry, RegistryPolicy};
//!
//! let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
//! let registry = Registry::new(clock, RegistryPolicy::default(), 42);
//! for n in 1..=3u8 {
//!     registry.register(&RegisterHostRequest::new(
//!         HostId::new_v4([n; 16]),
//!         "k4.public.unused-here".into(),
//!         None,
//!         Region("eu".into()),
//!         HostEndpoint::Url(format!("http://10.0.0.{n}:8443")),
//!         Capacity { project_slots: 100, ..Capacity::default() },
//!     ));
//! }
//! let decision = LeastLoaded::new()
//!     .place(&PlacementRequest::new(ProjectId::new_v4([7; 16])), &registry.hosts())?;
//! println!("{} because {}", decision.host, decision.reason);
//! assert_eq!(decision.candidates.len(), 3);
//! # Ok::<(), cocalc_core::PlacementError>(())
//! ```

pub mod moves;
pub mod registry;
pub mod rng;
pub mod store;
pub mod strategy;

pub use cocalc_core::placement::*;
pub use moves::{MoveCoordinator, MoveError, MoveStats, MoveSteps};
pub use registry::{keepalive_interval, HostRecord, Registry, RegistryError, RegistryPolicy};
pub use rng::SeededRng;
pub use store::{MapStore, MemoryStore, SqliteStore, StoreError, StoredDecision};
pub use strategy::{DataAware, LeastLoaded};
