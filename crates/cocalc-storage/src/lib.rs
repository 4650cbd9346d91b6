//! # cocalc-storage
//!
//! Where project data lives on a host: implementations of
//! [`Storage`] and the pool set-up around them.
//!
//! | type | what | needs |
//! | --- | --- | --- |
//! | [`BtrfsStorage`] | a subvolume per project (`project-<uuid>`) plus a scratch subvolume for `/tmp`; quotas (simple quotas where the kernel has them, classic qgroups otherwise); read-only snapshots named by UTC time, taken only when something changed; full and incremental `btrfs send`/`receive` streams; clone | root, Btrfs, `btrfs-progs`, `libbtrfsutil` |
//! | [`DirStorage`] | the same contract on plain directories: snapshots as (reflink) copies, tar streams, no quotas | any filesystem |
//! | [`pool`] | [`init_pool`] on an existing Btrfs mount; [`LoopPool`], a loop-file Btrfs pool for development and tests that unmounts itself when dropped | |
//! | [`backup`] | [`BackupStore`](cocalc_core::BackupStore)s: `RusticBackups` (a restic-format repository, local or S3, through `rustic_core`) and `DirBackups` (plain copies, for development); retention for backups | `rustic` feature for `RusticBackups` |
//! | [`retention`] | which snapshots to keep: counts per bucket (4 frequent, 7 daily, 4 weekly, 2 monthly by default) as a pure function | |
//!
//! | feature | default | enables |
//! | --- | --- | --- |
//! | `btrfs` | yes | [`BtrfsStorage`] (builds against `libbtrfsutil`; needs `libbtrfsutil-dev` and `libclang-dev`) |
//! | `rustic` | yes | `backup::RusticBackups` (rustic_core and rustic_backend with OpenDAL) |
//!
//! All calls must run inside a tokio runtime (blocking work goes to its
//! blocking pool; `btrfs send`/`receive` and copies are child processes).
//!
//! What it does not do: decide *when* to snapshot or move (the host agent and
//! the move coordinator do), or talk to the network (a send stream is a
//! [`ByteStream`](cocalc_core::ByteStream); carrying it is the caller's job).
//!
//! Every call on one project is serialised; calls on different projects run
//! in parallel. A receive whose stream is cut or corrupt removes whatever it
//! had written and returns [`StorageError::StreamIncomplete`]. Paths that
//! would leave a project (`..`, absolute, symlinked parents pointing out)
//! are refused with [`StorageError::PathEscape`].
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use cocalc_core::{ProjectId, Storage, SystemClock};
//! use cocalc_storage::DirStorage;
//!
//! # let rt = tokio::runtime::Runtime::new().unwrap();
//! # rt.block_on(async {
//! let root = std::env::temp_dir().join(format!("cocalc-storage-doc-{}", std::process::id()));
//! let storage = DirStorage::new(&root, Arc::new(SystemClock))?;
//! let project: ProjectId = "6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse().unwrap();
//!
//! let volume = storage.create(project).await?;
//! std::fs::write(volume.home.join("notes.txt"), "v1")?;
//! let snap = storage.snapshot(project).await?.expect("something changed");
//! assert!(storage.snapshot(project).await?.is_none()); // nothing changed since
//!
//! std::fs::write(volume.home.join("notes.txt"), "oops")?;
//! storage.restore(project, &snap.name, Some("notes.txt")).await?;
//! assert_eq!(std::fs::read_to_string(volume.home.join("notes.txt"))?, "v1");
//!
//! storage.delete(project).await?;
//! # std::fs::remove_dir_all(&root)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

// Without `btrfs`, the process-stream and quota-group helpers only it uses
// are idle.
#![cfg_attr(not(feature = "btrfs"), allow(dead_code))]

pub mod backup;
#[cfg(feature = "btrfs")]
mod btrfs;
mod common;
mod dir;
mod locks;
pub mod names;
pub mod paths;
pub mod pool;
pub mod retention;
pub mod stream;

#[cfg(feature = "btrfs")]
pub use btrfs::{BtrfsConfig, BtrfsStorage};
pub use cocalc_core::storage::*;
pub use dir::DirStorage;
pub use pool::{init_pool, LoopPool, PoolError, PoolInfo, QuotaMode, QuotaPreference};
pub use retention::{apply_retention, Retention, RetentionPolicy};
pub use stream::SendStreamCheck;
