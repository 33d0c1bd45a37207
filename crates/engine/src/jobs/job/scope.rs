//! The context every error of a job carries, built in one place: the image and its record
//! as the storage names them (Cloud Hypervisor's `block/src/error.rs` builds context once
//! the same way). A room asks its [`JobScope`] for an error instead of writing its fields.

use super::*;

/// The image and record one job is about, for its errors.
#[derive(Clone, Copy)]
pub(super) struct JobScope<'a>(pub(super) &'a dyn Storage);

impl JobScope<'_> {
    pub(super) fn image(self) -> String {
        self.0.image_name()
    }

    /// The image (or its record, key slot or thin disk) could not be read or written.
    pub(super) fn store(self, source: StoreError) -> JobError {
        JobError::Store {
            image: self.image(),
            source,
        }
    }

    /// The record cannot be used.
    pub(super) fn record(self, source: pdguard_core::RecordError) -> JobError {
        JobError::Record {
            record: self.0.record_name(),
            source,
        }
    }

    /// The record contradicts itself.
    pub(super) fn inconsistent(self, why: impl Into<String>) -> JobError {
        self.record(pdguard_core::RecordError::Inconsistent(why.into()))
    }

    /// The record is not the one of this image.
    pub(super) fn mismatch(self, why: impl Into<String>) -> JobError {
        JobError::Mismatch {
            image: self.image(),
            record: self.0.record_name(),
            why: why.into(),
        }
    }

    /// The image's data is not what the record says (exit 3).
    pub(super) fn verification(self, why: impl Into<String>) -> JobError {
        JobError::Verification {
            image: self.image(),
            why: why.into(),
        }
    }
}
