//! The text-to-image pipeline: Stage C prior -> Stage B decoder -> Stage A, as
//! diffusers' `WuerstchenCombinedPipeline` runs it.
//!
//! Weights are loaded one stage at a time and dropped after use, so the peak memory is
//! that of the largest stage, not of all of them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::clip::ClipTextModel;
use crate::config::{load_json, DiffNeXtConfig, PriorConfig, SchedulerConfig};
use crate::error::{Error, Result};
use crate::image_io::{tensor_to_images, RgbImage};
use crate::noise::{Draw, NoiseSource, SeededRng};
use crate::scheduler::{default_stage_c_timesteps, DdpmWuerstchenScheduler};
use crate::stage_a::PaellaVQModel;
use crate::stage_b::WuerstchenDiffNeXt;
use crate::stage_c::WuerstchenPrior;
use crate::tokenizer::ClipTokenizer;
use crate::weights::FromFolder;

pub const SIZE_MULTIPLE: usize = 128;
pub const MIN_SIZE: usize = 128;
pub const MAX_SIZE: usize = 4096;
pub const MAX_IMAGES: usize = 16;
pub const MAX_STEPS: usize = 1000;
/// Calls of the default Stage C schedule.
pub const DEFAULT_PRIOR_CALLS: usize = 29;

/// Everything that decides an image. The CLI flags, the server's inputs and the PNG
/// `parameters` text are all this struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationParams {
    pub prompt: String,
    /// Used only where guidance is on (> 1).
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    /// Images per prompt.
    pub num_images: usize,
    /// None: a random seed, chosen at run time and reported.
    pub seed: Option<u64>,
    /// None: DEFAULT_STAGE_C_TIMESTEPS (29 calls); Some(n): linspace(1, 0, n + 1).
    pub prior_steps: Option<usize>,
    pub prior_guidance: f64,
    pub decoder_steps: usize,
    pub decoder_guidance: f64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 1024,
            height: 1024,
            num_images: 1,
            seed: None,
            prior_steps: None,
            prior_guidance: 4.0,
            decoder_steps: 12,
            decoder_guidance: 0.0,
        }
    }
}

impl GenerationParams {
    /// Checks every field; each error names the field, the limit and the value given.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidParameter(m));
        if self.prompt.trim().is_empty() {
            return bad("prompt is empty: give a prompt (positional argument or --prompt)".into());
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v % SIZE_MULTIPLE != 0 {
                let lower = (v / SIZE_MULTIPLE).max(1) * SIZE_MULTIPLE;
                return bad(format!(
                    "{name} {v} is not a multiple of {SIZE_MULTIPLE} (try {lower})"
                ));
            }
            if !(MIN_SIZE..=MAX_SIZE).contains(&v) {
                return bad(format!("{name} {v} is outside {MIN_SIZE}..={MAX_SIZE}"));
            }
        }
        if !(1..=MAX_IMAGES).contains(&self.num_images) {
            return bad(format!(
                "num_images {} is outside 1..={MAX_IMAGES}",
                self.num_images
            ));
        }
        for (name, v) in [
            ("prior_steps", self.prior_steps),
            ("decoder_steps", Some(self.decoder_steps)),
        ] {
            if let Some(v) = v {
                if !(1..=MAX_STEPS).contains(&v) {
                    return bad(format!("{name} {v} is outside 1..={MAX_STEPS}"));
                }
            }
        }
        for (name, v) in [
            ("prior_guidance", self.prior_guidance),
            ("decoder_guidance", self.decoder_guidance),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} {v} must be a number >= 0"));
            }
        }
        Ok(())
    }

    pub fn prior_calls(&self) -> usize {
        self.prior_steps.unwrap_or(DEFAULT_PRIOR_CALLS)
    }

    /// The PNG `parameters` text in Automatic1111's layout: prompt line, negative prompt
    /// line, then `key: value` pairs.
    pub fn parameters_text(&self, seed: Option<u64>, model: &str) -> String {
        let mut s = format!(
            "{}\nNegative prompt: {}\n",
            self.prompt, self.negative_prompt
        );
        s += &format!(
            "Steps: {}, CFG scale: {}, ",
            self.prior_calls(),
            self.prior_guidance
        );
        match seed {
            Some(seed) => s += &format!("Seed: {seed}, "),
            None => s += "Seed: none (noise file), ",
        }
        s += &format!("Size: {}x{}, Model: {model}, ", self.width, self.height);
        s += &format!(
            "Prior schedule: {}, Decoder steps: {}, Decoder CFG scale: {}, Images: {}",
            if self.prior_steps.is_some() {
                "linear"
            } else {
                "default"
            },
            self.decoder_steps,
            self.decoder_guidance,
            self.num_images
        );
        s
    }
}

/// The pipeline-level numbers of the prior folder's `model_index.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PriorPipelineConfig {
    pub latent_mean: f64,
    pub latent_std: f64,
    pub resolution_multiple: f64,
    /// The size a model declares as its own (ours; not in diffusers): the default of
    /// `--width` / `--height`, e.g. for a small model trained at 256 pixels.
    pub default_width: Option<usize>,
    pub default_height: Option<usize>,
    /// Likewise the prior guidance a model is meant to be sampled with (ours), e.g. a
    /// small model whose prior needs more than diffusers' 4 to draw what it is told.
    pub default_prior_guidance_scale: Option<f64>,
}

impl Default for PriorPipelineConfig {
    fn default() -> Self {
        Self {
            latent_mean: 42.0,
            latent_std: 1.0,
            resolution_multiple: 42.67,
            default_width: None,
            default_height: None,
            default_prior_guidance_scale: None,
        }
    }
}

/// The pipeline-level numbers of the decoder folder's `model_index.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DecoderPipelineConfig {
    pub latent_dim_scale: f64,
    /// The decoder guidance a model is meant to be sampled with (ours; diffusers' is
    /// 0), e.g. a small decoder that reads the shape from the caption.
    pub default_decoder_guidance_scale: Option<f64>,
}

impl Default for DecoderPipelineConfig {
    fn default() -> Self {
        Self {
            latent_dim_scale: 10.67,
            default_decoder_guidance_scale: None,
        }
    }
}

/// Latent and image sizes of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Stage C latent (ph, pw)
    pub prior: (usize, usize),
    /// Stage B latent (dh, dw)
    pub decoder: (usize, usize),
    /// output image (height, width)
    pub image: (usize, usize),
}

/// The dtype the text encoders are built in for stages in `dtype`: f32 on a GPU;
/// on the CPU, bf16 and f16 like the stages (16-bit linear layers on f32
/// activations: the prior's CLIP bigG in f32, 2.9 GB, was the peak of a bf16 image).
pub fn text_encoder_dtype(dtype: DType, device: &Device) -> DType {
    if crate::kernels::linear_kind::half_on_cpu(dtype, device) {
        dtype
    } else {
        DType::F32
    }
}

/// The Stage C latent (ph, pw) and Stage B latent (dh, dw) of an image, as diffusers
/// computes them: ceil(side / resolution_multiple), then times latent_dim_scale,
/// truncated.
pub fn latent_sizes(
    width: usize,
    height: usize,
    resolution_multiple: f64,
    latent_dim_scale: f64,
) -> ((usize, usize), (usize, usize)) {
    let prior = |v: usize| (v as f64 / resolution_multiple).ceil() as usize;
    let (ph, pw) = (prior(height), prior(width));
    let decoder = |v: usize| (v as f64 * latent_dim_scale) as usize;
    ((ph, pw), (decoder(ph), decoder(pw)))
}

/// Which part of the run a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prior,
    Decoder,
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub stage: Stage,
    /// Steps finished: 0 as the stage starts (its model loaded), then 1..=total
    /// after each.
    pub step: usize,
    pub total: usize,
}

/// A prior folder and a decoder folder in diffusers' layout.
#[derive(Debug, Clone)]
pub struct WuerstchenPipeline {
    pub prior_dir: PathBuf,
    pub decoder_dir: PathBuf,
    pub prior_config: PriorPipelineConfig,
    pub decoder_config: DecoderPipelineConfig,
    prior_c_in: usize,
    decoder: DiffNeXtConfig,
    pub device: Device,
    pub dtype: DType,
    /// Models kept between `generate` calls (shared by clones), when `keep_loaded`.
    loaded: Arc<Loaded>,
    keep_loaded: bool,
}

/// The five models of a pipeline that keeps them loaded, each once its stage first ran.
#[derive(Debug, Default)]
struct Loaded {
    prior_text: Mutex<Option<ClipTextModel>>,
    decoder_text: Mutex<Option<ClipTextModel>>,
    prior: Mutex<Option<WuerstchenPrior>>,
    decoder: Mutex<Option<WuerstchenDiffNeXt>>,
    vqgan: Mutex<Option<PaellaVQModel>>,
}

/// The sub-folders a prior pipeline folder must hold (`scheduler/` is optional:
/// diffusers' defaults without it).
pub const PRIOR_FOLDERS: &[&str] = &["prior", "text_encoder", "tokenizer"];
/// The sub-folders a decoder pipeline folder must hold.
pub const DECODER_FOLDERS: &[&str] = &["decoder", "vqgan", "text_encoder", "tokenizer"];

fn require_dirs(root: &Path, flag: &str, parts: &[&str]) -> Result<()> {
    if !root.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{flag} {}: no such folder (pass a diffusers pipeline folder)",
            root.display()
        )));
    }
    for part in parts {
        if !root.join(part).is_dir() {
            return Err(Error::InvalidInput(format!(
                "{flag} {}: no {part}/ folder (a {} folder holds {})",
                root.display(),
                flag.trim_start_matches('-'),
                parts
                    .iter()
                    .map(|p| format!("{p}/"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}

fn kept<T>(slot: &Mutex<Option<T>>) -> bool {
    slot.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

fn optional_json<T: Default + serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    if path.is_file() {
        load_json(path)
    } else {
        Ok(T::default())
    }
}

impl WuerstchenPipeline {
    /// Reads the folders' configs (no weights yet) and checks their layout.
    pub fn open(
        prior_dir: &Path,
        decoder_dir: &Path,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        require_dirs(prior_dir, "--prior", PRIOR_FOLDERS)?;
        require_dirs(decoder_dir, "--decoder", DECODER_FOLDERS)?;
        let prior: PriorConfig = crate::config::load_config(&prior_dir.join("prior/config.json"))?;
        let decoder: DiffNeXtConfig =
            crate::config::load_config(&decoder_dir.join("decoder/config.json"))?;
        Ok(Self {
            prior_config: optional_json(&prior_dir.join("model_index.json"))?,
            decoder_config: optional_json(&decoder_dir.join("model_index.json"))?,
            prior_dir: prior_dir.to_path_buf(),
            decoder_dir: decoder_dir.to_path_buf(),
            prior_c_in: prior.c_in,
            decoder,
            keep_loaded: false,
            device,
            dtype,
            loaded: Arc::default(),
        })
    }

    /// Whether `generate` keeps each model loaded for the next call, all five resident
    /// (the server: no reload per prediction), or loads each stage when it runs and
    /// drops it after, one resident at a time (the default: a third of the peak
    /// memory, and one call loads each model once either way). Both give the same
    /// images.
    pub fn keep_loaded(mut self, keep: bool) -> Self {
        self.keep_loaded = keep;
        self
    }

    /// Loads all five models now, where the pipeline keeps them (else nothing to do):
    /// a server's setup, so that bad weights fail the setup rather than the first
    /// prediction, which then does not wait for them.
    pub fn preload(&self) -> Result<()> {
        if self.keep_loaded {
            self.text_encoder(&self.prior_dir, &self.loaded.prior_text)?;
            self.prior()?;
            self.text_encoder(&self.decoder_dir, &self.loaded.decoder_text)?;
            self.decoder()?;
            self.vqgan()?;
        }
        Ok(())
    }

    fn text_encoder(
        &self,
        root: &Path,
        slot: &Mutex<Option<ClipTextModel>>,
    ) -> Result<ClipTextModel> {
        let dtype = text_encoder_dtype(self.dtype, &self.device);
        self.model(slot, || {
            Ok(ClipTextModel::load(&root.join("text_encoder"), dtype, &self.device)?.0)
        })
    }

    fn prior(&self) -> Result<WuerstchenPrior> {
        self.model(&self.loaded.prior, || {
            Ok(WuerstchenPrior::load(&self.prior_dir.join("prior"), self.dtype, &self.device)?.0)
        })
    }

    fn decoder(&self) -> Result<WuerstchenDiffNeXt> {
        self.model(&self.loaded.decoder, || {
            let dir = self.decoder_dir.join("decoder");
            Ok(WuerstchenDiffNeXt::load(&dir, self.dtype, &self.device)?.0)
        })
    }

    fn vqgan(&self) -> Result<PaellaVQModel> {
        self.model(&self.loaded.vqgan, || {
            Ok(PaellaVQModel::load(&self.decoder_dir.join("vqgan"), self.dtype, &self.device)?.0)
        })
    }

    /// How many of the five models are loaded and kept now.
    pub fn loaded_models(&self) -> usize {
        let l = &self.loaded;
        [
            kept(&l.prior_text),
            kept(&l.decoder_text),
            kept(&l.prior),
            kept(&l.decoder),
            kept(&l.vqgan),
        ]
        .into_iter()
        .filter(|&k| k)
        .count()
    }

    /// `load`'s model, or the one an earlier call kept in `slot`; kept for the next
    /// call when the pipeline keeps its models loaded. (Models share their tensors
    /// between clones: a clone costs no copy.)
    fn model<T: Clone>(
        &self,
        slot: &Mutex<Option<T>>,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !self.keep_loaded {
            return load();
        }
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = slot.as_ref() {
            return Ok(model.clone());
        }
        let model = load()?;
        *slot = Some(model.clone());
        Ok(model)
    }

    /// (width, height) used when the caller gives none: the prior folder's declared
    /// size, else 1024 x 1024.
    pub fn native_size(&self) -> (usize, usize) {
        let d = self.defaults();
        (d.width, d.height)
    }

    /// The parameters a caller starts from: diffusers' defaults, with the size and
    /// prior guidance the prior folder declares for itself, and the decoder guidance
    /// the decoder folder declares, where they do.
    pub fn defaults(&self) -> GenerationParams {
        let d = GenerationParams::default();
        let pc = &self.prior_config;
        GenerationParams {
            width: pc.default_width.unwrap_or(d.width),
            height: pc.default_height.unwrap_or(d.height),
            prior_guidance: pc.default_prior_guidance_scale.unwrap_or(d.prior_guidance),
            decoder_guidance: self
                .decoder_config
                .default_decoder_guidance_scale
                .unwrap_or(d.decoder_guidance),
            ..d
        }
    }

    /// A short name for the PNG metadata: the hub repository of a cached snapshot,
    /// else the prior folder's name, or for our own layout (`MODEL/prior`) the model's.
    pub fn model_name(&self) -> String {
        let dir = self
            .prior_dir
            .canonicalize()
            .unwrap_or_else(|_| self.prior_dir.clone());
        // .../models--warp-ai--wuerstchen-prior/snapshots/<hash>
        let repo = dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| {
                n.to_str()?
                    .strip_prefix("models--")
                    .map(|r| r.replace("--", "/"))
            });
        if let Some(repo) = repo {
            return repo;
        }
        let named = if dir.file_name().is_some_and(|n| n == "prior") {
            dir.parent().unwrap_or(&dir)
        } else {
            &dir
        };
        named
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "wuerstchen".into())
    }

    pub fn sizes(&self, params: &GenerationParams) -> Result<Sizes> {
        let ((ph, pw), (dh, dw)) = latent_sizes(
            params.width,
            params.height,
            self.prior_config.resolution_multiple,
            self.decoder_config.latent_dim_scale,
        );
        let multiple = self.decoder.patch_size << (self.decoder.c_hidden.len() - 1);
        if dh % multiple != 0 || dw % multiple != 0 || dh == 0 || dw == 0 {
            return Err(Error::InvalidParameter(format!(
                "size {}x{} gives a {dh}x{dw} decoder latent, which must be a non-zero multiple of {multiple} \
                 (choose a multiple of {SIZE_MULTIPLE})",
                params.width, params.height
            )));
        }
        Ok(Sizes {
            prior: (ph, pw),
            decoder: (dh, dw),
            image: (dh * 4, dw * 4),
        })
    }

    /// The prior's latents (b, c_in, ph, pw) of b images at these sizes.
    fn prior_shape(&self, b: usize, s: &Sizes) -> [usize; 4] {
        [b, self.prior_c_in, s.prior.0, s.prior.1]
    }

    /// The decoder's latents (b, c_in, dh, dw) of b images at these sizes.
    fn decoder_shape(&self, b: usize, s: &Sizes) -> [usize; 4] {
        [b, self.decoder.c_in, s.decoder.0, s.decoder.1]
    }

    /// Every random draw the run will make, in order, with its shape.
    pub fn planned_draws(&self, params: &GenerationParams) -> Result<Vec<(Draw, Vec<usize>)>> {
        let s = self.sizes(params)?;
        let b = params.num_images;
        let p = self.prior_shape(b, &s).to_vec();
        let d = self.decoder_shape(b, &s).to_vec();
        let mut draws = vec![(Draw::PriorInit, p.clone())];
        draws.extend((0..params.prior_calls()).map(|i| (Draw::PriorStep(i), p.clone())));
        draws.push((Draw::DecoderInit, d.clone()));
        draws.extend((0..params.decoder_steps).map(|i| (Draw::DecoderStep(i), d.clone())));
        Ok(draws)
    }

    /// Hidden states (n, 77, D) of n prompts, in one batch, by the text encoder of
    /// the pipeline folder `root`.
    fn encode_prompts(
        &self,
        root: &Path,
        slot: &Mutex<Option<ClipTextModel>>,
        prompts: &[&str],
    ) -> Result<Tensor> {
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let encoder = self.text_encoder(root, slot)?;
        let (ids, mask) = tokenizer.encode_tensors(prompts, &self.device)?;
        Ok(encoder.forward(&ids, &mask)?)
    }

    /// Text embeddings (B, 77, D) in f32: `num_images` copies of the prompt's, followed,
    /// when `guidance` is on, by as many of the negative prompt's.
    fn encode_text(
        &self,
        root: &Path,
        slot: &Mutex<Option<ClipTextModel>>,
        params: &GenerationParams,
        guidance: bool,
    ) -> Result<Tensor> {
        let mut prompts = vec![params.prompt.as_str()];
        if guidance {
            prompts.push(params.negative_prompt.as_str());
        }
        let hidden = self.encode_prompts(root, slot, &prompts)?; // (1 or 2, 77, D)
        let b = params.num_images;
        let (_, l, d) = hidden.dims3()?;
        // each row repeated num_images times: [cond x B, uncond x B]
        Ok(hidden
            .unsqueeze(1)?
            .broadcast_as((prompts.len(), b, l, d))?
            .reshape((prompts.len() * b, l, d))?)
    }

    /// Runs the whole pipeline. `progress` is called as each denoising stage starts
    /// and after every step; `cancel` is checked between steps.
    pub fn generate(
        &self,
        params: &GenerationParams,
        noise: &mut NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<RgbImage>> {
        params.validate()?;
        noise.check(&self.planned_draws(params)?)?;
        let sizes = self.sizes(params)?;
        let dev = self.device.clone();
        let b = params.num_images;
        // bf16 on the CPU: bf16 weights in the linear layers, f32 everywhere else
        let act = crate::kernels::linear_kind::activation_dtype(self.dtype, &dev);

        // ---- Stage C: text -> semantic latents
        let prior_cfg = uses_guidance(params.prior_guidance);
        let text = self
            .encode_text(&self.prior_dir, &self.loaded.prior_text, params, prior_cfg)?
            .to_dtype(act)?;
        let prior = self.prior()?;
        let text = prior.condition(&text)?;
        let mut sched = self.scheduler(&self.prior_dir)?;
        match params.prior_steps {
            Some(n) => sched.set_steps(n),
            None => sched.set_timesteps(default_stage_c_timesteps()),
        }
        let shape = self.prior_shape(b, &sizes);
        let latents = denoise(
            Stage::Prior,
            &sched,
            &shape,
            params.prior_guidance,
            act,
            &dev,
            noise,
            progress,
            cancel,
            |x, r| prior.forward_conditioned(x, r, &text),
        )?;
        // the text's keys and values go with the model: left in the heap among the
        // freed weights, they would split the room the next stage's tensors reuse
        drop((prior, text));
        crate::memory::release_free_memory();
        let pc = &self.prior_config;
        let image_embeddings = latents.affine(pc.latent_mean, -pc.latent_std)?;
        self.decode_embeddings(&image_embeddings, params, noise, progress, cancel)
    }

    /// How well the prior recovers known semantic features from noise, one step at a
    /// time: for each `t`, `embeddings` (B, C, h, w: a semantic compressor's features
    /// of images that `prompts` describe) are taken into the prior's latent space,
    /// noised to `t` with draws from `rng`, and estimated back from the prior's noise
    /// prediction, with each prompt and with the empty one. Errors are squared and
    /// relative to the latents' own (0: exact; 1: no better than zeros). Where the
    /// estimate from the caption is poor at the noisiest steps, the ones the sampler
    /// starts from, the sampler has nothing to go on but its own noise, so a prior can
    /// denoise well and still not draw what it is told.
    pub fn prior_denoising_errors(
        &self,
        embeddings: &Tensor,
        prompts: &[String],
        ts: &[f32],
        rng: &mut SeededRng,
    ) -> Result<Vec<DenoisingError>> {
        let b = embeddings.dim(0)?;
        if prompts.len() != b || b == 0 {
            return Err(Error::InvalidParameter(format!(
                "{} prompts for {b} image embeddings",
                prompts.len()
            )));
        }
        let pc = &self.prior_config;
        // the prior is fully convolutional: features of another map size or depth
        // would be denoised all the same (or fail deep in a conv), and give numbers
        // about nothing this prior ever generates
        let native = self.defaults();
        let want = self.prior_shape(b, &self.sizes(&native)?);
        if embeddings.dims() != want {
            return Err(Error::InvalidParameter(format!(
                "image embeddings of shape {:?}, but this prior's latent at its native {}x{} is {want:?}: \
                 is the semantic compressor the one the prior was trained on?",
                embeddings.dims(),
                native.width,
                native.height
            )));
        }
        let x0 = embeddings
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .affine(1.0 / pc.latent_mean, pc.latent_std / pc.latent_mean)?;
        // the prompts and the empty one in one batch, then the batch `generate` makes:
        // [with each prompt..., with the empty one (repeated)...]
        let mut all: Vec<&str> = prompts.iter().map(String::as_str).collect();
        all.push("");
        let hidden = self.encode_prompts(&self.prior_dir, &self.loaded.prior_text, &all)?;
        let (_, l, d) = hidden.dims3()?;
        let empty = hidden.narrow(0, b, 1)?.broadcast_as((b, l, d))?;
        let text = Tensor::cat(&[&hidden.narrow(0, 0, b)?, &empty], 0)?;
        let prior = self.prior()?;
        let sched = self.scheduler(&self.prior_dir)?;
        let x0_norm = x0.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        // as in `generate`: bf16 on the CPU keeps f32 activations
        let act = crate::kernels::linear_kind::activation_dtype(self.dtype, &self.device);
        let text = prior.condition(&text.to_dtype(act)?)?;
        let mut errors = Vec::with_capacity(ts.len());
        for &t in ts {
            let noise = rng.randn(x0.dims(), &self.device)?;
            let noisy = sched.add_noise(&x0, &noise, &vec![t; b])?;
            let r = Tensor::full(t, 2 * b, &self.device)?;
            let x = Tensor::cat(&[&noisy, &noisy], 0)?;
            let eps = prior.forward_conditioned(&x.to_dtype(act)?, &r.to_dtype(act)?, &text)?;
            let estimate = sched.estimate_x0(&eps.to_dtype(DType::F32)?, t, &x)?;
            let err = |half: usize| -> Result<f64> {
                let e = (estimate.narrow(0, half * b, b)? - &x0)?;
                Ok(e.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / x0_norm)
            };
            errors.push(DenoisingError {
                t,
                alpha_bar: sched.alpha_cumprod(t),
                with_caption: err(0)?,
                without_caption: err(1)?,
            });
        }
        Ok(errors)
    }

    /// Stage B and Stage A on given image embeddings (B, C, h, w), the prior's output
    /// in [`generate`](Self::generate): also a way to see what the decoder makes of
    /// features it was trained on (a semantic compressor's, of a real image).
    pub fn decode_embeddings(
        &self,
        image_embeddings: &Tensor,
        params: &GenerationParams,
        noise: &mut NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<RgbImage>> {
        let sizes = self.sizes(params)?;
        let dev = self.device.clone();
        let b = image_embeddings.dim(0)?;
        if b != params.num_images {
            return Err(Error::InvalidParameter(format!(
                "{b} image embeddings for {} images",
                params.num_images
            )));
        }
        let act = crate::kernels::linear_kind::activation_dtype(self.dtype, &dev);
        let image_embeddings = image_embeddings.to_device(&dev)?;

        // ---- Stage B: semantic latents + text -> Stage A latents
        let dec_cfg = uses_guidance(params.decoder_guidance);
        let clip = self
            .encode_text(
                &self.decoder_dir,
                &self.loaded.decoder_text,
                params,
                dec_cfg,
            )?
            .to_dtype(act)?;
        let effnet = if dec_cfg {
            Tensor::cat(&[&image_embeddings, &image_embeddings.zeros_like()?], 0)?
        } else {
            image_embeddings
        }
        .to_dtype(act)?;
        let decoder = self.decoder()?;
        let clip = decoder.condition(&clip)?;
        let mut sched = self.scheduler(&self.decoder_dir)?;
        sched.set_steps(params.decoder_steps);
        let shape = self.decoder_shape(b, &sizes);
        let latents = denoise(
            Stage::Decoder,
            &sched,
            &shape,
            params.decoder_guidance,
            act,
            &dev,
            noise,
            progress,
            cancel,
            |x, r| decoder.forward_conditioned(x, r, &effnet, &clip),
        )?;
        drop((decoder, clip));
        crate::memory::release_free_memory();

        // ---- Stage A: latents -> pixels
        let vqgan = self.vqgan()?;
        let scaled = (latents * vqgan.scale_factor)?.to_dtype(act)?;
        let images = vqgan.decode_tiled(&scaled, false, crate::stage_a::PIPELINE_DECODE_TILE)?;
        tensor_to_images(&images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    fn scheduler(&self, root: &Path) -> Result<DdpmWuerstchenScheduler> {
        let cfg: SchedulerConfig = optional_json(&root.join("scheduler/scheduler_config.json"))?;
        Ok(DdpmWuerstchenScheduler::new(cfg))
    }
}

/// One row of [`WuerstchenPipeline::prior_denoising_errors`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DenoisingError {
    pub t: f32,
    pub alpha_bar: f32,
    /// relative squared error of the estimate with each image's own prompt
    pub with_caption: f64,
    /// the same with the empty prompt
    pub without_caption: f64,
}

/// diffusers' `do_classifier_free_guidance`: guidance only above 1 (the negative
/// prompt is then not even encoded).
/// One stage's sampling loop: initial noise, then per timestep a (guided) model
/// call, a scheduler step with the next draw, a progress report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
    stage: Stage,
    sched: &DdpmWuerstchenScheduler,
    shape: &[usize],
    guidance: f64,
    dtype: DType,
    device: &Device,
    noise: &mut NoiseSource,
    progress: &mut dyn FnMut(Progress),
    cancel: &dyn Fn() -> bool,
    model: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let (init, step): (Draw, fn(usize) -> Draw) = match stage {
        Stage::Prior => (Draw::PriorInit, Draw::PriorStep),
        Stage::Decoder => (Draw::DecoderInit, Draw::DecoderStep),
    };
    let cfg = uses_guidance(guidance);
    let mut latents = noise.draw(init, shape, device)?;
    let timesteps = sched.timesteps();
    let calls = timesteps.len().saturating_sub(1);
    // the start, so that a bar's clock and rate count the first step too
    progress(Progress {
        stage,
        step: 0,
        total: calls,
    });
    for (i, &t) in timesteps[..calls].iter().enumerate() {
        if cancel() {
            return Err(Error::Canceled);
        }
        let eps = guided(cfg, guidance, &latents, t, dtype, &model)?;
        let z = noise.draw(step(i), shape, device)?;
        latents = sched.step(&eps, t, &latents, &z)?;
        progress(Progress {
            stage,
            step: i + 1,
            total: calls,
        });
    }
    Ok(latents)
}

fn uses_guidance(scale: f64) -> bool {
    scale > 1.0
}

/// One model call with classifier-free guidance when `cfg`: the batch
/// `[latents, latents]` against `[cond, uncond]` conditioning, combined as
/// `torch.lerp(uncond, cond, w)`. Latents stay f32; the model runs in `dtype`.
fn guided(
    cfg: bool,
    w: f64,
    latents: &Tensor,
    t: f32,
    dtype: DType,
    model: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let b = latents.dim(0)?;
    let n = if cfg { 2 * b } else { b };
    let r = Tensor::full(t, n, latents.device())?.to_dtype(dtype)?;
    let x = if cfg {
        Tensor::cat(&[latents, latents], 0)?
    } else {
        latents.clone()
    };
    let eps = model(&x.to_dtype(dtype)?, &r)?.to_dtype(DType::F32)?;
    if !cfg {
        return Ok(eps);
    }
    let cond = eps.narrow(0, 0, b)?;
    let uncond = eps.narrow(0, b, b)?;
    let diff = (&cond - &uncond)?;
    // torch.lerp's two branches, for the same rounding
    Ok(if w < 0.5 {
        (uncond + (diff * w)?)?
    } else {
        (cond - (diff * (1.0 - w))?)?
    })
}
