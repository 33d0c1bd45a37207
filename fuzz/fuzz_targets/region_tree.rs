//! Fuzz target `region_tree`: the check is `pdguard::fuzz_check::region_tree` (shared with the
//! corpus replay test, crates/pdguard/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdguard::fuzz_check::region_tree::check(data));
