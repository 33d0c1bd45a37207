//! Docker nodes that the tests start themselves, so the machine's own dockerd never sees a
//! test (issue 19): each node is a dockerd in a network namespace of its own and a private
//! mount namespace whose `/run/docker/plugins` is a tmpfs, so that the node's pdguard and
//! dockerd find each other's plugin socket and nobody else does.
//!
//! Layout, every name keyed by [`PREFIX`] so that a sweep finds what a killed run left:
//! - network namespaces `pdgsw-hub` (a bridge) and `pdgsw-N` (node N, 10.213.7.N/24 on a
//!   veth `pdgswN` whose peer `pdgswNh` is on the hub's bridge);
//! - a mount-namespace holder per node: `unshare -m` running `sh`, which mounts the tmpfs and
//!   then waits on its stdin (a pipe from the test: when the test process dies, it exits);
//! - dockerd N entered into both with `nsenter` (not `ip netns exec`, which remounts /sys and
//!   hides the cgroup mounts), with its own `--config-file` holding `{}`, `--data-root`,
//!   `--exec-root`, `--pidfile`, socket and containerd, `--storage-driver vfs`,
//!   `--bridge none --iptables=false`, and `--cgroup-parent pdgsw-N` so that the sweep finds
//!   its containers' processes;
//! - files under [`root()`].
//!
//! [`Cluster::new`] takes a lock file (one cluster at a time on the machine), sweeps what an
//! earlier run left, and builds the nodes; its `Drop` (also when a test fails) stops them
//! within bounded time and sweeps again. Needs root, iproute2, util-linux, docker.io and
//! busybox-static: a missing one fails with the package to install.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every namespace, interface, cgroup and directory of the harness starts with this.
pub const PREFIX: &str = "pdgsw";
/// The subnet of the nodes, inside their own namespaces only.
const NET: &str = "10.213.7";
const LOCK: &str = "/run/lock/pdguard-nodes.lock";
/// The image every node gets: Debian's static busybox, `FROM scratch` by `docker import`.
pub const IMAGE: &str = "pdgsw-busybox:1";

/// Where the nodes' files live.
pub fn root() -> PathBuf {
    PathBuf::from(format!("/var/tmp/{PREFIX}"))
}

/// Run a command with a time limit (coreutils `timeout`), its output collected.
pub fn run(secs: u64, cmd: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Run and require success; stdout.
pub fn ok(secs: u64, cmd: &str, args: &[&str]) -> String {
    let o = run(secs, cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}): {}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Every tool the harness runs, with the Debian package that has it.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("timeout", "coreutils"),
    ("tar", "tar"),
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
];

/// Fail clearly when something the nodes need is missing.
fn prerequisites() {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(t, p)| format!("{t} (apt-get install {p})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the Docker node harness needs {}; scripts/test.sh installs them",
        missing.join(", ")
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: apt-get install busybox-static (scripts/test.sh does)"
    );
    let uid = text(&Command::new("id").arg("-u").output().unwrap().stdout);
    assert_eq!(
        uid, "0",
        "the Docker node harness needs root (namespaces, mounts, loop devices)"
    );
}

/// One node: a dockerd in its namespaces, and optionally its pdguard.
pub struct Node {
    pub n: usize,
    pub dir: PathBuf,
    holder: Child,
    /// Open while the node lives: the holder exits when it closes.
    _holder_stdin: ChildStdin,
    dockerd: Option<Child>,
    pdguard: Option<Child>,
    pdguard_log: Option<PathBuf>,
}

impl Node {
    pub fn netns(&self) -> String {
        format!("{PREFIX}-{}", self.n)
    }

    pub fn addr(&self) -> String {
        format!("{NET}.{}", self.n)
    }

    /// dockerd's API socket, as `unix://…`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("pdguard")
    }

    /// A path as the node's own processes see it (their mount namespace), e.g. its
    /// `/run/docker/plugins`.
    pub fn inside(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.holder.id()))
    }

    /// `program` to be run in the node's mount namespace (and network namespace if `net`).
    pub fn command(&self, program: &str, net: bool) -> Command {
        let mut c = Command::new("nsenter");
        c.args(self.enter(net)).arg(program);
        c
    }

    /// The `nsenter` arguments (after `nsenter`) that run a program in the node's mount
    /// namespace (and network namespace if `net`).
    pub fn enter(&self, net: bool) -> Vec<String> {
        let mut a = vec![format!("--mount=/proc/{}/ns/mnt", self.holder.id())];
        if net {
            a.push(format!("--net=/run/netns/{}", self.netns()));
        }
        a.push("--".into());
        a
    }

    /// `docker -H <this node> ARGS`, bounded.
    pub fn docker(&self, args: &[&str]) -> Output {
        let host = self.host();
        let mut a = vec!["-H", host.as_str()];
        a.extend_from_slice(args);
        run(120, "docker", &a)
    }

    pub fn docker_ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "node {}: docker {args:?}: {}",
            self.n,
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    /// Start this node's dockerd and wait until it answers.
    pub fn start_dockerd(&mut self) {
        assert!(self.dockerd.is_none(), "node {}: dockerd runs", self.n);
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let mut c = self.command("dockerd", true);
        c.arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            .args(["--storage-driver", "vfs", "--bridge", "none"])
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .args(["--shutdown-timeout", "2"])
            .arg(format!("--cgroup-parent={PREFIX}-{}", self.n))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.dockerd = Some(c.process_group(0).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .docker(&["info", "--format", "{{.ID}}"])
                .status
                .success()
            {
                return;
            }
            if let Some(Ok(Some(s))) = self.dockerd.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "node {}: dockerd exited ({s}); see {}",
                    self.n,
                    d.join("dockerd.log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {}: dockerd did not answer in 60 s; see {}",
                self.n,
                d.join("dockerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL the node's dockerd (its containers keep running under their shims).
    pub fn kill_dockerd(&mut self) {
        if let Some(mut c) = self.dockerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop dockerd with SIGTERM (it stops its containers: --shutdown-timeout 2), bounded.
    pub fn stop_dockerd(&mut self) {
        if let Some(c) = self.dockerd.take() {
            stop(c, Duration::from_secs(20));
        }
    }

    /// Start this node's pdguard: `serve --docker` following this node's dockerd, its
    /// plugin socket in the node's `/run/docker/plugins`; waits until its API answers and
    /// the plugin socket is there.
    pub fn start_pdguard(&mut self, args: &[&str]) {
        assert!(self.pdguard.is_none(), "node {}: pdguard runs", self.n);
        let state = self.state_dir();
        let log_path = self.dir.join("pdguard.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut c = self.command(env!("CARGO_BIN_EXE_pdguard"), false);
        c.arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .args(["--docker", "--docker-host", &self.host()])
            .args(args)
            .env("PDGUARD_LOG", "info")
            .env_remove("PDGUARD_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.pdguard = Some(c.process_group(0).spawn().unwrap());
        self.pdguard_log = Some(log_path.clone());
        let plugin = self.inside("/run/docker/plugins/pdguard.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = state.join("pdguard.sock").exists()
                && plugin.exists()
                && self.pdguard_cli(&["status"]).status.success();
            if up {
                return;
            }
            if let Some(Ok(Some(s))) = self.pdguard.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "node {}: pdguard exited ({s}): {}",
                    self.n,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {}: pdguard not ready in 30 s: {}",
                self.n,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_pdguard(&mut self) {
        if let Some(c) = self.pdguard.take() {
            stop(c, Duration::from_secs(15));
        }
    }

    /// `pdguard ARGS` against this node's daemon.
    pub fn pdguard_cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pdguard"))
            .args(args)
            .env("PDGUARD_STATE_DIR", self.state_dir())
            .env_remove("PDGUARD_KEY_FILE")
            .env_remove("PDGUARD_API")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn pdguard_log(&self) -> String {
        self.pdguard_log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(mut c: Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// N nodes; the lock file is held for the cluster's lifetime.
pub struct Cluster {
    pub nodes: Vec<Node>,
    _lock: std::fs::File,
}

impl Cluster {
    /// `n` nodes, each with its dockerd running and the test image loaded; no pdguard yet.
    pub fn new(n: usize) -> Self {
        prerequisites();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap();
        lock.lock().unwrap();
        sweep();
        let root = root();
        std::fs::create_dir_all(&root).unwrap();
        let mut nodes = Vec::new();
        // The holders first: a mount namespace made after `ip netns add` would keep a copy
        // of the namespace's bind mount.
        for i in 1..=n {
            nodes.push(holder(i, &root));
        }
        let mut cluster = Self { nodes, _lock: lock };
        network(n);
        let rootfs = busybox_rootfs(&root);
        for node in &mut cluster.nodes {
            node.start_dockerd();
            import(Some(&node.host()), &rootfs, IMAGE);
        }
        cluster
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    pub fn node_mut(&mut self, n: usize) -> &mut Node {
        &mut self.nodes[n - 1]
    }

    /// Node 1 inits a swarm, the others join as workers; each node gets the label `n=N`
    /// (they all have this machine's hostname). Returns when every node is Ready.
    pub fn swarm(&self) {
        let m = self.node(1);
        m.docker_ok(&["swarm", "init", "--advertise-addr", &m.addr()]);
        let token = m.docker_ok(&["swarm", "join-token", "-q", "worker"]);
        for w in &self.nodes[1..] {
            w.docker_ok(&[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &w.addr(),
                &format!("{}:2377", m.addr()),
            ]);
        }
        for node in &self.nodes {
            let id = node.docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]);
            m.docker_ok(&[
                "node",
                "update",
                "--label-add",
                &format!("n={}", node.n),
                &id,
            ]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = m.docker_ok(&["node", "ls", "--format", "{{.Status}}"]);
            if ready.lines().filter(|l| *l == "Ready").count() == self.nodes.len() {
                return;
            }
            assert!(Instant::now() < deadline, "nodes not Ready: {ready}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let start = Instant::now();
        for node in &mut self.nodes {
            node.stop_pdguard();
        }
        for node in &mut self.nodes {
            node.stop_dockerd();
        }
        sweep();
        eprintln!("nodes: torn down in {:.1?}", start.elapsed());
    }
}

/// Node `i`'s mount namespace: `/run/docker/plugins` a tmpfs of its own.
fn holder(i: usize, root: &Path) -> Node {
    let dir = root.join(format!("n{i}"));
    for sub in ["data", "exec"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("daemon.json"), "{}\n").unwrap();
    // `$0` carries the root path, so that a sweep finds a holder a killed run left.
    let script = "mkdir -p /run/docker/plugins && mount -t tmpfs -o mode=0700 pdgsw /run/docker/plugins && echo ready && read _";
    let mut c = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .arg(dir.join("holder"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stdout = c.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    let r = std::io::Read::read_exact(&mut stdout, &mut buf);
    assert!(
        r.is_ok() && &buf == b"ready\n",
        "node {i}: cannot make a mount namespace with a tmpfs on /run/docker/plugins (unshare -m); on a machine without namespaces, PDGUARD_DOCKER_TESTS_ON_HOST=1 runs tests/docker.rs against the machine's dockerd (see its header)"
    );
    let stdin = c.stdin.take().unwrap();
    Node {
        n: i,
        dir,
        holder: c,
        _holder_stdin: stdin,
        dockerd: None,
        pdguard: None,
        pdguard_log: None,
    }
}

/// The hub's bridge and one veth per node.
fn network(n: usize) {
    let hub = format!("{PREFIX}-hub");
    ok(10, "ip", &["netns", "add", &hub]);
    ok(
        10,
        "ip",
        &["-n", &hub, "link", "add", "br0", "type", "bridge"],
    );
    ok(10, "ip", &["-n", &hub, "link", "set", "br0", "up"]);
    for i in 1..=n {
        let ns = format!("{PREFIX}-{i}");
        let (a, b) = (format!("{PREFIX}{i}"), format!("{PREFIX}{i}h"));
        ok(10, "ip", &["netns", "add", &ns]);
        ok(
            10,
            "ip",
            &[
                "link", "add", &a, "netns", &ns, "type", "veth", "peer", "name", &b, "netns", &hub,
            ],
        );
        ok(
            10,
            "ip",
            &["-n", &hub, "link", "set", &b, "master", "br0", "up"],
        );
        ok(
            10,
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{NET}.{i}/24"),
                "dev",
                &a,
            ],
        );
        ok(10, "ip", &["-n", &ns, "link", "set", &a, "up"]);
        ok(10, "ip", &["-n", &ns, "link", "set", "lo", "up"]);
    }
}

/// A root file system of Debian's static busybox, every applet a symlink, in `dir/rootfs`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let fs = dir.join("rootfs");
    let bin = fs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = ok(10, "/bin/busybox", &["--list"]);
    for applet in list.lines().filter(|a| *a != "busybox" && !a.contains('/')) {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    for d in ["dev", "proc", "sys", "data", "tmp"] {
        std::fs::create_dir_all(fs.join(d)).unwrap();
    }
    fs
}

/// `docker import` a root file system as `tag` into the dockerd at `host` (None: the
/// machine's own): an image without a registry or a build.
pub fn import(host: Option<&str>, rootfs: &Path, tag: &str) {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tar_out = tar.stdout.take().unwrap();
    let mut c = Command::new("timeout");
    c.args(["60", "docker"]);
    if let Some(h) = host {
        c.args(["-H", h]);
    }
    let o = c
        .args(["import", "-", tag])
        .stdin(tar_out)
        .output()
        .unwrap();
    let tarred = tar.wait().unwrap();
    assert!(
        o.status.success() && tarred.success(),
        "docker import ({tarred} from tar): {}",
        text(&o.stderr)
    );
}

/// Remove whatever a run of the harness left (processes, container cgroups, loop devices,
/// namespaces, files), keyed by [`PREFIX`]. Bounded: every step has a time limit.
pub fn sweep() {
    let root = root();
    let root_s = root.display().to_string();
    // Processes whose command line names the root: holders, dockerds, containerds, shims,
    // pdguards; then every process in the nodes' container cgroups.
    for _ in 0..50 {
        let mut pids = pids_naming(&root_s);
        pids.extend(cgroup_pids());
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    remove_cgroups();
    // Loop devices over files under the root (the nodes' volumes).
    let o = run(10, "losetup", &["-l", "-n", "-O", "NAME,BACK-FILE"]);
    for line in text(&o.stdout).lines() {
        let mut f = line.split_whitespace();
        if let (Some(dev), Some(file)) = (f.next(), f.next()) {
            if file.starts_with(&root_s) {
                let _ = run(10, "losetup", &["-d", dev]);
            }
        }
    }
    // Mounts left in this namespace under the root (none are made there, but a crashed
    // run of an older harness might have).
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root_s))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = run(10, "umount", &["-l", p]);
        }
    }
    let o = run(10, "ip", &["netns", "list"]);
    for line in text(&o.stdout).lines() {
        if let Some(name) = line.split_whitespace().next() {
            if name.starts_with(&format!("{PREFIX}-")) {
                let _ = run(10, "ip", &["netns", "del", name]);
            }
        }
    }
    if root.exists() {
        let _ = run(60, "rm", &["-rf", "--one-file-system", &root_s]);
    }
}

/// Processes whose command line contains `needle` (never this process).
fn pids_naming(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&p| p != me)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// The cgroup v1 controllers (or the v2 root) where the nodes' containers live.
fn cgroup_dirs() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    let mut bases = vec![base.to_path_buf()];
    if let Ok(d) = std::fs::read_dir(base) {
        bases.extend(d.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for b in bases {
        if let Ok(d) = std::fs::read_dir(&b) {
            for e in d.filter_map(|e| e.ok()) {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{PREFIX}-"))
                {
                    out.push(e.path());
                }
            }
        }
    }
    out
}

fn cgroup_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for top in cgroup_dirs() {
        for dir in walk(&top) {
            if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
    }
    pids
}

/// A directory and its subdirectories, deepest first.
fn walk(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(top) {
        for e in d.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out.push(top.to_path_buf());
    out
}

fn remove_cgroups() {
    for top in cgroup_dirs() {
        for dir in walk(&top) {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
