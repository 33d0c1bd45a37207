//! The bounded job queue (`--jobs`): at most `limit` seals and unseals run at once; the
//! others wait their turn in the order they were asked for. Seals are served first come,
//! first served — a tick asks for them in the order their grace periods ended, so 100
//! volumes dangling at once are sealed in the order they went dangling, none starved. A
//! reclaim (an unseal: a container waits for it, and dockerd gives a Mount 120 s) goes
//! ahead of every queued seal but behind earlier unseals. A disk is queued at most once:
//! [`Service::ensure_job`](super::Service) starts no second job for a disk that has one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex};

use serde::Serialize;
use tokio::sync::oneshot;

use super::lifecycle::JobKind;
use super::{lock, now_ms};

/// A job waiting for its turn, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Queued {
    pub disk: String,
    pub job: &'static str,
    /// Unix milliseconds when it was queued.
    pub since_ms: u64,
}

/// The queue's state, for `status` and the metrics: the backlog is `queue.len()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// `--jobs`.
    pub limit: usize,
    pub running: usize,
    /// Waiting jobs, the next to start first.
    pub queue: Vec<Queued>,
    /// Jobs that ran to their end (well or not) since the daemon started.
    pub done: u64,
}

struct Waiter {
    queued: Queued,
    kind: JobKind,
    turn: oneshot::Sender<Permit>,
}

#[derive(Default)]
struct Inner {
    running: usize,
    done: u64,
    waiting: VecDeque<Waiter>,
}

/// The queue; cheap to share.
#[derive(Clone)]
pub(super) struct JobQueue {
    limit: usize,
    inner: Arc<StdMutex<Inner>>,
}

/// A running job's place; the next waiter starts when it is dropped.
pub(super) struct Permit {
    queue: Option<JobQueue>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            let mut inner = lock(&q.inner);
            inner.running -= 1;
            inner.done += 1;
            q.dispatch(&mut inner);
        }
    }
}

impl JobQueue {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            inner: Arc::default(),
        }
    }

    /// Queue a job of `disk`; the receiver gets its permit when its turn comes. Called in
    /// the order jobs are asked for: that order is kept.
    pub(super) fn enqueue(&self, disk: &str, kind: JobKind) -> oneshot::Receiver<Permit> {
        let (tx, rx) = oneshot::channel();
        let w = Waiter {
            queued: Queued {
                disk: disk.into(),
                job: kind.name(),
                since_ms: now_ms(),
            },
            kind,
            turn: tx,
        };
        let mut inner = lock(&self.inner);
        let at = match kind {
            // Behind earlier unseals, ahead of every seal (a migration is never queued).
            JobKind::Unseal | JobKind::Migrate => inner
                .waiting
                .iter()
                .position(|w| w.kind == JobKind::Seal)
                .unwrap_or(inner.waiting.len()),
            JobKind::Seal => inner.waiting.len(),
        };
        inner.waiting.insert(at, w);
        self.dispatch(&mut inner);
        rx
    }

    /// Start waiters while there is room; one whose task is gone is skipped.
    fn dispatch(&self, inner: &mut Inner) {
        while inner.running < self.limit {
            let Some(w) = inner.waiting.pop_front() else {
                return;
            };
            inner.running += 1;
            let permit = Permit {
                queue: Some(self.clone()),
            };
            if let Err(mut p) = w.turn.send(permit) {
                // Its task is gone (the runtime stops): the slot is free again.
                p.queue = None;
                inner.running -= 1;
            }
        }
    }

    pub(super) fn backlog(&self) -> Backlog {
        let inner = lock(&self.inner);
        Backlog {
            limit: self.limit,
            running: inner.running,
            queue: inner.waiting.iter().map(|w| w.queued.clone()).collect(),
            done: inner.done,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(q: &JobQueue) -> Vec<String> {
        q.backlog().queue.into_iter().map(|w| w.disk).collect()
    }

    #[tokio::test]
    async fn jobs_start_in_the_order_asked_and_never_more_than_the_limit() {
        let q = JobQueue::new(2);
        let mut rxs: Vec<_> = (0..6)
            .map(|i| q.enqueue(&format!("d{i}"), JobKind::Seal))
            .collect();
        let b = q.backlog();
        assert_eq!((b.limit, b.running, b.done), (2, 2, 0));
        assert_eq!(names(&q), ["d2", "d3", "d4", "d5"]);
        let mut held: Vec<Permit> = Vec::new();
        for rx in rxs.iter_mut().take(2) {
            held.push(rx.try_recv().unwrap());
        }
        assert!(rxs[2].try_recv().is_err(), "d2 started past the limit");
        // A reclaim goes ahead of the queued seals.
        let mut u = q.enqueue("u", JobKind::Unseal);
        assert_eq!(names(&q), ["u", "d2", "d3", "d4", "d5"]);
        drop(held.remove(0));
        let up = u.try_recv().unwrap();
        assert!(rxs[2].try_recv().is_err());
        drop(up);
        held.push(rxs[2].try_recv().unwrap());
        // A waiter whose task is gone is skipped, its slot given to the next.
        drop(rxs.remove(3));
        drop(held.remove(0));
        assert_eq!(q.backlog().running, 2);
        assert_eq!(names(&q), ["d5"]);
        let d4 = rxs[3].try_recv().expect("d4 was skipped");
        assert_eq!(q.backlog().done, 3);
        drop(d4);
        assert_eq!((q.backlog().done, q.backlog().running), (4, 2));
    }
}
