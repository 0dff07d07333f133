//! `wuerstchen bench`: each component's forward pass at the official full-size configs
//! with random weights (no checkpoint needed), timed as median / min / max of N runs
//! after warm-ups, with its FLOPs (counted by `flops` as the layers run) and the peak
//! resident memory. The shapes are the default recipe's: the prior with guidance
//! (batch 2), the decoder without (batch 1); `scripts/bench_reference.py` times
//! diffusers on exactly these shapes.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, DiffNeXtConfig, PaellaVQConfig, PriorConfig};
use crate::error::{Error, Result};
use crate::flops;
use crate::kernels::linear_kind::{self, activation_dtype};
use crate::noise::NoiseSource;
use crate::pipeline::{
    self, denoise, DecoderPipelineConfig, GenerationParams, PriorPipelineConfig, Progress, Stage,
    SIZE_MULTIPLE,
};
use crate::scheduler::{default_stage_c_timesteps, DdpmWuerstchenScheduler};
use crate::stage_a::PaellaVQModel;
use crate::stage_b::WuerstchenDiffNeXt;
use crate::stage_c::WuerstchenPrior;

/// What `--component` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Prior,
    Decoder,
    VqganDecode,
    PriorTextEncoder,
    DecoderTextEncoder,
    /// The default recipe end to end: both text encoders, 29 prior calls with
    /// guidance, 12 decoder calls, the Stage A decode, one stage built at a time.
    Pipeline,
}

impl Component {
    pub const ALL: [Component; 6] = [
        Component::Prior,
        Component::Decoder,
        Component::VqganDecode,
        Component::PriorTextEncoder,
        Component::DecoderTextEncoder,
        Component::Pipeline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Prior => "prior",
            Component::Decoder => "decoder",
            Component::VqganDecode => "vqgan-decode",
            Component::PriorTextEncoder => "prior-text-encoder",
            Component::DecoderTextEncoder => "decoder-text-encoder",
            Component::Pipeline => "pipeline",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|c| c.name()).collect();
                Error::InvalidParameter(format!(
                    "unknown component `{s}` (one of {})",
                    names.join(", ")
                ))
            })
    }
}

#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub width: usize,
    pub height: usize,
    pub dtype: DType,
    /// Recorded in the results; the caller sets the thread pool before any tensor op.
    pub threads: usize,
    pub runs: usize,
    pub warmup: usize,
}

/// One line of the table, one object of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub component: String,
    pub dtype: String,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub threads: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub gflop: f64,
    pub peak_rss_mib: f64,
}

/// The default recipe's latent sizes for an image, with the official pipelines'
/// numbers (resolution_multiple 42.67, latent_dim_scale 10.67).
fn latent_sizes(spec: &BenchSpec) -> Result<((usize, usize), (usize, usize))> {
    for (what, v) in [("width", spec.width), ("height", spec.height)] {
        if v == 0 || v % SIZE_MULTIPLE != 0 {
            return Err(Error::InvalidParameter(format!(
                "{what} {v} is not a positive multiple of {SIZE_MULTIPLE}"
            )));
        }
    }
    Ok(pipeline::latent_sizes(
        spec.width,
        spec.height,
        PriorPipelineConfig::default().resolution_multiple,
        DecoderPipelineConfig::default().latent_dim_scale,
    ))
}

/// Weights drawn as they are asked for: uniform with the variance of
/// N(0, 1 / fan_in), so activations keep their scale through 32 blocks (vanishing
/// ones would turn into subnormals, which CPUs compute far slower); norms' scales 1,
/// biases and running means 0, running variances 1.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let n = s.elem_count();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let constant = match leaf {
            "running_var" => Some(1.0),
            "bias" | "beta" | "running_mean" => Some(0.0),
            "weight" | "gamma" if dims.len() == 1 => Some(1.0),
            _ => None,
        };
        let t = match constant {
            Some(v) => Tensor::full(v as f32, s, dev)?,
            None => {
                let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
                let bound = (3.0 / fan_in as f64).sqrt() as f32;
                // xorshift seeded by the name: fast (a billion values) and
                // reproducible per tensor
                let mut x = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                }) | 1;
                let data: Vec<f32> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
                    })
                    .collect();
                Tensor::from_vec(data, s, dev)?
            }
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights have no shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A model with random weights in `dtype`, built as `WeightFiles::build` builds a
/// loaded one (packed or bf16 linear layers, as [`linear_kind::build_model`] picks).
fn random_model<M>(
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    Ok(linear_kind::build_model(
        Box::new(RandomWeights),
        dtype,
        device,
        build,
    )?)
}

/// The official Stage C prior with random weights in `dtype`.
fn random_prior(dtype: DType, device: &Device) -> Result<WuerstchenPrior> {
    random_model(dtype, device, |vb| {
        WuerstchenPrior::new(&PriorConfig::official(), vb)
    })
}

/// The official Stage B decoder with random weights in `dtype`.
fn random_decoder(dtype: DType, device: &Device) -> Result<WuerstchenDiffNeXt> {
    random_model(dtype, device, |vb| {
        WuerstchenDiffNeXt::new(&DiffNeXtConfig::official(), vb)
    })
}

/// The official Stage A VQGAN with random weights in `dtype`.
fn random_vqgan(dtype: DType, device: &Device) -> Result<PaellaVQModel> {
    random_model(dtype, device, |vb| {
        PaellaVQModel::new(&PaellaVQConfig::official(), vb)
    })
}

/// Peak resident memory of this process since the last `reset_peak_rss`, in MiB
/// (Linux; 0 where /proc is missing).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Starts a new peak-memory window (writing 5 to clear_refs resets VmHWM).
pub fn reset_peak_rss() {
    crate::memory::release_free_memory();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Token ids as a prompt gives them: start, a few words, end, end-token padding.
fn prompt_ids(batch: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut row = vec![49407u32; 77];
    row[0] = 49406;
    for (i, id) in row.iter_mut().enumerate().take(9).skip(1) {
        *id = 320 + 7 * i as u32;
    }
    let mask: Vec<u32> = (0..77).map(|i| u32::from(i < 10)).collect();
    let ids = Tensor::from_vec(row.repeat(batch), (batch, 77), device)?;
    let mask = Tensor::from_vec(mask.repeat(batch), (batch, 77), device)?;
    Ok((ids, mask))
}

fn randn(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(crate::noise::SeededRng::new(1)
        .randn(shape, device)?
        .to_dtype(dtype)?)
}

/// A built component and one call of it, which reports its denoising steps (the
/// pipeline's; a single forward pass has none).
type Call = Box<dyn Fn(&mut dyn FnMut(Progress)) -> Result<Tensor>>;

fn build(component: Component, spec: &BenchSpec, device: &Device) -> Result<(usize, Call)> {
    let ((ph, pw), (dh, dw)) = latent_sizes(spec)?;
    let (wt, dt) = (spec.dtype, activation_dtype(spec.dtype, device));
    let r = |b: usize| Tensor::full(0.5f32, b, device)?.to_dtype(dt);
    Ok(match component {
        Component::Prior => {
            let cfg = PriorConfig::official();
            let model = random_prior(wt, device)?;
            // guidance's batch: one latent under the text and under no text
            let x = randn(&[1, cfg.c_in, ph, pw], dt, device)?.repeat((2, 1, 1, 1))?;
            let text = randn(&[2, 77, cfg.c_cond], dt, device)?;
            let r = r(2)?;
            (2, Box::new(move |_| Ok(model.forward(&x, &r, &text)?)))
        }
        Component::Decoder => {
            let cfg = DiffNeXtConfig::official();
            let model = random_decoder(wt, device)?;
            let x = randn(&[1, cfg.c_in, dh, dw], dt, device)?;
            let effnet = randn(&[1, cfg.effnet_embd, ph, pw], dt, device)?;
            let clip = randn(&[1, 77, cfg.clip_embd], dt, device)?;
            let r = r(1)?;
            (
                1,
                Box::new(move |_| Ok(model.forward(&x, &r, &effnet, &clip)?)),
            )
        }
        Component::VqganDecode => {
            let cfg = PaellaVQConfig::official();
            let model = random_vqgan(wt, device)?;
            let x = randn(&[1, cfg.latent_channels, dh, dw], dt, device)?;
            (1, Box::new(move |_| Ok(model.decode(&x, false)?)))
        }
        Component::PriorTextEncoder | Component::DecoderTextEncoder => {
            let (cfg, batch) = if component == Component::PriorTextEncoder {
                (ClipTextConfig::official_prior(), 2)
            } else {
                (ClipTextConfig::official_decoder(), 1)
            };
            // in the dtype the pipelines run them in
            let dtype = pipeline::text_encoder_dtype(wt, device);
            let model = random_model(dtype, device, |vb| ClipTextModel::new(&cfg, vb))?;
            let (ids, mask) = prompt_ids(batch, device)?;
            (batch, Box::new(move |_| Ok(model.forward(&ids, &mask)?)))
        }
        Component::Pipeline => {
            let spec = spec.clone();
            let device = device.clone();
            let resident = match device {
                Device::Cpu => None,
                _ => Some(Resident::build(&spec, &device)?),
            };
            (
                1,
                Box::new(move |on_step| pipeline(&spec, &device, resident.as_ref(), on_step)),
            )
        }
    })
}

/// The pipeline's models, built once and kept for every timed call on a GPU: there,
/// drawing a billion random weights on the CPU and copying them over would be most of
/// what a call measures, where the recipe itself takes seconds. The CPU run builds
/// each stage in the call, one resident at a time, as `generate` does.
struct Resident {
    prior_text: Call,
    decoder_text: Call,
    prior: WuerstchenPrior,
    decoder: WuerstchenDiffNeXt,
    vqgan: PaellaVQModel,
}

impl Resident {
    fn build(spec: &BenchSpec, device: &Device) -> Result<Self> {
        let wt = spec.dtype;
        Ok(Self {
            prior_text: build(Component::PriorTextEncoder, spec, device)?.1,
            decoder_text: build(Component::DecoderTextEncoder, spec, device)?.1,
            prior: random_prior(wt, device)?,
            decoder: random_decoder(wt, device)?,
            vqgan: random_vqgan(wt, device)?,
        })
    }
}

/// A resident model, or one built now (dropped after its stage).
fn model<M: Clone>(
    resident: Option<&M>,
    build: impl FnOnce() -> Result<M>,
) -> Result<std::borrow::Cow<'_, M>> {
    Ok(match resident {
        Some(m) => std::borrow::Cow::Borrowed(m),
        None => std::borrow::Cow::Owned(build()?),
    })
}

/// The default recipe with random weights: what `generate` does (its sampling loop),
/// minus reading files and the tokenizer.
fn pipeline(
    spec: &BenchSpec,
    device: &Device,
    resident: Option<&Resident>,
    on_step: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let ((ph, pw), (dh, dw)) = latent_sizes(spec)?;
    let (wt, dt) = (spec.dtype, activation_dtype(spec.dtype, device));
    let text = |component, resident: Option<&Call>| -> Result<Tensor> {
        let out = match resident {
            Some(call) => call(&mut |_| {})?,
            None => build(component, spec, device)?.1(&mut |_| {})?,
        };
        Ok(out.to_dtype(dt)?)
    };
    let d = GenerationParams::default();
    let mut noise = NoiseSource::seeded(1);
    type Model<'a> = &'a dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let mut sample =
        |stage, sched: &DdpmWuerstchenScheduler, shape: &[usize], guidance, model: Model| {
            denoise(
                stage,
                sched,
                shape,
                guidance,
                dt,
                device,
                &mut noise,
                &mut *on_step,
                &|| false,
                model,
            )
        };
    // batch 2: the prompt's and the negative prompt's embeddings, as guidance needs
    let prior_text = text(Component::PriorTextEncoder, resident.map(|r| &r.prior_text))?;
    let prior = model(resident.map(|r| &r.prior), || random_prior(wt, device))?;
    let prior_text = prior.condition(&prior_text)?;
    let mut sched = DdpmWuerstchenScheduler::new(Default::default());
    sched.set_timesteps(default_stage_c_timesteps());
    let latents = sample(
        Stage::Prior,
        &sched,
        &[1, 16, ph, pw],
        d.prior_guidance,
        &|x, r| prior.forward_conditioned(x, r, &prior_text),
    )?;
    // as generate does: the stage's model and text conditioning freed and the heap
    // given back before the next stage
    drop((prior, prior_text));
    crate::memory::release_free_memory();
    let pc = PriorPipelineConfig::default();
    let effnet = latents
        .affine(pc.latent_mean, -pc.latent_std)?
        .to_dtype(dt)?;
    let clip = text(
        Component::DecoderTextEncoder,
        resident.map(|r| &r.decoder_text),
    )?;
    let decoder = model(resident.map(|r| &r.decoder), || random_decoder(wt, device))?;
    let clip = decoder.condition(&clip)?;
    sched.set_steps(d.decoder_steps);
    let latents = sample(
        Stage::Decoder,
        &sched,
        &[1, 4, dh, dw],
        d.decoder_guidance,
        &|x, r| decoder.forward_conditioned(x, r, &effnet, &clip),
    )?;
    drop((decoder, clip));
    crate::memory::release_free_memory();
    let cfg = PaellaVQConfig::official();
    let vqgan = model(resident.map(|r| &r.vqgan), || random_vqgan(wt, device))?;
    let scaled = (latents * cfg.scale_factor)?.to_dtype(dt)?;
    Ok(vqgan.decode_tiled(&scaled, false, crate::stage_a::PIPELINE_DECODE_TILE)?)
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// What [`bench()`] reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum BenchEvent {
    /// A step of the pipeline's denoising loops, in a warm-up or a timed call (single
    /// forward passes have no steps).
    Step(Progress),
    /// A timed call took this many seconds.
    Timed(f64),
}

/// Times one component: builds it, runs `warmup` untimed calls and `runs` timed
/// ones, telling `on_event` of each step and each timed call.
pub fn bench(
    component: Component,
    spec: &BenchSpec,
    device: &Device,
    on_event: &mut dyn FnMut(BenchEvent),
) -> Result<BenchResult> {
    if spec.runs == 0 {
        return Err(Error::InvalidParameter("--runs must be at least 1".into()));
    }
    reset_peak_rss();
    let (batch, call) = build(component, spec, device)?;
    for _ in 0..spec.warmup {
        call(&mut |p| on_event(BenchEvent::Step(p)))?;
    }
    let mut times = Vec::with_capacity(spec.runs);
    let mut gflop = 0.0;
    for _ in 0..spec.runs {
        let started = Instant::now();
        let (out, n) = flops::counted(|| {
            call(&mut |p| on_event(BenchEvent::Step(p)))
                .and_then(|t| Ok(t.device().synchronize()?))
        });
        out?;
        let secs = started.elapsed().as_secs_f64();
        gflop = n as f64 / 1e9;
        on_event(BenchEvent::Timed(secs));
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        component: component.name().into(),
        dtype: dtype_name(spec.dtype).into(),
        width: spec.width,
        height: spec.height,
        batch,
        threads: spec.threads,
        median_s: (times[(times.len() - 1) / 2] + times[times.len() / 2]) / 2.0,
        min_s: times[0],
        max_s: times[times.len() - 1],
        gflop,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The results as a table: one row per component, GFLOP/s from the median.
pub fn table(rows: &[BenchResult]) -> String {
    let mut s = format!(
        "{:<21} {:>5} {:>11} {:>5} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}\n",
        "component",
        "dtype",
        "size",
        "batch",
        "threads",
        "median s",
        "min s",
        "max s",
        "GFLOP",
        "GFLOP/s",
        "peak MiB"
    );
    for r in rows {
        s += &format!(
            "{:<21} {:>5} {:>11} {:>5} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>8.1} {:>8.1} {:>9.0}\n",
            r.component,
            r.dtype,
            format!("{}x{}", r.width, r.height),
            r.batch,
            r.threads,
            r.median_s,
            r.min_s,
            r.max_s,
            r.gflop,
            r.gflop / r.median_s.max(1e-12),
            r.peak_rss_mib
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: usize) -> BenchSpec {
        BenchSpec {
            width: size,
            height: size,
            dtype: DType::F32,
            threads: 1,
            runs: 1,
            warmup: 0,
        }
    }

    #[test]
    fn official_latent_sizes() {
        // 1024 px: the 24 x 24 prior latent and 256 x 256 decoder latent of the paper
        assert_eq!(latent_sizes(&spec(1024)).unwrap(), ((24, 24), (256, 256)));
        assert!(latent_sizes(&spec(1000)).is_err());
    }

    #[test]
    fn the_decode_counts_the_flops_of_its_layers() {
        // Stage A decode at 128 px: 32 x 32 latent; the FLOPs scale with the pixels
        let small = bench(
            Component::VqganDecode,
            &spec(128),
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((small.batch, small.component.as_str()), (1, "vqgan-decode"));
        assert!(small.median_s > 0.0 && small.peak_rss_mib > 0.0);
        let mut events = Vec::new();
        let wide = bench(
            Component::VqganDecode,
            &BenchSpec {
                width: 256,
                runs: 3,
                warmup: 1,
                ..spec(128)
            },
            &Device::Cpu,
            &mut |e| events.push(e),
        )
        .unwrap();
        // a timed call reported per run (not the warm-up), and no steps: one forward
        // pass
        let timed: Vec<f64> = events
            .iter()
            .map(|e| match e {
                BenchEvent::Timed(s) => *s,
                BenchEvent::Step(p) => panic!("a step {p:?} in a single decode"),
            })
            .collect();
        assert_eq!(timed.len(), 3);
        assert!(timed.contains(&wide.min_s) && timed.contains(&wide.max_s));
        // 8 x 8 / 42.67 rounds 128 px to 3 prior cells (32 decoder cells), 256 px to 6
        // (64): exactly twice the work
        assert!(
            (wide.gflop / small.gflop - 2.0).abs() < 1e-9,
            "{small:?} {wide:?}"
        );
        // the official decode is ~2172 GFLOP at 1024 px (diffusers' count), a 256 x
        // 256 latent; 32 x 32 is 1/64 of it
        let expected = 2172.0 / 64.0;
        assert!(
            (small.gflop / expected - 1.0).abs() < 0.05,
            "{}",
            small.gflop
        );
    }

    #[test]
    fn unknown_components_are_named() {
        let e = Component::parse("vae").unwrap_err().to_string();
        assert!(e.contains("vae") && e.contains("vqgan-decode"), "{e}");
    }
}
