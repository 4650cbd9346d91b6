//! The push channel hub: one queue per connected host.
//!
//! Each host keeps one WebSocket open to the master; the master sends
//! [`PushFrame`]s on it (ACL changes, revocations, commands, signing keys).
//! Frames carry a per-host sequence number. A frame for a host that is not
//! connected is dropped: on reconnect the host refreshes its ACL cache from
//! the master (its entries must be re-fetched anyway once stale), and
//! revocations are re-sent as part of the connect handshake by the caller.

use std::collections::HashMap;
use std::sync::Mutex;

use cocalc_core::wire::{PushFrame, PushMessage};
use cocalc_core::HostId;
use tokio::sync::mpsc;

#[derive(Debug)]
struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<PushFrame>,
    seq: u64,
}

/// Connected hosts and their outgoing queues.
#[derive(Debug, Default)]
pub struct PushHub {
    conns: Mutex<HashMap<HostId, Conn>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A host's subscription; dropping it (or a newer connection of the same
/// host) ends it.
#[derive(Debug)]
pub struct Subscription {
    /// Frames for this host.
    pub rx: mpsc::UnboundedReceiver<PushFrame>,
    id: u64,
    host: HostId,
}

impl PushHub {
    /// An empty hub.
    pub fn new() -> Self {
        PushHub::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `host`, replacing an older one.
    pub fn subscribe(&self, host: HostId) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(host, Conn { id, tx, seq: 0 });
        Subscription { rx, id, host }
    }

    /// Removes the connection if it is still the current one for its host.
    pub fn unsubscribe(&self, sub: &Subscription) {
        let mut g = self.lock();
        if g.get(&sub.host).is_some_and(|c| c.id == sub.id) {
            g.remove(&sub.host);
        }
    }

    /// Ends `host`'s channel, if connected (its key changed: a channel
    /// authenticated with the old key must not outlive it). Returns whether
    /// one was connected.
    pub fn disconnect(&self, host: HostId) -> bool {
        self.lock().remove(&host).is_some()
    }

    /// Sends to one host; `false` if it is not connected.
    pub fn send(&self, host: HostId, message: PushMessage) -> bool {
        let mut g = self.lock();
        let Some(c) = g.get_mut(&host) else {
            return false;
        };
        c.seq += 1;
        if c.tx.send(PushFrame::new(c.seq, message)).is_err() {
            g.remove(&host);
            return false;
        }
        true
    }

    /// Sends to every connected host; returns how many got it.
    pub fn broadcast(&self, message: PushMessage) -> usize {
        let mut g = self.lock();
        let mut sent = 0;
        g.retain(|_, c| {
            c.seq += 1;
            let ok = c.tx.send(PushFrame::new(c.seq, message.clone())).is_ok();
            sent += usize::from(ok);
            ok
        });
        sent
    }

    /// Ends every host's channel (the master is shutting down): each
    /// connection's task sees its queue close and closes the WebSocket.
    pub fn close_all(&self) {
        self.lock().clear();
    }

    /// Hosts connected now.
    pub fn connected(&self) -> Vec<HostId> {
        self.lock().keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocalc_core::{Timestamp, UserId};

    #[test]
    fn frames_reach_the_current_connection_in_order() {
        let hub = PushHub::new();
        let h = HostId::new_v4([1; 16]);
        let msg = PushMessage::RevokeUser {
            user: UserId::new_v4([2; 16]),
            not_before: Timestamp(5),
        };
        assert!(!hub.send(h, msg.clone()));
        let old = hub.subscribe(h);
        let mut new = hub.subscribe(h);
        hub.unsubscribe(&old); // the older connection leaving keeps the newer
        assert!(hub.send(h, msg.clone()));
        assert_eq!(hub.broadcast(msg.clone()), 1);
        assert_eq!(new.rx.try_recv().unwrap().seq, 1);
        assert_eq!(new.rx.try_recv().unwrap().seq, 2);
        hub.unsubscribe(&new);
        assert!(hub.connected().is_empty());
        // Disconnecting closes the queue the connection task reads.
        let mut sub = hub.subscribe(h);
        assert!(hub.disconnect(h));
        assert!(sub.rx.try_recv().is_err() && sub.rx.is_closed());
        assert!(!hub.disconnect(h));
    }
}
