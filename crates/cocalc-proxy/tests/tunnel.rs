//! The tunnel protocol between a proxy's [`TunnelHub`] and a host's
//! `TunnelClient`: streams carry bytes unchanged, every bad handshake is
//! refused with its reason, and a dropped tunnel fails requests in flight
//! at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Path;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use cocalc_auth::{host_auth, paserk};
use cocalc_client::MasterClient;
use cocalc_core::wire::{
    HostKeyResponse, DIAL_HEADER, DIAL_PATH, DIAL_PROTOCOL, TUNNEL_PATH, TUNNEL_PROTOCOL,
    TUNNEL_SIGNED_METHOD,
};
use cocalc_core::{ApiError, Clock, HostEndpoint, HostId, SystemClock, Transport};
use cocalc_host::tunnel::{TunnelClient, TunnelClientConfig, TunnelError};
use cocalc_proxy::{TunnelConfig, TunnelHub};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: HostId = HostId::from_bytes([0x11; 16]);

fn host_key() -> SigningKey {
    SigningKey::from_bytes(&[0x22; 32])
}

async fn serve(router: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    addr
}

/// A master that knows one host's key.
async fn fake_master() -> String {
    let public = paserk::encode_public(&host_key().verifying_key());
    let router = Router::new().route(
        "/v1/hosts/{h}/key",
        get(move |Path(h): Path<String>| {
            let public = public.clone();
            async move {
                if h == HOST.to_string() {
                    Ok(Json(HostKeyResponse::new(HOST, public)))
                } else {
                    Err((
                        StatusCode::NOT_FOUND,
                        Json(ApiError::new(404, "not_found", format!("no host {h}"))),
                    ))
                }
            }
        }),
    );
    format!("http://{}", serve(router).await)
}

/// A proxy with only the tunnel route; returns the hub and its handle.
async fn proxy() -> (Arc<TunnelHub>, String) {
    proxy_with(|_| {}).await
}

async fn proxy_with(tune: impl FnOnce(&mut TunnelConfig)) -> (Arc<TunnelHub>, String) {
    let master = fake_master().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = format!("http://{}", l.local_addr().unwrap());
    let mut cfg = TunnelConfig::new(&handle);
    tune(&mut cfg);
    let hub = TunnelHub::new(
        cfg,
        MasterClient::new(master, "unused"),
        Arc::new(SystemClock),
    );
    let router = hub.clone().router();
    tokio::spawn(cocalc_proxy::serve(l, router, std::future::pending()));
    (hub, handle)
}

/// What the hidden host serves.
fn data_plane() -> Router {
    Router::new()
        .route("/echo", post(|body: axum::body::Bytes| async move { body }))
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
}

async fn wait_connected(hub: &TunnelHub, host: HostId) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub.connected().contains(&host) {
        assert!(Instant::now() < deadline, "tunnel never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

async fn stream_client(hub: &TunnelHub, handle: &str) -> Sender {
    let conn = hub
        .connect(HOST, &HostEndpoint::Tunnel(handle.to_string()))
        .await
        .unwrap();
    let (sender, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(driver);
    sender
}

/// A hidden host serving [`data_plane`] through a tunnel to `handle`,
/// once the tunnel is up.
async fn start_host(
    hub: &TunnelHub,
    handle: &str,
) -> (Arc<TunnelClient>, tokio::task::JoinHandle<()>) {
    let client = TunnelClient::new(
        TunnelClientConfig::new(handle, HOST, host_key()),
        Arc::new(SystemClock),
    );
    let run = tokio::spawn(client.clone().run(data_plane(), std::future::pending()));
    wait_connected(hub, HOST).await;
    (client, run)
}

/// `GET /hello` on `s`, which must answer "hello".
async fn say_hello(s: &mut Sender) {
    s.ready().await.unwrap();
    let r = s
        .send_request(
            Request::get("/hello")
                .header("host", "h")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_of(r).await, b"hello");
}

async fn body_of(resp: hyper::Response<hyper::body::Incoming>) -> Vec<u8> {
    axum::body::to_bytes(Body::new(resp.into_body()), usize::MAX)
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_bytes_and_dropped_tunnels_fail_fast() {
    let (hub, handle) = proxy().await;
    let (client, run) = start_host(&hub, &handle).await;
    assert!(client.is_connected());

    // 5 MB up and back down, byte for byte, on one stream; a second
    // stream at the same time.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
    let mut a = stream_client(&hub, &handle).await;
    let mut b = stream_client(&hub, &handle).await;
    let echo = a.send_request(
        Request::post("/echo")
            .header("host", "h")
            .body(Body::from(big.clone()))
            .unwrap(),
    );
    let hello = b.send_request(
        Request::get("/hello")
            .header("host", "h")
            .body(Body::empty())
            .unwrap(),
    );
    let (echo, hello) = tokio::join!(echo, hello);
    assert_eq!(body_of(hello.unwrap()).await, b"hello");
    let echo = echo.unwrap();
    assert_eq!(echo.status(), 200);
    assert!(body_of(echo).await == big, "echo differs");

    // A tunnel that lands at another proxy, and a host with none.
    let e = hub
        .connect(HOST, &HostEndpoint::Tunnel("http://elsewhere:1".into()))
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("lands at the proxy http://elsewhere:1"),
        "{e}"
    );
    let other = HostId::from_bytes([0x33; 16]);
    let e = hub
        .connect(other, &HostEndpoint::Tunnel(handle.clone()))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("has no tunnel to this proxy"), "{e}");

    // The host goes away with a request in flight: it fails at once.
    let mut c = stream_client(&hub, &handle).await;
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = c
            .send_request(
                Request::get("/slow")
                    .header("host", "h")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        (r.is_err(), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.abort();
    let (failed, took) = slow.await.unwrap();
    assert!(failed, "the in-flight request cannot succeed");
    assert!(
        took < Duration::from_secs(5),
        "in-flight request hung for {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while hub.connected().contains(&HOST) {
        assert!(Instant::now() < deadline, "the dead tunnel is still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The host comes back: a new tunnel serves again.
    let (_client, _run) = start_host(&hub, &handle).await;
    let mut d = stream_client(&hub, &handle).await;
    say_hello(&mut d).await;
    assert_eq!(
        hub.stats()
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // All of it went over dial-back connections, none inside the tunnel.
    assert_eq!(count(&hub.stats().dials), 4);
    assert_eq!(count(&hub.stats().streams), 0);
    assert_eq!(count(&hub.stats().dial_failures), 0);
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sends 2 MB to `/echo` and a `/hello` on one connection and checks both.
async fn round_trip(s: &mut Sender) {
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 239) as u8).collect();
    let r = s
        .send_request(
            Request::post("/echo")
                .header("host", "h")
                .body(Body::from(big.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(body_of(r).await == big, "echo differs");
    s.ready().await.unwrap();
    say_hello(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dial_back_everything_rides_the_tunnel() {
    let (hub, handle) = proxy_with(|c| c.dial_back = false).await;
    let (client, _run) = start_host(&hub, &handle).await;
    round_trip(&mut stream_client(&hub, &handle).await).await;
    round_trip(&mut stream_client(&hub, &handle).await).await;
    assert_eq!(count(&hub.stats().streams), 2);
    assert_eq!(count(&hub.stats().dials), 0);
    assert_eq!(client.dials(), 0, "the host was never asked to dial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_dial_back_falls_back_to_the_tunnel_and_is_not_retried_at_once() {
    // No host can dial back within a microsecond.
    let (hub, handle) = proxy_with(|c| c.dial_timeout = Duration::from_micros(1)).await;
    let (client, _run) = start_host(&hub, &handle).await;
    round_trip(&mut stream_client(&hub, &handle).await).await;
    round_trip(&mut stream_client(&hub, &handle).await).await;
    assert_eq!(count(&hub.stats().dial_failures), 1, "asked once, then not");
    assert_eq!(count(&hub.stats().streams), 2, "both served in the tunnel");
    assert_eq!(count(&hub.stats().dials), 0);
    // The host's late dial-back, if the request reached it before it was
    // given up, finds no one waiting and is refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(count(&hub.stats().dials_refused) <= 1);
    assert_eq!(client.dials(), 0, "no dial-back connection was accepted");
}

#[tokio::test]
async fn dial_backs_without_a_waiting_request_are_refused() {
    let (hub, handle) = proxy().await;
    let addr = handle.trim_start_matches("http://").to_string();
    let nonce = "0123456789abcdef0123456789abcdef";
    for (upgrade, nonce, status, code) in [
        (Some(DIAL_PROTOCOL), Some(nonce), 403, "unknown_dial"),
        (None, Some(nonce), 400, "bad_dial"),
        (Some(DIAL_PROTOCOL), None, 400, "bad_dial"),
        (
            Some(DIAL_PROTOCOL),
            Some("0123456789ABCDEF0123456789ABCDEF"),
            400,
            "bad_dial",
        ),
        (Some(DIAL_PROTOCOL), Some("short"), 400, "bad_dial"),
    ] {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get(DIAL_PATH).header("host", &addr);
        if let Some(u) = upgrade {
            req = req.header("connection", "upgrade").header("upgrade", u);
        }
        if let Some(n) = nonce {
            req = req.header(DIAL_HEADER, n);
        }
        let r = s
            .send_request(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{upgrade:?} {nonce:?}");
        let e: ApiError = serde_json::from_slice(&body_of(r).await).unwrap();
        assert_eq!(e.code, code, "{upgrade:?} {nonce:?}");
    }
    assert_eq!(count(&hub.stats().dials_refused), 5);
}

async fn refused(cfg: TunnelClientConfig) -> (u16, String) {
    let c = TunnelClient::new(cfg, Arc::new(SystemClock));
    match c.once(data_plane()).await {
        Err(TunnelError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused_with_a_reason() {
    let (hub, handle) = proxy().await;
    // Another key for a registered host.
    let (s, m) = refused(TunnelClientConfig::new(
        &handle,
        HOST,
        SigningKey::from_bytes(&[9; 32]),
    ))
    .await;
    assert_eq!(s, 401);
    assert!(m.contains("signature"), "{m}");
    // A host the master does not know.
    let (s, m) = refused(TunnelClientConfig::new(
        &handle,
        HostId::from_bytes([0x44; 16]),
        host_key(),
    ))
    .await;
    assert_eq!(s, 401);
    assert!(m.contains("not registered"), "{m}");
    // Signed for another handle (same address, other name): refused.
    let other_name = handle.replace("127.0.0.1", "localhost");
    let (s, m) = refused(TunnelClientConfig::new(&other_name, HOST, host_key())).await;
    assert_eq!(s, 401, "{m}");

    // A replayed handshake: the same signed headers twice.
    let addr = handle.trim_start_matches("http://").to_string();
    let signed = host_auth::sign_request(
        &host_key(),
        HOST,
        TUNNEL_SIGNED_METHOD,
        &handle,
        SystemClock.now(),
        b"",
    );
    let raw = |upgrade: &str| {
        let mut req = format!(
            "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: upgrade\r\nUpgrade: {upgrade}\r\n"
        );
        for (k, v) in &signed {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req
    };
    let status_of = |req: String| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    };
    // Without the right Upgrade token nothing is checked further.
    let r = status_of(raw("websocket")).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let first = status_of(raw(TUNNEL_PROTOCOL)).await;
    assert!(first.starts_with("HTTP/1.1 101"), "{first}");
    let second = status_of(raw(TUNNEL_PROTOCOL)).await;
    assert!(second.starts_with("HTTP/1.1 401"), "{second}");
    assert!(second.contains("replayed_handshake"), "{second}");
    assert!(
        hub.stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_are_rate_limited_per_client() {
    let (hub, handle) = proxy_with(|c| c.handshakes_per_sec = 2).await;
    let stranger = || TunnelClientConfig::new(&handle, HOST, SigningKey::from_bytes(&[8; 32]));
    // Two bad handshakes are judged on their merits; the third is not.
    for _ in 0..2 {
        let (s, _) = refused(stranger()).await;
        assert_eq!(s, 401);
    }
    let (s, m) = refused(stranger()).await;
    assert_eq!(s, 429, "{m}");
    assert!(m.contains("too many tunnel handshakes"), "{m}");
    assert_eq!(
        hub.stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tunnel_from_the_same_host_closes_the_older() {
    let (hub, handle) = proxy().await;
    let dial = || {
        let c = TunnelClient::new(
            TunnelClientConfig::new(&handle, HOST, host_key()),
            Arc::new(SystemClock),
        );
        tokio::spawn(async move { c.once(data_plane()).await })
    };
    let first = dial();
    wait_connected(&hub, HOST).await;
    let second = dial();
    // The proxy closes the first connection (it has no open streams) as
    // soon as the second is in.
    let t = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the older tunnel was not closed");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        hub.stats()
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The newer one serves.
    wait_connected(&hub, HOST).await;
    let mut s = stream_client(&hub, &handle).await;
    say_hello(&mut s).await;
    assert!(!second.is_finished());
}
