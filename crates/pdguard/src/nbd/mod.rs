//! The NBD export (`pdguard serve --nbd …`): one export per disk, every request through the
//! disk's I/O gate (FIG. 3), each connection in transmission an association of its disk.
//! The rooms follow a request's path (after mini-redis):
//!
//! - `server`: listeners, the connection limit, the shutdown signal, one task per connection.
//! - `connection`: the socket and its inbox, read one frame at a time.
//! - `handshake`: option haggling, one method per option of a `Negotiation`.
//! - `tls`: `NBD_OPT_STARTTLS`: X.509 or PSK credentials, the TLS session.
//! - `transmit`: the worker threads, the memory budget, each request through the gate.
//! - `sender`: replies out whole and in order; a busy socket queues them (no worker waits).
//! - `wire`: the protocol's bytes, pure (parse and encode; no I/O), with its fuzz target.
//! - `backend`: positional I/O on the disk's file.

mod backend;
pub mod connection;
pub mod handshake;
mod sender;
pub mod server;
pub mod tls;
pub mod transmit;
pub mod wire;
