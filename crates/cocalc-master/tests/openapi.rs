//! The OpenAPI document served at `/openapi.json` describes what the API
//! really answers: a scenario touching every route records each response,
//! and each is validated against the schema the document gives for its
//! path, method and status.

use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::*;

/// The document's path template matching a concrete path.
fn template<'a>(spec: &'a Value, path: &str) -> Option<&'a str> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    spec["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts
                    .iter()
                    .zip(&segs)
                    .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
        })
}

#[tokio::test]
async fn every_response_matches_the_openapi_document() {
    let e = env().await;
    let (s, spec) = e.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(spec["info"]["title"], "cocalc master API");
    e.recorded.lock().unwrap().clear();

    // A scenario over every route, successes and refusals.
    let (h1, h2) = (Host::new(1), Host::new(2));
    e.register(&h1).await;
    e.register(&h2).await;
    e.keepalive(&h1).await;
    let (_, alice) = e.user("alice").await;
    let (bob_id, bob) = e.user("bob").await;
    e.call(
        "POST",
        "/v1/users",
        Some(ADMIN),
        Some(json!({"name": "alice"})),
    )
    .await; // 409
    let p = e.project(&alice, "thesis").await;
    e.call("GET", "/v1/projects", Some(&alice), None).await;
    e.call("GET", "/v1/projects/thesis", Some(&alice), None)
        .await;
    e.call("GET", "/v1/projects/thesis", Some(&bob), None).await; // 404
    e.call("GET", "/v1/projects/thesis", None, None).await; // 401
    e.call(
        "PUT",
        "/v1/projects/thesis/collaborators/bob",
        Some(&alice),
        Some(json!({"permission": "write"})),
    )
    .await;
    e.call(
        "POST",
        &format!("/v1/projects/{}/open", p.id),
        Some(&bob),
        None,
    )
    .await;
    e.call(
        "GET",
        &format!("/v1/projects/{}/placement", p.id),
        Some(&bob),
        None,
    )
    .await;
    e.call(
        "DELETE",
        &format!("/v1/projects/{}/collaborators/{bob_id}", p.id),
        Some(&alice),
        None,
    )
    .await;
    e.call("POST", "/v1/users/bob/signout", Some(&bob), None)
        .await;
    e.call("GET", "/v1/hosts", Some(ADMIN), None).await;
    e.call(
        "POST",
        &format!("/v1/hosts/{}/drain", h2.id),
        Some(ADMIN),
        None,
    )
    .await;
    e.call(
        "POST",
        &format!("/v1/hosts/{}/undrain", h2.id),
        Some(ADMIN),
        None,
    )
    .await;
    e.call("POST", "/v1/hosts/not-a-uuid/drain", Some(ADMIN), None)
        .await; // 400
    e.call("POST", "/v1/admin/keys/rotate", Some(ADMIN), None)
        .await;
    e.call("POST", "/v1/admin/keys/rotate", Some(&alice), None)
        .await; // 403
    let alice_id = e
        .call("GET", "/v1/projects/thesis", Some(&alice), None)
        .await
        .1["owner"]
        .clone();
    let q = format!("project={}&user={}", p.id, alice_id.as_str().unwrap());
    e.signed(
        &h1,
        &h1.key,
        "GET",
        &format!("/v1/hosts/{}/acl?{q}", h1.id),
        None,
    )
    .await;
    let report = json!({"host": h1.id, "projects": [{"project": p.id, "last_use": 5}]});
    e.signed(
        &h1,
        &h1.key,
        "POST",
        &format!("/v1/hosts/{}/activity", h1.id),
        Some(report),
    )
    .await;
    e.call(
        "POST",
        "/v1/hosts/register",
        None,
        Some(h1.register_req(Some("cbt.bad"))),
    )
    .await; // 401
            // SSH keys and the proxies' authorization.
    let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdgrLq6EQg+0c1tebzpv3B1ieQjD79IQARfd4TNBrg8 alice@example";
    e.call(
        "POST",
        "/v1/users/me/ssh-keys",
        Some(&alice),
        Some(json!({"public_key": line})),
    )
    .await;
    e.call(
        "POST",
        "/v1/users/me/ssh-keys",
        Some(&alice),
        Some(json!({"public_key": "ssh-ed25519 !!"})),
    )
    .await; // 400
    e.call("GET", "/v1/users/me/ssh-keys", Some(&alice), None)
        .await;
    e.call(
        "POST",
        "/v1/ssh/authorize",
        Some(ADMIN),
        Some(json!({"project": p.id, "public_key": line})),
    )
    .await;
    e.call(
        "POST",
        "/v1/ssh/authorize",
        Some(ADMIN),
        Some(json!({"project": p.id, "public_key": "ssh-ed25519 AAAA"})),
    )
    .await; // 403
    e.call(
        "DELETE",
        "/v1/users/me/ssh-keys/SHA256%3ApPZtlamNFmRVOuZojBvD%2BYU5jExpqGbB%2F%2BTIDbDyqqc",
        Some(&alice),
        None,
    )
    .await;
    e.call(
        "DELETE",
        "/v1/users/me/ssh-keys/SHA256%3Anone",
        Some(&alice),
        None,
    )
    .await; // 404
    let proxy_key = json!({"name": "edge-1"});
    e.call(
        "POST",
        "/v1/admin/proxy-keys",
        Some(ADMIN),
        Some(proxy_key.clone()),
    )
    .await;
    e.call(
        "POST",
        "/v1/admin/proxy-keys",
        Some(ADMIN),
        Some(proxy_key.clone()),
    )
    .await; // 409
    e.call(
        "POST",
        "/v1/admin/proxy-keys",
        Some(&alice),
        Some(proxy_key),
    )
    .await; // 403
    e.call(
        "POST",
        "/v1/admin/proxy-keys",
        Some(ADMIN),
        Some(json!({"name": ""})),
    )
    .await; // 400
    e.call("GET", "/v1/admin/proxy-keys", Some(ADMIN), None)
        .await;
    e.call("DELETE", "/v1/admin/proxy-keys/edge-1", Some(ADMIN), None)
        .await;
    e.call("DELETE", "/v1/admin/proxy-keys/edge-1", Some(ADMIN), None)
        .await; // 404
    e.clock.advance(Duration::from_secs(1));

    let recorded = e.recorded.lock().unwrap().clone();
    assert!(recorded.len() >= 25, "{} responses", recorded.len());
    let components = spec["components"].clone();
    let mut checked = 0;
    for r in &recorded {
        let t = template(&spec, &r.path)
            .unwrap_or_else(|| panic!("{} {} is not in the document", r.method, r.path));
        let op = &spec["paths"][t][r.method.to_lowercase()];
        assert!(op.is_object(), "{} {t} is not documented", r.method);
        let resp = &op["responses"][r.status.to_string()];
        assert!(
            resp.is_object(),
            "{} {t} answered {} which the document does not list: {}",
            r.method,
            r.status,
            r.body
        );
        let Some(schema) = resp["content"]["application/json"]["schema"].as_object() else {
            assert_eq!(
                r.body,
                Value::Null,
                "{} {t} {}: body without a schema",
                r.method,
                r.status
            );
            continue;
        };
        let mut root = Value::Object(schema.clone());
        root["components"] = components.clone();
        let v = jsonschema::validator_for(&root)
            .unwrap_or_else(|err| panic!("schema of {} {t} {}: {err}", r.method, r.status));
        let errors: Vec<String> = v
            .iter_errors(&r.body)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{} {} -> {}: {:?}\nbody: {}",
            r.method,
            r.path,
            r.status,
            errors,
            r.body
        );
        checked += 1;
    }
    assert!(checked >= 20, "validated {checked} bodies");

    // The check is not vacuous: a wrong body fails the same schema.
    let schema = spec["paths"]["/v1/projects/{p}"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"]
        .clone();
    let mut root = schema;
    root["components"] = components;
    let v = jsonschema::validator_for(&root).unwrap();
    assert!(!v.is_valid(&json!({"id": 5, "name": "x"})));
    assert!(!v.is_valid(&json!({"id": "NOT-A-UUID", "name": "x", "owner": "x", "collaborators": [], "host": null, "generation": 0})));
}
