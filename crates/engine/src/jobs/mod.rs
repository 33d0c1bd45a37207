//! Background jobs: seal and unseal an image, crash-safe at every instant (DESIGN.md §3).
//!
//! A seal is three passes — **scatter** (disk to thin disk by the placement), **wipe** (the
//! record stops trusting the original) and **gather** (thin disk back to the disk,
//! skipping empty slots) — and an unseal is the same with the inverse map. The seal record
//! names the phase, and so which copy of the data is complete; the next `seal` or `unseal`
//! on an image finishes or rolls back whatever a crash interrupted.

mod dense;
mod error;
mod job;
pub mod reclaim;
pub mod strategy;

pub use error::{JobError, Result};
pub use job::{
    inspect, migrate, reclaim_tree, rescue, seal, shred, shred_report, unseal, unseal_with, verify,
    Direction, JobReport, MigrateReport, Outcome, RescueReport, SealOptions, ShredReport, SlotFate,
    VerifyReport,
};

/// Receives progress of a job; the CLI draws a bar from it, the daemon exports it.
pub trait Progress: Send + Sync {
    /// A pass named `name` starts and will move `total_bytes`.
    fn pass(&self, _name: &'static str, _total_bytes: u64) {}
    /// `bytes` more were moved in the current pass.
    fn advance(&self, _bytes: u64) {}
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {}

#[cfg(test)]
mod integrity_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod record_edits;
#[cfg(test)]
mod tests;
