//! The NBD export (`pdguard serve --nbd …`): one export per disk, every request through the
//! disk's I/O gate (FIG. 3), each connection in transmission an association of its disk.
//!
//! - `wire`: the protocol's bytes, pure (parse and encode; no I/O), with its fuzz target.
//! - `conn`: one connection: handshake, then requests in flight through the gate.
//! - `server`: listeners and the accept loop.
//! - `backend`: positional I/O on the disk's file.

mod backend;
pub mod conn;
pub mod server;
pub mod wire;
