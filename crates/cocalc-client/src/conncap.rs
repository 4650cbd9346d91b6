//! A cap on the connections one client address holds open.
//!
//! Rate limits count requests; a client that opens connections and keeps
//! them (idle keep-alives, WebSockets, slow heads) costs file descriptors
//! and memory without sending many. [`ConnectionCap`] counts the
//! connections each address holds: [`ConnectionCap::take`] gives a
//! [`Slot`] while the address is under the cap, and the slot gives its
//! place back when dropped. Keep the slot as long as the connection
//! lives: in its task, and in the relay of an upgraded connection
//! ([`crate::relay::HoldWhileUpgraded`]). The proxy's ingress and hosts'
//! data planes use it.
//!
//! ```
//! use cocalc_client::conncap::ConnectionCap;
//! let cap = ConnectionCap::new(2);
//! let ip = "203.0.113.7".parse().unwrap();
//! let a = cap.take(ip).unwrap();
//! let _b = cap.take(ip).unwrap();
//! assert!(cap.take(ip).is_none());
//! drop(a);
//! assert!(cap.take(ip).is_some());
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections each client address holds, against a cap.
#[derive(Debug)]
pub struct ConnectionCap {
    limit: u32,
    by_ip: Mutex<HashMap<IpAddr, u32, foldhash::fast::RandomState>>,
}

impl ConnectionCap {
    /// A cap of `limit` connections per address (0: no cap; every
    /// [`ConnectionCap::take`] then succeeds, and nothing is counted).
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(ConnectionCap {
            limit,
            by_ip: Mutex::default(),
        })
    }

    /// The cap (0: none).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A slot for one more connection from `ip`, unless it holds the cap
    /// already. Without a cap the slot counts nothing.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        if self.limit == 0 {
            return Some(Slot { held: None });
        }
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_ip.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            held: Some((self.clone(), ip)),
        })
    }

    /// Addresses holding connections now, and the connections they hold.
    pub fn held(&self) -> (u64, u64) {
        let by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        (
            by_ip.len() as u64,
            by_ip.values().map(|&n| u64::from(n)).sum(),
        )
    }

    /// The connections `ip` holds now.
    pub fn of(&self, ip: IpAddr) -> u32 {
        let by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        by_ip.get(&ip).copied().unwrap_or(0)
    }
}

/// `entries` (a config's `trusted_proxies`: addresses or ranges,
/// `"10.0.0.0/8"`, `"192.0.2.7"`) as ranges; a bare address is a range of
/// one. The error names the entry that is neither.
pub fn parse_nets(entries: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    entries
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("trusted_proxies: {s:?} is not an address or a range (10.0.0.0/8)")
                })
        })
        .collect()
}

/// Whether `ip` is in one of `nets`; an IPv4 peer seen as IPv6
/// (`::ffff:10.0.0.5`, on a listener bound to `[::]`) matches its IPv4
/// range.
pub fn in_nets(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    if nets.is_empty() {
        return false;
    }
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Who a request from `peer` is from: `peer` itself, unless it is in
/// `trusted` (proxies in front); then the right-most address of
/// `X-Forwarded-For` that is not trusted too (`peer` if there is none,
/// or if an entry before one does not parse).
pub fn forwarded_client(
    peer: IpAddr,
    headers: &http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    if !in_nets(trusted, peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for entry in forwarded.iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) if in_nets(trusted, ip) => continue,
            Ok(ip) => return ip,
            Err(_) => break,
        }
    }
    peer
}

/// One connection's place under a [`ConnectionCap`], given back when
/// dropped.
#[derive(Debug)]
pub struct Slot {
    held: Option<(Arc<ConnectionCap>, IpAddr)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((cap, ip)) = &self.held else {
            return;
        };
        let mut by_ip = cap.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_ip.get_mut(ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_ip.remove(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_capped_apart_and_slots_come_back() {
        let cap = ConnectionCap::new(1);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let sa = cap.take(a).unwrap();
        let sb = cap.take(b).unwrap();
        assert!(cap.take(a).is_none());
        assert_eq!(cap.held(), (2, 2));
        assert_eq!(cap.of(a), 1);
        drop(sa);
        drop(sb);
        assert_eq!(cap.held(), (0, 0), "emptied addresses are dropped");

        let none = ConnectionCap::new(0);
        let slots: Vec<_> = (0..10).map(|_| none.take(a).unwrap()).collect();
        assert_eq!(slots.len(), 10);
        assert_eq!(none.held(), (0, 0));
    }
}
