//! Errors of the daemon's service layer, each with a stable code and an HTTP status.

use std::sync::Arc;

use thiserror::Error;

use super::lifecycle::LifeError;
use super::runner::RunError;
use crate::registry::RegistryError;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("no {kind} named {name:?}; list them with `pdguard {kind} ls`")]
    NotFound { kind: &'static str, name: String },
    #[error("a {kind} named {name:?} already exists; pick another name")]
    Exists { kind: &'static str, name: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("the registry failed")]
    Registry(#[from] RegistryError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A job failed; its own error, typed (a verification failure stays one).
    #[error("disk {disk:?}: {action} failed")]
    Job {
        disk: String,
        action: &'static str,
        #[source]
        source: Arc<RunError>,
    },
    /// The disk's life cycle does not allow it now.
    #[error("disk {disk:?} {why}")]
    Life { disk: String, why: LifeError },
    /// A disk's file cannot be opened (or is not the file recorded for it).
    #[error("disk {disk:?} cannot be opened")]
    Store {
        disk: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// A Docker Mount waited its limit (`--docker-mount-timeout`) for the volume's reclaim,
    /// which goes on: the next Mount finds it further along or done.
    #[error("volume {volume:?}: {how_far}; it goes on in the background: retry `docker run` in a moment")]
    StillReclaiming { volume: String, how_far: String },
}

impl ServiceError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { kind: "disk", .. } => "disk_not_found",
            Self::NotFound { .. } => "container_not_found",
            Self::Exists { .. } => "already_exists",
            Self::Invalid(_) => "invalid_request",
            Self::Busy(_) => "conflict",
            Self::Registry(_) => "registry_error",
            Self::Io { .. } => "io_error",
            Self::Job { source, .. } if source.is_verification() => "verification_failed",
            Self::Job { .. } => "job_failed",
            Self::Life {
                why: LifeError::GraceOverflow { .. },
                ..
            } => "invalid_request",
            Self::Life { .. } => "conflict",
            Self::Store {
                source: crate::store::StoreError::Replaced(_),
                ..
            } => "disk_replaced",
            Self::Store { .. } => "io_error",
            Self::ShuttingDown => "shutting_down",
            Self::StillReclaiming { .. } => "reclaim_running",
        }
    }

    /// The HTTP status that carries it.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::NotFound { .. } => 404,
            Self::Exists { .. } | Self::Busy(_) => 409,
            Self::Invalid(_) => 400,
            Self::Life {
                why: LifeError::GraceOverflow { .. },
                ..
            } => 400,
            Self::Life { .. } => 409,
            // The request was understood and the job ran: the data did not verify.
            Self::Job { source, .. } if source.is_verification() => 422,
            Self::ShuttingDown | Self::StillReclaiming { .. } => 503,
            Self::Store {
                source: crate::store::StoreError::Replaced(_),
                ..
            } => 409,
            Self::Job { .. } | Self::Registry(_) | Self::Io { .. } | Self::Store { .. } => 500,
        }
    }
}
