//! The passes of a job: scatter, wipe and gather, both ways, each durable before the next.

use super::*;

impl Job<'_> {
    /// Seal pass 1, scatter: the image is read linearly and each sector goes to its slot
    /// of a new thin disk (claims 1-2). The image is untouched, so a failure rolls back.
    pub(super) fn seal_scatter(&mut self) -> Result<()> {
        let seal_id = self.rec.seal_id.clone();
        let tap = self.new_tree_tap();
        let run = |job: &Self| -> Result<blake3::Hash> {
            job.storage
                .remove_thin(&seal_id)
                .map_err(|e| job.interrupted(e))?;
            job.check_space()?;
            job.progress.pass("scatter", job.geometry.disk_bytes());
            let moved = || -> Result<blake3::Hash, StoreError> {
                let thin = job
                    .storage
                    .create_thin(&seal_id, job.geometry.thin_bytes())?;
                let view = job.dense.as_ref().map(|d| d.compacted(&*job.image));
                let plain = view.as_ref().map_or(&*job.image, |v| v as &dyn Disk);
                let (image, thin) = (job.sparse(plain)?, job.sparse(&*thin)?);
                let ctx = job.ctx_with(tap.as_ref());
                let h = job.strategy.scatter_plain(&ctx, &image, &thin)?;
                thin.sync()?;
                Ok(h)
            };
            moved().map_err(|e| job.interrupted(e))
        };
        let digest = match run(self) {
            Ok(d) => d,
            Err(e) => return Err(self.roll_back_seal_scatter(e)),
        };
        // The tree is durable before the record that names it (as the key slot is).
        if let Some(tap) = tap {
            if let Err(e) = self.record_tree(tap) {
                let e = self.interrupted(e);
                return Err(self.roll_back_seal_scatter(e));
            }
        }
        // So is the placement table.
        if let Err(e) = self.record_place() {
            let e = self.interrupted(e);
            return Err(self.roll_back_seal_scatter(e));
        }
        self.rec.plain_digest = Some(digest.to_hex().to_string());
        self.wipe()
    }

    /// Undo a failed seal scatter: the image was only read, so dropping the thin disk and
    /// the record restores the state before the seal.
    pub(super) fn roll_back_seal_scatter(&self, err: JobError) -> JobError {
        let undone = drop_seal(self.storage, &self.rec.seal_id);
        match (err, undone) {
            (JobError::Interrupted { source, .. }, Ok(())) => JobError::RolledBack {
                action: Direction::Seal.action(),
                image: self.image_name(),
                source,
            },
            (e, _) => e,
        }
    }

    /// Seal pass 2, wipe ([043], claim 5): from this durable record write on, the thin
    /// disk is the one complete copy and the image's plaintext is no longer trusted. The
    /// gather that follows overwrites every sector of the image.
    pub(super) fn wipe(&mut self) -> Result<()> {
        self.commit(Phase::SealGather)
    }

    pub(super) fn open_thin(&self) -> Result<Box<dyn Disk>> {
        let thin = self
            .storage
            .open_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match thin {
            Some(t) if t.len() == self.geometry.thin_bytes() => Ok(t),
            _ => Err(JobError::ThinMissing {
                image: self.image_name(),
                thin: self.thin_name(),
                phase: self.rec.phase.name(),
            }),
        }
    }

    /// Seal pass 3, gather ([043]-[045]): the thin disk is copied back linearly, empty
    /// slots skipped. Restartable: the thin disk is not changed.
    ///
    /// The sealed digest is a fact of the seal, written once by the gather that completes
    /// it. A gather that puts a sealed image back (an unseal rolled back or failed) checks
    /// the image against that digest and never rewrites it: if the thin disk was corrupted,
    /// the record keeps saying what the seal was, so `verify` reports the damage.
    pub(super) fn seal_gather(&mut self) -> Result<()> {
        let thin = self.open_thin()?;
        self.progress.pass("gather", self.geometry.disk_bytes());
        let view = self.sealed_view();
        let sealed = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        // Dense placement: the original's data past the dense region is overwritten beside
        // the gather (other bytes, other I/O), synced with it, then deallocated. Without
        // it the tail is empty and this is the gather and the image's sync.
        let tail = match &view {
            Some(v) => dense::tail_ranges(&*self.image, v.len()),
            None => Ok(Vec::new()),
        };
        let digest = tail
            .and_then(|tail| Ok((tail, self.sparse(&*thin)?, self.sparse(sealed)?)))
            .and_then(|(tail, t, i)| {
                dense::gather_and_wipe(&*self.image, &tail, || {
                    self.strategy.gather_sealed(&self.ctx(), &t, &i)
                })
            })
            .and_then(|d| Ok((d, self.fingerprint()?)))
            .map_err(|e| self.interrupted(e));
        drop(view);
        let (digest, fingerprint) = digest?;
        let digest = digest.to_hex().to_string();
        let put_back = match &self.rec.sealed_digest {
            Some(want) => (*want != digest).then(|| want.clone()),
            None => {
                self.rec.sealed_digest = Some(digest.clone());
                self.rec.sealed_fingerprint = Some(fingerprint);
                None
            }
        };
        self.commit(Phase::Sealed)?;
        drop(thin);
        self.storage
            .remove_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match put_back {
            None => Ok(()),
            Some(want) => Err(self.scope().verification(format!("the sealed data put back from the thin disk has the BLAKE3 digest {digest}, but the seal's is {want}: the thin disk was corrupted; the image stays sealed and the record keeps the seal's digest, so `pdguard image verify` reports the damage"))),
        }
    }

    /// Unseal pass 1: the sealed image is read linearly back into the thin-disk layout,
    /// and its digest checked before anything is written to the image.
    pub(super) fn unseal_scatter(&mut self) -> Result<()> {
        let seal_id = self.rec.seal_id.clone();
        self.storage
            .remove_thin(&seal_id)
            .map_err(|e| self.interrupted(e))?;
        self.check_space()?;
        if self.rec.phase != Phase::UnsealScatter {
            self.commit(Phase::UnsealScatter)?;
        }
        self.progress.pass("scatter", self.geometry.disk_bytes());
        let moved = || -> Result<blake3::Hash, StoreError> {
            let thin = self
                .storage
                .create_thin(&seal_id, self.geometry.thin_bytes())?;
            let view = self.sealed_view();
            let sealed = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
            let (image, thin) = (self.sparse(sealed)?, self.sparse(&*thin)?);
            let h = self.strategy.scatter_sealed(&self.ctx(), &image, &thin)?;
            thin.sync()?;
            Ok(h)
        };
        let digest = match moved() {
            Ok(d) => d.to_hex().to_string(),
            Err(e) => return Err(self.roll_back_unseal_scatter(e)),
        };
        if self.rec.sealed_digest.as_deref() != Some(digest.as_str()) {
            let mut why = format!("the sealed image's BLAKE3 digest is {digest} but the seal record says {}: it was corrupted or tampered with after sealing; it is left sealed as it is", self.rec.sealed_digest.as_deref().unwrap_or("nothing"));
            // With the seal's tree, say where: the image is only read.
            if let Err(JobError::Verification { why: region, .. }) = self.check_sealed_regions() {
                why = format!("{region}; {why}");
            }
            self.abandon_unseal_scatter()?;
            return Err(self.scope().verification(why));
        }
        self.commit(Phase::UnsealGather)
    }

    pub(super) fn roll_back_unseal_scatter(&mut self, source: StoreError) -> JobError {
        match self.abandon_unseal_scatter() {
            Ok(()) => JobError::RolledBack {
                action: Direction::Unseal.action(),
                image: self.image_name(),
                source,
            },
            Err(_) => self.interrupted(source),
        }
    }

    /// Drop an unseal's thin disk; the image is still sealed and untouched.
    pub(super) fn abandon_unseal_scatter(&mut self) -> Result<()> {
        self.storage
            .remove_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match self.restore.is_some() {
            true => self.put_record_back(),
            false => self.commit(Phase::Sealed),
        }
    }

    /// After a failed verification of an unseal that found the image sealed, with the
    /// sealed image in place again: the record as it was read, byte for byte.
    pub(super) fn put_record_back(&mut self) -> Result<()> {
        let Some((bytes, phase)) = self.restore.take() else {
            return Ok(());
        };
        self.rec.phase = phase;
        self.storage
            .write_record(&bytes)
            .map_err(|e| self.interrupted(e))
    }

    /// Unseal pass 3: every sector comes back from its slot, and the plaintext digest is
    /// checked. On a mismatch the sealed image is put back from the thin disk.
    pub(super) fn unseal_gather(&mut self) -> Result<()> {
        let thin = self.open_thin()?;
        self.progress.pass("gather", self.geometry.disk_bytes());
        let view = self.dense.as_ref().map(|d| d.compacted(&*self.image));
        let plain = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        // Each region of the plaintext is checked against the seal's tree as the gather
        // produces it; the image is declared unsealed only if every one matches.
        let tap = self.check_tap();
        let digest = self
            .sparse(&*thin)
            .and_then(|t| Ok((t, self.sparse(plain)?)))
            .and_then(|(t, i)| {
                let ctx = self.ctx_with(tap.as_ref());
                self.strategy.gather_plain(&ctx, &t, &i)
            })
            .and_then(|d| self.image.sync().map(|()| d))
            .and_then(|d| match &self.dense {
                Some(dn) => dense::restore_holes(&*self.image, &dn.ranges).map(|()| d),
                None => Ok(d),
            })
            .map_err(|e| self.interrupted(e))?
            .to_hex()
            .to_string();
        drop((thin, view));
        let bad_region = self.bad_region(tap);
        let digest_differs = self.rec.plain_digest.as_deref() != Some(digest.as_str());
        if bad_region.is_some() || digest_differs {
            let why = bad_region.unwrap_or_else(|| {
                format!(
                    "the unsealed data's BLAKE3 digest is {digest} but the seal record says {}",
                    self.rec.plain_digest.as_deref().unwrap_or("nothing")
                )
            });
            // Put the sealed data back from the thin disk; seal_gather checks it against
            // the seal's digest and never rewrites that digest.
            self.commit(Phase::SealGather)?;
            let put_back = match self.seal_gather() {
                Ok(()) => {
                    self.put_record_back()?;
                    "the sealed data was put back in place and matches the seal's digest"
                        .to_string()
                }
                Err(JobError::Verification { why, .. }) => why,
                Err(e) => return Err(e),
            };
            return Err(self.scope().verification(format!("{why}; {put_back}")));
        }
        self.commit(Phase::Unsealed)?;
        finish_unsealed(self.storage, &self.rec).map_err(|e| match e {
            JobError::Store { source, .. } => self.interrupted(source),
            other => other,
        })
    }
}
