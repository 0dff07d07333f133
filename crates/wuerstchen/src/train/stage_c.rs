//! Stage C: the text-conditional prior on the frozen semantic compressor's features,
//! with the frozen text encoder, caption dropout for guidance and P2 loss weighting.
//! Exporting it completes both pipeline folders (`MODEL/prior`, `MODEL/decoder`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;

use super::text_encoder::{load_compressor, TextCondition};
use super::{uniform, write_component, StageTrainer};
use crate::compressor::SemanticCompressor;
use crate::config::{PriorConfig, SchedulerConfig};
use crate::error::{Error, Result};
use crate::image_io::write_atomically;
use crate::noise::SeededRng;
use crate::scheduler::DdpmWuerstchenScheduler;
use crate::stage_c::WuerstchenPrior;

pub struct StageCTrainer {
    pub config: PriorConfig,
    varmap: VarMap,
    prior: WuerstchenPrior,
    compressor: SemanticCompressor,
    text: TextCondition,
    scheduler: DdpmWuerstchenScheduler,
    image_size: usize,
    /// side of the compressor's feature map at `image_size`
    feature_side: usize,
    /// declared in the exported model_index.json as the model's own prior guidance
    pub default_guidance: Option<f64>,
    /// the least weight a sample's error gets in terms of the clean latent (0: P2)
    pub x0_weight_floor: f64,
    /// > 1 draws more of the noisiest timesteps (see [`shift_timestep`]); 1: uniform
    pub timestep_shift: f64,
}

/// SD3's timestep shift: maps a uniform draw u in [0, 1] to s u / (1 + (s - 1) u), so
/// that s > 1 draws the noisy end more often (s = 3: a quarter of the draws above
/// t = 0.9 instead of a tenth) while keeping both ends. The noisiest steps are where
/// a prior must learn to place things from the caption alone, and where a small one
/// learns slowest.
pub fn shift_timestep(u: f32, shift: f64) -> f32 {
    let u = u as f64;
    (shift * u / (1.0 + (shift - 1.0) * u)) as f32
}

impl StageCTrainer {
    /// Needs the compressor (stage-b) and the text encoder (text-encoder) in `out`.
    pub fn new(
        config: PriorConfig,
        out: &Path,
        image_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let (compressor, _) = load_compressor(out, device)?;
        let text = TextCondition::load(out, "prior", ("c_cond", config.c_cond), device)?;
        let probe = Tensor::zeros((1, 3, image_size, image_size), DType::F32, device)?;
        let feature_side = compressor.forward(&probe)?.dim(2)?;
        let varmap = VarMap::new();
        let prior = WuerstchenPrior::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        // a zero output head: the prediction starts as eps = x (b = 0), far from the
        // pole of (x - a) / (|1 - b| + 1e-5) at b = 1 that a random head can sit on
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.starts_with("out.1.") || name.ends_with("mapper.weight") {
                var.set(&var.as_tensor().zeros_like()?)?;
            }
        }
        Ok(Self {
            config,
            varmap,
            prior,
            compressor,
            text,
            scheduler: DdpmWuerstchenScheduler::new(SchedulerConfig::default()),
            image_size,
            feature_side,
            default_guidance: None,
            x0_weight_floor: 0.0,
            timestep_shift: 1.0,
        })
    }
}

impl StageTrainer for StageCTrainer {
    fn name(&self) -> &'static str {
        "stage-c"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn loss(
        &mut self,
        images: &Tensor,
        captions: &[String],
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        let dev = images.device();
        let b = images.dim(0)?;
        // targets: the compressor's features (latent_mean 1, latent_std 0 in the
        // pipeline, so the prior works in effnet space directly)
        let x0 = self.compressor.forward(images)?.detach();
        let text = self.text.embed(captions, rng, dev)?;
        let t: Vec<f32> = uniform(rng, b)
            .into_iter()
            .map(|u| shift_timestep(u, self.timestep_shift))
            .collect();
        let noise = rng.randn(x0.dims(), dev)?;
        let noisy = self.scheduler.add_noise(&x0, &noise, &t)?;
        let r = Tensor::from_vec(t.clone(), b, dev)?;
        let pred = self.prior.forward(&noisy, &r, &text)?;
        // P2 weighting (1 + abar / (1 - abar))^-1 = 1 - abar. An error e in the clean
        // latent is one of sqrt(abar / (1 - abar)) e in the noise, so P2 weighs it by
        // abar: ~0 at the noisiest steps. With a floor F it weighs it by max(abar, F).
        let w: Vec<f32> = t
            .iter()
            .map(|&t| {
                let abar = self.scheduler.alpha_cumprod(t) as f64;
                ((1.0 - abar) * (self.x0_weight_floor / abar).max(1.0)) as f32
            })
            .collect();
        let w = Tensor::from_vec(w, (b, 1, 1, 1), dev)?;
        Ok((pred - noise)?.sqr()?.broadcast_mul(&w)?.mean_all()?)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        write_component(
            &out.join("prior/prior"),
            "WuerstchenPrior",
            &self.config,
            weights,
            "diffusion_pytorch_model.safetensors",
        )?;
        // the pipeline-level numbers that make the sizes follow this model
        let (resolution_multiple, latent_dim_scale) =
            size_ratios(self.image_size, self.feature_side);
        // the component table diffusers' model_index.json carries, then our numbers
        let shared = json!({
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        });
        let with_shared = |mut index: serde_json::Value| {
            if let (Some(i), Some(s)) = (index.as_object_mut(), shared.as_object()) {
                i.extend(s.clone());
            }
            index
        };
        let mut prior_index = with_shared(json!({
            "_class_name": "WuerstchenPriorPipeline",
            "prior": ["diffusers", "WuerstchenPrior"],
            "latent_mean": 1.0,
            "latent_std": 0.0,
            "resolution_multiple": resolution_multiple,
            "default_width": self.image_size,
            "default_height": self.image_size,
        }));
        if let Some(g) = self.default_guidance {
            prior_index["default_prior_guidance_scale"] = json!(g);
        }
        let decoder_index = with_shared(json!({
            "_class_name": "WuerstchenDecoderPipeline",
            "decoder": ["diffusers", "WuerstchenDiffNeXt"],
            "vqgan": ["diffusers", "PaellaVQModel"],
            "latent_dim_scale": latent_dim_scale,
        }));
        let scheduler =
            serde_json::to_string_pretty(&SchedulerConfig::default()).unwrap_or_default();
        for (pipeline, ours) in [("prior", prior_index), ("decoder", decoder_index)] {
            let root = out.join(pipeline);
            let path = root.join("model_index.json");
            // laid over the file an earlier export left, so that what was set there by
            // hand or by an earlier run (a decoder's default guidance, a prior's given
            // with --default-prior-guidance then) outlives this export
            let earlier = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let index = match (earlier, ours) {
                (Some(serde_json::Value::Object(mut e)), serde_json::Value::Object(o)) => {
                    e.extend(o);
                    serde_json::Value::Object(e)
                }
                (_, ours) => ours,
            };
            let text = serde_json::to_string_pretty(&index).unwrap_or_default();
            write_atomically(&path, text.as_bytes())?;
            std::fs::create_dir_all(root.join("scheduler")).map_err(|e| Error::io(&root, e))?;
            write_atomically(
                &root.join("scheduler/scheduler_config.json"),
                scheduler.as_bytes(),
            )?;
        }
        Ok(())
    }
}

/// model_index.json's `resolution_multiple` and `latent_dim_scale` for a model whose
/// `image_size` px images make `side` x `side` semantic maps and Stage A latents a
/// quarter of their side. diffusers sizes the latents as ceil(size /
/// resolution_multiple) and int(that * latent_dim_scale): where a ratio is not a whole
/// number (128 px over a 12 x 12 map), it is nudged a hair larger, so that f64
/// rounding cannot push the first past or the second short of the whole number (the
/// unnudged ratios miss by one at some sizes, e.g. 256 px over a 49-cell map).
pub fn size_ratios(image_size: usize, side: usize) -> (f64, f64) {
    let nudge = |r: f64| {
        if r.fract() == 0.0 {
            r
        } else {
            r * (1.0 + 1e-9)
        }
    };
    (
        nudge(image_size as f64 / side as f64),
        nudge((image_size / 4) as f64 / side as f64),
    )
}

/// The prior `train stage-c` builds without `--config`: 4 layers of 128 channels, the
/// earlier 8 x 8 default model's (the shipped one is `scripts/default_model/prior.json`).
pub fn default_config(c_cond: usize) -> PriorConfig {
    PriorConfig {
        c_in: 16,
        c: 128,
        c_cond,
        c_r: 32,
        depth: 4,
        nhead: 4,
        dropout: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the map, the exported ratios give back the trained sizes through
    /// diffusers' arithmetic, at the native size and at twice and three times it.
    #[test]
    fn exported_ratios_give_back_the_map_and_latent_sizes() {
        let mut nudged = 0;
        for image in [32usize, 64, 96, 128, 256] {
            for side in 1..=image / 4 {
                let (rm, lds) = size_ratios(image, side);
                nudged += usize::from(rm.fract() != 0.0);
                for k in 1..=3 {
                    let size = image * k;
                    let (prior, decoder) = crate::pipeline::latent_sizes(size, size, rm, lds);
                    assert_eq!(prior, (side * k, side * k), "{image} px, side {side}, x{k}");
                    assert_eq!(
                        decoder,
                        (size / 4, size / 4),
                        "{image} px, side {side}, x{k}"
                    );
                }
            }
        }
        assert!(nudged > 100);
        // whole ratios are written as they are
        assert_eq!(size_ratios(128, 8), (16.0, 4.0));
    }

    #[test]
    fn the_timestep_shift_keeps_the_ends_and_draws_more_noise() {
        for shift in [1.0, 3.0] {
            assert_eq!(shift_timestep(0.0, shift), 0.0);
            assert!((shift_timestep(1.0, shift) - 1.0).abs() < 1e-6);
        }
        // no shift: the draw itself
        assert_eq!(shift_timestep(0.37, 1.0), 0.37);
        // shift 3: monotone, and a quarter of uniform draws land above 0.9
        let n = 10_000;
        let t: Vec<f32> = (0..n)
            .map(|i| shift_timestep(i as f32 / n as f32, 3.0))
            .collect();
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        let above = t.iter().filter(|&&t| t > 0.9).count() as f64 / n as f64;
        assert!((above - 0.25).abs() < 0.002, "{above}");
    }
}
