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
pub mod units;

/// An error and its causes on one line, each cause once (a cause whose text the line already
/// holds is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        src = cause.source();
    }
    line
}
