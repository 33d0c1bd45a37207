//! The per-disk I/O gate (FIG. 3, 302-306 and claim 4): every front-end passes through it,
//! and a background job closes it before touching the disk.
//!
//! - `Open`: I/O flows.
//! - `Blocked`: new I/O waits; closing waits for I/O in flight to drain first.
//! - `Sealed`: the patent unblocks I/O after sealing (claim 5), so readers see only sealed
//!   bytes (`read-only`), or, stricter, every request is refused (`refuse`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// What I/O on a sealed disk gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedIo {
    ReadOnly,
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Open,
    Blocked,
    Sealed(SealedIo),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GateError {
    #[error("the disk is sealed; writes are refused until a container reclaims it")]
    SealedReadOnly,
    #[error("the disk is sealed; I/O is refused until a container reclaims it")]
    SealedRefused,
    #[error("the disk stayed blocked by a background job for {0:?}; try again later")]
    Timeout(Duration),
}

struct Inner {
    state: GateState,
    in_flight: u64,
}

pub struct Gate {
    inner: Mutex<Inner>,
    changed: Condvar,
    waits: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(GateState::Open)
    }
}

/// One I/O request in flight; the gate counts it until dropped.
pub struct GateGuard<'a> {
    gate: &'a Gate,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.in_flight -= 1;
        self.gate.changed.notify_all();
    }
}

impl Gate {
    pub fn new(state: GateState) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state,
                in_flight: 0,
            }),
            changed: Condvar::new(),
            waits: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> GateState {
        self.lock().state
    }

    /// Requests that had to wait for a blocked gate, since start.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Let one request through (waiting up to `timeout` while blocked).
    pub fn enter(&self, write: bool, timeout: Duration) -> Result<GateGuard<'_>, GateError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        let mut waited = false;
        loop {
            match g.state {
                GateState::Open => break,
                GateState::Sealed(SealedIo::ReadOnly) if !write => break,
                GateState::Sealed(SealedIo::ReadOnly) => return Err(GateError::SealedReadOnly),
                GateState::Sealed(SealedIo::Refuse) => return Err(GateError::SealedRefused),
                GateState::Blocked => {
                    if !waited {
                        waited = true;
                        self.waits.fetch_add(1, Ordering::Relaxed);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(GateError::Timeout(timeout));
                    }
                    g = self
                        .changed
                        .wait_timeout(g, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
        g.in_flight += 1;
        Ok(GateGuard { gate: self })
    }

    /// Close the gate and wait until no I/O is in flight (claim 4: block I/O).
    pub fn block(&self) {
        let mut g = self.lock();
        g.state = GateState::Blocked;
        while g.in_flight > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Set the state without draining (open, or sealed after a job).
    pub fn set(&self, state: GateState) {
        self.lock().state = state;
        self.changed.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn block_drains_in_flight_io_and_new_io_waits() {
        let gate = Arc::new(Gate::default());
        let guard = gate.enter(true, Duration::from_secs(1)).unwrap();
        let g2 = Arc::clone(&gate);
        let closer = std::thread::spawn(move || {
            g2.block();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !closer.is_finished(),
            "block returned while I/O was in flight"
        );
        let released = Instant::now();
        drop(guard);
        assert!(closer.join().unwrap() >= released);
        assert_eq!(
            gate.enter(false, Duration::from_millis(20)).err(),
            Some(GateError::Timeout(Duration::from_millis(20)))
        );
        assert_eq!(gate.waits(), 1);
        let g3 = Arc::clone(&gate);
        let waiter = std::thread::spawn(move || g3.enter(true, Duration::from_secs(5)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        gate.set(GateState::Open);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn sealed_gate_policies() {
        let g = Gate::new(GateState::Sealed(SealedIo::ReadOnly));
        assert!(g.enter(false, Duration::ZERO).is_ok());
        assert_eq!(
            g.enter(true, Duration::ZERO).err(),
            Some(GateError::SealedReadOnly)
        );
        g.set(GateState::Sealed(SealedIo::Refuse));
        assert_eq!(
            g.enter(false, Duration::ZERO).err(),
            Some(GateError::SealedRefused)
        );
    }
}
