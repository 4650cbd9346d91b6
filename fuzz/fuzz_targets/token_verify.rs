//! Fuzzes connect-token parsing and verification.
//!
//! Input bytes become (a) a token string tried as is, and (b) a real signed
//! token with the input spliced into its payload, footer or header, so the
//! fuzzer reaches the footer, key-id, signature and claims checks, not only
//! the header check. Invariants: no panic; nothing but the untouched token
//! verifies; a verified token's claims name this host.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cocalc_auth::{KeySet, MintRequest, Minter, Verifier};
use cocalc_core::{Generation, HostId, ManualClock, Permission, ProjectId, Timestamp, UserId};
use libfuzzer_sys::fuzz_target;

struct Ctx {
    verifier: Verifier,
    token: String,
    host: HostId,
}

fn ctx() -> &'static Ctx {
    static CTX: OnceLock<Ctx> = OnceLock::new();
    CTX.get_or_init(|| {
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
        let keys = KeySet::generate(Timestamp(1)).expect("keygen");
        let host = HostId::new_v4([1; 16]);
        let minter = Minter::new("fuzz", keys.clone(), clock.clone());
        let (token, _) = minter
            .mint(&MintRequest {
                user: UserId::new_v4([2; 16]),
                project: ProjectId::new_v4([3; 16]),
                host,
                generation: Generation(1),
                permission: Permission::Write,
                ttl: Duration::from_secs(600),
            })
            .expect("mint");
        Ctx {
            verifier: Verifier::new(host, keys.public_only(), clock),
            token,
            host,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let c = ctx();
    let s = String::from_utf8_lossy(data);
    if let Ok(claims) = c.verifier.verify_uncached(&s) {
        assert_eq!(s, c.token, "only the real token may verify");
        assert_eq!(claims.host, c.host);
    }
    if data.len() < 2 {
        return;
    }
    // Splice the rest of the input into the real token at a chosen offset.
    let at = (u16::from_le_bytes([data[0], data[1]]) as usize) % (c.token.len() + 1);
    let insert = String::from_utf8_lossy(&data[2..]);
    let mut spliced = String::with_capacity(c.token.len() + insert.len());
    let at = (0..=at).rev().find(|&i| c.token.is_char_boundary(i)).unwrap_or(0);
    spliced.push_str(&c.token[..at]);
    spliced.push_str(&insert);
    // Overwrite rather than insert when the first byte is odd.
    let resume = if data[0] & 1 == 1 { (at + insert.len()).min(c.token.len()) } else { at };
    spliced.push_str(&c.token[resume..]);
    match c.verifier.verify(&spliced) {
        Ok(claims) => {
            assert_eq!(spliced, c.token, "a modified token verified");
            assert_eq!(claims.host, c.host);
        }
        Err(e) => {
            // Every refusal renders as a message and maps to an API error.
            let _ = cocalc_core::ApiError::from(&e);
            assert!(!e.to_string().is_empty());
        }
    }
});
