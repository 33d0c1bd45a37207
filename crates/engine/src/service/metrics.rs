//! The daemon's metrics, rendered in the Prometheus text format (version 0.0.4) for
//! `GET /metrics`. Names follow Prometheus conventions: the `pdguard_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters, and what varies (a state, a job's kind) in
//! labels, every label value always present so that a sum or a rate never misses a series.
//!
//! Rendered by hand rather than with the `prometheus-client` crate: half of the figures
//! (disks by state, dangling, dockerd) are read from the service's state at scrape time,
//! not kept as live metrics, and the format is small; `promtool check metrics` checks the
//! output in `crates/pdguard/tests/prometheus.rs`. docs/operations.md lists every metric.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use super::lifecycle::JobKind;
use super::{lock, now_ms};
use crate::registry::DiskState;

/// Upper bounds (seconds) of the job duration histogram: a small disk seals in well under
/// a second, a large one on a slow disk in hours.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

const KINDS: [JobKind; 3] = [JobKind::Seal, JobKind::Unseal, JobKind::Migrate];

fn ix(kind: JobKind) -> usize {
    match kind {
        JobKind::Seal => 0,
        JobKind::Unseal => 1,
        JobKind::Migrate => 2,
    }
}

/// A histogram of durations, updated under one lock so that a scrape sees its buckets,
/// sum and count agree.
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_seconds += secs;
        self.count += 1;
    }
}

/// A job that has been asked for and has not ended: waiting for a slot, or running.
struct Pending {
    kind: JobKind,
    since_ms: u64,
    running: bool,
}

/// What the service's state says at scrape time.
pub struct Snapshot {
    pub by_state: BTreeMap<DiskState, u64>,
    pub dangling: u64,
    pub gate_waits: u64,
    /// `None` without the Docker front-end; else whether dockerd answered the last resync.
    pub docker_up: Option<bool>,
}

#[derive(Default)]
pub struct Metrics {
    started: [AtomicU64; 3],
    finished: [AtomicU64; 3],
    failed: [AtomicU64; 3],
    moved_bytes: [AtomicU64; 3],
    disk_failures: AtomicU64,
    durations: [StdMutex<Histogram>; 3],
    jobs: StdMutex<HashMap<String, Pending>>,
}

impl Metrics {
    /// A job was asked for on `disk`; it waits for a slot.
    pub fn queued(&self, disk: &str, kind: JobKind) {
        lock(&self.jobs).insert(
            disk.into(),
            Pending {
                kind,
                since_ms: now_ms(),
                running: false,
            },
        );
    }

    /// The job of `disk` got its slot and runs.
    pub fn started(&self, disk: &str, kind: JobKind) {
        self.started[ix(kind)].fetch_add(1, Ordering::Relaxed);
        if let Some(p) = lock(&self.jobs).get_mut(disk) {
            p.running = true;
        }
    }

    /// The job of `disk` ended after running for `took`.
    pub fn finished(&self, disk: &str, kind: JobKind, ok: bool, took: Duration) {
        lock(&self.durations[ix(kind)]).observe(took);
        self.finished[ix(kind)].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed[ix(kind)].fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.jobs).remove(disk);
    }

    pub fn moved(&self, kind: JobKind, bytes: u64) {
        self.moved_bytes[ix(kind)].fetch_add(bytes, Ordering::Relaxed);
    }

    /// A disk entered the `failed` state.
    pub fn disk_failed(&self) {
        self.disk_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = Out(String::new());
        out.head(
            "pdguard_build_info",
            "gauge",
            "Always 1; the version of the daemon in a label.",
        );
        out.line(
            "pdguard_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
            1,
        );
        out.head("pdguard_disks", "gauge", "Disks by state.");
        for state in DiskState::ALL {
            let n = snap.by_state.get(&state).copied().unwrap_or(0);
            out.line("pdguard_disks", &format!("state=\"{}\"", state.name()), n);
        }
        out.head(
            "pdguard_dangling_disks",
            "gauge",
            "Disks whose dangling flag is TRUE.",
        );
        out.line("pdguard_dangling_disks", "", snap.dangling);
        self.render_jobs(&mut out);
        out.head(
            "pdguard_disk_failures_total",
            "counter",
            "Times a disk entered the failed state.",
        );
        out.line(
            "pdguard_disk_failures_total",
            "",
            self.disk_failures.load(Ordering::Relaxed),
        );
        out.head(
            "pdguard_gate_waits_total",
            "counter",
            "I/O requests that waited at a blocked gate.",
        );
        out.line("pdguard_gate_waits_total", "", snap.gate_waits);
        if let Some(up) = snap.docker_up {
            out.head(
                "pdguard_docker_up",
                "gauge",
                "1 if dockerd answered the last resync, else 0.",
            );
            out.line("pdguard_docker_up", "", u64::from(up));
        }
        out.0
    }

    fn render_jobs(&self, out: &mut Out) {
        let counters = [
            (
                "pdguard_jobs_started_total",
                "Seal and unseal jobs started (given a slot).",
                &self.started,
            ),
            (
                "pdguard_jobs_finished_total",
                "Seal and unseal jobs ended, failed ones included.",
                &self.finished,
            ),
            (
                "pdguard_jobs_failed_total",
                "Seal and unseal jobs that failed.",
                &self.failed,
            ),
            (
                "pdguard_moved_bytes_total",
                "Bytes moved by the passes of jobs.",
                &self.moved_bytes,
            ),
        ];
        for (name, help, c) in counters {
            out.head(name, "counter", help);
            for kind in KINDS {
                let v = c[ix(kind)].load(Ordering::Relaxed);
                out.line(name, &format!("kind=\"{}\"", kind.name()), v);
            }
        }
        let (counts, oldest_ms) = self.backlog();
        out.head(
            "pdguard_jobs",
            "gauge",
            "Jobs asked for and not ended, by kind and whether they wait for a slot or run.",
        );
        for kind in KINDS {
            for (i, state) in ["queued", "running"].iter().enumerate() {
                let labels = format!("kind=\"{}\",state=\"{state}\"", kind.name());
                out.line("pdguard_jobs", &labels, counts[ix(kind)][i]);
            }
        }
        if let Some(ms) = oldest_ms {
            let name = "pdguard_oldest_job_start_time_seconds";
            out.head(name, "gauge", "Unix time at which the oldest job not yet ended was asked for; absent when none is.");
            let _ = writeln!(out.0, "{name} {}", ms as f64 / 1000.0);
        }
        let name = "pdguard_job_duration_seconds";
        out.head(
            name,
            "histogram",
            "Time seal and unseal jobs ran, from getting a slot to their end.",
        );
        for kind in KINDS {
            let h = lock(&self.durations[ix(kind)]);
            let k = kind.name();
            let mut cumulative = 0;
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i];
                let _ = writeln!(
                    out.0,
                    "{name}_bucket{{kind=\"{k}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out.0,
                "{name}_bucket{{kind=\"{k}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out.0, "{name}_sum{{kind=\"{k}\"}} {}", h.sum_seconds);
            let _ = writeln!(out.0, "{name}_count{{kind=\"{k}\"}} {}", h.count);
        }
    }

    /// Jobs queued and running per kind, and when the oldest was asked for.
    fn backlog(&self) -> ([[u64; 2]; 3], Option<u64>) {
        let jobs = lock(&self.jobs);
        let mut counts = [[0u64; 2]; 3];
        for p in jobs.values() {
            counts[ix(p.kind)][usize::from(p.running)] += 1;
        }
        (counts, jobs.values().map(|p| p.since_ms).min())
    }
}

/// The exposition being written.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn line(&mut self, name: &str, labels: &str, v: u64) {
        let _ = match labels {
            "" => writeln!(self.0, "{name} {v}"),
            l => writeln!(self.0, "{name}{{{l}}} {v}"),
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(docker_up: Option<bool>) -> Snapshot {
        Snapshot {
            by_state: BTreeMap::from([(DiskState::Sealed, 2)]),
            dangling: 1,
            gate_waits: 0,
            docker_up,
        }
    }

    #[test]
    fn every_state_and_kind_is_present_even_at_zero() {
        let text = Metrics::default().render(&snapshot(None));
        for state in DiskState::ALL {
            let want = if state == DiskState::Sealed { 2 } else { 0 };
            let line = format!("pdguard_disks{{state=\"{}\"}} {want}\n", state.name());
            assert!(text.contains(&line), "{line:?} missing:\n{text}");
        }
        for line in [
            "pdguard_jobs{kind=\"unseal\",state=\"queued\"} 0\n",
            "pdguard_jobs_failed_total{kind=\"seal\"} 0\n",
            "pdguard_job_duration_seconds_count{kind=\"unseal\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        // No Docker front-end, no job: no dockerd gauge, no oldest job.
        assert!(!text.contains("pdguard_docker_up"), "{text}");
        assert!(!text.contains("pdguard_oldest_job"), "{text}");
        assert!(Metrics::default()
            .render(&snapshot(Some(false)))
            .contains("pdguard_docker_up 0\n"));
    }

    #[test]
    fn a_job_moves_from_queued_to_running_to_the_histogram() {
        let m = Metrics::default();
        m.queued("a", JobKind::Seal);
        m.queued("b", JobKind::Seal);
        m.started("a", JobKind::Seal);
        let text = m.render(&snapshot(None));
        assert!(
            text.contains("pdguard_jobs{kind=\"seal\",state=\"queued\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pdguard_jobs{kind=\"seal\",state=\"running\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pdguard_oldest_job_start_time_seconds "),
            "{text}"
        );
        m.finished("a", JobKind::Seal, true, Duration::from_millis(700));
        m.started("b", JobKind::Seal);
        m.finished("b", JobKind::Seal, false, Duration::from_secs(20_000));
        let text = m.render(&snapshot(None));
        for line in [
            "pdguard_jobs{kind=\"seal\",state=\"running\"} 0\n",
            "pdguard_jobs_started_total{kind=\"seal\"} 2\n",
            "pdguard_jobs_finished_total{kind=\"seal\"} 2\n",
            "pdguard_jobs_failed_total{kind=\"seal\"} 1\n",
            "pdguard_job_duration_seconds_bucket{kind=\"seal\",le=\"0.5\"} 0\n",
            "pdguard_job_duration_seconds_bucket{kind=\"seal\",le=\"1\"} 1\n",
            "pdguard_job_duration_seconds_bucket{kind=\"seal\",le=\"14400\"} 1\n",
            "pdguard_job_duration_seconds_bucket{kind=\"seal\",le=\"+Inf\"} 2\n",
            "pdguard_job_duration_seconds_sum{kind=\"seal\"} 20000.7\n",
            "pdguard_job_duration_seconds_count{kind=\"seal\"} 2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        assert!(!text.contains("pdguard_oldest_job"), "{text}");
    }
}
