//! The host's master link against a real master served on loopback:
//! registration with a bootstrap token, keepalives, ACL lookups, the push
//! channel, and the link state the offline grace depends on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocalc_auth::{AclCache, AclPolicy, KeySet};
use cocalc_core::{
    Capacity, Generation, Health, HostEndpoint, HostId, Load, Permission, ProjectId, Region,
    SharedClock, SystemClock, Timestamp, TokenClaims, UserId,
};
use cocalc_host::master_link::{HostEvents, LinkConfig, LinkError, MasterLink};
use cocalc_master::{http, Directory, Master, MasterClient, MasterConfig};
use cocalc_placement::{LeastLoaded, MemoryStore, Registry, RegistryPolicy};
use ed25519_dalek::SigningKey;

const ADMIN: &str = "admin-key";

struct Running {
    url: String,
    task: tokio::task::JoinHandle<()>,
    /// Stops the server as a daemon stops: no new connections, idle
    /// keep-alive connections closed.
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(master: Arc<Master>, addr: &str) -> Running {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, http::router(master))
            .with_graceful_shutdown(async {
                // Only a real stop; a dropped sender keeps serving.
                if stopped.await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await
            .unwrap();
    });
    Running { url, task, stop }
}

async fn master() -> Arc<Master> {
    let clock: SharedClock = Arc::new(SystemClock);
    Arc::new(
        Master::new(
            MasterConfig::new(ADMIN),
            clock.clone(),
            Directory::open(None).unwrap(),
            Arc::new(MemoryStore::new()),
            Registry::new(clock.clone(), RegistryPolicy::default(), 1),
            Box::new(LeastLoaded::new()),
            KeySet::generate(clock.now()).unwrap(),
        )
        .await
        .unwrap(),
    )
}

#[derive(Default)]
struct Seen {
    keys: Mutex<Vec<usize>>,
}

impl HostEvents for Seen {
    fn signing_keys(&self, keys: &KeySet) {
        self.keys.lock().unwrap().push(keys.keys().len());
    }
}

fn capacity() -> Capacity {
    Capacity {
        project_slots: 10,
        disk_free_bytes: 100 << 30,
        disk_total_bytes: 200 << 30,
        ..Capacity::default()
    }
}

fn claims(user: UserId, project: ProjectId, iat: Timestamp) -> TokenClaims {
    TokenClaims::new(
        "m".into(),
        user,
        project,
        HostId::new_v4([1; 16]),
        Generation(1),
        Permission::Write,
        iat,
        iat,
        iat.saturating_add(Duration::from_secs(600)),
        "jti".into(),
        "kid".into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_registers_fetches_acls_and_hears_pushes() {
    let m = master().await;
    let srv = serve(m.clone(), "127.0.0.1:0").await;
    let admin = MasterClient::new(&srv.url, ADMIN);
    let token = admin.bootstrap_token().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    let clock: SharedClock = Arc::new(SystemClock);
    let acl = Arc::new(AclCache::new(clock.clone(), AclPolicy::default()));
    let seen = Arc::new(Seen::default());
    let host = HostId::new_v4([1; 16]);
    let cfg = LinkConfig {
        master_url: srv.url.clone(),
        host,
        key: SigningKey::from_bytes(&[1; 32]),
        bootstrap_token: Some(token),
        region: Region("local".into()),
        endpoint: HostEndpoint::Url("http://127.0.0.1:1".into()),
    };
    let link = Arc::new(MasterLink::new(
        cfg.clone(),
        clock.clone(),
        acl.clone(),
        seen.clone(),
    ));
    assert!(
        acl.master_down_since().is_some(),
        "down until the master answers"
    );
    link.register(capacity()).await.unwrap();
    assert_eq!(acl.master_down_since(), None);
    assert_eq!(*seen.keys.lock().unwrap(), vec![1]);
    link.keepalive(Health::Ok, capacity(), Load::default())
        .await
        .unwrap();

    // A restarted host re-registers with its key; the used token is not needed.
    let mut again = cfg.clone();
    again.bootstrap_token = None;
    MasterLink::new(again, clock.clone(), acl.clone(), seen.clone())
        .register(capacity())
        .await
        .unwrap();
    // A different key for the same host id, without a token, is refused.
    let mut imposter = cfg.clone();
    imposter.key = SigningKey::from_bytes(&[9; 32]);
    imposter.bootstrap_token = None;
    let e = MasterLink::new(imposter, clock.clone(), acl.clone(), seen.clone())
        .register(capacity())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LinkError::Refused(a) if a.status == 401),
        "{e}"
    );

    // A user and a project placed on this host.
    let alice = admin.create_user("alice").await.unwrap();
    let bob = admin.create_user("bob").await.unwrap();
    let alice_c = MasterClient::new(&srv.url, alice["api_key"].as_str().unwrap());
    let bob_c = MasterClient::new(&srv.url, bob["api_key"].as_str().unwrap());
    let bob_id: UserId = bob["id"].as_str().unwrap().parse().unwrap();
    let p = alice_c
        .create_project(&cocalc_core::wire::CreateProjectRequest::new("p"))
        .await
        .unwrap();
    let open = alice_c.open("p").await.unwrap();
    assert_eq!(open.host, host);

    // The host looks bob up: no access yet.
    let a = link.fetch_acl(p.id, bob_id).await.unwrap();
    assert_eq!(a.permission, None);

    // Push channel: grants and removals arrive within a second.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let push_link = link.clone();
    let push = tokio::spawn(async move {
        let _ = push_link
            .push_channel(move || {
                let _ = tx.send(());
            })
            .await;
    });
    rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bob_token = claims(bob_id, p.id, clock.now());
    reqwest::Client::new()
        .put(format!(
            "{}/v1/projects/{}/collaborators/bob",
            srv.url, p.id
        ))
        .bearer_auth(alice["api_key"].as_str().unwrap())
        .json(&serde_json::json!({"permission": "write"}))
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while acl.check(&bob_token, Permission::Write).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "grant not pushed within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Bob signs out everywhere: his older tokens die on the host at once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    reqwest::Client::new()
        .post(format!("{}/v1/users/bob/signout", srv.url))
        .bearer_auth(bob["api_key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while acl.check(&bob_token, Permission::Write).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "revocation not pushed within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = bob_c;
    // Key rotation reaches the host as a new key set.
    admin.rotate_key().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while seen.keys.lock().unwrap().last() != Some(&2) {
        assert!(std::time::Instant::now() < deadline, "keys not pushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    push.abort();
    srv.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_marks_the_link_down_when_the_master_goes_and_up_when_it_returns() {
    let m = master().await;
    let srv = serve(m.clone(), "127.0.0.1:0").await;
    let addr = srv.url.trim_start_matches("http://").to_string();
    let token = MasterClient::new(&srv.url, ADMIN)
        .bootstrap_token()
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let clock: SharedClock = Arc::new(SystemClock);
    let acl = Arc::new(AclCache::new(clock.clone(), AclPolicy::default()));
    let link = Arc::new(MasterLink::new(
        LinkConfig {
            master_url: srv.url.clone(),
            host: HostId::new_v4([2; 16]),
            key: SigningKey::from_bytes(&[2; 32]),
            bootstrap_token: Some(token),
            region: Region("local".into()),
            endpoint: HostEndpoint::Url("http://127.0.0.1:1".into()),
        },
        clock.clone(),
        acl.clone(),
        Arc::new(cocalc_host::master_link::NoEvents),
    ));
    let status: Arc<dyn cocalc_host::master_link::HostStatus> =
        Arc::new(|| (Health::Ok, capacity(), Load::default()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(link.clone().run(status, async {
        let _ = stop_rx.await;
    }));

    let wait_for = |want_up: bool| {
        let acl = acl.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while acl.master_down_since().is_none() != want_up {
                assert!(
                    std::time::Instant::now() < deadline,
                    "link never became up={want_up}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(true).await;
    // And its push channel is open (it opens once the host is registered):
    // one still being opened while the master stops could be taken by the
    // hub after `close_all` below and stay up.
    let host = HostId::new_v4([2; 16]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !m.push().connected().contains(&host) {
        assert!(
            std::time::Instant::now() < deadline,
            "push channel never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The master goes away as a daemon stops: no listener, idle HTTP
    // connections closed (aborting the task would leave the host's pooled
    // keep-alive connection served, and its keepalives answered), and then
    // its push channels closed (the daemon does this on shutdown). Only
    // once the listener is gone: a push channel the host reopened before
    // that would otherwise stay up, answering keepalives from this process.
    let _ = srv.stop.send(());
    let _ = srv.task.await;
    m.push().close_all();
    wait_for(false).await;
    // The master returns on the same address (same state): the host
    // reconnects by itself.
    let back = serve(m, &addr).await;
    wait_for(true).await;
    let _ = stop_tx.send(());
    runner.await.unwrap();
    back.task.abort();
}

/// Reports two projects as held; records the fences pushed back.
#[derive(Default)]
struct Holder {
    held: Vec<(ProjectId, Generation)>,
    fences: Mutex<Vec<(ProjectId, Generation)>>,
}

impl HostEvents for Holder {
    fn held(&self) -> Vec<(ProjectId, Generation)> {
        self.held.clone()
    }
    fn fence(&self, project: ProjectId, generation: Generation) {
        self.fences.lock().unwrap().push((project, generation));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_push_channel_reports_held_projects_and_gets_fences_for_those_placed_elsewhere() {
    let m = master().await;
    let srv = serve(m.clone(), "127.0.0.1:0").await;
    let admin = m.authenticate(ADMIN).unwrap();
    let (here, elsewhere, unknown) = (
        ProjectId::from_bytes([1; 16]),
        ProjectId::from_bytes([2; 16]),
        ProjectId::from_bytes([3; 16]),
    );
    let host = HostId::new_v4([4; 16]);
    let other = HostId::new_v4([5; 16]);
    let decision = |h| cocalc_core::PlacementDecision::new(h, "test", "by hand", vec![], vec![]);
    // `here` is placed on this host at generation 1; `elsewhere` went to
    // another host at generation 2 while this one (which saw 1) was away.
    m.store()
        .assign(
            here,
            host,
            Some(Generation(0)),
            decision(host),
            Timestamp(1),
        )
        .await
        .unwrap();
    m.store()
        .assign(
            elsewhere,
            other,
            Some(Generation(0)),
            decision(other),
            Timestamp(1),
        )
        .await
        .unwrap();
    m.store()
        .assign(
            elsewhere,
            other,
            Some(Generation(1)),
            decision(other),
            Timestamp(2),
        )
        .await
        .unwrap();

    let holder = Arc::new(Holder {
        held: vec![
            (here, Generation(1)),
            (elsewhere, Generation(1)),
            (unknown, Generation(7)),
        ],
        ..Holder::default()
    });
    let clock: SharedClock = Arc::new(SystemClock);
    let link = Arc::new(MasterLink::new(
        LinkConfig {
            master_url: srv.url.clone(),
            host,
            key: SigningKey::from_bytes(&[4; 32]),
            bootstrap_token: Some(m.bootstrap_token(&admin).unwrap().0),
            region: Region("local".into()),
            endpoint: HostEndpoint::Url("http://127.0.0.1:1".into()),
        },
        clock.clone(),
        Arc::new(AclCache::new(clock, AclPolicy::default())),
        holder.clone(),
    ));
    link.register(capacity()).await.unwrap();
    let channel = tokio::spawn({
        let link = link.clone();
        async move { link.push_channel(|| {}).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while holder.fences.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no fence came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only the project placed elsewhere at a newer generation is fenced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        *holder.fences.lock().unwrap(),
        vec![(elsewhere, Generation(2))]
    );
    channel.abort();
    let _ = srv.stop.send(());
    let _ = srv.task.await;
}
