//! Parsers of path arguments that name a file to be made: the directory must exist, and the
//! message says how to make it.

use std::path::{Path, PathBuf};

/// `disk create --path FILE`: a file path whose directory exists. Returned as given; the
/// client makes it absolute (and says so) before sending it to the daemon, whose working
/// directory is not the user's.
pub fn new_file(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("an empty path; give a file path such as /srv/disks/d1.img".into());
    }
    let given = PathBuf::from(text);
    if text.ends_with('/') {
        return Err(format!(
            "{text} names a directory; give a file path in it, such as {}",
            given.join("d1.img").display()
        ));
    }
    let abs = std::path::absolute(&given)
        .map_err(|e| format!("cannot make {text} absolute ({e}); give an absolute path"))?;
    let dir = abs.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(given),
        Ok(_) => Err(format!(
            "{} is not a directory, so it cannot hold {}; give another path",
            dir.display(),
            abs.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "directory {} does not exist; create it first (mkdir -p {}) or give another path",
            dir.display(),
            dir.display()
        )),
        Err(e) => Err(format!(
            "cannot use directory {} ({}); check its permissions or give another path",
            dir.display(),
            e.kind()
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("x.img");
        assert_eq!(new_file(ok.to_str().unwrap()), Ok(ok.clone()));
        let missing = d.path().join("no/such/x.img");
        let e = new_file(missing.to_str().unwrap()).unwrap_err();
        assert!(
            e.contains("does not exist; create it first (mkdir -p"),
            "{e}"
        );
        assert!(
            e.contains(&d.path().join("no/such").display().to_string()),
            "{e}"
        );
        let file_as_dir = ok.join("y.img");
        std::fs::write(&ok, b"").unwrap();
        let e = new_file(file_as_dir.to_str().unwrap()).unwrap_err();
        assert!(e.contains("is not a directory"), "{e}");
        assert!(new_file("").is_err());
        assert!(new_file("/tmp/").unwrap_err().contains("names a directory"));
        // Relative: kept as given (the client makes it absolute); its directory is checked
        // against the working directory.
        assert_eq!(new_file("x.img"), Ok(PathBuf::from("x.img")));
    }
}
