//! The audited module: raw Btrfs ioctls behind safe functions.
//!
//! Layouts follow `include/uapi/linux/btrfs.h`. Every argument struct is
//! `#[repr(C)]`, fully initialised, and lives on the caller's stack for the
//! duration of the call; the kernel reads (and for `_IOWR`/`_IOR`, writes)
//! exactly `size_of` the struct, which the `nix` macros encode in the
//! request number.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;

/// `BTRFS_IOCTL_MAGIC`.
const MAGIC: u8 = 0x94;

/// Passing this as the limit removes it (`(u64)-1` in the kernel's API).
pub const NO_LIMIT: u64 = u64::MAX;

/// `BTRFS_QUOTA_CTL_ENABLE`.
const QUOTA_CTL_ENABLE: u64 = 1;
/// `BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA` (Linux 6.7+).
const QUOTA_CTL_ENABLE_SIMPLE: u64 = 4;
/// `BTRFS_QGROUP_LIMIT_MAX_RFER`.
const LIMIT_MAX_RFER: u64 = 1;

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // fields the kernel reads or writes, never Rust
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_create_args`.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // fields the kernel reads or writes, never Rust
struct QgroupCreateArgs {
    create: u64,
    qgroupid: u64,
}

/// `struct btrfs_ioctl_qgroup_assign_args`.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // fields the kernel reads or writes, never Rust
struct QgroupAssignArgs {
    assign: u64,
    src: u64,
    dst: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args` (qgroupid + `struct btrfs_qgroup_limit`).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // fields the kernel reads or writes, never Rust
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_fs_info_args` (1 KiB; only `fsid` is read here).
#[repr(C)]
#[allow(dead_code)] // fields the kernel writes; only `fsid` is read
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

nix::ioctl_readwrite!(
    /// `BTRFS_IOC_QUOTA_CTL`.
    btrfs_quota_ctl, MAGIC, 40, QuotaCtlArgs
);
nix::ioctl_write_ptr!(
    /// `BTRFS_IOC_QGROUP_ASSIGN`.
    btrfs_qgroup_assign, MAGIC, 41, QgroupAssignArgs
);
nix::ioctl_write_ptr!(
    /// `BTRFS_IOC_QGROUP_CREATE`.
    btrfs_qgroup_create, MAGIC, 42, QgroupCreateArgs
);
nix::ioctl_read!(
    /// `BTRFS_IOC_QGROUP_LIMIT` (declared `_IOR` in the uapi header).
    btrfs_qgroup_limit, MAGIC, 43, QgroupLimitArgs
);
nix::ioctl_read!(
    /// `BTRFS_IOC_FS_INFO`.
    btrfs_fs_info, MAGIC, 31, FsInfoArgs
);

/// Which quota accounting to enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaEnableMode {
    /// Simple quotas (extent owners; Linux 6.7+): cheap, and new subvolumes
    /// inherit their parent's level-1 qgroup.
    Simple,
    /// Classic qgroups (full back-reference accounting).
    Classic,
}

/// Enables quotas on the filesystem that holds `fd`. Enabling them when they
/// are already on in the same mode succeeds.
pub fn quota_enable(fd: impl AsFd, mode: QuotaEnableMode) -> Result<(), Errno> {
    let mut args = QuotaCtlArgs {
        cmd: match mode {
            QuotaEnableMode::Simple => QUOTA_CTL_ENABLE_SIMPLE,
            QuotaEnableMode::Classic => QUOTA_CTL_ENABLE,
        },
        status: 0,
    };
    // SAFETY: `args` is a valid, initialised `btrfs_ioctl_quota_ctl_args` that
    // outlives the call; the fd is borrowed and open.
    unsafe { btrfs_quota_ctl(fd.as_fd().as_raw_fd(), &mut args) }.map(drop)
}

/// Creates qgroup `qgroupid` (`level << 48 | id`).
pub fn qgroup_create(fd: impl AsFd, qgroupid: u64) -> Result<(), Errno> {
    let args = QgroupCreateArgs {
        create: 1,
        qgroupid,
    };
    // SAFETY: `args` is a valid `btrfs_ioctl_qgroup_create_args` the kernel
    // only reads; the fd is borrowed and open.
    unsafe { btrfs_qgroup_create(fd.as_fd().as_raw_fd(), &args) }.map(drop)
}

/// Destroys qgroup `qgroupid`.
pub fn qgroup_destroy(fd: impl AsFd, qgroupid: u64) -> Result<(), Errno> {
    let args = QgroupCreateArgs {
        create: 0,
        qgroupid,
    };
    // SAFETY: as in `qgroup_create`.
    unsafe { btrfs_qgroup_create(fd.as_fd().as_raw_fd(), &args) }.map(drop)
}

/// Makes qgroup `src` a member of qgroup `dst`. A positive return from the
/// kernel (a rescan is needed, classic mode only) counts as success.
pub fn qgroup_assign(fd: impl AsFd, src: u64, dst: u64) -> Result<(), Errno> {
    let args = QgroupAssignArgs {
        assign: 1,
        src,
        dst,
    };
    // SAFETY: `args` is a valid `btrfs_ioctl_qgroup_assign_args` the kernel
    // only reads; the fd is borrowed and open.
    unsafe { btrfs_qgroup_assign(fd.as_fd().as_raw_fd(), &args) }.map(drop)
}

/// Limits the referenced bytes of qgroup `qgroupid` (0: the subvolume `fd`
/// is in) to `max_referenced`; [`NO_LIMIT`] removes the limit.
pub fn qgroup_limit(fd: impl AsFd, qgroupid: u64, max_referenced: u64) -> Result<(), Errno> {
    let mut args = QgroupLimitArgs {
        qgroupid,
        flags: LIMIT_MAX_RFER,
        max_rfer: max_referenced,
        ..QgroupLimitArgs::default()
    };
    // SAFETY: `args` is a valid `btrfs_ioctl_qgroup_limit_args` that outlives
    // the call (the request is declared `_IOR`, the kernel reads it); the fd
    // is borrowed and open.
    unsafe { btrfs_qgroup_limit(fd.as_fd().as_raw_fd(), &mut args) }.map(drop)
}

/// The UUID of the filesystem that holds `fd` (names `/sys/fs/btrfs/<uuid>`).
pub fn fs_uuid(fd: impl AsFd) -> Result<[u8; 16], Errno> {
    let mut args = FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 1024 - 32],
    };
    // SAFETY: `args` is a zeroed `btrfs_ioctl_fs_info_args` of the exact
    // size the request encodes, writable for the kernel for the whole call;
    // the fd is borrowed and open.
    unsafe { btrfs_fs_info(fd.as_fd().as_raw_fd(), &mut args) }?;
    Ok(args.fsid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<QuotaCtlArgs>(), 16);
        assert_eq!(std::mem::size_of::<QgroupCreateArgs>(), 16);
        assert_eq!(std::mem::size_of::<QgroupAssignArgs>(), 24);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(std::mem::size_of::<FsInfoArgs>(), 1024);
    }

    #[test]
    fn not_btrfs_is_an_errno_not_a_crash() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(fs_uuid(&f).is_err());
        assert!(quota_enable(&f, QuotaEnableMode::Simple).is_err());
    }
}
