//! Replays the fuzz corpora (`fuzz/corpus/<target>/`, minimised by `cargo fuzz cmin`) and
//! the hand-written seeds (`fuzz/seeds/<target>/`) through the same reference checks as
//! the fuzz targets (`pdguard::fuzz_check`), on stable, in every `cargo test`: an input
//! that once found a bug, or covers an edge, stays checked without nightly or libFuzzer.

use std::path::{Path, PathBuf};

use pdguard::fuzz_check::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; a missing directory is an error naming it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; the corpora are committed in fuzz/",
            dir.display()
        )
    });
    let mut v: Vec<PathBuf> = rd
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(target: &str, check: pdguard::fuzz_check::Check, sub: &str) -> usize {
    let dir = fuzz_dir().join(sub).join(target);
    let inputs = files(&dir);
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!(
                "{target}: {} fails its check (see the panic above); reproduce with \
                 cargo +nightly fuzz run {target} {}",
                path.display(),
                path.display()
            );
        }
    }
    inputs.len()
}

#[test]
fn every_corpus_and_seed_passes_its_check() {
    for (target, check) in TARGETS {
        let corpus = replay(target, *check, "corpus");
        let seeds = replay(target, *check, "seeds");
        eprintln!("{target}: {corpus} corpus inputs, {seeds} seeds");
    }
}

/// The list of checks and the fuzz targets are the same set, so that no target goes
/// unreplayed and no check goes unfuzzed.
#[test]
fn every_fuzz_target_has_a_check() {
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}
