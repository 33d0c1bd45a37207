//! Instant reclaim in the service: a claim serves a sealed disk through its migration at
//! once, the migration's end leaves the disk attached (or in grace when nobody holds it),
//! a restarted daemon resumes a migration at start, and a region that fails its leaf is
//! never served and fails the disk naming it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex as StdMutex};

use pdguard_core::Profile;

use super::*;
use crate::gate::GateState;
use crate::gate::SealedIo;
use crate::jobs::Progress;
use crate::registry::DiskState;
use crate::service::{Config, Life, Observer, Service};
use std::path::{Path, PathBuf};

/// 4 MiB: four regions of 1 MiB.
const SIZE: u64 = 4 << 20;

/// Holds the background migration as it starts (pass `migrate`) until released, so a
/// test acts while the disk is served through its migration and nothing moved yet.
#[derive(Default)]
struct HoldMigration {
    held: StdMutex<bool>,
    cv: Condvar,
    reached: AtomicBool,
}

impl HoldMigration {
    /// Hold the next migration; it is let go when the guard drops (a failing test too, so
    /// that the runtime's end does not wait forever for the held thread).
    fn arm(self: &Arc<Self>) -> Armed {
        *self.held.lock().unwrap() = true;
        Armed(Arc::clone(self))
    }

    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

struct Armed(Arc<HoldMigration>);

impl Drop for Armed {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Progress for HoldMigration {
    fn pass(&self, name: &'static str, _total: u64) {
        if name != "migrate" {
            return;
        }
        self.reached.store(true, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.cv.wait(held).unwrap();
        }
    }
}

fn config(dir: &Path, hold: &Arc<HoldMigration>, reclaim: ReclaimMode) -> Config {
    Config {
        state_dir: dir.join("state"),
        grace: Duration::from_secs(3600),
        profile: Profile::Patent,
        master_key: None,
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: crate::jobs::SealOptions::default().strategy,
        seal_stopped: false,
        observer: Some(Observer(hold.clone())),
        docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
        reclaim,
    }
}

fn plain() -> Vec<u8> {
    (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(31) % 241) as u8)
        .collect()
}

/// A sealed disk of [`SIZE`] holding [`plain`].
async fn sealed_disk(svc: &Service, name: &str) -> PathBuf {
    let v = svc.create_disk(name, SIZE, None).await.unwrap();
    let path = v.disk.path.clone();
    std::fs::write(&path, plain()).unwrap();
    svc.seal_disk(name).await.unwrap();
    assert_eq!(state(svc, name).await, DiskState::Sealed);
    path
}

async fn state(svc: &Service, name: &str) -> DiskState {
    svc.disk(name).await.unwrap().disk.state
}

/// Wait (bounded) for `name` to be `want`.
async fn reach(svc: &Service, name: &str, want: DiskState) {
    for _ in 0..500 {
        if state(svc, name).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{name} never became {want:?}: {:?}",
        svc.disk(name).await.unwrap().disk
    );
}

/// Run blocking I/O off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Writes made while migrating: one inside a region, one across two, one of a whole region.
fn writes() -> Vec<(u64, Vec<u8>)> {
    vec![
        (4096 + 3, vec![0xa5; 777]),
        ((1 << 20) - 512, vec![0x5a; 8192]),
        (3 << 20, vec![0x11; 1 << 20]),
    ]
}

fn apply_writes(mut data: Vec<u8>) -> Vec<u8> {
    for (at, w) in writes() {
        data[at as usize..at as usize + w.len()].copy_from_slice(&w);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbd_claim_serves_a_sealed_disk_through_its_migration_then_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldMigration::default());
    let svc = Service::start(config(dir.path(), &hold, ReclaimMode::Instant))
        .await
        .unwrap();
    let path = sealed_disk(&svc, "d").await;
    let armed = hold.arm();
    svc.nbd_attach("nbd:t#1", "d").await.unwrap();
    // Served at once: the migration holds at its start, nothing moved yet.
    assert_eq!(state(&svc, "d").await, DiskState::Migrating);
    assert_eq!(svc.gate("d").state(), GateState::Open);
    assert_eq!(routing_name(&svc, "d"), "migrating");
    let io = Arc::new(svc.claim("d").await.unwrap());
    assert!(io.migrating());
    assert_eq!(io.size(), SIZE);
    let io2 = Arc::clone(&io);
    let read = blocking(move || {
        let mut buf = vec![0u8; SIZE as usize];
        io2.read_at(&mut buf[..SIZE as usize / 2], 0).unwrap();
        io2.read_at(&mut buf[SIZE as usize / 2..], SIZE / 2)
            .unwrap();
        for (at, w) in writes() {
            io2.write_at(&w, at).unwrap();
        }
        io2.flush().unwrap();
        buf
    })
    .await;
    assert!(
        read == plain(),
        "the reads during the migration differ from the plaintext"
    );
    // A disk being migrated takes neither a seal nor an unseal by hand.
    assert!(svc.seal_disk("d").await.is_err());
    assert!(svc.unseal_disk("d").await.is_err());
    drop(armed);
    // Held by the connection: attached when the migration ends, served from the file.
    reach(&svc, "d", DiskState::Attached).await;
    svc.wait_idle().await;
    assert_eq!(routing_name(&svc, "d"), "file");
    assert!(!io.migrating());
    let want = apply_writes(plain());
    let io2 = Arc::clone(&io);
    let after = blocking(move || {
        let mut buf = vec![0u8; SIZE as usize];
        io2.read_at(&mut buf, 0).unwrap();
        buf
    })
    .await;
    assert!(after == want, "the disk after its migration differs");
    assert!(std::fs::read(&path).unwrap() == want, "the file differs");
    assert!(!crate::store::file::default_record_path(&path).exists());
    // The connection leaves: an ordinary release.
    svc.nbd_detach("nbd:t#1").await;
    assert!(matches!(
        Life::of(&svc.disk("d").await.unwrap().disk),
        Life::Grace { .. }
    ));
}

/// `--reclaim copy` keeps the reclaim of before: `OPT_GO` waits for the whole unseal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_reclaim_unseals_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldMigration::default());
    let svc = Service::start(config(dir.path(), &hold, ReclaimMode::Copy))
        .await
        .unwrap();
    let path = sealed_disk(&svc, "d").await;
    svc.nbd_attach("nbd:t#1", "d").await.unwrap();
    assert_eq!(state(&svc, "d").await, DiskState::Attached);
    assert!(!hold.reached.load(Ordering::SeqCst), "a migration ran");
    assert!(std::fs::read(&path).unwrap() == plain());
}

/// A claim without any association (the client gave up before it held the disk): the
/// migration runs to its end, then the grace period, not `available` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_nobody_holds_at_its_end_enters_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldMigration::default());
    let svc = Service::start(config(dir.path(), &hold, ReclaimMode::Instant))
        .await
        .unwrap();
    let path = sealed_disk(&svc, "d").await;
    let io = svc.claim("d").await.unwrap();
    drop(io);
    reach(&svc, "d", DiskState::Grace).await;
    assert!(std::fs::read(&path).unwrap() == plain());
}

/// A daemon stopped mid-migration (the record in phase `migrating`, acknowledged and
/// flushed writes in the image): the next start resumes the migration at once, whatever
/// the registry says of the disk (migrating; sealed or failed when it was not written
/// down), and with nobody holding the disk it ends in the grace period, bit-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_resumes_a_migration_at_start() {
    for registry_says in [
        Life::Migrating,
        Life::Sealed { dangling: false },
        Life::Failed {
            error: "stopped".into(),
            dangling: false,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let hold = Arc::new(HoldMigration::default());
        let cfg = config(dir.path(), &hold, ReclaimMode::Instant);
        let svc = Service::start(cfg.clone()).await.unwrap();
        let path = sealed_disk(&svc, "d").await;
        {
            let mut st = svc.s.state.lock().await;
            let d = st.disks.get_mut("d").unwrap();
            registry_says.store(d);
            let d = d.clone();
            svc.persist(&d).unwrap();
        }
        drop(svc);
        // What the stopped daemon's migration left: one window moved, writes flushed.
        let storage = crate::store::file::ImageStorage::new(
            path.clone(),
            crate::store::file::default_record_path(&path),
            None,
        );
        let tree = crate::jobs::load_tree_for_migration(&storage, None).unwrap();
        assert!(tree.is_some(), "a new seal has a region tree");
        let opts = crate::jobs::reclaim::MigrationOptions {
            window_bytes: 1 << 20,
            ..Default::default()
        };
        let m = crate::jobs::reclaim::Migration::start(&storage, None, tree, &opts).unwrap();
        m.step().unwrap();
        for (at, w) in writes() {
            m.write(at, &w).unwrap();
        }
        m.flush().unwrap();
        drop(m);
        let phase = crate::jobs::inspect(&storage).unwrap().phase;
        assert_eq!(phase, pdguard_core::Phase::Migrating);
        let svc = Service::start(cfg).await.unwrap();
        // Resumed at start, not at the next claim; nobody holds the disk: grace.
        reach(&svc, "d", DiskState::Grace).await;
        assert!(hold.reached.load(Ordering::SeqCst), "{registry_says:?}");
        assert!(
            std::fs::read(&path).unwrap() == apply_writes(plain()),
            "{registry_says:?}: the image after the resumed migration differs"
        );
        assert!(!crate::store::file::default_record_path(&path).exists());
    }
}

/// A sealed sector corrupted after the seal: the request that needs its region gets an
/// error naming the region, and no byte of it; every later request is refused; the disk
/// turns `failed` naming the region; nothing else of the image was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_fails_its_leaf_is_never_served_and_fails_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldMigration::default());
    let svc = Service::start(config(dir.path(), &hold, ReclaimMode::Instant))
        .await
        .unwrap();
    let path = sealed_disk(&svc, "d").await;
    // Sealed sector 3: not one the record's fingerprint samples (0, (N-1)/7, ...).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 16], 3 * 512 + 40).unwrap();
    f.sync_all().unwrap();
    let armed = hold.arm();
    svc.nbd_attach("nbd:t#1", "d").await.unwrap();
    let io = Arc::new(svc.claim("d").await.unwrap());
    let io2 = Arc::clone(&io);
    let (served, first_error) = blocking(move || {
        let mut served = Vec::new();
        let mut first_error = None;
        for r in 0..SIZE >> 20 {
            let mut buf = vec![0x77u8; 1 << 20];
            match io2.read_at(&mut buf, r << 20) {
                Ok(()) => served.push((r, buf)),
                Err(e) => {
                    assert!(
                        buf.iter().all(|&b| b == 0x77),
                        "bytes of a refused region were served"
                    );
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        (served, first_error)
    })
    .await;
    let why = first_error.expect("the corrupted region was served");
    assert!(
        why.contains("does not match the seal's digest tree"),
        "{why}"
    );
    for (r, buf) in &served {
        let at = (*r << 20) as usize;
        assert!(
            buf[..] == plain()[at..at + (1 << 20)],
            "region {r} served wrong"
        );
    }
    drop(armed);
    reach(&svc, "d", DiskState::Failed).await;
    let d = svc.disk("d").await.unwrap().disk;
    let error = d.error.unwrap_or_default();
    assert!(error.contains("region "), "{error}");
    // Refused at once, not after the gate's hold.
    let io2 = Arc::clone(&io);
    let t0 = std::time::Instant::now();
    let e = blocking(move || io2.read_at(&mut [0u8; 512], 0).unwrap_err()).await;
    assert!(t0.elapsed() < CLAIM_HOLD, "{e}");
    assert!(e.to_string().contains("region "), "{e}");
    // The record still says where the data is.
    let storage = crate::store::file::ImageStorage::new(
        path.clone(),
        crate::store::file::default_record_path(&path),
        None,
    );
    assert_eq!(
        crate::jobs::inspect(&storage).unwrap().phase,
        pdguard_core::Phase::Migrating
    );
}
