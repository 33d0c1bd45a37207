//! A Docker Swarm of guarded hosts (issue 19): three dockerds the test starts in their own
//! namespaces (tests/nodes), each followed by its own `pdguard serve --docker`, one swarm.
//! A service with a pdguard volume moves between nodes; what a task leaves behind on a node
//! is the patent's dangling disk ([029]-[030]) and is sealed there after the grace; a task
//! that comes back reclaims it bit-exact. The machine's own dockerd is never addressed
//! (only asked, read-only, whether it is still outside any swarm).
#![allow(clippy::unwrap_used)]

mod nodes;

use std::time::{Duration, Instant};

use nodes::{Cluster, Node, IMAGE};
use serde_json::Value;

const GRACE: &str = "2s";
const PDGUARD: &[&str] = &["--grace", GRACE, "--docker-resync", "1s", "--jobs", "2"];

/// What of the machine's own Docker the tests must leave as they found it.
#[derive(Debug, PartialEq)]
struct Host {
    swarm: String,
    plugins: Vec<String>,
}

fn host() -> Host {
    let o = nodes::run(
        60,
        "docker",
        &["info", "--format", "{{.Swarm.LocalNodeState}}"],
    );
    let mut plugins: Vec<String> = std::fs::read_dir("/run/docker/plugins")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    plugins.sort();
    Host {
        swarm: String::from_utf8_lossy(&o.stdout).trim().to_string(),
        plugins,
    }
}

/// The nodes' driver never shows up on the machine's own plugin directory, and the
/// machine's dockerd stays out of (or in) swarm mode as it was.
fn check_host_untouched(before: &Host) {
    let after = host();
    assert_eq!(
        after.swarm, before.swarm,
        "the machine's dockerd swarm state changed"
    );
    if !before.plugins.iter().any(|p| p == "pdguard.sock") {
        assert!(
            !after.plugins.iter().any(|p| p == "pdguard.sock"),
            "a node's plugin socket leaked into the machine's /run/docker/plugins: {:?}",
            after.plugins
        );
    }
}

fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n);
    for node in &mut c.nodes {
        node.start_pdguard(PDGUARD);
    }
    c.swarm();
    // Fix (a) of issue 19: pdguard made its dockerd activate the legacy plugin, so that
    // Swarm finds the driver on every node ("missing plugin on N nodes" otherwise).
    for node in &c.nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node
            .docker_ok(&["info", "--format", "{{.Plugins.Volume}}"])
            .contains("pdguard")
        {
            assert!(
                Instant::now() < deadline,
                "node {}: dockerd does not list the pdguard driver: {}",
                node.n,
                node.pdguard_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    c
}

fn disk(node: &Node, name: &str) -> Option<Value> {
    let o = node.pdguard_cli(&["disk", "show", name, "--json"]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn state_of(node: &Node, name: &str) -> String {
    disk(node, name)
        .and_then(|d| d["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "absent".into())
}

/// Wait until `name` on `node` is in `want`; on timeout, fail with the node's story.
fn wait_state(node: &Node, name: &str, want: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = state_of(node, name);
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {}: volume {name} is {s}, not {want}, after {secs} s\n{}",
            node.n,
            node.pdguard_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The running container of `service` on `node`, once there is one.
fn task_container(node: &Node, service: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let filter = format!("label=com.docker.swarm.service.name={service}");
    loop {
        let ids = node.docker_ok(&["ps", "-q", "--filter", &filter]);
        if let Some(id) = ids.lines().next() {
            return id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "node {}: no running task of {service} after {secs} s; tasks: {}",
            node.n,
            node.docker(&["service", "ps", "--no-trunc", service])
                .stdout
                .escape_ascii()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The task writes the secret and 1 MiB of random bytes with their digest, once: a task
/// that finds them (a reclaimed volume) leaves them as they are.
fn create_service(manager: &Node, name: &str, secret: &str, constraint: &str) {
    let script = format!(
        "test -f /data/blob.md5 || {{ echo {secret} > /data/s; head -c 1048576 /dev/urandom > /data/blob; md5sum /data/blob > /data/blob.md5; }}; sync; exec sleep 100000"
    );
    let mount =
        format!("type=volume,source={name},target=/data,volume-driver=pdguard,volume-opt=size=64M");
    manager.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--constraint",
        constraint,
        "--stop-grace-period",
        "1s",
        "--mount",
        &mount,
        IMAGE,
        "sh",
        "-c",
        &script,
    ]);
}

/// The secret's bytes in a node's volume file.
fn file_holds(node: &Node, name: &str, secret: &str) -> bool {
    let d = disk(node, name).unwrap();
    let bytes = std::fs::read(d["path"].as_str().unwrap()).unwrap();
    bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
}

/// The data the first task wrote is all there: the secret, and the blob against its digest.
fn data_intact(node: &Node, service: &str, secret: &str) {
    let id = task_container(node, service, 60);
    let line = "test -f /data/blob.md5 && cat /data/s && md5sum -c /data/blob.md5";
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        // The first task may still be writing.
        let o = node.docker(&["exec", &id, "sh", "-c", line]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        last.lines().collect::<Vec<_>>(),
        vec![secret, "/data/blob: OK"],
        "node {}: the task's data",
        node.n
    );
}

fn secret() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("swarm-secret-{}-{t:x}", std::process::id())
}

fn node_id(node: &Node) -> String {
    node.docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"])
}

/// Issue 19, item 2: a pinned service moved from node to node, a drained node and a removed
/// service, with three guarded nodes.
#[test]
fn volumes_left_behind_by_swarm_tasks_are_sealed_and_reclaimed() {
    let before = host();
    let started = Instant::now();
    let c = cluster(3);
    eprintln!("swarm of 3 up in {:.1?}", started.elapsed());
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let secret = secret();
    create_service(n1, "db", &secret, "node.labels.n==1");
    wait_state(n1, "db", "attached", 60);
    data_intact(n1, "db", &secret);
    assert!(
        file_holds(n1, "db", &secret),
        "the secret is not in node 1's file while in use: the check below would prove nothing"
    );

    // Moved to node 2: node 1's volume is dangling and sealed after the grace.
    n1.docker_ok(&[
        "service",
        "update",
        "--detach",
        "--constraint-rm",
        "node.labels.n==1",
        "--constraint-add",
        "node.labels.n==2",
        "db",
    ]);
    wait_state(n2, "db", "attached", 60);
    wait_state(n1, "db", "sealed", 30);
    assert!(
        !file_holds(n1, "db", &secret),
        "node 1's sealed volume still holds the secret"
    );
    assert_eq!(state_of(n3, "db"), "absent");

    // Moved back: node 1's volume is reclaimed bit-exact (the unseal checks the seal's
    // digest; the data the first task wrote reads back); node 2's is sealed in turn.
    n1.docker_ok(&[
        "service",
        "update",
        "--detach",
        "--constraint-rm",
        "node.labels.n==2",
        "--constraint-add",
        "node.labels.n==1",
        "db",
    ]);
    wait_state(n1, "db", "attached", 60);
    data_intact(n1, "db", &secret);
    wait_state(n2, "db", "sealed", 30);

    // Node 1 drained: its task moves to node 3 (the only other node the service allows),
    // and what it left on node 1 is sealed.
    n1.docker_ok(&[
        "service",
        "update",
        "--detach",
        "--constraint-rm",
        "node.labels.n==1",
        "--constraint-add",
        "node.labels.n!=2",
        "db",
    ]);
    n1.docker_ok(&["node", "update", "--availability", "drain", &node_id(n1)]);
    wait_state(n3, "db", "attached", 60);
    wait_state(n1, "db", "sealed", 30);

    // Removed: sealed on every node that ran it.
    n1.docker_ok(&["service", "rm", "db"]);
    for node in [n1, n2, n3] {
        wait_state(node, "db", "sealed", 30);
    }
    eprintln!("scenario done in {:.1?}", started.elapsed());
    drop(c);
    check_host_untouched(&before);
}

/// Issue 19, item 2: node 2's dockerd dies. Its pdguard says so and seals nothing on a
/// guess; when dockerd returns, the reconcile seals what the service (removed meanwhile)
/// left, and the plugin is active again on that dockerd.
#[test]
fn a_node_whose_dockerd_dies_seals_nothing_until_it_returns() {
    let before = host();
    let mut c = cluster(2);
    let secret = secret();
    create_service(c.node(1), "db2", &secret, "node.labels.n==2");
    wait_state(c.node(2), "db2", "attached", 60);
    data_intact(c.node(2), "db2", &secret);

    c.node_mut(2).kill_dockerd();
    let n2 = c.node(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = n2.pdguard_cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v["docker"]["reachable"] == false {
            assert!(v["docker"]["error"].is_string(), "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never said unreachable: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&n2.pdguard_cli(&["status"]).stdout).into_owned();
    assert!(text.contains("UNREACHABLE"), "{text}");
    // Three graces and more: nothing is sealed on a guess.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(state_of(n2, "db2"), "attached");
    assert!(file_holds(n2, "db2", &secret));

    // Removed while node 2 cannot hear it; dockerd returns and the reconcile seals.
    c.node(1).docker_ok(&["service", "rm", "db2"]);
    c.node_mut(2).start_dockerd();
    let n2 = c.node(2);
    wait_state(n2, "db2", "sealed", 90);
    assert!(!file_holds(n2, "db2", &secret));
    let v: Value = serde_json::from_slice(&n2.pdguard_cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(v["docker"]["reachable"], true, "{v}");
    assert!(n2
        .docker_ok(&["info", "--format", "{{.Plugins.Volume}}"])
        .contains("pdguard"));
    drop(c);
    check_host_untouched(&before);
}
