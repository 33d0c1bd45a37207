//! The hypervisor side of the patent ([029]-[034]), as a daemon's service layer: the
//! registry of disks and containers, the dangling flag and its grace period (claim 6), the
//! policy that seals a dangling disk in a background job and unseals it when a container
//! reclaims it ([030]), the I/O gate of each disk, restart recovery and metrics.
//!
//! The HTTP front-end (`pdguard serve`) calls these methods; nothing here knows HTTP.

mod adopt;
pub mod docker;
mod error;
mod metrics;
mod nbd;
mod startup;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pdguard_core::keys::MasterKey;
use pdguard_core::Profile;
use serde::Serialize;
use tokio::sync::{watch, Mutex, Semaphore};

pub use error::ServiceError;
pub use metrics::Metrics;
pub use nbd::{NbdExport, NBD_CONTAINER_PREFIX};
pub use startup::{lock_path, DAEMON_LOCK_FILE};
pub use volumes::{VolumeError, VolumeOptions, VolumeView};

use crate::error_chain;
use crate::gate::{Gate, GateState, SealedIo};
use crate::jobs::{self, JobError, Progress, SealOptions};
use crate::registry::{Container, ContainerState, Disk, DiskState, Registry, VolumeMounts};
use crate::store::file::{default_record_path, ImageStorage, RecordWatch};

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
}

/// A container as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerView {
    #[serde(flatten)]
    pub container: Container,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Seal,
    Unseal,
}

#[derive(Default)]
struct State {
    disks: BTreeMap<String, Disk>,
    containers: BTreeMap<String, Container>,
    /// Docker volumes' live mounts (dockerd's Mount IDs), by volume name.
    mounts: BTreeMap<String, VolumeMounts>,
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

    /// Containers associated with `disk`.
    fn users(&self, disk: &str) -> Vec<String> {
        self.containers
            .values()
            .filter(|c| c.disks.iter().any(|d| d == disk))
            .map(|c| c.id.clone())
            .collect()
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
    slots: Semaphore,
    running: StdMutex<HashMap<String, watch::Receiver<bool>>>,
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
        .map(|d| d.as_millis() as u64)
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
    /// set every gate from its disk's state.
    pub async fn start(mut cfg: Config) -> Result<Self> {
        cfg.check().map_err(ServiceError::Invalid)?;
        let disks_dir = cfg.state_dir.join("disks");
        std::fs::create_dir_all(&disks_dir).map_err(|source| ServiceError::Io {
            what: format!("cannot create {}", disks_dir.display()),
            source,
        })?;
        // Resolved once (symbolic links, `..`): the paths of managed disks derived from it
        // are opened with no symbolic link in any component.
        cfg.state_dir = adopt::canonical_state_dir(&cfg.state_dir)?;
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
                slots: Semaphore::new(jobs),
                running: StdMutex::new(HashMap::new()),
                progress: StdMutex::new(HashMap::new()),
                metrics: Metrics::default(),
                volumes: volumes::Volumes::default(),
            }),
        };
        svc.recover().await;
        svc.nbd_forget_stale().await;
        Ok(svc)
    }

    pub fn config(&self) -> &Config {
        &self.s.cfg
    }

    async fn recover(&self) {
        let mut st = self.s.state.lock().await;
        for d in st.disks.values_mut() {
            if d.state == DiskState::Failed {
                self.retry_failed(d);
            }
            let gate = self.gate(&d.name);
            gate.set(self.gate_state_for(d.state));
            let kind = match d.state {
                DiskState::Sealing => JobKind::Seal,
                DiskState::Unsealing => JobKind::Unseal,
                _ => continue,
            };
            let from = jobs::inspect(&storage_of(d))
                .map(|r| format!("from {}", r.phase.name()))
                .unwrap_or_else(|_| "from the start".into());
            let job = if kind == JobKind::Seal {
                "seal"
            } else {
                "unseal"
            };
            tracing::info!(disk = %d.name, "resuming {job} of {} {from}", d.name);
            self.start_job(d, kind);
        }
        drop(st);
        self.fail_lost_records().await;
    }

    /// A disk that failed for a reason a restart may have removed (a bad setting, a full
    /// file system) is retried: a dangling disk whose seal never wrote a record is sealed
    /// again, and a job a record shows half done is resumed. A failure of the data itself
    /// (a sealed image that does not verify, a lost record) stays `failed`.
    fn retry_failed(&self, d: &mut Disk) {
        let storage = storage_of(d);
        let next = if !storage.record_path().exists() {
            (d.dangling && !d.record_expected).then_some(DiskState::Sealing)
        } else {
            match jobs::inspect(&storage).map(|r| r.phase) {
                Ok(pdguard_core::Phase::SealScatter | pdguard_core::Phase::SealGather) => {
                    Some(DiskState::Sealing)
                }
                Ok(pdguard_core::Phase::UnsealScatter | pdguard_core::Phase::UnsealGather) => {
                    Some(DiskState::Unsealing)
                }
                _ => None,
            }
        };
        let Some(next) = next else { return };
        tracing::info!(disk = %d.name, error = d.error.as_deref().unwrap_or(""), "retrying a disk that failed before this start");
        d.state = next;
        d.error = None;
        if let Err(e) = self.persist(d) {
            tracing::error!(disk = %d.name, error = %e, "cannot record the retry");
        }
    }

    /// A sealed disk whose record is gone is `failed`, with a message saying so.
    async fn fail_lost_records(&self) {
        let mut st = self.s.state.lock().await;
        for d in st.disks.values_mut() {
            let lost = d.state == DiskState::Sealed
                && d.record_expected
                && !default_record_path(&d.path).exists();
            if !lost {
                continue;
            }
            let why = record_lost(d);
            tracing::error!(disk = %d.name, "{why}");
            d.state = DiskState::Failed;
            d.error = Some(why);
            self.gate(&d.name).set(GateState::Blocked);
            if let Err(e) = self.s.registry.put_disk(d) {
                tracing::error!(disk = %d.name, error = %e, "cannot record the lost record");
            }
        }
    }

    fn gate_state_for(&self, state: DiskState) -> GateState {
        match state {
            DiskState::Sealed => GateState::Sealed(self.s.cfg.sealed_io),
            DiskState::Sealing | DiskState::Unsealing | DiskState::Failed => GateState::Blocked,
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

    fn view(&self, st: &State, d: &Disk) -> DiskView {
        DiskView {
            disk: d.clone(),
            containers: st.users(&d.name),
            progress: lock(&self.s.progress).get(&d.name).cloned(),
        }
    }

    pub async fn disks(&self) -> Vec<DiskView> {
        let st = self.s.state.lock().await;
        st.disks.values().map(|d| self.view(&st, d)).collect()
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

    /// Register a new disk: a sparse file of `size` bytes in `STATE/disks/`, or at `path`.
    pub async fn create_disk(
        &self,
        name: &str,
        size: u64,
        path: Option<PathBuf>,
    ) -> Result<DiskView> {
        if !valid_name(name, 64) {
            return Err(ServiceError::Invalid(format!(
                "disk name {name:?} is not 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )));
        }
        let sector = u64::from(self.s.cfg.sector_size);
        if size == 0 || !size.is_multiple_of(sector) {
            return Err(ServiceError::Invalid(format!(
                "size {size} bytes is not a positive multiple of the sector size {sector}; use for example 64M or 1G"
            )));
        }
        let mut st = self.s.state.lock().await;
        if st.disks.contains_key(name) {
            return Err(ServiceError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        let managed = path.is_none();
        let path = match path {
            Some(p) if p.is_absolute() => {
                let p = adopt::canonical(&p)?;
                adopt::check_adoptable(&p, &self.s.cfg.state_dir)?;
                p
            }
            Some(p) => {
                return Err(ServiceError::Invalid(format!(
                    "disk path {} is not absolute; give the full path",
                    p.display()
                )))
            }
            None => self
                .s
                .cfg
                .state_dir
                .join("disks")
                .join(format!("{name}.img")),
        };
        let id = adopt::file_id(&path);
        let same = |d: &&Disk| d.path == path || (id.is_some() && adopt::file_id(&d.path) == id);
        if let Some(other) = st.disks.values().find(same) {
            return Err(ServiceError::Busy(format!(
                "{} is the file of disk {:?} already (compared by device and inode); pick another file",
                path.display(),
                other.name
            )));
        }
        let created = create_file(&path, size, managed)?;
        // What the file is, checked again by every job (never through a symbolic link).
        let identity = match adopt::identity_of(&path, size) {
            Ok(id) => id,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        let record_expected = default_record_path(&path).exists();
        let d = Disk {
            name: name.into(),
            id: hex::encode(rand::random::<[u8; 16]>()),
            path,
            size,
            sector_size: self.s.cfg.sector_size,
            state: DiskState::Available,
            dangling: false,
            managed,
            grace_until_ms: None,
            error: None,
            created_unix: now_ms() / 1000,
            record_expected,
            volume: None,
            identity: Some(identity),
        };
        if let Err(e) = self.persist(&d) {
            if created {
                let _ = std::fs::remove_file(&d.path);
            }
            return Err(e);
        }
        self.gate(name).set(GateState::Open);
        st.disks.insert(name.into(), d.clone());
        Ok(self.view(&st, &d))
    }

    /// Delete a disk from the registry (and its file too when it lives in the state
    /// directory). A sealed or failed disk, or one whose file has a seal record, holds data
    /// that only its record can bring back: it is removed only when the caller says what to
    /// do with it — `shred` (crypto-erase it first, secure profile) or `keep_file` (keep the
    /// file and its record as they are, so `pdguard image unseal` can still restore it).
    /// Nothing else ever deletes a seal record, and an adopted file is never deleted.
    pub async fn remove_disk(&self, name: &str, shred: bool, keep_file: bool) -> Result<()> {
        let mut st = self.s.state.lock().await;
        let d = st.disk_mut(name)?.clone();
        if st.in_use(name) {
            return Err(ServiceError::Busy(format!(
                "disk {name:?} is attached to a running container ({}); take the container down first",
                st.users(name).join(", ")
            )));
        }
        if matches!(d.state, DiskState::Sealing | DiskState::Unsealing) {
            return Err(ServiceError::Busy(format!(
                "disk {name:?} is {}; wait for the job to finish",
                d.state.name()
            )));
        }
        let storage = storage_of(&d);
        let has_record = storage.record_path().exists();
        let holds_sealed = matches!(d.state, DiskState::Sealed | DiskState::Failed) || has_record;
        if holds_sealed && !shred && !keep_file {
            return Err(ServiceError::Invalid(format!(
                "disk {name:?} is {} and its data can only be brought back with its seal record {}; removing it would lose that data: pass --shred to crypto-erase it, or --keep-file to keep the file and its record and only forget the disk (unseal it first to keep the data usable)",
                d.state.name(),
                storage.record_path().display()
            )));
        }
        if shred {
            if !matches!(d.state, DiskState::Sealed | DiskState::Failed) {
                return Err(ServiceError::Invalid(format!(
                    "disk {name:?} is {}, not sealed; only a sealed disk can be shredded",
                    d.state.name()
                )));
            }
            jobs::shred(&storage, self.s.cfg.master_key.as_ref()).map_err(|source| {
                ServiceError::Job {
                    disk: name.into(),
                    action: "shred",
                    source: Box::new(source),
                }
            })?;
        }
        let mut doomed = None;
        if !keep_file {
            // After a shred the record is a tombstone without key material.
            if shred {
                remove_if_exists(storage.record_path())?;
            }
            if d.managed {
                doomed = move_aside(&d.path)?;
            }
        }
        self.s.registry.remove_disk(name)?;
        st.disks.remove(name);
        for c in st.containers.values_mut() {
            if c.disks.iter().any(|x| x == name) {
                c.disks.retain(|x| x != name);
                self.s.registry.put_container(c)?;
            }
        }
        lock(&self.s.gates).remove(name);
        drop(st);
        // Unlinking a large file can take minutes on a busy host (the file system frees
        // every extent): it was moved aside under the lock, and is deleted without it.
        if let Some(aside) = doomed {
            let what = format!(
                "cannot delete {} (the file of disk {name:?})",
                aside.display()
            );
            tokio::task::spawn_blocking(move || remove_if_exists(&aside))
                .await
                .map_err(|e| ServiceError::Invalid(format!("{what}: {e}")))??;
        }
        Ok(())
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
            let d = st.disk_mut(name)?;
            match d.state {
                DiskState::Sealed => {
                    return Err(ServiceError::Busy(format!(
                        "disk {name:?} is already sealed"
                    )))
                }
                DiskState::Sealing | DiskState::Unsealing => {
                    return Err(ServiceError::Busy(format!(
                        "disk {name:?} is {}; wait for the job to finish",
                        d.state.name()
                    )))
                }
                _ => {}
            }
            d.state = DiskState::Sealing;
            d.grace_until_ms = None;
            let d = d.clone();
            self.persist(&d)?;
            self.start_job(&d, JobKind::Seal)
        };
        self.wait_and_check(name, rx, "seal").await
    }

    /// Unseal a sealed (or failed) disk now, without attaching it.
    pub async fn unseal_disk(&self, name: &str) -> Result<DiskView> {
        let rx = {
            let mut st = self.s.state.lock().await;
            let d = st.disk_mut(name)?;
            if !matches!(d.state, DiskState::Sealed | DiskState::Failed) {
                return Err(ServiceError::Busy(format!(
                    "disk {name:?} is {}, not sealed",
                    d.state.name()
                )));
            }
            d.state = DiskState::Unsealing;
            d.dangling = false;
            let d = d.clone();
            self.persist(&d)?;
            self.start_job(&d, JobKind::Unseal)
        };
        self.wait_and_check(name, rx, "unseal").await
    }

    async fn wait_and_check(
        &self,
        name: &str,
        mut rx: watch::Receiver<bool>,
        action: &'static str,
    ) -> Result<DiskView> {
        let _ = rx.wait_for(|done| *done).await;
        let v = self.disk(name).await?;
        if v.disk.state == DiskState::Failed {
            return Err(ServiceError::Invalid(format!(
                "disk {name:?}: {action} failed: {}",
                v.disk.error.clone().unwrap_or_default()
            )));
        }
        Ok(v)
    }

    /// A container starts (or restarts) and uses `disks`. Returns when every one of them is
    /// usable: a dangling, sealing or sealed disk is reclaimed — its flag turns FALSE, a
    /// seal in flight is first completed, it is unsealed and its digest checked, and only
    /// then does its gate open ([030]).
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
                self.restore_container(id, before).await;
                return Err(e);
            }
        }
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

    /// Put a container back as it was before a `container_up` that failed.
    async fn restore_container(&self, id: &str, before: Option<Container>) {
        let mut st = self.s.state.lock().await;
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
    }

    /// Make one disk usable for a running container.
    async fn reclaim(&self, name: &str) -> Result<()> {
        let mut unsealed_once = false;
        loop {
            let rx = {
                let mut st = self.s.state.lock().await;
                let d = st.disk_mut(name)?;
                d.dangling = false;
                match d.state {
                    DiskState::Available | DiskState::Attached | DiskState::Grace => {
                        d.state = DiskState::Attached;
                        d.grace_until_ms = None;
                        d.error = None;
                        let d = d.clone();
                        self.persist(&d)?;
                        self.gate(name).set(GateState::Open);
                        return Ok(());
                    }
                    DiskState::Failed if unsealed_once => {
                        return Err(ServiceError::Invalid(format!(
                            "disk {name:?} could not be unsealed: {}",
                            d.error.clone().unwrap_or_default()
                        )));
                    }
                    DiskState::Sealed | DiskState::Failed => {
                        unsealed_once = true;
                        d.state = DiskState::Unsealing;
                        let d = d.clone();
                        self.persist(&d)?;
                        self.start_job(&d, JobKind::Unseal)
                    }
                    DiskState::Sealing | DiskState::Unsealing => {
                        let d = d.clone();
                        self.persist(&d)?;
                        match lock(&self.s.running).get(name).cloned() {
                            Some(rx) => rx,
                            None => self.start_job(&d, job_of(d.state)),
                        }
                    }
                }
            };
            let mut rx = rx;
            let _ = rx.wait_for(|done| *done).await;
        }
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
            if st.in_use(&name) {
                continue;
            }
            if let Some(d) = st.disks.get_mut(&name) {
                if d.state == DiskState::Attached {
                    d.state = DiskState::Grace;
                    d.grace_until_ms = Some(now_ms() + self.grace_of(d));
                    let d = d.clone();
                    self.persist(&d)?;
                }
            }
        }
        Ok(view)
    }

    /// One policy step: a disk whose grace period ended with no operational container
    /// turns dangling (claim 6) and its seal job starts (claim 1, [034]).
    pub async fn tick(&self) {
        let mut st = self.s.state.lock().await;
        let now = now_ms();
        let due: Vec<String> = st
            .disks
            .values()
            .filter(|d| d.state == DiskState::Grace && d.grace_until_ms.is_some_and(|t| t <= now))
            .map(|d| d.name.clone())
            .collect();
        for name in due {
            let in_use = st.in_use(&name);
            let Some(d) = st.disks.get_mut(&name) else {
                continue;
            };
            if !in_use && self.kernel_holds(d) {
                // Never seal what the kernel holds; look again on a later tick.
                d.grace_until_ms = Some(now + 1000);
                continue;
            }
            if in_use {
                d.state = DiskState::Attached;
                d.grace_until_ms = None;
            } else {
                tracing::info!(disk = %name, "dangling: every container is gone; sealing");
                d.dangling = true;
                d.state = DiskState::Sealing;
                d.grace_until_ms = None;
            }
            let d = d.clone();
            if let Err(e) = self.persist(&d) {
                tracing::error!(disk = %name, error = %e, "cannot record the dangling flag");
                continue;
            }
            if d.state == DiskState::Sealing {
                self.start_job(&d, JobKind::Seal);
            }
        }
    }

    /// Run [`Self::tick`] until `stop` turns true.
    pub async fn run_policy(&self, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = every.tick() => self.tick().await,
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Start a background job on `d` (whose state the caller has set and persisted).
    fn start_job(&self, d: &Disk, kind: JobKind) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        lock(&self.s.running).insert(d.name.clone(), rx.clone());
        let svc = self.clone();
        let disk = d.clone();
        tokio::spawn(async move {
            let gate = svc.gate(&disk.name);
            let _ = tokio::task::spawn_blocking(move || gate.block()).await;
            // Acknowledged writes are durable before the job's first read.
            let path = disk.path.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || nbd::flush_disk(&path)).await {
                tracing::warn!(disk = %disk.name, error = %e, "cannot flush the disk before the job");
            }
            let permit = svc.s.slots.acquire().await;
            svc.s.metrics.started(kind == JobKind::Seal);
            let t0 = std::time::Instant::now();
            let runner = svc.clone();
            let d2 = disk.clone();
            let result = tokio::task::spawn_blocking(move || runner.run_job(&d2, kind))
                .await
                .unwrap_or_else(|e| Err(format!("job panicked: {e}")));
            drop(permit);
            svc.s.metrics.job_seconds(t0.elapsed());
            svc.finish_job(&disk.name, kind, result).await;
            lock(&svc.s.progress).remove(&disk.name);
            lock(&svc.s.running).remove(&disk.name);
            let _ = tx.send(true);
        });
        rx
    }

    /// The job itself, on a blocking thread. Resumes whatever a crash interrupted.
    fn run_job(&self, d: &Disk, kind: JobKind) -> Result<(), String> {
        let watch = RecordFlag {
            svc: self.clone(),
            disk: d.name.clone(),
            last: StdMutex::new(Some(d.record_expected)),
        };
        let storage = storage_of(d).with_record_watch(Arc::new(watch));
        let progress = DiskProgress {
            svc: self.clone(),
            disk: d.name.clone(),
            job: if kind == JobKind::Seal {
                "seal"
            } else {
                "unseal"
            },
        };
        let key = self.s.cfg.master_key.as_ref();
        let r = match kind {
            JobKind::Seal => {
                let opts = SealOptions {
                    profile: d.volume.as_ref().map_or(self.s.cfg.profile, |v| v.profile),
                    keep_holes: d.volume.as_ref().is_some_and(|v| v.keep_holes),
                    sector_size: d.sector_size,
                    master_key: self.s.cfg.master_key.clone(),
                    strategy: self.s.cfg.strategy.clone(),
                    ..SealOptions::default()
                };
                match jobs::seal(&storage, &opts, &progress) {
                    Ok(_) | Err(JobError::AlreadySealed { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            // The record is removed last by an unseal, after the registry noted it: no
            // record means the unseal already finished, unless the registry expects one.
            JobKind::Unseal if !storage.record_path().exists() => {
                return match d.record_expected {
                    false => Ok(()),
                    true => Err(record_lost(d)),
                };
            }
            JobKind::Unseal => jobs::unseal(&storage, key, &progress).map(|_| ()),
        };
        r.map_err(|e| error_chain(&e))
    }

    async fn finish_job(&self, name: &str, kind: JobKind, result: Result<(), String>) {
        let mut st = self.s.state.lock().await;
        let in_use = st.in_use(name);
        let Some(d) = st.disks.get_mut(name) else {
            return;
        };
        let ok = result.is_ok();
        match (kind, result) {
            (JobKind::Seal, Ok(())) => {
                d.state = DiskState::Sealed;
                d.error = None;
            }
            (JobKind::Unseal, Ok(())) => {
                d.state = if in_use {
                    DiskState::Attached
                } else {
                    DiskState::Available
                };
                d.dangling = false;
                d.error = None;
            }
            (_, Err(e)) => {
                tracing::error!(disk = %name, error = %e, "job failed");
                d.state = DiskState::Failed;
                d.error = Some(e);
            }
        }
        self.s.metrics.finished(kind == JobKind::Seal, ok);
        let d = d.clone();
        if let Err(e) = self.persist(&d) {
            tracing::error!(disk = %name, error = %e, "cannot record the job's end");
        }
        self.gate(name).set(self.gate_state_for(d.state));
    }

    /// Prometheus text exposition.
    pub async fn metrics_text(&self) -> String {
        let st = self.s.state.lock().await;
        let mut by_state: BTreeMap<DiskState, u64> = BTreeMap::new();
        for d in st.disks.values() {
            *by_state.entry(d.state).or_default() += 1;
        }
        let dangling = st.disks.values().filter(|d| d.dangling).count() as u64;
        let gate_waits: u64 = lock(&self.s.gates).values().map(|g| g.waits()).sum();
        self.s.metrics.render(&by_state, dangling, gate_waits)
    }

    /// Each running job as (disk, "seal pass scatter"), for shutdown messages.
    pub fn running_jobs(&self) -> Vec<(String, String)> {
        let progress = lock(&self.s.progress);
        let mut v: Vec<(String, String)> = lock(&self.s.running)
            .keys()
            .map(|d| {
                let what = progress.get(d).map_or("a job".to_string(), |p| {
                    format!("{} (pass {})", p.job, p.pass)
                });
                (d.clone(), what)
            })
            .collect();
        v.sort();
        v
    }

    /// Wait for every running job to end (for shutdown and tests).
    pub async fn wait_idle(&self) {
        loop {
            let next = lock(&self.s.running).values().next().cloned();
            match next {
                Some(mut rx) => {
                    let _ = rx.wait_for(|d| *d).await;
                }
                None => return,
            }
        }
    }
}

fn record_lost(d: &Disk) -> String {
    format!(
        "the seal record {} of disk {:?} is missing, but the registry says the disk was sealed: its file holds sealed data, which is never served as plaintext; restore the record from a backup and run `pdguard disk unseal {}`, or forget the disk with `pdguard disk rm {} --keep-file`",
        default_record_path(&d.path).display(),
        d.name,
        d.name,
        d.name
    )
}

/// Notes in the registry, durably and before the record changes, whether a disk's seal
/// record should exist (see [`Disk::record_expected`]). Runs on a job's blocking thread.
struct RecordFlag {
    svc: Service,
    disk: String,
    last: StdMutex<Option<bool>>,
}

impl RecordFlag {
    fn set(&self, expected: bool) -> std::io::Result<()> {
        let mut last = lock(&self.last);
        if *last == Some(expected) {
            return Ok(());
        }
        let svc = self.svc.clone();
        let name = self.disk.clone();
        let r = tokio::runtime::Handle::current().block_on(async move {
            let mut st = svc.s.state.lock().await;
            match st.disks.get_mut(&name) {
                Some(d) => {
                    d.record_expected = expected;
                    let d = d.clone();
                    svc.persist(&d)
                }
                None => Ok(()),
            }
        });
        r.map_err(|e| std::io::Error::other(error_chain(&e)))?;
        *last = Some(expected);
        Ok(())
    }
}

impl RecordWatch for RecordFlag {
    fn before_write(&self) -> std::io::Result<()> {
        self.set(true)
    }

    fn before_remove(&self) -> std::io::Result<()> {
        self.set(false)
    }
}

fn job_of(state: DiskState) -> JobKind {
    if state == DiskState::Sealing {
        JobKind::Seal
    } else {
        JobKind::Unseal
    }
}

/// The daemon never follows a symbolic link on a disk's paths, and its jobs refuse a file
/// that is not the one recorded at adoption ([`Disk::identity`]).
fn storage_of(d: &Disk) -> ImageStorage {
    ImageStorage::new(d.path.clone(), default_record_path(&d.path), None).with_identity(d.identity)
}

/// Create the disk file (or check an adopted one). Returns whether a file was made, so that a
/// failed registration can remove it again.
fn create_file(path: &Path, size: u64, managed: bool) -> Result<bool> {
    let io = |what: String| move |source| ServiceError::Io { what, source };
    match std::fs::metadata(path) {
        Ok(m) if managed => Err(ServiceError::Busy(format!(
            "{} already exists ({} bytes); remove it or pick another disk name",
            path.display(),
            m.len()
        ))),
        Ok(m) if m.len() != size => Err(ServiceError::Invalid(format!(
            "{} exists with {} bytes, not {size}; give its real size or another path",
            path.display(),
            m.len()
        ))),
        Ok(_) => Ok(false),
        Err(_) => {
            check_room(path, size)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io(format!("cannot create disk file {}", path.display())))?;
            if let Err(e) = f.set_len(size).and_then(|()| f.sync_all()) {
                // Leave nothing behind: the name must be free again.
                drop(f);
                let _ = std::fs::remove_file(path);
                let too_big = e.kind() == std::io::ErrorKind::InvalidInput
                    || e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error());
                if too_big {
                    return Err(ServiceError::Invalid(format!(
                        "disk size {size} bytes is more than the file system of {} allows for one file ({e}); pick a smaller size",
                        path.display()
                    )));
                }
                return Err(io(format!("cannot size disk file {}", path.display()))(e));
            }
            Ok(true)
        }
    }
}

/// Refuse a size the file system cannot hold: over the largest file offset, or over the
/// space free for the daemon's user (a sparse file would let writes fail later, inside a
/// container).
fn check_room(path: &Path, size: u64) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(ServiceError::Invalid(format!(
            "disk size {size} bytes is over the largest file size ({} bytes); pick a smaller size",
            i64::MAX
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = match rustix::fs::statvfs(dir) {
        Ok(st) => st,
        // A missing directory: creating the file reports it.
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => {
            return Err(ServiceError::Io {
                what: format!("cannot read the free space of {}", dir.display()),
                source: e.into(),
            })
        }
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if size > free {
        return Err(ServiceError::Invalid(format!(
            "disk size {size} bytes is more than the {free} bytes free in {}; pick a smaller size or free space",
            dir.display()
        )));
    }
    Ok(())
}

/// Rename a disk's file to `PATH.removing` (instant, durable with its directory), so that
/// it can be deleted outside the state lock. `None` when there is no file.
fn move_aside(path: &Path) -> Result<Option<PathBuf>> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".removing");
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => Ok(Some(aside)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServiceError::Io {
            what: format!("cannot move {} aside to delete it", path.display()),
            source,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServiceError::Io {
            what: format!("cannot delete {}", path.display()),
            source,
        }),
    }
}

/// Forwards a job's progress to `status` and the metrics.
struct DiskProgress {
    svc: Service,
    disk: String,
    job: &'static str,
}

impl Progress for DiskProgress {
    fn pass(&self, name: &'static str, total_bytes: u64) {
        lock(&self.svc.s.progress).insert(
            self.disk.clone(),
            JobProgress {
                job: self.job,
                pass: name,
                done_bytes: 0,
                total_bytes,
            },
        );
        if let Some(o) = &self.svc.s.cfg.observer {
            o.0.pass(name, total_bytes);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(o) = &self.svc.s.cfg.observer {
            o.0.advance(bytes);
        }
        self.svc.s.metrics.moved(bytes);
        if let Some(p) = lock(&self.svc.s.progress).get_mut(&self.disk) {
            p.done_bytes += bytes;
        }
    }
}
