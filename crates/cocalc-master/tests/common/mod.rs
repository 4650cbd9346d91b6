//! Test helpers shared by the master's API tests: an in-process master on a
//! manual clock, hosts with keys, and a recorder of every response (for the
//! OpenAPI conformance test).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use cocalc_auth::host_auth::sign_request;
use cocalc_auth::{paserk, KeySet};
use cocalc_core::wire::{KeepaliveRequest, LeaseGrant, ProjectInfo, RegisterHostRequest};
use cocalc_core::{
    Capacity, Clock, Health, HostEndpoint, HostId, Load, ManualClock, Region, Timestamp,
};
use cocalc_master::{http, Directory, Master, MasterConfig};
use cocalc_placement::{LeastLoaded, Registry, RegistryPolicy, SqliteStore};
use ed25519_dalek::SigningKey;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// One response seen by a test.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) body: Value,
}

pub(crate) const ADMIN: &str = "admin-key-for-tests";

pub(crate) struct Env {
    pub(crate) clock: ManualClock,
    pub(crate) app: Router,
    pub(crate) recorded: Arc<Mutex<Vec<Recorded>>>,
}

pub(crate) async fn env() -> Env {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let shared = Arc::new(clock.clone());
    let master = Master::new(
        MasterConfig::new(ADMIN),
        shared.clone(),
        Directory::open(None).unwrap(),
        // As the daemon runs it: SQLite with placements cached.
        Arc::new(SqliteStore::open_in_memory().unwrap().cached()),
        Registry::new(shared.clone(), RegistryPolicy::default(), 1),
        Box::new(LeastLoaded::new()),
        KeySet::generate(Timestamp(1)).unwrap(),
    )
    .await
    .unwrap();
    Env {
        clock,
        app: http::router(Arc::new(master)),
        recorded: Arc::default(),
    }
}

pub(crate) struct Host {
    pub(crate) id: HostId,
    pub(crate) key: SigningKey,
}

impl Host {
    pub(crate) fn new(n: u8) -> Self {
        Host {
            id: HostId::new_v4([n; 16]),
            key: SigningKey::from_bytes(&[n; 32]),
        }
    }

    pub(crate) fn register_req(&self, token: Option<&str>) -> Value {
        serde_json::to_value(RegisterHostRequest::new(
            self.id,
            paserk::encode_public(&self.key.verifying_key()),
            token.map(str::to_string),
            Region("eu".into()),
            HostEndpoint::Url(format!(
                "http://127.0.0.1:{}",
                9000 + self.id.as_bytes()[0] as u16
            )),
            Capacity {
                project_slots: 10,
                ..Capacity::default()
            },
        ))
        .unwrap()
    }
}

impl Env {
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
        self.send(req.body(body).unwrap()).await
    }

    pub(crate) async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        self.recorded.lock().unwrap().push(Recorded {
            method,
            path,
            status: status.as_u16(),
            body: v.clone(),
        });
        (status, v)
    }

    pub(crate) async fn signed(
        &self,
        host: &Host,
        signer: &SigningKey,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in sign_request(
            signer,
            host.id,
            method,
            path,
            self.clock.now(),
            bytes.as_bytes(),
        ) {
            req = req.header(k, v);
        }
        self.send(req.body(Body::from(bytes)).unwrap()).await
    }

    pub(crate) async fn bootstrap(&self) -> String {
        let (s, v) = self
            .call("POST", "/v1/admin/bootstrap-tokens", Some(ADMIN), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    pub(crate) async fn register(&self, host: &Host) -> LeaseGrant {
        let t = self.bootstrap().await;
        let (s, v) = self
            .call(
                "POST",
                "/v1/hosts/register",
                None,
                Some(host.register_req(Some(&t))),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    pub(crate) async fn keepalive(&self, host: &Host) -> (StatusCode, Value) {
        let body = serde_json::to_value(KeepaliveRequest::new(
            host.id,
            Health::Ok,
            Capacity {
                project_slots: 10,
                ..Capacity::default()
            },
            Load::default(),
        ))
        .unwrap();
        self.signed(
            host,
            &host.key,
            "POST",
            &format!("/v1/hosts/{}/keepalive", host.id),
            Some(body),
        )
        .await
    }

    pub(crate) async fn user(&self, name: &str) -> (String, String) {
        let (s, v) = self
            .call(
                "POST",
                "/v1/users",
                Some(ADMIN),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().into(),
            v["api_key"].as_str().unwrap().into(),
        )
    }

    pub(crate) async fn project(&self, key: &str, name: &str) -> ProjectInfo {
        let (s, v) = self
            .call(
                "POST",
                "/v1/projects",
                Some(key),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        serde_json::from_value(v).unwrap()
    }
}
