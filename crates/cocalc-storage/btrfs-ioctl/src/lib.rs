//! # cocalc-btrfs-ioctl
//!
//! Safe wrappers around the Btrfs quota ioctls that `libbtrfsutil` does not
//! offer: enabling (simple or classic) quotas, creating, assigning, limiting
//! and destroying qgroups, and reading a filesystem's UUID (to find its
//! `/sys/fs/btrfs/<uuid>` directory).
//!
//! Every function takes an open file descriptor of a directory on the
//! filesystem (for [`qgroup_limit`], of the subvolume when `qgroupid` is 0)
//! and returns the kernel's errno on failure. This crate is the only place in
//! cocalc-storage where `unsafe` appears; see [`ioctl`].

pub mod ioctl;

pub use ioctl::{
    fs_uuid, qgroup_assign, qgroup_create, qgroup_destroy, qgroup_limit, quota_enable,
    QuotaEnableMode, NO_LIMIT,
};
