//! The association policy against a fake dockerd: which events and which resyncs make a
//! volume dangling, and which must not.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex as StdMutex;

use pdguard_core::Profile;

use super::*;
use crate::gate::SealedIo;
use crate::registry::{VolumeMounts, VolumeSpec};
use crate::service::Config;

/// dockerd's calls, counted: a resync's cost.
#[derive(Default)]
struct Calls {
    lists: AtomicUsize,
    inspects: AtomicUsize,
}

impl Calls {
    fn total(&self) -> usize {
        self.lists.load(Ordering::SeqCst) + self.inspects.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Fake {
    up: AtomicBool,
    containers: StdMutex<Vec<DockerContainer>>,
    calls: Arc<Calls>,
    /// Drivers dockerd was asked to activate, in order.
    activated: StdMutex<Vec<String>>,
    /// Fail this many activations with a protocol error first.
    refuse_activations: AtomicUsize,
}

impl Fake {
    fn up(containers: Vec<DockerContainer>) -> Self {
        Self {
            up: AtomicBool::new(true),
            containers: StdMutex::new(containers),
            ..Self::default()
        }
    }

    fn activations(&self) -> usize {
        self.activated.lock().unwrap().len()
    }

    fn all(&self) -> Result<Vec<DockerContainer>, DockerError> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(DockerError::Unreachable {
                at: "fake".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        Ok(self.containers.lock().unwrap().clone())
    }
}

impl DockerApi for Fake {
    /// As dockerd's client does it: one list, then one inspect per container.
    async fn containers(&self, driver: &str) -> Result<Vec<DockerContainer>, DockerError> {
        let mut out = Vec::new();
        for l in self.list(driver).await? {
            out.extend(self.inspect(&l.id, driver).await?);
        }
        Ok(out)
    }

    async fn list(&self, _driver: &str) -> Result<Vec<Listed>, DockerError> {
        self.calls.lists.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .all()?
            .into_iter()
            .map(|c| Listed {
                id: c.id,
                state: c.state,
            })
            .collect())
    }

    async fn inspect(
        &self,
        id: &str,
        _driver: &str,
    ) -> Result<Option<DockerContainer>, DockerError> {
        self.calls.inspects.fetch_add(1, Ordering::SeqCst);
        Ok(self.all()?.into_iter().find(|c| c.id == id))
    }

    async fn activate(&self, driver: &str) -> Result<(), DockerError> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(DockerError::Unreachable {
                at: "fake".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        let refuse = self.refuse_activations.load(Ordering::SeqCst);
        if refuse > 0 {
            self.refuse_activations.store(refuse - 1, Ordering::SeqCst);
            return Err(DockerError::Protocol {
                at: "fake".into(),
                path: "/volumes".into(),
                why: "HTTP 500".into(),
            });
        }
        self.activated.lock().unwrap().push(driver.into());
        Ok(())
    }

    async fn events(&self, _tx: mpsc::Sender<DockerEvent>) -> Result<(), DockerError> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(DockerError::Unreachable {
                at: "fake".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        std::future::pending().await
    }
}

struct Env {
    _dir: tempfile::TempDir,
    svc: Service,
}

async fn env(seal_stopped: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(Config {
        state_dir: dir.path().join("state"),
        grace: Duration::ZERO,
        profile: Profile::Patent,
        master_key: None,
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: crate::jobs::SealOptions::default().strategy,
        seal_stopped,
        observer: None,
        docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
        reclaim: crate::service::ReclaimMode::Copy,
    })
    .await
    .unwrap();
    Env { _dir: dir, svc }
}

/// A registered volume (no file system: the policy does not look inside).
async fn volume(svc: &Service, name: &str) {
    svc.create_disk(name, 64 * 1024, None).await.unwrap();
    let mut st = svc.s.state.lock().await;
    let d = st.disks.get_mut(name).unwrap();
    d.volume = Some(VolumeSpec {
        fs: "ext4".into(),
        profile: Profile::Patent,
        keep_holes: false,
        grace_ms: None,
        reclaim: crate::registry::VolumeReclaim::Copy,
    });
    let d = d.clone();
    svc.persist(&d).unwrap();
}

async fn state(svc: &Service, name: &str) -> DiskState {
    svc.tick().await;
    svc.wait_idle().await;
    svc.disk(name).await.unwrap().disk.state
}

fn follower(svc: &Service, fake: Fake) -> Follower<Fake> {
    Follower {
        svc: svc.clone(),
        api: Arc::new(fake),
        driver: "pd".into(),
        kills: HashMap::new(),
        cache: cache::Cache::default(),
        activated: false,
    }
}

fn mount(v: &str, c: &str) -> DockerEvent {
    DockerEvent::VolumeMount {
        volume: v.into(),
        container: c.into(),
        driver: "pd".into(),
    }
}

fn died(c: &str, exit_code: i64) -> DockerEvent {
    DockerEvent::Die {
        container: c.into(),
        exit_code,
        task: false,
    }
}

/// A Swarm task's container died.
fn task_died(c: &str, exit_code: i64) -> DockerEvent {
    DockerEvent::Die {
        container: c.into(),
        exit_code,
        task: true,
    }
}

fn destroy(c: &str) -> DockerEvent {
    DockerEvent::Destroy {
        container: c.into(),
    }
}

fn kill(c: &str) -> DockerEvent {
    DockerEvent::Kill {
        container: c.into(),
    }
}

fn exited(id: &str, exit_code: i64, restarts: bool, volumes: &[&str]) -> DockerContainer {
    DockerContainer {
        id: id.into(),
        state: RunState::Exited,
        exit_code,
        restarts,
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        task: false,
    }
}

#[test]
fn how_a_dead_container_counts() {
    assert_eq!(
        down_kind(true, 3, false, false),
        Some(ContainerState::Stopped)
    );
    assert_eq!(
        down_kind(false, 0, false, false),
        Some(ContainerState::Stopped)
    );
    assert_eq!(
        down_kind(false, 3, false, false),
        Some(ContainerState::Crashed)
    );
    assert_eq!(down_kind(false, 3, true, false), None);
    assert_eq!(
        exited_kind(143, false, false),
        Some(ContainerState::Stopped)
    );
    assert_eq!(
        exited_kind(137, false, false),
        Some(ContainerState::Stopped)
    );
    assert_eq!(exited_kind(1, false, false), Some(ContainerState::Crashed));
    // A Swarm task's container never runs again, however it stopped.
    for (killed, code) in [(true, 137), (false, 0), (false, 3)] {
        assert_eq!(
            down_kind(killed, code, false, true),
            Some(ContainerState::Removed)
        );
    }
    assert_eq!(exited_kind(137, false, true), Some(ContainerState::Removed));
    assert_eq!(exited_kind(0, false, true), Some(ContainerState::Removed));
}

/// `docker service update --constraint-add` (or a drain) stops the task's container with
/// SIGTERM then SIGKILL and keeps it as the task's history: its volume is dangling at once,
/// where a plain container stopped so keeps its volume.
#[tokio::test]
async fn a_stopped_swarm_task_leaves_its_volume_dangling() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "task1")).await;
    f.apply(mount("w", "plain")).await;
    for c in ["task1", "plain"] {
        f.apply(kill(c)).await;
    }
    f.apply(task_died("task1", 137)).await;
    f.apply(died("plain", 137)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
    // Swarm prunes the task history later: the destroy changes nothing more.
    f.apply(destroy("task1")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
}

/// The task's `die` was missed (pdguard down, or counted as a plain stop before): the
/// resync finds the exited task container and retires it.
#[tokio::test]
async fn a_resync_retires_an_exited_swarm_task() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    volume(&e.svc, "x").await;
    let mut f = follower(&e.svc, Fake::default());
    for (v, c) in [("v", "t1"), ("w", "t2"), ("x", "plain")] {
        f.apply(mount(v, c)).await;
    }
    // t2 was recorded as a plain stop (its die event read without its labels).
    f.apply(kill("t2")).await;
    f.apply(died("t2", 143)).await;
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
    let task = |id: &str, code: i64, v: &str| DockerContainer {
        task: true,
        ..exited(id, code, false, &[v])
    };
    let docker = [
        task("t1", 137, "v"),
        task("t2", 143, "w"),
        exited("plain", 137, false, &["x"]),
    ];
    e.svc.docker_resync(&docker).await.unwrap();
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "w").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "x").await, DiskState::Attached);
}

/// dockerd lists a legacy plugin (and Swarm places a task using it) only once something
/// used it: the follower asks dockerd to activate it on the first answer and again after
/// every time dockerd was unreachable (it may have restarted), not at every resync.
#[tokio::test]
async fn the_plugin_is_activated_on_start_and_after_dockerd_returns() {
    let e = env(false).await;
    let mut f = follower(&e.svc, Fake::up(Vec::new()));
    f.resync().await.unwrap();
    f.resync().await.unwrap();
    assert_eq!(*f.api.activated.lock().unwrap(), vec!["pd".to_string()]);
    f.api.up.store(false, Ordering::SeqCst);
    assert!(f.resync().await.is_err());
    f.api.up.store(true, Ordering::SeqCst);
    f.resync().await.unwrap();
    f.resync().await.unwrap();
    assert_eq!(f.api.activations(), 2);
    // A refused activation is tried again at the next resync.
    f.activated = false;
    f.api.refuse_activations.store(1, Ordering::SeqCst);
    f.resync().await.unwrap();
    assert_eq!(f.api.activations(), 2);
    f.resync().await.unwrap();
    assert_eq!(f.api.activations(), 3);
}

/// The whole loop: the event stream of a restarted dockerd ends, and the follower
/// activates the plugin again once it answers.
#[tokio::test]
async fn follow_docker_activates_the_plugin_again_after_a_restart() {
    let e = env(false).await;
    let fake = Arc::new(Fake::up(Vec::new()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let svc = e.svc.clone();
    let api = Arc::clone(&fake);
    let task = tokio::spawn(async move {
        svc.follow_docker(api, "pd".into(), Duration::from_millis(20), stop_rx)
            .await
    });
    let wait_for = |n: usize| {
        let fake = Arc::clone(&fake);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while fake.activations() < n {
                assert!(
                    Instant::now() < deadline,
                    "{} activations",
                    fake.activations()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.activations(), 1, "activated again without a restart");
    fake.up.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.svc.docker_status().is_some_and(|s| s.reachable) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.up.store(true, Ordering::SeqCst);
    wait_for(2).await;
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_stopped_container_keeps_its_volume_until_removed() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Attached);
    f.apply(kill("c1")).await;
    f.apply(died("c1", 143)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Attached);
    f.apply(destroy("c1")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert!(e.svc.s.state.lock().await.containers.is_empty());
}

#[tokio::test]
async fn with_seal_stopped_a_stop_seals() {
    let e = env(true).await;
    volume(&e.svc, "v").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    f.apply(kill("c1")).await;
    f.apply(died("c1", 0)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
}

#[tokio::test]
async fn a_crash_seals_unless_a_restart_is_coming() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    let fake = Fake::up(vec![
        exited("c1", 3, false, &["v"]),
        exited("c2", 3, true, &["w"]),
    ]);
    let mut f = follower(&e.svc, fake);
    f.apply(mount("v", "c1")).await;
    f.apply(mount("w", "c2")).await;
    f.apply(died("c1", 3)).await;
    f.apply(died("c2", 3)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
}

#[tokio::test]
async fn two_containers_seal_only_when_both_are_gone() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    f.apply(mount("v", "c2")).await;
    f.apply(destroy("c1")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Attached);
    f.apply(destroy("c2")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
}

#[tokio::test]
async fn events_of_other_drivers_and_unknown_containers_change_nothing() {
    let e = env(true).await;
    volume(&e.svc, "v").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(DockerEvent::VolumeMount {
        volume: "v".into(),
        container: "c1".into(),
        driver: "local".into(),
    })
    .await;
    f.apply(died("c9", 3)).await;
    f.apply(destroy("c9")).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Available);
    assert!(e.svc.s.state.lock().await.containers.is_empty());
}

/// The container was removed while pdguard was down: the resync finds it gone, forgets
/// the stale mount (old enough) and the volume is sealed. A young mount is kept.
#[tokio::test]
async fn a_resync_finds_what_was_missed() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    f.apply(mount("w", "c2")).await;
    for (name, age) in [("v", 60_000), ("w", 0)] {
        let m = VolumeMounts {
            ids: vec!["id1".into()],
            last_mount_ms: now_ms() - age,
            unmount_pending: false,
        };
        e.svc.s.registry.put_mounts(name, &m).unwrap();
        e.svc.s.state.lock().await.mounts.insert(name.into(), m);
    }
    e.svc.docker_resync(&[]).await.unwrap();
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
    assert!(e
        .svc
        .s
        .registry
        .mounts()
        .unwrap()
        .iter()
        .all(|(n, _)| n == "w"));
}

/// A resync reconciles only what came from dockerd: an NBD connection and a `container up`
/// on a volume are not in dockerd's list, and stay.
#[tokio::test]
async fn a_resync_keeps_nbd_and_api_associations() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    volume(&e.svc, "x").await;
    e.svc.nbd_attach("nbd:unix:pid7:1", "v").await.unwrap();
    e.svc
        .container_up("job-1", &["w".to_string()])
        .await
        .unwrap();
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("x", "c1")).await;
    for _ in 0..3 {
        e.svc.docker_resync(&[]).await.unwrap();
    }
    assert_eq!(state(&e.svc, "v").await, DiskState::Attached);
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
    // dockerd's own container is gone from its list: that one is reconciled.
    assert_eq!(state(&e.svc, "x").await, DiskState::Sealed);
    let ids: Vec<String> = e
        .svc
        .containers()
        .await
        .into_iter()
        .map(|c| c.container.id)
        .collect();
    assert!(ids.contains(&"nbd:unix:pid7:1".to_string()), "{ids:?}");
    assert!(ids.contains(&"job-1".to_string()), "{ids:?}");
}

#[tokio::test]
async fn a_resync_tells_a_crash_from_a_stop_by_exit_code() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    volume(&e.svc, "w").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    f.apply(mount("w", "c2")).await;
    let docker = [
        exited("c1", 2, false, &["v"]),
        exited("c2", 143, false, &["w"]),
    ];
    e.svc.docker_resync(&docker).await.unwrap();
    assert_eq!(state(&e.svc, "v").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "w").await, DiskState::Attached);
}

#[tokio::test]
async fn a_running_container_found_by_resync_is_associated() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    let docker = [DockerContainer {
        state: RunState::Running,
        ..exited("c1", 0, false, &["v"])
    }];
    e.svc.docker_resync(&docker).await.unwrap();
    let v = e.svc.disk("v").await.unwrap();
    assert_eq!(v.containers, vec!["c1".to_string()]);
}

#[tokio::test]
async fn an_unreachable_dockerd_is_reported_and_nothing_is_sealed() {
    let e = env(true).await;
    volume(&e.svc, "v").await;
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let svc = e.svc.clone();
    let task = tokio::spawn(async move {
        svc.follow_docker(
            Arc::new(Fake::default()),
            "pd".into(),
            Duration::from_millis(20),
            stop_rx,
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !e
        .svc
        .docker_status()
        .is_some_and(|s| !s.reachable && s.error.is_some())
    {
        assert!(Instant::now() < deadline, "{:?}", e.svc.docker_status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Attached);
    let m = e.svc.metrics_text().await;
    assert!(m.contains("pdguard_docker_up 0\n"), "{m}");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// Whatever the registry says, a disk whose file is attached to a loop device is not
/// sealed; once detached, it is. Needs root and a free loop device.
#[tokio::test]
async fn a_disk_the_kernel_holds_is_not_sealed() {
    let e = env(false).await;
    volume(&e.svc, "v").await;
    let path = e.svc.disk("v").await.unwrap().disk.path;
    let o = std::process::Command::new("losetup")
        .args(["-f", "--show", path.to_str().unwrap()])
        .output()
        .expect("losetup (util-linux's mount package) is needed");
    assert!(
        o.status.success(),
        "cannot attach a loop device (run as root): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .output();
        }
    }
    let detach = Detach(dev);
    let mut f = follower(&e.svc, Fake::default());
    f.apply(mount("v", "c1")).await;
    f.apply(destroy("c1")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(&e.svc, "v").await, DiskState::Grace);
    assert!(e.svc.seal_disk("v").await.is_err());
    drop(detach);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&e.svc, "v").await != DiskState::Sealed {
        assert!(Instant::now() < deadline, "never sealed once detached");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn running(id: &str, volumes: &[&str]) -> DockerContainer {
    DockerContainer {
        id: id.into(),
        state: RunState::Running,
        exit_code: 0,
        restarts: false,
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        task: false,
    }
}

/// A resync costs what changed: with nothing changed it is one call to dockerd (its list),
/// whatever the number of containers; a container whose state changed, or that an event
/// named, is inspected alone; every `FULL_EVERY` resyncs everything is looked at again.
#[tokio::test]
async fn a_resync_with_nothing_changed_is_one_call() {
    let e = env(false).await;
    let n = 200;
    for i in 0..n {
        volume(&e.svc, &format!("v{i}")).await;
    }
    let fake = Fake::up(
        (0..n)
            .map(|i| running(&format!("c{i}"), &[&format!("v{i}")]))
            .collect(),
    );
    let calls = Arc::clone(&fake.calls);
    let mut f = follower(&e.svc, fake);
    f.resync().await.unwrap();
    assert_eq!(calls.total(), 1 + n, "the first resync looks at everything");
    assert_eq!(state(&e.svc, "v7").await, DiskState::Attached);

    let before = calls.total();
    f.resync().await.unwrap();
    assert_eq!(calls.total() - before, 1, "nothing changed: one list");

    // c3 crashed, and c5 died and restarted between two resyncs (its die was seen).
    {
        let mut cs = f.api.containers.lock().unwrap();
        cs[3] = exited("c3", 1, false, &["v3"]);
    }
    f.apply(died("c5", 0)).await;
    let before = calls.total();
    f.resync().await.unwrap();
    assert_eq!(
        calls.total() - before,
        // One list, c5's inspect, c3's inspect.
        1 + 1 + 1,
        "only what changed is inspected"
    );
    assert_eq!(state(&e.svc, "v3").await, DiskState::Sealed);
    assert_eq!(state(&e.svc, "v4").await, DiskState::Attached);

    // A removed container is noticed by the list alone.
    f.api.containers.lock().unwrap().remove(9);
    let before = calls.total();
    f.resync().await.unwrap();
    assert_eq!(calls.total() - before, 1);
    assert_eq!(state(&e.svc, "v9").await, DiskState::Sealed);

    // The full reconcile comes back once in FULL_EVERY resyncs.
    let mut fulls = 0;
    for _ in 0..cache::FULL_EVERY {
        let before = calls.total();
        f.resync().await.unwrap();
        if calls.total() - before > 1 {
            fulls += 1;
        }
    }
    assert_eq!(
        fulls,
        1,
        "one full reconcile in {} resyncs",
        cache::FULL_EVERY
    );
}

/// 100 volumes dangling at once are sealed through the job queue: never more at once than
/// `--jobs`, in the order their grace periods ended, each once; `backlog()` shows the queue.
#[tokio::test]
async fn a_hundred_dangling_volumes_are_sealed_in_turn_once_each() {
    let e = env(false).await;
    let n = 100;
    for i in 0..n {
        volume(&e.svc, &format!("v{i:03}")).await;
    }
    // Grace periods ending in reverse name order: v099 went dangling first.
    {
        let mut st = e.svc.s.state.lock().await;
        for i in 0..n {
            let d = st.disks.get_mut(&format!("v{i:03}")).unwrap();
            d.state = DiskState::Grace;
            d.grace_until_ms = Some(1000 + (n - i) as u64);
        }
    }
    e.svc.tick().await;
    let b = e.svc.backlog();
    assert_eq!(b.limit, 1);
    assert!(b.running <= 1, "{b:?}");
    assert!(b.queue.len() >= n - 1 - b.done as usize, "{b:?}");
    let order: Vec<&str> = b.queue.iter().map(|q| q.disk.as_str()).collect();
    let mut want: Vec<&str> = order.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(order, want, "queued in the order they went dangling");
    // Asked again while queued: no second job.
    e.svc.tick().await;
    e.svc.wait_idle().await;
    for i in 0..n {
        assert_eq!(
            e.svc.disk(&format!("v{i:03}")).await.unwrap().disk.state,
            DiskState::Sealed
        );
    }
    let b = e.svc.backlog();
    assert_eq!(
        (b.running, b.queue.len(), b.done),
        (0, 0, n as u64),
        "{b:?}"
    );
    let m = e.svc.metrics_text().await;
    assert!(
        m.contains(&format!(
            "pdguard_jobs_started_total{{kind=\"seal\"}} {n}\n"
        )),
        "sealed more than once: {m}"
    );
}
