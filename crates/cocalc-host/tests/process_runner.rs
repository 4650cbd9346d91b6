//! The runner contract against [`ProcessRunner`] (no privileges needed).

use std::sync::Arc;

use cocalc_core::SystemClock;
use cocalc_host::{ImagePolicy, ProcessRunner};
use cocalc_testkit::runner_contract::{self as contract, ContractEnv};

fn setup() -> (ProcessRunner, ContractEnv, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().to_path_buf();
    let n = std::sync::atomic::AtomicU64::new(0);
    let env = ContractEnv {
        make_home: Box::new(move || {
            let p = base.join(format!(
                "h{}",
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).expect("home");
            p
        }),
        forbidden_image: "ubuntu:99.04".into(),
    };
    let r = ProcessRunner::new(ImagePolicy::single("host"), Arc::new(SystemClock));
    (r, env, dir)
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (r, env, _dir) = setup();
            contract::$name(&r, &env).await;
        }
    )*};
}

contract_tests!(
    status_of_unknown_project_is_stopped,
    start_exec_stop_round_trip,
    start_is_idempotent,
    stop_is_idempotent,
    exec_needs_a_running_project,
    exec_runs_in_the_home,
    exec_streams_output_as_produced,
    exec_passes_stdin,
    exec_timeout_is_reported,
    dropping_the_exec_stream_ends_the_command,
    exec_streaming_input_arrives_while_it_runs,
    image_outside_allowlist_is_refused,
    stale_generation_is_refused,
    list_shows_running_projects,
    pty_echoes_resizes_and_closes,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_counts_cpu_and_processes_of_the_group() {
    use cocalc_core::{ExecRequest, Generation, ProjectSpec, Runner};
    use cocalc_host::ActivitySource;
    use std::time::Duration;

    let (r, env, _dir) = setup();
    let spec = ProjectSpec::new(contract::fresh_project(), Generation(1), (env.make_home)());
    r.start(&spec).await.expect("start");
    let a = r
        .sample(spec.project)
        .await
        .expect("sample")
        .expect("running");
    let mut req = ExecRequest::new(
        [
            "sh",
            "-c",
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 5",
        ]
        .map(String::from)
        .to_vec(),
    );
    req.timeout = Some(Duration::from_secs(30));
    let _busy = r.exec(spec.project, req).await.expect("exec");
    let mut b = a;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b = r
            .sample(spec.project)
            .await
            .expect("sample")
            .expect("running");
        if b.cpu_time_us > a.cpu_time_us + 100_000 {
            break;
        }
    }
    assert!(b.cpu_time_us > a.cpu_time_us + 100_000, "{a:?} -> {b:?}");
    assert!(b.processes >= 2, "{b:?}");
    r.stop(spec.project, Duration::from_secs(1))
        .await
        .expect("stop");
    assert_eq!(r.sample(spec.project).await.expect("sample"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_ports_send_small_writes_at_once() {
    use cocalc_core::{Generation, ProjectSpec, Runner};

    let (r, env, _dir) = setup();
    let spec = ProjectSpec::new(contract::fresh_project(), Generation(1), (env.make_home)());
    // A "server in the project": this runner's projects share the host's
    // loopback.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    assert!(
        r.connect_port(spec.project, port).await.is_err(),
        "not before the project runs"
    );
    r.start(&spec).await.expect("start");
    let mut conn = r.connect_port(spec.project, port).await.expect("connect");
    let tcp = conn
        .as_any_mut()
        .downcast_mut::<tokio::net::TcpStream>()
        .expect("a TCP socket");
    assert!(tcp.nodelay().unwrap(), "TCP_NODELAY on relayed connections");
    r.stop(spec.project, std::time::Duration::from_secs(5))
        .await
        .expect("stop");
}
