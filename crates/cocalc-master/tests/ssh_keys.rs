//! SSH keys: registration with precise errors, and the proxies'
//! authorization that refuses every stranger the same way.

use axum::http::StatusCode;
use serde_json::json;

mod common;
use common::*;

const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdgrLq6EQg+0c1tebzpv3B1ieQjD79IQARfd4TNBrg8 alice@example";
const ALICE_FP: &str = "SHA256:pPZtlamNFmRVOuZojBvD+YU5jExpqGbB/+TIDbDyqqc";
// Another valid ed25519 key nobody registered.
const OTHER_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKs6ejjZdGiuQi0jdUvoX4fBAedCTZIh6CML7UaYxBNK other";

#[tokio::test]
async fn ssh_authorize_grants_collaborators_and_refuses_everyone_else_alike() {
    let e = env().await;
    let h = Host::new(1);
    e.register(&h).await;
    e.keepalive(&h).await;
    let (_, alice) = e.user("alice").await;
    let (bob_id, bob) = e.user("bob").await;
    let p = e.project(&alice, "thesis").await;
    let q = e.project(&bob, "other").await;

    // Registration: parsed, fingerprinted, listed; malformed keys say why.
    let (s, v) = e
        .call(
            "POST",
            "/v1/users/me/ssh-keys",
            Some(&alice),
            Some(json!({"public_key": ALICE_KEY})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["fingerprint"], ALICE_FP);
    assert_eq!(v["key_type"], "ssh-ed25519");
    assert_eq!(v["comment"], "alice@example");
    let (s, v) = e
        .call(
            "POST",
            "/v1/users/me/ssh-keys",
            Some(&alice),
            Some(json!({"public_key": "ssh-dss AAAA"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"].as_str().unwrap().contains("unknown key type"),
        "{v}"
    );
    let (s, v) = e
        .call(
            "POST",
            "/v1/users/me/ssh-keys",
            Some(ADMIN),
            Some(json!({"public_key": ALICE_KEY})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, v) = e
        .call("GET", "/v1/users/me/ssh-keys", Some(&alice), None)
        .await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, v) = e
        .call("GET", "/v1/users/me/ssh-keys", Some(&bob), None)
        .await;
    assert_eq!(v.as_array().unwrap().len(), 0);

    // Alice's key opens her project, as alice with her permission.
    let authorize = |project: String, key: &str| json!({"project": project, "public_key": key});
    let (s, v) = e
        .call(
            "POST",
            "/v1/ssh/authorize",
            Some(ADMIN),
            Some(authorize(p.id.to_string(), ALICE_KEY)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["project"], p.id.to_string());
    assert_eq!(v["host"], h.id.to_string());
    // Only the admin key may ask.
    let (s, _) = e
        .call(
            "POST",
            "/v1/ssh/authorize",
            Some(&alice),
            Some(authorize(p.id.to_string(), ALICE_KEY)),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Every refusal is the same answer.
    let refusals = [
        authorize(q.id.to_string(), ALICE_KEY), // not a collaborator
        authorize(p.id.to_string(), OTHER_KEY), // unknown key
        authorize("6ba7b810-9dad-41d1-80b4-00c04fd430c8".into(), ALICE_KEY), // no such project
        authorize(p.id.to_string(), "ssh-ed25519 !!"), // malformed key
    ];
    let mut answers = Vec::new();
    for r in refusals {
        let (s, v) = e
            .call("POST", "/v1/ssh/authorize", Some(ADMIN), Some(r.clone()))
            .await;
        answers.push((s, v.clone()));
        assert_eq!(s, StatusCode::FORBIDDEN, "{r}: {v}");
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");

    // Once bob collaborates, his key would work; alice removes hers.
    let (s, _) = e
        .call(
            "PUT",
            &format!("/v1/projects/{}/collaborators/{bob_id}", p.id),
            Some(&alice),
            Some(json!({"permission": "read"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let fp = ALICE_FP
        .replace(':', "%3A")
        .replace('+', "%2B")
        .replace('/', "%2F");
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/users/me/ssh-keys/{fp}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/users/me/ssh-keys/{fp}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e
        .call(
            "POST",
            "/v1/ssh/authorize",
            Some(ADMIN),
            Some(authorize(p.id.to_string(), ALICE_KEY)),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
