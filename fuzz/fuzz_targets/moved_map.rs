//! Fuzz target `moved_map`: the check is `pdguard::fuzz_check::moved_map` (shared with the
//! corpus replay test, crates/pdguard/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdguard::fuzz_check::moved_map::check(data));
