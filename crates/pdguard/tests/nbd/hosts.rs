//! The NBD export on real hosts: TLS over TCP with X.509 and PSK (qemu-img, qemu-io,
//! nbdinfo, nbdcopy as clients), a socket group for an unprivileged qemu, what another
//! local user can reach (nothing), bounded memory and connections, and requests of any
//! length from a client that negotiated no block size.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// A user and group that exist nowhere else on the host, for the socket-group tests.
const MEMBER_UID: &str = "40123";
const OUTSIDER_UID: &str = "40124";
const GROUP: &str = "40125";

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new(need("openssl", "openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
}

/// A CA, then a certificate it signs, for `role` (server or client), in qemu's layout.
fn signed(dir: &Path, ca: &Path, out: &Path, role: &str) {
    let ext = dir.join(format!("ext-{role}"));
    let mut e = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={role}Auth\n"
    );
    if role == "server" {
        e.push_str("subjectAltName=DNS:localhost,IP:127.0.0.1\n");
    }
    std::fs::write(&ext, e).unwrap();
    std::fs::create_dir_all(out).unwrap();
    let key = out.join(format!("{role}-key.pem"));
    let csr = dir.join(format!("{role}.csr"));
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            &format!("/CN={role}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&ca.join("ca-cert.pem")),
            "-CAkey",
            s(&ca.join("ca-key.pem")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            s(&ext),
            "-out",
            s(&out.join(format!("{role}-cert.pem"))),
        ],
    );
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    chmod(&key, 0o600);
}

fn ca(dir: &Path, name: &str) -> PathBuf {
    let ca = dir.join(name);
    std::fs::create_dir_all(&ca).unwrap();
    openssl(
        &ca,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    ca
}

/// Server credentials, a client's signed by the same CA, and a client's of another CA.
struct Certs {
    server: PathBuf,
    client: PathBuf,
    stranger: PathBuf,
}

fn certs(dir: &Path) -> Certs {
    let ours = ca(dir, "ca");
    let theirs = ca(dir, "other-ca");
    let c = Certs {
        server: dir.join("server"),
        client: dir.join("client"),
        stranger: dir.join("stranger"),
    };
    signed(dir, &ours, &c.server, "server");
    signed(dir, &ours, &c.client, "client");
    signed(dir, &theirs, &c.stranger, "client");
    c
}

/// `keys.psk` with one key for `user`, in a directory of its own (qemu's layout).
fn psk(dir: &Path, name: &str, user: &str, seed: u64) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("keys.psk");
    std::fs::write(&p, format!("{user}:{}\n", hex(&random_bytes(32, seed)))).unwrap();
    chmod(&p, 0o600);
    p
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fails(program: &str, args: &[&str]) -> String {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(
        !o.status.success(),
        "{program} {args:?} succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr(&o)
}

fn qemu_opts(addr: &str, export: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0")
}

/// qemu-img info, qemu-io write and read -P, nbdinfo and nbdcopy with `creds` (qemu's
/// --object) and `query` (the nbds:// URI's TLS part).
fn tls_clients(d: &Nbd, dir: &Path, addr: &str, object: &str, uri_user: &str, query: &str) {
    let (qemu_img, qemu_io) = (
        need("qemu-img", "qemu-utils"),
        need("qemu-io", "qemu-utils"),
    );
    let (nbdinfo, nbdcopy) = (need("nbdinfo", "libnbd-bin"), need("nbdcopy", "libnbd-bin"));
    let opts = qemu_opts(addr, "t");
    let o = run(
        qemu_img,
        &[
            "info",
            "--output=json",
            "--object",
            object,
            "--image-opts",
            &opts,
        ],
    );
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20, "{info}");
    run(
        qemu_io,
        &[
            "--object",
            object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0xab 0 1M",
        ],
    );
    let o = run(
        qemu_io,
        &[
            "--object",
            object,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0xab 0 1M",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("read 1048576/1048576") && !out.contains("failed"),
        "{out}"
    );
    let uri = format!("nbds://{uri_user}{addr}/t?{query}");
    let o = run(nbdinfo, &["--json", &uri]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["TLS"], true, "{v}");
    assert_eq!(v["exports"][0]["export-size"], 8 << 20, "{v}");
    let src = dir.join("src.img");
    let data = random_bytes(8 << 20, 77);
    std::fs::write(&src, &data).unwrap();
    run(nbdcopy, &[s(&src), &uri]);
    let back = dir.join("back.img");
    run(nbdcopy, &[&uri, s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy over TLS differs"
    );
    assert!(std::fs::read(d.disk("t")["path"].as_str().unwrap()).unwrap() == data);
}

#[test]
fn x509_with_qemu_and_libnbd_and_untrusted_certificates_fail() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let state = dir.path().join("st");
    let d = Nbd::start(
        &state,
        &[
            "--profile",
            "patent",
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-certs",
            s(&c.server),
        ],
    );
    d.create("t", "8M");
    let addr = tcp_addr(&d);
    let obj = |dir: &Path| {
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        )
    };
    tls_clients(
        &d,
        dir.path(),
        &addr,
        &obj(&c.client),
        "",
        &format!("tls-certificates={}", c.client.display()),
    );
    // A client whose CA did not sign the server's certificate refuses the server, and the
    // server refuses a client certificate its CA did not sign, or none.
    let opts = qemu_opts(&addr, "t");
    let qemu_img = need("qemu-img", "qemu-utils");
    let e = fails(
        qemu_img,
        &["info", "--object", &obj(&c.stranger), "--image-opts", &opts],
    );
    assert!(e.contains("TLS") || e.contains("certificate"), "{e}");
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    let uri = |d: &Path| format!("nbds://{addr}/t?tls-certificates={}", d.display());
    fails(nbdinfo, &[&uri(&c.stranger)]);
    let ca_only = dir.path().join("ca-only");
    std::fs::create_dir_all(&ca_only).unwrap();
    std::fs::copy(c.client.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    fails(nbdinfo, &[&uri(&ca_only)]);
    let log = d.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert_eq!(d.disk("t")["containers"], serde_json::json!([]));
}

#[test]
fn psk_with_qemu_and_libnbd_and_a_wrong_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    let keys = psk(dir.path(), "psk", "alice", 1);
    let wrong = psk(dir.path(), "wrong", "alice", 2);
    let state = dir.path().join("st");
    let d = Nbd::start(
        &state,
        &[
            "--profile",
            "patent",
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-psk",
            s(&keys),
        ],
    );
    d.create("t", "8M");
    let addr = tcp_addr(&d);
    let obj = |p: &Path, user: &str| {
        format!(
            "tls-creds-psk,id=tls0,endpoint=client,username={user},dir={}",
            p.parent().unwrap().display()
        )
    };
    tls_clients(
        &d,
        dir.path(),
        &addr,
        &obj(&keys, "alice"),
        "alice@",
        &format!("tls-psk-file={}", keys.display()),
    );
    let qemu_img = need("qemu-img", "qemu-utils");
    let opts = qemu_opts(&addr, "t");
    let e = fails(
        qemu_img,
        &[
            "info",
            "--object",
            &obj(&wrong, "alice"),
            "--image-opts",
            &opts,
        ],
    );
    assert!(e.contains("TLS"), "{e}");
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    fails(
        nbdinfo,
        &[&format!(
            "nbds://alice@{addr}/t?tls-psk-file={}",
            wrong.display()
        )],
    );
    // A user the file does not know, with alice's key.
    let bob = dir.path().join("bob.psk");
    let text = std::fs::read_to_string(&keys)
        .unwrap()
        .replace("alice", "bob");
    std::fs::write(&bob, text).unwrap();
    fails(
        nbdinfo,
        &[&format!(
            "nbds://bob@{addr}/t?tls-psk-file={}",
            bob.display()
        )],
    );
    assert_eq!(d.disk("t")["containers"], serde_json::json!([]));
    // TLS offered but not required leaves TCP in clear text: it needs --nbd-insecure-tcp.
    let o = Serve::new(&dir.path().join("st2"))
        .args(&[
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-psk",
            s(&keys),
            "--nbd-tls",
            "on",
        ])
        .refused();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--nbd-insecure-tcp"), "{}", stderr(&o));
    // A PSK file every user can read is refused at start.
    chmod(&keys, 0o644);
    let o = Serve::new(&dir.path().join("st2"))
        .args(&["--nbd", "tcp:127.0.0.1:0", "--nbd-tls-psk", s(&keys)])
        .refused();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod o-rwx"), "{}", stderr(&o));
}

/// (option, reply type) of every reply to `code`.
fn tcp_option(s: &mut TcpStream, code: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut b = IHAVEOPT.to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).unwrap();
        out.push((rtype, d));
        if !(2..=4).contains(&rtype) {
            return out;
        }
    }
}

fn tcp_greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

const ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// A clear-text client of a TLS-required listener: every option is NBD_REP_ERR_TLS_REQD,
/// EXPORT_NAME closes without a byte, and the disk is neither listed, attached nor read.
#[test]
fn plain_client_on_a_tls_listener_lists_and_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = psk(dir.path(), "psk", "alice", 3);
    let state = dir.path().join("st");
    let d = Nbd::start(
        &state,
        &[
            "--profile",
            "patent",
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-psk",
            s(&keys),
        ],
    );
    d.create("secret", "1M");
    let addr = tcp_addr(&d);
    let mut c = tcp_greet(&addr);
    for (code, data) in [
        (3u32, vec![]),
        (6, info_data("secret", &[1])),
        (7, info_data("secret", &[])),
        (8, vec![]),
        (
            9,
            vec![0, 0, 0, 6, b's', b'e', b'c', b'r', b'e', b't', 0, 0, 0, 0],
        ),
        (42, vec![]),
    ] {
        let r = tcp_option(&mut c, code, &data);
        assert_eq!(r.len(), 1, "option {code}: {r:?}");
        assert_eq!(r[0].0, ERR_TLS_REQD, "option {code}");
        assert!(!String::from_utf8_lossy(&r[0].1).contains("secret"));
    }
    // Bytes after STARTTLS's ack that are not a TLS handshake end the connection.
    let r = tcp_option(&mut c, 5, &[]);
    assert_eq!(r[0].0, 1, "STARTTLS is acked");
    c.write_all(&[0u8; 64]).unwrap();
    let mut b = [0u8; 64];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    let mut c = tcp_greet(&addr);
    let mut b = IHAVEOPT.to_vec();
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&6u32.to_be_bytes());
    b.extend_from_slice(b"secret");
    c.write_all(&b).unwrap();
    let mut r = Vec::new();
    let _ = c.read_to_end(&mut r);
    assert!(r.is_empty(), "EXPORT_NAME before TLS got {} bytes", r.len());
    // libnbd in clear text.
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    fails(nbdinfo, &["--list", &format!("nbd://{addr}/")]);
    fails(nbdinfo, &[&format!("nbd://{addr}/secret")]);
    let v = d.disk("secret");
    assert_eq!(v["containers"], serde_json::json!([]), "{v}");
    assert_eq!(v["state"], "available", "{v}");
}

/// A python one-liner as another user: what `connect_unix` and a read give.
fn as_user(uid: &str, gid: &str, groups: Option<&str>, sock: &Path) -> String {
    need("setpriv", "util-linux");
    let py = python();
    let code = "import nbd,sys\nh=nbd.NBD()\nh.set_export_name('vm')\ntry:\n h.connect_unix(sys.argv[1])\nexcept nbd.Error as e:\n print('refused', e.errno); sys.exit(0)\nprint('read', h.pread(4096, 0)[:4].hex())";
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", uid, "--regid", gid]);
    match groups {
        Some(g) => cmd.args(["--groups", g]),
        None => cmd.arg("--clear-groups"),
    };
    let o = cmd.args([py, "-c", code, s(sock)]).output().unwrap();
    assert!(o.status.success(), "as uid {uid}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `--nbd-socket-group`: the socket is 0660 in that group; a user whose primary or
/// supplementary group it is connects and reads, anyone else gets EACCES.
#[test]
fn socket_group_lets_its_members_in_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o711);
    let public = dir.path().join("run");
    std::fs::create_dir_all(&public).unwrap();
    chmod(&public, 0o755);
    let sock = public.join("nbd.sock");
    let d = Nbd::start(
        &dir.path().join("st"),
        &[
            "--profile",
            "patent",
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--nbd-socket-group",
            GROUP,
        ],
    );
    let disk = d.create("vm", "1M");
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all(b"\x5a\x5a\x5a\x5a").unwrap();
    drop(f);
    let m = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.mode() & 0o777, 0o660);
    assert_eq!(m.gid().to_string(), GROUP);
    // The unix socket of the state directory gets the same group.
    assert_eq!(as_user(MEMBER_UID, GROUP, None, &sock), "read 5a5a5a5a");
    assert_eq!(
        as_user(MEMBER_UID, MEMBER_UID, Some(GROUP), &sock),
        "read 5a5a5a5a"
    );
    let refused = as_user(OUTSIDER_UID, OUTSIDER_UID, None, &sock);
    assert_eq!(refused, "refused EACCES");
    // A name that is no group is a usage error.
    let o = Serve::new(&dir.path().join("st2"))
        .args(&[
            "--nbd",
            "unix:/tmp/x.sock",
            "--nbd-socket-group",
            "no-such-group-here",
        ])
        .refused();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("no-such-group-here"), "{}", stderr(&o));
}

/// The security claim: as a local user other than the daemon's owner (uid 65534, in no
/// group of the daemon), no request over any listener of the documented configurations —
/// the default unix socket, a socket group, TCP with PSK, TCP with X.509 — names a disk,
/// reads a byte, changes one, or reclaims (unseals) a sealed disk.
#[test]
fn another_local_user_reaches_no_disk_over_any_listener() {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o711);
    let public = dir.path().join("run");
    std::fs::create_dir_all(&public).unwrap();
    chmod(&public, 0o755);
    let keys = psk(dir.path(), "psk", "alice", 4);
    let c = certs(dir.path());
    let (sa, sb) = (dir.path().join("sa"), dir.path().join("sb"));
    let group_sock = public.join("group.sock");
    let a = Nbd::start(
        &sa,
        &[
            "--nbd",
            &format!("unix:{}", group_sock.display()),
            "--nbd-socket-group",
            GROUP,
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-psk",
            s(&keys),
            "--grace",
            "1h",
        ],
    );
    let default_sock = public.join("default.sock");
    let b = Nbd::start(
        &sb,
        &[
            "--nbd",
            &format!("unix:{}", default_sock.display()),
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-tls-certs",
            s(&c.server),
            "--grace",
            "1h",
        ],
    );
    let mut hashes = Vec::new();
    for d in [&a, &b] {
        let p = d.create("secret", "1M");
        let mut img = vec![0u8; 1 << 20];
        img[..32].copy_from_slice(b"TOP-SECRET-PASSWORD=hunter2.....");
        std::fs::write(&p, &img).unwrap();
        d.ok(&["disk", "seal", "secret"]);
        d.wait_state("secret", "sealed", 30);
        hashes.push(digest(&p));
    }
    let script_dir = dir.path().join("bin");
    std::fs::create_dir_all(&script_dir).unwrap();
    chmod(&script_dir, 0o755);
    let script_copy = script_dir.join("outsider.py");
    std::fs::copy(script("outsider.py"), &script_copy).unwrap();
    chmod(&script_copy, 0o644);
    let (ta, tb) = (tcp_addr(&a), tcp_addr(&b));
    need("setpriv", "util-linux");
    let o = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .args([s(&script_copy), s(&group_sock), s(&default_sock)])
        .args([s(&sa.join("nbd.sock")), s(&sb.join("nbd.sock"))])
        .args(["--tcp", &ta, &tb, "--export", "secret"])
        .output()
        .unwrap();
    assert!(o.status.success(), "outsider.py: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for (p, r) in v["unix"].as_object().unwrap() {
        assert_eq!(r, "EACCES", "{p}: {v}");
    }
    for (addr, r) in v["tcp"].as_object().unwrap() {
        for opt in ["list", "info", "go", "structured", "list_meta", "unknown"] {
            let replies = r[opt].as_array().unwrap();
            assert_eq!(replies.len(), 1, "{addr} {opt}: {r}");
            assert_eq!(replies[0][0], ERR_TLS_REQD, "{addr} {opt}: {r}");
            assert!(!replies[0][1].as_str().unwrap().contains("secret"), "{r}");
        }
        assert_eq!(r["after_request"], false, "{r}");
        assert_eq!(r["export_name_bytes"], 0, "{r}");
        assert_eq!(r["starttls"][0][0], 1, "{r}");
    }
    // TLS itself: the outsider cannot read the PSK file or the keys, and guessing fails.
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    let guess = psk(&public, "guess", "alice", 99);
    chmod(&guess, 0o644);
    chmod(guess.parent().unwrap(), 0o755);
    let nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        !nobody(&["cat", s(&keys)]).status.success(),
        "the PSK file is readable"
    );
    let o = nobody(&[
        nbdinfo,
        &format!("nbds://alice@{ta}/secret?tls-psk-file={}", guess.display()),
    ]);
    assert!(!o.status.success(), "a guessed PSK was accepted");
    // The stranger's credentials are the outsider's own: readable by it.
    chmod(&c.stranger.join("client-key.pem"), 0o644);
    let o = nobody(&[
        nbdinfo,
        &format!(
            "nbds://{tb}/secret?tls-certificates={}",
            c.stranger.display()
        ),
    ]);
    assert!(!o.status.success(), "a stranger's certificate was accepted");
    // Both attempts got as far as the TLS handshake, which the daemons refused.
    for (st, d) in [(&sa, &a), (&sb, &b)] {
        let log = d.log();
        assert!(
            log.contains("TLS handshake failed"),
            "{}: {log}",
            st.display()
        );
    }
    for (d, h) in [(&a, &hashes[0]), (&b, &hashes[1])] {
        let v = d.disk("secret");
        assert_eq!(v["state"], "sealed", "reclaimed by an outsider: {v}");
        assert_eq!(v["containers"], serde_json::json!([]), "{v}");
        assert_eq!(&digest(Path::new(v["path"].as_str().unwrap())), h);
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Four connections, each with 48 READs of 32 MiB in flight: the daemon's peak RSS stays
/// within 400 MiB of its idle size (a connection's buffers are its budget, freed after
/// each reply).
#[test]
fn memory_stays_bounded_with_32_mib_reads_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    d.create("m", "64M");
    let pid = d.pid();
    let idle = status_kib(pid, "VmRSS:");
    let sock = d.sock.clone();
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&sock);
                c.go("m");
                for i in 0..48u64 {
                    c.request(0, 0, i, (i % 2) * (32 << 20), 32 << 20, &[]);
                }
                let mut buf = vec![0u8; 32 << 20];
                for _ in 0..48 {
                    let (e, _) = c.simple_reply();
                    assert_eq!(e, 0, "client {k}");
                    c.0.read_exact(&mut buf).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let peak = status_kib(pid, "VmHWM:");
    eprintln!("daemon RSS: idle {idle} KiB, peak {peak} KiB");
    assert!(
        peak < idle + 400 * 1024,
        "peak RSS {peak} KiB is more than 400 MiB over idle {idle} KiB"
    );
}

/// 500 connections that connect and hold: at most --nbd-max-connections are served (get
/// the greeting), the rest are closed at once with a log line, `status` still answers,
/// and once they go, a new connection is served.
#[test]
fn connection_limit_holds_against_500_connect_and_hold() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("st");
    let d = Nbd::start(
        &state,
        &["--profile", "patent", "--nbd-max-connections", "8"],
    );
    let mut held = Vec::new();
    for _ in 0..500 {
        let s = UnixStream::connect(&d.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        held.push(s);
    }
    assert_eq!(code(&d.cli(&["status"])), 0, "status does not answer");
    let mut served = 0;
    for s in &mut held {
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 8, "{served} of 500 connections were served");
    let log = d.log();
    assert!(
        log.matches("limit of connections is reached").count() >= 492,
        "no log line for each refused connection"
    );
    assert_eq!(code(&d.cli(&["status"])), 0);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(&d.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection is served after the others left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A deterministic byte of a large test pattern at `off`.
fn pat(off: u64, salt: u8) -> u8 {
    ((off.wrapping_mul(2_654_435_761) >> 13) as u8) ^ salt
}

fn pattern_at(off: u64, n: usize, salt: u8) -> Vec<u8> {
    (0..n as u64).map(|i| pat(off + i, salt)).collect()
}

/// A client that negotiated nothing (`NBD_OPT_EXPORT_NAME`: no block sizes) sends WRITEs
/// and READs of 40 MiB and 256 MiB: each is served, streamed in bounded memory, and the
/// connection goes on.
#[test]
fn large_requests_from_a_client_that_negotiated_no_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    let disk = d.create("big", "320M");
    let pid = d.pid();
    let idle = status_kib(pid, "VmRSS:");
    let mut c = Raw::connect(&d.sock);
    c.option(1, b"big");
    let mut r = [0u8; 10];
    c.0.read_exact(&mut r).unwrap();
    const CHUNK: usize = 4 << 20;
    for (cookie, off, len, salt) in [
        (1u64, 4096u64, 40usize << 20, 1u8),
        (2, 48 << 20, 256 << 20, 2),
    ] {
        c.request(0, 1, cookie, off, len as u32, &[]);
        let mut at = 0;
        while at < len {
            let n = CHUNK.min(len - at);
            c.0.write_all(&pattern_at(off + at as u64, n, salt))
                .unwrap();
            at += n;
        }
        assert_eq!(c.simple_reply(), (0, cookie), "WRITE of {len} bytes");
        c.request(0, 0, cookie + 10, off, len as u32, &[]);
        assert_eq!(c.simple_reply(), (0, cookie + 10), "READ of {len} bytes");
        let mut buf = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = CHUNK.min(len - at);
            c.0.read_exact(&mut buf[..n]).unwrap();
            assert!(
                buf[..n] == pattern_at(off + at as u64, n, salt)[..],
                "READ of {len} bytes differs at {at}"
            );
            at += n;
        }
    }
    // The connection lives on; then the file holds the data.
    c.request(0, 0, 99, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 99));
    let mut b = vec![0u8; 4096];
    c.0.read_exact(&mut b).unwrap();
    let peak = status_kib(pid, "VmHWM:");
    eprintln!("daemon RSS: idle {idle} KiB, peak {peak} KiB");
    assert!(
        peak < idle + 64 * 1024,
        "a streamed request took {} KiB",
        peak - idle
    );
    let f = std::fs::read(&disk).unwrap();
    let off = (48 << 20) + (200 << 20);
    assert!(f[off..off + 4096] == pattern_at(off as u64, 4096, 2)[..]);
}
