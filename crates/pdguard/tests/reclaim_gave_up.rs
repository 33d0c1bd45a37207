//! A reclaim whose client gave up, on a really slow disk (issue 18, docs/instant-reclaim.md
//! section 8): the daemon's reads are throttled with a blkio cgroup (v1,
//! `blkio.throttle.read_bps_device` on the block device under the test's files), so that an
//! unseal takes seconds, as a large volume on a cloud disk takes minutes.
//!
//! - NBD: a client sends `NBD_OPT_GO` on a sealed disk and disconnects while the unseal
//!   runs; the unseal runs to its end, and the disk, held by nobody, enters its grace period
//!   and is sealed again — never left unsealed.
//! - Docker, through a real dockerd (tests/nodes): a Mount whose unseal outlasts
//!   `--docker-mount-timeout` fails fast with how far the unseal is and what to do; the
//!   unseal goes on, the volume is sealed again after its grace, and a later `docker run`
//!   gets its data back bit-exact.
//!
//! Needs root and the blkio controller of cgroup v1 at /sys/fs/cgroup/blkio; without them
//! the tests fail and say so (never skip).
#![allow(clippy::unwrap_used)]

mod common;
mod nodes;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const BLKIO: &str = "/sys/fs/cgroup/blkio";
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A blkio cgroup of its own whose reads from one block device can be throttled; the daemon
/// joins it at its start (see [`Throttle::via`]). Dropped: its processes go back to the
/// root group and it is removed.
struct Throttle {
    dir: PathBuf,
    /// `MAJOR:MINOR` of the whole disk under the test's files.
    device: String,
}

impl Throttle {
    /// A new group for reads from the disk that holds `near`.
    fn new(near: &Path) -> Self {
        assert!(
            Path::new(BLKIO).join("cgroup.procs").exists(),
            "these tests need the blkio controller of cgroup v1 at {BLKIO} (and root) to slow the daemon's reads down"
        );
        let device = whole_disk(near);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = Path::new(BLKIO).join(format!("pdguard-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot make the cgroup {}: {e}", dir.display()));
        Self { dir, device }
    }

    /// The `via` of a [`Serve`] whose daemon joins this group before it execs (so that every
    /// thread it ever makes is in it): `sh -c 'echo $$ > …/cgroup.procs; exec "$@"' sh
    /// THEN…`.
    fn via(&self, then: &[String]) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        let mut a = vec![
            "-c".to_string(),
            format!("echo $$ > '{}' && exec \"$@\"", procs.display()),
            "sh".to_string(),
        ];
        a.extend_from_slice(then);
        a
    }

    /// Reads of the group from the disk at `bps` bytes a second (0: no limit).
    fn limit(&self, bps: u64) {
        let rule = format!("{} {bps}", self.device);
        std::fs::write(self.dir.join("blkio.throttle.read_bps_device"), &rule)
            .unwrap_or_else(|e| panic!("cannot set the read limit {rule:?}: {e}"));
    }

    /// The processes in the group.
    fn procs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.dir.join("blkio.throttle.read_bps_device"),
            format!("{} 0", self.device),
        );
        for _ in 0..100 {
            for p in self.procs() {
                let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), p);
            }
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: cannot remove the cgroup {}", self.dir.display());
    }
}

/// `MAJOR:MINOR` of the whole disk whose file system holds `path` (a partition's parent:
/// the throttle takes whole disks only).
fn whole_disk(path: &Path) -> String {
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    assert!(
        sys.exists(),
        "{} is on device {major}:{minor}, which is no block device (tmpfs, overlay?); run the tests from a directory on a disk (TMPDIR)",
        path.display()
    );
    let id = if sys.join("partition").exists() {
        std::fs::read_to_string(sys.join("..").join("dev")).unwrap()
    } else {
        std::fs::read_to_string(sys.join("dev")).unwrap()
    };
    id.trim().to_string()
}

/// Drop a file's pages from the page cache (they are clean after a seal's fsync), so that
/// the next reads of it go to the disk and meet the throttle.
fn drop_cache(path: &Path) {
    assert!(Command::new("sync").status().unwrap().success());
    let o = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .output()
        .unwrap();
    assert!(o.status.success(), "dd nocache: {}", stderr(&o));
}

/// Poll `disk show NAME` until it is `sealed` after having been in `grace` (or fail after
/// `within`). Returns the states seen, in order, each once per stretch (printed with when
/// each began).
fn until_sealed_again(d: &Daemon, name: &str, within: Duration) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let v = d.disk(name);
        let st = v["state"].as_str().unwrap().to_string();
        if seen.last() != Some(&st) {
            eprintln!("{name}: {st} at {:?}", t0.elapsed());
            seen.push(st.clone());
        }
        assert_ne!(st, "available", "left unsealed for good: {v}\n{}", d.log());
        assert_ne!(st, "failed", "{v}\n{}", d.log());
        if st == "sealed" && seen.iter().any(|s| s == "grace") {
            return seen;
        }
        assert!(
            t0.elapsed() < within,
            "{name} not sealed again within {within:?}; states seen {seen:?}: {v}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that sends `NBD_OPT_GO` on `export` and nothing more.
fn opt_go(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(&data);
    s.write_all(&b).unwrap();
    s
}

/// NBD: `NBD_OPT_GO` on a sealed disk behind a slow disk, and the client disconnects while
/// the unseal runs. The unseal runs to its end (unsealing for seconds after the client left),
/// then the disk — held by no connection — enters its grace period and is sealed again; its
/// data is still there, bit-exact. The copy reclaim (`--reclaim copy`): an instant one
/// answers `OPT_GO` at once (`tests/instant_reclaim.rs`).
#[test]
fn an_nbd_client_gone_during_a_slow_unseal_leaves_the_disk_sealed_again() {
    let t_test = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cg = Throttle::new(&state);
    let sock = state.join("nbd.sock");
    let nbd = format!("unix:{}", sock.display());
    let d = Serve::new(&state)
        .profile("patent")
        .args(&["--grace", "2s", "--nbd", &nbd, "--reclaim", "copy"])
        .env("PDGUARD_LOG", "info")
        .via("sh", &cg.via(&[]))
        .start();
    assert_eq!(
        cg.procs(),
        vec![d.pid().to_string()],
        "the daemon is not throttled"
    );
    let v = d.ok(&["disk", "create", "d", "--size", "16M"]);
    let path = PathBuf::from(v["path"].as_str().unwrap());
    let mut data = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(18).fill(&mut data[..]);
    std::fs::write(&path, &data).unwrap();
    d.ok(&["disk", "seal", "d"]);
    assert_eq!(d.disk("d")["state"], "sealed");
    drop_cache(&path);
    // 16 MiB at 2 MiB/s: the unseal's first pass alone takes about 8 s.
    cg.limit(2 << 20);

    let client = opt_go(&sock, "d");
    d.wait_state("d", "unsealing", 10);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.disk("d")["containers"].as_array().map(Vec::len), Some(1));
    drop(client); // the client gives up mid-handshake
                  // The server sees it go at once: the association is dropped while the unseal runs on.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v = d.disk("d");
        assert_eq!(
            v["state"], "unsealing",
            "the unseal ended too soon to tell: {v}"
        );
        if v["containers"] == serde_json::json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the connection that left is still associated: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = until_sealed_again(&d, "d", Duration::from_secs(45));
    let v = d.disk("d");
    assert_eq!(v["dangling"], true, "{v}");
    assert_eq!(v["containers"], serde_json::json!([]), "{v}");
    // Still unsealing after the client left: the unseal ran on to its end without it.
    assert_eq!(
        seen.first().map(String::as_str),
        Some("unsealing"),
        "{seen:?}"
    );

    // The data is still there: unsealed by hand (no throttle now), bit-exact.
    cg.limit(0);
    d.ok(&["disk", "unseal", "d"]);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the data came back changed"
    );
    drop(d);
    drop(cg);
    assert!(
        t_test.elapsed() < Duration::from_secs(60),
        "{:?}",
        t_test.elapsed()
    );
}

/// `docker …` against the node's dockerd, bounded.
fn docker(n: &nodes::Node, secs: u64, args: &[&str]) -> Output {
    let host = n.host();
    let mut c = Command::new("timeout");
    c.arg(secs.to_string())
        .args(["docker", "-H", &host])
        .args(args);
    c.output().unwrap()
}

/// What a Docker test leaves: removed in this order (the daemon, then its cgroup, then the
/// dockerd and everything the harness sweeps, loop devices included).
struct World {
    daemon: Option<Daemon>,
    cg: Throttle,
    cluster: nodes::Cluster,
}

impl Drop for World {
    fn drop(&mut self) {
        let n = self.cluster.node(1);
        let _ = docker(n, 60, &["volume", "rm", "-f", "big"]);
        if let Some(mut d) = self.daemon.take() {
            if d.is_running() {
                d.kill9();
            }
        }
        let _ = n
            .command("umount", false)
            .arg(n.state_dir().join("mounts/big"))
            .output();
    }
}

/// Docker: a Mount of a sealed volume whose unseal, on a slow disk, would outlast
/// `--docker-mount-timeout` (3 s here, 90 s by default, under dockerd's 120 s): `docker
/// run` fails within seconds with a message that names the volume, says how far the unseal
/// is and to retry; the unseal goes on, the volume nobody mounts enters its grace and is
/// sealed again; once the disk is fast again, `docker run` gets the data back bit-exact.
#[test]
fn a_docker_mount_on_a_slow_unseal_fails_fast_and_the_volume_is_sealed_again() {
    // Timed from when this test has the machine's cluster lock (another Docker test may
    // hold it first).
    let cluster = nodes::Cluster::new(1);
    let t_test = Instant::now();
    let n = cluster.node(1);
    let state = n.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let cg = Throttle::new(&state);
    let mut then = vec!["nsenter".to_string()];
    then.extend(n.enter(false));
    let serve = Serve::new(&state)
        .profile("patent")
        .args(&[
            "--grace",
            "2s",
            "--docker",
            "--docker-driver",
            "pdguard-test",
        ])
        .args(&["--docker-host", &n.host(), "--docker-resync", "1s"])
        .args(&["--docker-mount-timeout", "3s"])
        .env("PDGUARD_LOG", "info")
        .via("sh", &cg.via(&then));
    let mut w = World {
        daemon: None,
        cg,
        cluster,
    };
    w.daemon = Some(serve.start());
    let (d, n, cg) = (w.daemon.as_ref().unwrap(), w.cluster.node(1), &w.cg);
    assert_eq!(
        cg.procs(),
        vec![d.pid().to_string()],
        "the daemon is not throttled"
    );
    let ok = |args: &[&str]| {
        let o = docker(n, 120, args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}\n{}",
            stderr(&o),
            d.log()
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    ok(&[
        "volume",
        "create",
        "-d",
        "pdguard-test",
        "-o",
        "size=32M",
        "big",
    ]);
    let sum = ok(&[
        "run",
        "--rm",
        "-v",
        "big:/data",
        nodes::IMAGE,
        "sh",
        "-c",
        "head -c 12582912 /dev/urandom > /data/f && sync && sha256sum /data/f",
    ]);
    assert!(sum.ends_with("/data/f") && sum.len() > 64, "{sum}");
    d.wait_state("big", "sealed", 30);
    let path = PathBuf::from(d.disk("big")["path"].as_str().unwrap().to_string());
    drop_cache(&path);
    // 12 MiB of data (32 MiB of image) at 2 MiB/s: the unseal takes 6 s or more.
    cg.limit(2 << 20);

    let t0 = Instant::now();
    let o = docker(
        n,
        100,
        &["run", "--rm", "-v", "big:/data", nodes::IMAGE, "true"],
    );
    let took = t0.elapsed();
    let err = stderr(&o);
    eprintln!("docker run answered after {took:?}: {}", err.trim());
    assert!(
        !o.status.success(),
        "the Mount succeeded: {err}\n{}",
        d.log()
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "docker run answered after {took:?}, not at the 3 s limit: {err}"
    );
    assert!(
        err.contains("volume \"big\": the unseal is still running after 3 s (")
            && err.contains(" MiB of 32.0 MiB unsealed, ")
            && err.contains(" %; a volume created with `-o reclaim=instant` is served at once instead); it goes on in the background: retry `docker run` in a moment"),
        "{err}"
    );
    assert_eq!(d.disk("big")["state"], "unsealing", "the unseal stopped");
    let seen = until_sealed_again(d, "big", Duration::from_secs(60));
    assert_eq!(
        seen.first().map(String::as_str),
        Some("unsealing"),
        "{seen:?}"
    );
    let v = d.disk("big");
    assert_eq!(v["dangling"], true, "{v}");

    // The disk is fast again: the next docker run gets the data back, bit-exact.
    cg.limit(0);
    let again = ok(&[
        "run",
        "--rm",
        "-v",
        "big:/data",
        nodes::IMAGE,
        "sha256sum",
        "/data/f",
    ]);
    assert_eq!(again, sum);
    drop(w);
    assert!(
        t_test.elapsed() < Duration::from_secs(90),
        "{:?}",
        t_test.elapsed()
    );
}

/// Docker, instant reclaim (`-o reclaim=instant`, docs/instant-reclaim.md §8): a sealed
/// volume holding `data_mib` MiB (and a small file) behind a disk throttled to `bps` (0: no
/// limit). `docker run` reads the small file, served through pdguard's FUSE file while the
/// migration runs; returns how long that `docker run` took. Then, the disk fast again,
/// every byte of the volume reads back bit-exact through the same path.
fn docker_run_on_an_instant_volume(size: &str, data_mib: u64, bps: u64) -> Duration {
    // Timed from when this test has the machine's cluster lock (another Docker test may
    // hold it first).
    let cluster = nodes::Cluster::new(1);
    let t_test = Instant::now();
    let n = cluster.node(1);
    let state = n.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let cg = Throttle::new(&state);
    let mut then = vec!["nsenter".to_string()];
    then.extend(n.enter(false));
    let serve = Serve::new(&state)
        .profile("patent")
        .args(&[
            "--grace",
            "2s",
            "--docker",
            "--docker-driver",
            "pdguard-test",
        ])
        .args(&["--docker-host", &n.host(), "--docker-resync", "1s"])
        .env("PDGUARD_LOG", "info")
        .via("sh", &cg.via(&then));
    let mut w = World {
        daemon: None,
        cg,
        cluster,
    };
    w.daemon = Some(serve.start());
    let (d, n, cg) = (w.daemon.as_ref().unwrap(), w.cluster.node(1), &w.cg);
    assert_eq!(
        cg.procs(),
        vec![d.pid().to_string()],
        "the daemon is not throttled"
    );
    let ok = |secs: u64, args: &[&str]| {
        let o = docker(n, secs, args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}\n{}",
            stderr(&o),
            d.log()
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let size = format!("size={size}");
    ok(
        60,
        &[
            "volume",
            "create",
            "-d",
            "pdguard-test",
            "-o",
            &size,
            "-o",
            "reclaim=instant",
            "big",
        ],
    );
    let shown = ok(
        30,
        &[
            "volume",
            "inspect",
            "big",
            "--format",
            "{{.Status.reclaim}}",
        ],
    );
    assert_eq!(shown, "instant");
    let fill = format!(
        "dd if=/dev/urandom of=/data/filler bs=1M count={data_mib} 2>/dev/null && \
         head -c 1048576 /dev/urandom > /data/small && sync && \
         sha256sum /data/small /data/filler"
    );
    let sums = ok(
        300,
        &[
            "run",
            "--rm",
            "-v",
            "big:/data",
            nodes::IMAGE,
            "sh",
            "-c",
            &fill,
        ],
    );
    let small_sum = sums.lines().next().unwrap().to_string();
    assert!(small_sum.ends_with("/data/small"), "{sums}");
    d.wait_state("big", "sealed", 240);
    eprintln!("filled and sealed after {:?}", t_test.elapsed());
    let path = PathBuf::from(d.disk("big")["path"].as_str().unwrap().to_string());
    drop_cache(&path);
    cg.limit(bps);

    let t0 = Instant::now();
    let o = docker(
        n,
        130,
        &[
            "run",
            "--rm",
            "-v",
            "big:/data",
            nodes::IMAGE,
            "sha256sum",
            "/data/small",
        ],
    );
    let took = t0.elapsed();
    eprintln!("docker run on the sealed volume answered after {took:?}");
    // Where the time went: the daemon's lines about the reclaim and the mount.
    for line in d.log().lines().filter(|l| {
        ["instant reclaim", "FUSE", "Mount", "migration"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        eprintln!("daemon: {line}");
    }
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), small_sum);
    let v = d.disk("big");
    assert_eq!(
        v["state"], "migrating",
        "the volume was not served through its migration: {v}"
    );

    // The disk is fast again: every byte reads back through the FUSE file, bit-exact.
    cg.limit(0);
    let files = [
        "run",
        "--rm",
        "-v",
        "big:/data",
        nodes::IMAGE,
        "sha256sum",
        "/data/small",
        "/data/filler",
    ];
    assert_eq!(ok(300, &files), sums);
    drop(w);
    eprintln!("took {:?}", t_test.elapsed());
    took
}

/// A sealed instant volume holding 512 MiB: `docker run` reads it at once, served through
/// the migration (still running when the container is done), and bit-exact throughout.
#[test]
fn a_docker_run_on_an_instant_volume_is_served_through_its_migration() {
    let took = docker_run_on_an_instant_volume("640M", 512, 0);
    assert!(took < Duration::from_secs(5), "docker run took {took:?}");
}

/// The bound: a sealed volume holding 2 GiB behind a disk throttled to 16 MiB/s, at
/// which a copy unseal's first pass alone (reading the 2 GiB of sealed data) takes over
/// 128 s, past dockerd's 120 s: `docker run` must start within 5 s and read its file.
#[test]
fn a_docker_run_on_an_instant_volume_behind_a_slow_disk_starts_at_once() {
    let took = docker_run_on_an_instant_volume("2200M", 2048, 16 << 20);
    assert!(took < Duration::from_secs(5), "docker run took {took:?}");
}
