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
    /// Share of samples whose features are degraded (see `degrade_features`); 0 by
    /// default, as a diffusers-trained decoder sees them.
    pub effnet_augment: f64,
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
        // zero timestep modulation (the TimestepBlocks' `mapper`). The text's
        // `clip_mapper` stays random, as there: zeroed, every token would map to its
        // bias, and the LayerNorm after it (no affine) would see a constant input, where
        // its gradient is 1 / sqrt(eps) = 1e3 and swamps the clipped global norm.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name == "decoder.clf.1.weight" || name.ends_with(".mapper.weight") {
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
            effnet_augment: 0.0,
        })
    }
}

/// Conditioning augmentation (Ho et al., "Cascaded Diffusion Models", 2021): a Stage C
/// sample is rougher than the features a decoder trains on, blurred where the prior is
/// unsure of an outline. A decoder that only ever saw true features copies their fine
/// detail and, given a blob, draws a blob. For the samples picked (a `share` of them),
/// each gets a strength w ~ U(0, 1): the features move a fraction w towards a 5 x 5
/// blur of themselves and take Gaussian noise of w * 0.3 of their spread, so that only
/// the caption (through the attention blocks) still says which shape it is.
fn degrade_features(effnet: &Tensor, share: f64, rng: &mut SeededRng) -> Result<Tensor> {
    let b = effnet.dim(0)?;
    let picked = uniform(rng, b);
    let strength = uniform(rng, b);
    let w: Vec<f32> = picked
        .iter()
        .zip(&strength)
        .map(|(&p, &s)| if (p as f64) < share { s } else { 0.0 })
        .collect();
    let dev = effnet.device();
    let w = Tensor::from_vec(w, (b, 1, 1, 1), dev)?;
    // two 3 x 3 box blurs, edges repeated so that a corner shape keeps its weight
    let box3 = |x: &Tensor| -> Result<Tensor> {
        Ok(x.pad_with_same(2, 1, 1)?
            .pad_with_same(3, 1, 1)?
            .avg_pool2d_with_stride((3, 3), (1, 1))?)
    };
    let blurred = box3(&box3(effnet)?)?;
    let spread = effnet.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()? as f64;
    let noise = (rng.randn(effnet.dims(), dev)? * (0.3 * spread))?;
    let shift = ((blurred - effnet)? + noise)?;
    Ok((effnet + shift.broadcast_mul(&w)?)?)
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
        // degraded before the dropout, so that the unconditional mode stays all zeros
        let effnet = if self.effnet_augment > 0.0 {
            degrade_features(&effnet, self.effnet_augment, rng)?
        } else {
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

/// The Stage B `train stage-b` builds without `--config` (the shipped model's is
/// `scripts/default_model/decoder.json`): two levels over 32 x 32 latents (128 px
/// images), effnet injected at both, no attention.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 copies of a 12 x 12 map that is zero but for a spike of 1 in the middle.
    fn spikes() -> Tensor {
        let mut v = vec![0f32; 12 * 12];
        v[6 * 12 + 6] = 1.0;
        Tensor::from_vec(v, (1, 1, 12, 12), &Device::Cpu)
            .unwrap()
            .repeat((64, 2, 1, 1))
            .unwrap()
    }

    fn mean_at(x: &Tensor, y: usize, xx: usize) -> f32 {
        x.narrow(2, y, 1)
            .unwrap()
            .narrow(3, xx, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn degraded_features_spread_a_spike_to_its_neighbours() {
        let f = spikes();
        let kept = degrade_features(&f, 0.0, &mut SeededRng::new(1)).unwrap();
        let diff = (&kept - &f).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            diff.to_scalar::<f32>().unwrap(),
            0.0,
            "share 0 leaves them alone"
        );

        let d = degrade_features(&f, 1.0, &mut SeededRng::new(1)).unwrap();
        assert_eq!(d.dims(), f.dims());
        // the 5 x 5 blur, (1 2 3 2 1) / 9 each way, keeps 1/9 of the spike in place and
        // gives 2/27 to each neighbour; w ~ U(0, 1) moves half of the way on average
        let (centre, next, far) = (mean_at(&d, 6, 6), mean_at(&d, 6, 7), mean_at(&d, 6, 10));
        assert!((0.4..0.75).contains(&centre), "centre {centre}");
        assert!((0.02..0.15).contains(&next), "neighbour {next}");
        assert!(
            far.abs() < 0.02,
            "three cells off the blur reaches nothing: {far}"
        );
    }
}
