//! The model worker: one OS thread owns the pipeline and runs predictions one at a
//! time from a bounded queue. Async handlers never run tensor code; they enqueue, and
//! watch the prediction's record.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use base64::Engine;
use candle_core::{DType, Device};
use tokio::sync::mpsc::UnboundedSender;
use wuerstchen::image_io::encode_png;
use wuerstchen::noise::NoiseSource;
use wuerstchen::pipeline::{GenerationParams, Stage, WuerstchenPipeline};

use crate::metrics::{Metrics, Outcome};
use crate::prediction::{now_rfc3339, Event, Prediction, Progress, Status};

/// What `/health-check` reports about setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStatus {
    Starting,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone)]
pub struct Setup {
    pub status: SetupStatus,
    pub started_at: String,
    pub completed_at: Option<String>,
    pub logs: String,
    /// the model's own defaults (size, prior guidance), known once the pipeline is open
    pub defaults: GenerationParams,
    pub model: String,
}

/// Where the model comes from.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub prior: PathBuf,
    pub decoder: PathBuf,
    pub device: Device,
    pub dtype: DType,
}

/// One webhook delivery: the prediction (for its URL) and the object to POST.
pub type Delivery = (Arc<Prediction>, serde_json::Value);

/// State shared between the HTTP side and the worker.
pub struct Shared {
    pub setup: Mutex<Setup>,
    pub predictions: Mutex<HashMap<String, Arc<Prediction>>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// running + waiting predictions allowed at once
    pub capacity: usize,
    pub metrics: Metrics,
    /// webhook deliveries, in order, to the sender task; None once closed
    webhooks: Mutex<Option<UnboundedSender<Delivery>>>,
    stopping: AtomicBool,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Arc<Prediction>>,
    running: Option<Arc<Prediction>>,
}

/// The queue is full.
#[derive(Debug)]
pub struct AtCapacity;

impl Shared {
    pub fn new(queue: usize, webhooks: UnboundedSender<Delivery>) -> Arc<Self> {
        Arc::new(Self {
            setup: Mutex::new(Setup {
                status: SetupStatus::Starting,
                started_at: now_rfc3339(),
                completed_at: None,
                logs: String::new(),
                defaults: GenerationParams::default(),
                model: String::new(),
            }),
            predictions: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            capacity: 1 + queue,
            metrics: Metrics::default(),
            webhooks: Mutex::new(Some(webhooks)),
            stopping: AtomicBool::new(false),
        })
    }

    pub fn setup(&self) -> Setup {
        self.setup.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (running, waiting)
    pub fn load(&self) -> (usize, usize) {
        let q = self.queue();
        (usize::from(q.running.is_some()), q.waiting.len())
    }

    pub fn busy(&self) -> bool {
        let (running, waiting) = self.load();
        running + waiting > 0
    }

    /// Admits a prediction, or refuses it when every slot is taken.
    pub fn enqueue(&self, p: Arc<Prediction>) -> Result<(), AtCapacity> {
        let mut q = self.queue();
        if usize::from(q.running.is_some()) + q.waiting.len() >= self.capacity {
            return Err(AtCapacity);
        }
        self.predictions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.id.clone(), p.clone());
        q.waiting.push_back(p);
        self.wake.notify_all();
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Prediction>> {
        self.predictions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Cancels a prediction that is waiting or running; false when unknown or done.
    pub fn cancel(&self, id: &str) -> bool {
        let mut q = self.queue();
        if let Some(i) = q.waiting.iter().position(|p| p.id == id) {
            let p = q.waiting.remove(i).expect("index from position");
            drop(q);
            self.finish(&p, Status::Canceled, None, None);
            return true;
        }
        match &q.running {
            Some(p) if p.id == id && !p.status().is_terminal() => {
                p.request_cancel();
                true
            }
            _ => false,
        }
    }

    /// Stops taking work; the worker finishes what is queued and running, then exits.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// Ends webhook delivery once what is queued has gone out (after the worker ends).
    pub fn close_webhooks(&self) {
        self.webhooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn next(&self) -> Option<Arc<Prediction>> {
        let mut q = self.queue();
        loop {
            if let Some(p) = q.waiting.pop_front() {
                q.running = Some(p.clone());
                return Some(p);
            }
            if self.stopping() {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends the prediction's current object to its webhook if it wants `event`.
    fn notify(&self, p: &Arc<Prediction>, event: Event) {
        if p.webhook.is_some() && p.wants(event) {
            if let Some(tx) = &*self.webhooks.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = tx.send((p.clone(), p.to_json()));
            }
        }
    }

    fn log(&self, p: &Arc<Prediction>, line: &str) {
        p.update(|s| {
            s.logs.push_str(line);
            s.logs.push('\n');
        });
        self.notify(p, Event::Logs);
    }

    fn finish(
        &self,
        p: &Arc<Prediction>,
        status: Status,
        output: Option<Vec<String>>,
        error: Option<String>,
    ) {
        let elapsed = p.lock().started.map(|t| t.elapsed().as_secs_f64());
        // as Cog: the output goes out while still "processing", then the final object
        if output.is_some() {
            p.update(|s| s.output = output);
            self.notify(p, Event::Output);
        }
        // the slot frees and the count moves before the final state shows: a client
        // that sends its next request on seeing this answer finds room and the count
        {
            let mut q = self.queue();
            if q.running.as_ref().is_some_and(|r| r.id == p.id) {
                q.running = None;
            }
        }
        self.metrics.outcome(match status {
            Status::Succeeded => Outcome::Succeeded,
            Status::Canceled => Outcome::Canceled,
            _ => Outcome::Failed,
        });
        p.update(|s| {
            s.status = status;
            s.error = error;
            s.completed_at = Some(now_rfc3339());
            s.predict_time = elapsed;
        });
        self.notify(p, Event::Completed);
    }
}

/// Opens the pipeline, then runs predictions until `stop`. Call on its own thread.
pub fn run(shared: Arc<Shared>, spec: ModelSpec) {
    // the models are loaded once, in the setup, and serve every prediction
    let opened = WuerstchenPipeline::open(&spec.prior, &spec.decoder, spec.device, spec.dtype)
        .map(|p| p.keep_loaded(true))
        .and_then(|p| p.preload().map(|()| p));
    let pipeline = match opened {
        Ok(p) => p,
        Err(e) => {
            let mut s = shared.setup.lock().unwrap_or_else(|e| e.into_inner());
            s.status = SetupStatus::Failed;
            s.completed_at = Some(now_rfc3339());
            s.logs = format!("{e}\n");
            return;
        }
    };
    {
        let mut s = shared.setup.lock().unwrap_or_else(|e| e.into_inner());
        s.defaults = pipeline.defaults();
        s.model = pipeline.model_name();
        s.logs = format!(
            "model {} (prior {}, decoder {}), native size {}x{}, prior guidance {}\n",
            s.model,
            spec.prior.display(),
            spec.decoder.display(),
            s.defaults.width,
            s.defaults.height,
            s.defaults.prior_guidance
        );
        s.status = SetupStatus::Succeeded;
        s.completed_at = Some(now_rfc3339());
    }
    while let Some(p) = shared.next() {
        predict(&shared, &pipeline, &p);
    }
}

fn predict(shared: &Shared, pipeline: &WuerstchenPipeline, p: &Arc<Prediction>) {
    let started = Instant::now();
    let mut params = p.params.clone();
    let seed = *params
        .seed
        .get_or_insert_with(wuerstchen::noise::random_seed);
    p.update(|s| {
        s.status = Status::Processing;
        s.started = Some(started);
        s.started_at = Some(now_rfc3339());
        s.seed = Some(seed);
    });
    shared.notify(p, Event::Start);
    shared.log(p, &format!("seed {seed}"));
    let mut noise = NoiseSource::seeded(seed);
    // stage boundaries for the metrics: end of the prior's and the decoder's last step
    let (mut prior_end, mut decoder_end) = (None, None);
    let result = pipeline.generate(
        &params,
        &mut noise,
        &mut |prog| {
            let stage = match prog.stage {
                Stage::Prior => "prior",
                Stage::Decoder => "decoder",
            };
            if prog.step == prog.total {
                match prog.stage {
                    Stage::Prior => prior_end = Some(Instant::now()),
                    Stage::Decoder => decoder_end = Some(Instant::now()),
                }
            }
            p.update(|s| {
                s.progress = Some(Progress {
                    stage,
                    step: prog.step,
                    total: prog.total,
                })
            });
        },
        &|| p.cancel_requested(),
    );
    let end = Instant::now();
    match result {
        Ok(images) => {
            let text = params.parameters_text(Some(seed), &pipeline.model_name());
            let urls: Result<Vec<String>, _> = images
                .iter()
                .map(|img| {
                    encode_png(img, Some(&text)).map(|png| {
                        format!(
                            "data:image/png;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(png)
                        )
                    })
                })
                .collect();
            let prior_end = prior_end.unwrap_or(started);
            let decoder_end = decoder_end.unwrap_or(prior_end);
            shared.metrics.stage_seconds(
                (prior_end - started).as_secs_f64(),
                (decoder_end - prior_end).as_secs_f64(),
                (end - decoder_end).as_secs_f64(),
            );
            match urls {
                Ok(urls) => {
                    shared.log(
                        p,
                        &format!("done in {:.2} s", (end - started).as_secs_f64()),
                    );
                    shared.finish(p, Status::Succeeded, Some(urls), None);
                }
                Err(e) => shared.finish(p, Status::Failed, None, Some(e.to_string())),
            }
        }
        Err(wuerstchen::error::Error::Canceled) => {
            shared.log(p, "canceled");
            shared.finish(p, Status::Canceled, None, None);
        }
        Err(e) => shared.finish(p, Status::Failed, None, Some(e.to_string())),
    }
}
