//! The master's HTTP API, called in-process (and over a real socket for the
//! push channel): registration, leases, placement, open, ACLs, revocation.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cocalc_auth::host_auth::sign_request;
use cocalc_auth::{paserk, KeySet, Verifier};
use cocalc_core::wire::{
    KeepaliveRequest, LeaseGrant, OpenProjectResponse, PlacementExplanation, PushFrame, PushMessage,
};
use cocalc_core::{Capacity, Clock, Generation, Health, HostState, Load, Permission, Timestamp};
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

mod common;
use common::*;

#[tokio::test]
async fn registration_requires_a_valid_unused_bootstrap_token() {
    let e = env().await;
    let h = Host::new(1);
    let (s, v) = e
        .call(
            "POST",
            "/v1/hosts/register",
            None,
            Some(h.register_req(None)),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("needs a bootstrap token"),
        "{v}"
    );
    let (s, _) = e
        .call(
            "POST",
            "/v1/hosts/register",
            None,
            Some(h.register_req(Some("cbt.nope"))),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let token = e.bootstrap().await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/hosts/register",
            None,
            Some(h.register_req(Some(&token))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let grant: LeaseGrant = serde_json::from_value(v).unwrap();
    assert_eq!(grant.state, HostState::Up);
    assert_eq!(grant.signing_keys.len(), 1);

    // The token is used up: another host cannot reuse it.
    let h2 = Host::new(2);
    let (s, v) = e
        .call(
            "POST",
            "/v1/hosts/register",
            None,
            Some(h2.register_req(Some(&token))),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("already used"),
        "{v}"
    );

    // A known host re-registers with a signature by its key, no token needed.
    let (s, v) = e
        .signed(
            &h,
            &h.key,
            "POST",
            "/v1/hosts/register",
            Some(h.register_req(None)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // ...but a different key for the same host id needs a new token.
    let mut imposter = h.register_req(None);
    let other = SigningKey::from_bytes(&[77; 32]);
    imposter["public_key"] = json!(paserk::encode_public(&other.verifying_key()));
    let (s, _) = e
        .signed(&h, &other, "POST", "/v1/hosts/register", Some(imposter))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Expired bootstrap tokens are refused.
    let late = e.bootstrap().await;
    e.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let (s, _) = e
        .call(
            "POST",
            "/v1/hosts/register",
            None,
            Some(h2.register_req(Some(&late))),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn keepalives_must_be_signed_fresh_by_the_host_key() {
    let e = env().await;
    let h = Host::new(1);
    e.register(&h).await;
    let (s, v) = e.keepalive(&h).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let path = format!("/v1/hosts/{}/keepalive", h.id);
    let body = serde_json::to_value(KeepaliveRequest::new(
        h.id,
        Health::Ok,
        Capacity::default(),
        Load::default(),
    ))
    .unwrap();
    let (s, _) = e.call("POST", &path, None, Some(body.clone())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "unsigned");
    let wrong = SigningKey::from_bytes(&[99; 32]);
    let (s, v) = e
        .signed(&h, &wrong, "POST", &path, Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["message"].as_str().unwrap().contains("signature"), "{v}");

    // A request signed a while ago is refused as stale.
    let bytes = body.to_string();
    let old = e.clock.now().saturating_sub(Duration::from_secs(120));
    let mut req = Request::builder().method("POST").uri(&path);
    for (k, val) in sign_request(&h.key, h.id, "POST", &path, old, bytes.as_bytes()) {
        req = req.header(k, val);
    }
    let (s, v) = e.send(req.body(Body::from(bytes)).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["message"].as_str().unwrap().contains("clock"), "{v}");

    // Signed by host 1 for host 2's path: forbidden.
    let h2 = Host::new(2);
    e.register(&h2).await;
    let (s, _) = e
        .signed(
            &h,
            &h.key,
            "POST",
            &format!("/v1/hosts/{}/keepalive", h2.id),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn lease_expiry_marks_a_host_down_and_keepalive_revives_it() {
    let e = env().await;
    let h = Host::new(1);
    let grant = e.register(&h).await;
    let state = |v: &Value| v[0]["state"].as_str().unwrap().to_string();
    let (_, v) = e.call("GET", "/v1/hosts", Some(ADMIN), None).await;
    assert_eq!(state(&v), "up");
    e.clock.set(grant.lease_expires);
    let (_, v) = e.call("GET", "/v1/hosts", Some(ADMIN), None).await;
    assert_eq!(state(&v), "down");
    assert_eq!(e.keepalive(&h).await.0, StatusCode::OK);
    let (_, v) = e.call("GET", "/v1/hosts", Some(ADMIN), None).await;
    assert_eq!(state(&v), "up");
    let (s, _) = e.call("GET", "/v1/hosts", Some("not-a-key"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn open_places_explains_and_mints_a_token_the_host_accepts() {
    let e = env().await;
    let (h1, h2) = (Host::new(1), Host::new(2));
    let grant = e.register(&h1).await;
    e.register(&h2).await;
    // Drain host 1: placement must avoid it.
    let (s, _) = e
        .call(
            "POST",
            &format!("/v1/hosts/{}/drain", h1.id),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let (alice_id, alice) = e.user("alice").await;
    let p = e.project(&alice, "thesis").await;
    assert_eq!(p.generation, Generation(0));
    assert_eq!(p.host, None);

    let (s, v) = e
        .call("POST", "/v1/projects/thesis/open", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let open: OpenProjectResponse = serde_json::from_value(v).unwrap();
    assert_eq!(open.host, h2.id);
    assert_eq!(open.generation, Generation(1));

    let (s, v) = e
        .call(
            "GET",
            &format!("/v1/projects/{}/placement", p.id),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ex: PlacementExplanation = serde_json::from_value(v).unwrap();
    assert_eq!(ex.decision.host, h2.id);
    assert_eq!(ex.decision.strategy, "least-loaded");
    assert_eq!(ex.decision.excluded.len(), 1);
    assert_eq!(
        (
            ex.decision.excluded[0].reason.as_str(),
            ex.decision.excluded[0].hosts
        ),
        ("draining", 1)
    );

    // The token verifies on host 2 with the keys the master handed out.
    let mut keys = KeySet::new();
    for k in &grant.signing_keys {
        keys.insert_public(paserk::decode_public(k).unwrap(), Timestamp(1));
    }
    let v2 = Verifier::new(h2.id, keys.clone(), Arc::new(e.clock.clone()));
    let claims = v2.verify(&open.token).unwrap();
    assert_eq!(claims.user.to_string(), alice_id);
    assert_eq!(claims.permission, Permission::Admin);
    assert_eq!(claims.generation, Generation(1));
    // ...and not on host 1.
    let v1 = Verifier::new(h1.id, keys, Arc::new(e.clock.clone()));
    assert!(v1.verify(&open.token).is_err());

    // Opening again keeps the placement and the generation.
    let (_, v) = e
        .call(
            "POST",
            &format!("/v1/projects/{}/open", p.id),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(v["generation"], 1);
}

#[tokio::test]
async fn acl_refusals_are_precise_and_reveal_nothing() {
    let e = env().await;
    e.register(&Host::new(1)).await;
    let (_, alice) = e.user("alice").await;
    let (bob_id, bob) = e.user("bob").await;
    let p = e.project(&alice, "secret").await;
    let path = format!("/v1/projects/{}", p.id);

    // A stranger sees "not found", never "forbidden".
    let (s, v) = e.call("GET", &path, Some(&bob), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = e
        .call("POST", &format!("{path}/open"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // No key, bad key.
    assert_eq!(
        e.call("GET", &path, None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        e.call("GET", &path, Some("cuk.bad"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Malformed ids get a 400 naming the problem.
    let (s, v) = e
        .call("POST", "/v1/hosts/NOT-A-UUID/drain", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"].as_str().unwrap().contains("invalid host id"),
        "{v}"
    );
    // Users cannot do admin things.
    assert_eq!(
        e.call("POST", "/v1/users", Some(&alice), Some(json!({"name":"x"})))
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    // Read access: can open (token says read), cannot manage collaborators.
    let (s, v) = e
        .call(
            "PUT",
            &format!("{path}/collaborators/bob"),
            Some(&alice),
            Some(json!({"permission":"read"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .call("POST", &format!("{path}/open"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .call(
            "PUT",
            &format!("{path}/collaborators/{bob_id}"),
            Some(&bob),
            Some(json!({"permission":"admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Removing bob: he is a stranger again.
    let (s, _) = e
        .call(
            "DELETE",
            &format!("{path}/collaborators/bob"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        e.call("POST", &format!("{path}/open"), Some(&bob), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    // Bad bodies are 400 with the reason.
    let (s, v) = e
        .call(
            "PUT",
            &format!("{path}/collaborators/bob"),
            Some(&alice),
            Some(json!({"permission":"owner"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"].as_str().unwrap().contains("invalid JSON body"),
        "{v}"
    );
}

#[tokio::test]
async fn no_hosts_means_a_clear_503_on_open() {
    let e = env().await;
    let (_, alice) = e.user("alice").await;
    e.project(&alice, "p").await;
    let (s, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "no_eligible_host");
}

#[tokio::test]
async fn host_acl_lookup_only_for_projects_on_that_host() {
    let e = env().await;
    let (h1, h2) = (Host::new(1), Host::new(2));
    e.register(&h1).await;
    let (alice_id, alice) = e.user("alice").await;
    let p = e.project(&alice, "p").await;
    e.call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    e.register(&h2).await;
    let q = format!("project={}&user={alice_id}", p.id);
    let (s, v) = e
        .signed(
            &h1,
            &h1.key,
            "GET",
            &format!("/v1/hosts/{}/acl?{q}", h1.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["permission"], "admin");
    let (s, _) = e
        .signed(
            &h2,
            &h2.key,
            "GET",
            &format!("/v1/hosts/{}/acl?{q}", h2.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_channel_delivers_a_revocation_within_a_second() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let e = env().await;
    let h = Host::new(1);
    e.register(&h).await;
    let (_, alice) = e.user("alice").await;
    let (bob_id, bob) = e.user("bob").await;
    let p = e.project(&alice, "p").await;
    e.call(
        "PUT",
        "/v1/projects/p/collaborators/bob",
        Some(&alice),
        Some(json!({"permission":"write"})),
    )
    .await;
    e.call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = e.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let path = format!("/v1/hosts/{}/push", h.id);
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in sign_request(&h.key, h.id, "GET", &path, e.clock.now(), b"") {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // Wait until the hub has the connection (the upgrade completes first).
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = std::time::Instant::now();
    let (s, _) = e
        .call(
            "DELETE",
            "/v1/projects/p/collaborators/bob",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let msg = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .expect("within 1 s")
        .unwrap()
        .unwrap();
    let frame: PushFrame = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        frame.message,
        PushMessage::Acl {
            project: p.id,
            user: bob_id.parse().unwrap(),
            permission: None
        }
    );

    // Sign-out everywhere reaches the host too.
    let (s, v) = e
        .call("POST", "/v1/users/bob/signout", Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["hosts_notified"], 1);
    let msg = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let frame: PushFrame = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert!(matches!(frame.message, PushMessage::RevokeUser { .. }));
    assert_eq!(frame.seq, 2);

    // Keepalives can ride the same channel: the lease comes back as a frame.
    let ka = cocalc_core::wire::HostMessage::Keepalive {
        keepalive: KeepaliveRequest::new(h.id, Health::Ok, Capacity::default(), Load::default()),
    };
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Text(serde_json::to_string(&ka).unwrap().into()),
    )
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let frame: PushFrame = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert!(
        matches!(&frame.message, PushMessage::Lease { grant } if grant.state == HostState::Up),
        "{frame:?}"
    );

    // An unsigned push connection is refused.
    let bare = format!("ws://{addr}{path}").into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(bare).await.is_err());

    // Keepalive frames are not signed one by one, so the channel goes with
    // the key that opened it: re-registering with a new key closes it.
    let rekeyed = Host {
        id: h.id,
        key: ed25519_dalek::SigningKey::from_bytes(&[99; 32]),
    };
    e.register(&rekeyed).await;
    let end = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .expect("closed within 1 s");
    assert!(
        matches!(
            end,
            None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))
        ),
        "{end:?}"
    );
}

#[tokio::test]
async fn key_rotation_signs_new_tokens_with_the_new_key_and_keeps_the_old() {
    let e = env().await;
    let h = Host::new(1);
    let first = e.register(&h).await;
    let (_, alice) = e.user("alice").await;
    e.project(&alice, "p").await;
    let (_, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    let old_token = v["token"].as_str().unwrap().to_string();
    let (s, v) = e
        .call("POST", "/v1/admin/keys/rotate", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new_kid = v["key_id"].as_str().unwrap().to_string();
    let (_, v) = e.keepalive(&h).await;
    let grant: LeaseGrant = serde_json::from_value(v).unwrap();
    assert_eq!(grant.signing_keys.len(), 2);
    assert_eq!(
        grant.signing_keys[1], first.signing_keys[0],
        "old key still published"
    );
    let mut keys = KeySet::new();
    for k in &grant.signing_keys {
        keys.insert_public(paserk::decode_public(k).unwrap(), Timestamp(1));
    }
    let ver = Verifier::new(h.id, keys, Arc::new(e.clock.clone()));
    let (_, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    let new_claims = ver.verify(v["token"].as_str().unwrap()).unwrap();
    assert_eq!(new_claims.key_id, new_kid);
    assert!(ver.verify(&old_token).is_ok());
}

#[tokio::test]
async fn replacing_a_project_off_a_down_host_is_explicit_and_bumps_the_generation() {
    let e = env().await;
    let (h1, h2) = (Host::new(1), Host::new(2));
    let grant = e.register(&h1).await;
    let (_, alice) = e.user("alice").await;
    let p = e.project(&alice, "p").await;
    let (_, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    assert_eq!(v["host"], h1.id.to_string());
    e.register(&h2).await;
    let path = format!("/v1/projects/{}/replace", p.id);
    // Host 1 is up: no re-placement.
    let (s, v) = e.call("POST", &path, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Users cannot do it.
    assert_eq!(
        e.call("POST", &path, Some(&alice), None).await.0,
        StatusCode::FORBIDDEN
    );
    // Host 1's lease runs out: it is down, the project stays mapped to it
    // (a lost heartbeat re-places nothing by itself)...
    e.clock.set(grant.lease_expires);
    e.keepalive(&h2).await;
    let (s, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("is down"), "{v}");
    // ...until the operator re-places it: generation 2 on host 2.
    let (s, v) = e.call("POST", &path, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["generation"], 2);
    assert_eq!(v["decision"]["host"], h2.id.to_string());
    let (s, v) = e
        .call("POST", "/v1/projects/p/open", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["host"].as_str().unwrap(), v["generation"].as_u64()),
        (h2.id.to_string().as_str(), Some(2))
    );
}
