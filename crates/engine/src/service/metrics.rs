//! Counters of the daemon, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::registry::DiskState;

#[derive(Default)]
pub struct Metrics {
    seals_started: AtomicU64,
    seals_finished: AtomicU64,
    seals_failed: AtomicU64,
    unseals_started: AtomicU64,
    unseals_finished: AtomicU64,
    unseals_failed: AtomicU64,
    bytes_moved: AtomicU64,
    job_millis: AtomicU64,
}

impl Metrics {
    pub fn started(&self, seal: bool) {
        let c = if seal {
            &self.seals_started
        } else {
            &self.unseals_started
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, seal: bool, ok: bool) {
        let c = match (seal, ok) {
            (true, true) => &self.seals_finished,
            (true, false) => &self.seals_failed,
            (false, true) => &self.unseals_finished,
            (false, false) => &self.unseals_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn moved(&self, bytes: u64) {
        self.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn job_seconds(&self, d: Duration) {
        self.job_millis
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn render(
        &self,
        by_state: &BTreeMap<DiskState, u64>,
        dangling: u64,
        gate_waits: u64,
    ) -> String {
        let mut s = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP pdguard_disks Disks by state.\n# TYPE pdguard_disks gauge"
        );
        for state in DiskState::ALL {
            let n = by_state.get(&state).copied().unwrap_or(0);
            let _ = writeln!(s, "pdguard_disks{{state=\"{}\"}} {n}", state.name());
        }
        let _ = writeln!(s, "# HELP pdguard_dangling_disks Disks whose dangling flag is TRUE.\n# TYPE pdguard_dangling_disks gauge\npdguard_dangling_disks {dangling}");
        for (name, help, v) in [
            (
                "pdguard_seals_started_total",
                "Seal jobs started.",
                get(&self.seals_started),
            ),
            (
                "pdguard_seals_finished_total",
                "Seal jobs finished.",
                get(&self.seals_finished),
            ),
            (
                "pdguard_seals_failed_total",
                "Seal jobs failed.",
                get(&self.seals_failed),
            ),
            (
                "pdguard_unseals_started_total",
                "Unseal jobs started.",
                get(&self.unseals_started),
            ),
            (
                "pdguard_unseals_finished_total",
                "Unseal jobs finished.",
                get(&self.unseals_finished),
            ),
            (
                "pdguard_unseals_failed_total",
                "Unseal jobs failed.",
                get(&self.unseals_failed),
            ),
            (
                "pdguard_bytes_moved_total",
                "Bytes moved by job passes.",
                get(&self.bytes_moved),
            ),
            (
                "pdguard_gate_waits_total",
                "I/O requests that waited at a blocked gate.",
                gate_waits,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let secs = get(&self.job_millis) as f64 / 1000.0;
        let _ = writeln!(s, "# HELP pdguard_job_seconds_total Seconds spent in jobs.\n# TYPE pdguard_job_seconds_total counter\npdguard_job_seconds_total {secs:.3}");
        s
    }
}
