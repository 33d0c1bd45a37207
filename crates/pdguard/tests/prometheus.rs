//! Watched by Prometheus: a real Prometheus server (Debian's `prometheus`) scrapes two
//! daemons' TCP admin APIs with their bearer tokens, and a PromQL query over what it
//! scraped agrees with what each daemon's `pdguard status` says. promtool checks the
//! exposition and the alerting rules shipped in contrib/prometheus/.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A Debian command the test needs, or a failure naming the package.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: this test needs a real Prometheus server; run `apt-get install -y prometheus` (scripts/test.sh does)");
}

/// A token file of our own (the daemon accepts any line of 32+ printable characters).
fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    writeln!(f, "{token}").unwrap();
    p
}

/// One guarded host: a daemon on loopback TCP with a token file of our own.
struct Host {
    daemon: Daemon,
}

impl Host {
    fn start(dir: &Path, name: &str) -> Self {
        let token = token_file(
            dir,
            &format!("{name}.token"),
            &format!("{name}-{}", "t".repeat(40)),
        );
        let daemon = Serve::new(&dir.join(name))
            .profile("patent")
            .api_tcp()
            .api_token_file(&token)
            .start();
        Self { daemon }
    }

    fn run(&self, args: &[&str]) -> serde_json::Value {
        self.daemon.ok(args)
    }

    /// Disks by state, as `pdguard status --json` says.
    fn states(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for d in self.run(&["status"])["disks"].as_array().unwrap() {
            *by.entry(d["state"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        by
    }

    /// GET /metrics with the token.
    fn metrics(&self) -> String {
        let token = std::fs::read_to_string(self.daemon.token_file()).unwrap();
        let addr = self.daemon.addr();
        let req = format!(
            "GET /metrics HTTP/1.0\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\r\n",
            token.trim()
        );
        let (status, body) = http(addr, &req);
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// One HTTP/1.0 exchange (no chunking): status and body.
fn http(addr: &str, req: &str) -> (u16, String) {
    common::http::over_tcp(addr, req.as_bytes(), Duration::from_secs(10))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on a loopback port, with its data in a temporary directory;
/// killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Self {
        let bin = tool("prometheus");
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let check = Command::new(tool("promtool"))
            .args(["check", "config", s(&cfg)])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "promtool check config: {}",
            stderr(&check)
        );
        // A free port: taken from the kernel, then handed over (nothing else here binds
        // loopback ports by number).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", s(&cfg)))
            .arg(format!("--storage.tsdb.path={}", s(&dir.join("tsdb"))))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Self { child, addr, log };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({st}):\n{}", self.log_text());
            }
            if TcpStream::connect(&self.addr).is_ok() {
                let req = format!("GET /-/ready HTTP/1.0\r\nhost: {}\r\n\r\n", self.addr);
                if http(&self.addr, &req).0 == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus was not ready within 30 s:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query: the result vector as (the value of `label`, value).
    fn query(&self, promql: &str, label: &str) -> BTreeMap<String, f64> {
        let req = format!(
            "GET /api/v1/query?query={} HTTP/1.0\r\nhost: {}\r\n\r\n",
            url_encode(promql),
            self.addr
        );
        let (status, body) = http(&self.addr, &req);
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let key = r["metric"][label].as_str().unwrap_or("").to_string();
                let val = r["value"][1].as_str().unwrap().parse().unwrap();
                (key, val)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create `n` disks on `host`, seal the first `sealed` of them by hand.
fn disks(host: &Host, prefix: &str, n: usize, sealed: usize) {
    for i in 0..n {
        host.run(&["disk", "create", &format!("{prefix}{i}"), "--size", "1M"]);
    }
    for i in 0..sealed {
        host.run(&["disk", "seal", &format!("{prefix}{i}")]);
    }
}

fn wait_settled(host: &Host, want_sealed: u64) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let by = host.states();
        if by.get("sealed").copied().unwrap_or(0) == want_sealed {
            return by;
        }
        assert!(Instant::now() < deadline, "disks never settled: {by:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn prometheus_scrapes_two_daemons_and_agrees_with_their_status() {
    let promtool = tool("promtool");
    tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let a = Host::start(dir.path(), "a");
    let b = Host::start(dir.path(), "b");
    disks(&a, "a", 3, 2);
    disks(&b, "b", 2, 1);
    let said: BTreeMap<String, BTreeMap<String, u64>> = [
        (a.daemon.addr().to_string(), wait_settled(&a, 2)),
        (b.daemon.addr().to_string(), wait_settled(&b, 1)),
    ]
    .into();

    // The exposition passes promtool's format and naming checks.
    for host in [&a, &b] {
        let text = host.metrics();
        let mut p = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
    }

    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, host) in [("pdguard-a", &a), ("pdguard-b", &b)] {
        config += &format!(
            "  - job_name: {job}\n    authorization:\n      type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: ['{}']\n",
            s(&host.daemon.token_file()),
            host.daemon.addr()
        );
    }
    let prom = Prometheus::start(dir.path(), &config);

    // Bounded: a few scrape intervals, then a failure showing what Prometheus has.
    let query = r#"sum by (instance) (pdguard_disks{state="sealed"})"#;
    let want: BTreeMap<String, f64> = said
        .iter()
        .map(|(inst, by)| (inst.clone(), by.get("sealed").copied().unwrap_or(0) as f64))
        .collect();
    let mut counts: Vec<f64> = want.values().copied().collect();
    counts.sort_by(f64::total_cmp);
    assert_eq!(counts, [1.0, 2.0], "the daemons should differ: {said:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = prom.query(query, "instance");
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        got = prom.query(query, "instance");
    }
    assert_eq!(
        got,
        want,
        "{query}: Prometheus disagrees with `pdguard status`; targets: {}\nlog:\n{}",
        http(
            &prom.addr,
            &format!(
                "GET /api/v1/targets HTTP/1.0\r\nhost: {}\r\n\r\n",
                prom.addr
            )
        )
        .1,
        prom.log_text()
    );
    // Every state of every daemon, as its status says (absent ones at 0), and both up.
    let per_state = prom.query(r#"pdguard_disks"#, "state");
    assert_eq!(per_state.len(), 8, "one series per state: {per_state:?}");
    for (inst, by) in &said {
        for state in [
            "available",
            "attached",
            "grace",
            "sealing",
            "sealed",
            "unsealing",
            "migrating",
            "failed",
        ] {
            let q = format!(r#"pdguard_disks{{instance="{inst}",state="{state}"}}"#);
            let v = prom.query(&q, "state");
            let n = by.get(state).copied().unwrap_or(0) as f64;
            assert_eq!(v.get(state), Some(&n), "{q}: {v:?}, status says {by:?}");
        }
    }
    let up = prom.query(r#"up"#, "instance");
    assert_eq!(
        up.values().copied().collect::<Vec<_>>(),
        [1.0, 1.0],
        "{up:?}"
    );
    let seals = prom.query(
        r#"sum by (instance) (pdguard_jobs_finished_total{kind="seal"})"#,
        "instance",
    );
    assert_eq!(seals, want, "seal jobs finished per daemon");
}

#[test]
fn shipped_alerting_rules_pass_promtool() {
    let promtool = tool("promtool");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/prometheus");
    let o = Command::new(&promtool)
        .args(["check", "rules", s(&root.join("alerts.yml"))])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    // The rules' unit tests: each alert fires on the series it is written for, and only then.
    let o = Command::new(&promtool)
        .current_dir(&root)
        .args(["test", "rules", "alerts_test.yml"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}
