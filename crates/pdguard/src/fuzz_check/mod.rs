//! The reference checks of the fuzz targets (`fuzz/fuzz_targets/`), shared with the
//! corpus replay test (`tests/fuzz_corpus.rs`), so that every input libFuzzer kept is
//! checked again by a plain `cargo test` on stable.
//!
//! Each check takes arbitrary bytes, feeds them to one parser and compares what it parsed
//! with an independent reference: an encoder (parse ∘ encode = id), a slow reference
//! implementation written from the documented grammar, or the invariants of the format
//! (lengths, offsets within bounds). A failed check panics with what differed: libFuzzer
//! reports it as a crash, the replay test as a failure.
//!
//! Parsers behind a checksum (the seal record, the key slot, the region digest tree, the
//! moved map) are also fed with the checksum fixed up by the check, so that the fuzzer
//! reaches what lies behind it.

pub mod duration;
pub mod keyslot;
pub mod moved_map;
pub mod nbd;
pub mod plugin;
pub mod record;
pub mod region_tree;
pub mod size;

/// A check: panics when the parser and its reference disagree on `data`.
pub type Check = fn(data: &[u8]);

/// Every fuzz target by name (the name of its file in `fuzz/fuzz_targets/` and of its
/// corpus directory in `fuzz/corpus/`), and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("nbd_wire", nbd::check),
    ("plugin_body", plugin::check),
    ("seal_record", record::check),
    ("key_slot", keyslot::check),
    ("size", size::check),
    ("duration", duration::check),
    ("region_tree", region_tree::check),
    ("moved_map", moved_map::check),
];

/// The first byte of an input chooses what the rest is fed to; an empty input is mode 0.
fn split_mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    }
}

/// `n` bytes taken from the front of `data` (zeros past its end) and what is left.
fn take<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut a = [0u8; N];
    let n = data.len().min(N);
    a[..n].copy_from_slice(&data[..n]);
    (a, &data[n..])
}
