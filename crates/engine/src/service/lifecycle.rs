//! A disk's life cycle as one pure transition function (after Cloud Hypervisor's
//! `VmState::valid_transition`): [`Life`] is the state with the data that belongs to it,
//! [`Event`] what happened, and [`next`] the only place that decides where a disk goes.
//! [`super::Service::apply`] is the only caller that writes the result: it persists it,
//! sets the I/O gate and starts the background job a `sealing`, `unsealing` or `migrating`
//! disk needs.
//!
//! The registry keeps its flat form (`state`, `dangling`, `grace_until_ms`, `error`, as
//! before); [`Life::of`] and [`Life::store`] convert, so the on-disk format is unchanged.

use thiserror::Error;

use crate::registry::{Disk, DiskState};

/// How long the tick waits before it looks again at a disk the kernel still holds.
pub const KERNEL_RETRY_MS: u64 = 1000;

/// Where a disk is in its life cycle, with the data of that place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// Never attached (or unsealed by hand with no container).
    Available,
    /// At least one operational container uses it.
    Attached,
    /// No operational container any more; sealed at `until_ms` (unix milliseconds).
    Grace {
        until_ms: u64,
    },
    /// A seal job runs; `dangling`: the patent's flag turned TRUE (claim 6), not a seal by hand.
    Sealing {
        dangling: bool,
    },
    Sealed {
        dangling: bool,
    },
    /// An unseal job runs. `reclaim`: a container asked for the disk (not `disk unseal`), so
    /// if no operational container holds it when the job ends — its client gave up — its
    /// grace period starts again instead of leaving it unsealed for good.
    Unsealing {
        reclaim: bool,
    },
    /// An instant reclaim (`docs/instant-reclaim.md`): the disk is served through its
    /// migration while the migration unseals it in the background. Only a reclaim starts
    /// one, so when it ends a disk no operational container holds enters its grace period
    /// (its client gave up), as for `Unsealing { reclaim: true }`.
    Migrating,
    /// A job failed; the seal record still says where the data is.
    Failed {
        error: String,
        dangling: bool,
    },
}

/// What happened to a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An operational container wants the disk (`container up`, a Mount, an NBD `OPT_GO`):
    /// the patent's reclaim ([030]).
    Claimed,
    /// The same, by a front-end that serves the disk through its migration (NBD), for a
    /// disk whose seal record allows an instant reclaim (or is in phase `migrating`): a
    /// sealed or failed disk is `migrating` at once instead of `unsealing`.
    ClaimedInstant,
    /// At start: the seal record is in phase `migrating` (a daemon stopped mid-migration):
    /// the migration resumes, whoever holds the disk.
    ResumeMigration,
    /// The last operational container went away at `now_ms`.
    Released { now_ms: u64, grace_ms: u64 },
    /// The tick found the grace period over.
    GraceOver {
        now_ms: u64,
        in_use: bool,
        kernel_holds: bool,
    },
    /// `disk seal`.
    SealNow,
    /// `disk unseal`.
    UnsealNow,
    /// The running job ended well.
    JobDone {
        now_ms: u64,
        grace_ms: u64,
        in_use: bool,
    },
    /// The running job failed.
    JobFailed { error: String },
    /// At start: a failed disk whose record shows a job half done (or a dangling disk never
    /// sealed) is tried again.
    Retry { seal: bool },
    /// At start: the seal record of a sealed disk is gone.
    RecordLost { why: String },
    /// The disk cannot be used as it is (a mountpoint planted by someone else): `failed`
    /// with the reason, until a later reclaim finds it fixed.
    Refused { why: String },
    /// A disk the registry holds as plaintext has a seal record beside it (a file sealed
    /// offline, then adopted, or sealed offline while the daemon held it unused): its data
    /// is sealed, and only an unseal that verifies it may serve it.
    RecordFound,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LifeError {
    #[error("is already sealed")]
    AlreadySealed,
    #[error("is {0}; wait for its job to finish")]
    JobRunning(&'static str),
    #[error("is {0}, not sealed")]
    NotSealed(&'static str),
    #[error("cannot start a grace period of {} at {now_ms}: it would end past the end of time; give a grace period of at most {}", crate::units::millis(*grace_ms), crate::units::millis(MAX_GRACE_MS))]
    GraceOverflow { now_ms: u64, grace_ms: u64 },
    #[error("is {state}, where event {event} does not apply")]
    Invalid {
        state: &'static str,
        event: &'static str,
    },
}

/// The longest grace period anywhere (a volume's `-o grace`, `serve --grace`): 10 years.
pub const MAX_GRACE_MS: u64 = 10 * 365 * 24 * 3_600_000;

impl Life {
    /// The disk's life as the registry holds it. Entries written by older versions read as
    /// before: a grace without its end ends now, a failure without its text says so, and an
    /// unseal in flight counts as a reclaim (the safe side: it is sealed again if nobody
    /// holds the disk when it ends).
    pub fn of(d: &Disk) -> Self {
        match d.state {
            DiskState::Available => Self::Available,
            DiskState::Attached => Self::Attached,
            DiskState::Grace => Self::Grace {
                until_ms: d.grace_until_ms.unwrap_or(0),
            },
            DiskState::Sealing => Self::Sealing {
                dangling: d.dangling,
            },
            DiskState::Sealed => Self::Sealed {
                dangling: d.dangling,
            },
            DiskState::Unsealing => Self::Unsealing { reclaim: true },
            DiskState::Migrating => Self::Migrating,
            DiskState::Failed => Self::Failed {
                error: d
                    .error
                    .clone()
                    .unwrap_or_else(|| "a job failed (no reason recorded)".into()),
                dangling: d.dangling,
            },
        }
    }

    /// Write this life into the registry's flat fields of `d`.
    pub fn store(&self, d: &mut Disk) {
        d.state = self.state();
        d.grace_until_ms = match self {
            Self::Grace { until_ms } => Some(*until_ms),
            _ => None,
        };
        d.error = match self {
            Self::Failed { error, .. } => Some(error.clone()),
            _ => None,
        };
        d.dangling = self.dangling();
    }

    /// The flat state, as the API and the metrics name it.
    pub fn state(&self) -> DiskState {
        match self {
            Self::Available => DiskState::Available,
            Self::Attached => DiskState::Attached,
            Self::Grace { .. } => DiskState::Grace,
            Self::Sealing { .. } => DiskState::Sealing,
            Self::Sealed { .. } => DiskState::Sealed,
            Self::Unsealing { .. } => DiskState::Unsealing,
            Self::Migrating => DiskState::Migrating,
            Self::Failed { .. } => DiskState::Failed,
        }
    }

    /// The patent's dangling flag: TRUE from the grace's end until a reclaim.
    pub fn dangling(&self) -> bool {
        match self {
            Self::Sealing { dangling } | Self::Sealed { dangling } => *dangling,
            Self::Failed { dangling, .. } => *dangling,
            _ => false,
        }
    }

    /// The job a disk in this state needs running, if any.
    pub fn job(&self) -> Option<JobKind> {
        match self {
            Self::Sealing { .. } => Some(JobKind::Seal),
            Self::Unsealing { .. } => Some(JobKind::Unseal),
            Self::Migrating => Some(JobKind::Migrate),
            _ => None,
        }
    }
}

/// A background job of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Seal,
    Unseal,
    /// The migration of an instant reclaim: started at once (never queued), served while
    /// it runs.
    Migrate,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Seal => "seal",
            Self::Unseal => "unseal",
            Self::Migrate => "migrate",
        }
    }
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Claimed => "claimed",
        Event::ClaimedInstant => "claimed-instant",
        Event::ResumeMigration => "resume-migration",
        Event::Released { .. } => "released",
        Event::GraceOver { .. } => "grace-over",
        Event::SealNow => "seal-now",
        Event::UnsealNow => "unseal-now",
        Event::JobDone { .. } => "job-done",
        Event::JobFailed { .. } => "job-failed",
        Event::Retry { .. } => "retry",
        Event::RecordLost { .. } => "record-lost",
        Event::Refused { .. } => "refused",
        Event::RecordFound => "record-found",
    }
}

/// The end of a grace period that starts at `now_ms`, checked.
pub fn grace_end(now_ms: u64, grace_ms: u64) -> Result<u64, LifeError> {
    now_ms
        .checked_add(grace_ms)
        .filter(|_| grace_ms <= MAX_GRACE_MS)
        .ok_or(LifeError::GraceOverflow { now_ms, grace_ms })
}

/// Where `event` takes a disk that is `life`. Pure: no I/O, no clock.
pub fn next(life: &Life, event: &Event) -> Result<Life, LifeError> {
    use Life as L;
    let invalid = || LifeError::Invalid {
        state: life.state().name(),
        event: event_name(event),
    };
    Ok(match (life, event) {
        // A reclaim: usable at once, or after the seal in flight ends and an unseal.
        (L::Available | L::Attached | L::Grace { .. }, Event::Claimed) => L::Attached,
        (L::Sealed { .. } | L::Failed { .. }, Event::Claimed) => L::Unsealing { reclaim: true },
        (L::Sealing { .. }, Event::Claimed) => L::Sealing { dangling: false },
        (L::Unsealing { .. }, Event::Claimed) => L::Unsealing { reclaim: true },
        // A migration serves the disk already (a copy reclaim waits for its end).
        (L::Migrating, Event::Claimed | Event::ClaimedInstant) => L::Migrating,
        // An instant reclaim: served at once, through the migration.
        (L::Available | L::Attached | L::Grace { .. }, Event::ClaimedInstant) => L::Attached,
        (L::Sealed { .. } | L::Failed { .. }, Event::ClaimedInstant) => L::Migrating,
        (L::Sealing { .. }, Event::ClaimedInstant) => L::Sealing { dangling: false },
        // A copy unseal in flight is waited for.
        (L::Unsealing { .. }, Event::ClaimedInstant) => L::Unsealing { reclaim: true },

        (L::Sealed { .. } | L::Failed { .. } | L::Migrating, Event::ResumeMigration) => {
            L::Migrating
        }
        (_, Event::ResumeMigration) => return Err(invalid()),

        (L::Attached, Event::Released { now_ms, grace_ms }) => L::Grace {
            until_ms: grace_end(*now_ms, *grace_ms)?,
        },
        // Nothing was attached: a release changes nothing (a job that ends looks again).
        (_, Event::Released { .. }) => life.clone(),

        (
            L::Grace { .. },
            Event::GraceOver {
                now_ms,
                in_use,
                kernel_holds,
            },
        ) => match (in_use, kernel_holds) {
            (true, _) => L::Attached,
            // Never seal what the kernel holds; look again later.
            (false, true) => L::Grace {
                until_ms: now_ms.saturating_add(KERNEL_RETRY_MS),
            },
            (false, false) => L::Sealing { dangling: true },
        },
        (_, Event::GraceOver { .. }) => return Err(invalid()),

        (L::Sealed { .. }, Event::SealNow) => return Err(LifeError::AlreadySealed),
        (L::Sealing { .. } | L::Unsealing { .. } | L::Migrating, Event::SealNow) => {
            return Err(LifeError::JobRunning(life.state().name()))
        }
        (_, Event::SealNow) => L::Sealing {
            dangling: life.dangling(),
        },

        (L::Sealed { .. } | L::Failed { .. }, Event::UnsealNow) => L::Unsealing { reclaim: false },
        (_, Event::UnsealNow) => return Err(LifeError::NotSealed(life.state().name())),

        (L::Sealing { dangling }, Event::JobDone { .. }) => L::Sealed {
            dangling: *dangling,
        },
        (L::Unsealing { .. }, Event::JobDone { in_use: true, .. }) => L::Attached,
        (
            L::Unsealing { reclaim: true },
            Event::JobDone {
                now_ms, grace_ms, ..
            },
        ) => L::Grace {
            until_ms: grace_end(*now_ms, *grace_ms)?,
        },
        (L::Unsealing { reclaim: false }, Event::JobDone { .. }) => L::Available,
        (L::Migrating, Event::JobDone { in_use: true, .. }) => L::Attached,
        (
            L::Migrating,
            Event::JobDone {
                now_ms, grace_ms, ..
            },
        ) => L::Grace {
            until_ms: grace_end(*now_ms, *grace_ms)?,
        },
        (_, Event::JobDone { .. }) => return Err(invalid()),

        (L::Sealing { dangling }, Event::JobFailed { error }) => L::Failed {
            error: error.clone(),
            dangling: *dangling,
        },
        (L::Unsealing { .. } | L::Migrating, Event::JobFailed { error }) => L::Failed {
            error: error.clone(),
            dangling: false,
        },
        (_, Event::JobFailed { .. }) => return Err(invalid()),

        (L::Failed { dangling, .. }, Event::Retry { seal: true }) => L::Sealing {
            dangling: *dangling,
        },
        (L::Failed { .. }, Event::Retry { seal: false }) => L::Unsealing { reclaim: true },
        (_, Event::Retry { .. }) => return Err(invalid()),

        (L::Sealed { dangling }, Event::RecordLost { why }) => L::Failed {
            error: why.clone(),
            dangling: *dangling,
        },
        (_, Event::RecordLost { .. }) => return Err(invalid()),

        (L::Sealing { .. } | L::Unsealing { .. } | L::Migrating, Event::Refused { .. }) => {
            return Err(LifeError::JobRunning(life.state().name()))
        }
        (_, Event::Refused { why }) => L::Failed {
            error: why.clone(),
            dangling: life.dangling(),
        },

        (L::Available | L::Attached | L::Grace { .. }, Event::RecordFound) => {
            L::Sealed { dangling: false }
        }
        // Sealed data is what these states expect: nothing changes.
        (L::Sealed { .. } | L::Failed { .. }, Event::RecordFound) => life.clone(),
        (L::Sealing { .. } | L::Unsealing { .. } | L::Migrating, Event::RecordFound) => {
            return Err(LifeError::JobRunning(life.state().name()))
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use Life as L;

    fn failed() -> Life {
        L::Failed {
            error: "boom".into(),
            dangling: true,
        }
    }

    fn done(in_use: bool) -> Event {
        Event::JobDone {
            now_ms: 1000,
            grace_ms: 500,
            in_use,
        }
    }

    fn over(in_use: bool, kernel_holds: bool) -> Event {
        Event::GraceOver {
            now_ms: 2000,
            in_use,
            kernel_holds,
        }
    }

    /// Every state against every event: the whole life cycle in one table. `None`: refused.
    #[test]
    fn the_transition_table() {
        let states = [
            L::Available,
            L::Attached,
            L::Grace { until_ms: 9 },
            L::Sealing { dangling: true },
            L::Sealed { dangling: true },
            L::Unsealing { reclaim: true },
            L::Unsealing { reclaim: false },
            failed(),
            L::Migrating,
        ];
        let released = Event::Released {
            now_ms: 1000,
            grace_ms: 30,
        };
        let grace = |until_ms| Some(L::Grace { until_ms });
        let rf = |dangling| L::Failed {
            error: "r".into(),
            dangling,
        };
        let ur = Some(L::Unsealing { reclaim: true });
        let mig = Some(L::Migrating);
        #[rustfmt::skip]
        let table: Vec<(Event, [Option<Life>; 9])> = vec![
            //                 available       attached        grace            sealing                              sealed                              unsealing(reclaim)  unsealing(by hand)  failed  migrating
            (Event::Claimed,  [Some(L::Attached), Some(L::Attached), Some(L::Attached), Some(L::Sealing { dangling: false }), ur.clone(), ur.clone(), ur.clone(), ur.clone(), mig.clone()]),
            (Event::ClaimedInstant, [Some(L::Attached), Some(L::Attached), Some(L::Attached), Some(L::Sealing { dangling: false }), mig.clone(), ur.clone(), ur.clone(), mig.clone(), mig.clone()]),
            (Event::ResumeMigration, [None, None, None, None, mig.clone(), None, None, mig.clone(), mig.clone()]),
            (released.clone(), [Some(L::Available), grace(1030), grace(9), Some(L::Sealing { dangling: true }), Some(L::Sealed { dangling: true }), ur.clone(), Some(L::Unsealing { reclaim: false }), Some(failed()), mig.clone()]),
            (over(false, false), [None, None, Some(L::Sealing { dangling: true }), None, None, None, None, None, None]),
            (over(true, false), [None, None, Some(L::Attached), None, None, None, None, None, None]),
            (over(false, true), [None, None, grace(3000), None, None, None, None, None, None]),
            (Event::SealNow,  [Some(L::Sealing { dangling: false }), Some(L::Sealing { dangling: false }), Some(L::Sealing { dangling: false }), None, None, None, None, Some(L::Sealing { dangling: true }), None]),
            (Event::UnsealNow, [None, None, None, None, Some(L::Unsealing { reclaim: false }), None, None, Some(L::Unsealing { reclaim: false }), None]),
            (done(false),     [None, None, None, Some(L::Sealed { dangling: true }), None, grace(1500), Some(L::Available), None, grace(1500)]),
            (done(true),      [None, None, None, Some(L::Sealed { dangling: true }), None, Some(L::Attached), Some(L::Attached), None, Some(L::Attached)]),
            (Event::JobFailed { error: "e".into() }, [None, None, None, Some(L::Failed { error: "e".into(), dangling: true }), None, Some(L::Failed { error: "e".into(), dangling: false }), Some(L::Failed { error: "e".into(), dangling: false }), None, Some(L::Failed { error: "e".into(), dangling: false })]),
            (Event::Retry { seal: true }, [None, None, None, None, None, None, None, Some(L::Sealing { dangling: true }), None]),
            (Event::Retry { seal: false }, [None, None, None, None, None, None, None, ur.clone(), None]),
            (Event::RecordLost { why: "gone".into() }, [None, None, None, None, Some(L::Failed { error: "gone".into(), dangling: true }), None, None, None, None]),
            (Event::Refused { why: "r".into() }, [Some(rf(false)), Some(rf(false)), Some(rf(false)), None, Some(rf(true)), None, None, Some(rf(true)), None]),
            (Event::RecordFound, [Some(L::Sealed { dangling: false }), Some(L::Sealed { dangling: false }), Some(L::Sealed { dangling: false }), None, Some(L::Sealed { dangling: true }), None, None, Some(failed()), None]),
        ];
        for (event, row) in &table {
            for (state, want) in states.iter().zip(row) {
                let got = next(state, event).ok();
                assert_eq!(&got, want, "{state:?} + {event:?}");
            }
        }
    }

    /// The registry's flat form of a migrating disk is a state name of its own, and an
    /// entry written before it existed still reads as before.
    #[test]
    fn a_migrating_disk_is_stored_as_migrating() {
        let mut d: Disk = serde_json::from_str(
            r#"{"name":"d","id":"00","path":"/x","size":4096,"sector_size":512,
                "state":"migrating","dangling":false,"managed":true,"created_unix":0}"#,
        )
        .unwrap();
        assert_eq!(Life::of(&d), L::Migrating);
        assert_eq!(L::Migrating.job(), Some(JobKind::Migrate));
        L::Migrating.store(&mut d);
        assert_eq!(serde_json::to_value(&d).unwrap()["state"], "migrating");
        // A migration ends like a reclaim's unseal: held → attached, gone → grace.
        assert_eq!(next(&L::Migrating, &done(true)), Ok(L::Attached));
        assert_eq!(
            next(&L::Migrating, &done(false)),
            Ok(L::Grace { until_ms: 1500 })
        );
    }

    #[test]
    fn a_grace_past_the_end_of_time_is_refused() {
        let e = next(
            &L::Attached,
            &Event::Released {
                now_ms: 1_700_000_000_000,
                grace_ms: u64::MAX,
            },
        )
        .unwrap_err();
        assert!(matches!(e, LifeError::GraceOverflow { .. }), "{e}");
        assert!(grace_end(u64::MAX - 1, 5).is_err());
        assert!(grace_end(0, MAX_GRACE_MS + 1).is_err());
        assert_eq!(grace_end(5, MAX_GRACE_MS), Ok(5 + MAX_GRACE_MS));
    }

    /// Every life survives the registry's flat form (the on-disk format is the old one).
    #[test]
    fn the_flat_form_round_trips() {
        // From JSON, as the registry reads it (fields added later take their defaults).
        let mut d: Disk = serde_json::from_str(
            r#"{"name":"d","id":"00","path":"/x","size":4096,"sector_size":512,
                "state":"available","dangling":false,"managed":true,"created_unix":0}"#,
        )
        .unwrap();
        for l in [
            L::Available,
            L::Attached,
            L::Grace { until_ms: 77 },
            L::Sealing { dangling: true },
            L::Sealing { dangling: false },
            L::Sealed { dangling: true },
            L::Unsealing { reclaim: true },
            L::Migrating,
            failed(),
        ] {
            l.store(&mut d);
            assert_eq!(Life::of(&d), l);
        }
    }
}
