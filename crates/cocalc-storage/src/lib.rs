//! # cocalc-storage
//!
//! Where project data lives on a host. This crate will hold the
//! [`Storage`](cocalc_core::Storage) implementations:
//!
//! * `BtrfsStorage`: one Btrfs subvolume per project (`project-<uuid>`) plus
//!   a scratch subvolume for `/tmp`; simple quotas (classic qgroups where the
//!   kernel lacks them); read-only snapshots named by UTC time, taken only
//!   when the subvolume changed, with count-based retention; full and
//!   incremental send/receive streams for moves between hosts.
//! * `DirStorage`: plain directories for development machines, snapshots as
//!   copies, send/receive as tar streams, no quotas.
//! * Pool set-up helpers (an existing Btrfs mount, or a loop-file pool for
//!   development and tests) and, later, backups with rustic.
//!
//! Status: the trait and its contract are defined in `cocalc-core`; the
//! implementations arrive with the storage issue. Nothing here is usable yet
//! apart from re-exports.
//!
//! ```
//! // The trait every backend here implements:
//! fn _takes_storage(_: &dyn cocalc_storage::Storage) {}
//! ```

pub use cocalc_core::storage::*;
