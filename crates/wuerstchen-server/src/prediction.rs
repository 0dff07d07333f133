//! One prediction's record: what Cog reports about it (status, output, logs, times,
//! metrics), what we add (per-step progress), and the signals between the HTTP side
//! and the model worker (cancel flag, completion watch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;
use wuerstchen::pipeline::GenerationParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Starting,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Processing => "processing",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Canceled)
    }
}

/// Which webhook events a prediction wants (Cog's `webhook_events_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Output,
    Logs,
    Completed,
}

impl Event {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start" => Event::Start,
            "output" => Event::Output,
            "logs" => Event::Logs,
            "completed" => Event::Completed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub stage: &'static str,
    pub step: usize,
    pub total: usize,
}

#[derive(Debug, Clone)]
pub struct State {
    pub status: Status,
    pub output: Option<Vec<String>>,
    pub error: Option<String>,
    pub logs: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub predict_time: Option<f64>,
    pub progress: Option<Progress>,
    pub seed: Option<u64>,
    /// when the worker took it up: `metrics.predict_time` counts from here
    pub started: Option<Instant>,
}

#[derive(Debug)]
pub struct Prediction {
    pub id: String,
    /// the input as the client sent it (Cog echoes it)
    pub input: Value,
    pub params: GenerationParams,
    pub created_at: String,
    pub webhook: Option<String>,
    pub events: Vec<Event>,
    pub state: Mutex<State>,
    pub cancel: AtomicBool,
    /// bumped on every change; the final value is sent once the status is terminal
    pub changed: watch::Sender<u64>,
}

impl Prediction {
    pub fn new(
        id: String,
        input: Value,
        params: GenerationParams,
        webhook: Option<String>,
        events: Vec<Event>,
    ) -> Self {
        Self {
            id,
            input,
            params,
            created_at: now_rfc3339(),
            webhook,
            events,
            state: Mutex::new(State {
                status: Status::Starting,
                output: None,
                error: None,
                logs: String::new(),
                started_at: None,
                completed_at: None,
                predict_time: None,
                progress: None,
                seed: None,
                started: None,
            }),
            cancel: AtomicBool::new(false),
            changed: watch::channel(0).0,
        }
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // a panic while holding the lock leaves plain data behind: keep serving it
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` to the state and wakes whoever waits on this prediction.
    pub fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn wants(&self, event: Event) -> bool {
        self.events.contains(&event)
    }

    /// Cog's prediction object, plus `progress` while running.
    pub fn to_json(&self) -> Value {
        let s = self.lock();
        let mut v = json!({
            "id": self.id,
            "input": self.input,
            "output": s.output,
            "logs": s.logs,
            "status": s.status.as_str(),
            "created_at": self.created_at,
            "started_at": s.started_at,
            "completed_at": s.completed_at,
            "metrics": match s.predict_time {
                Some(t) => json!({"predict_time": t}),
                None => json!({}),
            },
        });
        if let Some(e) = &s.error {
            v["error"] = json!(e);
        }
        if let Some(w) = &self.webhook {
            v["webhook"] = json!(w);
        }
        if let Some(p) = &s.progress {
            v["progress"] = json!({"stage": p.stage, "step": p.step, "total": p.total});
        }
        v
    }
}

/// UTC time as `2026-11-27T22:28:44.123456+00:00`, the form Cog writes.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// A fresh prediction id: 26 lowercase base-32 characters like Replicate's.
pub fn new_id() -> String {
    let mut rng = wuerstchen::noise::SeededRng::new(wuerstchen::noise::random_seed());
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..26)
        .map(|_| ALPHABET[(rng.next_u64() % 32) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_ids_look_like_cogs() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-11-27T22:28:44.123456+00:00".len(), "{t}");
        assert!(t.starts_with("20") && t.ends_with("+00:00"), "{t}");
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
    }
}
