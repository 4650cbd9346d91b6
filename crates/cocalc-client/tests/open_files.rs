//! `raise_open_files_limit` lifts a low soft limit to the hard one (alone
//! in its test binary: it changes a limit of the whole process).
#![cfg(target_os = "linux")]

use cocalc_client::serve::raise_open_files_limit;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

#[test]
fn a_low_soft_limit_is_raised_to_the_hard_one() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let low = hard.min(256);
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let raised = raise_open_files_limit().unwrap();
    assert_eq!(raised.before, low);
    assert_eq!(raised.now, hard.min(nr_open));
    assert_eq!(
        getrlimit(Resource::RLIMIT_NOFILE).unwrap(),
        (raised.now, hard)
    );
    // Again: nothing to do, nothing lowered.
    let again = raise_open_files_limit().unwrap();
    assert_eq!((again.before, again.now), (raised.now, raised.now));
}
