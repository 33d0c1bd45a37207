//! The HTTP server of `pdguard serve`: routes, JSON errors with stable codes, body limits.

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pdguard_engine::registry::ContainerState;
use pdguard_engine::service::{Service, ServiceError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Guard};
use super::MAX_BODY;

/// An API error: a stable code, an HTTP status and one line of text.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: u16, code: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message,
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self::new(e.http_status(), e.code(), pdguard_engine::error_chain(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, Json(v)).into_response())
}

/// Read and parse a JSON body, with the size limit and errors in the API's format.
async fn json_body<T: for<'de> Deserialize<'de>>(req: Request) -> Result<T, ApiError> {
    let bytes = to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| {
        ApiError::new(
            413,
            "body_too_large",
            format!("request body is larger than {MAX_BODY} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            400,
            "bad_json",
            format!("request body is not the expected JSON: {e}"),
        )
    })
}

/// The routes, behind the checks of [`super::auth`] (Host, token, content type).
pub fn router(svc: Service, guard: Guard) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/disks", get(list_disks).post(create_disk))
        .route("/v1/disks/{name}", get(show_disk).delete(remove_disk))
        .route("/v1/disks/{name}/seal", post(seal_disk))
        .route("/v1/disks/{name}/unseal", post(unseal_disk))
        .route("/v1/containers", get(list_containers))
        .route("/v1/containers/{id}/up", post(container_up))
        .route("/v1/containers/{id}/down", post(container_down))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(svc)
        .layer(axum::middleware::from_fn_with_state(guard, auth::check))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "not_found",
        format!(
            "no endpoint {} {}; see docs/api.md",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn status(State(svc): State<Service>) -> ApiResult {
    let cfg = svc.config();
    ok(
        StatusCode::OK,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "profile": cfg.profile.name(),
            "grace_ms": cfg.grace.as_millis() as u64,
            "disks": svc.disks().await,
            "containers": svc.containers().await,
            "seal_stopped": cfg.seal_stopped,
            "docker": svc.docker_status(),
            "jobs": svc.backlog(),
        }),
    )
}

async fn list_disks(State(svc): State<Service>) -> ApiResult {
    ok(StatusCode::OK, json!({ "disks": svc.disks().await }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDisk {
    name: String,
    size: u64,
    #[serde(default)]
    path: Option<std::path::PathBuf>,
}

async fn create_disk(State(svc): State<Service>, req: Request) -> ApiResult {
    let b: CreateDisk = json_body(req).await?;
    let v = svc.create_disk(&b.name, b.size, b.path).await?;
    ok(StatusCode::CREATED, json!(v))
}

async fn show_disk(State(svc): State<Service>, Path(name): Path<String>) -> ApiResult {
    ok(StatusCode::OK, json!(svc.disk(&name).await?))
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    shred: bool,
    #[serde(default)]
    keep_file: bool,
}

async fn remove_disk(
    State(svc): State<Service>,
    Path(name): Path<String>,
    q: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::new(400, "bad_query", e.body_text()))?;
    svc.remove_disk(&name, q.shred, q.keep_file).await?;
    ok(
        StatusCode::OK,
        json!({ "removed": name, "shredded": q.shred, "kept_file": q.keep_file }),
    )
}

#[derive(Deserialize)]
struct SealQuery {
    #[serde(default)]
    force: bool,
}

/// `?force=true` seals a disk that running containers (or NBD connections) use.
async fn seal_disk(
    State(svc): State<Service>,
    Path(name): Path<String>,
    q: Result<Query<SealQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::new(400, "bad_query", e.body_text()))?;
    ok(
        StatusCode::OK,
        json!(svc.seal_disk_forced(&name, q.force).await?),
    )
}

async fn unseal_disk(State(svc): State<Service>, Path(name): Path<String>) -> ApiResult {
    ok(StatusCode::OK, json!(svc.unseal_disk(&name).await?))
}

async fn list_containers(State(svc): State<Service>) -> ApiResult {
    ok(
        StatusCode::OK,
        json!({ "containers": svc.containers().await }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Up {
    #[serde(default)]
    disks: Vec<String>,
}

async fn container_up(
    State(svc): State<Service>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult {
    let b: Up = json_body(req).await?;
    let c = svc.container_up(&id, &b.disks).await?;
    let mut disks = Vec::new();
    for d in &c.container.disks {
        disks.push(svc.disk(d).await?);
    }
    ok(StatusCode::OK, json!({ "container": c, "disks": disks }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Down {
    state: ContainerState,
}

async fn container_down(
    State(svc): State<Service>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult {
    let b: Down = json_body(req).await?;
    ok(
        StatusCode::OK,
        json!({ "container": svc.container_down(&id, b.state).await? }),
    )
}

async fn metrics(State(svc): State<Service>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(svc.metrics_text().await),
    )
        .into_response()
}
