//! A host with a custom runner: wrap the process runner to log every start
//! and stop, compose a `HostAgent` with it, and run a command through the
//! agent's checks (token, ACL, generation fence, start on demand).
//!
//! `cargo run -p cocalc-examples --example custom_runner`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cocalc_auth::{AclCache, AclPolicy, Gate, MemoryAuditSink};
use cocalc_core::{
    ExecRequest, ExecStream, Generation, HostId, Permission, ProjectId, ProjectSpec, RunStatus,
    Runner, RunnerError, StaticTokenVerifier, SystemClock, TokenClaims, UserId,
};
use cocalc_host::{AgentConfig, HostAgent, ImagePolicy, ProcessRunner};
use cocalc_storage::DirStorage;

/// Logs lifecycle calls, delegates everything to another runner.
struct LoggingRunner<R>(R);

#[async_trait]
impl<R: Runner> Runner for LoggingRunner<R> {
    async fn start(&self, spec: &ProjectSpec) -> Result<RunStatus, RunnerError> {
        println!(
            "runner: start {} (generation {})",
            spec.project, spec.generation
        );
        self.0.start(spec).await
    }

    async fn stop(&self, project: ProjectId, grace: Duration) -> Result<(), RunnerError> {
        println!("runner: stop {project}");
        self.0.stop(project, grace).await
    }

    async fn status(&self, project: ProjectId) -> Result<RunStatus, RunnerError> {
        self.0.status(project).await
    }

    async fn exec(&self, project: ProjectId, req: ExecRequest) -> Result<ExecStream, RunnerError> {
        println!("runner: exec {:?} in {project}", req.argv);
        self.0.exec(project, req).await
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clock = Arc::new(SystemClock);
    let now = cocalc_core::Clock::now(&SystemClock);
    let (host, user, project) = (
        HostId::new_v4([1; 16]),
        UserId::new_v4([2; 16]),
        ProjectId::new_v4([3; 16]),
    );

    // Tokens checked against a fixed table here; a real host uses
    // cocalc_auth::Verifier with the master's keys.
    let mut verifier = StaticTokenVerifier::new(host, clock.clone());
    verifier.insert(
        "demo-token",
        TokenClaims::new(
            "example".into(),
            user,
            project,
            host,
            Generation(1),
            Permission::Write,
            now,
            now,
            now.saturating_add(Duration::from_secs(600)),
            "jti-1".into(),
            "static".into(),
        ),
    );
    let acl = Arc::new(AclCache::new(clock.clone(), AclPolicy::default()));
    acl.master_up();
    acl.set(project, user, Some(Permission::Write));
    let gate = Gate::new(
        host,
        Arc::new(verifier),
        acl,
        Arc::new(MemoryAuditSink::new()),
        clock.clone(),
    );

    let root = std::env::temp_dir().join(format!("cocalc-example-{}", std::process::id()));
    let storage = Arc::new(DirStorage::new(&root, clock.clone())?);
    let runner = Arc::new(LoggingRunner(ProcessRunner::new(
        ImagePolicy::single("host"),
        clock,
    )));
    let agent = HostAgent::new(AgentConfig::new(host), runner, storage, gate);

    let grant = agent
        .authorize("demo-token", project, Permission::Write, "exec")
        .await?;
    let out = agent
        .exec(
            &grant,
            ExecRequest::new(vec![
                "sh".into(),
                "-c".into(),
                "echo hello from $PWD".into(),
            ]),
        )
        .await?;
    print!(
        "exit {}: {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stdout)
    );
    agent.stop(project).await?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
