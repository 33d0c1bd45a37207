//! Instant reclaim in the daemon (`docs/instant-reclaim.md`, sections 4 and 8): a claim of a
//! sealed disk by a front-end that serves it through pdguard (NBD) starts the disk's
//! migration and returns as soon as the migration serves requests; a background thread
//! drives it window by window to its end; a restarted daemon resumes it.
//!
//! Every disk has a [`Route`]: where a request that passed the gate (FIG. 3) goes — the
//! disk's file, the migration while it runs, or nowhere once it failed. Requests hold the
//! route's read lock while they run; the end of a migration takes the write lock, so it
//! waits for the requests in flight and holds the new ones until the disk is its file
//! again. The one public way in is [`Service::claim`], which gives a [`ClaimedIo`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use pdguard_core::record::RECORD_VERSION;
use pdguard_core::Phase;
use tokio::sync::watch;

use super::lifecycle::{Event, JobKind, Life};
use super::runner::{storage_of, RecordFlag, RunError};
use super::{lock, Result, Service, ServiceError, State};
use crate::gate::{Gate, GateError};
use crate::jobs;
use crate::jobs::reclaim::{Migration, MigrationOptions, StepDone};
use crate::registry::Disk;
use crate::store::file::default_record_path;

/// How a reclaim by a front-end that serves the disk itself (NBD) unseals it
/// (`pdguard serve --reclaim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReclaimMode {
    /// Serve the disk at once through its migration (`docs/instant-reclaim.md`), when its
    /// record allows it (version 4); else as `Copy`.
    #[default]
    Instant,
    /// Unseal the whole disk first, then serve it (the reclaim of before issue 18).
    Copy,
}

/// How long a [`ClaimedIo`] request waits at a blocked gate before it fails, by default.
pub const CLAIM_HOLD: Duration = Duration::from_secs(60);

/// Where the requests of a disk go once they passed its gate.
enum Routing {
    /// The disk's file (plaintext, or sealed bytes behind a sealed gate).
    File,
    /// The migration of an instant reclaim.
    Migrating(Box<Migration>),
    /// The migration failed: every request is refused with this reason (`EIO`).
    Failed(String),
}

/// The route of one disk, shared by every [`ClaimedIo`] of it and its migration's thread.
pub(super) struct Route {
    routing: RwLock<Routing>,
    /// True while a migration serves requests (a claim waits for it).
    serving: watch::Sender<bool>,
}

impl Default for Route {
    fn default() -> Self {
        Self {
            routing: RwLock::new(Routing::File),
            serving: watch::channel(false).0,
        }
    }
}

impl Route {
    fn read(&self) -> RwLockReadGuard<'_, Routing> {
        self.routing.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Routing> {
        self.routing.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn serving(&self) -> bool {
        *self.serving.borrow()
    }
}

/// A claimed disk's I/O, for a front-end that serves the disk itself (NBD today, a FUSE
/// file later). Made by [`Service::claim`]. Every call passes the disk's gate (FIG. 3: a
/// sealed gate refuses writes or all I/O, a blocked one holds the request up to
/// [`ClaimedIo::hold`]), then goes to the migration while one runs (a region not yet at its
/// plain place is moved first and checked against the seal's region digest tree; a region
/// that fails is never served: `EIO`), or to the disk's file. Blocking: call it from
/// blocking threads (any number at once), never from an async task.
pub struct ClaimedIo {
    disk: String,
    size: u64,
    file: File,
    gate: Arc<Gate>,
    route: Arc<Route>,
    hold: Duration,
}

/// Bytes of zeros written at once by [`ClaimedIo::write_zeroes_at`].
const ZERO_CHUNK: usize = 1 << 20;

impl ClaimedIo {
    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The disk's name.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// How long a request waits at a blocked gate (a seal or copy unseal in flight, the
    /// end of a migration) before it fails with `ErrorKind::TimedOut`; [`CLAIM_HOLD`] by
    /// default. A sealed gate's refusal is `ErrorKind::PermissionDenied`; a migration's
    /// refusal (a region that fails its leaf, an I/O error) is `ErrorKind::Other`.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// True while the disk is served through its migration.
    pub fn migrating(&self) -> bool {
        matches!(&*self.route.read(), Routing::Migrating(_))
    }

    /// Fill `buf` from byte `offset` of the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.serve(false, |r| match r {
            Routing::Migrating(m) => m.read(offset, buf).map_err(reclaim_io),
            _ => self.file.read_exact_at(buf, offset),
        })
    }

    /// Write `data` at byte `offset`: acknowledged when this returns, durable once a later
    /// [`ClaimedIo::flush`] returns (as on any block device).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.serve(true, |r| match r {
            Routing::Migrating(m) => m.write(offset, data).map_err(reclaim_io),
            _ => self.file.write_all_at(data, offset),
        })
    }

    /// Write `len` bytes of zeros at `offset` (through the migration while it runs).
    pub fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let end = offset.checked_add(len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the range ends past 2^64")
        })?;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Make every write acknowledged so far durable (`fdatasync` of the disk's file, and
    /// while migrating, of the image the migration writes; their regions' `dirty` commits
    /// were made before they were issued).
    pub fn flush(&self) -> io::Result<()> {
        self.serve(false, |r| match r {
            Routing::Migrating(m) => m.flush().map_err(reclaim_io),
            _ => rustix::fs::fdatasync(&self.file).map_err(io::Error::from),
        })
    }

    /// Run `f` on the disk's file through the gate, for what only a file can do (punch a
    /// hole, read ahead, find holes); `Ok(None)` while the disk is served through its
    /// migration, which has no such path (the caller answers a TRIM as a hint ignored,
    /// zeros with [`ClaimedIo::write_zeroes_at`], extents as all data).
    pub fn on_file<T>(
        &self,
        write: bool,
        f: impl FnOnce(&File) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        self.serve(write, |r| match r {
            Routing::Migrating(_) => Ok(None),
            _ => f(&self.file).map(Some),
        })
    }

    /// A failed migration refuses at once; else the gate, then the route.
    fn serve<T>(&self, write: bool, f: impl FnOnce(&Routing) -> io::Result<T>) -> io::Result<T> {
        self.refuse_failed(&self.route.read())?;
        let _guard = self.gate.enter(write, self.hold).map_err(|e| {
            let kind = match e {
                GateError::Timeout(_) => io::ErrorKind::TimedOut,
                GateError::SealedReadOnly | GateError::SealedRefused => {
                    io::ErrorKind::PermissionDenied
                }
            };
            io::Error::new(kind, format!("disk {}: {e}", self.disk))
        })?;
        let r = self.route.read();
        self.refuse_failed(&r)?;
        f(&r)
    }

    fn refuse_failed(&self, r: &Routing) -> io::Result<()> {
        match r {
            Routing::Failed(why) => Err(io::Error::other(format!("disk {}: {why}", self.disk))),
            _ => Ok(()),
        }
    }
}

/// A migration's refusal as an I/O error (`EIO` for NBD), its whole chain in the text.
fn reclaim_io(e: crate::jobs::reclaim::ReclaimError) -> io::Error {
    io::Error::other(crate::error_chain(&e))
}

impl Service {
    /// A disk leaves `failed`: a failed migration's route stops refusing (the next
    /// migration, or the file, serves it).
    pub(super) fn route_recovered(&self, disk: &str) {
        let route = self.route(disk);
        let mut w = route.write();
        if matches!(*w, Routing::Failed(_)) {
            *w = Routing::File;
        }
    }

    /// The route of a disk (made on first use).
    pub(super) fn route(&self, disk: &str) -> Arc<Route> {
        let mut routes = lock(&self.s.routes);
        Arc::clone(routes.entry(disk.to_string()).or_default())
    }

    /// **Claim a disk for a front-end that serves it itself** (NBD; later a FUSE file for
    /// Docker): make it usable and give its I/O handle. A sealed disk whose seal record
    /// allows an instant reclaim (record version 4, `serve --reclaim instant`, the default)
    /// is served at once through its migration: this returns as soon as the migration has
    /// started (metadata reads and a few fsyncs; well under a second at any size with the
    /// default placement), and the migration unseals the disk in the background; when it
    /// ends the disk is `attached`, or in its grace period when no operational container
    /// holds it any more. Any other disk is reclaimed as a container's is (a copy unseal
    /// first when sealed). The caller should hold the disk through an association first
    /// (`container_up`, an NBD connection's `nbd_attach`): a disk nobody holds is sealed
    /// again after its grace once the migration ends.
    ///
    /// The [`ClaimedIo`] is usable from blocking threads: `size()`, `read_at(buf, offset)`,
    /// `write_at(data, offset)`, `flush()` (and `write_zeroes_at`, `on_file`), each passing
    /// the disk's gate, then going to the migration while it runs and to the file after.
    pub async fn claim(&self, name: &str) -> Result<ClaimedIo> {
        self.reclaim_with(name, true).await?;
        self.claimed_io(name).await
    }

    /// The I/O handle of a disk that is usable (attached or migrating): its file opened as
    /// every job opens it (the recorded file only, never through a link).
    pub(super) async fn claimed_io(&self, name: &str) -> Result<ClaimedIo> {
        let export = self.nbd_export(name).await?;
        let file = self.nbd_open(&export).await?;
        Ok(ClaimedIo {
            disk: export.name.clone(),
            size: export.size,
            file,
            gate: self.gate(name),
            route: self.route(name),
            hold: CLAIM_HOLD,
        })
    }

    /// Make one disk usable: the claim event until no job is needed, waiting for each job
    /// first — but with `instant`, a migration is waited for only until it serves.
    pub(super) async fn reclaim_with(&self, name: &str, instant: bool) -> Result<()> {
        loop {
            let (kind, rx, serving) = {
                let mut st = self.s.state.lock().await;
                self.find_record(&mut st, name)?;
                let event = self.claim_event(&st, name, instant)?;
                let life = self.apply(&mut st, name, event)?;
                match life.job() {
                    None => return Ok(()),
                    Some(kind) => {
                        let serving = (instant && kind == JobKind::Migrate)
                            .then(|| self.route(name).serving.subscribe());
                        (kind, self.job_watch(name), serving)
                    }
                }
            };
            let ended = match serving {
                Some(mut serving) => tokio::select! {
                    s = serving.wait_for(|s| *s) => match s {
                        Ok(_) => return Ok(()),
                        Err(_) => return Err(ServiceError::ShuttingDown),
                    },
                    r = self.wait_job(name, kind, rx) => r,
                },
                None => self.wait_job(name, kind, rx).await,
            };
            match ended {
                Ok(()) => {}
                // A seal that failed is rolled back by the unseal the next round starts.
                Err(e) if kind == JobKind::Seal => {
                    tracing::warn!(disk = %name, error = %crate::error_chain(&e), "the seal being reclaimed failed; unsealing");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The claim a sealed or failed disk gets: instant when its record is in phase
    /// `migrating` (only a migration may go on from there), or when the front-end serves
    /// the disk itself, the daemon reclaims instantly and the record is a sealed one of
    /// version 4; a copy reclaim otherwise.
    fn claim_event(&self, st: &State, name: &str, instant: bool) -> Result<Event> {
        let life = st.life(name)?;
        if !matches!(life, Life::Sealed { .. } | Life::Failed { .. }) {
            return Ok(Event::Claimed);
        }
        let Some(d) = st.disks.get(name) else {
            return Ok(Event::Claimed);
        };
        let wanted = instant && self.s.cfg.reclaim == ReclaimMode::Instant;
        Ok(match jobs::inspect(&storage_of(d)) {
            Ok(r) if r.phase == Phase::Migrating => Event::ClaimedInstant,
            Ok(r) if wanted && r.phase == Phase::Sealed && r.version == RECORD_VERSION => {
                Event::ClaimedInstant
            }
            _ => Event::Claimed,
        })
    }

    /// True when `d`'s seal record is in phase `migrating` (read, not authenticated: the
    /// migration authenticates it when it resumes).
    pub(super) fn record_migrating(d: &Disk) -> bool {
        default_record_path(&d.path).exists()
            && jobs::inspect(&storage_of(d)).is_ok_and(|r| r.phase == Phase::Migrating)
    }

    /// Start the migration of a `migrating` disk (unless it runs already): never queued —
    /// a claim waits for it to serve.
    pub(super) fn ensure_migration(&self, d: &Disk) {
        let mut running = lock(&self.s.running);
        if running.contains_key(&d.name) {
            return;
        }
        let (tx, rx) = watch::channel(None);
        running.insert(d.name.clone(), rx);
        drop(running);
        let kind = JobKind::Migrate;
        self.s.metrics.queued(&d.name, kind);
        let svc = self.clone();
        let disk = d.clone();
        tokio::spawn(async move {
            // Readers of the sealed bytes (a read-only sealed gate) drain first.
            svc.quiesce(&disk, "its migration").await;
            svc.s.metrics.started(&disk.name, kind);
            let t0 = std::time::Instant::now();
            let runner = svc.clone();
            let d2 = disk.clone();
            let result = tokio::task::spawn_blocking(move || runner.run_migration(&d2))
                .await
                .unwrap_or_else(|e| Err(RunError::Panicked(e.to_string())))
                .map_err(Arc::new);
            svc.finish_job(&disk.name, kind, &result, t0.elapsed())
                .await;
            let _ = tx.send(Some(result));
        });
    }

    /// The migration, on a blocking thread. A migration that fails after it served leaves
    /// its route refusing every request (the disk is `failed`; a later claim resumes it).
    fn run_migration(&self, d: &Disk) -> std::result::Result<(), RunError> {
        let r = self.migrate(d);
        if let Err(e) = &r {
            let route = self.route(&d.name);
            let mut w = route.write();
            route.serving.send_replace(false);
            if !matches!(*w, Routing::File) {
                *w = Routing::Failed(crate::error_chain(e));
            }
        }
        r
    }

    /// Start (or resume), serve, step to the end, finish. A record already gone means a
    /// migration that ended before a restart.
    fn migrate(&self, d: &Disk) -> std::result::Result<(), RunError> {
        let watch = RecordFlag::new(self.clone(), d);
        let storage = storage_of(d).with_record_watch(Arc::new(watch));
        let route = self.route(&d.name);
        if !storage.record_path().exists() {
            *route.write() = Routing::File;
            return match d.record_expected {
                false => Ok(()),
                true => Err(RunError::RecordLost(super::runner::record_lost(d))),
            };
        }
        let key = self.s.cfg.master_key.as_ref();
        let t0 = std::time::Instant::now();
        let tree = jobs::load_tree_for_migration(&storage, key)?;
        let opts = MigrationOptions {
            served: true,
            ..MigrationOptions::default()
        };
        let m = Migration::start(&storage, key, tree, &opts)?;
        let regions = m.regions();
        *route.write() = Routing::Migrating(Box::new(m));
        // Served from here: the gate opens under the state lock, so that no `apply` racing
        // with it closes it again from a stale view of the route.
        let svc = self.clone();
        let name = d.name.clone();
        tokio::runtime::Handle::current().block_on(async move {
            let _st = svc.s.state.lock().await;
            svc.route(&name).serving.send_replace(true);
            svc.gate(&name).set(crate::gate::GateState::Open);
        });
        tracing::info!(disk = %d.name, regions, took_ms = t0.elapsed().as_millis() as u64, "instant reclaim: the disk is served while its migration runs");
        let progress = MigrationProgress {
            svc: self.clone(),
            disk: d.name.clone(),
            size: d.size,
            regions,
        };
        progress.start();
        loop {
            let step = {
                let r = route.read();
                let Routing::Migrating(m) = &*r else {
                    return Err(RunError::Panicked(
                        "the migration left its route while it ran (a bug of pdguard)".into(),
                    ));
                };
                m.step().map(|s| (s, m.counts()))
            };
            match step? {
                (StepDone::Complete, _) => break,
                (done, counts) => progress.step(&done, counts),
            }
        }
        // The end: requests in flight drain (the write lock), new ones wait for the file.
        let mut w = route.write();
        route.serving.send_replace(false);
        let ended = "the migration ended without its end (a bug of pdguard)".to_string();
        let Routing::Migrating(m) = std::mem::replace(&mut *w, Routing::Failed(ended)) else {
            return Err(RunError::Panicked(
                "the migration left its route while it ran (a bug of pdguard)".into(),
            ));
        };
        let finished = m.finish(&storage)?;
        *w = Routing::File;
        drop(w);
        tracing::info!(disk = %d.name, dirty_regions = finished.dirty_regions, resumed = finished.resumed, "instant reclaim: the migration ended; the disk is its file again");
        Ok(())
    }
}

/// A migration's progress, for `disk show`, the metrics and the test pause hook (pass
/// `migrate`, its bytes counted per window).
struct MigrationProgress {
    svc: Service,
    disk: String,
    size: u64,
    regions: u64,
}

impl MigrationProgress {
    fn start(&self) {
        self.set("evacuate", 0);
        if let Some(o) = &self.svc.s.cfg.observer {
            o.0.pass("migrate", self.size.saturating_mul(2));
        }
    }

    fn bytes(&self, regions: u64) -> u64 {
        let per = self.size.div_ceil(self.regions.max(1));
        regions.saturating_mul(per).min(self.size)
    }

    fn set(&self, pass: &'static str, done: u64) {
        lock(&self.svc.s.progress).insert(
            self.disk.clone(),
            super::JobProgress {
                job: JobKind::Migrate.name(),
                pass,
                done_bytes: done,
                total_bytes: self.size,
            },
        );
    }

    /// After a window: where the passes are (counts: sealed, evacuated, plain, dirty).
    fn step(&self, done: &StepDone, counts: [u64; 4]) {
        let window = match done {
            StepDone::Evacuated(r) | StepDone::Moved(r) => r.end - r.start,
            _ => 0,
        };
        let (pass, at) = if counts[0] > 0 {
            ("evacuate", self.regions - counts[0])
        } else {
            ("move", counts[2] + counts[3])
        };
        self.set(pass, self.bytes(at));
        let bytes = self.bytes(window);
        self.svc.s.metrics.moved(JobKind::Migrate, bytes);
        if let Some(o) = &self.svc.s.cfg.observer {
            o.0.advance(bytes);
        }
    }
}

#[cfg(test)]
pub(super) fn routing_name(svc: &Service, disk: &str) -> &'static str {
    match &*svc.route(disk).read() {
        Routing::File => "file",
        Routing::Migrating(_) => "migrating",
        Routing::Failed(_) => "failed",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "migration_tests.rs"]
mod tests;
