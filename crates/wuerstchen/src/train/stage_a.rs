//! Stage A: the VQGAN, trained on reconstruction with a straight-through codebook.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{fold_batch_stats, init_batch_norm, write_component, StageTrainer};
use crate::config::PaellaVQConfig;
use crate::error::Result;
use crate::noise::SeededRng;
use crate::stage_a::PaellaVQModel;

/// Weight of the commitment term (the encoder pulled towards its codes), as diffusers'
/// `VectorQuantizer(beta=0.25)`.
const COMMITMENT: f64 = 0.25;
/// Side of the training crops (a multiple of 4, the VQGAN's factor).
const CROP: usize = 32;

pub struct StageATrainer {
    pub config: PaellaVQConfig,
    varmap: VarMap,
    model: PaellaVQModel,
}

impl StageATrainer {
    pub fn new(config: PaellaVQConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = PaellaVQModel::new(&config, vb.clone())?;
        let trainer = Self {
            config,
            varmap,
            model,
        };
        init_batch_norm(&trainer.varmap, &trainer.bn_prefix())?;
        Ok(trainer)
    }

    /// The encoder's closing BatchNorm.
    fn bn_prefix(&self) -> String {
        format!("down_blocks.{}.1", self.config.levels * 2 - 1)
    }
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

impl StageTrainer for StageATrainer {
    fn name(&self) -> &'static str {
        "stage-a"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn loss(&mut self, images: &Tensor, _: &[String], rng: &mut SeededRng) -> Result<Tensor> {
        // The VQGAN is fully convolutional: train it on random crops, 16x cheaper at
        // 128 px than whole images, and apply it to any size afterwards.
        let (_, _, ih, iw) = images.dims4()?;
        let crop = |side: usize, rng: &mut SeededRng| -> usize {
            if side > CROP {
                (rng.next_u64() % ((side - CROP) / 4 + 1) as u64) as usize * 4
            } else {
                0
            }
        };
        let (y0, x0) = (crop(ih, rng), crop(iw, rng));
        let images = &images
            .narrow(2, y0, ih.min(CROP))?
            .narrow(3, x0, iw.min(CROP))?
            .contiguous()?;
        let (z, mean, var) = self.model.encode_train(images)?;
        let (b, c, h, w) = z.dims4()?;
        let idx = self.model.quantize_indices(&z.detach())?;
        // (B*H*W, C) codes -> (B, C, H, W)
        let q = self
            .model
            .codebook()
            .embedding(&idx)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?;
        // straight-through: the decoder sees the codes, the encoder gets its gradient
        let zq = (&z + (&q - &z)?.detach())?;
        let rec = self.model.decode(&zq, false)?;
        let loss = ((mse(&rec, images)? + (mse(&z, &q.detach())? * COMMITMENT)?)?
            + mse(&q, &z.detach())?)?;
        fold_batch_stats(&self.varmap, &self.bn_prefix(), &mean, &var, b * h * w)?;
        Ok(loss)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        write_component(
            &out.join("decoder/vqgan"),
            "PaellaVQModel",
            &self.config,
            weights,
            "diffusion_pytorch_model.safetensors",
        )
    }
}

/// The default model's Stage A: f = 4, 4 latent channels, a 256-entry codebook, and
/// no latent scaling (its BatchNorm already yields unit-variance latents).
pub fn default_config() -> PaellaVQConfig {
    PaellaVQConfig {
        levels: 2,
        bottleneck_blocks: 2,
        embed_dim: 64,
        latent_channels: 4,
        num_vq_embeddings: 256,
        scale_factor: 1.0,
        ..PaellaVQConfig::default()
    }
}
