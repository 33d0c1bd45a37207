//! The service's life cycle end to end, without dockerd or NBD sockets: jobs keep their
//! typed error, a reclaim whose caller gave up leaves the disk sealed again after its grace,
//! and the volume plugin's name checks and per-name locks.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex as StdMutex;

use pdguard_core::Profile;

use super::*;
use crate::gate::SealedIo;
use crate::registry::VolumeSpec;

/// Holds the first pass of the first unseal after `arm()` until `release()`.
#[derive(Default)]
struct HoldUnseal {
    armed: AtomicBool,
    held: StdMutex<bool>,
    cv: std::sync::Condvar,
    reached: AtomicBool,
}

impl HoldUnseal {
    fn arm(&self) {
        *self.held.lock().unwrap() = true;
        self.armed.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

impl Progress for HoldUnseal {
    fn pass(&self, _name: &'static str, _total: u64) {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        self.reached.store(true, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.cv.wait(held).unwrap();
        }
    }
}

struct Env {
    _dir: tempfile::TempDir,
    svc: Service,
    hold: Arc<HoldUnseal>,
}

async fn env(grace: Duration) -> Env {
    env_mount_timeout(grace, crate::service::DOCKER_MOUNT_TIMEOUT).await
}

/// [`env`] whose Docker Mounts wait at most `mount_timeout` for a reclaim.
async fn env_mount_timeout(grace: Duration, mount_timeout: Duration) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldUnseal::default());
    let svc = Service::start(Config {
        state_dir: dir.path().join("state"),
        grace,
        profile: Profile::Patent,
        master_key: None,
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: crate::jobs::SealOptions::default().strategy,
        seal_stopped: false,
        observer: Some(Observer(hold.clone())),
        docker_mount_timeout: mount_timeout,
        reclaim: crate::service::ReclaimMode::Copy,
    })
    .await
    .unwrap();
    Env {
        _dir: dir,
        svc,
        hold,
    }
}

/// A disk holding data that is not all zeros, sealed.
async fn sealed_disk(svc: &Service, name: &str) -> PathBuf {
    let v = svc.create_disk(name, 64 * 1024, None).await.unwrap();
    let path = v.disk.path.clone();
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    svc.seal_disk(name).await.unwrap();
    assert_eq!(state(svc, name).await, DiskState::Sealed);
    path
}

async fn state(svc: &Service, name: &str) -> DiskState {
    svc.disk(name).await.unwrap().disk.state
}

/// Tick until `name` is `want` (bounded).
async fn settle(svc: &Service, name: &str, want: DiskState) {
    for _ in 0..200 {
        svc.tick().await;
        svc.wait_idle().await;
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

fn tamper(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1000).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], 1000).unwrap();
    f.sync_all().unwrap();
}

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unseal_that_fails_verification_says_so_typed() {
    let e = env(Duration::from_secs(3600)).await;
    let path = sealed_disk(&e.svc, "d").await;
    tamper(&path);
    let err = e.svc.unseal_disk("d").await.unwrap_err();
    assert_eq!(err.code(), "verification_failed", "{err}");
    assert_eq!(err.http_status(), 422);
    let text = crate::error_chain(&err);
    assert!(text.contains("disk \"d\": unseal failed"), "{text}");
    assert!(text.contains("digest"), "the cause is named: {text}");
    // A reclaim (container up) that meets the same failure says the same.
    let err = e
        .svc
        .container_up("c1", &["d".to_string()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "verification_failed", "{err}");
    assert_eq!(state(&e.svc, "d").await, DiskState::Failed);
    // The container did not come up.
    assert!(e.svc.containers().await.is_empty());
    // Both failures are counted: the jobs, and the disk entering `failed` each time.
    let m = e.svc.metrics_text().await;
    for line in [
        "pdguard_jobs_failed_total{kind=\"unseal\"} 2\n",
        "pdguard_jobs_finished_total{kind=\"unseal\"} 2\n",
        "pdguard_jobs_failed_total{kind=\"seal\"} 0\n",
        "pdguard_disk_failures_total 2\n",
        "pdguard_disks{state=\"failed\"} 1\n",
    ] {
        assert!(m.contains(line), "{line:?} missing:\n{m}");
    }
}

/// With one job slot, a second unseal waits in the queue while the first runs: the backlog
/// gauges say so, and both end in the duration histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_is_counted_queued_then_running() {
    let e = env(Duration::from_secs(3600)).await;
    sealed_disk(&e.svc, "a").await;
    sealed_disk(&e.svc, "b").await;
    e.hold.arm();
    // A failed assertion must not leave the job held: the runtime waits for it at its end.
    struct Release(Arc<HoldUnseal>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let release = Release(e.hold.clone());
    let (s1, s2) = (e.svc.clone(), e.svc.clone());
    let first = tokio::spawn(async move { s1.unseal_disk("a").await });
    while !e.hold.reached.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn(async move { s2.unseal_disk("b").await });
    let want = [
        "pdguard_jobs{kind=\"unseal\",state=\"running\"} 1\n",
        "pdguard_jobs{kind=\"unseal\",state=\"queued\"} 1\n",
        "pdguard_disks{state=\"unsealing\"} 2\n",
    ];
    let mut m = String::new();
    for _ in 0..200 {
        m = e.svc.metrics_text().await;
        if want.iter().all(|l| m.contains(l)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for line in want {
        assert!(m.contains(line), "{line:?} missing:\n{m}");
    }
    assert!(m.contains("pdguard_oldest_job_start_time_seconds "), "{m}");
    drop(release);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    let m = e.svc.metrics_text().await;
    for line in [
        "pdguard_jobs{kind=\"unseal\",state=\"running\"} 0\n",
        "pdguard_jobs{kind=\"unseal\",state=\"queued\"} 0\n",
        "pdguard_job_duration_seconds_count{kind=\"unseal\"} 2\n",
        "pdguard_job_duration_seconds_count{kind=\"seal\"} 2\n",
        "pdguard_jobs_started_total{kind=\"unseal\"} 2\n",
        "pdguard_disks{state=\"available\"} 2\n",
    ] {
        assert!(m.contains(line), "{line:?} missing:\n{m}");
    }
    assert!(!m.contains("pdguard_oldest_job"), "{m}");
    assert!(
        !m.contains("pdguard_moved_bytes_total{kind=\"unseal\"} 0\n"),
        "{m}"
    );
}

/// `container up` whose client gives up while the unseal runs: once the unseal ends, the
/// disk has no operational container, so it enters its grace period and is sealed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_whose_client_gave_up_is_sealed_again() {
    let e = env(Duration::from_millis(50)).await;
    sealed_disk(&e.svc, "d").await;
    e.hold.arm();
    let disks = ["d".to_string()];
    let up = e.svc.container_up("c1", &disks);
    let r = tokio::time::timeout(Duration::from_millis(300), up).await;
    assert!(r.is_err(), "the unseal was not held");
    assert!(e.hold.reached.load(Ordering::SeqCst));
    assert_eq!(state(&e.svc, "d").await, DiskState::Unsealing);
    e.hold.release();
    settle(&e.svc, "d", DiskState::Sealed).await;
    let d = e.svc.disk("d").await.unwrap();
    assert!(d.disk.dangling, "{:?}", d.disk);
    assert!(d.containers.is_empty(), "{:?}", d.containers);
}

/// The same for an NBD connection that goes away during `NBD_OPT_GO`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbd_client_gone_mid_handshake_leaves_the_disk_sealed_again() {
    let e = env(Duration::from_millis(50)).await;
    sealed_disk(&e.svc, "d").await;
    e.hold.arm();
    let go = e.svc.nbd_attach("nbd:unix:pid1:1", "d");
    assert!(tokio::time::timeout(Duration::from_millis(300), go)
        .await
        .is_err());
    e.hold.release();
    settle(&e.svc, "d", DiskState::Sealed).await;
    assert!(e.svc.containers().await.is_empty());
}

/// A Docker Mount of a sealed volume whose unseal outlasts the Mount's limit answers at the
/// limit — naming the volume, how far the unseal is and what to do — and forgets its Mount
/// ID; the unseal goes on to its end, and with nobody mounting the volume again it enters
/// its grace period and is sealed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_that_outlasts_its_limit_fails_fast_and_the_volume_is_sealed_again() {
    let e = env_mount_timeout(Duration::from_millis(50), Duration::from_millis(300)).await;
    volume(&e.svc, "v", Profile::Patent).await;
    let path = e.svc.disk("v").await.unwrap().disk.path;
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    e.svc.seal_disk("v").await.unwrap();
    e.hold.arm();
    let t = std::time::Instant::now();
    let mount = tokio::time::timeout(Duration::from_secs(5), e.svc.volume_mount("v", "id1"));
    let err = mount.await.expect("the Mount hangs").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(err.code(), "reclaim_running", "{err}");
    assert_eq!(err.http_status(), 503);
    let text = err.to_string();
    assert!(
        text.contains("volume \"v\"")
            && text.contains(
                "the unseal is still running after 300 ms (0.0 MiB of 0.1 MiB unsealed, 0 %; a volume created with `-o reclaim=instant` is served at once instead)"
            )
            && text.contains("retry `docker run` in a moment")
            && !text.contains('\n'),
        "{text}"
    );
    assert!(e.hold.reached.load(Ordering::SeqCst));
    assert_eq!(state(&e.svc, "v").await, DiskState::Unsealing);
    assert!(
        e.svc.s.state.lock().await.mounts.is_empty(),
        "the Mount ID is kept"
    );
    e.hold.release();
    settle(&e.svc, "v", DiskState::Sealed).await;
    let d = e.svc.disk("v").await.unwrap();
    assert!(d.disk.dangling, "{:?}", d.disk);
    // Sealed again from the unsealed data: a later unseal gives it back bit-exact.
    e.svc.unseal_disk("v").await.unwrap();
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the data came back changed"
    );
}

/// How far a reclaim is, as a Mount that waited for it says: both passes of an unseal count
/// half each; a seal in flight and a queued unseal say so.
#[test]
fn how_far_a_reclaim_is() {
    let p = |job, pass, done_bytes| super::JobProgress {
        job,
        pass,
        done_bytes,
        total_bytes: 64 << 20,
    };
    let far = |p: Option<&super::JobProgress>| {
        super::volumes::how_far(Some(DiskState::Unsealing), p, "3 s")
    };
    assert_eq!(
        far(Some(&p("unseal", "scatter", 32 << 20))),
        "the unseal is still running after 3 s (16.0 MiB of 64.0 MiB unsealed, 25 %; a volume created with `-o reclaim=instant` is served at once instead)"
    );
    assert_eq!(
        far(Some(&p("unseal", "gather", 32 << 20))),
        "the unseal is still running after 3 s (48.0 MiB of 64.0 MiB unsealed, 75 %; a volume created with `-o reclaim=instant` is served at once instead)"
    );
    assert_eq!(
        far(Some(&p("unseal", "gather", 1 << 40))),
        "the unseal is still running after 3 s (64.0 MiB of 64.0 MiB unsealed, 100 %; a volume created with `-o reclaim=instant` is served at once instead)"
    );
    let big = super::JobProgress {
        total_bytes: 4 << 30,
        ..p("unseal", "scatter", 1 << 30)
    };
    assert_eq!(
        far(Some(&big)),
        "the unseal is still running after 3 s (0.5 GiB of 4.0 GiB unsealed, 12 %; a volume created with `-o reclaim=instant` is served at once instead)"
    );
    assert_eq!(
        far(Some(&p("seal", "gather", 1 << 20))),
        "after 3 s, a seal in flight is still being completed before the unseal (pass gather: 1.0 MiB of 64.0 MiB)"
    );
    assert!(
        super::volumes::how_far(Some(DiskState::Sealing), None, "3 s").contains("a seal in flight")
    );
    assert!(far(None).contains("job queue"));
    // An instant volume whose file system was not mounted in time: served, not a seal.
    assert_eq!(
        far(Some(&p("migrate", "evacuate", 16 << 20))),
        "after 3 s, the volume is served through its migration but its file system is not mounted yet (pass evacuate: 16.0 MiB of 64.0 MiB)"
    );
}

/// A daemon that stopped while a reclaim's unseal ran (nobody holds the disk after the
/// restart) resumes the unseal, and the disk then enters its grace period and is sealed
/// again: the same rule as for a client that gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_reclaim_with_nobody_holding_the_disk_seals_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        state_dir: dir.path().join("state"),
        grace: Duration::from_millis(50),
        profile: Profile::Patent,
        master_key: None,
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: crate::jobs::SealOptions::default().strategy,
        seal_stopped: false,
        observer: None,
        docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
        reclaim: crate::service::ReclaimMode::Copy,
    };
    let svc = Service::start(cfg.clone()).await.unwrap();
    let path = sealed_disk(&svc, "d").await;
    let data = {
        // As a daemon stopped right after a reclaim started its unseal leaves the registry.
        let mut st = svc.s.state.lock().await;
        let d = st.disks.get_mut("d").unwrap();
        Life::Unsealing { reclaim: true }.store(d);
        let d = d.clone();
        svc.persist(&d).unwrap();
        std::fs::metadata(&path).unwrap().len()
    };
    drop(svc);
    let svc = Service::start(cfg).await.unwrap();
    settle(&svc, "d", DiskState::Sealed).await;
    let d = svc.disk("d").await.unwrap();
    assert!(d.disk.dangling, "{:?}", d.disk);
    assert!(d.containers.is_empty());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), data);
}

/// `disk unseal` by hand with no container leaves the disk available (not resealed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unseal_by_hand_stays_unsealed() {
    let e = env(Duration::from_millis(10)).await;
    sealed_disk(&e.svc, "d").await;
    e.svc.unseal_disk("d").await.unwrap();
    for _ in 0..10 {
        e.svc.tick().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&e.svc, "d").await, DiskState::Available);
}

/// A volume disk without a file system (the checks run before any mount).
async fn volume(svc: &Service, name: &str, profile: Profile) {
    svc.create_disk(name, 64 * 1024, None).await.unwrap();
    let mut st = svc.s.state.lock().await;
    let d = st.disks.get_mut(name).unwrap();
    d.volume = Some(VolumeSpec {
        fs: "ext4".into(),
        profile,
        keep_holes: false,
        grace_ms: None,
        reclaim: crate::registry::VolumeReclaim::Copy,
    });
    let d = d.clone();
    svc.persist(&d).unwrap();
}

#[tokio::test]
async fn a_grace_past_the_end_of_time_is_refused_at_volume_create() {
    let e = env(Duration::from_secs(1)).await;
    let opts: BTreeMap<String, String> = [
        ("size", "8M"),
        ("grace", "18446744073709551615ms"),
        ("profile", "patent"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let err = e.svc.volume_create("g", &opts).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("grace") && text.contains("18446744073709551615ms"),
        "{text}"
    );
    assert!(e.svc.disks().await.is_empty(), "nothing was made");
}

#[tokio::test]
async fn unknown_and_overlong_volume_names_leave_no_lock_behind() {
    let e = env(Duration::from_secs(1)).await;
    let long = "v".repeat(60_000);
    for i in 0..1500 {
        let name = if i % 2 == 0 {
            format!("{long}{i}")
        } else {
            format!("unknown-{i}")
        };
        let err = e.svc.volume_mount(&name, "abc").await.unwrap_err();
        assert!(err.to_string().len() < 400, "the message echoes the name");
        assert!(e.svc.volume_unmount(&name, "abc").await.is_err());
    }
    assert_eq!(lock(&e.svc.s.volumes.locks).len(), 0);
    assert!(e.svc.s.state.lock().await.mounts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_sealed_patent_volume_says_what_to_do() {
    let e = env(Duration::from_secs(1)).await;
    volume(&e.svc, "p", Profile::Patent).await;
    let path = e.svc.disk("p").await.unwrap().disk.path;
    std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
    e.svc.seal_disk("p").await.unwrap();
    let text = e.svc.volume_remove("p").await.unwrap_err().to_string();
    assert!(
        text.contains("pdguard disk unseal p") && text.contains("--keep-file"),
        "{text}"
    );
    assert!(!text.contains("--shred"), "{text}");
    assert_eq!(state(&e.svc, "p").await, DiskState::Sealed);
}

#[tokio::test]
async fn a_planted_mountpoint_is_refused_and_fails_the_volume() {
    let e = env(Duration::from_secs(1)).await;
    volume(&e.svc, "m", Profile::Patent).await;
    let mounts = e.svc.s.cfg.state_dir.join("mounts");
    std::fs::create_dir_all(&mounts).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), mounts.join("m")).unwrap();
    let text = e
        .svc
        .volume_mount("m", "id1")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("symbolic link") && text.contains("rm "),
        "{text}"
    );
    let d = e.svc.disk("m").await.unwrap().disk;
    assert_eq!(d.state, DiskState::Failed);
    assert!(d.error.unwrap().contains("symbolic link"));
    // A plain file is refused the same way.
    std::fs::remove_file(mounts.join("m")).unwrap();
    std::fs::write(mounts.join("m"), b"x").unwrap();
    let text = e
        .svc
        .volume_mount("m", "id1")
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("not a directory"), "{text}");
    assert!(e.svc.s.state.lock().await.mounts.is_empty());
}

#[tokio::test]
async fn the_state_dir_is_canonical() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
    for given in [
        dir.path().join("link"),
        dir.path().join("real").join("..").join("real"),
    ] {
        let svc = Service::start(Config {
            state_dir: given,
            grace: Duration::from_secs(1),
            profile: Profile::Patent,
            master_key: None,
            sealed_io: SealedIo::ReadOnly,
            jobs: 1,
            sector_size: 512,
            strategy: crate::jobs::SealOptions::default().strategy,
            seal_stopped: false,
            observer: None,
            docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
            reclaim: crate::service::ReclaimMode::Copy,
        })
        .await
        .unwrap();
        let real = std::fs::canonicalize(dir.path().join("real")).unwrap();
        assert_eq!(svc.config().state_dir, real);
        assert_eq!(svc.mount_dir("v"), real.join("mounts").join("v"));
    }
}

/// A volume mounted on pdguard's own mountpoint with no Mount of dockerd holding it (a Mount
/// abandoned while its `mount` ran): the unmount becomes pending, is retried, and the
/// volume is sealed once it is let go. A loop device attached by someone else is not
/// touched (see `a_disk_the_kernel_holds_is_not_sealed`). Needs root (a loop mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_mount_is_unmounted_and_the_volume_sealed() {
    let e = env(Duration::ZERO).await;
    let name = "left";
    e.svc.create_disk(name, 8 << 20, None).await.unwrap();
    {
        let mut st = e.svc.s.state.lock().await;
        let d = st.disks.get_mut(name).unwrap();
        d.volume = Some(VolumeSpec {
            fs: "ext4".into(),
            profile: Profile::Patent,
            keep_holes: false,
            grace_ms: None,
            reclaim: crate::registry::VolumeReclaim::Copy,
        });
        let d = d.clone();
        e.svc.persist(&d).unwrap();
    }
    let file = e.svc.disk(name).await.unwrap().disk.path;
    crate::store::loopfs::mkfs(&file, "ext4").expect("mkfs.ext4 (e2fsprogs) is needed");
    let dir = e.svc.mount_dir(name);
    crate::store::loopfs::mount(&file, &dir).expect("a loop mount needs root");
    struct Unmount(PathBuf, PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = crate::store::loopfs::unmount(&self.0, &self.1);
        }
    }
    let _cleanup = Unmount(file.clone(), dir.clone());
    e.svc.container_up("c1", &[name.to_string()]).await.unwrap();
    e.svc
        .container_down("c1", ContainerState::Removed)
        .await
        .unwrap();
    e.svc.tick().await;
    assert_eq!(state(&e.svc, name).await, DiskState::Grace);
    assert!(e.svc.disk(name).await.unwrap().unmount_pending);
    e.svc.retry_unmounts().await;
    settle(&e.svc, name, DiskState::Sealed).await;
    assert!(!crate::store::loopfs::is_mountpoint(&dir).unwrap());
    assert!(!e.svc.disk(name).await.unwrap().unmount_pending);
}

/// Seal `path` offline, as `pdguard image seal` does (patent profile: no key needed).
fn seal_offline(path: &Path) {
    let storage = crate::store::file::ImageStorage::new(
        path.to_path_buf(),
        crate::store::file::default_record_path(path),
        None,
    );
    crate::jobs::seal(
        &storage,
        &crate::jobs::SealOptions::default(),
        &crate::jobs::NoProgress,
    )
    .unwrap();
}

fn plain_data() -> Vec<u8> {
    (0..64 * 1024u32).map(|i| (i * 13 % 253) as u8).collect()
}

/// A file sealed offline and then adopted (its record beside it), or sealed offline while
/// the daemon held it unused, holds sealed data: a reclaim unseals it and checks its
/// digests before the container comes up, and the container gets the plaintext, never the
/// scrambled bytes. A tampered one fails the reclaim (verification failed), the disk
/// `failed` and its gate closed, the container not up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_sealed_outside_the_daemon_is_unsealed_before_any_use() {
    let e = env(Duration::from_secs(3600)).await;
    let outside = e._dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for (i, when) in ["before adoption", "after adoption", "tampered"]
        .into_iter()
        .enumerate()
    {
        let name = format!("o{i}");
        let path = outside.join(format!("{name}.img"));
        std::fs::write(&path, plain_data()).unwrap();
        if when != "after adoption" {
            seal_offline(&path);
        }
        if when == "tampered" {
            tamper(&path);
        }
        e.svc
            .create_disk(&name, 64 * 1024, Some(path.clone()))
            .await
            .unwrap();
        let adopted = state(&e.svc, &name).await;
        if when == "after adoption" {
            assert_eq!(adopted, DiskState::Available);
            seal_offline(&path);
        } else {
            assert_eq!(adopted, DiskState::Sealed, "{when}");
            assert_eq!(
                e.svc.gate(&name).state(),
                GateState::Sealed(SealedIo::ReadOnly)
            );
        }
        assert!(
            std::fs::read(&path).unwrap() != plain_data(),
            "{when}: not sealed"
        );
        let up = e
            .svc
            .container_up(&format!("c{i}"), std::slice::from_ref(&name))
            .await;
        if when == "tampered" {
            let err = up.unwrap_err();
            assert_eq!(err.code(), "verification_failed", "{err}");
            assert_eq!(state(&e.svc, &name).await, DiskState::Failed);
            assert_eq!(e.svc.gate(&name).state(), GateState::Blocked);
            assert!(e
                .svc
                .containers()
                .await
                .iter()
                .all(|c| c.container.id != "c2"));
            continue;
        }
        up.unwrap();
        assert_eq!(state(&e.svc, &name).await, DiskState::Attached, "{when}");
        assert!(
            std::fs::read(&path).unwrap() == plain_data(),
            "{when}: not plaintext"
        );
        assert!(!crate::store::file::default_record_path(&path).exists());
        assert_eq!(e.svc.gate(&name).state(), GateState::Open);
    }
}

/// A FIFO planted at a sealed disk's key slot (secure profile): `disk unseal` and a
/// reclaim are refused within a second, naming the slot and the FIFO, the disk `failed`;
/// no job slot or image lock is left held (another disk still seals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_key_slot_fails_the_daemons_unseal_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(Config {
        state_dir: dir.path().join("state"),
        grace: Duration::from_secs(3600),
        profile: Profile::Secure,
        master_key: Some(MasterKey::from_bytes([7; 32])),
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: crate::jobs::SealOptions::default().strategy,
        seal_stopped: false,
        observer: None,
        docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
        reclaim: crate::service::ReclaimMode::Copy,
    })
    .await
    .unwrap();
    let path = sealed_disk(&svc, "k").await;
    let slot = {
        let mut s = crate::store::file::default_record_path(&path).into_os_string();
        s.push(pdguard_core::keyslot::SLOT_SUFFIX);
        PathBuf::from(s)
    };
    assert!(slot.is_file(), "a secure seal has a key slot");
    std::fs::remove_file(&slot).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &slot,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let err = svc.unseal_disk("k").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let text = crate::error_chain(&err);
    assert!(
        text.contains("FIFO") && text.contains(&slot.display().to_string()),
        "{text}"
    );
    let v = svc.disk("k").await.unwrap();
    assert_eq!(v.disk.state, DiskState::Failed);
    assert!(v.disk.error.unwrap_or_default().contains("FIFO"));
    let t = std::time::Instant::now();
    let err = svc.container_up("c", &["k".to_string()]).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(crate::error_chain(&err).contains("FIFO"), "{err}");
    assert_eq!(state(&svc, "k").await, DiskState::Failed);
    // The only job slot is free: another disk seals.
    sealed_disk(&svc, "other").await;
}
