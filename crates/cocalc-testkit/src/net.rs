//! What the kernel says about this machine's TCP connections, for tests
//! that check from outside what a server did to a socket it accepted.

use std::net::SocketAddr;

/// The timer of the IPv4 TCP connection from `local` to `remote` as
/// `/proc/net/tcp` shows it: its kind (`0` none, `1` retransmission, `2`
/// keepalive, `4` zero-window probe) and how long until it fires, in
/// clock ticks (1/100 s on Linux). `None` if there is no such
/// connection (or no such file: not Linux, or IPv6 addresses).
pub fn tcp_timer(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (kind, when) = f.get(5)?.split_once(':')?;
        Some((
            u8::from_str_radix(kind, 16).ok()?,
            u64::from_str_radix(when, 16).ok()?,
        ))
    })
}

/// Kind of timer [`tcp_timer`] reports for a connection with keepalive
/// armed and nothing in flight.
pub const KEEPALIVE_TIMER: u8 = 2;
