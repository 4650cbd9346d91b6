//! Token verification throughput against its anchor, raw Ed25519, measured
//! in the same run on the same machine.
//!
//! Run: `cargo bench -p cocalc-auth --bench token_verify`
//! (`-- --secs 1` to shorten each measurement; default 3 s).
//!
//! Prints ops/s for: raw `ed25519-dalek` `verify_strict` and `verify` over a
//! message of the same length as a token's signed message (PAE), token
//! verification without the cache, and with it; then the ratios
//! uncached / raw and cached / raw (goals: ≥ 0.9× and ≥ 50×).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocalc_auth::{KeySet, MintRequest, Minter, Verifier};
use cocalc_core::{Generation, HostId, ManualClock, Permission, ProjectId, Timestamp, UserId};
use ed25519_dalek::{Signer, SigningKey};

fn measure(name: &str, secs: f64, mut f: impl FnMut()) -> f64 {
    // Warm up, then run in batches until the time is up.
    for _ in 0..200 {
        f();
    }
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{name:<44} {rate:>14.0} ops/s");
    rate
}

fn main() {
    let secs = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);

    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
    let keys = KeySet::generate(Timestamp(1)).expect("key generation");
    let host = HostId::new_v4([1; 16]);
    let minter = Minter::new("cocalc-master", keys.clone(), clock.clone());
    let (token, _) = minter
        .mint(&MintRequest {
            user: UserId::new_v4([2; 16]),
            project: ProjectId::new_v4([3; 16]),
            host,
            generation: Generation(7),
            permission: Permission::Write,
            ttl: Duration::from_secs(600),
        })
        .expect("mint");
    let verifier = Verifier::new(host, keys.public_only(), clock);

    // The signed message of a token is PAE(header, payload, footer, ""):
    // 8 + 4*8 length fields + the pieces. Sign a message of that length.
    let (body_b64, footer_b64) = token["v4.public.".len()..]
        .split_once('.')
        .expect("token has a footer");
    let body_len = body_b64.len() * 3 / 4 - 64;
    let footer_len = footer_b64.len() * 3 / 4;
    let msg = vec![0x5au8; 40 + "v4.public.".len() + body_len + footer_len];
    let sk = SigningKey::from_bytes(&[9; 32]);
    let vk = sk.verifying_key();
    let sig = sk.sign(&msg);

    println!(
        "token: {} bytes, signed message: {} bytes",
        token.len(),
        msg.len()
    );
    let raw_strict = measure("raw ed25519 verify_strict", secs, || {
        black_box(vk.verify_strict(black_box(&msg), &sig)).expect("valid");
    });
    let raw = measure("raw ed25519 verify", secs, || {
        black_box(ed25519_dalek::Verifier::verify(&vk, black_box(&msg), &sig)).expect("valid");
    });
    let uncached = measure("token verify, uncached", secs, || {
        black_box(verifier.verify_uncached(black_box(&token))).expect("valid");
    });
    let cached = measure("token verify, cached", secs, || {
        black_box(verifier.verify(black_box(&token))).expect("valid");
    });
    println!();
    println!(
        "uncached / raw verify_strict = {:.3}x   (goal >= 0.9; tokens use verify_strict)",
        uncached / raw_strict
    );
    println!("uncached / raw verify        = {:.3}x", uncached / raw);
    println!(
        "cached   / raw verify_strict = {:.1}x   (goal >= 50)",
        cached / raw_strict
    );
}
