//! Proxy keys: made, listed and revoked by the admin; good for what a
//! proxy needs (host lookups, SSH authorizations; the signing keys need
//! no key at all) and
//! refused for everything else.

use axum::http::StatusCode;
use serde_json::json;

mod common;
use common::*;

const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdgrLq6EQg+0c1tebzpv3B1ieQjD79IQARfd4TNBrg8 alice@example";

#[tokio::test]
async fn a_proxy_key_does_a_proxys_work_and_nothing_else() {
    let e = env().await;
    let h = Host::new(1);
    e.register(&h).await;
    e.keepalive(&h).await;
    let (_, alice) = e.user("alice").await;
    let p = e.project(&alice, "thesis").await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/users/me/ssh-keys",
            Some(&alice),
            Some(json!({"public_key": ALICE_KEY})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // Only the admin makes proxy keys; names are checked; one per name.
    let create = async |key: &str, name: &str| {
        e.call(
            "POST",
            "/v1/admin/proxy-keys",
            Some(key),
            Some(json!({"name": name})),
        )
        .await
    };
    let (s, v) = create(&alice, "edge-1").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = create(ADMIN, "edge-1").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["key"]["name"], "edge-1");
    let proxy = v["api_key"].as_str().unwrap().to_string();
    assert!(proxy.len() >= 32, "{proxy}");
    let (s, v) = create(ADMIN, "edge-1").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    for bad in ["", "a/b", "has space", &"x".repeat(65)] {
        let (s, v) = create(ADMIN, bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("proxy key name"),
            "{v}"
        );
    }
    let (s, v) = e
        .call("GET", "/v1/admin/proxy-keys", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["name"], "edge-1");
    assert!(
        v[0].get("api_key").is_none(),
        "the secret is never listed: {v}"
    );

    // What a proxy does works with its key.
    for what in ["endpoint", "key"] {
        let path = format!("/v1/hosts/{}/{what}", h.id);
        let (s, v) = e.call("GET", &path, Some(&proxy), None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
    let (s, v) = e
        .call(
            "POST",
            "/v1/ssh/authorize",
            Some(&proxy),
            Some(json!({"project": p.id.to_string(), "public_key": ALICE_KEY})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["project"], p.id.to_string());
    assert!(
        v["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("v4.public.")),
        "{v}"
    );

    // Nothing else does: users, projects, hosts, keys, tokens.
    let refused: [(&str, String, Option<serde_json::Value>); 12] = [
        ("POST", "/v1/users".into(), Some(json!({"name": "mallory"}))),
        ("GET", "/v1/projects".into(), None),
        ("POST", "/v1/projects".into(), Some(json!({"name": "x"}))),
        ("GET", format!("/v1/projects/{}", p.id), None),
        ("POST", format!("/v1/projects/{}/open", p.id), None),
        ("GET", "/v1/hosts".into(), None),
        ("POST", format!("/v1/hosts/{}/drain", h.id), None),
        ("POST", "/v1/admin/bootstrap-tokens".into(), None),
        ("POST", "/v1/admin/keys/rotate".into(), None),
        ("GET", "/v1/admin/proxy-keys".into(), None),
        ("GET", "/v1/users/me/ssh-keys".into(), None),
        ("POST", "/v1/users/alice/signout".into(), None),
    ];
    for (method, path, body) in refused {
        let (s, v) = e.call(method, &path, Some(&proxy), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("proxy key"),
            "{method} {path}: {v}"
        );
    }

    // Revoked: refused at the next call; revoking again is a 404.
    let (s, _) = e
        .call("DELETE", "/v1/admin/proxy-keys/edge-1", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = e
        .call(
            "GET",
            &format!("/v1/hosts/{}/endpoint", h.id),
            Some(&proxy),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = e
        .call("DELETE", "/v1/admin/proxy-keys/edge-1", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // The name is free again.
    let (s, v) = create(ADMIN, "edge-1").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_ne!(v["api_key"].as_str().unwrap(), proxy, "a new secret");
}
