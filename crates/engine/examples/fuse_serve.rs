//! Serve one file through pdguard's FUSE file (`store::fuse_file`) until SIGTERM or SIGINT:
//! the tool of `bench/fuse.sh`, which puts a loop device on `DIR/disk`.
//!
//! Usage: fuse_serve FILE DIR [THREADS]

use std::path::PathBuf;
use std::sync::Arc;

use pdguard_engine::store::fuse_file::{FileBacking, FuseFile, FuseOptions};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(file), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: fuse_serve FILE DIR [THREADS]".into());
    };
    let threads = match args.get(2) {
        Some(t) => t
            .parse()
            .map_err(|_| format!("THREADS {t:?} is not a number of threads, e.g. 4"))?,
        None => FuseOptions::default().threads,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| format!("cannot open {file}: {e}"))?;
    let backing = FileBacking::new(f).map_err(|e| format!("cannot stat {file}: {e}"))?;
    let fuse = FuseFile::mount(
        &PathBuf::from(dir),
        Arc::new(backing),
        FuseOptions { threads },
    )
    .map_err(|e| pdguard_engine::error_chain(&e))?;
    println!("{}", fuse.path().display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        Ok::<(), String>(())
    })?;
    fuse.unmount().map_err(|e| pdguard_engine::error_chain(&e))
}
