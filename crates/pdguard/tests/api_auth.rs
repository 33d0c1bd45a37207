//! End-to-end tests of who may use the admin API: the bearer token of the TCP listener,
//! the Host check, the JSON content type, and the unix socket, against a real daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Status and JSON body (or Null) of one raw exchange.
fn json_answer((status, body): (u16, String)) -> (u16, Value) {
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// One HTTP request with the given extra header lines (each ending in \r\n).
fn request(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn tcp(addr: &str, req: &[u8]) -> (u16, Value) {
    json_answer(http::over_tcp(addr, req, Duration::from_secs(30)))
}

fn unix(sock: &Path, req: &[u8]) -> (u16, Value) {
    json_answer(http::over_unix(sock, req))
}

fn token_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

fn disk_names(addr: &str, token: &str) -> Vec<String> {
    let (st, v) = tcp(
        addr,
        &request(
            "GET",
            "/v1/disks",
            &format!("host: {addr}\r\nauthorization: Bearer {token}\r\n"),
            "",
        ),
    );
    assert_eq!(st, 200, "{v}");
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tcp_api_needs_the_token_a_loopback_host_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Serve::new(&state).profile("patent").api_tcp().start();
    let addr = d.addr().to_string();
    let token_file = state.join("api-token");
    // Made on first start: owner-only, 32 random bytes in hex.
    let m = std::fs::metadata(&token_file).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600, "token file mode");
    assert_eq!(m.uid(), euid());
    let token = token_of(&token_file);
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let host = format!("host: {addr}\r\n");
    let auth = format!("authorization: Bearer {token}\r\n");
    let json = "content-type: application/json\r\n";
    let body = r#"{"name":"d1","size":1048576}"#;

    // No token: 401, in the API's error format, naming the fix.
    for (path, method, b) in [
        ("/v1/status", "GET", ""),
        ("/metrics", "GET", ""),
        ("/v1/disks", "POST", body),
        ("/v1/nothing", "GET", ""),
    ] {
        let (st, v) = tcp(&addr, &request(method, path, &format!("{host}{json}"), b));
        assert_eq!(st, 401, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "unauthorized");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("--api-token-file"), "{msg}");
        assert!(msg.contains(s(&token_file)), "{msg}");
    }
    // Wrong tokens: 401.
    let wrong = if token.starts_with('0') { "1" } else { "0" };
    for bad in [
        format!("authorization: Bearer {wrong}{}\r\n", &token[1..]),
        format!("authorization: Bearer {}\r\n", &token[..63]),
        format!("authorization: Bearer {token}0\r\n"),
        format!("authorization: Basic {token}\r\n"),
        "authorization: Bearer \r\n".to_string(),
    ] {
        let (st, v) = tcp(
            &addr,
            &request("POST", "/v1/disks", &format!("{host}{json}{bad}"), body),
        );
        assert_eq!(st, 401, "{bad:?}: {v}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    // The token, but a body that is not declared JSON: 415 (a web page can post text/plain
    // or a form without a preflight).
    for ct in [
        "content-type: text/plain\r\n",
        "content-type: application/x-www-form-urlencoded\r\n",
        "content-type: multipart/form-data; boundary=x\r\n",
        "",
    ] {
        let (st, v) = tcp(
            &addr,
            &request("POST", "/v1/disks", &format!("{host}{auth}{ct}"), body),
        );
        assert_eq!(st, 415, "{ct:?}: {v}");
        assert_eq!(v["error"]["code"], "unsupported_media_type");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json"));
    }
    // The token, but a Host that is not loopback (DNS rebinding), or none: refused.
    for (h, want) in [
        ("host: evil.example\r\n".to_string(), 421),
        (format!("host: evil.example:{}\r\n", &addr[10..]), 421),
        ("host: 127.0.0.1.evil.example\r\n".to_string(), 421),
        (String::new(), 400),
    ] {
        let (st, v) = tcp(
            &addr,
            &request("POST", "/v1/disks", &format!("{h}{auth}{json}"), body),
        );
        assert_eq!(st, want, "{h:?}: {v}");
        assert_eq!(v["error"]["code"], "bad_host");
    }
    // None of the refused requests created anything.
    assert!(disk_names(&addr, &token).is_empty());
    // All three right: accepted, with any loopback Host spelling.
    let port = addr.rsplit(':').next().unwrap();
    for (i, h) in [
        addr.clone(),
        format!("localhost:{port}"),
        "127.0.0.1".into(),
    ]
    .iter()
    .enumerate()
    {
        let body = format!(r#"{{"name":"ok{i}","size":1048576}}"#);
        let (st, v) = tcp(
            &addr,
            &request(
                "POST",
                "/v1/disks",
                &format!("host: {h}\r\n{auth}content-type: application/json; charset=utf-8\r\n"),
                &body,
            ),
        );
        assert_eq!(st, 201, "{h}: {v}");
    }
    assert_eq!(disk_names(&addr, &token), ["ok0", "ok1", "ok2"]);
}

fn euid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[test]
fn cli_clients_work_on_tcp_given_the_token_by_flag_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("elsewhere").join("my-token");
    std::fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    let d = Serve::new(&state)
        .profile("patent")
        .api_tcp()
        .api_token_file(&token_file)
        .start();
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().mode() & 0o777,
        0o600
    );
    assert!(
        !state.join("api-token").exists(),
        "the default token file was made although --api-token-file was given"
    );
    let api = d.api().to_string();
    let none: &[(&str, &Path)] = &[];
    // By flag.
    let flag = ["--api", &api, "--api-token-file", s(&token_file), "--json"];
    let with_flag = |args: &[&str]| client(&[args, &flag[..]].concat(), none);
    json_of(&with_flag(&["disk", "create", "a", "--size", "1M"]));
    json_of(&with_flag(&["container", "up", "c1", "--disk", "a"]));
    let v = json_of(&with_flag(&["status"]));
    assert_eq!(v["disks"][0]["name"], "a");
    assert_eq!(v["disks"][0]["state"], "attached");
    json_of(&with_flag(&["container", "down", "c1", "--removed"]));
    // By environment.
    let env: &[(&str, &Path)] = &[("PDGUARD_API_TOKEN_FILE", &token_file)];
    let v = json_of(&client(
        &[
            "disk", "create", "b", "--size", "1M", "--api", &api, "--json",
        ],
        env,
    ));
    assert_eq!(v["name"], "b");
    let v = json_of(&client(&["disk", "ls", "--api", &api, "--json"], env));
    assert_eq!(v["disks"].as_array().unwrap().len(), 2);
    let v = json_of(&client(&["container", "ls", "--api", &api, "--json"], env));
    assert_eq!(v["containers"][0]["id"], "c1");
    // From STATE/api-token when --state-dir points at the daemon's state.
    let copy = dir.path().join("client-state");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(&token_file, copy.join("api-token")).unwrap();
    json_of(&client(
        &["status", "--api", &api, "--state-dir", s(&copy), "--json"],
        none,
    ));

    // Without a token file: exit 1 naming the fix, nothing done.
    let empty = dir.path().join("empty-state");
    let o = client(
        &[
            "disk",
            "create",
            "x",
            "--size",
            "1M",
            "--api",
            &api,
            "--state-dir",
            s(&empty),
        ],
        none,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("--api-token-file"), "{}", stderr(&o));
    // A wrong token: the daemon's 401, exit 1.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let o = client(
        &[
            "disk",
            "create",
            "y",
            "--size",
            "1M",
            "--api",
            &api,
            "--api-token-file",
            s(&wrong),
        ],
        none,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("bearer token is wrong"),
        "{}",
        stderr(&o)
    );
    let v = json_of(&with_flag(&["disk", "ls"]));
    let names: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn daemon_refuses_an_exposed_or_foreign_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let token_file = state.join("api-token");
    let token = "cd".repeat(32);
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = Serve::new(&state).profile("patent").api_tcp().refused();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    assert_eq!(token_of(&token_file), token, "the token file was changed");

    // Owned by another user (needs root to chown; the suite runs as root).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(euid(), 0, "this test needs root to chown the token file");
    std::os::unix::fs::chown(&token_file, Some(65534), Some(65534)).unwrap();
    let o = Serve::new(&state).profile("patent").api_tcp().refused();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("chown"), "{}", stderr(&o));
    assert_eq!(token_of(&token_file), token, "the token file was changed");

    // A symlink is not followed.
    std::fs::remove_file(&token_file).unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&target, &token_file).unwrap();
    let o = Serve::new(&state).profile("patent").api_tcp().refused();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("is a symbolic link"), "{}", stderr(&o));
}

#[test]
fn unix_socket_needs_no_token_but_json_and_stays_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("state");
    let _d = Serve::new(&state).profile("patent").start();
    let sock = state.join("pdguard.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().mode() & 0o777,
        0o600,
        "socket mode"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().mode() & 0o777,
        0o700,
        "state directory mode"
    );
    assert!(
        !state.join("api-token").exists(),
        "a token was made for a unix-socket daemon"
    );
    let none: &[(&str, &Path)] = &[];
    let st = ["--state-dir", s(&state), "--json"];
    json_of(&client(
        &[&["disk", "create", "u", "--size", "1M"][..], &st[..]].concat(),
        none,
    ));
    let v = json_of(&client(&[&["status"][..], &st[..]].concat(), none));
    assert_eq!(v["disks"][0]["name"], "u");
    // No token needed, any Host; but a body must still be JSON.
    let (code_, v) = unix(&sock, &request("GET", "/v1/disks", "host: pdguard\r\n", ""));
    assert_eq!(code_, 200, "{v}");
    let (code_, v) = unix(
        &sock,
        &request(
            "POST",
            "/v1/disks",
            "host: pdguard\r\ncontent-type: text/plain\r\n",
            r#"{"name":"t","size":1048576}"#,
        ),
    );
    assert_eq!(code_, 415, "{v}");
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    let v = json_of(&client(&[&["disk", "ls"][..], &st[..]].concat(), none));
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
}
