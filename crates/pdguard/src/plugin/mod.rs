//! The Docker volume plugin (legacy plugin protocol, `docs/docker-plugin.md`): dockerd finds
//! `/run/docker/plugins/NAME.sock`, POSTs JSON (with no Content-Type) and reads JSON back,
//! errors as `{"Err": "..."}`. What each request means lives in the engine's service
//! (`Service::volume_*`); here are only the wire types, the handlers and the client of
//! dockerd's own API that feeds the association policy.

pub mod dockerd;
mod handlers;
pub mod protocol;

pub use handlers::router;

/// Where dockerd looks for legacy plugins.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";

/// A driver name dockerd and a file name both accept.
pub fn valid_driver(name: &str) -> bool {
    let mut c = name.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphanumeric())
        && name.len() <= 64
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names() {
        assert!(valid_driver("pdguard"));
        assert!(valid_driver("pdguard-test.1_2"));
        assert!(!valid_driver(""));
        assert!(!valid_driver("../x"));
        assert!(!valid_driver("a/b"));
        assert!(!valid_driver(&"a".repeat(65)));
    }
}
