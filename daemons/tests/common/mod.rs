//! Helpers shared by the tests that run the daemon and CLI binaries.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs the `cocalc` CLI against `master` with API key `key`, feeding it
/// `stdin` (or nothing), and returns what it did.
pub(crate) fn cocalc(master: &str, key: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    cocalc_env(master, key, args, stdin, &[])
}

/// [`cocalc`] with more environment variables.
pub(crate) fn cocalc_env(
    master: &str,
    key: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &std::path::Path)],
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args(args)
        .env("COCALC_MASTER", master)
        .env("COCALC_API_KEY", key)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
