//! The policy tick (claim 6, [034]): a disk whose grace period ended with no operational
//! container turns dangling and its seal job starts, unless the kernel still holds it; and
//! unmounts the kernel refused earlier are tried again, so that a volume is sealed as soon
//! as it is free.

use std::time::Duration;

use tokio::sync::watch;

use super::lifecycle::{Event, Life};
use super::{now_ms, Service};
use crate::registry::DiskState;

/// How often an unmount the kernel refused is tried again.
const UNMOUNT_RETRY: Duration = Duration::from_secs(1);

impl Service {
    /// One policy step.
    pub async fn tick(&self) {
        let mut st = self.s.state.lock().await;
        let now = now_ms();
        let mut due: Vec<(u64, String)> = st
            .disks
            .values()
            .filter(|d| d.state == DiskState::Grace && d.grace_until_ms.is_none_or(|t| t <= now))
            .map(|d| (d.grace_until_ms.unwrap_or(0), d.name.clone()))
            .collect();
        // Queued in the order they went dangling (their grace ended), so that the job queue
        // seals them first come, first served.
        due.sort_unstable();
        for (_, name) in due {
            let in_use = st.in_use(&name);
            let kernel_holds = !in_use && st.disks.get(&name).is_some_and(|d| self.kernel_holds(d));
            if kernel_holds {
                self.adopt_leftover_mount(&mut st, &name);
            }
            let event = Event::GraceOver {
                now_ms: now,
                in_use,
                kernel_holds,
            };
            match self.apply(&mut st, &name, event) {
                Ok(Life::Sealing { .. }) => {
                    tracing::info!(disk = %name, "dangling: every container is gone; sealing");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(disk = %name, error = %crate::error_chain(&e), "cannot record the dangling flag")
                }
            }
        }
    }

    /// A volume whose mountpoint is mounted though no Mount of dockerd holds it (a Mount
    /// abandoned while its `mount` ran): its unmount becomes pending, so that the retries
    /// let it go and it can be sealed. Only pdguard's own mountpoint is looked at; a loop
    /// device someone else attached to the file is left alone (and the volume unsealed).
    fn adopt_leftover_mount(&self, st: &mut super::State, name: &str) {
        let is_volume = st.disks.get(name).is_some_and(|d| d.volume.is_some());
        let no_mount = st.mounts.get(name).is_none_or(|m| m.ids.is_empty());
        let mounted = crate::store::loopfs::is_mountpoint(&self.mount_dir(name)).unwrap_or(false);
        if !(is_volume && no_mount && mounted) {
            return;
        }
        let m = st.mounts.entry(name.into()).or_default();
        if m.unmount_pending {
            return;
        }
        m.unmount_pending = true;
        let m = m.clone();
        tracing::warn!(volume = %name, "mounted though no container's Mount holds it; unmounting it");
        if let Err(e) = self.s.registry.put_mounts(name, &m) {
            tracing::error!(volume = %name, error = %e, "cannot record the pending unmount");
        }
    }

    /// Run [`Self::tick`] until `stop` turns true; retry pending unmounts every second.
    pub async fn run_policy(&self, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        let mut unmounts = tokio::time::interval(UNMOUNT_RETRY);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick().await,
                _ = unmounts.tick() => self.retry_unmounts().await,
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }
}
