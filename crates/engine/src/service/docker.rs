//! Associations from dockerd (DESIGN.md §4): which containers use which volume, and when a
//! container becomes non-operational ([028]: removed, or crashed — died on its own with a
//! non-zero exit code and no restart coming). dockerd is reached through the small
//! [`DockerApi`] trait: the binary implements it over the Docker socket, the tests below
//! with a fake, so the policy is tested without dockerd.
//!
//! dockerd is the truth: on start and every resync interval, [`Service::docker_resync`]
//! reconciles the registry with dockerd's containers and the kernel's mounts, so an event or
//! an Unmount missed while pdguard was down still ends in the right state. A resync inspects
//! only what changed since the last one (`cache.rs`: one list call when nothing did), and
//! everything once in [`cache::FULL_EVERY`] resyncs.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use super::lifecycle::Event;
use super::{now_ms, Result, Service};
use crate::registry::{Container, ContainerState, DiskState, Origin};

#[derive(Debug, Error)]
pub enum DockerError {
    #[error("cannot reach dockerd at {at}")]
    Unreachable {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dockerd at {at} answered {path} with {why}")]
    Protocol {
        at: String,
        path: String,
        why: String,
    },
}

/// A container's run state, as dockerd names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
}

impl RunState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => Self::Created,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "restarting" => Self::Restarting,
            "removing" => Self::Removing,
            "exited" => Self::Exited,
            "dead" => Self::Dead,
            _ => return None,
        })
    }

    /// States in which the container may hold (or be about to take) its volumes' mounts.
    fn may_mount(self) -> bool {
        matches!(
            self,
            Self::Created | Self::Running | Self::Paused | Self::Restarting
        )
    }
}

/// A container of dockerd that uses at least one volume of our driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerContainer {
    pub id: String,
    pub state: RunState,
    pub exit_code: i64,
    /// A restart policy will start it again after it dies on its own.
    pub restarts: bool,
    /// Names of the volumes of our driver it uses.
    pub volumes: Vec<String>,
    /// A Swarm task's container (label `com.docker.swarm.task.id`): Swarm never starts it
    /// again once it stops; it replaces the task with a new container.
    pub task: bool,
}

/// A container as dockerd's list shows it (no exit code, no restart policy): enough to
/// tell whether it changed since it was last inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub state: RunState,
}

/// The events the policy needs, taken from dockerd's `/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEvent {
    /// `volume mount`: `container` mounted `volume` of `driver`.
    VolumeMount {
        volume: String,
        container: String,
        driver: String,
    },
    /// `container kill`: someone sent it a signal (`docker stop`, `docker kill`).
    Kill { container: String },
    /// `container die` with its exit code; `task`: the container is a Swarm task's.
    Die {
        container: String,
        exit_code: i64,
        task: bool,
    },
    /// `container destroy`: removed.
    Destroy { container: String },
    /// `container start`: looked at again at the next resync.
    Start { container: String },
    /// `container stop` (after its `kill` and `die`): looked at again at the next resync.
    Stop { container: String },
    /// `volume unmount`: looked at again at the next resync.
    VolumeUnmount { volume: String, container: String },
}

/// What pdguard needs from dockerd.
pub trait DockerApi: Send + Sync + 'static {
    /// Every container that uses a volume of `driver`, in any state.
    fn containers(
        &self,
        driver: &str,
    ) -> impl Future<Output = Result<Vec<DockerContainer>, DockerError>> + Send;
    /// Every container that uses a volume of `driver`, as the list shows it: one call.
    fn list(&self, driver: &str) -> impl Future<Output = Result<Vec<Listed>, DockerError>> + Send;
    /// One container (None: dockerd does not know it).
    fn inspect(
        &self,
        id: &str,
        driver: &str,
    ) -> impl Future<Output = Result<Option<DockerContainer>, DockerError>> + Send;
    /// Make dockerd activate the legacy plugin `driver` (it lists a legacy plugin, and Swarm
    /// schedules a task using it on this node, only once something has used it).
    fn activate(&self, driver: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Send events to `tx` until the stream ends (Ok) or fails.
    fn events(
        &self,
        tx: mpsc::Sender<DockerEvent>,
    ) -> impl Future<Output = Result<(), DockerError>> + Send;
}

/// The link to dockerd, for `pdguard status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DockerStatus {
    pub driver: String,
    pub reachable: bool,
    /// Why dockerd is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix milliseconds of the last successful resync.
    pub last_resync_ms: u64,
    /// How long it took, in microseconds, and whether it looked at every container (a full
    /// reconcile) or only at what changed.
    pub last_resync_us: u64,
    pub last_resync_full: bool,
}

/// How a container that died counts: the patent's "crashed" only when it died on its own
/// with a non-zero exit code and will not be restarted. A Swarm task's container is retired
/// however it stopped (a service moved off this node, a drained node, a failed task): Swarm
/// replaces the task and never starts that container again, keeping it only as the task's
/// history, so it counts as removed ([028]: "deleted").
fn down_kind(killed: bool, exit_code: i64, restarts: bool, task: bool) -> Option<ContainerState> {
    if task {
        Some(ContainerState::Removed)
    } else if killed || exit_code == 0 {
        Some(ContainerState::Stopped)
    } else if restarts {
        None
    } else {
        Some(ContainerState::Crashed)
    }
}

/// A container found exited by a resync (its `die` event was missed): 128+SIGTERM and
/// 128+SIGKILL are what `docker stop` and `docker kill` leave, so they count as stopped.
fn exited_kind(exit_code: i64, restarts: bool, task: bool) -> Option<ContainerState> {
    down_kind(matches!(exit_code, 137 | 143), exit_code, restarts, task)
}

impl Service {
    /// dockerd says `container` mounted `volume`: associate them (the Mount itself was the
    /// reclaim).
    pub async fn docker_volume_mounted(&self, volume: &str, container: &str) -> Result<()> {
        let mut st = self.s.state.lock().await;
        if st.disks.get(volume).is_none_or(|d| d.volume.is_none()) {
            return Ok(());
        }
        let c = st
            .containers
            .entry(container.to_string())
            .or_insert_with(|| Container {
                id: container.into(),
                state: ContainerState::Running,
                since_ms: 0,
                disks: Vec::new(),
                origin: Some(Origin::Docker),
            });
        c.state = ContainerState::Running;
        c.since_ms = now_ms();
        if !c.disks.iter().any(|d| d == volume) {
            c.disks.push(volume.into());
        }
        let c = c.clone();
        self.s.registry.put_container(&c)?;
        // The Mount did the reclaim; a volume found in use by a resync is attached.
        let idle = st
            .disks
            .get(volume)
            .is_some_and(|d| matches!(d.state, DiskState::Available | DiskState::Grace));
        if idle {
            self.apply(&mut st, volume, Event::Claimed)?;
        }
        Ok(())
    }

    fn knows(st: &super::State, container: &str) -> bool {
        st.containers
            .get(container)
            .is_some_and(|c| !c.disks.is_empty())
    }

    /// dockerd says a container of ours went down (stopped or crashed).
    pub async fn docker_container_down(&self, id: &str, how: ContainerState) -> Result<()> {
        if !Self::knows(&*self.s.state.lock().await, id) {
            return Ok(());
        }
        self.container_down(id, how).await.map(|_| ())
    }

    /// dockerd removed a container: its associations end, and it leaves the registry.
    pub async fn docker_container_removed(&self, id: &str) -> Result<()> {
        if !self.s.state.lock().await.containers.contains_key(id) {
            return Ok(());
        }
        self.container_down(id, ContainerState::Removed).await?;
        let mut st = self.s.state.lock().await;
        st.containers.remove(id);
        self.s.registry.remove_container(id)?;
        Ok(())
    }

    /// Reconcile with dockerd's containers (those using volumes of our driver). Only the
    /// associations that came from dockerd are dockerd's to end: an NBD connection's and a
    /// `container up`'s are not in dockerd's list and stay.
    pub async fn docker_resync(&self, docker: &[DockerContainer]) -> Result<()> {
        let by_id: HashMap<&str, &DockerContainer> =
            docker.iter().map(|c| (c.id.as_str(), c)).collect();
        let ours: Vec<Container> = {
            let st = self.s.state.lock().await;
            st.containers
                .values()
                .filter(|c| c.origin() == Origin::Docker)
                .filter(|c| {
                    c.disks
                        .iter()
                        .any(|d| st.disks.get(d).is_some_and(|d| d.volume.is_some()))
                })
                .cloned()
                .collect()
        };
        for c in &ours {
            match by_id.get(c.id.as_str()) {
                None => {
                    tracing::info!(container = %c.id, "dockerd no longer has the container; it counts as removed");
                    self.docker_container_removed(&c.id).await?;
                }
                Some(d) if d.state.may_mount() => {}
                // A Swarm task's container recorded as stopped (before this rule, or by a
                // `die` read without its labels) is retired as well.
                Some(d)
                    if c.state == ContainerState::Running
                        || (d.task && c.state == ContainerState::Stopped) =>
                {
                    if let Some(how) = exited_kind(d.exit_code, d.restarts, d.task) {
                        self.container_down(&c.id, how).await?;
                    }
                }
                Some(_) => {}
            }
        }
        for d in docker.iter().filter(|d| d.state.may_mount()) {
            for v in &d.volumes {
                let known = ours.iter().any(|c| c.id == d.id && c.disks.contains(v));
                if !known && d.state == RunState::Running {
                    self.docker_volume_mounted(v, &d.id).await?;
                }
            }
        }
        let held: BTreeSet<&str> = docker
            .iter()
            .filter(|d| d.state.may_mount())
            .flat_map(|d| d.volumes.iter().map(String::as_str))
            .collect();
        let mounted: Vec<String> = self.s.state.lock().await.mounts.keys().cloned().collect();
        for v in mounted.iter().filter(|v| !held.contains(v.as_str())) {
            self.drop_stale_mounts(v).await?;
        }
        self.retry_unmounts().await;
        self.orphans_to_grace().await
    }

    /// A volume left attached with no operational container and no mount enters its grace.
    async fn orphans_to_grace(&self) -> Result<()> {
        let mut st = self.s.state.lock().await;
        let names: Vec<String> = st
            .disks
            .values()
            .filter(|d| d.volume.is_some() && d.state == DiskState::Attached)
            .map(|d| d.name.clone())
            .collect();
        for name in names {
            self.release(&mut st, &name)?;
        }
        Ok(())
    }

    /// Follow dockerd until `stop`: resync on start and every `resync`, apply events as
    /// they come; when dockerd is unreachable, say so once, keep serving, seal nothing on
    /// a guess, and try again every `resync`.
    pub async fn follow_docker<D: DockerApi>(
        &self,
        api: Arc<D>,
        driver: String,
        resync: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        self.set_docker_status(|s| s.driver = driver.clone());
        let mut follower = Follower {
            svc: self.clone(),
            api,
            driver,
            kills: HashMap::new(),
            cache: cache::Cache::default(),
            activated: false,
        };
        loop {
            let (tx, mut rx) = mpsc::channel(256);
            let api = Arc::clone(&follower.api);
            let mut events = tokio::spawn(async move { api.events(tx).await });
            let mut every = tokio::time::interval(resync);
            let failure = loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => follower.apply(ev).await,
                        None => break None,
                    },
                    _ = every.tick() => {
                        if let Err(e) = follower.resync().await {
                            break Some(e);
                        }
                    }
                    r = stop.changed() => {
                        if r.is_err() || *stop.borrow() {
                            events.abort();
                            return;
                        }
                    }
                }
            };
            events.abort();
            // Events may be missed while dockerd is away: look at everything again.
            follower.cache.forget();
            // dockerd may have restarted: it forgets the plugins it had activated.
            follower.activated = false;
            let why = match failure {
                Some(e) => crate::error_chain(&e),
                None => match (&mut events).await {
                    Ok(Err(e)) => crate::error_chain(&e),
                    _ => "the event stream ended".into(),
                },
            };
            self.docker_unreachable(why);
            tokio::select! {
                _ = tokio::time::sleep(resync.min(Duration::from_secs(2))) => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { return; },
            }
        }
    }

    fn docker_unreachable(&self, why: String) {
        let mut first = false;
        self.set_docker_status(|s| {
            first = s.reachable || s.error.is_none();
            s.reachable = false;
            s.error = Some(why.clone());
        });
        if first {
            tracing::error!(error = %why, "dockerd is unreachable; serving on, sealing nothing until it answers");
        }
    }
}

struct Follower<D> {
    svc: Service,
    api: Arc<D>,
    driver: String,
    /// Containers sent a signal recently: their `die` is a stop, not a crash.
    kills: HashMap<String, Instant>,
    /// What dockerd's containers were at the last resync.
    cache: cache::Cache,
    /// dockerd has activated our plugin since it last answered after being unreachable.
    activated: bool,
}

impl<D: DockerApi> Follower<D> {
    async fn resync(&mut self) -> Result<(), DockerError> {
        let t0 = Instant::now();
        let (list, full) = match self.cache.refresh(&*self.api, &self.driver).await {
            Ok(r) => r,
            Err(e) => {
                self.activated = false;
                return Err(e);
            }
        };
        self.activate().await?;
        if let Err(e) = self.svc.docker_resync(&list).await {
            tracing::error!(error = %crate::error_chain(&e), "resync with dockerd failed");
        }
        let was_down = self.svc.docker_status().is_some_and(|s| !s.reachable);
        self.svc.set_docker_status(|s| {
            s.reachable = true;
            s.error = None;
            s.last_resync_ms = now_ms();
            s.last_resync_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            s.last_resync_full = full;
        });
        if was_down {
            tracing::info!("dockerd answers");
        }
        self.kills
            .retain(|_, t| t.elapsed() < Duration::from_secs(120));
        Ok(())
    }

    /// Once per (re)connection to dockerd: without it, a Swarm manager finds no node with
    /// our driver ("missing plugin on N nodes") and leaves the task pending.
    async fn activate(&mut self) -> Result<(), DockerError> {
        if self.activated {
            return Ok(());
        }
        match self.api.activate(&self.driver).await {
            Ok(()) => {
                self.activated = true;
                tracing::info!(driver = %self.driver, "dockerd has activated the volume plugin");
                Ok(())
            }
            Err(e @ DockerError::Unreachable { .. }) => Err(e),
            Err(e) => {
                // Tried again at the next resync.
                tracing::warn!(error = %crate::error_chain(&e), "dockerd did not activate the volume plugin");
                Ok(())
            }
        }
    }

    async fn apply(&mut self, ev: DockerEvent) {
        self.cache.touch(&ev);
        let r = match ev {
            DockerEvent::VolumeMount {
                volume,
                container,
                driver,
            } if driver == self.driver => self.svc.docker_volume_mounted(&volume, &container).await,
            DockerEvent::VolumeMount { .. } => Ok(()),
            DockerEvent::Kill { container } => {
                self.kills.insert(container, Instant::now());
                Ok(())
            }
            DockerEvent::Die {
                container,
                exit_code,
                task,
            } => self.died(&container, exit_code, task).await,
            DockerEvent::Destroy { container } => {
                self.kills.remove(&container);
                self.svc.docker_container_removed(&container).await
            }
            DockerEvent::Start { .. }
            | DockerEvent::Stop { .. }
            | DockerEvent::VolumeUnmount { .. } => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!(error = %crate::error_chain(&e), "cannot apply a dockerd event");
        }
    }

    async fn died(&mut self, id: &str, exit_code: i64, task: bool) -> Result<()> {
        if !Service::knows(&*self.svc.s.state.lock().await, id) {
            return Ok(());
        }
        let killed = self
            .kills
            .remove(id)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(120));
        let restarts = if task || killed || exit_code == 0 {
            false
        } else {
            match self.api.inspect(id, &self.driver).await {
                Ok(Some(c)) => c.restarts,
                Ok(None) => false,
                // Not knowing whether it restarts, do not call it crashed.
                Err(_) => true,
            }
        };
        match down_kind(killed, exit_code, restarts, task) {
            Some(how) => self.svc.docker_container_down(id, how).await,
            None => Ok(()),
        }
    }
}

mod cache;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
