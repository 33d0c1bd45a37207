//! Errors of the seal, unseal and verify jobs. Each names the thing, the cause and the fix.

use pdguard_core::keys::KeyError;
use pdguard_core::{GeometryError, PlacementError, RecordError};
use thiserror::Error;

use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum JobError {
    #[error("{image} is not sealed: there is no seal record at {record} (if it was sealed and the record was deleted, restore the record from a backup; the data cannot be put back without it)")]
    NotSealed { image: String, record: String },

    #[error("{image} is already sealed (seal record {record}); unseal it first with `pdguard image unseal {image}`")]
    AlreadySealed { image: String, record: String },

    #[error("{image} cannot be sealed")]
    Geometry {
        image: String,
        #[source]
        source: GeometryError,
    },

    #[error("seal record {record} cannot be used; restore it from a backup or pass the right one with --record")]
    Record {
        record: String,
        #[source]
        source: RecordError,
    },

    #[error("seal record {record} does not belong to image {image}: {why}; pass the record of this image with --record")]
    Mismatch {
        image: String,
        record: String,
        why: String,
    },

    #[error("not enough free space for the thin disk {thin}: it needs {need} bytes and {free} are free; free some space or pass --thin-dir on a larger file system")]
    NoSpace { thin: String, need: u64, free: u64 },

    #[error("{image} failed verification: {why}")]
    Verification { image: String, why: String },

    #[error("{image} has an interrupted {phase} job; run `pdguard image {command} {image}` to finish it first")]
    InProgress {
        image: String,
        phase: &'static str,
        command: &'static str,
    },

    #[error("thin disk {thin} holds the only complete copy of {image} (phase {phase}) but is missing; restore it from a backup to the same path, then run the command again")]
    ThinMissing {
        image: String,
        thin: String,
        phase: &'static str,
    },

    #[error("placement of {image} cannot be built")]
    Placement {
        image: String,
        #[source]
        source: PlacementError,
    },

    #[error("{image} was sealed with the secure profile and needs its master key; pass --key-file FILE or set PDGUARD_KEY_FILE")]
    KeyMissing { image: String },

    #[error("the master key given (id {have}) is not the one {image} was sealed with (id {want}); pass the right --key-file")]
    WrongKey {
        image: String,
        have: String,
        want: String,
    },

    #[error("the key of {image} cannot be unwrapped (seal record {record})")]
    Key {
        image: String,
        record: String,
        #[source]
        source: KeyError,
    },

    #[error("seal record {record} names the thin disk {named}, but the thin disk of this seal is {derived}; pdguard never follows a path from a record, so nothing was touched: {fix}")]
    ThinPathMismatch {
        record: String,
        named: String,
        derived: String,
        fix: String,
    },

    #[error("the key slot {slot} of {image} cannot be used: {why}; restore it (and its record) from a backup")]
    KeySlot {
        image: String,
        slot: String,
        why: String,
    },

    #[error("seal record {record} is version {version}, which has no MAC, so pdguard will not act on it{hint}; migrate it first with `pdguard image migrate {image} --key-file FILE` (nothing was touched)")]
    OldRecord {
        image: String,
        record: String,
        version: u32,
        /// What else the user can do, from ", " on, or empty.
        hint: String,
    },

    #[error("seal record {record} cannot be trusted: {why}, but the key slot {slot} beside it belongs to an authenticated seal, so the record was replaced or edited; restore the record from a backup (nothing was touched)")]
    Downgraded {
        record: String,
        slot: String,
        why: String,
    },

    #[error("shred interrupted on {image}; run `pdguard image shred {image} --yes` to finish it (its key is already unusable)")]
    ShredInterrupted { image: String },

    #[error("{image} was crypto-erased by `pdguard image shred`: its key is destroyed and its data cannot be recovered; delete the image, or delete its tombstone record on purpose before sealing new data into it")]
    Shredded { image: String },

    #[error("{image} was crypto-erased (tombstone record {record}), and a shred is final: it is not sealed over. To reuse the image for new data on purpose, delete the tombstone (`rm {record}`), then seal again")]
    SealOverShred { image: String, record: String },

    #[error("{image} is being reclaimed while served (phase migrating: part of it is plaintext already): the instant reclaim that serves it finishes the migration; if nothing serves it any more (its daemon stopped, or the disk was moved), finish it offline with `pdguard image unseal {image}` first")]
    Reclaiming { image: String },

    #[error("{image} cannot be crypto-erased: it is being reclaimed (phase migrating), and the regions already moved are plaintext, which destroying the key would not erase; finish the reclaim with `pdguard image unseal {image}`, then seal it again and shred it (or overwrite the image)")]
    ShredReclaiming { image: String },

    #[error("{0}")]
    Unsupported(String),

    #[error("{action} {image} failed and was rolled back; the image is as it was")]
    RolledBack {
        action: &'static str,
        image: String,
        #[source]
        source: StoreError,
    },

    #[error("{action} {image} stopped in phase {phase}; no data is lost: run `pdguard image {command} {image}` again to finish it (or the other command to roll it back)")]
    Interrupted {
        action: &'static str,
        image: String,
        phase: &'static str,
        command: &'static str,
        #[source]
        source: StoreError,
    },

    /// Another job holds the image (one job per image, across processes).
    #[error(transparent)]
    Busy(StoreError),

    #[error("{image} is attached to loop device {devices}: sealing would rewrite it under whoever uses the device; unmount and detach it first (`umount`, then `losetup -d DEVICE`)")]
    InUse { image: String, devices: String },

    #[error("cannot access {image}")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },
}

impl JobError {
    /// True for a failed integrity check (exit code 3 in the CLI contract).
    pub fn is_verification(&self) -> bool {
        matches!(self, Self::Verification { .. })
    }

    /// True when another job holds the image.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy(_))
    }
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;
