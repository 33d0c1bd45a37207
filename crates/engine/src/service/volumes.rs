//! What the Docker volume plugin's requests mean (DESIGN.md §4): a volume is a disk of the
//! same name holding a file system; a Mount is a reclaim ([030]) followed by a loop mount (or,
//! for `-o reclaim=instant`, a claim served through a FUSE file: `volume_fuse.rs`); an
//! Unmount at count 0 unmounts it; dockerd's Mount IDs are persisted, so a restarted daemon
//! keeps working mounts. The plugin's HTTP and Docker's JSON stay in the front-end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use pdguard_core::Profile;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::disks::create_file;
use super::docker::DockerStatus;
use super::lifecycle::{Event, MAX_GRACE_MS};
use super::{lock, now_ms, valid_name, Result, Service, ServiceError};
use crate::registry::{Disk, DiskState, VolumeReclaim, VolumeSpec};
use crate::store::loopfs;

/// The longest volume name (dockerd's are shorter; the plugin refuses longer ones before
/// it takes a lock or allocates anything for them).
pub const MAX_VOLUME_NAME: usize = 64;

/// Sector size of volumes: the file systems on them write whole 4 KiB blocks.
pub const VOLUME_SECTOR_SIZE: u32 = 4096;
/// A volume smaller than this cannot hold an ext4 file system worth having.
const MIN_VOLUME_SIZE: u64 = 1 << 20;
/// dockerd cancels a `VolumeDriver.Mount` after this (moby's volume-driver proxy), sends no
/// Unmount, and `docker run` exits 125 "context deadline exceeded".
pub const DOCKERD_MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a Mount waits for its volume's reclaim by default (`serve
/// --docker-mount-timeout`): well inside [`DOCKERD_MOUNT_TIMEOUT`], so that dockerd gets an
/// answer that says what is going on instead of a timeout.
pub const DOCKER_MOUNT_TIMEOUT: Duration = Duration::from_secs(90);
/// A mount younger than this is never taken for stale by a resync: dockerd may not list
/// the container that asked for it yet.
const STALE_AFTER_MS: u64 = 5_000;

/// Bad `docker volume create -o` options.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("option size is required, e.g. -o size=10G")]
    NoSize,
    #[error("unknown option {0:?} for a pdguard volume; known options: size, fs, profile, grace, keep_holes, reclaim")]
    Unknown(String),
    #[error("option {key}={value:?} is invalid: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: String,
    },
}

/// The options of a new volume, parsed from dockerd's `Opts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    pub size: u64,
    pub fs: String,
    pub profile: Profile,
    pub keep_holes: bool,
    pub grace: Option<Duration>,
    pub reclaim: VolumeReclaim,
}

impl VolumeOptions {
    /// Parse `size` (required), `fs`, `profile`, `grace`, `keep_holes`, `reclaim`;
    /// anything else is refused by name.
    pub fn parse(
        opts: &BTreeMap<String, String>,
        default_profile: Profile,
    ) -> std::result::Result<Self, VolumeError> {
        let mut o = Self {
            size: 0,
            fs: "ext4".into(),
            profile: default_profile,
            keep_holes: true,
            grace: None,
            reclaim: VolumeReclaim::Copy,
        };
        let bad = |key: &'static str, value: &str, why: &str| VolumeError::Bad {
            key,
            value: value.into(),
            why: why.into(),
        };
        let mut size = None;
        for (k, v) in opts {
            match k.as_str() {
                "size" => size = Some(parse_size(v).map_err(|why| bad("size", v, &why))?),
                "fs" if v == "ext4" => o.fs = v.clone(),
                "fs" => return Err(bad("fs", v, "only ext4 is supported")),
                "profile" => {
                    o.profile = match v.as_str() {
                        "secure" => Profile::Secure,
                        "patent" => Profile::Patent,
                        _ => return Err(bad("profile", v, "use secure or patent")),
                    }
                }
                "grace" => o.grace = Some(parse_duration(v).map_err(|why| bad("grace", v, &why))?),
                "keep_holes" => {
                    o.keep_holes = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("keep_holes", v, "use true or false")),
                    }
                }
                "reclaim" => {
                    o.reclaim = match v.as_str() {
                        "copy" => VolumeReclaim::Copy,
                        "instant" => VolumeReclaim::Instant,
                        _ => return Err(bad("reclaim", v, "use instant or copy")),
                    }
                }
                other => return Err(VolumeError::Unknown(other.into())),
            }
        }
        o.size = size.ok_or(VolumeError::NoSize)?;
        Ok(o)
    }
}

/// `10G`, `512M`, `1GiB`, `4096`: binary units K, M, G, T.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| "not a size such as 10G or 512M".to_string())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unit {unit:?} is not one of K, M, G, T")),
    };
    let size = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "too large".to_string())?;
    if size < MIN_VOLUME_SIZE {
        return Err("a volume needs at least 1M".into());
    }
    if !size.is_multiple_of(u64::from(VOLUME_SECTOR_SIZE)) {
        return Err(format!(
            "not a multiple of {VOLUME_SECTOR_SIZE} bytes (the volume's sector size)"
        ));
    }
    Ok(size)
}

/// `30s`, `500ms`, `2m`, `1h`.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| "not a duration such as 30s, 500ms or 2m".to_string())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("unit {unit:?} is not one of ms, s, m, h")),
    };
    match ms {
        Some(ms) if ms <= MAX_GRACE_MS => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "longer than the longest grace period, {} days; give a shorter one such as 30s or 2h",
            MAX_GRACE_MS / 86_400_000
        )),
    }
}

/// A volume as the plugin shows it to dockerd.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub name: String,
    /// Set while the file system is mounted.
    pub mountpoint: Option<PathBuf>,
    /// pdguard's view, for `docker volume inspect`.
    pub status: serde_json::Value,
}

/// Per-volume locks (a Mount and an Unmount of one volume never interleave) and the link
/// to dockerd.
#[derive(Default)]
pub(super) struct Volumes {
    /// Only names in use: an entry goes when its last holder lets go ([`VolumeLock`]).
    pub(super) locks: Arc<StdMutex<HashMap<String, Arc<Mutex<()>>>>>,
    pub(super) docker: StdMutex<Option<DockerStatus>>,
    /// Disks the kernel held at the last look (warned about once, not every second).
    held: StdMutex<HashSet<String>>,
    /// Volumes mounted over a FUSE file (`reclaim=instant`), until their last Unmount.
    /// (The slot is held while its mount is being made.)
    pub(super) fuse: StdMutex<HashMap<String, Arc<StdMutex<Option<loopfs::FuseMount>>>>>,
}

impl Service {
    /// Where a volume's file system is mounted: `STATE/mounts/NAME`.
    pub fn mount_dir(&self, name: &str) -> PathBuf {
        self.s.cfg.state_dir.join("mounts").join(name)
    }

    /// True when the kernel holds the disk's file (a loop device, a mount): then it is not
    /// sealed, whatever the registry says. An error reading the kernel's tables counts as
    /// held: nothing is sealed on a guess.
    pub(super) fn kernel_holds(&self, d: &Disk) -> bool {
        let why = match loopfs::in_use(&d.path, &self.mount_dir(&d.name)) {
            Ok(None) => {
                lock(&self.s.volumes.held).remove(&d.name);
                return false;
            }
            Ok(Some(why)) => why,
            Err(e) => format!("cannot tell: {}", crate::error_chain(&e)),
        };
        if lock(&self.s.volumes.held).insert(d.name.clone()) {
            tracing::warn!(disk = %d.name, %why, "not sealing a disk the kernel holds; looking again every second");
        }
        true
    }

    /// Take the lock of one volume (whose name the caller checked).
    async fn volume_lock(&self, name: &str) -> VolumeLock {
        let m = Arc::clone(lock(&self.s.volumes.locks).entry(name.into()).or_default());
        VolumeLock {
            guard: Some(m.lock_owned().await),
            map: Arc::clone(&self.s.volumes.locks),
            name: name.into(),
        }
    }

    /// The lock of a volume, unless someone holds it (for background retries).
    fn try_volume_lock(&self, name: &str) -> Option<VolumeLock> {
        let m = Arc::clone(lock(&self.s.volumes.locks).entry(name.into()).or_default());
        let guard = m.try_lock_owned().ok();
        let l = VolumeLock {
            guard,
            map: Arc::clone(&self.s.volumes.locks),
            name: name.into(),
        };
        l.guard.is_some().then_some(l)
    }

    /// `docker volume create -d pdguard NAME -o ...`: a sparse file with an ext4 file
    /// system, registered as a disk of 4 KiB sectors.
    pub async fn volume_create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<()> {
        let o = VolumeOptions::parse(opts, self.s.cfg.profile)
            .map_err(|e| ServiceError::Invalid(format!("volume {name:?}: {e}")))?;
        if !valid_name(name, 64) {
            return Err(ServiceError::Invalid(format!(
                "volume name {name:?} is not 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )));
        }
        if o.profile == Profile::Secure && self.s.cfg.master_key.is_none() {
            return Err(ServiceError::Invalid(format!(
                "volume {name:?}: profile=secure needs the daemon's master key; start pdguard serve with --key-file, or pass -o profile=patent"
            )));
        }
        if self.s.state.lock().await.disks.contains_key(name) {
            return Err(ServiceError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        let _held = self.volume_lock(name).await;
        let path = self
            .s
            .cfg
            .state_dir
            .join("disks")
            .join(format!("{name}.img"));
        create_file(&path, o.size, true)?;
        let (p, fs) = (path.clone(), o.fs.clone());
        let made = tokio::task::spawn_blocking(move || loopfs::mkfs(&p, &fs))
            .await
            .map_err(|e| ServiceError::Invalid(format!("mkfs panicked: {e}")))
            .and_then(|r| r.map_err(|e| volume_io(name, "make the file system", e)));
        let made = made.and_then(|()| super::adopt::identity_of(&path, o.size));
        let identity = match made {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let d = Disk {
            name: name.into(),
            id: hex::encode(rand::random::<[u8; 16]>()),
            path: path.clone(),
            size: o.size,
            sector_size: VOLUME_SECTOR_SIZE,
            state: DiskState::Available,
            dangling: false,
            managed: true,
            grace_until_ms: None,
            error: None,
            created_unix: now_ms() / 1000,
            record_expected: false,
            volume: Some(VolumeSpec {
                fs: o.fs,
                profile: o.profile,
                keep_holes: o.keep_holes && o.profile == Profile::Secure,
                grace_ms: o.grace.map(|g| g.as_millis() as u64),
                reclaim: o.reclaim,
            }),
            identity: Some(identity),
        };
        let mut st = self.s.state.lock().await;
        if st.disks.contains_key(name) {
            let _ = std::fs::remove_file(&path);
            return Err(ServiceError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        self.persist(&d)?;
        self.gate(name).set(super::GateState::Open);
        st.disks.insert(name.into(), d);
        Ok(())
    }

    fn volume_of(st: &super::State, name: &str) -> Result<Disk> {
        match st.disks.get(name) {
            Some(d) if d.volume.is_some() => Ok(d.clone()),
            Some(_) => Err(ServiceError::Invalid(format!(
                "disk {name:?} is not a Docker volume (it was made by `pdguard disk create`); pick another volume name"
            ))),
            None => Err(ServiceError::NotFound {
                kind: "disk",
                name: name.into(),
            }),
        }
    }

    /// A volume as dockerd sees it; `users` are its containers. One statx (is it mounted?),
    /// never a read of the mount table: List stays linear in the number of volumes.
    fn volume_view(&self, st: &super::State, d: &Disk, users: Vec<String>) -> VolumeView {
        let dir = self.mount_dir(&d.name);
        let mounts = st.mounts.get(&d.name).map_or(0, |m| m.ids.len());
        let mounted = loopfs::is_mountpoint(&dir).unwrap_or(false);
        let v = self.view_with(st, d, users);
        let mut status = serde_json::json!({
            "state": d.state.name(),
            "dangling": d.dangling,
            "containers": v.containers,
            "mounts": mounts,
            "size": d.size,
            "profile": d.volume.as_ref().map(|v| v.profile.name()),
            "reclaim": d.volume.as_ref().map(|v| v.reclaim.name()),
            "grace_ms": self.grace_of(d),
        });
        if let Some(e) = &d.error {
            status["error"] = e.clone().into();
        }
        if let Some(p) = &v.progress {
            status["progress"] = serde_json::json!(p);
        }
        if v.unmount_pending {
            status["unmount_pending"] = true.into();
        }
        VolumeView {
            name: d.name.clone(),
            mountpoint: mounted.then_some(dir),
            status,
        }
    }

    /// One volume (Get).
    pub async fn volume(&self, name: &str) -> Result<VolumeView> {
        let st = self.s.state.lock().await;
        let d = Self::volume_of(&st, name)?;
        Ok(self.volume_view(&st, &d, st.users(name)))
    }

    /// Every volume (List), with one pass over the containers for all of them.
    pub async fn volumes(&self) -> Vec<VolumeView> {
        let st = self.s.state.lock().await;
        let mut users = st.users_by_disk();
        st.disks
            .values()
            .filter(|d| d.volume.is_some())
            .map(|d| {
                let who = users.remove(d.name.as_str()).unwrap_or_default();
                self.volume_view(&st, d, who)
            })
            .collect()
    }

    /// Remove: dockerd calls it only when no container refers to the volume. A sealed
    /// secure volume is crypto-erased before its file is deleted; a sealed patent one has
    /// no key to erase, and is refused with what to do.
    pub async fn volume_remove(&self, name: &str) -> Result<()> {
        check_volume_name(name)?;
        let _held = self.volume_lock(name).await;
        let d = {
            let mut st = self.s.state.lock().await;
            let d = Self::volume_of(&st, name)?;
            let patent = d
                .volume
                .as_ref()
                .is_some_and(|v| v.profile == Profile::Patent);
            if patent && matches!(d.state, DiskState::Sealed | DiskState::Failed) {
                return Err(ServiceError::Invalid(format!(
                    "volume {name:?} is {} in the patent profile, which has no key to crypto-erase: unseal it first (`pdguard disk unseal {name}`) and then remove it, or forget it and keep its sealed file and record with `pdguard disk rm {name} --keep-file`",
                    d.state.name()
                )));
            }
            if st.mounts.get(name).is_some_and(|m| !m.ids.is_empty()) {
                return Err(ServiceError::Busy(format!(
                    "volume {name:?} is mounted by a container; stop it first"
                )));
            }
            // dockerd knows no container that uses it: associations left are stale.
            for c in st.containers.values_mut() {
                if c.disks.iter().any(|x| x == name) {
                    c.disks.retain(|x| x != name);
                    self.s.registry.put_container(c)?;
                }
            }
            d
        };
        let (file, dir) = (d.path.clone(), self.mount_dir(name));
        tokio::task::spawn_blocking(move || loopfs::unmount(&file, &dir))
            .await
            .map_err(|e| ServiceError::Invalid(format!("unmount panicked: {e}")))?
            .map_err(|e| volume_io(name, "unmount", e))?;
        let shred = d.state == DiskState::Sealed
            && d.volume
                .as_ref()
                .is_some_and(|v| v.profile == Profile::Secure);
        // The file is deleted outside the state lock (`remove_disk` moves it aside first).
        self.remove_disk(name, shred, false).await?;
        self.s.state.lock().await.mounts.remove(name);
        Ok(())
    }

    /// Mount: a reclaim ([030]: a sealing volume's seal is completed, then it is unsealed
    /// and its digest checked), then the file system is loop-mounted on a mountpoint
    /// pdguard made itself. Returns the mountpoint. If dockerd gives up first (its Mount
    /// times out after 120 s and drops the request), the Mount ID is forgotten and the
    /// volume unmounted again, so that it is sealed again after its grace.
    pub async fn volume_mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        check_volume_name(name)?;
        if !valid_name(id, 128) {
            return Err(ServiceError::Invalid(format!(
                "mount id {id:?} is not 1-128 letters or digits"
            )));
        }
        let held = self.volume_lock(name).await;
        let d = {
            let mut st = self.s.state.lock().await;
            let d = Self::volume_of(&st, name)?;
            let dir = self.mount_dir(name);
            if let Err(why) = ensure_mountpoint(&self.s.cfg.state_dir, &dir) {
                let why = format!("volume {name:?}: {why}");
                tracing::error!(volume = %name, "{why}");
                if let Err(e) = self.apply(&mut st, name, Event::Refused { why: why.clone() }) {
                    tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot record the refusal");
                }
                return Err(ServiceError::Invalid(why));
            }
            let m = st.mounts.entry(name.into()).or_default();
            if !m.ids.iter().any(|x| x == id) {
                m.ids.push(id.into());
            }
            m.last_mount_ms = now_ms();
            let m = m.clone();
            self.s.registry.put_mounts(name, &m)?;
            d
        };
        let undo = MountUndo {
            armed: Some((self.clone(), name.into(), id.into())),
        };
        let limit = self.s.cfg.docker_mount_timeout;
        let instant = d
            .volume
            .as_ref()
            .is_some_and(|v| v.reclaim == VolumeReclaim::Instant);
        let reclaim = async {
            match instant {
                // Claimed, served through a FUSE file, mounted: the volume is usable.
                true => self.mount_instant(name).await,
                false => self.reclaim(name).await,
            }
        };
        let reclaimed = match tokio::time::timeout(limit, reclaim).await {
            Ok(r) => r,
            // The reclaim goes on (its job never stops half-way); this Mount answers now,
            // and the life cycle decides the rest: a volume nobody mounts again by the
            // end of the unseal enters its grace period and is sealed again.
            Err(_) => Err(self.still_reclaiming(name, limit).await),
        };
        let mounted = match reclaimed {
            Ok(()) if instant => Ok(()),
            Ok(()) => {
                let (file, dir) = (d.path.clone(), self.mount_dir(name));
                tokio::task::spawn_blocking(move || loopfs::mount(&file, &dir))
                    .await
                    .map_err(|e| ServiceError::Invalid(format!("mount panicked: {e}")))
                    .and_then(|r| r.map_err(|e| volume_io(name, "mount", e)))
            }
            Err(e) => Err(e),
        };
        undo.disarm();
        if let Err(e) = mounted {
            if instant {
                // A mount over FUSE still being made when the limit struck: the retried
                // unmount waits for it, then undoes it; the volume is not sealed meanwhile.
                self.set_unmount_pending(name, true).await?;
            }
            self.forget_mount(name, id).await?;
            let mut st = self.s.state.lock().await;
            self.release(&mut st, name)?;
            return Err(e);
        }
        self.set_unmount_pending(name, false).await?;
        drop(held);
        Ok(self.mount_dir(name))
    }

    /// The answer of a Mount that waited `waited` for a reclaim still running: the volume,
    /// how far its job is, and what to do.
    async fn still_reclaiming(&self, name: &str, waited: Duration) -> ServiceError {
        let state = self.s.state.lock().await.disks.get(name).map(|d| d.state);
        let progress = lock(&self.s.progress).get(name).cloned();
        let waited = crate::units::millis(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
        let e = ServiceError::StillReclaiming {
            volume: name.into(),
            how_far: how_far(state, progress.as_ref(), &waited),
        };
        tracing::warn!(volume = %name, "{e}");
        e
    }

    /// Drop one Mount ID; returns how many are left.
    async fn forget_mount(&self, name: &str, id: &str) -> Result<usize> {
        let mut st = self.s.state.lock().await;
        let left = match st.mounts.get_mut(name) {
            Some(m) => {
                m.ids.retain(|x| x != id);
                let m = m.clone();
                self.s.registry.put_mounts(name, &m)?;
                if m.ids.is_empty() && !m.unmount_pending {
                    st.mounts.remove(name);
                }
                m.ids.len()
            }
            None => 0,
        };
        Ok(left)
    }

    async fn set_unmount_pending(&self, name: &str, pending: bool) -> Result<()> {
        let mut st = self.s.state.lock().await;
        let m = st.mounts.entry(name.into()).or_default();
        if m.unmount_pending == pending {
            if m.ids.is_empty() && !m.unmount_pending {
                st.mounts.remove(name);
            }
            return Ok(());
        }
        m.unmount_pending = pending;
        let m = m.clone();
        self.s.registry.put_mounts(name, &m)?;
        if m.ids.is_empty() && !m.unmount_pending {
            st.mounts.remove(name);
        }
        Ok(())
    }

    /// Unmount a volume and detach its loop device (the caller holds its lock and has
    /// forgotten its Mount IDs). When the kernel refuses (a process has its working
    /// directory in it), the unmount is kept as pending, durably, and retried until the
    /// kernel lets go; the volume is never sealed meanwhile. Returns true once free.
    async fn unmount_now(&self, name: &str, file: PathBuf) -> Result<bool> {
        let dir = self.mount_dir(name);
        let r = match self.unmount_instant(name).await {
            Some(r) => r,
            None => tokio::task::spawn_blocking(move || loopfs::unmount(&file, &dir))
                .await
                .map_err(|e| ServiceError::Invalid(format!("unmount panicked: {e}")))?,
        };
        let was = self
            .s
            .state
            .lock()
            .await
            .mounts
            .get(name)
            .is_some_and(|m| m.unmount_pending);
        match r {
            Ok(()) => {
                if was {
                    tracing::info!(volume = %name, "the kernel let go of the volume; unmounted");
                }
                self.set_unmount_pending(name, false).await?;
                Ok(true)
            }
            Err(e) => {
                if !was {
                    tracing::warn!(volume = %name, error = %crate::error_chain(&e), "cannot unmount the volume yet; retrying every second, and not sealing it meanwhile");
                }
                self.set_unmount_pending(name, true).await?;
                Ok(false)
            }
        }
    }

    /// Unmount: the last one unmounts the file system and detaches its loop device (or,
    /// if the kernel still holds it, leaves the unmount pending and retried). What happens
    /// to the volume then is the containers' business (their events).
    pub async fn volume_unmount(&self, name: &str, id: &str) -> Result<()> {
        check_volume_name(name)?;
        let _held = self.volume_lock(name).await;
        let d = Self::volume_of(&*self.s.state.lock().await, name)?;
        if self.forget_mount(name, id).await? > 0 {
            return Ok(());
        }
        self.unmount_now(name, d.path.clone()).await.map(drop)
    }

    /// Mounts of `name` older than [`STALE_AFTER_MS`] that no container of dockerd can hold
    /// any more: forget them and unmount (pending if the kernel refuses). Returns true if
    /// it unmounted.
    pub(super) async fn drop_stale_mounts(&self, name: &str) -> Result<bool> {
        if !valid_name(name, MAX_VOLUME_NAME) {
            return Ok(false);
        }
        let _held = self.volume_lock(name).await;
        let d = {
            let mut st = self.s.state.lock().await;
            let Some(m) = st.mounts.get_mut(name) else {
                return Ok(false);
            };
            if m.ids.is_empty() || now_ms().saturating_sub(m.last_mount_ms) < STALE_AFTER_MS {
                return Ok(false);
            }
            m.ids.clear();
            let m = m.clone();
            self.s.registry.put_mounts(name, &m)?;
            if !m.unmount_pending {
                st.mounts.remove(name);
            }
            Self::volume_of(&st, name)?
        };
        tracing::info!(volume = %name, "no container of dockerd holds the volume any more; unmounting it");
        let free = self.unmount_now(name, d.path.clone()).await?;
        let mut st = self.s.state.lock().await;
        self.release(&mut st, name)?;
        Ok(free)
    }

    /// Try again every unmount the kernel refused; a volume it lets go of enters its grace
    /// period if nothing uses it (and is sealed after it).
    pub(super) async fn retry_unmounts(&self) {
        let pending: Vec<(String, PathBuf)> = {
            let st = self.s.state.lock().await;
            st.mounts
                .iter()
                .filter(|(_, m)| m.unmount_pending && m.ids.is_empty())
                .filter_map(|(n, _)| st.disks.get(n).map(|d| (n.clone(), d.path.clone())))
                .collect()
        };
        for (name, file) in pending {
            // A Mount or an Unmount of it in flight: it decides.
            let Some(_held) = self.try_volume_lock(&name) else {
                continue;
            };
            match self.unmount_now(&name, file).await {
                Ok(true) => {
                    let mut st = self.s.state.lock().await;
                    if let Err(e) = self.release(&mut st, &name) {
                        tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot start the grace period");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot retry the unmount")
                }
            }
        }
    }

    /// What the daemon knows of dockerd, for `pdguard status` (None: `--docker` is off).
    pub fn docker_status(&self) -> Option<DockerStatus> {
        lock(&self.s.volumes.docker).clone()
    }

    pub(super) fn set_docker_status(&self, f: impl FnOnce(&mut DockerStatus)) {
        let mut g = lock(&self.s.volumes.docker);
        f(g.get_or_insert_with(DockerStatus::default));
    }
}

/// How far a reclaim is after `waited`, in a few words: `the unseal is still running after
/// 3 s (12.5 MiB of 64.0 MiB unsealed, 19 %)`. An unseal moves every byte twice (pass
/// scatter, then gather); the bytes unsealed are the share of both passes done, over the
/// volume's size.
pub(super) fn how_far(
    state: Option<DiskState>,
    p: Option<&super::JobProgress>,
    waited: &str,
) -> String {
    match p {
        Some(p) if p.job == "unseal" => {
            let total = p.total_bytes.max(1);
            let before = if p.pass == "gather" { total } else { 0 };
            let done = before.saturating_add(p.done_bytes.min(total)) / 2;
            format!(
                "the unseal is still running after {waited} ({} of {} unsealed, {} %; a volume created with `-o reclaim=instant` is served at once instead)",
                size_text(done, total),
                size_text(total, total),
                done.saturating_mul(100) / total
            )
        }
        // An instant reclaim: served at once, but its file system was not mounted in time
        // (the first reads wait for the regions they need to be moved).
        Some(p) if p.job == super::JobKind::Migrate.name() => format!(
            "after {waited}, the volume is served through its migration but its file system is not mounted yet (pass {}: {} of {})",
            p.pass,
            size_text(p.done_bytes, p.total_bytes),
            size_text(p.total_bytes, p.total_bytes)
        ),
        Some(p) => format!(
            "after {waited}, a seal in flight is still being completed before the unseal (pass {}: {} of {})",
            p.pass,
            size_text(p.done_bytes, p.total_bytes),
            size_text(p.total_bytes, p.total_bytes)
        ),
        None if state == Some(DiskState::Sealing) => {
            format!("after {waited}, a seal in flight is still being completed before the unseal")
        }
        None => format!(
            "after {waited}, the unseal is still waiting for its turn in the job queue (`pdguard status` shows it)"
        ),
    }
}

/// `n` in the unit that suits `scale` (MiB below a GiB, else GiB), one decimal.
fn size_text(n: u64, scale: u64) -> String {
    let (div, unit) = if scale >= 1 << 30 {
        ((1u64 << 30) as f64, "GiB")
    } else {
        ((1u64 << 20) as f64, "MiB")
    };
    format!("{:.1} {unit}", n as f64 / div)
}

/// Refuse a volume name before anything is allocated or locked for it.
fn check_volume_name(name: &str) -> Result<()> {
    if valid_name(name, MAX_VOLUME_NAME) {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    let more = if name.len() > shown.len() { "…" } else { "" };
    Err(ServiceError::Invalid(format!(
        "volume name {shown:?}{more} ({} bytes) is not 1-{MAX_VOLUME_NAME} letters, digits, '.', '_' or '-' starting with a letter or digit; no such volume",
        name.len()
    )))
}

/// One volume's lock; the map entry goes when the last holder lets go, so unknown names
/// leave nothing behind.
pub(super) struct VolumeLock {
    guard: Option<OwnedMutexGuard<()>>,
    map: Arc<StdMutex<HashMap<String, Arc<Mutex<()>>>>>,
    name: String,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        drop(self.guard.take());
        // Two references: the map's and the one our guard held until now (gone) — so
        // one left means nobody else holds or waits for it.
        if map
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.name);
        }
    }
}

/// Undoes a Mount whose caller (dockerd) gave up before it ended: its ID is forgotten and,
/// if it was the last, the volume unmounted and its grace started, on a task of its own.
struct MountUndo {
    armed: Option<(Service, String, String)>,
}

impl MountUndo {
    fn disarm(mut self) {
        self.armed = None;
    }
}

impl Drop for MountUndo {
    fn drop(&mut self) {
        let Some((svc, name, id)) = self.armed.take() else {
            return;
        };
        tracing::warn!(volume = %name, "dockerd gave up on the Mount before it ended; undoing it");
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _held = svc.volume_lock(&name).await;
            let r = async {
                if svc.forget_mount(&name, &id).await? == 0 {
                    let file = Service::volume_of(&*svc.s.state.lock().await, &name)?.path;
                    svc.unmount_now(&name, file).await?;
                }
                let mut st = svc.s.state.lock().await;
                svc.release(&mut st, &name)
            };
            if let Err(e) = r.await {
                tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot undo the abandoned Mount");
            }
        });
    }
}

/// Make (or check) `STATE/mounts` and `STATE/mounts/NAME`: real directories pdguard's user
/// owns, never a symlink or anything else planted there (root would mount the volume on
/// wherever it points).
fn ensure_mountpoint(state: &Path, dir: &Path) -> std::result::Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    for p in [state.join("mounts").as_path(), dir] {
        match std::fs::DirBuilder::new().mode(0o700).create(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create the mountpoint {}: {e}", p.display())),
        }
        let m = std::fs::symlink_metadata(p)
            .map_err(|e| format!("cannot read the mountpoint {}: {e}", p.display()))?;
        let what = if m.file_type().is_symlink() {
            "a symbolic link"
        } else if !m.is_dir() {
            "not a directory"
        } else if m.uid() != me {
            "owned by another user"
        } else {
            continue;
        };
        return Err(format!(
            "the mountpoint {} is {what}, and pdguard mounts volumes only on directories it made itself; remove it (`rm {}`) and mount again",
            p.display(),
            p.display()
        ));
    }
    Ok(())
}

pub(super) fn volume_io(name: &str, what: &str, e: loopfs::LoopFsError) -> ServiceError {
    ServiceError::Invalid(format!(
        "volume {name:?}: cannot {what}: {}",
        crate::error_chain(&e)
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_parse_with_defaults() {
        let o = VolumeOptions::parse(&opts(&[("size", "10G")]), Profile::Secure).unwrap();
        assert_eq!(o.size, 10 << 30);
        assert_eq!(o.fs, "ext4");
        assert_eq!(o.profile, Profile::Secure);
        assert!(o.keep_holes);
        assert_eq!(o.grace, None);
        assert_eq!(o.reclaim, VolumeReclaim::Copy);
        let o = VolumeOptions::parse(
            &opts(&[
                ("size", "64MiB"),
                ("profile", "patent"),
                ("grace", "1500ms"),
                ("keep_holes", "false"),
                ("fs", "ext4"),
                ("reclaim", "instant"),
            ]),
            Profile::Secure,
        )
        .unwrap();
        assert_eq!(o.size, 64 << 20);
        assert_eq!(o.profile, Profile::Patent);
        assert_eq!(o.grace, Some(Duration::from_millis(1500)));
        assert!(!o.keep_holes);
        assert_eq!(o.reclaim, VolumeReclaim::Instant);
        let o = VolumeOptions::parse(
            &opts(&[("size", "8M"), ("reclaim", "copy")]),
            Profile::Secure,
        );
        assert_eq!(o.map(|o| o.reclaim), Ok(VolumeReclaim::Copy));
    }

    #[test]
    fn bad_options_are_named() {
        let p = Profile::Secure;
        assert_eq!(
            VolumeOptions::parse(&opts(&[]), p),
            Err(VolumeError::NoSize)
        );
        let e = VolumeOptions::parse(&opts(&[("size", "1G"), ("colour", "red")]), p);
        assert_eq!(e, Err(VolumeError::Unknown("colour".into())));
        for (k, v) in [
            ("size", "ten"),
            ("size", "10X"),
            ("size", "512"),
            ("size", "1048577"),
            ("size", "99999999999T"),
            ("fs", "xfs"),
            ("profile", "weak"),
            ("grace", "soon"),
            ("grace", "5d"),
            ("grace", "18446744073709551615ms"),
            ("grace", "3650001h"),
            ("keep_holes", "yes"),
            ("reclaim", "lazy"),
            ("reclaim", "Instant"),
        ] {
            let e = VolumeOptions::parse(&opts(&[("size", "8M"), (k, v)]), p).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(k) && text.contains(v), "{k}={v}: {text}");
        }
    }
}
