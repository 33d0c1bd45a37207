//! End-to-end tests of the Docker volume plugin against the machine's real dockerd: the
//! real `docker` and `docker-compose` CLIs, a real `pdguard serve --docker`, real loop
//! mounts. Without dockerd the tests fail with a clear message, unless PDGUARD_NO_DOCKER=1
//! is set by hand.
//!
//! dockerd is shared. Every test uses its own volume names, container names and image tag
//! (with the process id) and removes all of them on drop, even when it fails. The driver
//! name is one fixed name, and the tests run one at a time (a lock in this process and a
//! file lock across processes): dockerd 20.10 remembers every legacy volume driver it ever
//! reached until it restarts, and asks every one of them (15 s of retries for each one that
//! is gone) whenever anyone looks up an unknown volume name, as Compose does. A new driver
//! name per test would slow every later `docker-compose up` on the machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DRIVER: &str = "pdguard-test";
const GRACE: &str = "1s";
const RESYNC: &str = "1s";
static NEXT: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time, in this process and across processes.
struct Turn {
    _file: std::fs::File,
    _guard: MutexGuard<'static, ()>,
}

fn turn() -> Turn {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/pdguard-docker-tests.lock")
        .unwrap();
    file.lock().unwrap();
    Turn {
        _file: file,
        _guard: guard,
    }
}

/// False (and the test returns) only when PDGUARD_NO_DOCKER=1; panics when dockerd is absent.
fn docker_here() -> bool {
    if std::env::var("PDGUARD_NO_DOCKER").as_deref() == Ok("1") {
        eprintln!("PDGUARD_NO_DOCKER=1: not testing against dockerd");
        return false;
    }
    let o = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match o {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!(
            "dockerd does not answer `docker info` ({}); start dockerd (scripts/test.sh does), or set PDGUARD_NO_DOCKER=1 to skip these tests by hand",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run the docker CLI ({e}); install docker.io, or set PDGUARD_NO_DOCKER=1 to skip these tests by hand"
        ),
    }
}

/// Run a command with a time limit (coreutils `timeout`).
fn run(secs: u64, cmd: &str, args: &[&str]) -> Output {
    Command::new("timeout")
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
    /// Held until the end of the drop: the cleanup runs in this test's turn.
    _turn: Turn,
}

impl Env {
    fn new(extra: &[&str]) -> Self {
        let turn = turn();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let serve = Serve::new(&dir.path().join("state"))
            .args(&["--grace", GRACE])
            .args(&["--docker", "--docker-driver", DRIVER])
            .args(&["--docker-resync", RESYNC])
            .args(extra)
            .env("PDGUARD_LOG", "info");
        let mut e = Self {
            _turn: turn,
            dir,
            tag: format!("pdguard-test-{id}:1"),
            driver: DRIVER.into(),
            serve,
            daemon: None,
            containers: Vec::new(),
            volumes: Vec::new(),
            compose: None,
        };
        e.build_image();
        e.start();
        e
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `FROM scratch` with Debian's static busybox: no registry needed.
    fn build_image(&self) {
        let ctx = self.dir.path().join("image");
        std::fs::create_dir_all(&ctx).unwrap();
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: `apt-get install busybox-static` (scripts/test.sh does)"
        );
        std::fs::copy(busybox, ctx.join("busybox")).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        )
        .unwrap();
        docker_ok(&["build", "-q", "-t", &self.tag, s(&ctx)]);
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

    /// A volume of this test's driver, removed on drop.
    /// A name unique to this test run.
    fn name(&self, short: &str) -> String {
        let tag = self.tag.trim_end_matches(":1");
        format!("{tag}-{short}")
    }

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
                let _ = Command::new("umount").arg(e.path()).output();
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
        let _ = std::fs::remove_file(format!("/run/docker/plugins/{DRIVER}.sock"));
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
        let o = Command::new("timeout")
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
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
fn plugin_post(path: &str, body: &str) -> Value {
    use std::io::{Read, Write};
    let sock = format!("/run/docker/plugins/{DRIVER}.sock");
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
    if !docker_here() {
        return;
    }
    let mut e = Env::new(&[]);
    let v = plugin_post("/Plugin.Activate", "");
    assert_eq!(v["Implements"][0], "VolumeDriver");
    let v = plugin_post("/VolumeDriver.Capabilities", "");
    assert_eq!(v["Capabilities"]["Scope"], "local");
    let name = e.name("raw");
    let v = plugin_post(
        "/VolumeDriver.Create",
        &format!(r#"{{"Name":"{name}","Opts":null}}"#),
    );
    assert!(v["Err"].as_str().unwrap().contains("size"), "{v}");
    let v = plugin_post("/VolumeDriver.Create", "{not json");
    assert!(v["Err"].as_str().unwrap().contains("JSON"), "{v}");
    let v = plugin_post("/VolumeDriver.Mount", r#"{"Name":"nope","ID":"1"}"#);
    assert!(v["Err"].as_str().unwrap().contains("nope"), "{v}");
    let v = plugin_post("/VolumeDriver.Nope", "{}");
    assert!(
        v["Err"].as_str().unwrap().contains("no plugin endpoint"),
        "{v}"
    );
    let v = plugin_post("/VolumeDriver.List", "");
    assert_eq!(v["Volumes"], serde_json::json!([]), "{v}");
    assert_ne!(code(&e.cli(&["disk", "show", &name])), 0);
    // A daemon that stops removes its socket: dockerd tries every socket it finds there.
    e.terminate();
    let sock = PathBuf::from(format!("/run/docker/plugins/{DRIVER}.sock"));
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
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
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
    if !docker_here() {
        return;
    }
    let mut e = Env::new(&[]);
    let link = e.dir.path().join("state-link");
    std::os::unix::fs::symlink(e.state(), &link).unwrap();
    seals_through(&mut e, &link, "sl");
}

/// `--state-dir /x/sub/../state`: the same.
#[test]
fn a_dotdot_state_dir_still_seals_a_removed_containers_volume() {
    if !docker_here() {
        return;
    }
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
    if !docker_here() {
        return;
    }
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
    let mut holder = Command::new("sleep")
        .arg("8")
        .current_dir(&dir)
        .spawn()
        .unwrap();
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

/// dockerd gives up on a Mount after 120 s (the unseal is held by the test hook here, as a
/// large volume on a slow disk would take): the unseal that goes on without it ends with no
/// container, so the volume enters its grace period and is sealed again — never left
/// unsealed for good. The only test that waits out dockerd's timeout.
#[test]
fn a_reclaim_dockerd_gave_up_on_is_sealed_again() {
    if !docker_here() {
        return;
    }
    let mut e = Env::new(&[]);
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
        200,
        "docker",
        &["run", "--rm", "-v", &data, &e.tag, "cat", "/data/s"],
    );
    assert!(!o.status.success(), "the held Mount succeeded");
    assert!(
        t0.elapsed() >= Duration::from_secs(100),
        "docker run gave up after {:?}, not at dockerd's Mount timeout: {}",
        t0.elapsed(),
        stderr(&o)
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
    if !docker_here() {
        return;
    }
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
    let mut holder = Command::new("sleep")
        .arg("10")
        .current_dir(&dir)
        .spawn()
        .unwrap();
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
    if !docker_here() {
        return;
    }
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
