//! The one way the end-to-end tests run `pdguard serve`.
//!
//! [`Serve`] says how (state directory, profile, flags, environment, the API on the state
//! directory's unix socket or on loopback TCP with a token, the uid to run as);
//! [`Serve::start`] returns a [`Daemon`] once `pdguard status` answers on that API, within a
//! bound; [`Serve::refused`] runs a start that must fail. The daemon's stderr always goes to a
//! log file of its own ([`Daemon::log`]), kept across restarts. Dropping a [`Daemon`] kills
//! and reaps its process.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, client, code, s, stderr};

/// How long a daemon may take to answer `pdguard status`, unless [`Serve::ready_within`].
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a start that must be refused may run, and a SIGTERM may take.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Variables of the tests' own environment that would steer the daemon: removed, so that a
/// test states what it means.
const CLEARED: &[&str] = &[
    "PDGUARD_KEY_FILE",
    "PDGUARD_API_TOKEN_FILE",
    "PDGUARD_STATE_DIR",
    "PDGUARD_LOG",
    "PDGUARD_TEST_PAUSE_AT",
    "PDGUARD_TEST_PAUSE_FILE",
];

/// How to run `pdguard serve`.
#[derive(Clone, Debug)]
pub struct Serve {
    /// The state directory the clients name.
    state: PathBuf,
    /// The `--state-dir` the daemon is given, when it names `state` another way.
    given: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    tcp: bool,
    token: Option<PathBuf>,
    uid: Option<u32>,
    ready_within: Duration,
    /// A program and its arguments that run the daemon (e.g. `nsenter --mount=… --`).
    via: Vec<OsString>,
}

impl Serve {
    /// `pdguard serve --state-dir STATE`, its API on STATE's unix socket.
    pub fn new(state: &Path) -> Self {
        Self {
            state: state.to_path_buf(),
            given: None,
            args: Vec::new(),
            env: Vec::new(),
            tcp: false,
            token: None,
            uid: None,
            ready_within: READY_WITHIN,
            via: Vec::new(),
        }
    }

    /// `--profile PROFILE`.
    pub fn profile(self, profile: &str) -> Self {
        self.args(&["--profile", profile])
    }

    /// More flags, after the others.
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// An environment variable for the daemon.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((key.into(), value.as_ref().to_os_string()));
        self
    }

    /// The admin API on `tcp:127.0.0.1:0` (the daemon prints the port it got); clients
    /// give the token file.
    pub fn api_tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// `--api-token-file FILE` (without it a TCP daemon uses STATE/api-token).
    pub fn api_token_file(mut self, file: &Path) -> Self {
        self.token = Some(file.to_path_buf());
        self
    }

    /// Give the daemon `--state-dir GIVEN`, which names the same directory another way (a
    /// symbolic link, a `..`); the clients still name the state directory itself.
    pub fn state_dir_as(mut self, given: &Path) -> Self {
        self.given = Some(given.to_path_buf());
        self
    }

    /// Run the daemon as this uid (and gid).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Run the daemon through `program ARGS… pdguard serve …`, e.g. `nsenter` into the mount
    /// namespace of a test's own dockerd (tests/nodes).
    pub fn via<S: AsRef<std::ffi::OsStr>>(mut self, program: &str, args: &[S]) -> Self {
        self.via = std::iter::once(OsString::from(program))
            .chain(args.iter().map(|a| a.as_ref().to_os_string()))
            .collect();
        self
    }

    /// Fail unless `pdguard status` answers within `within` (30 s unless said).
    pub fn ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    fn token_file(&self) -> PathBuf {
        self.token
            .clone()
            .unwrap_or_else(|| self.state.join("api-token"))
    }

    fn command(&self) -> Command {
        let mut c = match self.via.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        c.arg("serve")
            .arg("--state-dir")
            .arg(self.given.as_deref().unwrap_or(&self.state));
        if self.tcp {
            c.args(["--api", "tcp:127.0.0.1:0"]);
        }
        if let Some(t) = &self.token {
            c.arg("--api-token-file").arg(t);
        }
        c.args(&self.args).stdin(Stdio::null());
        for k in CLEARED {
            c.env_remove(k);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(uid) = self.uid {
            c.uid(uid).gid(uid);
        }
        c
    }

    /// Start the daemon and wait until `pdguard status` answers on its API.
    pub fn start(self) -> Daemon {
        let log = tempfile::Builder::new()
            .prefix("pdguard-serve-")
            .suffix(".log")
            .tempfile()
            .unwrap()
            .into_temp_path();
        let mut d = Daemon {
            serve: self,
            child: None,
            api: String::new(),
            log,
        };
        d.restart();
        d
    }

    /// Run a start that must be refused: its output, once it exited (within a bound; a
    /// daemon that starts instead is killed and the test fails).
    pub fn refused(self) -> Output {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > EXIT_WITHIN {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon started although it should have refused");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait_with_output().unwrap()
    }
}

/// A `pdguard serve` started by [`Serve::start`]; killed and reaped when dropped.
pub struct Daemon {
    serve: Serve,
    child: Option<Child>,
    /// `unix:PATH` or `tcp:127.0.0.1:PORT`, as the daemon printed it.
    api: String,
    log: tempfile::TempPath,
}

impl Daemon {
    /// `pdguard serve --state-dir STATE EXTRA…`, started.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        Serve::new(state).args(extra).start()
    }

    /// Start it again (after [`Self::terminate`] or [`Self::kill9`]), as before.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "the daemon is still running");
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len()) as usize;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .serve
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.api.clear();
        self.wait_ready(from);
    }

    /// Start it again another way.
    pub fn restart_as(&mut self, serve: Serve) {
        self.serve = serve;
        self.restart();
    }

    /// The one readiness check: the daemon printed where it serves, and `pdguard status`
    /// answers there, within the bound; a daemon that exits first fails the test at once.
    fn wait_ready(&mut self, from: usize) {
        let t0 = Instant::now();
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                panic!(
                    "the daemon exited ({st}) before it answered: {}",
                    self.log()
                );
            }
            if self.api.is_empty() {
                let log = std::fs::read(&self.log).unwrap_or_default();
                let text = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
                if let Some(api) = text
                    .lines()
                    .find_map(|l| l.split("serving the admin API on ").nth(1))
                {
                    self.api = api.split(' ').next().unwrap().to_string();
                }
            }
            if !self.api.is_empty() && code(&self.cli(&["status"])) == 0 {
                return;
            }
            assert!(
                t0.elapsed() < self.serve.ready_within,
                "the daemon did not answer `pdguard status` within {:?}: {}",
                self.serve.ready_within,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn state(&self) -> &Path {
        &self.serve.state
    }

    /// `unix:PATH` or `tcp:127.0.0.1:PORT`, as the daemon printed it.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// `127.0.0.1:PORT` of a TCP daemon.
    pub fn addr(&self) -> &str {
        self.api.strip_prefix("tcp:").unwrap()
    }

    /// The token file clients of a TCP daemon give.
    pub fn token_file(&self) -> PathBuf {
        self.serve.token_file()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the daemon wrote to stderr, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client command against this daemon (its state directory, or for a TCP daemon its
    /// address and token file), in a controlled environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = args.to_vec();
        let token = self.token_file();
        if self.serve.tcp {
            a.extend_from_slice(&["--api", &self.api, "--api-token-file", s(&token)]);
        } else {
            a.extend_from_slice(&["--state-dir", s(&self.serve.state)]);
        }
        client(&a, &[])
    }

    /// A client command that must succeed; its standard output.
    pub fn ok_text(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A client command with `--json` that must succeed; its JSON answer.
    pub fn ok(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.cli(&a);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// `disk show NAME`.
    pub fn disk(&self, name: &str) -> Value {
        self.ok(&["disk", "show", name])
    }

    /// Wait until disk `name` is in `state` (or fail after `secs`, with the log).
    pub fn wait_state(&self, name: &str, state: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.disk(name);
            if d["state"] == state {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {state}: {d}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and its exit code once it is gone (bounded).
    pub fn terminate(&mut self) -> i32 {
        let mut child = self.child.take().expect("the daemon is not running");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > EXIT_WITHIN {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not stop within {EXIT_WITHIN:?} of SIGTERM: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the daemon is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
