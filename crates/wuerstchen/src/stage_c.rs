//! Stage C, the text-conditional prior: diffusers' `WuerstchenPrior`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::blocks::{
    channel_layer_norm, conv1x1, r_embedding, AttnBlock, Conditioning, ResBlock, TimestepBlock,
};
use crate::config::PriorConfig;
use crate::flops::{self, Conv2d, Linear};

/// One of the `depth` repetitions: `blocks.{3i}`, `blocks.{3i+1}`, `blocks.{3i+2}`.
#[derive(Debug, Clone)]
struct PriorLayer {
    res: ResBlock,
    timestep: TimestepBlock,
    attn: AttnBlock,
}

/// The text conditioning of a [`WuerstchenPrior`], one entry per layer.
#[derive(Debug, Clone)]
pub struct PriorConditioning(Vec<Conditioning>);

#[derive(Debug, Clone)]
pub struct WuerstchenPrior {
    projection: Conv2d,
    cond_fc1: Linear,
    cond_fc2: Linear,
    layers: Vec<PriorLayer>,
    out_conv: Conv2d,
    c_r: usize,
}

impl crate::weights::FromFolder for WuerstchenPrior {
    type Config = PriorConfig;
    fn build(cfg: &PriorConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

impl WuerstchenPrior {
    pub fn new(cfg: &PriorConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.c;
        let blocks = vb.pp("blocks");
        let layers = (0..cfg.depth)
            .map(|i| {
                Ok(PriorLayer {
                    res: ResBlock::new(c, 0, 3, blocks.pp(3 * i))?,
                    timestep: TimestepBlock::new(c, cfg.c_r, blocks.pp(3 * i + 1))?,
                    attn: AttnBlock::new(c, c, cfg.nhead, true, blocks.pp(3 * i + 2))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            projection: conv1x1(cfg.c_in, c, vb.pp("projection"))?,
            // cond_mapper = Sequential(Linear, LeakyReLU(0.2), Linear)
            cond_fc1: flops::linear(cfg.c_cond, c, vb.pp("cond_mapper").pp("0"))?,
            cond_fc2: flops::linear(c, c, vb.pp("cond_mapper").pp("2"))?,
            layers,
            // out = Sequential(WuerstchenLayerNorm, Conv2d)
            out_conv: conv1x1(c, cfg.c_in * 2, vb.pp("out").pp("1"))?,
            c_r: cfg.c_r,
        })
    }

    /// x (B, c_in, h, w) noisy latents, r (B) noise level in [0, 1],
    /// c (B, L, c_cond) text embeddings -> predicted noise (B, c_in, h, w).
    pub fn forward(&self, x: &Tensor, r: &Tensor, c: &Tensor) -> Result<Tensor> {
        self.forward_conditioned(x, r, &self.condition(c)?)
    }

    /// What every step of a sampler shares: the keys and values that each AttnBlock
    /// makes of the text embeddings c (B, L, c_cond), through the cond_mapper.
    pub fn condition(&self, c: &Tensor) -> Result<PriorConditioning> {
        let c_embed = self
            .cond_fc2
            .forward(&leaky_relu(&self.cond_fc1.forward(c)?, 0.2)?)?;
        let layers = self.layers.iter();
        Ok(PriorConditioning(
            layers
                .map(|layer| layer.attn.condition(&c_embed))
                .collect::<Result<_>>()?,
        ))
    }

    /// [`forward`](Self::forward) with the text as [`condition`](Self::condition)
    /// made it.
    pub fn forward_conditioned(
        &self,
        x: &Tensor,
        r: &Tensor,
        cond: &PriorConditioning,
    ) -> Result<Tensor> {
        if cond.0.len() != self.layers.len() {
            candle_core::bail!(
                "conditioning for {} layers given to a prior of {}",
                cond.0.len(),
                self.layers.len()
            )
        }
        let x_in = x;
        let r_embed = r_embedding(r, self.c_r)?.to_dtype(x.dtype())?;
        // Under classifier-free guidance the batch is one latent twice at one noise
        // level ([x; x], [r; r]), with and without the text: the halves are the same
        // numbers until the first attention block reads the text, so that far they
        // are computed once (1.4% of a call at 1024 px).
        let (shared_r, x) = match repeated_half(x, r)? {
            Some(half) => (r_embed.narrow(0, 0, half.dim(0)?)?, half),
            None => (r_embed.clone(), x.clone()),
        };
        let mut x = self.projection.forward(&x)?;
        for (i, (layer, cond)) in self.layers.iter().zip(&cond.0).enumerate() {
            let r_embed = if i == 0 { &shared_r } else { &r_embed };
            x = layer.res.forward(&x, None)?;
            x = layer.timestep.forward(&x, r_embed)?;
            x = layer.attn.forward_conditioned(&x, cond)?;
        }
        let out = self.out_conv.forward(&channel_layer_norm(&x)?)?;
        let c_in = x_in.dim(1)?;
        let a = out.narrow(1, 0, c_in)?;
        let b = out.narrow(1, c_in, c_in)?;
        // (x_in - a) / (|1 - b| + 1e-5)
        (x_in - a)?.div(&((b.affine(-1.0, 1.0)?.abs()? + 1e-5)?))
    }
}

/// The first half of x (B, ..) when the batch is that half twice over, in x and in r
/// (B): the same values bit for bit.
fn repeated_half(x: &Tensor, r: &Tensor) -> Result<Option<Tensor>> {
    let batch = x.dim(0)?;
    if batch < 2 || batch % 2 != 0 || r.dims() != [batch] {
        return Ok(None);
    }
    let halves_equal = |t: &Tensor| -> Result<bool> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (a, b) = v.split_at(v.len() / 2);
        Ok(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()))
    };
    (halves_equal(x)? && halves_equal(r)?)
        .then(|| x.narrow(0, 0, batch / 2))
        .transpose()
}

fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    // max(x, 0) + slope * min(x, 0)
    x.relu()? + (x.minimum(0.0)? * slope)?
}
