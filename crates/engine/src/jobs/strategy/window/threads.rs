//! The helper threads of a pass: starting, joining, stopping, and buffer pools.

use super::*;

/// Why the calling thread of a pass stopped before the end.
pub(super) enum Stop {
    /// Its own I/O failed.
    Io(StoreError),
    /// A helper thread quit; the helper's own result says why.
    Peer,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Self::Io(e)
    }
}

pub(super) type Step<T = ()> = std::result::Result<T, Stop>;

pub(super) fn internal(why: &str) -> StoreError {
    StoreError::io(
        "move",
        "sectors with the window strategy",
        std::io::Error::other(format!("internal error: {why}")),
    )
}

/// Start a helper thread named `name` (seen in `top -H` and `perf`).
pub(super) fn spawn<'s, T: Send + 's>(
    sc: &'s Scope<'s, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 's,
) -> ScopedJoinHandle<'s, T> {
    thread::Builder::new()
        .name(name.into())
        .spawn_scoped(sc, f)
        .unwrap_or_else(|e| panic!("cannot start a thread: {e}"))
}

/// A helper's result; a panic in it is a panic of the pass.
pub(super) fn joined<T>(h: ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The calling thread's own error first (a helper may have failed only because it left);
/// else the first helper's error; else success.
pub(super) fn settle<const K: usize>(main: Step, helpers: [Result<()>; K]) -> Result<()> {
    match main {
        Err(Stop::Io(e)) => Err(e),
        other => {
            for h in helpers {
                h?;
            }
            match other {
                Ok(()) => Ok(()),
                Err(_) => Err(internal("a helper thread stopped early without an error")),
            }
        }
    }
}

/// A buffer of `cap` bytes: a returned one, a new one while fewer than `limit` exist, or the
/// next one returned.
pub(super) fn spare(
    pool: &Receiver<Vec<u8>>,
    made: &mut usize,
    limit: usize,
    cap: usize,
) -> Step<Vec<u8>> {
    if let Ok(b) = pool.try_recv() {
        return Ok(b);
    }
    if *made < limit {
        *made += 1;
        return Ok(Vec::with_capacity(cap));
    }
    pool.recv().map_err(|_| Stop::Peer)
}

/// The [hashing thread](hash_regions) of a plain pass when it feeds a region tree, and the
/// channel to it.
pub(super) fn hash_thread<'s, 'a: 's>(
    sc: &'s Scope<'s, '_>,
    half: Option<RegionHalf<'a>>,
) -> (
    Option<SyncSender<ToHash>>,
    Option<ScopedJoinHandle<'s, Result<()>>>,
) {
    let Some(half) = half else {
        return (None, None);
    };
    let (tx, rx) = sync_channel(HASH_DEPTH);
    let h = spawn(sc, "pdguard-hash", move || hash_regions(half, rx));
    (Some(tx), Some(h))
}

pub(super) fn joined_hash(h: Option<ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    h.map_or(Ok(()), joined)
}
