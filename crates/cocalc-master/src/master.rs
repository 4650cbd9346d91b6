//! [`Master`]: the control plane's operations, independent of HTTP.
//!
//! Every operation takes the authenticated caller and checks access first.
//! Projects the caller cannot see answer "not found", so ids do not leak.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use cocalc_auth::host_auth::BootstrapToken;
use cocalc_auth::{paserk, KeySet, MintRequest, Minter};
use cocalc_core::wire::{
    ActivityReport, KeepaliveRequest, LeaseGrant, OpenProjectResponse, PlacementExplanation,
    ProjectInfo, PushMessage, RegisterHostRequest,
};
use cocalc_core::{
    ApiError, Generation, HostId, HostState, Permission, Placement, PlacementRequest, ProjectId,
    SharedClock, Timestamp, UserId,
};
use cocalc_placement::{HostRecord, MapStore, Registry, RegistryError};

use crate::directory::{hash_secret, new_api_key, Directory, Project, User};
use crate::error::MasterError;
use crate::push::PushHub;

/// Master tunables.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Issuer name in tokens.
    pub issuer: String,
    /// Lifetime of connect tokens (default 10 min).
    pub token_ttl: Duration,
    /// Lifetime of host bootstrap tokens (default 24 h).
    pub bootstrap_ttl: Duration,
    /// How far a host's request time may be from the master's (default 60 s).
    pub request_max_age: Duration,
    /// Hash ([`hash_secret`]) of the admin API key.
    pub admin_key_hash: String,
    /// Where signing keys are saved after a rotation (`None`: not saved).
    pub key_dir: Option<std::path::PathBuf>,
}

impl MasterConfig {
    /// Defaults, with the given admin key.
    pub fn new(admin_key: &str) -> Self {
        MasterConfig {
            issuer: "cocalc-master".into(),
            token_ttl: Duration::from_secs(600),
            bootstrap_ttl: Duration::from_secs(24 * 3600),
            request_max_age: Duration::from_secs(60),
            admin_key_hash: hash_secret(admin_key),
            key_dir: None,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator (admin API key).
    Admin,
    /// A user (their API key).
    User(User),
    /// A proxy (a proxy key, named): may look hosts and signing keys up
    /// and ask for SSH authorizations, nothing else (see
    /// [`crate::proxy_keys`]).
    Proxy(String),
}

impl Caller {
    fn user(&self) -> Result<&User, MasterError> {
        match self {
            Caller::User(u) => Ok(u),
            Caller::Admin => Err(MasterError::BadRequest(
                "this call acts as a user; use a user's API key".into(),
            )),
            Caller::Proxy(_) => Err(Caller::proxy_refused()),
        }
    }

    pub(crate) fn require_admin(&self) -> Result<(), MasterError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::User(_) => Err(MasterError::Forbidden("admin key required".into())),
            Caller::Proxy(_) => Err(Caller::proxy_refused()),
        }
    }

    /// The refusal of every call a proxy key may not make.
    pub(crate) fn proxy_refused() -> MasterError {
        MasterError::Forbidden(
            "a proxy key may only look up hosts and signing keys and authorize SSH logins".into(),
        )
    }
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], MasterError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| MasterError::Internal(format!("random source: {e}")))?;
    Ok(b)
}

/// The minter with its public keys as PASERKs, encoded once per key set
/// (every lease grant carries them).
struct Signing {
    minter: Minter,
    public: Vec<String>,
}

impl Signing {
    fn new(minter: Minter) -> Arc<Self> {
        let public = minter.keys().public_paserks();
        Arc::new(Signing { minter, public })
    }
}

/// The master.
pub struct Master {
    cfg: MasterConfig,
    clock: SharedClock,
    dir: Directory,
    store: Arc<dyn MapStore>,
    registry: Registry,
    placement: Box<dyn Placement>,
    minter: RwLock<Arc<Signing>>,
    push: PushHub,
    host_keys: RwLock<std::collections::HashMap<HostId, (String, ed25519_dalek::VerifyingKey)>>,
    responses: cocalc_core::StatusCounts,
    moves: cocalc_placement::MoveCoordinator,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Master {
    /// A master over the given parts; host records are loaded from `store`.
    pub async fn new(
        cfg: MasterConfig,
        clock: SharedClock,
        dir: Directory,
        store: Arc<dyn MapStore>,
        registry: Registry,
        placement: Box<dyn Placement>,
        keys: KeySet,
    ) -> Result<Self, MasterError> {
        keys.signing_key()
            .map_err(|e| MasterError::Internal(format!("signing keys: {e}")))?;
        registry.load(store.hosts().await?);
        let minter = Minter::new(cfg.issuer.clone(), keys, clock.clone());
        let moves = cocalc_placement::MoveCoordinator::new(store.clone(), clock.clone());
        Ok(Master {
            moves,
            cfg,
            clock,
            dir,
            store,
            registry,
            placement,
            minter: RwLock::new(Signing::new(minter)),
            push: PushHub::new(),
            host_keys: RwLock::new(std::collections::HashMap::new()),
            responses: Default::default(),
        })
    }

    /// The map store.
    pub fn store(&self) -> &Arc<dyn MapStore> {
        &self.store
    }

    /// The host registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The placement strategy.
    pub fn placement(&self) -> &dyn Placement {
        self.placement.as_ref()
    }

    /// The move coordinator.
    pub fn moves(&self) -> &cocalc_placement::MoveCoordinator {
        &self.moves
    }

    /// A token minted with the current signing key.
    pub(crate) fn mint_for(&self, req: &MintRequest) -> Result<String, MasterError> {
        self.minter()
            .minter
            .mint(req)
            .map(|(token, _)| token)
            .map_err(|e| MasterError::Internal(e.to_string()))
    }

    /// The configuration.
    pub fn config(&self) -> &MasterConfig {
        &self.cfg
    }

    /// The API's answers by status code (the HTTP layer counts them; see
    /// [`crate::metrics`]).
    pub fn responses(&self) -> &cocalc_core::StatusCounts {
        &self.responses
    }

    /// The push hub (the HTTP layer attaches host connections to it).
    pub fn push(&self) -> &PushHub {
        &self.push
    }

    /// The directory (users, projects, collaborators, SSH keys).
    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn minter(&self) -> Arc<Signing> {
        self.minter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Public signing keys (PASERK), newest first.
    pub fn signing_keys(&self) -> Vec<String> {
        self.minter().public.clone()
    }

    /// Identifies the holder of an API key.
    pub fn authenticate(&self, api_key: &str) -> Result<Caller, MasterError> {
        let h = hash_secret(api_key);
        if h == self.cfg.admin_key_hash {
            return Ok(Caller::Admin);
        }
        if let Some(u) = self.dir.user_by_key_hash(&h)? {
            return Ok(Caller::User(u));
        }
        self.dir
            .proxy_key_by_hash(&h)?
            .map(|k| Caller::Proxy(k.name))
            .ok_or_else(|| MasterError::Unauthorized("unknown API key".into()))
    }

    /// Creates a user; returns it with its API key (shown only now).
    pub fn create_user(&self, caller: &Caller, name: &str) -> Result<(User, String), MasterError> {
        caller.require_admin()?;
        let key = new_api_key(random()?);
        let user = self
            .dir
            .create_user(UserId::new_v4(random()?), name, &hash_secret(&key))?;
        Ok((user, key))
    }

    async fn info(&self, p: &Project) -> Result<ProjectInfo, MasterError> {
        let placed = self.store.placement(p.id).await?;
        let collaborators = self.dir.collaborators(p.id)?;
        let mut info = ProjectInfo::new(
            p.id,
            p.name.clone(),
            p.owner,
            collaborators,
            placed.as_ref().map(|e| e.host),
            placed.as_ref().map_or(Generation(0), |e| e.generation),
        );
        info.last_activity = placed.and_then(|e| e.last_activity);
        Ok(info)
    }

    /// Creates a project owned by the calling user.
    pub async fn create_project(
        &self,
        caller: &Caller,
        name: &str,
        image: Option<&str>,
    ) -> Result<ProjectInfo, MasterError> {
        let user = caller.user()?;
        let p = self
            .dir
            .create_project(ProjectId::new_v4(random()?), name, user.id, image)?;
        self.info(&p).await
    }

    /// The project with the caller's permission on it; not found if none.
    fn visible(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<(Project, Permission), MasterError> {
        let not_found = || MasterError::NotFound(format!("no project {project} visible to you"));
        let p = self.dir.project(project)?.ok_or_else(not_found)?;
        let perm = match caller {
            Caller::Admin => Permission::Admin,
            Caller::User(u) => self.dir.permission(project, u.id)?.ok_or_else(not_found)?,
            Caller::Proxy(_) => return Err(Caller::proxy_refused()),
        };
        Ok((p, perm))
    }

    /// Resolves a project given by id, or by name among the caller's.
    pub fn resolve_project(
        &self,
        caller: &Caller,
        id_or_name: &str,
    ) -> Result<ProjectId, MasterError> {
        if let Ok(id) = id_or_name.parse::<ProjectId>() {
            return Ok(id);
        }
        let user = caller.user()?;
        let mut matches = self
            .dir
            .projects_of(user.id)?
            .into_iter()
            .filter(|(p, _)| p.name == id_or_name);
        match (matches.next(), matches.next()) {
            (Some((p, _)), None) => Ok(p.id),
            (None, _) => Err(MasterError::NotFound(format!(
                "no project named {id_or_name:?}"
            ))),
            (Some(_), Some(_)) => Err(MasterError::Conflict(format!(
                "several projects named {id_or_name:?}; use the id"
            ))),
        }
    }

    /// A project's description.
    pub async fn project(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<ProjectInfo, MasterError> {
        let (p, _) = self.visible(caller, project)?;
        self.info(&p).await
    }

    /// The calling user's projects.
    pub async fn projects(&self, caller: &Caller) -> Result<Vec<ProjectInfo>, MasterError> {
        let user = caller.user()?;
        let mut out = Vec::new();
        for (p, _) in self.dir.projects_of(user.id)? {
            out.push(self.info(&p).await?);
        }
        Ok(out)
    }

    /// Adds, changes (`Some`) or removes (`None`) a collaborator; needs
    /// admin on the project. The host holding the project hears at once.
    pub async fn set_collaborator(
        &self,
        caller: &Caller,
        project: ProjectId,
        user: &str,
        permission: Option<Permission>,
    ) -> Result<ProjectInfo, MasterError> {
        let (p, perm) = self.visible(caller, project)?;
        if perm != Permission::Admin {
            return Err(MasterError::Forbidden(format!(
                "managing collaborators needs admin on the project; you have {perm}"
            )));
        }
        let target = self
            .dir
            .user(user)?
            .ok_or_else(|| MasterError::NotFound(format!("no user {user:?}")))?;
        self.dir.set_collaborator(&p, target.id, permission)?;
        if let Some(e) = self.store.placement(project).await? {
            self.push.send(
                e.host,
                PushMessage::Acl {
                    project,
                    user: target.id,
                    permission,
                },
            );
        }
        self.info(&p).await
    }

    /// Opens a project: places it if unplaced, and returns its host and a
    /// connect token bound to that host and generation.
    pub async fn open_project(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<OpenProjectResponse, MasterError> {
        let user = caller.user()?.clone();
        let (_, perm) = self.visible(caller, project)?;
        self.refuse_if_moving(project)?;
        let entry = match self.store.placement(project).await? {
            Some(e) => e,
            None => self.place(project).await?,
        };
        let now = self.now();
        let (state, endpoint) = self
            .registry
            .inspect(entry.host, |h| (h.state_at(now), h.info.endpoint.clone()))
            .ok_or_else(|| {
                MasterError::Internal(format!("host {} of project is unknown", entry.host))
            })?;
        if state == HostState::Down {
            return Err(MasterError::Conflict(format!(
                "host {} holding this project is down; wait for it, or an operator can re-place \
                 the project",
                entry.host
            )));
        }
        let (token, claims) = self
            .minter()
            .minter
            .mint(&MintRequest {
                user: user.id,
                project,
                host: entry.host,
                generation: entry.generation,
                permission: perm,
                ttl: self.cfg.token_ttl,
            })
            .map_err(|e| MasterError::Internal(e.to_string()))?;
        Ok(OpenProjectResponse::new(
            project,
            entry.host,
            endpoint,
            entry.generation,
            token,
            claims.expires,
        ))
    }

    /// Chooses a host for `project` among `hosts` and counts the project
    /// in that host's load until its next keepalive
    /// ([`Registry::note_placement`]): placements come faster than
    /// keepalives report load, and would otherwise all go to the host that
    /// looked emptiest at the last beat. Every placement, re-placement and
    /// move target is chosen here.
    pub(crate) fn choose_host(
        &self,
        project: ProjectId,
        hosts: &[cocalc_core::HostInfo],
    ) -> Result<cocalc_core::PlacementDecision, MasterError> {
        let decision = self
            .placement
            .place(&PlacementRequest::new(project), hosts)?;
        self.registry.note_placement(decision.host);
        Ok(decision)
    }

    async fn place(
        &self,
        project: ProjectId,
    ) -> Result<cocalc_core::ProjectPlacement, MasterError> {
        let decision = self.choose_host(project, &self.registry.hosts())?;
        let host = decision.host;
        match self
            .store
            .assign(project, host, Some(Generation(0)), decision, self.now())
            .await
        {
            Ok(e) => Ok(e),
            // Someone placed it concurrently: theirs stands.
            Err(cocalc_placement::StoreError::Conflict { .. }) => self
                .store
                .placement(project)
                .await?
                .ok_or_else(|| MasterError::Internal("placement vanished".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Re-places a project whose host is down or draining (admin): an
    /// explicit operation, never automatic. The project's current host is
    /// excluded, the generation grows by one (so the old host refuses the
    /// project's tokens and commands from then on), and the old host is
    /// told to stop it if it is listening. Data moves are not part of this:
    /// the new host starts from an empty volume unless the data was moved
    /// or restored there. Refused for a project on an up host.
    pub async fn replace_project(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<cocalc_core::ProjectPlacement, MasterError> {
        caller.require_admin()?;
        let current = self
            .store
            .placement(project)
            .await?
            .ok_or_else(|| MasterError::NotFound(format!("project {project} is not placed")))?;
        let now = self.now();
        if let Some(h) = self.registry.get(current.host) {
            if h.state_at(now) == HostState::Up {
                return Err(MasterError::Conflict(format!(
                    "host {} of project {project} is up; drain it first or move the project",
                    current.host
                )));
            }
        }
        let hosts: Vec<_> = self
            .registry
            .hosts()
            .into_iter()
            .filter(|h| h.id != current.host)
            .collect();
        let decision = self.choose_host(project, &hosts)?;
        let to = decision.host;
        let placed = self
            .store
            .assign(project, to, Some(current.generation), decision, now)
            .await?;
        self.push.send(current.host, PushMessage::Stop { project });
        self.push.send(
            current.host,
            PushMessage::Fence {
                project,
                generation: placed.generation,
            },
        );
        Ok(placed)
    }

    /// The project's host and a data-plane client for it, acting as the
    /// caller (the project is placed first if needed). For callers that
    /// want "run this in my project" in one call to the master; make the
    /// call under [`Master::while_host_up`].
    pub async fn host_client(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<(HostId, cocalc_client::HostClient), MasterError> {
        let open = self.open_project(caller, project).await?;
        // A hidden host's endpoint is the proxy holding its tunnel; the
        // proxy serves the same paths, so the client is the same.
        let client = cocalc_client::HostClient::new(
            open.endpoint.base_url().to_string(),
            project,
            open.token,
        );
        Ok((open.host, client))
    }

    /// Awaits `call`, made to `host`, unless the host goes `Down` first
    /// (its lease expired: it stopped renewing it); then `call` is
    /// dropped, closing its connection, and the result is 504
    /// `host_not_responding`. A host whose program hangs still accepts
    /// connections, so a call to it would otherwise wait without end. The
    /// host's state is looked at every second.
    pub async fn while_host_up<T>(
        &self,
        host: HostId,
        call: impl std::future::Future<Output = Result<T, MasterError>>,
    ) -> Result<T, MasterError> {
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return r,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = self.now();
            if self
                .registry
                .get(host)
                .is_some_and(|h| h.state_at(now) == HostState::Down)
            {
                return Err(MasterError::Upstream(ApiError::new(
                    504,
                    "host_not_responding",
                    format!("host {host} stopped renewing its lease while this call waited on it"),
                )));
            }
        }
    }

    /// Why the project is where it is.
    pub async fn explain(
        &self,
        caller: &Caller,
        project: ProjectId,
    ) -> Result<PlacementExplanation, MasterError> {
        self.visible(caller, project)?;
        let d =
            self.store.decision(project).await?.ok_or_else(|| {
                MasterError::NotFound(format!("project {project} is not placed yet"))
            })?;
        Ok(PlacementExplanation::new(
            project,
            d.generation,
            d.decision,
            d.decided_at,
        ))
    }

    /// Revokes every token of `user` issued until now ("sign out
    /// everywhere"); users may do this for themselves, the admin for anyone.
    pub fn sign_out_everywhere(&self, caller: &Caller, user: &str) -> Result<usize, MasterError> {
        let target = self
            .dir
            .user(user)?
            .ok_or_else(|| MasterError::NotFound(format!("no user {user:?}")))?;
        match caller {
            Caller::Admin => {}
            Caller::User(u) if u.id == target.id => {}
            Caller::User(_) => {
                return Err(MasterError::Forbidden(
                    "you can only sign yourself out".into(),
                ))
            }
            Caller::Proxy(_) => return Err(Caller::proxy_refused()),
        }
        // Tokens carry whole seconds: cut off everything issued up to now.
        let cutoff = Timestamp::from_secs(self.now().as_secs() + 1);
        self.dir.set_not_before(target.id, cutoff)?;
        Ok(self.push.broadcast(PushMessage::RevokeUser {
            user: target.id,
            not_before: cutoff,
        }))
    }

    /// Mints a one-time host bootstrap token (admin).
    pub fn bootstrap_token(&self, caller: &Caller) -> Result<(String, Timestamp), MasterError> {
        caller.require_admin()?;
        let t = BootstrapToken::generate().map_err(|e| MasterError::Internal(e.to_string()))?;
        let expires = self.now().saturating_add(self.cfg.bootstrap_ttl);
        self.dir.add_bootstrap(&t.hash(), expires)?;
        Ok((t.as_str().to_string(), expires))
    }

    /// The registered public key of `host`.
    pub fn host_key(&self, host: HostId) -> Result<ed25519_dalek::VerifyingKey, MasterError> {
        // Fast path: the cached key, still the registered one (compared in
        // place, nothing copied).
        if let Some((text, key)) = self
            .host_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
        {
            if self.registry.inspect(host, |r| r.public_key == *text) == Some(true) {
                return Ok(*key);
            }
        }
        let rec = self
            .registry
            .get(host)
            .ok_or_else(|| MasterError::Unauthorized(format!("host {host} is not registered")))?;
        if let Some((text, key)) = self
            .host_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
        {
            if *text == rec.public_key {
                return Ok(*key);
            }
        }
        // Decoding decompresses a curve point: worth caching per host.
        let key = paserk::decode_public(&rec.public_key)
            .map_err(|e| MasterError::Internal(format!("stored key of host {host}: {e}")))?;
        self.host_keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host, (rec.public_key, key));
        Ok(key)
    }

    /// Registers a host. A new host (or a known host with a new key) must
    /// present an unused bootstrap token; a known host re-registering with
    /// its key must have `signed_by_known_key` (checked by the HTTP layer).
    pub async fn register_host(
        &self,
        req: &RegisterHostRequest,
        signed_by_known_key: bool,
    ) -> Result<LeaseGrant, MasterError> {
        cocalc_core::wire::check_version(req.v).map_err(|e| MasterError::BadRequest(e.message))?;
        let decoded = paserk::decode_public(&req.public_key)
            .map_err(|e| MasterError::BadRequest(format!("public_key: {e}")))?;
        let known_key = self.registry.get(req.host).map(|r| r.public_key);
        let known_same_key = known_key.as_ref() == Some(&req.public_key);
        if !(known_same_key && signed_by_known_key) {
            let token = req.bootstrap_token.as_deref().ok_or_else(|| {
                MasterError::Unauthorized(
                    "a new host (or a new host key) needs a bootstrap token".into(),
                )
            })?;
            let t = BootstrapToken::parse(token)
                .map_err(|e| MasterError::Unauthorized(e.to_string()))?;
            self.dir.consume_bootstrap(&t.hash(), self.now())?;
        }
        let (rec, grant) = self.registry.register(req);
        self.store.put_host(&rec).await?;
        // The host's signed calls start now: keep the decoded key for them.
        self.host_keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.host, (req.public_key.clone(), decoded));
        if known_key.is_some() && !known_same_key {
            // The push channel was authenticated with the old key, and its
            // frames are not signed one by one: it goes with the key.
            self.push.disconnect(req.host);
        }
        Ok(self.with_keys(grant))
    }

    fn with_keys(&self, mut grant: LeaseGrant) -> LeaseGrant {
        grant.signing_keys = self.signing_keys();
        grant
    }

    /// Renews a host's lease.
    ///
    /// Only the in-memory registry changes: keepalives are not written
    /// through to the durable store (a write and an fsync per beat were most
    /// of a keepalive's cost). What the store keeps, from registration and
    /// drains, is enough after a restart: [`Registry::load`] gives every
    /// stored host a fresh lease, and its next keepalive brings health,
    /// capacity and load up to date.
    pub async fn keepalive(
        &self,
        host: HostId,
        req: &KeepaliveRequest,
    ) -> Result<LeaseGrant, MasterError> {
        let grant = self.registry.renew(host, req).map_err(registry_err)?;
        Ok(self.with_keys(grant))
    }

    /// Pushes to `host` every sign-out ([`PushMessage::RevokeUser`]) that
    /// can still matter: those within the last token lifetime, since a
    /// token issued before an older cutoff has expired anyway. Called when
    /// a host's push channel opens, so a host that was cut off when a user
    /// signed out refuses the user's old tokens from its reconnection on,
    /// not only once its cached ACL entries age out. Returns how many.
    pub fn replay_sign_outs(&self, host: HostId) -> Result<usize, MasterError> {
        let since = Timestamp(
            self.now()
                .as_millis()
                .saturating_sub(i64::try_from(self.cfg.token_ttl.as_millis()).unwrap_or(i64::MAX)),
        );
        let cutoffs = self.dir.cutoffs_after(since)?;
        for (user, not_before) in &cutoffs {
            self.push.send(
                host,
                PushMessage::RevokeUser {
                    user: *user,
                    not_before: *not_before,
                },
            );
        }
        Ok(cutoffs.len())
    }

    /// Answers a host's [`HostMessage::Holding`](cocalc_core::wire::HostMessage::Holding):
    /// pushes a [`PushMessage::Fence`] for every project it names that is
    /// placed on another host at a newer generation, which the host missed
    /// while it could not be told (cut off during a re-placement or a
    /// move's release). Projects placed on `host`, unknown projects and
    /// generations not older than the map's are left alone. Returns the
    /// fences sent.
    pub async fn reconcile_host(
        &self,
        host: HostId,
        held: &[cocalc_core::wire::HeldProject],
    ) -> Result<Vec<(ProjectId, Generation)>, MasterError> {
        let mut fenced = Vec::new();
        for h in held {
            let Some(placed) = self.store.placement(h.project).await? else {
                continue;
            };
            if placed.host != host && placed.generation > h.generation {
                self.push.send(
                    host,
                    PushMessage::Fence {
                        project: h.project,
                        generation: placed.generation,
                    },
                );
                fenced.push((h.project, placed.generation));
            }
        }
        Ok(fenced)
    }

    /// Records the last use of projects on `host` (only projects it holds).
    pub async fn activity(&self, host: HostId, report: &ActivityReport) -> Result<(), MasterError> {
        for a in &report.projects {
            if let Some(e) = self.store.placement(a.project).await? {
                if e.host == host {
                    self.store.record_activity(a.project, a.last_use).await?;
                }
            }
        }
        Ok(())
    }

    /// What `user` may do on `project`, for `host`'s ACL cache; refused for
    /// projects not placed on that host.
    pub async fn host_acl(
        &self,
        host: HostId,
        project: ProjectId,
        user: UserId,
    ) -> Result<(Option<Permission>, Option<Timestamp>), MasterError> {
        let placed = self.store.placement(project).await?;
        if placed.map(|e| e.host) != Some(host) {
            return Err(MasterError::Forbidden(format!(
                "project {project} is not placed on host {host}"
            )));
        }
        let cutoff = self.dir.user(&user.to_string())?.and_then(|u| u.not_before);
        Ok((self.dir.permission(project, user)?, cutoff))
    }

    /// How to reach one host (any authenticated caller: a token already
    /// names its host; proxies route with this).
    pub fn host_endpoint(
        &self,
        caller: &Caller,
        host: HostId,
    ) -> Result<cocalc_core::HostEndpoint, MasterError> {
        let _ = caller;
        self.registry
            .get(host)
            .map(|r| r.info.endpoint)
            .ok_or_else(|| MasterError::NotFound(format!("no host {host}")))
    }

    /// A host's registered public key (any authenticated caller: public
    /// keys are not secret; proxies check tunnel handshakes with it).
    pub fn host_public_key(
        &self,
        caller: &Caller,
        host: HostId,
    ) -> Result<cocalc_core::wire::HostKeyResponse, MasterError> {
        let _ = caller;
        self.registry
            .get(host)
            .map(|r| cocalc_core::wire::HostKeyResponse::new(host, r.public_key))
            .ok_or_else(|| MasterError::NotFound(format!("no host {host}")))
    }

    /// Every host (admin).
    pub fn hosts(&self, caller: &Caller) -> Result<Vec<cocalc_core::HostInfo>, MasterError> {
        caller.require_admin()?;
        Ok(self.registry.hosts())
    }

    /// Drains or undrains a host (admin).
    pub async fn set_draining(
        &self,
        caller: &Caller,
        host: HostId,
        draining: bool,
    ) -> Result<HostRecord, MasterError> {
        caller.require_admin()?;
        let rec = self
            .registry
            .set_draining(host, draining)
            .map_err(registry_err)?;
        self.store.put_host(&rec).await?;
        Ok(rec)
    }

    /// Adds a new signing key that signs from now on; older keys keep
    /// verifying. Returns the new key id; hosts hear of it at once.
    pub fn rotate_key(&self, caller: &Caller) -> Result<(String, KeySet), MasterError> {
        caller.require_admin()?;
        let mut g = self.minter.write().unwrap_or_else(|p| p.into_inner());
        let mut keys = g.minter.keys().clone();
        let kid = keys
            .rotate(self.now())
            .map_err(|e| MasterError::Internal(e.to_string()))?;
        if let Some(dir) = &self.cfg.key_dir {
            // Saved before use: a restart never loses a key that signed tokens.
            keys.save_dir(dir)
                .map_err(|e| MasterError::Internal(format!("saving rotated keys: {e}")))?;
        }
        *g = Signing::new(Minter::new(
            self.cfg.issuer.clone(),
            keys.clone(),
            self.clock.clone(),
        ));
        drop(g);
        self.push.broadcast(PushMessage::SigningKeys {
            keys: self.signing_keys(),
        });
        Ok((kid, keys))
    }
}

fn registry_err(e: RegistryError) -> MasterError {
    match e {
        RegistryError::UnknownHost(_) => MasterError::NotFound(e.to_string()),
        RegistryError::HostMismatch { .. } => MasterError::Forbidden(e.to_string()),
        other => MasterError::Internal(other.to_string()),
    }
}
