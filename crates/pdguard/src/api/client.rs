//! A small HTTP/1.1 client for the admin API, over a unix socket or loopback TCP.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::Token;
use super::Endpoint;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("permission denied on the daemon's socket {0}; run as the daemon's user (root) or fix the socket's permissions")]
    Permission(String),
    #[error("no pdguard daemon answers at {0}; start one with `pdguard serve`, or point to it with --api or --state-dir")]
    Unreachable(String),
    #[error("talking to the daemon at {at} failed: {why}")]
    Protocol { at: String, why: String },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

/// Send one request; return the JSON (or text, as a JSON string) of a 2xx answer. `token`
/// is sent as a bearer token (the TCP API needs it).
pub async fn call(
    at: &Endpoint,
    token: Option<&Token>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    // On TCP the daemon accepts only a loopback Host (DNS rebinding): send the address.
    let host = match at {
        Endpoint::Unix(_) => "pdguard".to_string(),
        Endpoint::Tcp(a) => a
            .parse::<std::net::SocketAddr>()
            .map_or_else(|_| a.clone(), |a| a.to_string()),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {}", t.as_str()));
    }
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| proto(at, e))?;
    let (status, body) = match at {
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| connect_err(at, e))?;
            send(at, s, req).await?
        }
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .map_err(|e| connect_err(at, e))?;
            send(at, s, req).await?
        }
    };
    if (200..300).contains(&status) {
        return Ok(serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())));
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Err(ClientError::Api {
        status,
        code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
        message: v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body))),
    })
}

fn proto(at: &Endpoint, e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol {
        at: at.to_string(),
        why: e.to_string(),
    }
}

fn connect_err(at: &Endpoint, e: std::io::Error) -> ClientError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(at.to_string()),
        _ => ClientError::Unreachable(at.to_string()),
    }
}

async fn send<S>(
    at: &Endpoint,
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| proto(at, e))?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| proto(at, e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| proto(at, e))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}
