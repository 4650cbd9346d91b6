//! [`PodmanRunner`] against real podman (root, podman, runc, busybox).
//!
//! Gating: with `COCALC_TEST_PRIVILEGED=require` every test runs and fails
//! naming what is missing; without it they skip with a note on stderr.
//! Each test has its own podman service, storage and host id
//! ([`common::PodmanFixture`]) and cleans up on drop, also on failure.

mod common;

use std::time::Duration;

use bytes::Bytes;
use cocalc_core::{
    Generation, ProjectSpec, ProjectState, PtySize, ResourceLimits, Runner, RunnerError,
};
use cocalc_host::podman::{container_name, PodmanRunner, LABEL_HOST, LABEL_PROJECT};
use cocalc_testkit::runner_contract::{self as contract, fresh_project, read_until, run};
use common::{privileged, PodmanFixture, IMAGE, MISSING_IMAGE};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GRACE: Duration = Duration::from_secs(5);

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if !privileged() {
                return;
            }
            let fx = PodmanFixture::new().await;
            contract::$name(fx.runner(), &fx.contract_env()).await;
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

fn spec(fx: &PodmanFixture) -> ProjectSpec {
    let mut s = ProjectSpec::new(fresh_project(), Generation(1), fx.home());
    s.hostname = "my-project".into();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_is_named_labelled_unprivileged_and_offline() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let s = spec(&fx);
    let st = r.start(&s).await.expect("start");
    assert_eq!(st.image.as_deref(), Some(IMAGE));
    let c = r
        .docker()
        .inspect_container(&container_name(s.project), None)
        .await
        .expect("inspect by name");
    let labels = c.config.and_then(|c| c.labels).expect("labels");
    assert_eq!(labels[LABEL_PROJECT], s.project.to_string());
    assert_eq!(labels[LABEL_HOST], fx.host.to_string());
    let out = run(
        r,
        s.project,
        &[
            "sh",
            "-c",
            "id -u; hostname; pwd; echo $HOME; ls /sys/class/net",
        ],
    )
    .await
    .expect("exec");
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "2001", "runs as the project user: {text}");
    assert_eq!(lines[1], "my-project");
    assert_eq!(lines[2], "/home/user");
    assert_eq!(lines[3], "/home/user");
    assert_eq!(&lines[4..], ["lo"], "no network but loopback: {text}");
    r.stop(s.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_visible_inside_the_container() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let mut s = spec(&fx);
    let mut limits = ResourceLimits::default();
    limits.memory_bytes = 256 << 20;
    limits.cpu_millis = 500;
    limits.pids = 100;
    s.limits = limits;
    let st = r.start(&s).await.expect("start");
    // cgroup v1 (this machine) or v2.
    let script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; \
                  cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; \
                  if [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); else cat /sys/fs/cgroup/cpu.max; fi";
    let out = run(r, s.project, &["sh", "-c", script])
        .await
        .expect("exec");
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], (256u64 << 20).to_string(), "{text}");
    assert_eq!(lines[1], "100", "{text}");
    let cpu: Vec<u64> = lines[2]
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect();
    assert_eq!(cpu[0] * 1000 / cpu[1], 500, "half a core: {text}");
    let usage = st.usage.expect("usage of a running container");
    assert!(usage.pids >= 1 && usage.memory_bytes > 0, "{usage:?}");
    r.stop(s.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_is_mounted_at_tmp() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let mut s = spec(&fx);
    let scratch = fx.home();
    std::fs::write(scratch.join("s.txt"), "scratch\n").expect("write");
    s.scratch = Some(scratch);
    r.start(&s).await.expect("start");
    let out = run(r, s.project, &["cat", "/tmp/s.txt"])
        .await
        .expect("exec");
    assert_eq!(out.stdout_text(), "scratch\n");
    r.stop(s.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let mut s = spec(&fx);
    s.image = Some(MISSING_IMAGE.into());
    let e = fx.runner().start(&s).await.expect_err("must fail");
    assert_eq!(
        e,
        RunnerError::ImageMissing {
            image: MISSING_IMAGE.into()
        }
    );
    assert!(e.to_string().contains(MISSING_IMAGE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_runner_adopts_running_projects_and_ignores_other_hosts() {
    if !privileged() {
        return;
    }
    let mut fx = PodmanFixture::new().await;
    let s = spec(&fx);
    let mut s2 = spec(&fx);
    s2.generation = Generation(7);
    let first = fx.runner().start(&s).await.expect("start");
    fx.runner().start(&s2).await.expect("start 2");
    let sock = fx.runner().socket();

    // Another host on the same podman sees nothing of ours.
    let other_host = common::fresh_host();
    let other = PodmanRunner::new(fx.config(other_host).with_socket(&sock))
        .await
        .expect("other host's runner");
    assert!(other.list().await.expect("list").is_empty());
    assert_eq!(
        other.status(s.project).await.expect("status").state,
        ProjectState::Stopped
    );
    other.stop(s.project, GRACE).await.expect("stop is a no-op");
    assert!(matches!(
        other.start(&s).await,
        Err(RunnerError::InvalidRequest(_))
    ));
    drop(other);

    // Drop our runner (and its service); containers keep running.
    drop(fx.runner.take());
    let again = PodmanRunner::new(fx.config(fx.host)).await.expect("runner");
    let list = again.list().await.expect("list");
    assert_eq!(list.len(), 2, "{list:?}");
    let adopted = list
        .iter()
        .find(|x| x.project == s.project)
        .expect("adopted");
    assert_eq!(adopted.state, ProjectState::Running);
    assert_eq!(adopted.started_at, first.started_at);
    let st = again.start(&s).await.expect("start after adoption");
    assert_eq!(st.started_at, first.started_at, "no duplicate, no restart");
    let mut old = s2.clone();
    old.generation = Generation(6);
    assert!(matches!(
        again.start(&old).await,
        Err(RunnerError::StaleGeneration { .. })
    ));
    let out = run(&again, s.project, &["echo", "still here"])
        .await
        .expect("exec");
    assert_eq!(out.stdout_text(), "still here\n");
    fx.runner = Some(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_close_ends_the_shell_inside_the_container() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let s = spec(&fx);
    r.start(&s).await.expect("start");
    let mut pty = r
        .pty(
            s.project,
            PtySize {
                rows: 30,
                cols: 100,
            },
        )
        .await
        .expect("pty");
    let mut seen = String::new();
    pty.control
        .write(Bytes::from_static(b"echo hel''lo-pty; stty size\n"))
        .await
        .expect("write");
    read_until(&mut pty.output, &mut seen, "hello-pty").await;
    read_until(&mut pty.output, &mut seen, "30 100").await;
    pty.control
        .resize(PtySize {
            rows: 40,
            cols: 120,
        })
        .await
        .expect("resize");
    pty.control
        .write(Bytes::from_static(b"stty size\n"))
        .await
        .expect("write");
    read_until(&mut pty.output, &mut seen, "40 120").await;
    pty.control.close().await.expect("close");
    // The shell is gone: the output ends.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = pty.output.next().await {}
    })
    .await
    .expect("output ends after close");
    let out = run(
        r,
        s.project,
        &["sh", "-c", "ps | grep -c '[s]h -l' || true"],
    )
    .await
    .expect("exec");
    assert_eq!(out.stdout_text().trim(), "0", "login shell still running");
    r.stop(s.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_port_reaches_a_server_inside_the_project() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let s = spec(&fx);
    std::fs::write(s.home.join("index.html"), "hello from inside\n").expect("write");
    r.start(&s).await.expect("start");
    let mut req = cocalc_core::ExecRequest::new(
        ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/home/user"]
            .map(String::from)
            .to_vec(),
    );
    req.timeout = Some(Duration::from_secs(60));
    let server = r.exec(s.project, req).await.expect("start httpd");
    let mut conn = None;
    for _ in 0..100 {
        match r.connect_port(s.project, 8080).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut conn = conn.expect("connect to httpd in the project");
    assert!(
        conn.nodelay().unwrap(),
        "TCP_NODELAY on relayed connections"
    );
    // The connection counts as activity.
    let sample = cocalc_host::ActivitySource::sample(r, s.project)
        .await
        .expect("sample")
        .expect("running");
    assert!(sample.connections >= 1, "{sample:?}");
    assert!(sample.processes >= 2, "{sample:?}");
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.expect("read");
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(resp.ends_with("hello from inside\n"), "{resp}");
    // Nothing listens on the host's own loopback for this.
    assert!(
        tokio::net::TcpStream::connect("127.0.0.1:8080")
            .await
            .is_err()
            || std::env::var_os("COCALC_TEST_HOST_8080_BUSY").is_some()
    );
    drop(server);
    r.stop(s.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_project_shows_cpu_use_in_samples() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let s = spec(&fx);
    r.start(&s).await.expect("start");
    let a = cocalc_host::ActivitySource::sample(r, s.project)
        .await
        .expect("sample")
        .expect("running");
    let out = run(
        r,
        s.project,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
        ],
    )
    .await
    .expect("busy loop");
    assert_eq!(out.code, Some(0));
    let b = cocalc_host::ActivitySource::sample(r, s.project)
        .await
        .expect("sample")
        .expect("running");
    assert!(
        b.cpu_time_us > a.cpu_time_us + 50_000,
        "CPU counter must grow: {a:?} -> {b:?}"
    );
    r.stop(s.project, GRACE).await.expect("stop");
    assert_eq!(
        cocalc_host::ActivitySource::sample(r, s.project)
            .await
            .expect("sample"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn culler_stops_the_idle_project_and_spares_the_busy_one() {
    use cocalc_core::{ManualClock, Timestamp};
    use cocalc_host::activity::{ActiveBecause, CullDecision, CullPolicy, IdleCuller};
    use std::sync::Arc;

    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let idle = spec(&fx);
    let busy = spec(&fx);
    r.start(&idle).await.expect("start idle");
    r.start(&busy).await.expect("start busy");
    // A long computation with no browser attached (held open: dropping an
    // exec stream ends the command).
    let mut req = cocalc_core::ExecRequest::new(
        ["sh", "-c", "while :; do :; done"]
            .map(String::from)
            .to_vec(),
    );
    req.timeout = Some(Duration::from_secs(120));
    let _computation = r.exec(busy.project, req).await.expect("busy loop");

    // The fake clock moves 6 minutes per tick while about a second passes
    // for real: a threshold of 0.1 % of a core separates a spinning loop
    // (~1 s of CPU per tick) from a sleeping shell (~0).
    let clock = ManualClock::new(Timestamp::from_secs(1_000_000));
    let policy = CullPolicy {
        idle_timeout: Duration::from_secs(600),
        cpu_threshold: 0.001,
        stop_grace: Duration::from_secs(2),
    };
    let mut culler = IdleCuller::new(policy, Arc::new(clock.clone()));
    let verdict = |v: &[(cocalc_core::ProjectId, Result<CullDecision, RunnerError>)],
                   p: cocalc_core::ProjectId| {
        v.iter()
            .find(|(q, _)| *q == p)
            .map(|(_, d)| d.clone().expect("decision"))
    };
    culler.tick(r, r).await.expect("baseline tick");
    let mut last = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        clock.advance(Duration::from_secs(360));
        last = culler.tick(r, r).await.expect("tick");
        assert_eq!(
            verdict(&last, busy.project),
            Some(CullDecision::Active(ActiveBecause::Cpu)),
            "{last:?}"
        );
    }
    assert_eq!(
        verdict(&last, idle.project),
        Some(CullDecision::Stop),
        "{last:?}"
    );
    assert_eq!(
        r.status(idle.project).await.expect("status").state,
        ProjectState::Stopped
    );
    assert_eq!(
        r.status(busy.project).await.expect("status").state,
        ProjectState::Running
    );
    r.stop(busy.project, GRACE).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_container_is_failed_and_start_recreates_it() {
    if !privileged() {
        return;
    }
    let fx = PodmanFixture::new().await;
    let r = fx.runner();
    let s = spec(&fx);
    let first = r.start(&s).await.expect("start");
    let c = r
        .docker()
        .inspect_container(&container_name(s.project), None)
        .await
        .expect("inspect");
    let pid = c.state.and_then(|st| st.pid).expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the container's main process");
    let mut state = ProjectState::Running;
    for _ in 0..100 {
        state = r.status(s.project).await.expect("status").state;
        if state != ProjectState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, ProjectState::Failed);
    let again = r.start(&s).await.expect("start recreates");
    assert_eq!(again.state, ProjectState::Running);
    assert_ne!(again.started_at, None);
    let out = run(r, s.project, &["echo", "back"]).await.expect("exec");
    assert_eq!(out.stdout_text(), "back\n");
    assert!(again.started_at >= first.started_at);
    r.stop(s.project, GRACE).await.expect("stop");
}
