//! Fuzz target `nbd_wire`: the check is `pdguard::fuzz_check::nbd` (shared with the
//! corpus replay test, crates/pdguard/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdguard::fuzz_check::nbd::check(data));
