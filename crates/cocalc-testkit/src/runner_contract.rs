//! The contract suite every [`Runner`] must pass.
//!
//! Each check is a public async function taking the runner under test and a
//! [`ContractEnv`] (how to make project homes, which images to use), so an
//! implementation's tests call them one by one under names that read like
//! the specification, or all at once with [`run_all`]. The checks use only
//! `sh`, `echo`, `cat`, `pwd` and `sleep`, which both a busybox image and a
//! development machine have.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocalc_core::{
    ByteStream, ExecEvent, ExecRequest, ExecStream, Generation, ProjectId, ProjectSpec,
    ProjectState, PtySize, Runner, RunnerError,
};

/// What the suite needs besides the runner.
pub struct ContractEnv {
    /// Makes a fresh, empty home directory for a test project.
    pub make_home: Box<dyn Fn() -> PathBuf + Send + Sync>,
    /// An image that is *not* on the runner's allowlist.
    pub forbidden_image: String,
}

impl std::fmt::Debug for ContractEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContractEnv")
            .field("forbidden_image", &self.forbidden_image)
            .finish_non_exhaustive()
    }
}

/// A project id no other test in this process (or a recent one) uses.
pub fn fresh_project() -> ProjectId {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(t ^ u64::from(std::process::id()).rotate_left(40)).to_le_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    ProjectId::new_v4(b)
}

/// Everything a finished command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit code, if the stream ended with `Exit`.
    pub code: Option<i32>,
}

impl ExecOutput {
    /// Standard output as (lossy) text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads an exec stream to its end, checking it is well formed (chunks, then
/// exactly one `Exit`, then nothing).
pub async fn collect(mut s: ExecStream) -> Result<ExecOutput, RunnerError> {
    let mut out = ExecOutput::default();
    while let Some(ev) = next(&mut s).await {
        assert!(out.code.is_none(), "event after Exit: {ev:?}");
        match ev? {
            ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
            ExecEvent::Exit(c) => out.code = Some(c),
        }
    }
    Ok(out)
}

async fn next<T>(s: &mut cocalc_core::BoxStream<T>) -> Option<T> {
    std::future::poll_fn(|cx| s.as_mut().poll_next(cx)).await
}

/// Runs `argv` in `project` and collects the result.
pub async fn run(
    runner: &dyn Runner,
    project: ProjectId,
    argv: &[&str],
) -> Result<ExecOutput, RunnerError> {
    let req = ExecRequest::new(argv.iter().map(|s| s.to_string()).collect());
    collect(runner.exec(project, req).await?).await
}

fn spec(env: &ContractEnv) -> ProjectSpec {
    let mut s = ProjectSpec::new(fresh_project(), Generation(1), (env.make_home)());
    s.hostname = "contract".into();
    s
}

const GRACE: Duration = Duration::from_secs(5);

/// `status` of a project the runner never saw is `Stopped`, not an error.
pub async fn status_of_unknown_project_is_stopped(r: &dyn Runner, _env: &ContractEnv) {
    let st = r.status(fresh_project()).await.expect("status");
    assert_eq!(st.state, ProjectState::Stopped);
    assert_eq!(st.started_at, None);
}

/// start → exec (stdout, stderr, exit code) → stop → status `Stopped`.
pub async fn start_exec_stop_round_trip(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    let st = r.start(&spec).await.expect("start");
    assert_eq!(st.state, ProjectState::Running);
    assert!(
        st.started_at.is_some(),
        "a running project has a start time"
    );
    let out = run(
        r,
        spec.project,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    )
    .await
    .expect("exec");
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.code, Some(3));
    r.stop(spec.project, GRACE).await.expect("stop");
    assert_eq!(
        r.status(spec.project).await.expect("status").state,
        ProjectState::Stopped
    );
}

/// Starting a running project returns its status and changes nothing.
pub async fn start_is_idempotent(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    let a = r.start(&spec).await.expect("first start");
    let marker = run(
        r,
        spec.project,
        &["sh", "-c", "echo alive > /tmp/.marker-$$; echo $$"],
    )
    .await
    .expect("exec");
    let b = r.start(&spec).await.expect("second start");
    assert_eq!(a.started_at, b.started_at, "second start must not restart");
    assert_eq!(b.state, ProjectState::Running);
    let pid = marker.stdout_text().trim().to_string();
    let out = run(r, spec.project, &["cat", &format!("/tmp/.marker-{pid}")])
        .await
        .expect("exec");
    assert_eq!(
        out.stdout_text(),
        "alive\n",
        "state must survive the second start (marker {marker:?}, cat {out:?})"
    );
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// Stopping a stopped or unknown project is `Ok`.
pub async fn stop_is_idempotent(r: &dyn Runner, env: &ContractEnv) {
    r.stop(fresh_project(), GRACE).await.expect("stop unknown");
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    r.stop(spec.project, GRACE).await.expect("stop");
    r.stop(spec.project, GRACE).await.expect("stop again");
}

/// `exec` in a project that is not running is `NotRunning`.
pub async fn exec_needs_a_running_project(r: &dyn Runner, _env: &ContractEnv) {
    let p = fresh_project();
    let e = run(r, p, &["true"]).await.expect_err("exec must fail");
    assert_eq!(e, RunnerError::NotRunning(p));
}

/// Commands run in the project's home, and see files put there from outside.
pub async fn exec_runs_in_the_home(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    std::fs::write(spec.home.join("hello.txt"), "from the host\n").expect("write marker");
    r.start(&spec).await.expect("start");
    let out = run(r, spec.project, &["cat", "hello.txt"])
        .await
        .expect("exec");
    assert_eq!(out.stdout_text(), "from the host\n");
    assert_eq!(out.code, Some(0));
    let out = run(r, spec.project, &["sh", "-c", "echo made > made.txt"])
        .await
        .expect("exec");
    assert_eq!(
        out.code,
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(spec.home.join("made.txt")).expect("read back"),
        "made\n"
    );
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// Output arrives while the command still runs, not only at its end.
pub async fn exec_streams_output_as_produced(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let req = ExecRequest::new(
        ["sh", "-c", "echo first; sleep 3; echo second"]
            .map(String::from)
            .to_vec(),
    );
    let t0 = std::time::Instant::now();
    let mut s = r.exec(spec.project, req).await.expect("exec");
    let first = next(&mut s).await.expect("an event").expect("ok");
    assert_eq!(first, ExecEvent::Stdout("first\n".into()));
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "first line took {:?}: output is not streamed",
        t0.elapsed()
    );
    let rest = collect(s).await.expect("rest");
    assert_eq!(rest.stdout_text(), "second\n");
    assert_eq!(rest.code, Some(0));
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// `stdin` bytes reach the command, then it sees end of input.
pub async fn exec_passes_stdin(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let mut req = ExecRequest::new(vec!["cat".into()]);
    req.stdin = Some(b"piped in\n".to_vec());
    req.timeout = Some(Duration::from_secs(20));
    let out = collect(r.exec(spec.project, req).await.expect("exec"))
        .await
        .expect("stream");
    assert_eq!(out.stdout_text(), "piped in\n");
    assert_eq!(out.code, Some(0));
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// A command that outlives its timeout ends the stream with `Timeout`.
pub async fn exec_timeout_is_reported(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let mut req = ExecRequest::new(vec!["sleep".into(), "30".into()]);
    req.timeout = Some(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let e = collect(r.exec(spec.project, req).await.expect("exec"))
        .await
        .expect_err("must time out");
    assert_eq!(e, RunnerError::Timeout(Duration::from_millis(300)));
    assert!(t0.elapsed() < Duration::from_secs(10));
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// A receiver as a stream of input chunks.
struct Chunks(tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>);

impl futures_core::Stream for Chunks {
    type Item = std::io::Result<bytes::Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// With [`Runner::exec_streaming`], input reaches the command while it
/// runs (an answer comes back before the next input is sent), and the end
/// of the input stream is the end of its stdin.
pub async fn exec_streaming_input_arrives_while_it_runs(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let input: cocalc_core::ByteStream = Box::pin(Chunks(rx));
    let mut req = ExecRequest::new(
        ["sh", "-c", "read a; echo got-$a; cat; echo end"]
            .map(String::from)
            .to_vec(),
    );
    req.timeout = Some(Duration::from_secs(20));
    let mut s = r
        .exec_streaming(spec.project, req, input)
        .await
        .expect("exec_streaming");
    tx.send(Ok("one\n".into())).await.expect("send");
    let first = tokio::time::timeout(Duration::from_secs(10), next(&mut s))
        .await
        .expect("no answer to the first line while the command runs")
        .expect("an event")
        .expect("ok");
    assert_eq!(first, ExecEvent::Stdout("got-one\n".into()));
    tx.send(Ok("two\n".into())).await.expect("send");
    drop(tx);
    let rest = collect(s).await.expect("rest");
    assert_eq!(rest.stdout_text(), "two\nend\n");
    assert_eq!(rest.code, Some(0));
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// Dropping an exec's stream (the reader went away: a closed socket, an
/// SSH client that disconnected) ends the command instead of leaving it
/// running unread.
pub async fn dropping_the_exec_stream_ends_the_command(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let req = ExecRequest::new(
        ["sh", "-c", "echo up; sleep 2; echo survived > survived.txt"]
            .map(String::from)
            .to_vec(),
    );
    let mut s = r.exec(spec.project, req).await.expect("exec");
    let first = next(&mut s).await.expect("an event").expect("ok");
    assert_eq!(first, ExecEvent::Stdout("up\n".into()));
    drop(s);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let check = ExecRequest::new(
        ["sh", "-c", "test -e survived.txt && echo yes || echo no"]
            .map(String::from)
            .to_vec(),
    );
    let out = collect(r.exec(spec.project, check).await.expect("exec"))
        .await
        .expect("stream");
    assert_eq!(
        out.stdout_text(),
        "no\n",
        "the command kept running after its stream was dropped"
    );
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// An image outside the allowlist is refused, naming it and the list.
pub async fn image_outside_allowlist_is_refused(r: &dyn Runner, env: &ContractEnv) {
    let mut spec = spec(env);
    spec.image = Some(env.forbidden_image.clone());
    match r.start(&spec).await {
        Err(e @ RunnerError::ImageNotAllowed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&env.forbidden_image), "{msg}");
            assert!(msg.contains("allowed:"), "{msg}");
        }
        other => panic!("expected ImageNotAllowed, got {other:?}"),
    }
    assert_eq!(
        r.status(spec.project).await.expect("status").state,
        ProjectState::Stopped
    );
}

/// A start for an older generation than one seen is refused.
pub async fn stale_generation_is_refused(r: &dyn Runner, env: &ContractEnv) {
    let mut spec = spec(env);
    spec.generation = Generation(5);
    r.start(&spec).await.expect("start");
    let mut old = spec.clone();
    old.generation = Generation(4);
    match r.start(&old).await {
        Err(RunnerError::StaleGeneration { got, seen, .. }) => {
            assert_eq!((got, seen), (Generation(4), Generation(5)));
        }
        other => panic!("expected StaleGeneration, got {other:?}"),
    }
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// `list` shows running projects and not stopped ones.
pub async fn list_shows_running_projects(r: &dyn Runner, env: &ContractEnv) {
    let a = spec(env);
    let b = spec(env);
    r.start(&a).await.expect("start a");
    r.start(&b).await.expect("start b");
    r.stop(b.project, GRACE).await.expect("stop b");
    let list = r.list().await.expect("list");
    let running: Vec<ProjectId> = list
        .iter()
        .filter(|s| s.state == ProjectState::Running)
        .map(|s| s.project)
        .collect();
    assert!(running.contains(&a.project), "{list:?}");
    assert!(!running.contains(&b.project), "{list:?}");
    r.stop(a.project, GRACE).await.expect("stop a");
}

/// Reads a terminal's output into `seen` until it contains `needle`
/// (panics after 10 s, showing what was seen).
pub async fn read_until(out: &mut ByteStream, seen: &mut String, needle: &str) {
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            let chunk = next(out).await.expect("output open").expect("chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(res.is_ok(), "no {needle:?} in {seen:?}");
}

/// A terminal runs commands, starts at the requested size, follows a
/// resize, and ends (output closes) when closed.
pub async fn pty_echoes_resizes_and_closes(r: &dyn Runner, env: &ContractEnv) {
    let spec = spec(env);
    r.start(&spec).await.expect("start");
    let mut pty = r
        .pty(
            spec.project,
            PtySize {
                rows: 30,
                cols: 100,
            },
        )
        .await
        .expect("pty");
    let mut seen = String::new();
    // The quotes make the typed line differ from what the shell prints.
    pty.control
        .write(bytes::Bytes::from_static(b"echo hel''lo-pty; stty size\n"))
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
        .write(bytes::Bytes::from_static(b"stty size\n"))
        .await
        .expect("write");
    read_until(&mut pty.output, &mut seen, "40 120").await;
    pty.control.close().await.expect("close");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = next(&mut pty.output).await {}
    })
    .await;
    assert!(ended.is_ok(), "terminal output must end after close");
    r.stop(spec.project, GRACE).await.expect("stop");
}

/// Every check above, in order.
pub async fn run_all(r: &dyn Runner, env: &ContractEnv) {
    status_of_unknown_project_is_stopped(r, env).await;
    start_exec_stop_round_trip(r, env).await;
    start_is_idempotent(r, env).await;
    stop_is_idempotent(r, env).await;
    exec_needs_a_running_project(r, env).await;
    exec_runs_in_the_home(r, env).await;
    exec_streams_output_as_produced(r, env).await;
    exec_passes_stdin(r, env).await;
    exec_timeout_is_reported(r, env).await;
    dropping_the_exec_stream_ends_the_command(r, env).await;
    exec_streaming_input_arrives_while_it_runs(r, env).await;
    image_outside_allowlist_is_refused(r, env).await;
    stale_generation_is_refused(r, env).await;
    list_shows_running_projects(r, env).await;
    pty_echoes_resizes_and_closes(r, env).await;
}
