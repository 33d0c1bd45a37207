//! The plugin's endpoints. dockerd sends no Content-Type, so bodies are read as JSON
//! whatever the headers say; every answer is `200` with `Err` empty or naming the failure
//! (dockerd shows it to the user as is).

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use pdguard_engine::service::{Service, VolumeView};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::protocol::{Answer, CreateRequest, MountRequest, NameRequest, Volume};
use crate::api::MAX_BODY;

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

pub fn router(svc: Service) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .fallback(unknown)
        .with_state(svc)
}

fn reply(v: impl serde::Serialize) -> Response {
    ([("content-type", CONTENT_TYPE)], Json(v)).into_response()
}

fn answer(r: Result<Answer, String>) -> Response {
    reply(r.unwrap_or_else(Answer::err))
}

async fn body<T: DeserializeOwned>(req: Request) -> Result<T, String> {
    let path = req.uri().path().to_string();
    let bytes = to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|_| format!("pdguard: {path}: request body is larger than {MAX_BODY} bytes"))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("pdguard: {path}: request body is not the expected JSON: {e}"))
}

fn fail(e: pdguard_engine::service::ServiceError) -> String {
    format!("pdguard: {}", pdguard_engine::error_chain(&e))
}

fn volume(v: VolumeView, status: bool) -> Volume {
    Volume {
        name: v.name,
        mountpoint: v
            .mountpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        status: status.then_some(v.status),
    }
}

async fn unknown(req: Request) -> Response {
    answer(Err(format!(
        "pdguard: no plugin endpoint {}; see docs/docker-plugin.md",
        req.uri().path()
    )))
}

async fn activate() -> Response {
    reply(json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities() -> Response {
    reply(json!({ "Capabilities": { "Scope": "local" } }))
}

async fn create(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let c: CreateRequest = body(req).await?;
        let opts = c.opts.unwrap_or_default();
        svc.volume_create(&c.name, &opts).await.map_err(fail)?;
        tracing::info!(volume = %c.name, "volume created");
        Ok(Answer::default())
    };
    answer(r.await)
}

async fn remove(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let c: NameRequest = body(req).await?;
        svc.volume_remove(&c.name).await.map_err(fail)?;
        tracing::info!(volume = %c.name, "volume removed");
        Ok(Answer::default())
    };
    answer(r.await)
}

async fn mount(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let m: MountRequest = body(req).await?;
        let at = svc.volume_mount(&m.name, &m.id).await.map_err(fail)?;
        Ok(Answer {
            mountpoint: Some(at.display().to_string()),
            ..Answer::default()
        })
    };
    answer(r.await)
}

async fn unmount(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let m: MountRequest = body(req).await?;
        svc.volume_unmount(&m.name, &m.id).await.map_err(fail)?;
        Ok(Answer::default())
    };
    answer(r.await)
}

async fn path(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let n: NameRequest = body(req).await?;
        let v = svc.volume(&n.name).await.map_err(fail)?;
        Ok(Answer {
            mountpoint: Some(volume(v, false).mountpoint),
            ..Answer::default()
        })
    };
    answer(r.await)
}

async fn get(State(svc): State<Service>, req: Request) -> Response {
    let r = async {
        let n: NameRequest = body(req).await?;
        let v = svc.volume(&n.name).await.map_err(fail)?;
        Ok(Answer {
            volume: Some(volume(v, true)),
            ..Answer::default()
        })
    };
    answer(r.await)
}

async fn list(State(svc): State<Service>) -> Response {
    let vols = svc
        .volumes()
        .await
        .into_iter()
        .map(|v| volume(v, false))
        .collect();
    reply(Answer {
        volumes: Some(vols),
        ..Answer::default()
    })
}
