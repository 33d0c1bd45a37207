//! The registry: disks, containers and their associations, with the patent's dangling
//! flag ([031]: "the dangling flag status at initiation may be set as FALSE"), kept in an
//! embedded crash-safe database (redb: copy-on-write B-trees, each commit durable).
//!
//! Every change is one write transaction, so a crash leaves the registry as it was before
//! or after the change, never between.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const DISKS: TableDefinition<&str, &[u8]> = TableDefinition::new("disks");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
/// Docker volume mounts: volume name -> [`VolumeMounts`] (the plugin's Mount IDs).
const MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("volume_mounts");

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("cannot open the registry database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("registry database error: {0}")]
    Db(String),
    #[error("registry entry {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                Self::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A disk's place in its life cycle (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Never attached.
    Available,
    /// At least one operational container uses it.
    Attached,
    /// No operational container any more; the grace period runs.
    Grace,
    Sealing,
    Sealed,
    Unsealing,
    /// A job failed; `error` says why. The seal record still says where the data is.
    Failed,
    /// Served through the migration of an instant reclaim, which unseals it meanwhile.
    Migrating,
}

impl DiskState {
    pub const ALL: [DiskState; 8] = [
        Self::Available,
        Self::Attached,
        Self::Grace,
        Self::Sealing,
        Self::Sealed,
        Self::Unsealing,
        Self::Failed,
        Self::Migrating,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Attached => "attached",
            Self::Grace => "grace",
            Self::Sealing => "sealing",
            Self::Sealed => "sealed",
            Self::Unsealing => "unsealing",
            Self::Failed => "failed",
            Self::Migrating => "migrating",
        }
    }
}

/// A persistent disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    /// Random 128-bit hex identifier.
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    pub sector_size: u32,
    pub state: DiskState,
    /// The patent's dangling flag: TRUE once every associated container has been
    /// non-operational for the grace period (claim 6).
    pub dangling: bool,
    /// The file lives in the state directory and is deleted with the disk.
    pub managed: bool,
    /// Unix milliseconds at which the grace period ends (state `grace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until_ms: Option<u64>,
    /// Why the last job failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_unix: u64,
    /// A seal record should exist beside the disk's file: set (durably) before pdguard
    /// writes one, cleared before it removes one. So a missing record is told apart: the
    /// unseal finished (clear), or the record was lost (set; the file holds sealed data
    /// and the disk is `failed`, never served as plaintext). Entries written before this
    /// field existed read as set, the safe side.
    #[serde(default = "record_expected_default")]
    pub record_expected: bool,
    /// Set when the disk is a Docker volume made by the volume plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeSpec>,
    /// What the disk's file is (device, inode, size, birth time), recorded when it was made or adopted:
    /// every job opens `path` without following a symbolic link and refuses a file whose
    /// `fstat` differs (the disk turns `failed`). `None` only in an entry written before
    /// this field existed, until the next start records it ([`crate::store::safe_open`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::store::FileIdentity>,
}

fn record_expected_default() -> bool {
    true
}

/// How a Docker volume was made and is sealed (`docker volume create -o ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The file system made on the disk (`ext4`).
    pub fs: String,
    /// Profile of its seals.
    pub profile: pdguard_core::Profile,
    /// Secure profile: sectors of zeros stay holes (the volume is a sparse file).
    pub keep_holes: bool,
    /// Its own grace period, instead of the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// How a Mount of it reclaims it when it is sealed (`-o reclaim=`; absent in entries
    /// written before the option: `copy`).
    #[serde(default, skip_serializing_if = "VolumeReclaim::is_copy")]
    pub reclaim: VolumeReclaim,
}

/// How a Mount reclaims a sealed volume (docs/instant-reclaim.md §8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeReclaim {
    /// The whole unseal first, then the loop mount of the plain file.
    #[default]
    Copy,
    /// The file system at once, on a loop device over a FUSE file served by pdguard while
    /// the migration moves the data behind it.
    Instant,
}

impl VolumeReclaim {
    pub fn is_copy(&self) -> bool {
        *self == Self::Copy
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Instant => "instant",
        }
    }
}

/// The live mounts of a Docker volume: dockerd's Mount IDs not yet unmounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMounts {
    pub ids: Vec<String>,
    /// Unix milliseconds of the last Mount.
    pub last_mount_ms: u64,
    /// The last unmount failed (the kernel still held the file system, e.g. a process had
    /// its working directory in it): retried until the kernel lets go, and the volume is
    /// never sealed meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unmount_pending: bool,
}

/// Where an association came from: only dockerd's are reconciled with dockerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// `pdguard container up` (the admin API).
    Api,
    /// dockerd: a Mount, its events, a resync.
    Docker,
    /// An NBD connection in transmission.
    Nbd,
}

/// A container's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerState {
    Running,
    Stopped,
    Crashed,
    Removed,
}

impl ContainerState {
    /// Claim 6 / [028]: deleted, crashed or corrupt containers are non-operational. A
    /// container stopped on purpose is not, unless the daemon runs with `--seal-stopped`.
    pub fn operational(self, seal_stopped: bool) -> bool {
        match self {
            Self::Running => true,
            Self::Stopped => !seal_stopped,
            Self::Crashed | Self::Removed => false,
        }
    }
}

/// A container and the disks associated with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub state: ContainerState,
    /// Unix milliseconds of the last state change.
    pub since_ms: u64,
    /// Names of associated disks. A removed container has none ([028]: its association is
    /// dropped at once).
    pub disks: Vec<String>,
    /// Who made it; entries written before this field existed: see [`Container::origin`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

impl Container {
    /// Who made the container. Entries older than the field are told by their id: `nbd:…`
    /// is an NBD connection, 64 hex digits a dockerd container, anything else the API.
    pub fn origin(&self) -> Origin {
        self.origin.unwrap_or_else(|| {
            if self.id.starts_with("nbd:") {
                Origin::Nbd
            } else if self.id.len() == 64 && self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
                Origin::Docker
            } else {
                Origin::Api
            }
        })
    }
}

/// The registry database.
pub struct Registry {
    db: Database,
    path: PathBuf,
}

impl Registry {
    /// Open or create the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(|source| RegistryError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write()?;
        tx.open_table(DISKS)?;
        tx.open_table(CONTAINERS)?;
        tx.open_table(MOUNTS)?;
        tx.commit()?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn disks(&self) -> Result<Vec<Disk>, RegistryError> {
        self.all(DISKS)
    }

    pub fn containers(&self) -> Result<Vec<Container>, RegistryError> {
        self.all(CONTAINERS)
    }

    pub fn put_disk(&self, d: &Disk) -> Result<(), RegistryError> {
        self.put(DISKS, &d.name, d)
    }

    pub fn put_container(&self, c: &Container) -> Result<(), RegistryError> {
        self.put(CONTAINERS, &c.id, c)
    }

    pub fn remove_disk(&self, name: &str) -> Result<(), RegistryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(DISKS)?.remove(name)?;
        tx.open_table(MOUNTS)?.remove(name)?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), RegistryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(CONTAINERS)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Every volume's live mounts, by volume name.
    pub fn mounts(&self) -> Result<Vec<(String, VolumeMounts)>, RegistryError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MOUNTS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let m = serde_json::from_slice(v.value()).map_err(|e| RegistryError::Corrupt {
                key: k.value().to_string(),
                why: e.to_string(),
            })?;
            out.push((k.value().to_string(), m));
        }
        Ok(out)
    }

    /// Record a volume's live mounts (none: the entry is removed).
    pub fn put_mounts(&self, volume: &str, m: &VolumeMounts) -> Result<(), RegistryError> {
        if m.ids.is_empty() && !m.unmount_pending {
            let tx = self.db.begin_write()?;
            tx.open_table(MOUNTS)?.remove(volume)?;
            tx.commit()?;
            return Ok(());
        }
        self.put(MOUNTS, volume, m)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(value).map_err(|e| RegistryError::Db(e.to_string()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(table)?.insert(key, bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, RegistryError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let item = serde_json::from_slice(v.value()).map_err(|e| RegistryError::Corrupt {
                key: k.value().to_string(),
                why: e.to_string(),
            })?;
            out.push(item);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn disk(name: &str) -> Disk {
        Disk {
            name: name.into(),
            id: "00".repeat(16),
            path: PathBuf::from(format!("/tmp/{name}.img")),
            size: 4096,
            sector_size: 512,
            state: DiskState::Available,
            dangling: false,
            managed: true,
            grace_until_ms: None,
            error: None,
            created_unix: 1,
            record_expected: false,
            volume: None,
            identity: None,
        }
    }

    /// An entry written before `identity` existed reads as `None`; one with it keeps it.
    #[test]
    fn the_file_identity_is_kept_and_old_entries_read_without_it() {
        let old = br#"{"name":"a","id":"00","path":"/x/a.img","size":4096,"sector_size":512,"state":"sealed","dangling":true,"managed":false,"created_unix":1,"record_expected":true}"#;
        let d: Disk = serde_json::from_slice(old).unwrap();
        assert_eq!(d.identity, None);
        let mut d = disk("b");
        d.identity = Some(crate::store::FileIdentity {
            dev: 2049,
            ino: 77,
            size: 4096,
            born_ns: 1_796_424_469_221_082_151,
        });
        let back: Disk = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn entries_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registry.redb");
        {
            let r = Registry::open(&p).unwrap();
            r.put_disk(&disk("a")).unwrap();
            let mut b = disk("b");
            b.dangling = true;
            b.state = DiskState::Sealed;
            r.put_disk(&b).unwrap();
            r.put_container(&Container {
                id: "c1".into(),
                state: ContainerState::Running,
                since_ms: 5,
                disks: vec!["a".into()],
                origin: None,
            })
            .unwrap();
            r.remove_disk("a").unwrap();
        }
        let r = Registry::open(&p).unwrap();
        let disks = r.disks().unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].state, DiskState::Sealed);
        assert!(disks[0].dangling);
        assert_eq!(r.containers().unwrap()[0].disks, vec!["a".to_string()]);
    }

    #[test]
    fn volume_mounts_survive_reopening_and_go_with_their_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registry.redb");
        let m = VolumeMounts {
            ids: vec!["a1".into(), "b2".into()],
            last_mount_ms: 7,
            unmount_pending: false,
        };
        {
            let r = Registry::open(&p).unwrap();
            r.put_disk(&disk("v")).unwrap();
            r.put_mounts("v", &m).unwrap();
            r.put_mounts("w", &m).unwrap();
            r.put_mounts("w", &VolumeMounts::default()).unwrap();
            let pending = VolumeMounts {
                unmount_pending: true,
                ..VolumeMounts::default()
            };
            r.put_mounts("p", &pending).unwrap();
            r.put_mounts("p", &VolumeMounts::default()).unwrap();
        }
        let r = Registry::open(&p).unwrap();
        assert_eq!(r.mounts().unwrap(), vec![("v".to_string(), m)]);
        r.remove_disk("v").unwrap();
        assert!(r.mounts().unwrap().is_empty());
    }

    #[test]
    fn old_containers_get_their_origin_from_their_id() {
        let old = |id: &str| -> Container {
            serde_json::from_str(&format!(
                r#"{{"id":"{id}","state":"running","since_ms":1,"disks":["a"]}}"#
            ))
            .unwrap()
        };
        assert_eq!(old("nbd:unix:pid9:1").origin(), Origin::Nbd);
        assert_eq!(old(&"ab12".repeat(16)).origin(), Origin::Docker);
        assert_eq!(old("web-1").origin(), Origin::Api);
        let mut c = old("web-1");
        c.origin = Some(Origin::Docker);
        assert_eq!(c.origin(), Origin::Docker);
    }

    #[test]
    fn a_stopped_container_is_operational_unless_seal_stopped() {
        assert!(ContainerState::Running.operational(true));
        assert!(ContainerState::Stopped.operational(false));
        assert!(!ContainerState::Stopped.operational(true));
        assert!(!ContainerState::Crashed.operational(false));
        assert!(!ContainerState::Removed.operational(false));
    }
}
