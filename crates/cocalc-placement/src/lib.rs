//! # cocalc-placement
//!
//! The master's control-plane logic, as a library. This crate will hold:
//!
//! * the **host registry**: registration with a host key and a one-time
//!   bootstrap token, keepalives that renew a lease (interval scaled with the
//!   fleet size, with jitter), host states `up` / `draining` / `down`;
//! * the **project→host map**, durable in SQLite (WAL) behind a store trait so
//!   a PostgreSQL store can follow, with a generation per project that grows
//!   on every assignment or move;
//! * **placement strategies** implementing [`Placement`](cocalc_core::Placement)
//!   (least-loaded with region preference, data-aware), each returning a
//!   decision that lists candidates, scores and the reason;
//! * later, the move coordinator (a persisted state machine).
//!
//! Status: only the trait and the reference [`StaticPlacement`] (from
//! `cocalc-core`) exist so far; the rest arrives with the master issue.
//!
//! ```
//! use cocalc_placement::{Placement, StaticPlacement};
//! assert_eq!(StaticPlacement.name(), "static");
//! ```

pub use cocalc_core::placement::*;
