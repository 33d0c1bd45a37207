//! What the Docker volume plugin's requests mean (DESIGN.md §4): a volume is a disk of the
//! same name holding a file system; a Mount is a reclaim ([030]) followed by a loop mount; an
//! Unmount at count 0 unmounts it; dockerd's Mount IDs are persisted, so a restarted daemon
//! keeps working mounts. The plugin's HTTP and Docker's JSON stay in the front-end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use pdguard_core::Profile;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::Mutex;

use super::docker::DockerStatus;
use super::{create_file, lock, now_ms, valid_name, Result, Service, ServiceError};
use crate::registry::{Disk, DiskState, VolumeMounts, VolumeSpec};
use crate::store::loopfs;

/// Sector size of volumes: the file systems on them write whole 4 KiB blocks.
pub const VOLUME_SECTOR_SIZE: u32 = 4096;
/// A volume smaller than this cannot hold an ext4 file system worth having.
const MIN_VOLUME_SIZE: u64 = 1 << 20;
/// A mount younger than this is never taken for stale by a resync: dockerd may not list
/// the container that asked for it yet.
const STALE_AFTER_MS: u64 = 5_000;

/// Bad `docker volume create -o` options.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("option size is required, e.g. -o size=10G")]
    NoSize,
    #[error("unknown option {0:?} for a pdguard volume; known options: size, fs, profile, grace, keep_holes")]
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
}

impl VolumeOptions {
    /// Parse `size` (required), `fs`, `profile`, `grace`, `keep_holes`; anything else is
    /// refused by name.
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
    ms.map(Duration::from_millis)
        .ok_or_else(|| "too long".to_string())
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
    locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    pub(super) docker: StdMutex<Option<DockerStatus>>,
    /// Disks the kernel held at the last look (warned about once, not every second).
    held: StdMutex<HashSet<String>>,
}

impl Service {
    /// Where a volume's file system is mounted: `STATE/mounts/NAME`.
    pub fn mount_dir(&self, name: &str) -> PathBuf {
        self.s.cfg.state_dir.join("mounts").join(name)
    }

    /// The grace period of a disk: its volume's own, else the daemon's.
    pub(super) fn grace_of(&self, d: &Disk) -> u64 {
        d.volume
            .as_ref()
            .and_then(|v| v.grace_ms)
            .unwrap_or(self.s.cfg.grace.as_millis() as u64)
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

    fn volume_lock(&self, name: &str) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.s.volumes.locks).entry(name.into()).or_default())
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
        let guard = self.volume_lock(name);
        let _held = guard.lock().await;
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

    fn volume_view(&self, st: &super::State, d: &Disk) -> VolumeView {
        let dir = self.mount_dir(&d.name);
        let mounts = st.mounts.get(&d.name).map_or(0, |m| m.ids.len());
        let mounted = loopfs::is_mountpoint(&dir).unwrap_or(false);
        let v = self.view(st, d);
        let mut status = serde_json::json!({
            "state": d.state.name(),
            "dangling": d.dangling,
            "containers": v.containers,
            "mounts": mounts,
            "size": d.size,
            "profile": d.volume.as_ref().map(|v| v.profile.name()),
            "grace_ms": self.grace_of(d),
        });
        if let Some(e) = &d.error {
            status["error"] = e.clone().into();
        }
        if let Some(p) = &v.progress {
            status["progress"] = serde_json::json!(p);
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
        Ok(self.volume_view(&st, &d))
    }

    /// Every volume (List).
    pub async fn volumes(&self) -> Vec<VolumeView> {
        let st = self.s.state.lock().await;
        st.disks
            .values()
            .filter(|d| d.volume.is_some())
            .map(|d| self.volume_view(&st, d))
            .collect()
    }

    /// Remove: dockerd calls it only when no container refers to the volume. A sealed
    /// secure volume is crypto-erased before its file is deleted.
    pub async fn volume_remove(&self, name: &str) -> Result<()> {
        let guard = self.volume_lock(name);
        let _held = guard.lock().await;
        let d = {
            let mut st = self.s.state.lock().await;
            let d = Self::volume_of(&st, name)?;
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
        lock(&self.s.volumes.locks).remove(name);
        Ok(())
    }

    /// Mount: a reclaim ([030]: a sealing volume's seal is completed, then it is unsealed
    /// and its digest checked), then the file system is loop-mounted. Returns the mountpoint.
    pub async fn volume_mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        if !valid_name(id, 128) {
            return Err(ServiceError::Invalid(format!(
                "mount id {id:?} is not 1-128 letters or digits"
            )));
        }
        let guard = self.volume_lock(name);
        let _held = guard.lock().await;
        let d = {
            let mut st = self.s.state.lock().await;
            let d = Self::volume_of(&st, name)?;
            let m = st.mounts.entry(name.into()).or_default();
            if !m.ids.iter().any(|x| x == id) {
                m.ids.push(id.into());
            }
            m.last_mount_ms = now_ms();
            let m = m.clone();
            self.s.registry.put_mounts(name, &m)?;
            d
        };
        let mounted = match self.reclaim(name).await {
            Ok(()) => {
                let (file, dir) = (d.path.clone(), self.mount_dir(name));
                tokio::task::spawn_blocking(move || loopfs::mount(&file, &dir))
                    .await
                    .map_err(|e| ServiceError::Invalid(format!("mount panicked: {e}")))
                    .and_then(|r| r.map_err(|e| volume_io(name, "mount", e)))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = mounted {
            self.forget_mount(name, id).await?;
            return Err(e);
        }
        Ok(self.mount_dir(name))
    }

    /// Drop one Mount ID; returns how many are left.
    async fn forget_mount(&self, name: &str, id: &str) -> Result<usize> {
        let mut st = self.s.state.lock().await;
        let left = match st.mounts.get_mut(name) {
            Some(m) => {
                m.ids.retain(|x| x != id);
                let m = m.clone();
                self.s.registry.put_mounts(name, &m)?;
                m.ids.len()
            }
            None => 0,
        };
        if left == 0 {
            st.mounts.remove(name);
        }
        Ok(left)
    }

    /// Unmount: the last one unmounts the file system and detaches its loop device. What
    /// happens to the volume then is the containers' business (their events).
    pub async fn volume_unmount(&self, name: &str, id: &str) -> Result<()> {
        let guard = self.volume_lock(name);
        let _held = guard.lock().await;
        let d = Self::volume_of(&*self.s.state.lock().await, name)?;
        if self.forget_mount(name, id).await? > 0 {
            return Ok(());
        }
        let (file, dir) = (d.path.clone(), self.mount_dir(name));
        tokio::task::spawn_blocking(move || loopfs::unmount(&file, &dir))
            .await
            .map_err(|e| ServiceError::Invalid(format!("unmount panicked: {e}")))?
            .map_err(|e| volume_io(name, "unmount", e))
    }

    /// Mounts of `name` older than [`STALE_AFTER_MS`] that no container of dockerd can hold
    /// any more: forget them and unmount. Returns true if it unmounted.
    pub(super) async fn drop_stale_mounts(&self, name: &str) -> Result<bool> {
        let guard = self.volume_lock(name);
        let _held = guard.lock().await;
        let d = {
            let mut st = self.s.state.lock().await;
            let Some(m) = st.mounts.get(name) else {
                return Ok(false);
            };
            if now_ms().saturating_sub(m.last_mount_ms) < STALE_AFTER_MS {
                return Ok(false);
            }
            self.s.registry.put_mounts(name, &VolumeMounts::default())?;
            st.mounts.remove(name);
            Self::volume_of(&st, name)?
        };
        tracing::info!(volume = %name, "no container of dockerd holds the volume any more; unmounting it");
        let (file, dir) = (d.path.clone(), self.mount_dir(name));
        tokio::task::spawn_blocking(move || loopfs::unmount(&file, &dir))
            .await
            .map_err(|e| ServiceError::Invalid(format!("unmount panicked: {e}")))?
            .map_err(|e| volume_io(name, "unmount", e))?;
        Ok(true)
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

fn volume_io(name: &str, what: &str, e: loopfs::LoopFsError) -> ServiceError {
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
        let o = VolumeOptions::parse(
            &opts(&[
                ("size", "64MiB"),
                ("profile", "patent"),
                ("grace", "1500ms"),
                ("keep_holes", "false"),
                ("fs", "ext4"),
            ]),
            Profile::Secure,
        )
        .unwrap();
        assert_eq!(o.size, 64 << 20);
        assert_eq!(o.profile, Profile::Patent);
        assert_eq!(o.grace, Some(Duration::from_millis(1500)));
        assert!(!o.keep_holes);
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
            ("keep_holes", "yes"),
        ] {
            let e = VolumeOptions::parse(&opts(&[("size", "8M"), (k, v)]), p).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(k) && text.contains(v), "{k}={v}: {text}");
        }
    }
}
