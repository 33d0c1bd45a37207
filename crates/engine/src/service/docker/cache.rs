//! What pdguard last saw of dockerd's containers, so that a resync costs what changed, not
//! what exists. A resync asks dockerd for one list (`/containers/json`: ids and run states,
//! one call) and inspects only the containers that are new, whose run state changed, or
//! that an event named since the last resync (a `die` and `start` between two resyncs leave
//! the run state as it was, but not the restart count). With nothing changed, a resync is
//! one call to dockerd, whatever the number of containers. Every [`FULL_EVERY`] resyncs,
//! and after dockerd was unreachable (events may have been missed), everything is inspected
//! again.

use std::collections::{HashMap, HashSet};

use super::{DockerApi, DockerContainer, DockerError, DockerEvent};

/// A full reconcile (every container inspected) once in this many resyncs.
pub const FULL_EVERY: u32 = 10;

#[derive(Default)]
pub(super) struct Cache {
    /// Containers of our driver, as last inspected, by id.
    known: HashMap<String, DockerContainer>,
    /// Named by an event since the last resync: inspected again.
    dirty: HashSet<String>,
    /// Resyncs since the last full one; `None` before the first (or after an outage).
    since_full: Option<u32>,
}

impl Cache {
    /// An event names a container: look at it again at the next resync.
    pub(super) fn touch(&mut self, ev: &DockerEvent) {
        let id = match ev {
            DockerEvent::VolumeMount { container, .. }
            | DockerEvent::VolumeUnmount { container, .. }
            | DockerEvent::Kill { container }
            | DockerEvent::Die { container, .. }
            | DockerEvent::Start { container }
            | DockerEvent::Stop { container } => container,
            DockerEvent::Destroy { container } => {
                self.known.remove(container);
                container
            }
        };
        self.dirty.insert(id.clone());
    }

    /// dockerd may have changed anything unseen: the next resync is a full one.
    pub(super) fn forget(&mut self) {
        self.since_full = None;
    }

    /// Every container of `driver`, refreshed at the cost described above, and whether
    /// this was a full reconcile.
    pub(super) async fn refresh<D: DockerApi>(
        &mut self,
        api: &D,
        driver: &str,
    ) -> Result<(Vec<DockerContainer>, bool), DockerError> {
        let full = self.since_full.is_none_or(|n| n + 1 >= FULL_EVERY);
        if full {
            let all = api.containers(driver).await?;
            self.known = all.iter().map(|c| (c.id.clone(), c.clone())).collect();
            self.dirty.clear();
            self.since_full = Some(0);
            return Ok((all, true));
        }
        let listed = api.list(driver).await?;
        let ids: HashSet<&str> = listed.iter().map(|l| l.id.as_str()).collect();
        self.known.retain(|id, _| ids.contains(id.as_str()));
        for l in &listed {
            let stale = self.dirty.contains(&l.id)
                || self.known.get(&l.id).is_none_or(|c| c.state != l.state);
            if !stale {
                continue;
            }
            match api.inspect(&l.id, driver).await? {
                Some(c) => self.known.insert(l.id.clone(), c),
                None => self.known.remove(&l.id),
            };
        }
        self.dirty.clear();
        self.since_full = self.since_full.map(|n| n + 1);
        let mut all: Vec<DockerContainer> = self.known.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((all, false))
    }
}
