//! A connection driven in process over `UnixStream::pair()`: handshake, requests larger
//! than the advertised maximum, and TLS required before any export is named.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use pdguard_core::Profile;
use pdguard_engine::gate::SealedIo;
use pdguard_engine::service::Config;

use super::super::wire::{self, opt, rep, Command, InfoRequest, Request};
use super::*;

const SIZE: u64 = 48 << 20;

async fn service(dir: &Path) -> Service {
    let svc = Service::start(Config {
        state_dir: dir.join("state"),
        grace: Duration::from_secs(3600),
        profile: Profile::Patent,
        master_key: None,
        sealed_io: SealedIo::ReadOnly,
        jobs: 1,
        sector_size: 512,
        strategy: pdguard_engine::jobs::SealOptions::default().strategy,
        seal_stopped: false,
        observer: None,
        docker_mount_timeout: pdguard_engine::service::DOCKER_MOUNT_TIMEOUT,
        reclaim: Default::default(),
    })
    .await
    .unwrap();
    svc.create_disk("d", SIZE, None).await.unwrap();
    svc
}

/// Serve one connection in process; the client's end of the pair.
fn connect(svc: &Service, cfg: ConnConfig) -> (UnixStream, watch::Sender<bool>) {
    let (client, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let server = tokio::net::UnixStream::from_std(server).unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let svc = svc.clone();
    tokio::spawn(handle(
        Sock::Unix(server),
        "nbd:test#1".into(),
        svc,
        Arc::new(cfg),
        stop,
    ));
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (client, stop_tx)
}

fn greet<S: Read + Write>(s: &mut S) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, wire::greeting());
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// One option reply: (type, data).
fn option<S: Read + Write>(s: &mut S, code: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    s.write_all(&wire::encode_option(code, data)).unwrap();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).unwrap();
        out.push((rtype, d));
        if rtype != rep::SERVER && rtype != rep::INFO && rtype != rep::META_CONTEXT {
            return out;
        }
    }
}

fn go<S: Read + Write>(s: &mut S) {
    let data = wire::encode_info_request(&InfoRequest {
        name: "d".into(),
        infos: vec![],
    });
    let r = option(s, opt::GO, &data);
    assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
}

fn request<S: Write>(s: &mut S, cmd: Command, cookie: u64, offset: u64, len: u32) {
    let r = Request {
        flags: 0,
        cmd,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
}

fn simple_reply<S: Read>(s: &mut S) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// A client that negotiated no block size sends a 40 MiB WRITE and READ (more than the
/// advertised 32 MiB): both are served, streamed, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_maximum_payload_are_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (mut c, _stop) = connect(&svc, ConnConfig::new(Duration::from_secs(5)));
    let data = pattern(40 << 20);
    let got = tokio::task::spawn_blocking(move || {
        greet(&mut c);
        let list = option(&mut c, opt::LIST, &[]);
        assert_eq!(list.len(), 2, "one export and the ack: {list:?}");
        go(&mut c);
        request(&mut c, Command::Write, 1, 4096, data.len() as u32);
        c.write_all(&data).unwrap();
        assert_eq!(simple_reply(&mut c), (0, 1));
        request(&mut c, Command::Read, 2, 4096, data.len() as u32);
        assert_eq!(simple_reply(&mut c), (0, 2));
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).unwrap();
        // Past the end: refused, and the payload is skipped.
        request(&mut c, Command::Write, 3, SIZE - 4096, 8192);
        c.write_all(&[1u8; 8192]).unwrap();
        assert_eq!(simple_reply(&mut c), (wire::errno::ENOSPC, 3));
        request(&mut c, Command::Disc, 4, 0, 0);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        back == data
    })
    .await
    .unwrap();
    assert!(got, "the 40 MiB read differs from the 40 MiB write");
    let disk = std::fs::read(dir.path().join("state/disks/d.img")).unwrap();
    assert!(disk[4096..4096 + (40 << 20)] == pattern(40 << 20)[..]);
}

/// With TLS required, a client that skips STARTTLS is told `NBD_REP_ERR_TLS_REQD` for
/// every option and learns no export's name; after STARTTLS and a PSK handshake it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_before_any_export_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (mut c, _stop) = connect(&svc, psk_config(dir.path()));
    tokio::task::spawn_blocking(move || {
        greet(&mut c);
        let info = wire::encode_info_request(&InfoRequest {
            name: "d".into(),
            infos: vec![],
        });
        for (code, data) in [(opt::LIST, &[][..]), (opt::INFO, &info), (opt::GO, &info)] {
            let r = option(&mut c, code, data);
            assert_eq!(r.len(), 1, "{r:?}");
            assert_eq!(r[0].0, rep::ERR_TLS_REQD, "option {code}");
            assert!(!String::from_utf8_lossy(&r[0].1).contains("\"d\""));
        }
        let mut t = starttls_psk(c);
        let list = option(&mut t, opt::LIST, &[]);
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0].0, rep::SERVER);
        go(&mut t);
        request(&mut t, Command::Read, 9, 0, 4096);
        assert_eq!(simple_reply(&mut t), (0, 9));
        let mut d = vec![1u8; 4096];
        t.read_exact(&mut d).unwrap();
        assert!(d.iter().all(|&b| b == 0));
    })
    .await
    .unwrap();
}

/// A PSK config (user alice, key 00..0f) with TLS required.
fn psk_config(dir: &Path) -> ConnConfig {
    let psk = dir.join("keys.psk");
    std::fs::write(&psk, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = ConnConfig::new(Duration::from_secs(5));
    cfg.tls = Some(Arc::new(
        Tls::psk(&psk, super::super::tls::TlsMode::Require).unwrap(),
    ));
    cfg
}

/// `NBD_OPT_STARTTLS`, then the client's side of a PSK handshake as alice.
fn starttls_psk(mut c: UnixStream) -> openssl::ssl::SslStream<UnixStream> {
    assert_eq!(option(&mut c, opt::STARTTLS, &[])[0].0, rep::ACK);
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).unwrap();
    b.set_psk_client_callback(|_, _hint, id, key| {
        id[..6].copy_from_slice(b"alice\0");
        let k: Vec<u8> = (0..16).collect();
        key[..16].copy_from_slice(&k);
        Ok(16)
    });
    b.set_verify(openssl::ssl::SslVerifyMode::NONE);
    let conn = b.build().configure().unwrap();
    conn.verify_hostname(false)
        .use_server_name_indication(false)
        .connect("pdguard", c)
        .unwrap()
}

/// Transmission through the TLS session, which the connection's reader and its workers
/// share: 64 pipelined WRITEs then 64 pipelined READs (replies in any order, each matched
/// by its cookie), a streamed 40 MiB WRITE and READ, and `NBD_CMD_DISC` ending in the
/// session's `close_notify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_transmission_pipelines_and_streams_through_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (mut c, _stop) = connect(&svc, psk_config(dir.path()));
    const N: u64 = 64;
    const LEN: usize = 64 << 10;
    let block = |k: u64| -> Vec<u8> { (0..LEN).map(|i| (i as u64 * 31 + k * 7) as u8).collect() };
    let big = pattern(40 << 20);
    let big2 = big.clone();
    tokio::task::spawn_blocking(move || {
        greet(&mut c);
        let mut t = starttls_psk(c);
        go(&mut t);
        let mut out = Vec::new();
        for k in 0..N {
            request(
                &mut out,
                Command::Write,
                100 + k,
                k * LEN as u64,
                LEN as u32,
            );
            out.extend_from_slice(&block(k));
        }
        t.write_all(&out).unwrap();
        let mut cookies: Vec<u64> = (0..N)
            .map(|_| simple_reply(&mut t))
            .map(|(e, c)| {
                assert_eq!(e, 0, "WRITE {c}");
                c
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (100..100 + N).collect::<Vec<_>>());
        let mut out = Vec::new();
        for k in 0..N {
            request(&mut out, Command::Read, 200 + k, k * LEN as u64, LEN as u32);
        }
        t.write_all(&out).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..N {
            let (e, cookie) = simple_reply(&mut t);
            assert_eq!(e, 0, "READ {cookie}");
            let mut d = vec![0u8; LEN];
            t.read_exact(&mut d).unwrap();
            assert!(
                d == block(cookie - 200),
                "READ {cookie} returned other bytes"
            );
            assert!(seen.insert(cookie));
        }
        assert_eq!(seen.len() as u64, N);
        request(&mut t, Command::Write, 7, 8 << 20, big2.len() as u32);
        t.write_all(&big2).unwrap();
        assert_eq!(simple_reply(&mut t), (0, 7));
        request(&mut t, Command::Read, 8, 8 << 20, big2.len() as u32);
        assert_eq!(simple_reply(&mut t), (0, 8));
        let mut back = vec![0u8; big2.len()];
        t.read_exact(&mut back).unwrap();
        assert!(
            back == big2,
            "the streamed 40 MiB READ differs from the WRITE"
        );
        request(&mut t, Command::Disc, 9, 0, 0);
        // The server ends the session with close_notify: a clean end of stream.
        let mut rest = Vec::new();
        t.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(
            t.get_shutdown()
                .contains(openssl::ssl::ShutdownState::RECEIVED),
            "no close_notify from the server"
        );
    })
    .await
    .unwrap();
    let disk = std::fs::read(dir.path().join("state/disks/d.img")).unwrap();
    assert!(disk[8 << 20..(8 << 20) + big.len()] == big[..]);
}

/// One structured reply chunk: (flags, type, cookie, payload).
fn chunk<S: Read>(s: &mut S) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; wire::CHUNK_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        d,
    )
}

/// With structured replies, a READ longer than the maximum payload comes as several
/// `OFFSET_DATA` chunks that cover it in order, the last one final; with
/// `NBD_CMD_FLAG_DF` (one chunk) it is refused with `EOVERFLOW` and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_large_reads_come_in_chunks_and_df_is_eoverflow() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let data = pattern(SIZE as usize);
    std::fs::write(dir.path().join("state/disks/d.img"), &data).unwrap();
    let (mut c, _stop) = connect(&svc, ConnConfig::new(Duration::from_secs(5)));
    tokio::task::spawn_blocking(move || {
        greet(&mut c);
        assert_eq!(option(&mut c, opt::STRUCTURED_REPLY, &[])[0].0, rep::ACK);
        go(&mut c);
        let len = (40 << 20) + 512;
        request(&mut c, Command::Read, 7, 512, len);
        let mut at = 512u64;
        loop {
            let (flags, kind, cookie, d) = chunk(&mut c);
            assert_eq!((kind, cookie), (wire::reply::OFFSET_DATA, 7));
            assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), at);
            let n = d.len() - 8;
            assert!(d[8..] == data[at as usize..at as usize + n]);
            at += n as u64;
            if flags & wire::reply::FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(at, 512 + u64::from(len));
        let df = Request {
            flags: wire::cmdflag::DF,
            cmd: Command::Read,
            cookie: 8,
            offset: 0,
            len,
        };
        c.write_all(&df.encode()).unwrap();
        let (flags, kind, cookie, d) = chunk(&mut c);
        assert_eq!(
            (flags, kind, cookie),
            (wire::reply::FLAG_DONE, wire::reply::ERROR, 8)
        );
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()),
            wire::errno::EOVERFLOW
        );
        // With DF and at most the maximum payload: one chunk.
        let df = Request { len: 1 << 20, ..df };
        c.write_all(&df.encode()).unwrap();
        let (flags, kind, _, d) = chunk(&mut c);
        assert_eq!(
            (flags, kind),
            (wire::reply::FLAG_DONE, wire::reply::OFFSET_DATA)
        );
        assert!(d[8..] == data[..1 << 20]);
    })
    .await
    .unwrap();
}

/// The shutdown signal: a connection in its handshake is closed; one in transmission
/// answers the request it has read, stops reading and closes; both end their association.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_handshakes_and_drains_transmission() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (mut waiting, stop_a) = connect(&svc, ConnConfig::new(Duration::from_secs(5)));
    let (mut serving, stop_b) = connect(&svc, ConnConfig::new(Duration::from_secs(5)));
    let (waiting, mut serving) = tokio::task::spawn_blocking(move || {
        greet(&mut waiting);
        greet(&mut serving);
        go(&mut serving);
        request(&mut serving, Command::Read, 1, 0, 4096);
        assert_eq!(simple_reply(&mut serving), (0, 1));
        let mut d = vec![0u8; 4096];
        serving.read_exact(&mut d).unwrap();
        (waiting, serving)
    })
    .await
    .unwrap();
    let containers = |svc: Service| async move {
        svc.disks()
            .await
            .iter()
            .map(|d| d.containers.len())
            .sum::<usize>()
    };
    assert_eq!(containers(svc.clone()).await, 1);
    stop_a.send(true).unwrap();
    stop_b.send(true).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut w = waiting;
        let mut rest = Vec::new();
        assert_eq!(
            w.read_to_end(&mut rest).unwrap(),
            0,
            "the handshake is closed"
        );
        let mut rest = Vec::new();
        assert_eq!(
            serving.read_to_end(&mut rest).unwrap(),
            0,
            "transmission is closed"
        );
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while containers(svc.clone()).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the association was not ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that sends one option at a time, each well within the allowance, is closed
/// when the allowance is spent in all (a per-option timeout would serve it forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_handshake_is_closed_when_its_allowance_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let mut cfg = ConnConfig::new(Duration::from_secs(5));
    cfg.handshake_timeout = Duration::from_millis(800);
    let (mut c, _stop) = connect(&svc, cfg);
    let t0 = std::time::Instant::now();
    let closed_after = tokio::task::spawn_blocking(move || {
        greet(&mut c);
        // NBD_OPT_LIST every 250 ms, 12 times: 3 s in all.
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(250));
            if c.write_all(&wire::encode_option(opt::LIST, &[])).is_err() {
                return Some(t0.elapsed());
            }
            let mut h = [0u8; 20];
            if c.read_exact(&mut h).is_err() {
                return Some(t0.elapsed());
            }
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            c.read_exact(&mut d).unwrap();
            if u32::from_be_bytes(h[12..16].try_into().unwrap()) == rep::SERVER {
                // The ack follows the one export.
                let mut a = [0u8; 20];
                c.read_exact(&mut a).unwrap();
            }
        }
        None
    })
    .await
    .unwrap();
    let after = closed_after.expect("the trickling client was never closed");
    assert!(
        after < Duration::from_millis(2500),
        "closed after {after:?}"
    );
}

/// The export opens only the file recorded when the disk was adopted, as every job does:
/// a symbolic link or another file renamed over the disk's path is refused at `OPT_GO`
/// (no byte read or written, in the swapped-in file or anywhere), and the disk is marked
/// `failed` with a message naming both identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_swapped_in_at_an_adopted_disks_path_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for (i, how) in ["symlink", "rename"].into_iter().enumerate() {
        let name = format!("a{i}");
        let img = outside.join(format!("{name}.img"));
        std::fs::write(&img, pattern(1 << 20)).unwrap();
        svc.create_disk(&name, 1 << 20, Some(img.clone()))
            .await
            .unwrap();
        let recorded = svc.disk(&name).await.unwrap().disk.identity.unwrap();
        // Another user's file of the same size, which root must not touch.
        let target = outside.join(format!("{name}.target"));
        let secret = vec![0x5au8; 1 << 20];
        std::fs::write(&target, &secret).unwrap();
        let before = std::fs::metadata(&target).unwrap().modified().unwrap();
        let moved = outside.join(format!("{name}.moved"));
        std::fs::rename(&img, &moved).unwrap();
        match how {
            "symlink" => std::os::unix::fs::symlink(&target, &img).unwrap(),
            _ => std::fs::rename(&target, &img).unwrap(),
        }
        let (mut c, _stop) = connect(&svc, ConnConfig::new(Duration::from_secs(5)));
        let n = name.clone();
        let r = tokio::task::spawn_blocking(move || {
            greet(&mut c);
            let info = wire::encode_info_request(&InfoRequest {
                name: n,
                infos: vec![],
            });
            option(&mut c, opt::GO, &info)
        })
        .await
        .unwrap();
        assert_eq!(r.len(), 1, "{how}: {r:?}");
        assert_eq!(r[0].0, rep::ERR_UNKNOWN, "{how}: {r:?}");
        let v = svc.disk(&name).await.unwrap();
        assert_eq!(v.disk.state.name(), "failed", "{how}: {v:?}");
        let error = v.disk.error.clone().unwrap_or_default();
        assert!(
            error.contains("not the file pdguard took it for"),
            "{error}"
        );
        assert!(error.contains(&recorded.to_string()), "{how}: {error}");
        assert_eq!(error.matches("inode").count(), 2, "{how}: {error}");
        assert!(v.containers.is_empty(), "{how}: {v:?}");
        // Not a byte written to the file swapped in (nor read: it is never opened).
        let now = if how == "symlink" { &target } else { &img };
        assert_eq!(std::fs::read(now).unwrap(), secret, "{how}");
        assert_eq!(std::fs::metadata(now).unwrap().modified().unwrap(), before);
        assert_eq!(std::fs::read(&moved).unwrap(), pattern(1 << 20), "{how}");
    }
}

/// A file sealed offline (`pdguard image seal`) and then adopted is `sealed`: `OPT_GO` on
/// it is a reclaim — an instant one, the daemon's default: the client reads the plaintext
/// through the disk's migration (each region checked against the seal's tree before it is
/// served), never the scrambled bytes, and the migration's end leaves the file unsealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_file_sealed_offline_is_unsealed_before_it_is_served() {
    use pdguard_engine::jobs::{seal, NoProgress, SealOptions};
    use pdguard_engine::store::file::{default_record_path, ImageStorage};
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let img = dir.path().join("offline.img");
    let data = pattern(1 << 20);
    std::fs::write(&img, &data).unwrap();
    let storage = ImageStorage::new(img.clone(), default_record_path(&img), None);
    seal(&storage, &SealOptions::default(), &NoProgress).unwrap();
    assert!(std::fs::read(&img).unwrap() != data);
    svc.create_disk("off", 1 << 20, Some(img.clone()))
        .await
        .unwrap();
    assert_eq!(svc.disk("off").await.unwrap().disk.state.name(), "sealed");
    let (mut c, _stop) = connect(&svc, ConnConfig::new(Duration::from_secs(20)));
    let back = tokio::task::spawn_blocking(move || {
        greet(&mut c);
        let info = wire::encode_info_request(&InfoRequest {
            name: "off".into(),
            infos: vec![],
        });
        let r = option(&mut c, opt::GO, &info);
        assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
        request(&mut c, Command::Read, 1, 0, 1 << 20);
        assert_eq!(simple_reply(&mut c), (0, 1));
        let mut back = vec![0u8; 1 << 20];
        c.read_exact(&mut back).unwrap();
        (back, c)
    })
    .await
    .unwrap();
    let (back, c) = back;
    assert!(back == data, "the client read the sealed bytes");
    svc.wait_idle().await;
    assert!(!default_record_path(&img).exists());
    assert!(std::fs::read(&img).unwrap() == data);
    // Still connected (the close would start the grace period).
    assert_eq!(svc.disk("off").await.unwrap().disk.state.name(), "attached");
    drop(c);
}

/// The STARTTLS injection (CVE-2021-3716's shape, nbdkit's fix): options pipelined behind
/// `NBD_OPT_STARTTLS` in the same write would be read as if they had come through TLS.
/// The connection is closed instead, before the ack: nothing is listed, nothing attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_pipelined_behind_starttls_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (mut c, _stop) = connect(&svc, psk_config(dir.path()));
    let got = tokio::task::spawn_blocking(move || {
        greet(&mut c);
        let info = wire::encode_info_request(&InfoRequest {
            name: "d".into(),
            infos: vec![],
        });
        let mut b = wire::encode_option(opt::STARTTLS, &[]);
        b.extend(wire::encode_option(opt::LIST, &[]));
        b.extend(wire::encode_option(opt::GO, &info));
        c.write_all(&b).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        rest
    })
    .await
    .unwrap();
    assert!(got.is_empty(), "the server answered {} bytes", got.len());
    let v = svc.disk("d").await.unwrap();
    assert!(v.containers.is_empty(), "{v:?}");
    assert_eq!(v.disk.state.name(), "available");
}
