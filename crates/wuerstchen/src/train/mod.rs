//! Training of all three stages and the text encoder on a captioned image folder.
//!
//! One loop serves every stage: seeded batches, AdamW with warmup and global-norm
//! clipping, an EMA of the weights, a checkpoint every N steps (one safetensors file
//! holding weights, EMA and optimizer moments, replaced atomically), resume from it,
//! and the EMA weights exported in the diffusers folder layout that `generate` loads.

pub mod data;
pub mod optim;
pub mod stage_a;
pub mod stage_b;
pub mod stage_c;
pub mod text_encoder;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::config::{load_config, Validate};
use crate::error::{Error, Result};
use crate::image_io::write_atomically;
use crate::noise::SeededRng;
use data::ImageFolder;
use optim::{AdamW, AdamWConfig, Ema};

/// Options shared by every stage; saved beside each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Store exported weights in f16 (half the size; checkpoints stay f32).
    #[serde(default)]
    pub export_f16: bool,
    /// Weights to start a fresh run from (fine-tuning): a safetensors file such as an
    /// exported component's, matched by name (see [`init_from`]); a resumed run ignores it.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

/// One line of the training log.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub step_seconds: f64,
    pub samples_per_second: f64,
}

/// What a stage contributes to the shared loop.
pub trait StageTrainer {
    /// Short name: checkpoint file and log prefix.
    fn name(&self) -> &'static str;
    /// All variables, trainable ones and buffers.
    fn varmap(&self) -> &VarMap;
    /// Names of buffers the optimizer must not touch (running statistics).
    fn is_buffer(&self, name: &str) -> bool {
        name.ends_with("running_mean") || name.ends_with("running_var")
    }
    /// The loss of one batch; may update buffers.
    fn loss(&mut self, images: &Tensor, captions: &[String], rng: &mut SeededRng)
        -> Result<Tensor>;
    /// Writes the given weights (EMA for parameters) as diffusers folders under `out`.
    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()>;
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// candle initialises new variables from its own RNG, which cannot be seeded. Redraw
/// every randomly initialised variable from ours so a training run is reproducible:
/// matrices and kernels uniform with Kaiming's spread `sqrt(2 / fan_in)`, random
/// vectors (biases) zero; constant ones (zeros, ones) stay as they are.
fn reseed_init(vars: &[(String, Var)], seed: u64) -> Result<()> {
    let mut rng = SeededRng::new(seed.wrapping_add(0x5EED));
    for (_, var) in vars {
        let t = var.as_tensor();
        let (min, max) = (
            t.min_all()?.to_dtype(DType::F64)?,
            t.max_all()?.to_dtype(DType::F64)?,
        );
        if min.to_scalar::<f64>()? == max.to_scalar::<f64>()? {
            continue;
        }
        let dims = t.dims();
        let redrawn = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let half_width = (2.0 / fan_in as f64).sqrt() * 3f64.sqrt();
            let v: Vec<f64> = (0..t.elem_count())
                .map(|_| {
                    half_width * (2.0 * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 1.0)
                })
                .collect();
            Tensor::from_vec(v, dims, t.device())?.to_dtype(t.dtype())?
        } else {
            t.zeros_like()?
        };
        var.set(&redrawn)?;
    }
    Ok(())
}

/// Uniform draws in [0, 1) as f32, one per sample.
pub(crate) fn uniform(rng: &mut SeededRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
        .collect()
}

fn checkpoint_path(out: &Path, stage: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{stage}.safetensors"))
}

/// A stage's loss options: how it weighs and perturbs its samples, not what model it
/// trains. Each is `None` where not given (the stage's own default applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossOptions {
    /// stage-c: `--x0-weight-floor`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x0_weight_floor: Option<f64>,
    /// stage-c: `--timestep-shift`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_shift: Option<f64>,
    /// stage-b: `--effnet-augment`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effnet_augment: Option<f64>,
}

impl LossOptions {
    /// As command-line flags, e.g. `--timestep-shift 2 --x0-weight-floor 1`.
    pub fn flags(&self) -> String {
        [
            ("--x0-weight-floor", self.x0_weight_floor),
            ("--timestep-shift", self.timestep_shift),
            ("--effnet-augment", self.effnet_augment),
        ]
        .iter()
        .filter_map(|(flag, v)| v.map(|v| format!("{flag} {v}")))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

impl Validate for LossOptions {
    fn validate(&self) -> std::result::Result<(), String> {
        let unit = |flag: &str, v: Option<f64>| match v {
            Some(v) if !(0.0..=1.0).contains(&v) => Err(format!("{flag} {v}: must lie in [0, 1]")),
            _ => Ok(()),
        };
        unit("--x0-weight-floor", self.x0_weight_floor)?;
        unit("--effnet-augment", self.effnet_augment)?;
        match self.timestep_shift {
            Some(s) if !(s.is_finite() && s > 0.0) => {
                Err(format!("--timestep-shift {s}: must be a positive number"))
            }
            _ => Ok(()),
        }
    }
}

/// The loss options a run goes on with. Unlike the model config they may change on a
/// resume (a curriculum), but a resume that does not name one keeps the value the run
/// last used: they are saved as `checkpoints/<stage>.loss.json`, which is trusted
/// only beside a checkpoint. Returns the options in effect, `given` over saved.
pub fn run_loss_options(out: &Path, stage: &str, given: LossOptions) -> Result<LossOptions> {
    given.validate().map_err(Error::InvalidInput)?;
    let saved = out.join("checkpoints").join(format!("{stage}.loss.json"));
    let options = if checkpoint_path(out, stage).is_file() && saved.is_file() {
        let s: LossOptions = load_config(&saved)?;
        LossOptions {
            x0_weight_floor: given.x0_weight_floor.or(s.x0_weight_floor),
            timestep_shift: given.timestep_shift.or(s.timestep_shift),
            effnet_augment: given.effnet_augment.or(s.effnet_augment),
        }
    } else {
        given
    };
    save_beside_checkpoint(&saved, &options, &format!("loss options of {stage}"))?;
    Ok(options)
}

/// Writes `value` as JSON to `path` under `checkpoints/`, made if missing.
fn save_beside_checkpoint<T: Serialize>(path: &Path, value: &T, what: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidInput(format!("{what}: {e}")))?;
    write_atomically(path, json.as_bytes())
}

/// The model config a run trains. A fresh run saves it beside its checkpoint
/// (`checkpoints/<stage>.config.json`), so a resumed run rebuilds
/// the same model without being told again; otherwise it is `given` (a config.json in
/// the diffusers format, `--config`) or the stage's default. A `given` config that
/// differs from the saved one is refused: the checkpoint's tensors would not fit it.
pub fn run_config<T>(out: &Path, stage: &str, given: Option<&Path>, default: T) -> Result<T>
where
    T: Serialize + serde::de::DeserializeOwned + Validate + PartialEq,
{
    let saved = out.join("checkpoints").join(format!("{stage}.config.json"));
    let given = given.map(load_config::<T>).transpose()?;
    // trusted only beside a checkpoint: a start that failed before its first step
    // leaves nothing that binds the next one
    if checkpoint_path(out, stage).is_file() && saved.is_file() {
        let config: T = load_config(&saved)?;
        if given.as_ref().is_some_and(|g| *g != config) {
            return Err(Error::InvalidInput(format!(
                "--config differs from the config {} was started with ({}): \
                 resume without --config, or start in another --out",
                stage,
                saved.display()
            )));
        }
        return Ok(config);
    }
    let config = given.unwrap_or(default);
    config.validate().map_err(Error::InvalidInput)?;
    save_beside_checkpoint(&saved, &config, &format!("config of {stage}"))?;
    Ok(config)
}

/// One run per stage and model folder: a second writer would interleave its
/// checkpoints and exports with the first's. An OS lock on
/// `checkpoints/<stage>.lock`, held while the returned file lives, so a killed run
/// leaves nothing stale behind.
fn lock_stage(out: &Path, stage: &str) -> Result<std::fs::File> {
    let dir = out.join("checkpoints");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("{stage}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InvalidInput(format!(
            "another run is already training {stage} in {} (it holds {}): wait for it or stop it",
            out.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Runs (or resumes) training; returns the losses of the steps run now.
pub fn train(
    trainer: &mut dyn StageTrainer,
    opts: &TrainOptions,
    data: &ImageFolder,
    device: &Device,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<Vec<f64>> {
    if opts.batch_size == 0 || opts.steps == 0 {
        return Err(Error::InvalidParameter(
            "steps and batch_size must be at least 1".into(),
        ));
    }
    let _lock = lock_stage(&opts.out, trainer.name())?;
    let all = sorted_vars(trainer.varmap());
    reseed_init(&all, opts.seed)?;
    let ckpt = checkpoint_path(&opts.out, trainer.name());
    if let (Some(init), false) = (&opts.init, ckpt.is_file()) {
        init_from(init, &all)?;
    }
    let trainable: Vec<(String, Var)> = all
        .iter()
        .filter(|(n, _)| !trainer.is_buffer(n))
        .cloned()
        .collect();
    let mut opt = AdamW::new(
        trainable.clone(),
        AdamWConfig {
            lr: opts.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: opts.weight_decay,
            warmup_steps: opts.warmup_steps,
            grad_clip: opts.grad_clip,
        },
    )?;
    let mut ema = Ema::new(&trainable, opts.ema_decay)?;
    if ckpt.is_file() {
        load_checkpoint(&ckpt, &all, &mut opt, &mut ema)?;
    }
    let mut losses = Vec::new();
    while opt.step < opts.steps {
        let started = Instant::now();
        // a generator per step: a resumed run draws exactly what the first would have
        let mut rng =
            SeededRng::new(opts.seed ^ (opt.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (images, captions) = data.batch(&mut rng, opts.batch_size, device)?;
        let loss = trainer.loss(&images, &captions, &mut rng)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::InvalidInput(format!(
                "{} loss is {value} at step {}: lower the learning rate",
                trainer.name(),
                opt.step
            )));
        }
        let lr = opt.lr();
        let grads = loss.backward()?;
        let grad_norm = opt.step(&grads)?;
        ema.update(&trainable, opt.step)?;
        losses.push(value);
        let secs = started.elapsed().as_secs_f64();
        on_step(&StepReport {
            step: opt.step,
            steps: opts.steps,
            loss: value,
            lr,
            grad_norm,
            step_seconds: secs,
            samples_per_second: opts.batch_size as f64 / secs.max(1e-9),
        });
        if opt.step % opts.checkpoint_every.max(1) == 0 || opt.step == opts.steps {
            save_checkpoint(&ckpt, opts, &all, &opt, &ema)?;
            let mut weights: HashMap<String, Tensor> = ema.shadow.clone();
            for (n, v) in &all {
                weights
                    .entry(n.clone())
                    .or_insert_with(|| v.as_tensor().clone());
            }
            if opts.export_f16 {
                for t in weights.values_mut() {
                    *t = t.to_dtype(DType::F16)?;
                }
            }
            trainer.export(&weights, &opts.out)?;
        }
    }
    Ok(losses)
}

/// Sets every variable from the tensor of the same name in `path`, or, for a stage
/// whose variables carry the component's prefix (`decoder.`, `compressor.`), of that
/// name without it, as the component is exported; any dtype is cast. A variable the
/// file lacks, or holds in another shape, is an error naming it: a fine-tune starts
/// from the whole model or not at all.
pub fn init_from(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::InvalidInput(format!("--init {}: {e}", path.display())))?;
    for (name, var) in vars {
        let unprefixed = name.split_once('.').map(|(_, rest)| rest);
        let t = tensors
            .get(name)
            .or_else(|| unprefixed.and_then(|n| tensors.get(n)))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "--init {}: no tensor `{name}` in it (weights of another model?)",
                    path.display()
                ))
            })?;
        if t.dims() != var.dims() {
            return Err(Error::InvalidInput(format!(
                "--init {}: `{name}` has shape {:?}, the model {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

fn save_checkpoint(
    path: &Path,
    opts: &TrainOptions,
    all: &[(String, Var)],
    opt: &AdamW,
    ema: &Ema,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (n, v) in all {
        tensors.push((format!("var.{n}"), v.as_tensor().clone()));
    }
    for (prefix, map) in [("ema", &ema.shadow), ("m", &opt.m), ("v", &opt.v)] {
        for (n, t) in map {
            tensors.push((format!("{prefix}.{n}"), t.clone()));
        }
    }
    let metadata = HashMap::from([
        ("step".to_string(), opt.step.to_string()),
        (
            "options".to_string(),
            serde_json::to_string(opts).unwrap_or_default(),
        ),
    ]);
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomically(path, &bytes)
}

fn load_checkpoint(
    path: &Path,
    all: &[(String, Var)],
    opt: &mut AdamW,
    ema: &mut Ema,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt = |m: String| Error::Safetensors {
        path: path.to_path_buf(),
        message: m,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let step: usize = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("no step in the checkpoint metadata".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let get = |k: String| {
        tensors.get(&k).cloned().ok_or_else(|| {
            corrupt(format!(
                "tensor `{k}` missing: checkpoint of another model?"
            ))
        })
    };
    for (n, v) in all {
        let t = get(format!("var.{n}"))?;
        if t.dims() != v.dims() {
            return Err(corrupt(format!(
                "`{n}` has shape {:?}, the model {:?}",
                t.dims(),
                v.dims()
            )));
        }
        v.set(&t.to_device(v.device())?)?;
    }
    let dev = all
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    for (prefix, map) in [
        ("ema", &mut ema.shadow),
        ("m", &mut opt.m),
        ("v", &mut opt.v),
    ] {
        let names: Vec<String> = map.keys().cloned().collect();
        for n in names {
            map.insert(n.clone(), get(format!("{prefix}.{n}"))?.to_device(&dev)?);
        }
    }
    opt.step = step;
    Ok(())
}

/// A stage's output that a later stage builds on; the error says which command makes it.
pub(crate) fn require_stage(dir: &Path, what: &str, command: &str) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "no {what} at {}: run `wuerstchen train {command}` with the same --out first",
        dir.display()
    )))
}

/// BatchNorm2d's momentum for the running statistics.
const BN_MOMENTUM: f64 = 0.1;

/// Running variance starts at 1, as BatchNorm2d's (a VarMap would leave it at 0).
pub fn init_batch_norm(varmap: &VarMap, prefix: &str) -> Result<()> {
    if let Some(v) = varmap
        .data()
        .lock()
        .unwrap()
        .get(&format!("{prefix}.running_var"))
    {
        v.set(&v.as_tensor().ones_like()?)?;
    }
    Ok(())
}

/// Folds one batch's statistics into a BatchNorm's running ones (unbiased variance,
/// as PyTorch does); `n` is the number of values per channel.
pub fn fold_batch_stats(
    varmap: &VarMap,
    prefix: &str,
    mean: &Tensor,
    var: &Tensor,
    n: usize,
) -> Result<()> {
    let n = n as f64;
    let unbiased = (var * (n / (n - 1.0).max(1.0)))?;
    let data = varmap.data().lock().unwrap();
    for (stat, batch) in [("running_mean", mean), ("running_var", &unbiased)] {
        if let Some(v) = data.get(&format!("{prefix}.{stat}")) {
            let updated = ((v.as_tensor().detach() * (1.0 - BN_MOMENTUM))?
                + (batch.detach() * BN_MOMENTUM)?)?;
            v.set(&updated)?;
        }
    }
    Ok(())
}

/// Writes `config.json` and `diffusion_pytorch_model.safetensors` of one component.
pub fn write_component<C: Serialize>(
    dir: &Path,
    class_name: &str,
    config: &C,
    weights: &HashMap<String, Tensor>,
    file_name: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut sorted: Vec<(&String, &Tensor)> = weights.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let file = dir.join(file_name);
    let bytes = safetensors::serialize(sorted, None).map_err(|e| Error::Safetensors {
        path: file.clone(),
        message: e.to_string(),
    })?;
    write_atomically(&file, &bytes)?;
    write_config(dir, class_name, config)
}

/// Writes a component's `config.json`, with diffusers' `_class_name`.
pub fn write_config<C: Serialize>(dir: &Path, class_name: &str, config: &C) -> Result<()> {
    let mut json = serde_json::to_value(config).map_err(|e| Error::InvalidInput(e.to_string()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("_class_name".into(), class_name.into());
    }
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| Error::InvalidInput(e.to_string()))?;
    write_atomically(&dir.join("config.json"), text.as_bytes())
}
