//! The per-disk I/O gate (FIG. 3, 302-306 and claim 4): every front-end passes through it,
//! and a background job closes it before touching the disk.
//!
//! - `Open`: I/O flows.
//! - `Blocked`: new I/O waits; closing waits for I/O in flight to drain first.
//! - `Sealed`: the patent unblocks I/O after sealing (claim 5), so readers see only sealed
//!   bytes (`read-only`), or, stricter, every request is refused (`refuse`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::watch;

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
    /// Bumped on every state change, for async waiters (the NBD server) that must not
    /// park a thread while the gate is blocked.
    version: watch::Sender<u64>,
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

/// One I/O request in flight that owns a handle on its gate (async front-ends move it
/// into the blocking task that does the I/O); the gate counts it until dropped.
pub struct OwnedGateGuard {
    gate: Arc<Gate>,
}

impl Drop for OwnedGateGuard {
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
            version: watch::channel(0).0,
        }
    }

    /// Let one request through without blocking a thread: FIG. 3 for an async front-end.
    /// `Open` admits it; `Blocked` holds it until the gate changes, at most `hold`, then
    /// `Timeout`; `Sealed` admits reads or refuses, per policy.
    pub async fn enter_async(
        self: &Arc<Self>,
        write: bool,
        hold: Duration,
    ) -> Result<OwnedGateGuard, GateError> {
        let deadline = tokio::time::Instant::now() + hold;
        let mut waited = false;
        loop {
            // Subscribe before looking, so that a change in between wakes us.
            let mut changes = self.version.subscribe();
            {
                let mut g = self.lock();
                match g.state {
                    GateState::Blocked => {}
                    GateState::Sealed(SealedIo::ReadOnly) if write => {
                        return Err(GateError::SealedReadOnly)
                    }
                    GateState::Sealed(SealedIo::Refuse) => return Err(GateError::SealedRefused),
                    GateState::Open | GateState::Sealed(SealedIo::ReadOnly) => {
                        g.in_flight += 1;
                        return Ok(OwnedGateGuard {
                            gate: Arc::clone(self),
                        });
                    }
                }
            }
            if !waited {
                waited = true;
                self.waits.fetch_add(1, Ordering::Relaxed);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(GateError::Timeout(hold));
            }
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
        self.version.send_modify(|v| *v += 1);
        while g.in_flight > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Set the state without draining (open, or sealed after a job).
    pub fn set(&self, state: GateState) {
        self.lock().state = state;
        self.changed.notify_all();
        self.version.send_modify(|v| *v += 1);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_entry_is_held_while_blocked_and_counted_while_in_flight() {
        let gate = Arc::new(Gate::new(GateState::Blocked));
        let t = std::time::Instant::now();
        let r = gate.enter_async(true, Duration::from_millis(50)).await;
        assert_eq!(r.err(), Some(GateError::Timeout(Duration::from_millis(50))));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // A held request enters when the gate opens.
        let g2 = Arc::clone(&gate);
        let waiter =
            tokio::spawn(async move { g2.enter_async(true, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "entered a blocked gate");
        gate.set(GateState::Open);
        let guard = waiter.await.unwrap().unwrap();
        // block() drains it: it returns only after the guard is dropped.
        let g3 = Arc::clone(&gate);
        let closer = std::thread::spawn(move || g3.block());
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !closer.is_finished(),
            "block returned with a request in flight"
        );
        drop(guard);
        closer.join().unwrap();
        // Sealed: reads per policy, writes refused; a held write meets the sealed gate.
        let g4 = Arc::clone(&gate);
        let held = tokio::spawn(async move { g4.enter_async(true, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        gate.set(GateState::Sealed(SealedIo::ReadOnly));
        assert_eq!(held.await.unwrap().err(), Some(GateError::SealedReadOnly));
        assert!(gate.enter_async(false, Duration::ZERO).await.is_ok());
        gate.set(GateState::Sealed(SealedIo::Refuse));
        assert_eq!(
            gate.enter_async(false, Duration::ZERO).await.err(),
            Some(GateError::SealedRefused)
        );
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
