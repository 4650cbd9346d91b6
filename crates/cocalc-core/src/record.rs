//! Records the control plane keeps about hosts and projects.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId};
use crate::time::Timestamp;

/// A placement generation: grows by at least one on every assignment or move
/// of a project. Hosts refuse to act on a generation older than the newest
/// they have seen for that project (DESIGN.md, promise 1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Generation(pub u64);

impl Generation {
    /// The generation that follows this one.
    pub const fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a user may do in a project. Ordered: `Read < Write < Admin`, and a
/// higher permission includes every lower one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Permission {
    /// Read files, see status.
    Read,
    /// Also write files, run commands, open terminals, start the project.
    Write,
    /// Also manage collaborators and project settings.
    Admin,
}

impl Permission {
    /// The lowercase name used on the wire and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    /// True when this permission includes `needed`.
    pub fn allows(self, needed: Permission) -> bool {
        self >= needed
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "admin" => Ok(Permission::Admin),
            other => Err(format!(
                "unknown permission {other:?}: expected read, write or admin"
            )),
        }
    }
}

/// How the master and the proxy reach a host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HostEndpoint {
    /// The host accepts connections at this base URL (`http://10.0.0.5:8443`).
    Url(String),
    /// The host is hidden and reachable only through a reverse tunnel that it
    /// dialled out. The handle is the base URL of the proxy where the tunnel
    /// lands (`http://proxy.example:8000`): users and the master reach the
    /// host's data plane there, under the same paths.
    Tunnel(String),
}

impl HostEndpoint {
    /// The base URL at which a client reaches this host's data plane: the
    /// host itself, or the proxy holding its tunnel. Paths below it are the
    /// same either way (`/<project>/exec`, …).
    pub fn base_url(&self) -> &str {
        match self {
            HostEndpoint::Url(u) | HostEndpoint::Tunnel(u) => u.trim_end_matches('/'),
        }
    }

    /// True for a hidden host reached through a tunnel.
    pub fn is_tunnel(&self) -> bool {
        matches!(self, HostEndpoint::Tunnel(_))
    }
}

/// Health a host reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Health {
    /// Everything works.
    Ok,
    /// Works, with a problem worth a look (low disk, slow storage).
    Degraded,
    /// Cannot run projects right now.
    Failing,
}

/// What a host has in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    /// CPU cores (in thousandths: 2000 = two cores).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Free disk in the project pool, bytes.
    pub disk_free_bytes: u64,
    /// Total disk in the project pool, bytes.
    pub disk_total_bytes: u64,
    /// How many projects may run at once.
    pub project_slots: u32,
}

/// What a host is using right now.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Load {
    /// Running projects.
    pub running_projects: u32,
    /// CPU use as a fraction of capacity (0.0 – 1.0, may exceed 1.0 briefly).
    pub cpu: f64,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
}

/// The master's view of a host's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HostState {
    /// Lease valid; eligible for new placements.
    Up,
    /// Lease valid, but an operator asked that no new projects be placed here.
    Draining,
    /// Lease expired. The host stays registered; its projects stay mapped to
    /// it until an operator re-places them.
    Down,
}

/// A free-form region name (`us-west`, `eu-1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Region(pub String);

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything the control plane knows about one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostInfo {
    /// The host's id.
    pub id: HostId,
    /// Where it runs.
    pub region: Region,
    /// How to reach it.
    pub endpoint: HostEndpoint,
    /// Lifecycle state as the master sees it.
    pub state: HostState,
    /// Self-reported health.
    pub health: Health,
    /// Totals.
    pub capacity: Capacity,
    /// Current use.
    pub load: Load,
    /// When the host's lease runs out unless renewed.
    pub lease_expires: Timestamp,
}

impl HostInfo {
    /// A host record with the given identity and everything else neutral
    /// (`Up`, `Ok`, zero capacity and load, lease at the epoch).
    pub fn new(id: HostId, region: Region, endpoint: HostEndpoint) -> Self {
        HostInfo {
            id,
            region,
            endpoint,
            state: HostState::Up,
            health: Health::Ok,
            capacity: Capacity::default(),
            load: Load::default(),
            lease_expires: Timestamp::EPOCH,
        }
    }
}

/// Lifecycle state of a project as a runner or the map sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ProjectState {
    /// Not placed on any host yet.
    Unplaced,
    /// Placed, container not running.
    Stopped,
    /// Container being created or started.
    Starting,
    /// Container running.
    Running,
    /// Container being stopped.
    Stopping,
    /// Being moved between hosts.
    Moving,
    /// Something failed; see the accompanying message.
    Failed,
}

/// The map's entry for one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProjectPlacement {
    /// The project.
    pub project: ProjectId,
    /// The host it is assigned to.
    pub host: HostId,
    /// The assignment's generation.
    pub generation: Generation,
    /// Last known state.
    pub state: ProjectState,
    /// Last activity the host reported.
    pub last_activity: Option<Timestamp>,
}

impl ProjectPlacement {
    /// A map entry.
    pub fn new(
        project: ProjectId,
        host: HostId,
        generation: Generation,
        state: ProjectState,
        last_activity: Option<Timestamp>,
    ) -> Self {
        ProjectPlacement {
            project,
            host,
            generation,
            state,
            last_activity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_ordered() {
        assert!(Permission::Admin.allows(Permission::Write));
        assert!(Permission::Write.allows(Permission::Read));
        assert!(!Permission::Read.allows(Permission::Write));
        assert_eq!("write".parse::<Permission>(), Ok(Permission::Write));
        assert!("Write".parse::<Permission>().is_err());
    }

    #[test]
    fn endpoint_serialises_tagged() {
        let e = HostEndpoint::Url("http://127.0.0.1:1".into());
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(j, r#"{"kind":"url","value":"http://127.0.0.1:1"}"#);
        assert_eq!(serde_json::from_str::<HostEndpoint>(&j).unwrap(), e);
    }
}
