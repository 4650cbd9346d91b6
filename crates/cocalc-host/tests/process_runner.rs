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
    image_outside_allowlist_is_refused,
    stale_generation_is_refused,
    list_shows_running_projects,
);
