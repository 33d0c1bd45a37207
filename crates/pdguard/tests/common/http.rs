//! Raw HTTP/1.x exchanges for the tests that speak to an API by hand (hostile requests,
//! exact headers): one request written, the whole answer read until the server closes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Write `request` (ask for `connection: close`), read to the end: (status, body). A
/// server that answers nothing gives status 0.
pub fn exchange(mut s: impl Read + Write, request: &[u8]) -> (u16, String) {
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

/// [`exchange`] on a new TCP connection to `addr`, reads bounded by `timeout`.
pub fn over_tcp(addr: &str, request: &[u8], timeout: Duration) -> (u16, String) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    exchange(s, request)
}

/// [`exchange`] on a new connection to the unix socket `sock`, reads bounded by 30 s.
pub fn over_unix(sock: &Path, request: &[u8]) -> (u16, String) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(s, request)
}
