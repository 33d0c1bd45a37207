//! The sending side of a connection in transmission: replies go out whole and in the order
//! they were handed over, and **no worker sleeps waiting to send**. The worker that finds
//! the socket free writes its reply; one that finds it busy appends its reply to a queue
//! and goes back to work; the writer sends what was queued before it lets go ("flat
//! combining"). Under load several replies leave in one write(2) (one TLS write of a few
//! records), instead of each worker waking in turn to make its own.
//!
//! A reply larger than [`QUEUE_AT_MOST`], or one that would make the queue pass
//! [`QUEUE_BYTES`], is not queued: its worker waits for the socket (as does a streamed
//! READ, which holds it for all its pieces, [`Sender::exclusive`]).

use std::io::{self, Write};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::connection::StdSock;

/// Largest reply copied into the queue; a longer one waits for the socket.
pub const QUEUE_AT_MOST: usize = 256 << 10;
/// Most bytes queued at once: a reply that would pass it waits for the socket, keeping its
/// request's budget, so a client that stops reading replies stops the reader (the
/// connection's memory stays its budget plus twice this).
pub const QUEUE_BYTES: usize = 4 << 20;

pub struct Sender {
    state: Mutex<State>,
    /// Signalled when the socket is let go.
    free: Condvar,
    /// Touched only by the one writer (`State::busy`): the lock is never contended.
    sock: Mutex<StdSock>,
}

#[derive(Default)]
struct State {
    /// A writer holds the socket; replies handed over meanwhile are queued.
    busy: bool,
    /// Whole replies, in order, for the writer to send before it lets go.
    queue: Vec<u8>,
    /// Someone waits for `busy` to clear.
    waiting: usize,
    /// Writing failed: the client is gone, later replies are dropped with this error.
    failed: Option<io::ErrorKind>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sender {
    pub fn new(sock: StdSock) -> Self {
        Self {
            state: Mutex::default(),
            free: Condvar::new(),
            sock: Mutex::new(sock),
        }
    }

    /// Send one whole reply (now, or queued behind the writer's).
    pub fn send(&self, reply: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.state);
        if let Some(k) = st.failed {
            return Err(k.into());
        }
        if st.busy && reply.len() <= QUEUE_AT_MOST && st.queue.len() + reply.len() <= QUEUE_BYTES {
            st.queue.extend_from_slice(reply);
            return Ok(());
        }
        st = self.claim(st);
        drop(st);
        let r = lock(&self.sock).write_all(reply);
        self.release(r)
    }

    /// The socket to itself, for a reply written in pieces (a streamed READ); replies
    /// handed over meanwhile go out after it.
    pub fn exclusive(&self) -> io::Result<Exclusive<'_>> {
        let st = lock(&self.state);
        if let Some(k) = st.failed {
            return Err(k.into());
        }
        drop(self.claim(st));
        Ok(Exclusive {
            sender: self,
            failed: None,
        })
    }

    /// Wait until the socket is free, and take it.
    fn claim<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while st.busy {
            st.waiting += 1;
            st = self.free.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
        st.busy = true;
        st
    }

    /// After the writer's own bytes (`r`): send what was queued meanwhile, until nothing
    /// is, then let the socket go.
    fn release(&self, mut r: io::Result<()>) -> io::Result<()> {
        let mut batch = Vec::new();
        loop {
            let mut st = lock(&self.state);
            if let Err(e) = &r {
                st.failed.get_or_insert(e.kind());
                st.queue = Vec::new();
            }
            if st.queue.is_empty() {
                st.busy = false;
                if st.waiting > 0 {
                    self.free.notify_all();
                }
                return r;
            }
            std::mem::swap(&mut st.queue, &mut batch);
            drop(st);
            r = lock(&self.sock).write_all(&batch);
            batch.clear();
        }
    }
}

/// The socket held by one writer ([`Sender::exclusive`]); let go (and the queue sent) when
/// dropped.
pub struct Exclusive<'a> {
    sender: &'a Sender,
    failed: Option<io::ErrorKind>,
}

impl Exclusive<'_> {
    pub fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        let r = lock(&self.sender.sock).write_all(b);
        if let Err(e) = &r {
            self.failed.get_or_insert(e.kind());
        }
        r
    }

    /// Close the connection in both directions (a reply cut short cannot be continued).
    pub fn shutdown(&mut self) {
        lock(&self.sender.sock).shutdown(std::net::Shutdown::Both);
        self.failed.get_or_insert(io::ErrorKind::BrokenPipe);
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let r = match self.failed {
            Some(k) => Err(k.into()),
            None => Ok(()),
        };
        let _ = self.sender.release(r);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use super::super::connection::Plain;

    /// Many threads send numbered replies of many sizes at once: every reply arrives
    /// whole (never interleaved with another), each exactly once.
    #[test]
    fn replies_arrive_whole_and_once_under_contention() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // A reply left in the queue would leave the reader waiting: fail instead.
        b.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let s = Arc::new(Sender::new(StdSock::Plain(Plain::Unix(a))));
        const THREADS: u32 = 8;
        const EACH: u32 = 200;
        let reply = |t: u32, i: u32| -> Vec<u8> {
            // A length header, then the id repeated: a torn reply would be seen.
            let len = 8 + ((t * 7919 + i * 104_729) % 70_000) as usize;
            let mut v = Vec::with_capacity(len + 4);
            v.extend_from_slice(&(len as u32).to_be_bytes());
            let id = (t << 16 | i).to_be_bytes();
            v.extend((0..len).map(|k| id[k % 4]));
            v
        };
        let big = (QUEUE_AT_MOST + 4096) as u32;
        let mut hs = Vec::new();
        for t in 0..THREADS {
            let s = Arc::clone(&s);
            hs.push(std::thread::spawn(move || {
                for i in 0..EACH {
                    if i % 50 == 7 {
                        // Now and then a reply too large to queue, or a streamed one.
                        let mut v = big.to_be_bytes().to_vec();
                        let id = (t << 16 | i).to_be_bytes();
                        v.extend((0..big as usize).map(|k| id[k % 4]));
                        if t % 2 == 0 {
                            s.send(&v).unwrap();
                        } else {
                            let mut x = s.exclusive().unwrap();
                            for piece in v.chunks(10_000) {
                                x.write_all(piece).unwrap();
                            }
                        }
                    } else {
                        s.send(&reply(t, i)).unwrap();
                    }
                }
            }));
        }
        let reader = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..THREADS * EACH {
                let mut h = [0u8; 4];
                b.read_exact(&mut h).unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(h) as usize];
                b.read_exact(&mut body).unwrap();
                let id: [u8; 4] = body[..4].try_into().unwrap();
                assert!(
                    body.chunks(4).all(|c| c == &id[..c.len()]),
                    "a reply was interleaved with another"
                );
                assert!(seen.insert(u32::from_be_bytes(id)), "a reply came twice");
            }
            seen.len()
        });
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(reader.join().unwrap(), (THREADS * EACH) as usize);
        assert!(!lock(&s.state).busy);
    }

    /// A client that reads no reply: the queue stops at its bound and the next sender
    /// waits (holding its request's budget), so memory does not grow with the replies.
    #[test]
    fn the_queue_is_bounded_when_the_client_reads_nothing() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let s = Arc::new(Sender::new(StdSock::Plain(Plain::Unix(a))));
        // One worker's large reply fills the socket: it stays the writer, stuck.
        let s1 = Arc::clone(&s);
        std::thread::spawn(move || s1.send(&vec![7u8; 4 << 20]).unwrap());
        while !lock(&s.state).busy {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Another worker's 400 replies of 64 KiB (25 MiB) cannot all be handed over.
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = Arc::clone(&s);
        std::thread::spawn(move || {
            for _ in 0..400 {
                s2.send(&[7u8; 64 << 10]).unwrap();
                tx.send(()).unwrap();
            }
        });
        let mut sent = 0;
        while rx
            .recv_timeout(std::time::Duration::from_millis(500))
            .is_ok()
        {
            sent += 1;
        }
        assert!(sent < 400, "every reply was taken while nobody read");
        assert!(lock(&s.state).queue.len() <= QUEUE_BYTES);
        // Reading lets every reply through.
        let mut all = vec![0u8; (4 << 20) + 400 * (64 << 10)];
        b.read_exact(&mut all).unwrap();
        assert!(all.iter().all(|&x| x == 7));
    }

    /// A failed write fails that reply and every later one, at once, never blocking.
    #[test]
    fn a_gone_client_fails_later_replies_at_once() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let s = Sender::new(StdSock::Plain(Plain::Unix(a)));
        assert!(s.send(b"hello").is_err());
        assert!(s.send(b"again").is_err());
        assert!(s.exclusive().is_err());
    }
}
