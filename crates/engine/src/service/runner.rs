//! Background jobs: one seal or unseal per disk, at most `--jobs` at once. A job keeps its
//! typed [`JobError`] to the end: the disk's `failed` text is made from it, and whoever
//! waits for the job (a `disk unseal`, a reclaim) gets the error itself, so a verification
//! failure stays one all the way to the CLI's exit 3.
//!
//! Stopping: a job runs on a blocking thread and is never interrupted by pdguard (a pass
//! has no point at which stopping is cheaper than finishing the window it is in). At
//! shutdown the daemon waits a few seconds for running jobs and then exits with them
//! mid-pass; the seal record holds their place, and they resume on the next start exactly
//! as after a crash (the kill tests cut jobs at every step).

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;

use super::lifecycle::{Event, JobKind};
use super::{lock, nbd, now_ms, Result, Service, ServiceError};
use crate::jobs::{self, JobError, Progress, SealOptions};
use crate::registry::Disk;
use crate::store::file::{default_record_path, ImageStorage, RecordWatch};

/// Why a job did not end well.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Job(#[from] JobError),
    /// The registry says the disk holds sealed data, but its record is gone.
    #[error("{0}")]
    RecordLost(String),
    #[error("the job panicked: {0}")]
    Panicked(String),
    /// The migration of an instant reclaim failed (a region refused by its leaf, an I/O
    /// error, a moved map that cannot be used).
    #[error(transparent)]
    Reclaim(#[from] crate::jobs::reclaim::ReclaimError),
}

impl RunError {
    /// The data did not verify (exit 3 for the CLI).
    pub fn is_verification(&self) -> bool {
        use crate::jobs::reclaim::ReclaimError as R;
        match self {
            Self::Job(e) | Self::Reclaim(R::Job(e)) => e.is_verification(),
            Self::Reclaim(R::Region { .. } | R::Verification { .. }) => true,
            _ => false,
        }
    }
}

/// How a job ended, sent to whoever waits for it.
pub(super) type Outcome = std::result::Result<(), Arc<RunError>>;
/// A job's end, as a watch (None while it runs).
pub(super) type JobWatch = watch::Receiver<Option<Outcome>>;

impl Service {
    /// Start the job a disk needs, unless one runs for it already.
    pub(super) fn ensure_job(&self, d: &Disk, kind: JobKind) {
        if kind == JobKind::Migrate {
            return self.ensure_migration(d);
        }
        let mut running = lock(&self.s.running);
        if running.contains_key(&d.name) {
            return;
        }
        let (tx, rx) = watch::channel(None);
        running.insert(d.name.clone(), rx);
        // Queued now, under the lock that makes one job per disk: the order of the asks is
        // the order of the starts.
        let turn = self.s.queue.enqueue(&d.name, kind);
        self.s.metrics.queued(&d.name, kind);
        drop(running);
        let svc = self.clone();
        let disk = d.clone();
        tokio::spawn(async move {
            svc.quiesce(&disk, "the job").await;
            // The queue outlives every job (the service holds it): the turn always comes.
            let permit = turn.await.ok();
            svc.s.metrics.started(&disk.name, kind);
            let t0 = std::time::Instant::now();
            let runner = svc.clone();
            let d2 = disk.clone();
            let result = tokio::task::spawn_blocking(move || runner.run_job(&d2, kind))
                .await
                .unwrap_or_else(|e| Err(RunError::Panicked(e.to_string())))
                .map_err(Arc::new);
            drop(permit);
            svc.finish_job(&disk.name, kind, &result, t0.elapsed())
                .await;
            let _ = tx.send(Some(result));
        });
    }

    /// Before a job or a migration touches the disk: block its gate (readers of the sealed
    /// bytes and writers drain first), then flush it, so that acknowledged writes are durable
    /// before the first read. A flush that fails is logged; the job's own checks decide.
    pub(super) async fn quiesce(&self, disk: &Disk, before: &'static str) {
        let gate = self.gate(&disk.name);
        let _ = tokio::task::spawn_blocking(move || gate.block()).await;
        let path = disk.path.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || nbd::flush_disk(&path)).await {
            tracing::warn!(disk = %disk.name, error = %e, "cannot flush the disk before {before}");
        }
    }

    /// The job queue: what runs, what waits and in which order (`status`, the metrics).
    pub fn backlog(&self) -> super::queue::Backlog {
        self.s.queue.backlog()
    }

    /// The watch of the job running on `name` (one that is already over if none runs).
    pub(super) fn job_watch(&self, name: &str) -> JobWatch {
        lock(&self.s.running)
            .get(name)
            .cloned()
            .unwrap_or_else(|| watch::channel(Some(Ok(()))).1)
    }

    /// Wait for a job's end; its failure as the service's error, typed.
    pub(super) async fn wait_job(&self, name: &str, kind: JobKind, mut rx: JobWatch) -> Result<()> {
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(o) => o.clone(),
            // The job's task ended without a word: the runtime is shutting down.
            Err(_) => return Err(ServiceError::ShuttingDown),
        };
        match outcome {
            Some(Err(source)) => Err(ServiceError::Job {
                disk: name.into(),
                action: kind.name(),
                source,
            }),
            _ => Ok(()),
        }
    }

    /// The job itself, on a blocking thread. Resumes whatever a crash interrupted.
    fn run_job(&self, d: &Disk, kind: JobKind) -> std::result::Result<(), RunError> {
        let watch = RecordFlag::new(self.clone(), d);
        let storage = storage_of(d).with_record_watch(Arc::new(watch));
        let progress = DiskProgress {
            svc: self.clone(),
            disk: d.name.clone(),
            kind,
        };
        match kind {
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
                    Err(e) => Err(e.into()),
                }
            }
            // The record is removed last by an unseal, after the registry noted it: no
            // record means the unseal already finished, unless the registry expects one.
            JobKind::Unseal if !storage.record_path().exists() => match d.record_expected {
                false => Ok(()),
                true => Err(RunError::RecordLost(record_lost(d))),
            },
            JobKind::Unseal => {
                let key = self.s.cfg.master_key.as_ref();
                jobs::unseal(&storage, key, &progress)
                    .map(|_| ())
                    .map_err(Into::into)
            }
            // Run by `ensure_migration`, never queued.
            JobKind::Migrate => Err(RunError::Panicked(
                "a migration was queued as a job (a bug of pdguard)".into(),
            )),
        }
    }

    /// The job ended: its disk's life goes on (under the state lock, and the job leaves
    /// the running set there, so that the next event sees no job and can start one).
    pub(super) async fn finish_job(
        &self,
        name: &str,
        kind: JobKind,
        result: &Outcome,
        took: Duration,
    ) {
        let mut st = self.s.state.lock().await;
        lock(&self.s.running).remove(name);
        lock(&self.s.progress).remove(name);
        self.s.metrics.finished(name, kind, result.is_ok(), took);
        let Some(d) = st.disks.get(name) else {
            return;
        };
        let event = match result {
            Ok(()) => Event::JobDone {
                now_ms: now_ms(),
                grace_ms: self.grace_of(d),
                in_use: st.in_use(name),
            },
            Err(e) => {
                let error = crate::error_chain(e.as_ref());
                tracing::error!(disk = %name, %error, "job failed");
                Event::JobFailed { error }
            }
        };
        match self.apply(&mut st, name, event) {
            Ok(super::Life::Grace { .. }) if kind != JobKind::Seal => {
                tracing::warn!(disk = %name, "unsealed, but the container that asked for it is gone (its client gave up); grace period starts");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(disk = %name, error = %crate::error_chain(&e), "cannot record the job's end")
            }
        }
    }

    /// Each running job as (disk, "seal (pass scatter)"), for shutdown messages.
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
                    let _ = rx.wait_for(Option::is_some).await;
                    // finish_job removed it before the send; yield so a job's successor
                    // (if any) is registered before we look again.
                    tokio::task::yield_now().await;
                }
                None => return,
            }
        }
    }
}

pub(super) fn record_lost(d: &Disk) -> String {
    format!(
        "the seal record {} of disk {:?} is missing, but the registry says the disk was sealed: its file holds sealed data, which is never served as plaintext; restore the record from a backup and run `pdguard disk unseal {}`, or forget the disk with `pdguard disk rm {} --keep-file`",
        default_record_path(&d.path).display(),
        d.name,
        d.name,
        d.name
    )
}

/// The daemon never follows a symbolic link on a disk's paths, and its jobs refuse a file
/// that is not the one recorded at adoption ([`Disk::identity`]).
pub(super) fn storage_of(d: &Disk) -> ImageStorage {
    ImageStorage::new(d.path.clone(), default_record_path(&d.path), None).with_identity(d.identity)
}

/// Notes in the registry, durably and before the record changes, whether a disk's seal
/// record should exist (see [`Disk::record_expected`]). Runs on a job's blocking thread.
pub(super) struct RecordFlag {
    svc: Service,
    disk: String,
    last: StdMutex<Option<bool>>,
}

impl RecordFlag {
    pub(super) fn new(svc: Service, d: &Disk) -> Self {
        Self {
            svc,
            disk: d.name.clone(),
            last: StdMutex::new(Some(d.record_expected)),
        }
    }

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
                    let mut changed = d.clone();
                    changed.record_expected = expected;
                    svc.persist(&changed)?;
                    *d = changed;
                    Ok(())
                }
                None => Ok::<(), ServiceError>(()),
            }
        });
        r.map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
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

/// Forwards a job's progress to `status` and the metrics.
struct DiskProgress {
    svc: Service,
    disk: String,
    kind: JobKind,
}

impl Progress for DiskProgress {
    fn pass(&self, name: &'static str, total_bytes: u64) {
        lock(&self.svc.s.progress).insert(
            self.disk.clone(),
            super::JobProgress {
                job: self.kind.name(),
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
        self.svc.s.metrics.moved(self.kind, bytes);
        if let Some(p) = lock(&self.svc.s.progress).get_mut(&self.disk) {
            p.done_bytes = p.done_bytes.saturating_add(bytes);
        }
    }
}
