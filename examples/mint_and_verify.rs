//! Mint a connect token as a master would, and check it as a host would.
//!
//! `cargo run -p cocalc-examples --example mint_and_verify`

use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::{
    AclCache, AclPolicy, Gate, KeySet, MemoryAuditSink, MintRequest, Minter, Verifier,
};
use cocalc_core::{Clock, Generation, HostId, Permission, ProjectId, SystemClock, UserId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clock = Arc::new(SystemClock);
    let keys = KeySet::generate(clock.now())?;
    let (user, project, host) = (
        UserId::new_v4([1; 16]),
        ProjectId::new_v4([2; 16]),
        HostId::new_v4([3; 16]),
    );

    // Master side.
    let minter = Minter::new("example-master", keys.clone(), clock.clone());
    let (token, claims) = minter.mint(&MintRequest {
        user,
        project,
        host,
        generation: Generation(1),
        permission: Permission::Write,
        ttl: Duration::from_secs(600),
    })?;
    println!("token ({} bytes): {token}", token.len());
    println!("signed by key {}", claims.key_id);

    // Host side: public keys only, an ACL cache fed by the master, a gate.
    let verifier = Arc::new(Verifier::new(host, keys.public_only(), clock.clone()));
    let acl = Arc::new(AclCache::new(clock.clone(), AclPolicy::default()));
    acl.master_up();
    acl.set(project, user, Some(Permission::Admin));
    let audit = Arc::new(MemoryAuditSink::new());
    let gate = Gate::new(host, verifier, acl, audit.clone(), clock);

    // The gate is async (verifiers may be); a trivial executor suffices here.
    let grant = block_on(gate.authorize(&token, project, Permission::Write, "exec"))?;
    println!("granted {} to user {}", grant.permission, grant.claims.user);
    let refused = block_on(gate.authorize(&token, project, Permission::Admin, "collaborators"));
    println!("admin action: {}", refused.unwrap_err());
    println!("{} audit records", audit.records().len());
    Ok(())
}

/// Polls a future that never waits on I/O to completion.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
