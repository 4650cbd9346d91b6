//! The PASETO v4 and PASERK k4 test vectors of the PASETO standard, read from
//! `../shared/vectors/paseto/` (set `COCALC_PASETO_VECTORS` to another
//! directory). A missing vector file fails the test: it never skips.

use std::path::PathBuf;

use cocalc_auth::{paserk, paseto};
use cocalc_core::TokenError;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde_json::Value;

fn vectors(name: &str) -> Vec<Value> {
    let dir = std::env::var_os("COCALC_PASETO_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The crate's directory as `cargo test` reports it when it runs
            // the test, not as it was when the binary was built: a build
            // directory shared between clones at different paths reuses
            // binaries built elsewhere.
            let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
            crate_dir.join("../../../shared/vectors/paseto")
        });
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read PASETO test vectors at {}: {e} (the repository expects shared/ beside \
             the clone, or COCALC_PASETO_VECTORS pointing at the vector directory)",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).expect("vector file is JSON");
    v["tests"].as_array().expect("tests array").clone()
}

fn s<'a>(t: &'a Value, k: &str) -> &'a str {
    t[k].as_str().unwrap_or("")
}

fn hex32(h: &str) -> [u8; 32] {
    hex::decode(h).unwrap().try_into().unwrap()
}

#[test]
fn v4_public_sign_vectors_verify_and_reproduce() {
    let tests = vectors("v4.json");
    let mut ran = 0;
    for t in tests.iter().filter(|t| s(t, "name").starts_with("4-S-")) {
        let name = s(t, "name");
        assert_eq!(t["expect-fail"], Value::Bool(false), "{name}");
        let sk = SigningKey::from_bytes(&hex32(s(t, "secret-key-seed")));
        assert_eq!(
            hex::encode(sk.to_keypair_bytes()),
            s(t, "secret-key"),
            "{name}: secret key"
        );
        let pk = VerifyingKey::from_bytes(&hex32(s(t, "public-key"))).unwrap();
        assert_eq!(sk.verifying_key(), pk, "{name}: public key");
        let (payload, footer, implicit) =
            (s(t, "payload"), s(t, "footer"), s(t, "implicit-assertion"));

        // Ed25519 is deterministic: signing reproduces the token exactly.
        let token = paseto::sign(
            &sk,
            payload.as_bytes(),
            footer.as_bytes(),
            implicit.as_bytes(),
        );
        assert_eq!(token, s(t, "token"), "{name}: produced token");

        let (m, f) = paseto::verify(&pk, s(t, "token"), implicit.as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m, payload.as_bytes(), "{name}: payload");
        assert_eq!(f, footer.as_bytes(), "{name}: footer");

        // The wrong implicit assertion must fail.
        assert_eq!(
            paseto::verify(&pk, s(t, "token"), b"{\"other\":1}"),
            Err(TokenError::BadSignature),
            "{name}"
        );
        ran += 1;
    }
    assert_eq!(ran, 3, "expected the three 4-S vectors");
}

#[test]
fn v4_failure_vectors_are_rejected() {
    let tests = vectors("v4.json");
    let sign_pk = tests
        .iter()
        .find(|t| s(t, "name") == "4-S-1")
        .map(|t| VerifyingKey::from_bytes(&hex32(s(t, "public-key"))).unwrap())
        .unwrap();
    let mut ran = 0;
    for t in tests.iter().filter(|t| s(t, "name").starts_with("4-F-")) {
        let name = s(t, "name");
        assert_eq!(t["expect-fail"], Value::Bool(true), "{name}");
        let pk = match t.get("public-key").and_then(Value::as_str) {
            Some(h) => VerifyingKey::from_bytes(&hex32(h)).unwrap(),
            None => sign_pk,
        };
        let token = s(t, "token");
        let err =
            paseto::verify(&pk, token, s(t, "implicit-assertion").as_bytes()).expect_err(name);
        if token.starts_with("v4.public.") {
            // 4-F-2: a v4.public token that must not verify with this key.
            assert_eq!(err, TokenError::BadSignature, "{name}");
        } else {
            assert!(
                matches!(err, TokenError::WrongHeader { .. }),
                "{name}: {err:?}"
            );
        }
        ran += 1;
    }
    assert_eq!(ran, 5, "expected the five 4-F vectors");
}

#[test]
fn k4_pid_vectors() {
    for t in vectors("k4.pid.json") {
        let name = s(&t, "name");
        let key = hex::decode(s(&t, "key")).unwrap();
        let got = paserk::pid_of_raw(&key);
        if t["expect-fail"] == Value::Bool(true) {
            assert!(got.is_err(), "{name}");
        } else {
            assert_eq!(got.unwrap(), s(&t, "paserk"), "{name}");
        }
    }
}

#[test]
fn k4_public_vectors() {
    for t in vectors("k4.public.json") {
        let name = s(&t, "name");
        let key = hex::decode(s(&t, "key")).unwrap();
        let got = paserk::encode_public_raw(&key);
        if t["expect-fail"] == Value::Bool(true) {
            assert!(got.is_err(), "{name}");
        } else {
            let p = got.unwrap();
            assert_eq!(p, s(&t, "paserk"), "{name}");
            // Decoding gives the same bytes back (where the bytes are a point).
            if let Ok(vk) = paserk::decode_public(&p) {
                assert_eq!(vk.as_bytes().as_slice(), key.as_slice(), "{name}");
            }
        }
    }
}

#[test]
fn k4_secret_vectors() {
    for t in vectors("k4.secret.json") {
        let name = s(&t, "name");
        let key = hex::decode(s(&t, "key")).unwrap();
        let got = paserk::encode_secret_raw(&key);
        if t["expect-fail"] == Value::Bool(true) {
            assert!(got.is_err(), "{name}");
        } else {
            let p = got.unwrap();
            assert_eq!(p, s(&t, "paserk"), "{name}");
            let sk = paserk::decode_secret(&p).unwrap();
            assert_eq!(sk.to_keypair_bytes().as_slice(), key.as_slice(), "{name}");
            assert_eq!(
                hex::encode(sk.verifying_key().as_bytes()),
                s(&t, "public-key"),
                "{name}"
            );
        }
    }
}
