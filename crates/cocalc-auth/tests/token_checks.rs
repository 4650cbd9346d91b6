//! Connect-token verification: every check, every bad input, each refused
//! with its own error and never a panic.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cocalc_auth::{encode_claims, paseto, KeySet, MintRequest, Minter, TokenPolicy, Verifier};
use cocalc_core::{
    Generation, HostId, ManualClock, Permission, ProjectId, Timestamp, TokenClaims, TokenError,
    UserId,
};

const T0: i64 = 1_800_000_000;

struct Fixture {
    clock: ManualClock,
    keys: KeySet,
    minter: Minter,
    verifier: Verifier,
    host: HostId,
    req: MintRequest,
}

fn fixture() -> Fixture {
    let clock = ManualClock::new(Timestamp::from_secs(T0));
    let keys = KeySet::generate(Timestamp(1)).unwrap();
    let host = HostId::new_v4([1; 16]);
    let minter = Minter::new("test-master", keys.clone(), Arc::new(clock.clone()));
    let verifier = Verifier::new(host, keys.public_only(), Arc::new(clock.clone()));
    let req = MintRequest {
        user: UserId::new_v4([2; 16]),
        project: ProjectId::new_v4([3; 16]),
        host,
        generation: Generation(4),
        permission: Permission::Write,
        ttl: Duration::from_secs(600),
    };
    Fixture {
        clock,
        keys,
        minter,
        verifier,
        host,
        req,
    }
}

impl Fixture {
    fn token(&self) -> String {
        self.minter.mint(&self.req).unwrap().0
    }

    /// Claims as the minter would make them, for crafting variants.
    fn claims(&self) -> TokenClaims {
        self.minter.mint(&self.req).unwrap().1
    }

    fn sign(&self, c: &TokenClaims) -> String {
        encode_claims(c, self.keys.signing_key().unwrap().secret.as_ref().unwrap())
    }
}

#[test]
fn valid_token_verifies_with_all_claims() {
    let f = fixture();
    let (token, minted) = f.minter.mint(&f.req).unwrap();
    let c = f.verifier.verify(&token).unwrap();
    assert_eq!(*c, minted);
    assert_eq!(c.issuer, "test-master");
    assert_eq!(c.user, f.req.user);
    assert_eq!(c.project, f.req.project);
    assert_eq!(c.host, f.host);
    assert_eq!(c.generation, Generation(4));
    assert_eq!(c.permission, Permission::Write);
    assert_eq!(c.issued_at, Timestamp::from_secs(T0));
    assert_eq!(c.not_before, Timestamp::from_secs(T0));
    assert_eq!(c.expires, Timestamp::from_secs(T0 + 600));
    assert_eq!(c.token_id.len(), 32);
    assert_eq!(c.key_id, f.keys.signing_key().unwrap().kid);
    assert!(c.require_project(f.req.project).is_ok());
    // Two mints differ in jti.
    assert_ne!(f.claims().token_id, f.claims().token_id);
}

#[test]
fn truncated_tokens_are_refused() {
    let f = fixture();
    let t = f.token();
    for cut in [0, 3, 9, 10, 11, 50, t.len() / 2, t.len() - 60, t.len() - 1] {
        let e = f.verifier.verify(&t[..cut]).unwrap_err();
        assert!(
            matches!(
                e,
                TokenError::Malformed(_)
                    | TokenError::WrongHeader { .. }
                    | TokenError::Base64 { .. }
                    | TokenError::Footer(_)
                    | TokenError::BadSignature
            ),
            "cut at {cut}: {e:?}"
        );
    }
    // Without the footer (no key id) the token is refused as such.
    let no_footer = t.rsplit_once('.').unwrap().0;
    assert_eq!(
        f.verifier.verify(no_footer).unwrap_err(),
        TokenError::Footer("missing (a key id is required)")
    );
}

#[test]
fn wrong_version_or_purpose_is_refused() {
    let f = fixture();
    let t = f.token();
    let body = &t["v4.public.".len()..];
    for header in ["v4.local.", "v3.public.", "v2.public.", "v4.secret."] {
        let e = f.verifier.verify(&format!("{header}{body}")).unwrap_err();
        assert_eq!(
            e,
            TokenError::WrongHeader {
                found: header.to_string()
            }
        );
    }
    assert!(matches!(
        f.verifier.verify(&format!("V4.PUBLIC.{body}")).unwrap_err(),
        TokenError::Malformed(_)
    ));
}

#[test]
fn bad_base64_is_refused_including_padding_and_noncanonical_bits() {
    let f = fixture();
    let t = f.token();
    let (head, footer) = t.rsplit_once('.').unwrap();
    // Padding on the footer.
    let padded = format!("{head}.{footer}=");
    assert_eq!(
        f.verifier.verify(&padded).unwrap_err(),
        TokenError::Base64 { segment: "footer" }
    );
    // A character outside the base64url alphabet in the payload.
    let mut bad = t.clone().into_bytes();
    bad[20] = b'+';
    assert_eq!(
        f.verifier
            .verify(std::str::from_utf8(&bad).unwrap())
            .unwrap_err(),
        TokenError::Base64 { segment: "payload" }
    );
    // Non-canonical trailing bits: the last character of an unpadded segment
    // whose length leaves spare bits, changed so only spare bits differ.
    // Grow the issuer until the payload's encoding has spare bits.
    let mut c = f.claims();
    let t = loop {
        let t = f.sign(&c);
        let payload_len = t.rsplit_once('.').unwrap().0.len() - "v4.public.".len();
        if payload_len % 4 != 0 {
            break t;
        }
        c.issuer.push('m');
    };
    assert!(f.verifier.verify(&t).is_ok());
    let (head, footer) = t.rsplit_once('.').unwrap();
    let payload_b64 = &head["v4.public.".len()..];
    let last = payload_b64.as_bytes()[payload_b64.len() - 1];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.iter().position(|&c| c == last).unwrap();
    let flipped = alphabet[idx ^ 1] as char; // flips the lowest (spare) bit
    let noncanon = format!(
        "v4.public.{}{}.{footer}",
        &payload_b64[..payload_b64.len() - 1],
        flipped
    );
    assert_eq!(
        f.verifier.verify(&noncanon).unwrap_err(),
        TokenError::Base64 { segment: "payload" }
    );
}

#[test]
fn unknown_and_retired_keys_are_refused() {
    let f = fixture();
    let t = f.token();
    // A verifier trusting some other key.
    let other = Verifier::new(
        f.host,
        KeySet::generate(Timestamp(1)).unwrap().public_only(),
        Arc::new(f.clock.clone()),
    );
    assert!(
        matches!(other.verify(&t).unwrap_err(), TokenError::UnknownKey { kid } if kid == f.keys.signing_key().unwrap().kid)
    );

    // Retiring the key stops it at once, cached or not.
    assert!(f.verifier.verify(&t).is_ok());
    let mut retired = f.keys.public_only();
    retired.retire(&f.keys.signing_key().unwrap().kid).unwrap();
    f.verifier.set_keys(retired);
    assert!(matches!(
        f.verifier.verify(&t).unwrap_err(),
        TokenError::RetiredKey { .. }
    ));

    // A footer that is not JSON, or whose kid is not a k4.pid.
    let head = t.rsplit_once('.').unwrap().0;
    for (footer, want) in [
        ("not json", "not a JSON object with a string \"kid\""),
        ("{\"kid\":\"abc\"}", "kid is not a k4.pid"),
        ("{\"kid\":7}", "not a JSON object with a string \"kid\""),
    ] {
        let tok = format!("{head}.{}", URL_SAFE_NO_PAD.encode(footer));
        assert_eq!(
            f.verifier.verify(&tok).unwrap_err(),
            TokenError::Footer(want)
        );
    }
    let long = format!("{head}.{}", URL_SAFE_NO_PAD.encode("x".repeat(200)));
    assert_eq!(
        f.verifier.verify(&long).unwrap_err(),
        TokenError::Footer("too long")
    );
}

#[test]
fn rotation_keeps_old_tokens_valid_until_retirement() {
    let f = fixture();
    let old_token = f.token();
    let mut keys = f.keys.clone();
    keys.rotate(Timestamp(2)).unwrap();
    let minter = Minter::new("test-master", keys.clone(), Arc::new(f.clock.clone()));
    let new_token = minter.mint(&f.req).unwrap().0;
    f.verifier.set_keys(keys.public_only());
    assert!(f.verifier.verify(&old_token).is_ok());
    assert!(f.verifier.verify(&new_token).is_ok());
    assert_ne!(
        f.verifier.verify(&old_token).unwrap().key_id,
        f.verifier.verify(&new_token).unwrap().key_id
    );
}

#[test]
fn modified_payload_or_footer_breaks_the_signature() {
    let f = fixture();
    let t = f.token();
    let (head, footer_b64) = t.rsplit_once('.').unwrap();
    let mut body = URL_SAFE_NO_PAD.decode(&head["v4.public.".len()..]).unwrap();
    // Change "write" to "admin" in the signed JSON.
    let pos = body.windows(5).position(|w| w == b"write").unwrap();
    body[pos..pos + 5].copy_from_slice(b"admin");
    let forged = format!("v4.public.{}.{footer_b64}", URL_SAFE_NO_PAD.encode(&body));
    assert_eq!(
        f.verifier.verify(&forged).unwrap_err(),
        TokenError::BadSignature
    );

    // Same kid, footer with extra whitespace: different bytes, bad signature.
    let footer = URL_SAFE_NO_PAD.decode(footer_b64).unwrap();
    let mut spaced = footer.clone();
    spaced.insert(1, b' ');
    let tok = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&spaced));
    assert_eq!(
        f.verifier.verify(&tok).unwrap_err(),
        TokenError::BadSignature
    );

    // A signature from another key under this key's id.
    let other = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let resigned = paseto::sign(&other, &body[..body.len() - 64], &footer, b"");
    assert_eq!(
        f.verifier.verify(&resigned).unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn expiry_and_not_before_respect_the_skew() {
    let f = fixture();
    let t = f.token();
    // Valid until exp + 30 s skew.
    f.clock.set(Timestamp::from_secs(T0 + 600 + 29));
    assert!(f.verifier.verify(&t).is_ok(), "inside the skew");
    f.clock.set(Timestamp::from_secs(T0 + 600 + 30));
    assert!(matches!(
        f.verifier.verify(&t).unwrap_err(),
        TokenError::Expired { .. }
    ));
    // The cache does not hide expiry: a token verified once, then expired.
    f.clock.set(Timestamp::from_secs(T0));
    let t2 = f.token();
    assert!(f.verifier.verify(&t2).is_ok());
    f.clock.set(Timestamp::from_secs(T0 + 700));
    assert!(matches!(
        f.verifier.verify(&t2).unwrap_err(),
        TokenError::Expired { .. }
    ));

    // Not yet valid: nbf in the future beyond the skew.
    f.clock.set(Timestamp::from_secs(T0));
    let mut c = f.claims();
    c.not_before = Timestamp::from_secs(T0 + 60);
    let early = f.sign(&c);
    assert!(matches!(
        f.verifier.verify(&early).unwrap_err(),
        TokenError::NotYetValid { .. }
    ));
    f.clock.set(Timestamp::from_secs(T0 + 31));
    assert!(f.verifier.verify(&early).is_ok(), "within skew of nbf");
}

#[test]
fn lifetime_bounds_are_enforced() {
    let f = fixture();
    let mut c = f.claims();
    c.expires = c.issued_at.saturating_add(Duration::from_secs(31 * 60));
    assert_eq!(
        f.verifier.verify(&f.sign(&c)).unwrap_err(),
        TokenError::BadTtl {
            ttl_secs: 31 * 60,
            min_secs: 60,
            max_secs: 30 * 60
        }
    );
    c.expires = c.issued_at.saturating_add(Duration::from_secs(59));
    assert!(matches!(
        f.verifier.verify(&f.sign(&c)).unwrap_err(),
        TokenError::BadTtl { .. }
    ));
    // The minter refuses such lifetimes before signing anything.
    let mut req = f.req.clone();
    req.ttl = Duration::from_secs(3600);
    assert!(f.minter.mint(&req).is_err());
    // A custom policy widens the bound.
    let policy = TokenPolicy {
        max_ttl: Duration::from_secs(3600),
        ..TokenPolicy::default()
    };
    let v = Verifier::with_policy(
        f.host,
        f.keys.public_only(),
        Arc::new(f.clock.clone()),
        policy,
    );
    c.expires = c.issued_at.saturating_add(Duration::from_secs(3600));
    assert!(v.verify(&f.sign(&c)).is_ok());
}

#[test]
fn wrong_host_and_wrong_project_are_refused() {
    let f = fixture();
    let mut req = f.req.clone();
    req.host = HostId::new_v4([8; 16]);
    let t = f.minter.mint(&req).unwrap().0;
    assert_eq!(
        f.verifier.verify(&t).unwrap_err(),
        TokenError::WrongHost {
            expected: f.host,
            found: req.host
        }
    );
    let c = f.verifier.verify(&f.token()).unwrap();
    let other = ProjectId::new_v4([9; 16]);
    assert_eq!(
        c.require_project(other).unwrap_err(),
        TokenError::WrongProject {
            expected: other,
            found: f.req.project
        }
    );
}

#[test]
fn non_uuid_ids_in_claims_are_refused() {
    let f = fixture();
    let sk = f.keys.signing_key().unwrap().secret.clone().unwrap();
    let kid = &f.keys.signing_key().unwrap().kid;
    let footer = format!("{{\"kid\":\"{kid}\"}}");
    let good = serde_json::json!({
        "iss": "m", "sub": f.req.user.to_string(), "aud": format!("cocalc-host:{}", f.host),
        "project": f.req.project.to_string(), "gen": 1, "perm": "read",
        "iat": "2027-01-15T08:00:00Z", "nbf": "2027-01-15T08:00:00Z",
        "exp": "2027-01-15T08:10:00Z", "jti": "abc"
    });
    let sign =
        |v: &serde_json::Value| paseto::sign(&sk, v.to_string().as_bytes(), footer.as_bytes(), b"");
    for (field, value) in [
        ("sub", "6BA7B810-9DAD-11D1-80B4-00C04FD430C8"),
        ("project", "not-a-uuid"),
        ("aud", "cocalc-host:1234"),
        ("aud", "other-service:6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
        ("perm", "owner"),
        ("exp", "tomorrow"),
        ("jti", ""),
    ] {
        let mut v = good.clone();
        v[field] = serde_json::Value::String(value.into());
        let e = f.verifier.verify(&sign(&v)).unwrap_err();
        assert!(matches!(e, TokenError::Claims(_)), "{field}={value}: {e:?}");
    }
    let mut v = good.clone();
    v.as_object_mut().unwrap().remove("gen");
    assert!(matches!(
        f.verifier.verify(&sign(&v)).unwrap_err(),
        TokenError::Claims(_)
    ));
    // The well-formed one (iat = T0 = 2027-01-15T08:00:00Z) verifies.
    assert_eq!(f.verifier.verify(&sign(&good)).unwrap().token_id, "abc");
}

#[test]
fn oversized_tokens_are_refused_before_decoding() {
    let f = fixture();
    let huge = format!("v4.public.{}", "A".repeat(1 << 20));
    assert_eq!(
        f.verifier.verify(&huge).unwrap_err(),
        TokenError::TooLong {
            len: huge.len(),
            max: 2048
        }
    );
    assert!(matches!(
        f.verifier.verify_uncached(&huge).unwrap_err(),
        TokenError::TooLong { .. }
    ));
}

#[test]
fn arbitrary_garbage_never_panics() {
    let f = fixture();
    let t = f.token();
    let mut inputs: Vec<String> = vec![
        String::new(),
        ".".into(),
        "v4.public..".into(),
        "v4.public.\u{0}".into(),
        "v4.public.é".into(),
        "é".repeat(10),
        "v4.public.AA.AA".into(),
    ];
    // Every single-byte substitution in a real token.
    for i in 0..t.len() {
        let mut b = t.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        inputs.push(String::from_utf8(b).unwrap());
    }
    for s in &inputs {
        assert!(f.verifier.verify(s).is_err(), "accepted {s:?}");
    }
}
