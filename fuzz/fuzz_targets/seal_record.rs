//! Fuzz target `seal_record`: the check is `pdguard::fuzz_check::record` (shared with the
//! corpus replay test, crates/pdguard/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdguard::fuzz_check::record::check(data));
