//! Prometheus counters: requests by outcome, time per pipeline stage, and (read at
//! render time) the queue.

use std::fmt::Write;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Canceled,
    /// 409: every slot busy
    Rejected,
    /// 422 / 400: bad request
    Invalid,
    /// 503: model not ready
    Unavailable,
}

const OUTCOMES: [(Outcome, &str); 6] = [
    (Outcome::Succeeded, "succeeded"),
    (Outcome::Failed, "failed"),
    (Outcome::Canceled, "canceled"),
    (Outcome::Rejected, "rejected"),
    (Outcome::Invalid, "invalid"),
    (Outcome::Unavailable, "unavailable"),
];

#[derive(Debug, Default)]
struct Counts {
    outcomes: [u64; 6],
    /// (sum of seconds, count) for prior, decoder, decode
    stages: [(f64, u64); 3],
}

#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn outcome(&self, o: Outcome) {
        let i = OUTCOMES.iter().position(|(x, _)| *x == o).unwrap_or(0);
        self.counts().outcomes[i] += 1;
    }

    pub fn stage_seconds(&self, prior: f64, decoder: f64, decode: f64) {
        let mut c = self.counts();
        for (slot, s) in c.stages.iter_mut().zip([prior, decoder, decode]) {
            slot.0 += s;
            slot.1 += 1;
        }
    }

    /// The text exposition format; `running` and `waiting` describe the queue now.
    pub fn render(&self, running: usize, waiting: usize, capacity: usize) -> String {
        let c = self.counts();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP wuerstchen_predictions_total Prediction requests by outcome."
        );
        let _ = writeln!(s, "# TYPE wuerstchen_predictions_total counter");
        for ((_, name), n) in OUTCOMES.iter().zip(c.outcomes) {
            let _ = writeln!(s, "wuerstchen_predictions_total{{outcome=\"{name}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP wuerstchen_stage_seconds Time spent per pipeline stage."
        );
        let _ = writeln!(s, "# TYPE wuerstchen_stage_seconds summary");
        for ((sum, count), stage) in c.stages.iter().zip(["prior", "decoder", "decode"]) {
            let _ = writeln!(s, "wuerstchen_stage_seconds_sum{{stage=\"{stage}\"}} {sum}");
            let _ = writeln!(
                s,
                "wuerstchen_stage_seconds_count{{stage=\"{stage}\"}} {count}"
            );
        }
        let gauges = [
            ("wuerstchen_running", "Predictions running now.", running),
            (
                "wuerstchen_queue_depth",
                "Predictions waiting for the worker.",
                waiting,
            ),
            (
                "wuerstchen_capacity",
                "Running plus waiting predictions allowed.",
                capacity,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}
