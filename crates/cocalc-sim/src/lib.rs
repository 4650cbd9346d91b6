//! # cocalc-sim
//!
//! The control plane under a deterministic network simulator
//! ([turmoil](https://docs.rs/turmoil)), as DESIGN.md's "Built to be
//! simulated" asks: behaviour at thousands of hosts, under partitions, in
//! simulated time, from one seed.
//!
//! What runs is the real code: the master ([`cocalc_master::Master`] with
//! its registry, placement, map and push hub) serving its real HTTP router
//! ([`cocalc_master::http::router`]), and on every host the real
//! [`MasterLink`](cocalc_host::MasterLink) (registration with a bootstrap
//! token, signed calls, keepalives on the push channel with the HTTP
//! fallback, reconnects with backoff and jitter) and the real
//! [`AclCache`](cocalc_auth::AclCache). Three things are simulated:
//!
//! * the network and time: turmoil's TCP, through the two seams the real
//!   code has for them ([`SimDialer`] behind
//!   [`MasterLink::with_dialer`](cocalc_host::MasterLink::with_dialer),
//!   [`SimListener`] under axum), and [`SimClock`] for the injected clock;
//! * the host agent below the link: a [`HostModel`] keeps what the control
//!   plane needs of it, the projects running and the generation fence;
//! * operators' and users' calls: [`Fleet::call`] runs them against the
//!   master, one after another on one simulated "operators" machine,
//!   without the HTTP client.
//!
//! Hosts share a simulated machine per rack ([`FleetConfig::racks`]), so a
//! cut ([`Fleet::partition`]) takes a whole rack off. A run is seeded but
//! not reproducible bit for bit (tokio's `select!` order, std `HashMap`
//! order and the master's random ids vary), so scenarios assert what must
//! hold for every interleaving.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use cocalc_sim::{Fleet, FleetConfig};
//!
//! let mut fleet = Fleet::new(FleetConfig::new(3).seed(7));
//! let took = fleet.run_until(Duration::from_secs(60), |f| {
//!     f.hosts().iter().all(|h| h.model.key_sets() > 0)
//! });
//! assert!(took.is_some(), "every host registered and got the master's keys");
//! assert_eq!(fleet.states().up, 3);
//! ```

pub mod fleet;
pub mod model;
pub mod net;

pub use fleet::{DoubleRun, Fleet, FleetConfig, SimHost, StateCounts, ADMIN_KEY};
pub use model::{HostModel, StaleGeneration};
pub use net::{SimClock, SimDialer, SimListener};
