//! End-to-end tests of the Docker volume plugin against a real dockerd: the real `docker`
//! and `docker-compose` CLIs, a real `pdguard serve --docker`, real loop mounts.
//!
//! Each test gets a dockerd of its own (tests/nodes: its own network and mount namespaces,
//! data root, containerd and `/run/docker/plugins`), started and removed by the test, so the
//! machine's own dockerd never sees a test driver: dockerd 20.10 remembers every legacy
//! volume driver it ever reached until it restarts, and asks every one of them (15 s of
//! retries for each one that is gone) whenever anyone looks up an unknown volume name, as
//! Compose does (issue 19, item 5). The tests run one at a time (the node harness's lock).
//!
//! Fallback, for a machine that cannot make namespaces: `PDGUARD_DOCKER_TESTS_ON_HOST=1`
//! runs them against the machine's dockerd, with one fixed driver name, a file lock across
//! processes, and every volume, container and image removed on drop; afterwards that dockerd
//! keeps retrying the vanished `pdguard-test.sock` until it restarts (`systemctl restart
//! docker`). Without namespaces and without that variable the tests fail, naming both.
#![allow(clippy::unwrap_used)]

mod common;
mod nodes;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DRIVER: &str = "pdguard-test";
const GRACE: &str = "1s";
const RESYNC: &str = "1s";
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// The dockerd of the test that runs now (`unix://…`), or None for the machine's own.
static DOCKER_HOST: Mutex<Option<String>> = Mutex::new(None);

/// Where a test's dockerd runs.
enum Place {
    /// A dockerd the test started in its own namespaces (the default).
    Node(nodes::Cluster),
    /// The machine's dockerd (`PDGUARD_DOCKER_TESTS_ON_HOST=1`), with the cross-process lock.
    Host { _lock: std::fs::File },
}

impl Place {
    fn new() -> Self {
        if std::env::var("PDGUARD_DOCKER_TESTS_ON_HOST").as_deref() == Ok("1") {
            host_docker_answers();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open("/run/lock/pdguard-docker-tests.lock")
                .unwrap();
            file.lock().unwrap();
            *DOCKER_HOST.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Self::Host { _lock: file };
        }
        let c = nodes::Cluster::new(1);
        *DOCKER_HOST.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.node(1).host());
        Self::Node(c)
    }

    fn node(&self) -> Option<&nodes::Node> {
        match self {
            Self::Node(c) => Some(c.node(1)),
            Self::Host { .. } => None,
        }
    }

    /// A path as the daemon and dockerd see it.
    fn inside(&self, path: &str) -> PathBuf {
        match self.node() {
            Some(n) => n.inside(path),
            None => PathBuf::from(path),
        }
    }

    /// `program` run where the daemon runs (the node's mount namespace).
    fn command(&self, program: &str) -> Command {
        match self.node() {
            Some(n) => n.command(program, false),
            None => Command::new(program),
        }
    }

    /// The kernel's mount table as the daemon sees it.
    fn mountinfo(&self) -> String {
        std::fs::read_to_string(self.inside("/proc/self/mountinfo")).unwrap()
    }
}

/// The fallback needs the machine's dockerd to answer.
fn host_docker_answers() {
    let o = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "PDGUARD_DOCKER_TESTS_ON_HOST=1 but the machine's dockerd does not answer `docker info` ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run the docker CLI ({e}); install docker.io"),
    }
}

/// `docker`/`docker-compose` aimed at this test's dockerd.
fn tool(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    match &*DOCKER_HOST.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(h) => c.env("DOCKER_HOST", h),
        None => c.env_remove("DOCKER_HOST"),
    };
    c
}

/// Run a command with a time limit (coreutils `timeout`), aimed at this test's dockerd.
fn run(secs: u64, cmd: &str, args: &[&str]) -> Output {
    tool("timeout")
        .arg(secs.to_string())
        .arg(cmd)
        .args(args)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn docker_ok(args: &[&str]) -> String {
    let o = run(120, "docker", args);
    assert!(o.status.success(), "docker {args:?}: {}", stderr(&o));
    out(&o)
}

/// One test's world: a daemon with its own driver, and what the test made in dockerd.
struct Env {
    dir: tempfile::TempDir,
    tag: String,
    driver: String,
    /// How the daemon runs unless a test says otherwise; the cleanup starts it this way.
    serve: Serve,
    daemon: Option<Daemon>,
    containers: Vec<String>,
    volumes: Vec<String>,
    compose: Option<(PathBuf, String)>,
    /// The test's dockerd (or the lock on the machine's), dropped after the cleanup.
    place: Place,
}

impl Env {
    fn new(extra: &[&str]) -> Self {
        let place = Place::new();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let mut serve = Serve::new(&dir.path().join("state"))
            .args(&["--grace", GRACE])
            .args(&["--docker", "--docker-driver", DRIVER])
            .args(&["--docker-resync", RESYNC])
            .args(extra)
            .env("PDGUARD_LOG", "info");
        if let Some(n) = place.node() {
            serve = serve
                .args(&["--docker-host", &n.host()])
                .via("nsenter", &n.enter(false));
        }
        let mut e = Self {
            dir,
            tag: format!("pdguard-test-{id}:1"),
            driver: DRIVER.into(),
            serve,
            daemon: None,
            containers: Vec::new(),
            volumes: Vec::new(),
            compose: None,
            place,
        };
        let rootfs = nodes::busybox_rootfs(e.dir.path());
        let host = e.place.node().map(nodes::Node::host);
        nodes::import(host.as_deref(), &rootfs, &e.tag);
        e.start();
        e
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Start the daemon (again) the usual way.
    fn start(&mut self) {
        self.start_as(self.serve.clone());
    }

    /// Start the daemon (again) another way.
    fn start_as(&mut self, serve: Serve) {
        match &mut self.daemon {
            Some(d) => d.restart_as(serve),
            None => self.daemon = Some(serve.start()),
        }
    }

    fn running(&self) -> bool {
        self.daemon.as_ref().is_some_and(Daemon::is_running)
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// SIGTERM, and wait (bounded) for the daemon to exit.
    fn terminate(&mut self) {
        if self.running() {
            self.daemon.as_mut().unwrap().terminate();
        }
    }

    fn kill9(&mut self) {
        if self.running() {
            self.daemon.as_mut().unwrap().kill9();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.d().cli(args)
    }

    fn disk(&self, name: &str) -> Value {
        self.d().disk(name)
    }

    fn wait_state(&self, name: &str, state: &str, secs: u64) -> Value {
        self.d().wait_state(name, state, secs)
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// A name unique to this test run.
    fn name(&self, short: &str) -> String {
        let tag = self.tag.trim_end_matches(":1");
        format!("{tag}-{short}")
    }

    /// A volume of this test's driver, removed on drop.
    fn volume(&mut self, short: &str, opts: &[&str]) -> String {
        let name = self.name(short);
        self.volumes.push(name.clone());
        let mut args = vec!["volume", "create", "-d", &self.driver];
        for o in opts {
            args.extend_from_slice(&["-o", o]);
        }
        args.push(&name);
        docker_ok(&args);
        name
    }

    /// A container name, removed on drop.
    fn container(&mut self, short: &str) -> String {
        let name = self.name(short);
        self.containers.push(name.clone());
        name
    }

    /// `docker run --rm -v VOL:/data IMG sh -c SCRIPT`.
    fn run_rm(&self, vol: &str, script: &str) -> Output {
        let v = format!("{vol}:/data");
        run(
            120,
            "docker",
            &["run", "--rm", "-v", &v, &self.tag, "sh", "-c", script],
        )
    }

    fn file_of(&self, vol: &str) -> PathBuf {
        PathBuf::from(self.disk(vol)["path"].as_str().unwrap())
    }

    /// The plugin's socket, as dockerd finds it.
    fn plugin_socket(&self) -> PathBuf {
        self.place
            .inside(&format!("/run/docker/plugins/{DRIVER}.sock"))
    }

    /// A process whose working directory is `dir` (a volume's mount, as the daemon sees
    /// it) for `secs`: it keeps the file system busy.
    fn busy(&self, dir: &Path, secs: u32) -> Child {
        let mut c = self.place.command("sh");
        c.args(["-c", &format!("cd \"$1\" && exec sleep {secs}"), "busy"])
            .arg(dir)
            .spawn()
            .unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((dir, project)) = &self.compose {
            let _ = run(
                120,
                "docker-compose",
                &[
                    "--project-directory",
                    s(dir),
                    "-p",
                    project,
                    "down",
                    "-v",
                    "-t",
                    "1",
                ],
            );
        }
        for c in &self.containers {
            let _ = run(60, "docker", &["rm", "-f", c]);
        }
        if !self.running() {
            self.start();
        }
        // Only volumes that still exist: removing an unknown name makes dockerd ask every
        // driver it knows.
        for v in &self.volumes {
            if code(&self.cli(&["disk", "show", v])) == 0 {
                let _ = run(60, "docker", &["volume", "rm", "-f", v]);
            }
        }
        self.kill9();
        let mounts = self.state().join("mounts");
        if let Ok(entries) = std::fs::read_dir(&mounts) {
            for e in entries.flatten() {
                let _ = self.place.command("umount").arg(e.path()).output();
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.state().join("disks")) {
            for e in entries.flatten() {
                let _ = Command::new("losetup")
                    .args(["-j", s(&e.path())])
                    .output()
                    .map(|o| {
                        for dev in out(&o).lines().filter_map(|l| l.split(':').next()) {
                            let _ = Command::new("losetup").args(["-d", dev]).output();
                        }
                    });
            }
        }
        let _ = std::fs::remove_file(self.plugin_socket());
        let _ = run(60, "docker", &["rmi", "-f", &self.tag]);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn secret() -> String {
    format!("SECRET-{}-{}", std::process::id(), rand::random::<u32>())
}

fn assert_sealed_without(e: &Env, vol: &str, secret: &str) {
    let d = e.wait_state(vol, "sealed", 60);
    assert_eq!(d["dangling"], true, "{d}");
    let bytes = std::fs::read(e.file_of(vol)).unwrap();
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the sealed volume still holds the secret"
    );
}

/// `docker run --rm` writes a secret; after the grace the volume is sealed, dangling and
/// the secret is nowhere in its file; the next container reads it back.
#[test]
fn a_removed_container_leaves_a_sealed_volume_that_comes_back() {
    let mut e = Env::new(&[]);
    let v = e.volume("v1", &["size=64M"]);
    let sec = secret();
    let o = e.run_rm(&v, &format!("echo {sec} > /data/s"));
    assert!(o.status.success(), "{}", stderr(&o));
    let d = e.disk(&v);
    assert_eq!(d["sector_size"], 4096, "{d}");
    assert_sealed_without(&e, &v, &sec);
    let inspect = docker_ok(&["volume", "inspect", &v]);
    assert!(inspect.contains("\"sealed\""), "{inspect}");
    let o = e.run_rm(&v, "cat /data/s");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(out(&o), sec);
}

/// `docker stop` keeps the volume unsealed past the grace; `docker rm` seals it.
#[test]
fn a_stopped_container_keeps_its_volume_until_removed() {
    let mut e = Env::new(&[]);
    let v = e.volume("v2", &["size=64M"]);
    let c = e.container("c1");
    let mount = format!("{v}:/data");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "-v",
        &mount,
        &e.tag,
        "sh",
        "-c",
        "echo kept > /data/s; exec sleep 600",
    ]);
    e.wait_state(&v, "attached", 30);
    docker_ok(&["stop", "-t", "1", &c]);
    std::thread::sleep(Duration::from_secs(1 + 5));
    let d = e.disk(&v);
    assert_eq!(d["state"], "attached", "{d}");
    assert_eq!(d["dangling"], false);
    docker_ok(&["rm", &c]);
    assert_sealed_without(&e, &v, "kept");
}

/// A container that exits 3 on its own (no restart policy) has crashed: sealed.
#[test]
fn a_crashed_container_leaves_a_sealed_volume() {
    let mut e = Env::new(&[]);
    let v = e.volume("v3", &["size=64M"]);
    let c = e.container("c3");
    let mount = format!("{v}:/data");
    let o = run(
        120,
        "docker",
        &[
            "run",
            "--name",
            &c,
            "-v",
            &mount,
            &e.tag,
            "sh",
            "-c",
            "echo crashed > /data/s; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_sealed_without(&e, &v, "crashed");
}

/// Two containers on one volume: sealed only after both are gone.
#[test]
fn two_containers_seal_only_when_both_are_gone() {
    let mut e = Env::new(&[]);
    let v = e.volume("v4", &["size=64M"]);
    let mount = format!("{v}:/data");
    let (c1, c2) = (e.container("a"), e.container("b"));
    for c in [&c1, &c2] {
        docker_ok(&[
            "run", "-d", "--name", c, "-v", &mount, &e.tag, "sleep", "600",
        ]);
    }
    e.wait_state(&v, "attached", 30);
    docker_ok(&["rm", "-f", &c1]);
    std::thread::sleep(Duration::from_secs(1 + 3));
    let d = e.disk(&v);
    assert_eq!(d["state"], "attached", "{d}");
    docker_ok(&["rm", "-f", &c2]);
    e.wait_state(&v, "sealed", 60);
}

/// `kill -9` of pdguard while a container runs; the container is removed while pdguard is
/// down (dockerd gives up on the Unmount); on restart the resync unmounts the volume
/// itself, it ends sealed, and a new container gets its data back. A second container that
/// keeps running across the restart keeps its volume mounted (the Mount IDs were
/// persisted); its removal after the restart seals that one too.
#[test]
fn a_container_removed_while_pdguard_is_down_still_seals_its_volume() {
    let mut e = Env::new(&[]);
    let v = e.volume("v5", &["size=64M"]);
    let c = e.container("c5");
    let mount = format!("{v}:/data");
    let sec = secret();
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "-v",
        &mount,
        &e.tag,
        "sh",
        "-c",
        &format!("echo {sec} > /data/s; sync; exec sleep 600"),
    ]);
    let w = e.volume("v5b", &["size=64M"]);
    let keep = e.container("keep");
    let wmount = format!("{w}:/data");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &keep,
        "-v",
        &wmount,
        &e.tag,
        "sh",
        "-c",
        "echo still > /data/s; exec sleep 600",
    ]);
    e.wait_state(&v, "attached", 30);
    e.wait_state(&w, "attached", 30);
    std::thread::sleep(Duration::from_millis(500));
    e.kill9();
    let o = run(120, "docker", &["rm", "-f", &c]);
    assert!(o.status.success(), "{}", stderr(&o));
    e.start();
    assert_sealed_without(&e, &v, &sec);
    // Several resyncs later the running container's volume is still mounted and attached.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(e.disk(&w)["state"], "attached");
    assert_eq!(docker_ok(&["exec", &keep, "cat", "/data/s"]), "still");
    docker_ok(&["rm", "-f", &keep]);
    assert_sealed_without(&e, &w, "still");
    assert!(
        !e.state().join("mounts").join(&w).exists(),
        "the volume was not unmounted"
    );
    let o = e.run_rm(&v, "cat /data/s");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(out(&o), sec);
}

/// Compose: `up` (driver_opts), `down` seals, `up` brings the data back, `down -v` removes
/// the volume and its file.
#[test]
fn compose_up_down_up_down_v() {
    let mut e = Env::new(&[]);
    let dir = e.dir.path().join("compose");
    std::fs::create_dir_all(&dir).unwrap();
    let project = format!(
        "pdgt{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let sec = secret();
    std::fs::write(
        dir.join("docker-compose.yml"),
        format!(
            "version: \"3.7\"\nservices:\n  app:\n    image: {tag}\n    command: [\"sh\", \"-c\", \"test -f /data/s || echo {sec} > /data/s; exec sleep 600\"]\n    stop_grace_period: 1s\n    volumes: [\"data:/data\"]\nvolumes:\n  data:\n    driver: {driver}\n    driver_opts:\n      size: 64M\n",
            tag = e.tag,
            driver = e.driver,
        ),
    )
    .unwrap();
    e.compose = Some((dir.clone(), project.clone()));
    let compose = |args: &[&str]| {
        let mut a = vec!["--project-directory", s(&dir), "-p", &project];
        a.extend_from_slice(args);
        // The first `up` looks up an unknown volume name: dockerd asks every driver it
        // ever knew, 15 s for each one that is gone (see the top of this file).
        let o = tool("timeout")
            .args(["400", "docker-compose"])
            .args(&a)
            .env("COMPOSE_HTTP_TIMEOUT", "360")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "docker-compose {args:?}: {}",
            stderr(&o)
        );
    };
    let v = format!("{project}_data");
    compose(&["up", "-d"]);
    e.wait_state(&v, "attached", 30);
    let app = format!("{project}_app_1");
    let cat = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = run(30, "docker", &["exec", &app, "cat", "/data/s"]);
            if o.status.success() {
                return out(&o);
            }
            assert!(Instant::now() < deadline, "{}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(cat(), sec);
    compose(&["down", "-t", "1"]);
    assert_sealed_without(&e, &v, &sec);
    compose(&["up", "-d"]);
    e.wait_state(&v, "attached", 60);
    assert_eq!(cat(), sec);
    let file = e.file_of(&v);
    compose(&["down", "-v", "-t", "1"]);
    e.compose = None;
    assert!(!file.exists(), "the volume's file is still there");
    assert_ne!(code(&e.cli(&["disk", "show", &v])), 0);
}

/// Bad options fail `docker volume create` with a message naming them and create nothing;
/// a Mount of a volume whose unseal fails fails `docker run` (exit 125) with pdguard's
/// message, and once the cause is fixed the data is all there.
#[test]
fn bad_options_and_a_failed_mount_are_clear_errors() {
    let mut e = Env::new(&[]);
    for (opts, word) in [
        (vec!["size=64M", "colour=red"], "colour"),
        (vec!["size=12Q"], "size"),
        (vec!["fs=ext4"], "size"),
        (vec!["size=64M", "profile=weak"], "profile"),
    ] {
        let name = e.name("bad");
        let mut args = vec!["volume", "create", "-d", &e.driver];
        for o in &opts {
            args.extend_from_slice(&["-o", o]);
        }
        args.push(&name);
        let o = run(60, "docker", &args);
        assert!(!o.status.success(), "{opts:?} was accepted");
        let err = stderr(&o);
        assert!(
            err.contains(word) && err.contains("pdguard"),
            "{opts:?}: {err}"
        );
        assert_ne!(
            code(&e.cli(&["disk", "show", &name])),
            0,
            "{opts:?} made a disk"
        );
        assert!(!e.state().join(format!("disks/{name}.img")).exists());
    }

    let v = e.volume("v7", &["size=64M"]);
    let sec = secret();
    assert!(e
        .run_rm(&v, &format!("echo {sec} > /data/s"))
        .status
        .success());
    e.wait_state(&v, "sealed", 60);
    let file = e.file_of(&v);
    let rec = record_of(&file);
    let good = std::fs::read(&rec).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&rec, &bad).unwrap();
    let sealed = digest(&file);
    let o = e.run_rm(&v, "cat /data/s");
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("pdguard") && err.contains(&v), "{err}");
    assert_eq!(digest(&file), sealed, "a failed unseal changed the volume");
    std::fs::write(&rec, &good).unwrap();
    let o = e.run_rm(&v, "cat /data/s");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(out(&o), sec);
}

/// `docker volume rm` of a sealed secure volume crypto-erases it (a hard link kept to its
/// record cannot be unsealed any more) and deletes its file.
#[test]
fn volume_rm_of_a_sealed_volume_erases_it() {
    let mut e = Env::new(&[]);
    let v = e.volume("v8", &["size=64M"]);
    let sec = secret();
    assert!(e
        .run_rm(&v, &format!("echo {sec} > /data/s"))
        .status
        .success());
    e.wait_state(&v, "sealed", 60);
    let file = e.file_of(&v);
    let keep = e.dir.path().join("kept.img");
    let keep_rec = e.dir.path().join("kept.img.pdguard");
    std::fs::hard_link(&file, &keep).unwrap();
    std::fs::hard_link(record_of(&file), &keep_rec).unwrap();
    docker_ok(&["volume", "rm", &v]);
    assert!(!file.exists(), "the volume's file is still there");
    assert!(!record_of(&file).exists());
    assert_ne!(code(&e.cli(&["disk", "show", &v])), 0);
    let key = e.state().join("master.key");
    let o = pdguard(&[
        "image",
        "unseal",
        s(&keep),
        "--key-file",
        s(&key),
        "--quiet",
    ]);
    assert_ne!(code(&o), 0, "a removed volume could still be unsealed");
    assert!(!contains(&std::fs::read(&keep).unwrap(), sec.as_bytes()));
}

/// POST raw bytes to the plugin as dockerd does (no Content-Type); returns the JSON answer.
fn plugin_post(e: &Env, path: &str, body: &str) -> Value {
    use std::io::{Read, Write};
    let sock = e.plugin_socket();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
    let json = text.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: {e}: {json}"))
}

/// The plugin's wire as dockerd speaks it, and its answers to requests dockerd never sends.
#[test]
fn the_plugin_answers_raw_requests() {
    let mut e = Env::new(&[]);
    let v = plugin_post(&e, "/Plugin.Activate", "");
    assert_eq!(v["Implements"][0], "VolumeDriver");
    let v = plugin_post(&e, "/VolumeDriver.Capabilities", "");
    assert_eq!(v["Capabilities"]["Scope"], "local");
    let name = e.name("raw");
    let v = plugin_post(
        &e,
        "/VolumeDriver.Create",
        &format!(r#"{{"Name":"{name}","Opts":null}}"#),
    );
    assert!(v["Err"].as_str().unwrap().contains("size"), "{v}");
    let v = plugin_post(&e, "/VolumeDriver.Create", "{not json");
    assert!(v["Err"].as_str().unwrap().contains("JSON"), "{v}");
    let v = plugin_post(&e, "/VolumeDriver.Mount", r#"{"Name":"nope","ID":"1"}"#);
    assert!(v["Err"].as_str().unwrap().contains("nope"), "{v}");
    let v = plugin_post(&e, "/VolumeDriver.Nope", "{}");
    assert!(
        v["Err"].as_str().unwrap().contains("no plugin endpoint"),
        "{v}"
    );
    let v = plugin_post(&e, "/VolumeDriver.List", "");
    assert_eq!(v["Volumes"], serde_json::json!([]), "{v}");
    assert_ne!(code(&e.cli(&["disk", "show", &name])), 0);
    // A daemon that stops removes its socket: dockerd tries every socket it finds there.
    e.terminate();
    let sock = e.plugin_socket();
    assert!(!sock.exists(), "{} is left behind", sock.display());
}

/// Start `e`'s daemon again with `--state-dir` given as `given` (the same directory reached
/// another way: a symlink, a `..`), with `env` added, as `Env::start` does.
fn restart_with_state_dir(e: &mut Env, given: &Path, env: &[(&str, &Path)]) {
    e.terminate();
    let mut serve = e.serve.clone().state_dir_as(given);
    for (k, v) in env {
        serve = serve.env(k, v);
    }
    e.start_as(serve);
}

/// Neither mounted nor on a loop device: the kernel let go of the volume's file.
fn assert_kernel_let_go(e: &Env, vol: &str) {
    let dir = std::fs::canonicalize(e.state())
        .unwrap()
        .join("mounts")
        .join(vol);
    let info = e.place.mountinfo();
    assert!(
        !info.contains(&dir.display().to_string()),
        "{} is still mounted",
        dir.display()
    );
    let o = run(10, "losetup", &["-j", s(&e.file_of(vol))]);
    assert_eq!(out(&o), "", "a loop device still holds the volume's file");
}

/// A removed container's volume is unmounted and sealed, and comes back, when the daemon's
/// state directory is given through `given` (which names the real one another way).
fn seals_through(e: &mut Env, given: &Path, short: &str) {
    restart_with_state_dir(e, given, &[]);
    let v = e.volume(short, &["size=16M"]);
    let sec = secret();
    let o = e.run_rm(&v, &format!("echo {sec} > /data/s"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_sealed_without(e, &v, &sec);
    assert_kernel_let_go(e, &v);
    let o = e.run_rm(&v, "cat /data/s");
    assert!(o.status.success(), "{}\n{}", stderr(&o), e.log());
    assert_eq!(out(&o), sec);
}

/// `--state-dir` through a symlink: mounts are compared with the kernel's by the directory
/// itself, so the volume of a removed container is unmounted and sealed.
#[test]
fn a_symlinked_state_dir_still_seals_a_removed_containers_volume() {
    let mut e = Env::new(&[]);
    let link = e.dir.path().join("state-link");
    std::os::unix::fs::symlink(e.state(), &link).unwrap();
    seals_through(&mut e, &link, "sl");
}

/// `--state-dir /x/sub/../state`: the same.
#[test]
fn a_dotdot_state_dir_still_seals_a_removed_containers_volume() {
    let mut e = Env::new(&[]);
    std::fs::create_dir_all(e.dir.path().join("sub")).unwrap();
    let dotdot = e.dir.path().join("sub").join("..").join("state");
    seals_through(&mut e, &dotdot, "dd");
}

/// A process with its working directory in the volume when the container is removed: the
/// unmount is refused by the kernel, shown as pending, retried, and the volume sealed once
/// the process is gone.
#[test]
fn a_busy_unmount_is_retried_and_the_volume_sealed_once_free() {
    let mut e = Env::new(&[]);
    let v = e.volume("busy", &["size=16M"]);
    let c = e.container("busy");
    let sec = secret();
    let mount = format!("{v}:/data");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "-v",
        &mount,
        &e.tag,
        "sh",
        "-c",
        &format!("echo {sec} > /data/s; sync; exec sleep 600"),
    ]);
    e.wait_state(&v, "attached", 30);
    let dir = e.state().join("mounts").join(&v);
    let mut holder = e.busy(&dir, 8);
    let _ = run(60, "docker", &["rm", "-f", &c]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = e.disk(&v);
        assert_ne!(d["state"], "sealed", "sealed while mounted: {d}");
        if d["unmount_pending"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the busy unmount is not shown as pending: {d}\n{}",
            e.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shown = out(&e.cli(&["disk", "show", &v]));
    assert!(shown.contains("unmount"), "{shown}");
    let inspect = docker_ok(&["volume", "inspect", &v]);
    assert!(inspect.contains("\"unmount_pending\": true"), "{inspect}");
    holder.wait().unwrap();
    assert_sealed_without(&e, &v, &sec);
    assert_eq!(e.disk(&v).get("unmount_pending"), None);
    assert_kernel_let_go(&e, &v);
}

/// A Mount whose unseal is held (by the test hook here, as a large volume on a slow disk
/// would take; tests/reclaim_gave_up.rs does it with a throttled disk) fails at
/// `--docker-mount-timeout`, long before dockerd's own 120 s, saying how far the unseal
/// is; the unseal that goes on ends with no container, so the volume enters its grace
/// period and is sealed again — never left unsealed for good.
#[test]
fn a_mount_held_past_its_limit_fails_and_the_volume_is_sealed_again() {
    let mut e = Env::new(&["--docker-mount-timeout", "5s"]);
    let v = e.volume("slow", &["size=16M"]);
    let sec = secret();
    let o = e.run_rm(&v, &format!("echo {sec} > /data/s"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_sealed_without(&e, &v, &sec);
    let pause = e.dir.path().join("pause");
    let state = e.state();
    restart_with_state_dir(
        &mut e,
        &state,
        &[
            ("PDGUARD_TEST_PAUSE_AT", Path::new("scatter:0")),
            ("PDGUARD_TEST_PAUSE_FILE", &pause),
        ],
    );
    let t0 = Instant::now();
    let data = format!("{v}:/data");
    let o = run(
        100,
        "docker",
        &["run", "--rm", "-v", &data, &e.tag, "cat", "/data/s"],
    );
    assert!(!o.status.success(), "the held Mount succeeded");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(30),
        "docker run failed after {took:?}, not at the Mount's 5 s limit: {}",
        stderr(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "volume \"{v}\": the unseal is still running after 5 s ("
        )) && err.contains("retry `docker run` in a moment"),
        "{err}"
    );
    assert!(pause.exists(), "the unseal was not held: {}", e.log());
    assert_eq!(e.disk(&v)["state"], "unsealing");
    std::fs::remove_file(&pause).unwrap();
    assert_sealed_without(&e, &v, &sec);
    assert_kernel_let_go(&e, &v);
    let o = e.run_rm(&v, "cat /data/s");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(out(&o), sec);
}

/// The stale-mount drop of a resync (the container was removed while pdguard was down)
/// meets a busy file system: the unmount stays pending and retried, and the volume is
/// sealed once the process holding it is gone.
#[test]
fn a_stale_mount_that_is_busy_is_sealed_once_free() {
    let mut e = Env::new(&[]);
    let v = e.volume("stb", &["size=16M"]);
    let c = e.container("stb");
    let mount = format!("{v}:/data");
    let sec = secret();
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "-v",
        &mount,
        &e.tag,
        "sh",
        "-c",
        &format!("echo {sec} > /data/s; sync; exec sleep 600"),
    ]);
    e.wait_state(&v, "attached", 30);
    std::thread::sleep(Duration::from_millis(500));
    e.kill9();
    let o = run(120, "docker", &["rm", "-f", &c]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = e.state().join("mounts").join(&v);
    let mut holder = e.busy(&dir, 10);
    e.start();
    let deadline = Instant::now() + Duration::from_secs(9);
    loop {
        let d = e.disk(&v);
        assert_ne!(d["state"], "sealed", "sealed while mounted: {d}");
        if d["unmount_pending"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the busy stale mount is not shown as pending: {d}\n{}",
            e.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    holder.wait().unwrap();
    assert_sealed_without(&e, &v, &sec);
    assert_kernel_let_go(&e, &v);
}

/// With real dockerd resyncing every second, an NBD client's association and a `pdguard
/// container up` on a volume are not dockerd's and survive: the volumes stay attached and
/// the NBD client's late write succeeds.
#[test]
fn nbd_and_api_associations_survive_a_docker_resync() {
    let found = Command::new("sh")
        .args(["-c", "command -v qemu-io"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-io is not installed: apt-get install qemu-utils (scripts/test.sh installs it)"
    );
    let socks = tempfile::tempdir().unwrap();
    let sock = socks.path().join("nbd.sock");
    let nbd = format!("unix:{}", sock.display());
    let mut e = Env::new(&["--nbd", &nbd]);
    let a = e.volume("api", &["size=16M"]);
    let n = e.volume("nbd", &["size=16M"]);
    let o = e.cli(&["container", "up", "job-1", "--disk", &a]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let uri = format!("nbd+unix:///{n}?socket={}", sock.display());
    let client = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 5000"])
        .args(["-c", "write -P 0xab 0 4k", "-c", "read -P 0xab 0 4k", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    e.wait_state(&n, "attached", 10);
    // Five resyncs and more than the grace period.
    std::thread::sleep(Duration::from_secs(4));
    for v in [&a, &n] {
        let d = e.disk(v);
        assert_eq!(d["state"], "attached", "{d}\n{}", e.log());
    }
    let o = client.wait_with_output().unwrap();
    let text = format!("{}{}", out(&o), stderr(&o));
    assert!(o.status.success(), "{text}");
    assert!(
        !text.contains("failed") && text.contains("wrote 4096"),
        "the NBD client's write did not go through: {text}"
    );
    assert!(!e
        .log()
        .contains("dockerd no longer has the container job-1"));
    let o = e.cli(&["container", "down", "job-1", "--removed"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
