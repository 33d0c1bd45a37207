//! An in-memory [`Storage`] for crash and fault tests.
//!
//! Every operation (read, write, fsync, record write, thin-disk create or delete) counts as
//! one step. A test may arm a [`Fault`] at step `k`: a simulated power loss (that operation
//! and every later one fails), or a single EIO or ENOSPC. [`SimStorage::power_loss`] then
//! gives the state a reboot would find: every write that was fsynced, plus a random subset
//! of those that were not — exactly what a real disk may keep after losing power.
//! Record writes and file creates or deletes are atomic and durable, as `ImageStorage`
//! makes them with fsync of the file and of its directory.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;

use super::{
    check_seal_id, DataMap, Disk, ImageLock, LockMode, MigrationFile, Result, Storage, StoreError,
};

/// The sim reports holes by content: any 4 KiB block of zeros, as a file system would after
/// `fallocate(PUNCH_HOLE)` of every zero block. Sound: a reported hole reads as zeros.
const HOLE_GRAIN: usize = 4096;

/// What goes wrong at the armed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Power loss: this and every later operation fails; unsynced writes may be lost.
    Crash,
    /// One EIO.
    Eio,
    /// One ENOSPC.
    NoSpace,
}

#[derive(Debug, Clone, Default)]
struct MemFile {
    /// What a reader sees now.
    data: Vec<u8>,
    /// What survives a power loss for sure.
    durable: Vec<u8>,
    /// Writes since the last fsync, in order.
    pending: Vec<(usize, Vec<u8>)>,
}

impl MemFile {
    fn new(data: Vec<u8>) -> Self {
        Self {
            durable: data.clone(),
            data,
            pending: Vec::new(),
        }
    }

    fn after_power_loss(&self, rng: &mut impl Rng) -> Self {
        let mut data = self.durable.clone();
        for (off, bytes) in &self.pending {
            if rng.gen_bool(0.5) {
                data[*off..*off + bytes.len()].copy_from_slice(bytes);
            }
        }
        Self::new(data)
    }
}

#[derive(Debug, Default)]
struct Inner {
    image: MemFile,
    thins: HashMap<String, MemFile>,
    record: Option<Vec<u8>>,
    /// The key slot; every write to it is fsynced, as `ImageStorage` makes it.
    slot: Option<Vec<u8>>,
    /// The region digest tree; every write to it is fsynced, as `ImageStorage` makes it.
    tree: Option<Vec<u8>>,
    /// The placement table; every write to it is fsynced, as `ImageStorage` makes it.
    place: Option<Vec<u8>>,
    steps: u64,
    fault: Option<(u64, Fault)>,
    dead: bool,
    free: u64,
    /// Bytes read and written through disks (image and thin disks), for tests of sparseness.
    read_bytes: u64,
    written_bytes: u64,
    /// Bytes written to the image alone.
    image_written_bytes: u64,
    /// The image lock: held exclusively, or by this many shared holders. Not a step: a
    /// lock is not I/O, and it does not survive a power loss.
    exclusive: bool,
    shared: usize,
}

impl Inner {
    /// Count one step; fail it if a fault is armed here.
    fn step(&mut self, what: &str) -> Result<()> {
        if self.dead {
            return Err(StoreError::Crashed);
        }
        self.steps += 1;
        match self.fault {
            Some((at, kind)) if at == self.steps => {
                self.fault = None;
                match kind {
                    Fault::Crash => {
                        self.dead = true;
                        Err(StoreError::Crashed)
                    }
                    Fault::Eio => Err(StoreError::io(
                        "access",
                        what.to_string(),
                        io::Error::from_raw_os_error(5),
                    )),
                    Fault::NoSpace => Err(StoreError::io(
                        "write",
                        what.to_string(),
                        io::Error::from_raw_os_error(28),
                    )),
                }
            }
            _ => Ok(()),
        }
    }

    fn file(&mut self, which: &Which) -> Option<&mut MemFile> {
        match which {
            Which::Image => Some(&mut self.image),
            Which::Thin(p) => self.thins.get_mut(p),
        }
    }
}

#[derive(Debug, Clone)]
enum Which {
    Image,
    Thin(String),
}

/// In-memory storage with a step counter, an armed fault and power-loss snapshots.
#[derive(Debug, Clone)]
pub struct SimStorage {
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock is a test failure already; keep going to report it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimStorage {
    /// A storage whose image holds `image`, with no record and ample free space.
    pub fn new(image: Vec<u8>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                image: MemFile::new(image),
                free: u64::MAX,
                ..Inner::default()
            })),
        }
    }

    /// Arm `fault` at step `step` (1-based, counted from now on).
    pub fn arm(&self, step: u64, fault: Fault) {
        let mut g = lock(&self.inner);
        let at = g.steps + step;
        g.fault = Some((at, fault));
    }

    /// Drop an armed fault that has not fired.
    pub fn disarm(&self) {
        lock(&self.inner).fault = None;
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        lock(&self.inner).steps
    }

    /// Set the free space reported for thin disks.
    pub fn set_free_bytes(&self, free: u64) {
        lock(&self.inner).free = free;
    }

    /// The image as a reader sees it now.
    pub fn image(&self) -> Vec<u8> {
        lock(&self.inner).image.data.clone()
    }

    /// The record's bytes now.
    pub fn record(&self) -> Option<Vec<u8>> {
        lock(&self.inner).record.clone()
    }

    /// Bytes read and written through disks since this storage was made.
    pub fn io_bytes(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.read_bytes, g.written_bytes)
    }

    /// The key slot's bytes now.
    pub fn key_slot(&self) -> Option<Vec<u8>> {
        lock(&self.inner).slot.clone()
    }

    /// The region digest tree's bytes now.
    pub fn tree(&self) -> Option<Vec<u8>> {
        lock(&self.inner).tree.clone()
    }

    /// Put `bytes` (or nothing) in place of the region digest tree, as a tamperer or a
    /// torn write would; not a step.
    pub fn set_tree(&self, bytes: Option<Vec<u8>>) {
        lock(&self.inner).tree = bytes;
    }

    /// The placement table, if any.
    pub fn place(&self) -> Option<Vec<u8>> {
        lock(&self.inner).place.clone()
    }

    /// Replace (or remove) the placement table, as a test's tamper or a restore.
    pub fn set_place(&self, bytes: Option<Vec<u8>>) {
        lock(&self.inner).place = bytes;
    }

    /// A scratch disk of `bytes` zeros named `name`, for tests of single passes (a thin disk
    /// of a job is only ever named by its seal id).
    pub fn scratch_disk(&self, name: &str, bytes: u64) -> Box<dyn Disk> {
        let f = MemFile::new(vec![0; bytes as usize]);
        lock(&self.inner).thins.insert(name.to_string(), f);
        self.disk(Which::Thin(name.to_string()), bytes)
    }

    /// Bytes written to the image (not thin disks) since this storage was made.
    pub fn image_written_bytes(&self) -> u64 {
        lock(&self.inner).image_written_bytes
    }

    /// Flip one byte of the image now and durably, as a media error or a tamper would
    /// (not a step: nobody's I/O).
    pub fn corrupt_image(&self, offset: usize) {
        let mut g = lock(&self.inner);
        g.image.data[offset] ^= 0x5a;
        g.image.durable[offset] ^= 0x5a;
    }

    /// A migration's file's bytes now, `None` if absent.
    pub fn migration_file(&self, which: MigrationFile) -> Option<Vec<u8>> {
        let name = self.migration_file_name(which);
        lock(&self.inner).thins.get(&name).map(|f| f.data.clone())
    }

    /// How many thin disks exist now.
    pub fn thin_count(&self) -> usize {
        lock(&self.inner).thins.len()
    }

    /// The state a reboot after a power loss now would find (see the module docs).
    pub fn power_loss(&self, rng: &mut impl Rng) -> Self {
        let g = lock(&self.inner);
        let inner = Inner {
            image: g.image.after_power_loss(rng),
            thins: g
                .thins
                .iter()
                .map(|(k, v)| (k.clone(), v.after_power_loss(rng)))
                .collect(),
            record: g.record.clone(),
            slot: g.slot.clone(),
            tree: g.tree.clone(),
            place: g.place.clone(),
            free: g.free,
            ..Inner::default()
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    fn disk(&self, which: Which, len: u64) -> Box<dyn Disk> {
        Box::new(SimDisk {
            inner: Arc::clone(&self.inner),
            which,
            len,
            poisoned: AtomicBool::new(false),
        })
    }
}

/// Releases a [`SimStorage`] image lock on drop.
struct SimLock {
    inner: Arc<Mutex<Inner>>,
    mode: LockMode,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut g = lock(&self.inner);
        match self.mode {
            LockMode::Exclusive => g.exclusive = false,
            LockMode::Shared => g.shared = g.shared.saturating_sub(1),
        }
    }
}

struct SimDisk {
    inner: Arc<Mutex<Inner>>,
    which: Which,
    len: u64,
    poisoned: AtomicBool,
}

impl SimDisk {
    fn name(&self) -> String {
        match &self.which {
            Which::Image => "image".into(),
            Which::Thin(p) => format!("thin disk {p}"),
        }
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.len);
        match end {
            Some(e) => Ok(offset as usize..e as usize),
            None => Err(StoreError::io(
                "access",
                format!("{} at byte {offset}", self.name()),
                io::Error::from(io::ErrorKind::UnexpectedEof),
            )),
        }
    }

    fn guarded<T>(&self, op: impl FnOnce(&mut Inner) -> Result<T>, poisons: bool) -> Result<T> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned { what: self.name() });
        }
        let mut g = lock(&self.inner);
        let r = g.step(&self.name()).and_then(|()| op(&mut g));
        if r.is_err() && poisons {
            self.poisoned.store(true, Ordering::Release);
        }
        r
    }

    fn gone(&self) -> StoreError {
        StoreError::io(
            "access",
            self.name(),
            io::Error::from(io::ErrorKind::NotFound),
        )
    }
}

impl Disk for SimDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        self.guarded(
            |g| {
                let f = g.file(&self.which).ok_or_else(|| self.gone())?;
                buf.copy_from_slice(&f.data[r]);
                g.read_bytes += buf.len() as u64;
                Ok(())
            },
            false,
        )
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        self.guarded(
            |g| {
                let f = g.file(&self.which).ok_or_else(|| self.gone())?;
                f.data[r.clone()].copy_from_slice(buf);
                f.pending.push((r.start, buf.to_vec()));
                g.written_bytes += buf.len() as u64;
                if matches!(self.which, Which::Image) {
                    g.image_written_bytes += buf.len() as u64;
                }
                Ok(())
            },
            true,
        )
    }

    fn data_map(&self) -> Result<DataMap> {
        let mut g = lock(&self.inner);
        let f = g.file(&self.which).ok_or_else(|| self.gone())?;
        let ranges = f
            .data
            .chunks(HOLE_GRAIN)
            .enumerate()
            .filter(|(_, b)| !pdguard_core::digest::is_zero(b))
            .map(|(k, _)| (k * HOLE_GRAIN) as u64..((k + 1) * HOLE_GRAIN) as u64);
        Ok(DataMap::from_ranges(self.len, ranges))
    }

    fn sync(&self) -> Result<()> {
        self.guarded(
            |g| {
                let f = g.file(&self.which).ok_or_else(|| self.gone())?;
                f.durable.clone_from(&f.data);
                f.pending.clear();
                Ok(())
            },
            true,
        )
    }
}

impl Storage for SimStorage {
    fn image_name(&self) -> String {
        "sim.img".into()
    }

    fn record_name(&self) -> String {
        "sim.img.pdguard".into()
    }

    fn lock_image(&self, mode: LockMode) -> Result<ImageLock> {
        let mut g = lock(&self.inner);
        let free = match mode {
            LockMode::Exclusive => !g.exclusive && g.shared == 0,
            LockMode::Shared => !g.exclusive,
        };
        if !free {
            return Err(StoreError::Busy {
                image: "sim.img".into(),
                holder: None,
            });
        }
        match mode {
            LockMode::Exclusive => g.exclusive = true,
            LockMode::Shared => g.shared += 1,
        }
        Ok(ImageLock::new(Box::new(SimLock {
            inner: Arc::clone(&self.inner),
            mode,
        })))
    }

    fn open_image(&self, _write: bool) -> Result<Box<dyn Disk>> {
        let len = {
            let mut g = lock(&self.inner);
            g.step("image")?;
            g.image.data.len() as u64
        };
        Ok(self.disk(Which::Image, len))
    }

    fn thin_name(&self, seal_id: &str) -> Result<String> {
        check_seal_id(seal_id)?;
        Ok(format!("sim.img.{}.pdguard-thin", &seal_id[..8]))
    }

    fn free_bytes(&self, seal_id: &str) -> Result<u64> {
        self.thin_name(seal_id)?;
        Ok(lock(&self.inner).free)
    }

    fn create_thin(&self, seal_id: &str, bytes: u64) -> Result<Box<dyn Disk>> {
        let thin_path = self.thin_name(seal_id)?;
        {
            let mut g = lock(&self.inner);
            g.step(&thin_path)?;
            let f = MemFile::new(vec![0; bytes as usize]);
            g.thins.insert(thin_path.clone(), f);
        }
        Ok(self.disk(Which::Thin(thin_path), bytes))
    }

    fn open_thin(&self, seal_id: &str) -> Result<Option<Box<dyn Disk>>> {
        let thin_path = self.thin_name(seal_id)?;
        let len = {
            let mut g = lock(&self.inner);
            g.step(&thin_path)?;
            g.thins.get(&thin_path).map(|f| f.data.len() as u64)
        };
        Ok(len.map(|len| self.disk(Which::Thin(thin_path), len)))
    }

    fn remove_thin(&self, seal_id: &str) -> Result<()> {
        let thin_path = self.thin_name(seal_id)?;
        let mut g = lock(&self.inner);
        g.step(&thin_path)?;
        g.thins.remove(&thin_path);
        Ok(())
    }

    fn key_slot_name(&self) -> String {
        "sim.img.pdguard.key".into()
    }

    /// Two steps after destroying a stale slot, as on a real file system: the exclusive
    /// create (an empty file), then the write and its fsync.
    fn create_key_slot(&self, bytes: &[u8]) -> Result<()> {
        self.destroy_key_slot()?;
        let mut g = lock(&self.inner);
        g.step("key slot")?;
        g.slot = Some(Vec::new());
        g.step("key slot")?;
        g.slot = Some(bytes.to_vec());
        Ok(())
    }

    fn read_key_slot(&self) -> Result<Option<Vec<u8>>> {
        let mut g = lock(&self.inner);
        g.step("key slot")?;
        Ok(g.slot.clone())
    }

    /// Two steps: the in-place overwrite with noise and its fsync, then the delete.
    fn destroy_key_slot(&self) -> Result<()> {
        let mut g = lock(&self.inner);
        if g.slot.is_none() {
            return Ok(());
        }
        g.step("key slot")?;
        if let Some(s) = g.slot.as_mut() {
            rand::thread_rng().fill(&mut s[..]);
        }
        g.step("key slot")?;
        g.slot = None;
        Ok(())
    }

    fn link_record_as_key_slot(&self) -> Result<()> {
        let mut g = lock(&self.inner);
        g.step("key slot")?;
        g.slot = g.record.clone();
        Ok(())
    }

    fn tree_name(&self) -> String {
        "sim.img.pdguard.tree".into()
    }

    /// Two steps after removing a stale tree, as on a real file system: the exclusive
    /// create (an empty file), then the write and its fsync.
    fn write_tree(&self, bytes: &[u8]) -> Result<()> {
        self.remove_tree()?;
        let mut g = lock(&self.inner);
        g.step("region digest tree")?;
        g.tree = Some(Vec::new());
        g.step("region digest tree")?;
        g.tree = Some(bytes.to_vec());
        Ok(())
    }

    fn read_tree(&self, limit: u64) -> Result<Option<Vec<u8>>> {
        let mut g = lock(&self.inner);
        g.step("region digest tree")?;
        let n = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(g.tree.as_ref().map(|t| t[..t.len().min(n)].to_vec()))
    }

    fn remove_tree(&self) -> Result<()> {
        let mut g = lock(&self.inner);
        if g.tree.is_none() {
            return Ok(());
        }
        g.step("region digest tree")?;
        g.tree = None;
        Ok(())
    }

    fn place_name(&self) -> String {
        "sim.img.pdguard.place".into()
    }

    /// As [`Self::write_tree`]: the exclusive create, then the write and its fsync.
    fn write_place(&self, bytes: &[u8]) -> Result<()> {
        self.remove_place()?;
        let mut g = lock(&self.inner);
        g.step("placement table")?;
        g.place = Some(Vec::new());
        g.step("placement table")?;
        g.place = Some(bytes.to_vec());
        Ok(())
    }

    fn read_place(&self, limit: u64) -> Result<Option<Vec<u8>>> {
        let mut g = lock(&self.inner);
        g.step("placement table")?;
        let n = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(g.place.as_ref().map(|t| t[..t.len().min(n)].to_vec()))
    }

    fn remove_place(&self) -> Result<()> {
        let mut g = lock(&self.inner);
        if g.place.is_none() {
            return Ok(());
        }
        g.step("placement table")?;
        g.place = None;
        Ok(())
    }

    fn read_record(&self) -> Result<Option<Vec<u8>>> {
        let mut g = lock(&self.inner);
        g.step("record")?;
        Ok(g.record.clone())
    }

    fn write_record(&self, bytes: &[u8]) -> Result<()> {
        let mut g = lock(&self.inner);
        g.step("record")?;
        g.record = Some(bytes.to_vec());
        Ok(())
    }

    fn remove_record(&self) -> Result<()> {
        let mut g = lock(&self.inner);
        g.step("record")?;
        g.record = None;
        Ok(())
    }

    fn migration_file_name(&self, which: MigrationFile) -> String {
        format!("sim.img.pdguard{}", which.suffix())
    }

    /// One step, atomic and durable, as a create that fsyncs the file and its directory.
    fn create_migration_file(&self, which: MigrationFile, bytes: u64) -> Result<Box<dyn Disk>> {
        let name = self.migration_file_name(which);
        {
            let mut g = lock(&self.inner);
            g.step(&name)?;
            g.thins
                .insert(name.clone(), MemFile::new(vec![0; bytes as usize]));
        }
        Ok(self.disk(Which::Thin(name), bytes))
    }

    fn open_migration_file(&self, which: MigrationFile) -> Result<Option<Box<dyn Disk>>> {
        let name = self.migration_file_name(which);
        let len = {
            let mut g = lock(&self.inner);
            g.step(&name)?;
            g.thins.get(&name).map(|f| f.data.len() as u64)
        };
        Ok(len.map(|len| self.disk(Which::Thin(name), len)))
    }

    fn remove_migration_file(&self, which: MigrationFile) -> Result<()> {
        let name = self.migration_file_name(which);
        let mut g = lock(&self.inner);
        g.step(&name)?;
        g.thins.remove(&name);
        Ok(())
    }
}
