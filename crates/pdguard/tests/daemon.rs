//! End-to-end tests of `pdguard serve` through its real unix socket, against a real daemon
//! process, driven by the real `pdguard` client commands and by raw HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The daemon's admin socket.
fn socket(d: &Daemon) -> PathBuf {
    d.state().join("pdguard.sock")
}

fn fill_random(path: &Path, seed: u64) -> String {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    std::fs::write(path, &data).unwrap();
    digest(path)
}

fn path_of(d: &Value) -> PathBuf {
    PathBuf::from(d["path"].as_str().unwrap())
}

/// One raw HTTP request on the unix socket; returns (status, body).
fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
    http::over_unix(sock, request)
}

fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: pdguard\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw(sock, &req)
}

/// The walkthrough of the issue: attach, write, remove the container, sealed within the
/// grace period plus the seal time, reclaim by a new container, bit-exact.
#[test]
fn dangling_disk_is_sealed_and_reclaimed_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), &["--grace", "2s"]);
    let v = d.ok(&["disk", "create", "d1", "--size", "64M"]);
    assert_eq!(v["state"], "available");
    assert_eq!(v["dangling"], false);
    let v = d.ok(&["container", "up", "c1", "--disk", "d1"]);
    assert_eq!(v["disks"][0]["state"], "attached");
    let path = path_of(&d.disk("d1"));
    let before = fill_random(&path, 1);

    let t0 = Instant::now();
    d.ok(&["container", "down", "c1", "--removed"]);
    let v = d.disk("d1");
    assert_eq!(v["state"], "grace");
    assert_eq!(v["dangling"], false);
    let v = d.wait_state("d1", "sealed", 60);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "sealed before the grace period ended"
    );
    assert_eq!(v["dangling"], true);
    assert_ne!(
        digest(&path),
        before,
        "the sealed file still holds the plaintext"
    );

    let v = d.ok(&["container", "up", "c2", "--disk", "d1"]);
    assert_eq!(v["disks"][0]["state"], "attached");
    assert_eq!(v["disks"][0]["dangling"], false);
    assert_eq!(digest(&path), before, "reclaim is not bit-exact");

    let m = http(&socket(&d), "GET", "/metrics", b"").1;
    for line in [
        "pdguard_disks{state=\"attached\"} 1",
        "pdguard_jobs_finished_total{kind=\"seal\"} 1",
        "pdguard_jobs_finished_total{kind=\"unseal\"} 1",
        "pdguard_jobs_failed_total{kind=\"seal\"} 0",
        "pdguard_job_duration_seconds_count{kind=\"unseal\"} 1",
        "pdguard_jobs{kind=\"seal\",state=\"running\"} 0",
    ] {
        assert!(m.contains(line), "metrics lack {line:?}:\n{m}");
    }
}

/// A container that comes back within the grace period cancels it, and so does a daemon
/// restart followed by the container's return: the disk is never sealed.
#[test]
fn restart_inside_the_grace_keeps_the_disk_unsealed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--grace", "2s", "--profile", "patent"]);
    d.ok(&["disk", "create", "d1", "--size", "8M"]);
    d.ok(&["container", "up", "c1", "--disk", "d1"]);
    let path = path_of(&d.disk("d1"));
    let before = fill_random(&path, 2);
    d.ok(&["container", "down", "c1"]);
    std::thread::sleep(Duration::from_millis(800));
    d.ok(&["container", "up", "c1", "--disk", "d1"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.disk("d1")["state"], "attached");

    // The container crashes; the daemon restarts inside the grace; the container returns.
    d.ok(&["container", "down", "c1", "--crashed"]);
    d.kill9();
    let d = Daemon::start(&state, &["--grace", "2s", "--profile", "patent"]);
    assert_eq!(d.disk("d1")["state"], "grace");
    d.ok(&["container", "up", "c1", "--disk", "d1"]);
    std::thread::sleep(Duration::from_millis(2500));
    let v = d.disk("d1");
    assert_eq!(v["state"], "attached");
    assert_eq!(v["dangling"], false);
    assert_eq!(digest(&path), before);
    assert!(
        !record_of(&path).exists(),
        "the disk was sealed at some point"
    );
}

/// SIGKILL the daemon in the middle of a seal; on restart the seal resumes from its record
/// and ends sealed; reclaiming gives back the original bytes.
#[test]
fn daemon_killed_during_a_seal_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--grace", "0s"]);
    d.ok(&["disk", "create", "big", "--size", "256M"]);
    d.ok(&["container", "up", "c1", "--disk", "big"]);
    let path = path_of(&d.disk("big"));
    let before = fill_random(&path, 3);
    d.ok(&["container", "down", "c1", "--removed"]);
    // Wait until the job has a record in a moving phase, then kill the daemon.
    let deadline = Instant::now() + Duration::from_secs(60);
    let phase = loop {
        let rec = std::fs::read_to_string(record_of(&path)).unwrap_or_default();
        if let Some(p) = ["seal-scatter", "seal-gather"]
            .iter()
            .find(|p| rec.contains(&format!("\"phase\": \"{p}\"")))
        {
            break p.to_string();
        }
        assert!(Instant::now() < deadline, "the seal never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    d.kill9();
    let rec = std::fs::read_to_string(record_of(&path)).unwrap();
    assert!(
        !rec.contains("\"phase\": \"sealed\""),
        "the seal finished before the kill ({phase})"
    );

    let d = Daemon::start(&state, &["--grace", "0s"]);
    let v = d.wait_state("big", "sealed", 120);
    assert_eq!(v["dangling"], true);
    assert_ne!(digest(&path), before);
    d.ok(&["container", "up", "c2", "--disk", "big"]);
    assert_eq!(
        digest(&path),
        before,
        "resumed seal then unseal is not bit-exact"
    );
}

/// Two disks seal at once; a reclaim that arrives mid-seal waits for the seal, unseals and
/// returns with the disk usable and bit-exact.
#[test]
fn two_disks_seal_at_once_and_a_reclaim_mid_seal_wins() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), &["--grace", "0s", "--jobs", "2"]);
    d.ok(&["disk", "create", "a", "--size", "64M"]);
    d.ok(&["disk", "create", "b", "--size", "64M"]);
    d.ok(&["container", "up", "c1", "--disk", "a", "--disk", "b"]);
    let (pa, pb) = (path_of(&d.disk("a")), path_of(&d.disk("b")));
    let (da, db) = (fill_random(&pa, 4), fill_random(&pb, 5));
    d.ok(&["container", "down", "c1", "--removed"]);
    // Both are sealing at the same time at some instant.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = d.ok(&["status"]);
        let states: Vec<&str> = st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["state"].as_str().unwrap())
            .collect();
        if states.iter().all(|s| *s == "sealing") {
            break;
        }
        assert!(
            !states.iter().all(|s| *s == "sealed"),
            "never saw both sealing at once"
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reclaim `a` while it is being sealed.
    let v = d.ok(&["container", "up", "c2", "--disk", "a"]);
    assert_eq!(v["disks"][0]["state"], "attached");
    assert_eq!(digest(&pa), da, "reclaim mid-seal is not bit-exact");
    d.wait_state("b", "sealed", 60);
    assert_ne!(digest(&pb), db);
    d.ok(&["container", "up", "c3", "--disk", "b"]);
    assert_eq!(digest(&pb), db);
}

/// Bad input: a JSON error with a stable code and the right status, no state change, and
/// the daemon keeps serving.
#[test]
fn bad_requests_get_stable_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &dir.path().join("state"),
        &["--grace", "30s", "--profile", "patent"],
    );
    d.ok(&["disk", "create", "d1", "--size", "1M"]);
    let sock = socket(&d);
    let before = http(&sock, "GET", "/v1/disks", b"").1;
    let other = dir.path().join("other.img");
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "GET",
            "/v1/disks/nope".into(),
            vec![],
            404,
            "disk_not_found",
        ),
        (
            "POST",
            "/v1/disks".into(),
            br#"{"name":"d1","size":1048576}"#.to_vec(),
            409,
            "already_exists",
        ),
        (
            "POST",
            "/v1/disks".into(),
            br#"{"name":"d2","size":1000}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/disks".into(),
            br#"{"name":"../x","size":512}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/disks".into(),
            br#"{"name":"d2","size":"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/disks".into(),
            br#"{"name":"d2","size":512,"color":1}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/disks".into(),
            vec![b'x'; 100_000],
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/v1/containers/c1/up".into(),
            br#"{"disks":["nope"]}"#.to_vec(),
            404,
            "disk_not_found",
        ),
        (
            "POST",
            "/v1/containers/ghost/down".into(),
            br#"{"state":"removed"}"#.to_vec(),
            404,
            "container_not_found",
        ),
        (
            "POST",
            "/v1/containers/c1/down".into(),
            br#"{"state":"exploded"}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/disks/d1/unseal".into(),
            vec![],
            409,
            "conflict",
        ),
        (
            "DELETE",
            "/v1/disks/d1?shred=maybe".into(),
            vec![],
            400,
            "bad_query",
        ),
        ("PUT", "/v1/disks".into(), vec![], 405, "method_not_allowed"),
        ("GET", "/v2/everything".into(), vec![], 404, "not_found"),
    ];
    for (m, p, body, status, code) in &cases {
        let (got, text) = http(&sock, m, p, body);
        assert_eq!(got, *status, "{m} {p}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{m} {p}: not JSON: {text}"));
        assert_eq!(v["error"]["code"], *code, "{m} {p}: {text}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 10);
    }
    // A path already used by another disk (a managed one, inside the state directory;
    // tests/adopt.rs covers adopted files named twice).
    let p1 = path_of(&d.disk("d1"));
    let o = d.cli(&["disk", "create", "d3", "--size", "1M", "--path", s(&p1)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("inside the state directory"),
        "{}",
        stderr(&o)
    );
    // Refused by the client as a usage error; the daemon's own check is above (the API).
    let o = d.cli(&["disk", "create", "d3", "--size", "1000"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("no sector size divides it"),
        "{}",
        stderr(&o)
    );
    assert!(!other.exists());
    assert_eq!(
        http(&sock, "GET", "/v1/disks", b"").1,
        before,
        "a bad request changed state"
    );

    // A client without permission on the socket (mode 0600, owned by root).
    let mode = std::fs::metadata(&sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "status",
            "--api",
        ])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));

    // No daemon at all: a clear message.
    let o = pdguard(&["status", "--state-dir", s(&dir.path().join("nowhere"))]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no pdguard daemon answers"),
        "{}",
        stderr(&o)
    );
}

/// 1,000 random API calls, garbage included, leave the daemon up and the registry
/// consistent, before and after a restart.
#[test]
fn a_thousand_random_calls_leave_the_daemon_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(
        &state,
        &["--grace", "50ms", "--profile", "patent", "--jobs", "2"],
    );
    let sock = socket(&d);
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let names = ["a", "b", "c", "x y", "", "..", "a/b"];
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH"];
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        let n = names[rng.gen_range(0..names.len())];
        let c = ["c1", "c2", "c3"][rng.gen_range(0..3)];
        let (method, path, body): (&str, String, Vec<u8>) = match rng.gen_range(0..12) {
            0 => (
                "POST",
                "/v1/disks".into(),
                format!(r#"{{"name":"{n}","size":{}}}"#, 512 * rng.gen_range(0..64)).into_bytes(),
            ),
            1 => (
                "POST",
                format!("/v1/containers/{c}/up"),
                format!(r#"{{"disks":["{n}"]}}"#).into_bytes(),
            ),
            2 => {
                let st = ["stopped", "crashed", "removed", "running", "zzz"][rng.gen_range(0..5)];
                (
                    "POST",
                    format!("/v1/containers/{c}/down"),
                    format!(r#"{{"state":"{st}"}}"#).into_bytes(),
                )
            }
            3 => ("DELETE", format!("/v1/disks/{n}"), vec![]),
            4 => ("POST", format!("/v1/disks/{n}/seal"), vec![]),
            5 => ("POST", format!("/v1/disks/{n}/unseal"), vec![]),
            6 => ("GET", format!("/v1/disks/{n}"), vec![]),
            7 => ("GET", "/v1/status".into(), vec![]),
            8 => {
                let len = rng.gen_range(0..300);
                (
                    methods[rng.gen_range(0..5)],
                    "/v1/disks".into(),
                    (0..len).map(|_| rng.gen()).collect(),
                )
            }
            9 => {
                // Raw garbage instead of HTTP.
                let junk: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
                let (st, _) = raw(&sock, &junk);
                *statuses.entry(st).or_insert(0) += 1;
                continue;
            }
            10 => ("GET", "/metrics".into(), vec![]),
            _ => (
                methods[rng.gen_range(0..5)],
                format!("/v1/{}", n),
                vec![b'{'; rng.gen_range(0..10)],
            ),
        };
        let (st, text) = http(&sock, method, &path.replace(' ', "%20"), &body);
        *statuses.entry(st).or_insert(0) += 1;
        assert!(st != 0, "no answer to {method} {path}");
        assert!(
            st < 500 || text.contains("\"code\""),
            "{method} {path}: {st} {text}"
        );
    }
    eprintln!("statuses: {statuses:?}");
    d.ok(&["status"]);
    let check = |d: &Daemon| {
        let st = d.ok(&["status"]);
        let disks: Vec<&Value> = st["disks"].as_array().unwrap().iter().collect();
        let names: Vec<&str> = disks.iter().map(|x| x["name"].as_str().unwrap()).collect();
        for c in st["containers"].as_array().unwrap() {
            for dn in c["disks"].as_array().unwrap() {
                assert!(
                    names.contains(&dn.as_str().unwrap()),
                    "container {c} names a missing disk"
                );
            }
            if c["state"] == "removed" {
                assert!(
                    c["disks"].as_array().unwrap().is_empty(),
                    "removed container kept disks: {c}"
                );
            }
        }
        for x in &disks {
            assert!(
                Path::new(x["path"].as_str().unwrap()).exists(),
                "disk file missing: {x}"
            );
            let s = x["state"].as_str().unwrap();
            let attached_to_running = st["containers"].as_array().unwrap().iter().any(|c| {
                c["state"] == "running"
                    && c["disks"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|n| n == &x["name"])
            });
            if attached_to_running {
                assert!(
                    ["attached", "unsealing", "sealing", "failed"].contains(&s),
                    "{x}"
                );
            }
            assert_ne!(s, "failed", "a job failed: {x}");
        }
        st
    };
    // Let jobs settle, then check, restart, check again.
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.ok(&["status"])["disks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["state"] == "sealing" || x["state"] == "unsealing")
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = check(&d);
    d.kill9();
    let d = Daemon::start(&state, &["--grace", "50ms", "--profile", "patent"]);
    let b = check(&d);
    assert_eq!(a["containers"], b["containers"]);
}

/// `disk rm` refuses a disk a running container uses; `--shred` crypto-erases a sealed disk
/// and deletes its file and record.
#[test]
fn remove_and_shred_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), &["--grace", "0s"]);
    d.ok(&["disk", "create", "d1", "--size", "4M"]);
    d.ok(&["container", "up", "c1", "--disk", "d1"]);
    let path = path_of(&d.disk("d1"));
    fill_random(&path, 6);
    let o = d.cli(&["disk", "rm", "d1"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("take the container down first"),
        "{}",
        stderr(&o)
    );
    let o = d.cli(&["disk", "rm", "d1", "--shred"]);
    assert_eq!(code(&o), 1);
    d.ok(&["container", "down", "c1", "--removed"]);
    d.wait_state("d1", "sealed", 60);
    assert!(record_of(&path).exists());
    let v = d.ok(&["disk", "rm", "d1", "--shred"]);
    assert_eq!(v["shredded"], true);
    assert!(!path.exists(), "the disk file is still there");
    assert!(!record_of(&path).exists(), "the seal record is still there");
    let o = d.cli(&["disk", "show", "d1"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no disk named"), "{}", stderr(&o));
}

/// A container stopped on purpose is not non-operational ([028]): its disk stays unsealed
/// past the grace, unless the daemon runs with `--seal-stopped`.
#[test]
fn a_stopped_container_seals_only_with_seal_stopped() {
    for (flag, want) in [(None, "attached"), (Some("--seal-stopped"), "sealed")] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["--grace", "300ms", "--profile", "patent"];
        args.extend(flag);
        let d = Daemon::start(&dir.path().join("state"), &args);
        d.ok(&["disk", "create", "d1", "--size", "1M"]);
        d.ok(&["container", "up", "c1", "--disk", "d1"]);
        d.ok(&["container", "down", "c1"]);
        assert_eq!(d.ok(&["status"])["seal_stopped"], flag.is_some());
        if flag.is_some() {
            d.wait_state("d1", want, 30);
        } else {
            std::thread::sleep(Duration::from_millis(1500));
            assert_eq!(d.disk("d1")["state"], want, "{flag:?}");
        }
    }
}
