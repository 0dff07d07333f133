//! Stage B: the diffusion decoder on Stage A latents, conditioned on the semantic
//! compressor's features, which are trained jointly with it, and where its config has
//! attention (A) blocks, on the captions through the trained text encoder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::data::ImageFolder;
use super::text_encoder::{load_compressor, TextCondition};
use super::{
    fold_batch_stats, init_batch_norm, require_stage, uniform, write_component, write_config,
    StageTrainer,
};
use crate::compressor::{CompressorConfig, SemanticCompressor};
use crate::config::{DiffNeXtConfig, PaellaVQConfig, SchedulerConfig};
use crate::error::Result;
use crate::noise::SeededRng;
use crate::scheduler::DdpmWuerstchenScheduler;
use crate::stage_a::PaellaVQModel;
use crate::stage_b::WuerstchenDiffNeXt;
use crate::weights::FromFolder;

/// Share of samples whose effnet features are zeroed: the unconditional mode that
/// decoder guidance uses (Würstchen drops 5-10%).
const EFFNET_DROPOUT: f64 = 0.1;

pub struct StageBTrainer {
    pub config: DiffNeXtConfig,
    pub compressor_config: CompressorConfig,
    varmap: VarMap,
    decoder: WuerstchenDiffNeXt,
    compressor: SemanticCompressor,
    /// The compressor comes from `MODEL/compressor` and stays as it is (see `new`).
    frozen_compressor: bool,
    vqgan: PaellaVQModel,
    /// Stage A's config with the measured latent scale as `scale_factor`
    vqgan_config: PaellaVQConfig,
    scheduler: DdpmWuerstchenScheduler,
    /// The decoder pipeline's text encoder, for a config with attention blocks.
    text: Option<TextCondition>,
}

impl StageBTrainer {
    /// Needs the trained Stage A at `out/decoder/vqgan`, and for a config with
    /// attention blocks the trained text encoder at `out/decoder/text_encoder`.
    ///
    /// With `freeze_compressor`, the compressor an earlier run exported to
    /// `out/compressor` is loaded and left alone (inference mode: running statistics),
    /// and only the decoder trains. The text encoder and Stage C learn that frozen
    /// compressor's features, so the decoder can go on learning to draw them while
    /// they train, in parallel, and it sees exactly the features they will produce.
    pub fn new(
        config: DiffNeXtConfig,
        compressor_config: CompressorConfig,
        out: &Path,
        data: &ImageFolder,
        device: &Device,
        freeze_compressor: bool,
    ) -> Result<Self> {
        let text = config
            .level_config
            .iter()
            .any(|l| l.contains('A'))
            .then(|| TextCondition::load(out, "decoder", ("clip_embd", config.clip_embd), device))
            .transpose()?;
        let vq_dir = out.join("decoder/vqgan");
        require_stage(&vq_dir, "Stage A", "stage-a")?;
        let (vqgan, vqgan_config) = PaellaVQModel::load(&vq_dir, DType::F32, device)?;
        // Stage A's latents can come out at any scale (ours: std ~0.05), and diffusion
        // needs unit variance: measure it on the first images, as Stable Diffusion's
        // scale factor was, and record it as the VQGAN's `scale_factor`, which the
        // pipeline multiplies back before decoding.
        let probe: Vec<&Tensor> = data.images.iter().take(32).collect();
        let probe = Tensor::stack(&probe, 0)?.to_device(device)?;
        let latent_scale = vqgan.encode(&probe)?.flatten_all()?.to_dtype(DType::F64)?;
        let mean = latent_scale.mean_all()?.to_scalar::<f64>()?;
        let latent_scale = (latent_scale - mean)?
            .sqr()?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f64>()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let decoder = WuerstchenDiffNeXt::new(&config, vb.pp("decoder"))?;
        let (compressor, compressor_config) = if freeze_compressor {
            load_compressor(out, device)?
        } else {
            let c = SemanticCompressor::new(&compressor_config, vb.pp("compressor"))?;
            init_batch_norm(&varmap, "compressor.mapper.1")?;
            (c, compressor_config)
        };
        // diffusers' `_init_weights`: a zero output head (b = sigmoid(bias) instead of
        // a random scale near 1e-3 that would blow the first losses up to ~1e3) and
        // zero timestep modulation
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name == "decoder.clf.1.weight"
                || name.ends_with("mapper.weight") && !name.contains("effnet")
            {
                var.set(&var.as_tensor().zeros_like()?)?;
            }
        }
        Ok(Self {
            config,
            compressor_config,
            varmap,
            decoder,
            compressor,
            frozen_compressor: freeze_compressor,
            vqgan,
            vqgan_config: PaellaVQConfig {
                scale_factor: latent_scale,
                ..vqgan_config
            },
            scheduler: DdpmWuerstchenScheduler::new(SchedulerConfig::default()),
            text,
        })
    }
}

impl StageTrainer for StageBTrainer {
    fn name(&self) -> &'static str {
        "stage-b"
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
        // the target: Stage A latents as the pipeline decodes them (scale_factor * x)
        let latents = (self.vqgan.encode(images)? / self.vqgan_config.scale_factor)?.detach();
        let effnet = if self.frozen_compressor {
            self.compressor.forward(images)?.detach()
        } else {
            let (effnet, mean, var) = self.compressor.forward_train(images)?;
            let (_, _, h, w) = effnet.dims4()?;
            fold_batch_stats(&self.varmap, "compressor.mapper.1", &mean, &var, b * h * w)?;
            effnet
        };
        let keep: Vec<f32> = uniform(rng, b)
            .into_iter()
            .map(|u| {
                if (u as f64) < EFFNET_DROPOUT {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let effnet = effnet.broadcast_mul(&Tensor::from_vec(keep, (b, 1, 1, 1), dev)?)?;
        let t = uniform(rng, b);
        let noise = rng.randn(latents.dims(), dev)?;
        let noisy = self.scheduler.add_noise(&latents, &noise, &t)?;
        let r = Tensor::from_vec(t, b, dev)?;
        let clip = match &self.text {
            Some(text) => text.embed(captions, rng, dev)?,
            // no attention blocks: the text input is unused, any width will do
            None => Tensor::zeros((b, 1, self.config.clip_embd), DType::F32, dev)?,
        };
        let pred = self.decoder.forward(&noisy, &r, &effnet, &clip)?;
        Ok((pred - noise)?.sqr()?.mean_all()?)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        let part = |prefix: &str| -> HashMap<String, Tensor> {
            weights
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
                .collect()
        };
        let file = "diffusion_pytorch_model.safetensors";
        write_config(
            &out.join("decoder/vqgan"),
            "PaellaVQModel",
            &self.vqgan_config,
        )?;
        write_component(
            &out.join("decoder/decoder"),
            "WuerstchenDiffNeXt",
            &self.config,
            &part("decoder."),
            file,
        )?;
        if self.frozen_compressor {
            return Ok(());
        }
        write_component(
            &out.join("compressor"),
            "SemanticCompressor",
            &self.compressor_config,
            &part("compressor."),
            file,
        )
    }
}

/// The default model's Stage B: two levels over 32 x 32 latents (128 px images),
/// effnet injected at both, no attention.
pub fn default_config(clip_embd: usize) -> DiffNeXtConfig {
    DiffNeXtConfig {
        c_in: 4,
        c_out: 4,
        c_r: 32,
        patch_size: 2,
        c_cond: 64,
        c_hidden: vec![48, 96],
        nhead: vec![-1, -1],
        blocks: vec![2, 2],
        level_config: vec!["CT".into(), "CT".into()],
        inject_effnet: vec![true, true],
        effnet_embd: 16,
        clip_embd,
        kernel_size: 3,
        dropout: crate::config::DropoutSpec::One(0.0),
    }
}
