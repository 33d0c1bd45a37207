//! The `pdguard` binary: everything is in the library (`lib.rs`), which the fuzz targets
//! share.

fn main() -> std::process::ExitCode {
    pdguard::main()
}
