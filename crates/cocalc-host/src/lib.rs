//! # cocalc-host
//!
//! The project-host agent as a library. This crate will hold:
//!
//! * [`Runner`](cocalc_core::Runner) implementations: `PodmanRunner` (one
//!   podman container per project, through podman's Docker-compatible API)
//!   and `ProcessRunner` (plain processes, for development);
//! * the **data plane**: exec, terminals, files confined to the project's
//!   home, and HTTP/WebSocket to servers inside the project, every request
//!   checked against a connect token and the ACL cache;
//! * the **master client**: registration, keepalive, push channel, activity
//!   reports, and a local SQLite cache so a restarted host serves at once;
//! * the **idle culler**, which counts CPU use and connections, not only
//!   browser presence.
//!
//! Status: the traits it implements are defined in `cocalc-core` and the
//! token/ACL checks in `cocalc-auth`; the agent arrives with the runner and
//! federation issues.
//!
//! ```
//! fn _takes_runner(_: &dyn cocalc_host::Runner) {}
//! ```

pub use cocalc_core::runner::*;
