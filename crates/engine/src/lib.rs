//! pdguard-engine: stores and crash-safe jobs on top of the pure `pdguard-core`.
//!
//! - [`store`]: the persistent disk (raw image or block device), the thin disk (a sparse
//!   file) and the seal record, behind small traits with real and simulated implementations.
//! - [`jobs`]: seal and unseal — scatter, wipe, gather — and verify.

pub mod gate;
pub mod jobs;
pub mod keyfile;
pub mod registry;
pub mod service;
pub mod store;
