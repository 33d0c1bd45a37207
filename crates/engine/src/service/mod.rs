//! The hypervisor side of the patent ([029]-[034]), as a daemon's service layer: the
//! registry of disks and containers, the dangling flag and its grace period (claim 6), the
//! policy that seals a dangling disk in a background job and unseals it when a container
//! reclaims it ([030]), the I/O gate of each disk, restart recovery and metrics.
//!
//! Rooms: [`lifecycle`] decides where a disk goes (a pure transition table) and
//! [`Service::apply`] is the one place that writes it down, sets the gate and starts the
//! job; `runner` runs jobs, `disks` creates and removes disks, `policy` is the tick,
//! `startup` checks settings and recovers, and `docker`, `nbd` and `volumes` are the
//! front-ends' sides. The HTTP front-end (`pdguard serve`) calls these methods; nothing
//! here knows HTTP.

mod adopt;
mod disks;
pub mod docker;
mod error;
pub mod lifecycle;
mod metrics;
mod migration;
mod nbd;
mod policy;
pub mod queue;
mod runner;
mod startup;
mod volume_fuse;
mod volumes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pdguard_core::keys::MasterKey;
use pdguard_core::Profile;
use serde::Serialize;
use tokio::sync::Mutex;

pub use error::ServiceError;
pub use lifecycle::{Event, JobKind, Life, LifeError, MAX_GRACE_MS};
pub use metrics::Metrics;
pub use migration::{ClaimedIo, ReclaimMode, CLAIM_HOLD};
pub use nbd::{NbdExport, NBD_CONTAINER_PREFIX};
pub use runner::RunError;
pub use startup::{check_docker_mount_timeout, check_state_dir, lock_path, DAEMON_LOCK_FILE};
pub use volumes::{
    VolumeError, VolumeOptions, VolumeView, DOCKERD_MOUNT_TIMEOUT, DOCKER_MOUNT_TIMEOUT,
    MAX_VOLUME_NAME,
};

use crate::gate::{Gate, GateState, SealedIo};
use crate::jobs::Progress;
use crate::registry::{Container, ContainerState, Disk, DiskState, Origin, Registry, VolumeMounts};
use crate::store::file::default_record_path;

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// How long every associated container must stay non-operational before the dangling
    /// flag turns TRUE.
    pub grace: Duration,
    pub profile: Profile,
    pub master_key: Option<MasterKey>,
    pub sealed_io: SealedIo,
    /// Seal and unseal jobs that may run at once.
    pub jobs: usize,
    pub sector_size: u32,
    /// How bytes are moved (a strategy name), for new seals.
    pub strategy: String,
    /// A container stopped on purpose counts as non-operational (DESIGN.md §4).
    pub seal_stopped: bool,
    /// Also told of every job's progress (the binary's test-only pause hook).
    pub observer: Option<Observer>,
    /// How long a Docker `Mount` waits for its volume's reclaim before it answers an error
    /// saying how far the unseal is (which goes on): below dockerd's own 120 s, after which
    /// dockerd gives up on the Mount without a word ([`DOCKER_MOUNT_TIMEOUT`] by default).
    pub docker_mount_timeout: Duration,
    /// How a front-end that serves the disk itself (NBD) reclaims a sealed disk
    /// (`serve --reclaim`): instantly through its migration, or by a copy unseal first.
    pub reclaim: ReclaimMode,
}

/// A [`Progress`] that sees every job of the daemon.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn Progress>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// What a job is doing now, for `status` and `disk show`.
#[derive(Debug, Clone, Serialize)]
pub struct JobProgress {
    pub job: &'static str,
    pub pass: &'static str,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A disk as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskView {
    #[serde(flatten)]
    pub disk: Disk,
    /// Containers associated with the disk.
    pub containers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// A Docker volume whose file system the kernel would not let go yet: pdguard retries
    /// the unmount, and the volume is sealed only once it is free.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unmount_pending: bool,
}

/// A container as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerView {
    #[serde(flatten)]
    pub container: Container,
}

#[derive(Default)]
struct State {
    disks: BTreeMap<String, Disk>,
    containers: BTreeMap<String, Container>,
    /// Docker volumes' live mounts (dockerd's Mount IDs), by volume name.
    mounts: BTreeMap<String, VolumeMounts>,
    /// Disks whose unseal was asked by hand (`disk unseal`), not by a reclaim: not kept in
    /// the registry, so an unseal resumed after a restart counts as a reclaim (safe side).
    by_hand: BTreeSet<String>,
    seal_stopped: bool,
}

impl State {
    fn disk_mut(&mut self, name: &str) -> Result<&mut Disk> {
        self.disks
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound {
                kind: "disk",
                name: name.into(),
            })
    }

    /// The life of a disk, with what the registry does not keep.
    fn life(&self, name: &str) -> Result<Life> {
        let d = self.disks.get(name).ok_or_else(|| ServiceError::NotFound {
            kind: "disk",
            name: name.into(),
        })?;
        Ok(match Life::of(d) {
            Life::Unsealing { .. } => Life::Unsealing {
                reclaim: !self.by_hand.contains(name),
            },
            l => l,
        })
    }

    /// Containers associated with `disk`.
    fn users(&self, disk: &str) -> Vec<String> {
        self.containers
            .values()
            .filter(|c| c.disks.iter().any(|d| d == disk))
            .map(|c| c.id.clone())
            .collect()
    }

    /// Containers associated with each disk, in one pass (ordered as [`Self::users`]).
    fn users_by_disk(&self) -> HashMap<&str, Vec<String>> {
        let mut by: HashMap<&str, Vec<String>> = HashMap::new();
        for c in self.containers.values() {
            let mut seen = BTreeSet::new();
            for d in &c.disks {
                if seen.insert(d.as_str()) {
                    by.entry(d.as_str()).or_default().push(c.id.clone());
                }
            }
        }
        by
    }

    /// True while some operational container is associated with `disk`, or dockerd holds
    /// a mount of it.
    fn in_use(&self, disk: &str) -> bool {
        self.mounts.get(disk).is_some_and(|m| !m.ids.is_empty())
            || self.containers.values().any(|c| {
                c.state.operational(self.seal_stopped) && c.disks.iter().any(|d| d == disk)
            })
    }
}

struct Shared {
    /// Held for the daemon's life: one daemon per state directory.
    _daemon_lock: crate::store::ImageLock,
    cfg: Config,
    registry: Registry,
    state: Mutex<State>,
    gates: StdMutex<HashMap<String, Arc<Gate>>>,
    /// Where each disk's requests go after its gate (its file, or its migration).
    routes: StdMutex<HashMap<String, Arc<migration::Route>>>,
    queue: queue::JobQueue,
    running: StdMutex<HashMap<String, runner::JobWatch>>,
    progress: StdMutex<HashMap<String, JobProgress>>,
    metrics: Metrics,
    volumes: volumes::Volumes,
}

/// The daemon's service: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Service {
    s: Arc<Shared>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn valid_name(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= max
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Service {
    /// Open the registry in the state directory and recover: resume interrupted jobs and
    /// set every gate from its disk's state. The state directory is canonicalized once
    /// here (symlinks and `..` resolved), so that every path pdguard derives from it is
    /// the kernel's own.
    pub async fn start(mut cfg: Config) -> Result<Self> {
        cfg.check().map_err(ServiceError::Invalid)?;
        cfg.state_dir = startup::prepare_state_dir(&cfg.state_dir)?;
        let daemon_lock = startup::lock_state_dir(&cfg.state_dir)?;
        let registry = Registry::open(&cfg.state_dir.join("registry.redb"))?;
        let mut state = State {
            seal_stopped: cfg.seal_stopped,
            ..State::default()
        };
        for (name, m) in registry.mounts()? {
            state.mounts.insert(name, m);
        }
        for mut d in registry.disks()? {
            adopt::record_missing_identity(&mut d, &registry);
            state.disks.insert(d.name.clone(), d);
        }
        for c in registry.containers()? {
            state.containers.insert(c.id.clone(), c);
        }
        let jobs = cfg.jobs.max(1);
        let svc = Self {
            s: Arc::new(Shared {
                _daemon_lock: daemon_lock,
                cfg,
                registry,
                state: Mutex::new(state),
                gates: StdMutex::new(HashMap::new()),
                routes: StdMutex::new(HashMap::new()),
                queue: queue::JobQueue::new(jobs),
                running: StdMutex::new(HashMap::new()),
                progress: StdMutex::new(HashMap::new()),
                metrics: Metrics::default(),
                volumes: volumes::Volumes::default(),
            }),
        };
        svc.clean_dead_instant_mounts().await;
        svc.recover().await;
        svc.nbd_forget_stale().await;
        Ok(svc)
    }

    pub fn config(&self) -> &Config {
        &self.s.cfg
    }

    fn gate_state_for(&self, name: &str, state: DiskState) -> GateState {
        match state {
            DiskState::Sealed => GateState::Sealed(self.s.cfg.sealed_io),
            DiskState::Sealing | DiskState::Unsealing | DiskState::Failed => GateState::Blocked,
            // Open once the migration serves (its start opens it).
            DiskState::Migrating if self.route(name).serving() => GateState::Open,
            DiskState::Migrating => GateState::Blocked,
            _ => GateState::Open,
        }
    }

    /// The I/O gate of a disk; every front-end passes through it.
    pub fn gate(&self, disk: &str) -> Arc<Gate> {
        let mut g = lock(&self.s.gates);
        Arc::clone(g.entry(disk.to_string()).or_default())
    }

    fn persist(&self, d: &Disk) -> Result<()> {
        Ok(self.s.registry.put_disk(d)?)
    }

    /// The one place a disk changes its life: [`lifecycle::next`] decides, then the new
    /// life is persisted (before memory changes: a failed write changes nothing), the gate
    /// is set from it, and a disk that is now `sealing` or `unsealing` gets its job (unless
    /// one runs already). Returns the new life.
    fn apply(&self, st: &mut State, name: &str, event: Event) -> Result<Life> {
        let before = st.life(name)?;
        let after = lifecycle::next(&before, &event).map_err(|why| ServiceError::Life {
            disk: name.into(),
            why,
        })?;
        let d = st.disk_mut(name)?;
        if after != before {
            let mut changed = d.clone();
            after.store(&mut changed);
            self.persist(&changed)?;
            *d = changed;
            tracing::debug!(disk = %name, from = before.state().name(), to = after.state().name(), "life cycle");
            if after.state() == DiskState::Failed && before.state() != DiskState::Failed {
                self.s.metrics.disk_failed();
            }
            if before.state() == DiskState::Failed && after.state() != DiskState::Failed {
                self.route_recovered(name);
            }
        }
        let d = d.clone();
        if matches!(after, Life::Unsealing { reclaim: false }) {
            st.by_hand.insert(name.into());
        } else if after.job().is_none() {
            st.by_hand.remove(name);
        }
        self.gate(name)
            .set(self.gate_state_for(name, after.state()));
        if let Some(kind) = after.job() {
            self.ensure_job(&d, kind);
        }
        Ok(after)
    }

    /// The grace period of a disk: its volume's own, else the daemon's (both bounded).
    pub(super) fn grace_of(&self, d: &Disk) -> u64 {
        let daemon = u64::try_from(self.s.cfg.grace.as_millis()).unwrap_or(u64::MAX);
        d.volume
            .as_ref()
            .and_then(|v| v.grace_ms)
            .unwrap_or(daemon)
            .min(MAX_GRACE_MS)
    }

    /// The last operational container of `name` went away: its grace period starts.
    fn release(&self, st: &mut State, name: &str) -> Result<()> {
        if st.in_use(name) {
            return Ok(());
        }
        let Some(d) = st.disks.get(name) else {
            return Ok(());
        };
        let grace_ms = self.grace_of(d);
        let life = self.apply(
            st,
            name,
            Event::Released {
                now_ms: now_ms(),
                grace_ms,
            },
        )?;
        if let Life::Grace { .. } = life {
            tracing::info!(disk = %name, "no operational container uses the disk any more; grace period starts");
        }
        Ok(())
    }

    fn view(&self, st: &State, d: &Disk) -> DiskView {
        self.view_with(st, d, st.users(&d.name))
    }

    fn view_with(&self, st: &State, d: &Disk, containers: Vec<String>) -> DiskView {
        DiskView {
            disk: d.clone(),
            containers,
            progress: lock(&self.s.progress).get(&d.name).cloned(),
            unmount_pending: st.mounts.get(&d.name).is_some_and(|m| m.unmount_pending),
        }
    }

    /// Every disk: one pass over the containers for all of them (not one per disk), so a
    /// host with a thousand volumes lists them in linear time.
    pub async fn disks(&self) -> Vec<DiskView> {
        let st = self.s.state.lock().await;
        let mut users = st.users_by_disk();
        st.disks
            .values()
            .map(|d| {
                let who = users.remove(d.name.as_str()).unwrap_or_default();
                self.view_with(&st, d, who)
            })
            .collect()
    }

    pub async fn disk(&self, name: &str) -> Result<DiskView> {
        let st = self.s.state.lock().await;
        let d = st.disks.get(name).ok_or_else(|| ServiceError::NotFound {
            kind: "disk",
            name: name.into(),
        })?;
        Ok(self.view(&st, d))
    }

    pub async fn containers(&self) -> Vec<ContainerView> {
        let st = self.s.state.lock().await;
        st.containers
            .values()
            .map(|c| ContainerView {
                container: c.clone(),
            })
            .collect()
    }

    /// Seal a disk now, whatever its grace period; refused while a running container uses it.
    pub async fn seal_disk(&self, name: &str) -> Result<DiskView> {
        self.seal_disk_forced(name, false).await
    }

    /// Seal a disk now; with `force`, even while running containers use it (their I/O
    /// meets the gate: held during the seal, then refused or read-only).
    pub async fn seal_disk_forced(&self, name: &str, force: bool) -> Result<DiskView> {
        let rx = {
            let mut st = self.s.state.lock().await;
            if st.in_use(name) && !force {
                return Err(ServiceError::Busy(format!(
                    "disk {name:?} is attached to a running container ({}); take it down first, or seal it anyway with --force",
                    st.users(name).join(", ")
                )));
            }
            let d = st.disk_mut(name)?.clone();
            if let Ok(Some(why)) = crate::store::loopfs::in_use(&d.path, &self.mount_dir(name)) {
                return Err(ServiceError::Busy(format!(
                    "disk {name:?} is in use by the kernel ({why}); unmount it and detach its loop device first"
                )));
            }
            self.apply(&mut st, name, Event::SealNow)?;
            self.job_watch(name)
        };
        self.wait_job(name, JobKind::Seal, rx).await?;
        self.disk(name).await
    }

    /// Unseal a sealed (or failed) disk now, without attaching it.
    pub async fn unseal_disk(&self, name: &str) -> Result<DiskView> {
        let rx = {
            let mut st = self.s.state.lock().await;
            self.apply(&mut st, name, Event::UnsealNow)?;
            self.job_watch(name)
        };
        self.wait_job(name, JobKind::Unseal, rx).await?;
        self.disk(name).await
    }

    /// A container starts (or restarts) and uses `disks`. Returns when every one of them is
    /// usable: a dangling, sealing or sealed disk is reclaimed — its flag turns FALSE, a
    /// seal in flight is first completed, it is unsealed and its digest checked, and only
    /// then does its gate open ([030]). A caller that gives up (drops the future) leaves
    /// the container as it was before, and the disk's life goes on without it.
    pub async fn container_up(&self, id: &str, disks: &[String]) -> Result<ContainerView> {
        if !valid_name(id, 128) {
            return Err(ServiceError::Invalid(format!(
                "container id {id:?} is not 1-128 letters, digits, '.', '_' or '-'"
            )));
        }
        let before = {
            let mut st = self.s.state.lock().await;
            if let Some(missing) = disks.iter().find(|d| !st.disks.contains_key(*d)) {
                return Err(ServiceError::NotFound {
                    kind: "disk",
                    name: missing.clone(),
                });
            }
            let before = st.containers.get(id).cloned();
            let c = st
                .containers
                .entry(id.to_string())
                .or_insert_with(|| Container {
                    id: id.into(),
                    state: ContainerState::Running,
                    since_ms: 0,
                    disks: Vec::new(),
                    origin: Some(Origin::Api),
                });
            c.state = ContainerState::Running;
            c.since_ms = now_ms();
            for d in disks {
                if !c.disks.contains(d) {
                    c.disks.push(d.clone());
                }
            }
            self.s.registry.put_container(c)?;
            before
        };
        let undo = Undo::new(self, id, before.clone());
        let all = {
            let st = self.s.state.lock().await;
            st.containers
                .get(id)
                .map(|c| c.disks.clone())
                .unwrap_or_default()
        };
        for d in &all {
            if let Err(e) = self.reclaim(d).await {
                // The container did not come up: it is not running on these disks.
                undo.disarm();
                self.restore_container(id, before).await;
                return Err(e);
            }
        }
        undo.disarm();
        let st = self.s.state.lock().await;
        let c = st
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound {
                kind: "container",
                name: id.into(),
            })?;
        Ok(ContainerView { container: c })
    }

    /// Put a container back as it was before a `container_up` that failed (or whose client
    /// gave up); a disk left with no operational container enters its grace period.
    async fn restore_container(&self, id: &str, before: Option<Container>) {
        let mut st = self.s.state.lock().await;
        let disks = st
            .containers
            .get(id)
            .map(|c| c.disks.clone())
            .unwrap_or_default();
        let r = match before {
            Some(c) => {
                let r = self.s.registry.put_container(&c);
                st.containers.insert(id.into(), c);
                r
            }
            None => {
                st.containers.remove(id);
                self.s.registry.remove_container(id)
            }
        };
        if let Err(e) = r {
            tracing::error!(container = %id, error = %e, "cannot undo a failed container up");
        }
        for name in disks {
            if let Err(e) = self.release(&mut st, &name) {
                tracing::error!(disk = %name, error = %crate::error_chain(&e), "cannot start the grace period");
            }
        }
    }

    /// Make one disk usable for a running container that reads its file itself: a claim
    /// until the disk is attached, waiting for each job it needs first (a migration in
    /// flight to its end). An unseal that fails ends the reclaim with the job's own error
    /// (a verification failure stays one).
    async fn reclaim(&self, name: &str) -> Result<()> {
        self.reclaim_with(name, false).await
    }

    /// A disk held as plaintext (available, attached, in grace) whose file has a seal
    /// record beside it holds sealed data: it is `sealed` from now on, so that the reclaim
    /// unseals it and checks its digests before anything is served, never the scrambled
    /// bytes (DESIGN.md §6: what is on disk is untrusted; a record that is not a seal
    /// record of this file fails the unseal, and the disk with it).
    fn find_record(&self, st: &mut State, name: &str) -> Result<()> {
        let plain = matches!(
            st.life(name)?,
            Life::Available | Life::Attached | Life::Grace { .. }
        );
        let d = st.disk_mut(name)?;
        // `exists` follows a link: a dangling one cannot be a record, any file can.
        if plain && default_record_path(&d.path).exists() {
            tracing::warn!(disk = %name, record = %default_record_path(&d.path).display(), "the disk's file has a seal record: its data is sealed; unsealing it before use");
            self.apply(st, name, Event::RecordFound)?;
        }
        Ok(())
    }

    /// A container stops, crashes or is removed. A removed container's associations are
    /// dropped at once; a disk with no operational container left enters its grace period.
    pub async fn container_down(&self, id: &str, how: ContainerState) -> Result<ContainerView> {
        if how == ContainerState::Running {
            return Err(ServiceError::Invalid(
                "a container goes down as stopped, crashed or removed".into(),
            ));
        }
        let mut st = self.s.state.lock().await;
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| ServiceError::NotFound {
                kind: "container",
                name: id.into(),
            })?;
        c.state = how;
        c.since_ms = now_ms();
        let disks = c.disks.clone();
        if how == ContainerState::Removed {
            c.disks.clear();
        }
        let view = ContainerView {
            container: c.clone(),
        };
        self.s.registry.put_container(c)?;
        for name in disks {
            self.release(&mut st, &name)?;
        }
        Ok(view)
    }

    /// Prometheus text exposition.
    pub async fn metrics_text(&self) -> String {
        let st = self.s.state.lock().await;
        let mut by_state: BTreeMap<DiskState, u64> = BTreeMap::new();
        for d in st.disks.values() {
            *by_state.entry(d.state).or_default() += 1;
        }
        let snap = metrics::Snapshot {
            by_state,
            dangling: st.disks.values().filter(|d| d.dangling).count() as u64,
            gate_waits: lock(&self.s.gates).values().map(|g| g.waits()).sum(),
            docker_up: self.docker_status().map(|s| s.reachable),
        };
        drop(st);
        self.s.metrics.render(&snap)
    }
}

/// Undoes an association whose caller dropped the future before the reclaim ended (a
/// client that gave up): the container goes back to what it was, on a task of its own.
struct Undo {
    armed: Option<(Service, String, Option<Container>)>,
}

impl Undo {
    fn new(svc: &Service, id: &str, before: Option<Container>) -> Self {
        Self {
            armed: Some((svc.clone(), id.into(), before)),
        }
    }

    fn disarm(mut self) {
        self.armed = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some((svc, id, before)) = self.armed.take() {
            tracing::warn!(container = %id, "the client gave up before its disks were usable; the container is not up");
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { svc.restore_container(&id, before).await });
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
