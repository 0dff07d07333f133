//! Stage B, the diffusion decoder: diffusers' `WuerstchenDiffNeXt`.
//!
//! A UNet over patches of the Stage A latent, conditioned on the noise level, on CLIP
//! text embeddings (through attention) and on Stage C's semantic latent ("effnet"),
//! which is resized to every level's resolution and joined to the ResBlocks' skips.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};

use crate::blocks::{
    channel_layer_norm, conv1x1, conv2d, depthwise, r_embedding, AttnBlock, ChannelMlp,
    TimestepBlock,
};
use crate::config::DiffNeXtConfig;
use crate::depthwise::DepthwiseConv2d;
use crate::flops::{self, Conv2d, ConvTranspose2d, Linear};
use crate::kernels;
use crate::resize::resize_bicubic_aa;

/// `ResBlockStageB`: unlike Stage C's ResBlock the skip joins after the depthwise conv,
/// so the depthwise conv sees only `c` channels.
#[derive(Debug, Clone)]
pub struct ResBlockStageB {
    depthwise: DepthwiseConv2d,
    channelwise: ChannelMlp,
}

impl ResBlockStageB {
    pub fn new(c: usize, c_skip: usize, kernel_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            depthwise: depthwise(c, c, kernel_size, vb.pp("depthwise"))?,
            channelwise: ChannelMlp::new(c + c_skip, c * 4, c, vb.pp("channelwise"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, x_skip: Option<&Tensor>) -> Result<Tensor> {
        let t = channel_layer_norm(&self.depthwise.forward(x)?)?;
        let t = match x_skip {
            Some(s) => Tensor::cat(&[&t, s], 1)?,
            None => t,
        };
        self.channelwise.forward(&t)? + x
    }
}

#[derive(Debug, Clone)]
enum Block {
    Res(ResBlockStageB),
    Timestep(TimestepBlock),
    Attn(AttnBlock),
}

/// `Sequential(WuerstchenLayerNorm, Conv2d(k=2, s=2))` at the start of a down level.
#[derive(Debug, Clone)]
struct Downsample(Conv2d);

/// `Sequential(WuerstchenLayerNorm, ConvTranspose2d(k=2, s=2))` at the end of an up level.
#[derive(Debug, Clone)]
struct Upsample(ConvTranspose2d);

#[derive(Debug, Clone)]
struct Level<S> {
    blocks: Vec<Block>,
    /// Downsample before the blocks / upsample after them; none on the top level.
    resample: Option<S>,
    effnet_mapper: Option<Conv2d>,
}

#[derive(Debug, Clone)]
pub struct WuerstchenDiffNeXt {
    clip_mapper: Linear,
    embedding: Conv2d,
    down: Vec<Level<Downsample>>,
    up: Vec<Level<Upsample>>,
    clf: Conv2d,
    c_r: usize,
    patch_size: usize,
}

impl crate::weights::FromFolder for WuerstchenDiffNeXt {
    type Config = DiffNeXtConfig;
    fn build(cfg: &DiffNeXtConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

impl WuerstchenDiffNeXt {
    pub fn new(cfg: &DiffNeXtConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.c_hidden.len();
        let ch = &cfg.c_hidden;
        let p2 = cfg.patch_size * cfg.patch_size;
        let block = |kind: char, level: usize, c_skip: usize, vb: VarBuilder| -> Result<Block> {
            let c = ch[level];
            Ok(match kind {
                'C' => Block::Res(ResBlockStageB::new(c, c_skip, cfg.kernel_size, vb)?),
                'T' => Block::Timestep(TimestepBlock::new(c, cfg.c_r, vb)?),
                _ => Block::Attn(AttnBlock::new(
                    c,
                    cfg.c_cond,
                    cfg.nhead[level] as usize,
                    true,
                    vb,
                )?),
            })
        };
        // effnet_mappers: one slot per down level then per up level (deepest first);
        // absent levels are `None` in the ModuleList, so their indices are skipped.
        let inject_at = |slot: usize| -> bool {
            if slot < n {
                cfg.inject_effnet[slot]
            } else {
                cfg.inject_effnet[2 * n - 1 - slot]
            }
        };
        let mapper = |slot: usize| -> Result<Option<Conv2d>> {
            inject_at(slot)
                .then(|| {
                    conv1x1(
                        cfg.effnet_embd,
                        cfg.c_cond,
                        vb.pp("effnet_mappers").pp(slot),
                    )
                })
                .transpose()
        };

        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let vbl = vb.pp("down_blocks").pp(i);
            let mut idx = 0;
            let resample = if i > 0 {
                idx = 1;
                let cfg2 = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(Downsample(conv2d(
                    ch[i - 1],
                    ch[i],
                    2,
                    cfg2,
                    true,
                    vbl.pp("0").pp("1"),
                )?))
            } else {
                None
            };
            let c_skip = if cfg.inject_effnet[i] { cfg.c_cond } else { 0 };
            let mut blocks = Vec::new();
            for _ in 0..cfg.blocks[i] {
                for kind in cfg.level_config[i].chars() {
                    blocks.push(block(kind, i, c_skip, vbl.pp(idx))?);
                    idx += 1;
                }
            }
            down.push(Level {
                blocks,
                resample,
                effnet_mapper: mapper(i)?,
            });
        }

        let mut up = Vec::with_capacity(n);
        for (ui, i) in (0..n).rev().enumerate() {
            let vbl = vb.pp("up_blocks").pp(ui);
            let mut blocks = Vec::new();
            for j in 0..cfg.blocks[i] {
                for (k, kind) in cfg.level_config[i].chars().enumerate() {
                    let mut c_skip = if i < n - 1 && j == 0 && k == 0 {
                        ch[i]
                    } else {
                        0
                    };
                    if cfg.inject_effnet[i] {
                        c_skip += cfg.c_cond;
                    }
                    blocks.push(block(kind, i, c_skip, vbl.pp(blocks.len()))?);
                }
            }
            let resample = if i > 0 {
                let vbr = vbl.pp(blocks.len()).pp("1");
                let cfg2 = ConvTranspose2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(Upsample(flops::conv_transpose2d(
                    ch[i],
                    ch[i - 1],
                    2,
                    cfg2,
                    vbr,
                )?))
            } else {
                None
            };
            up.push(Level {
                blocks,
                resample,
                effnet_mapper: mapper(n + ui)?,
            });
        }

        Ok(Self {
            clip_mapper: flops::linear(cfg.clip_embd, cfg.c_cond, vb.pp("clip_mapper"))?,
            // embedding = Sequential(PixelUnshuffle, Conv2d, WuerstchenLayerNorm)
            embedding: conv1x1(cfg.c_in * p2, ch[0], vb.pp("embedding").pp("1"))?,
            down,
            up,
            // clf = Sequential(WuerstchenLayerNorm, Conv2d, PixelShuffle)
            clf: conv1x1(ch[0], 2 * cfg.c_out * p2, vb.pp("clf").pp("1"))?,
            c_r: cfg.c_r,
            patch_size: cfg.patch_size,
        })
    }

    /// x (B, c_in, H, W) noisy Stage A latents, r (B) noise level, effnet (B, 16, h, w)
    /// Stage C latents in effnet space, clip (B, L, clip_embd) -> predicted noise.
    pub fn forward(
        &self,
        x: &Tensor,
        r: &Tensor,
        effnet: &Tensor,
        clip: &Tensor,
    ) -> Result<Tensor> {
        let r_embed = r_embedding(r, self.c_r)?.to_dtype(x.dtype())?;
        // gen_c_embeddings: clip_mapper then a LayerNorm without affine
        let clip = kernels::layer_norm::layer_norm(&self.clip_mapper.forward(clip)?, 1e-6)?;

        let x_in = x;
        let h = candle_nn::ops::pixel_unshuffle(x, self.patch_size)?;
        let h = channel_layer_norm(&self.embedding.forward(&h)?)?;

        // _down_encode: keep every level's output, deepest first
        let mut levels: Vec<Tensor> = Vec::with_capacity(self.down.len());
        let mut h = h;
        for level in &self.down {
            if let Some(Downsample(conv)) = &level.resample {
                h = conv.forward(&channel_layer_norm(&h)?)?;
            }
            let effnet_c = self.effnet_at(level.effnet_mapper.as_ref(), effnet, &h)?;
            for block in &level.blocks {
                h = self.run_block(block, &h, effnet_c.as_ref(), &r_embed, &clip)?;
            }
            levels.insert(0, h.clone());
        }

        // _up_decode
        let mut h = levels[0].clone();
        for (i, level) in self.up.iter().enumerate() {
            let effnet_c = self.effnet_at(level.effnet_mapper.as_ref(), effnet, &h)?;
            for (j, block) in level.blocks.iter().enumerate() {
                let skip = match (j == 0 && i > 0, &effnet_c) {
                    (true, Some(e)) => Some(Tensor::cat(&[&levels[i], e], 1)?),
                    (true, None) => Some(levels[i].clone()),
                    (false, e) => e.clone(),
                };
                h = self.run_block(block, &h, skip.as_ref(), &r_embed, &clip)?;
            }
            if let Some(Upsample(conv)) = &level.resample {
                h = conv.forward(&channel_layer_norm(&h)?)?;
            }
        }

        let out = self.clf.forward(&channel_layer_norm(&h)?)?;
        let out = candle_nn::ops::pixel_shuffle(&out, self.patch_size)?;
        let c = out.dim(1)? / 2;
        let a = out.narrow(1, 0, c)?;
        // b = sigmoid(b) * (1 - 2 eps) + eps with eps = 1e-3
        let b = candle_nn::ops::sigmoid(&out.narrow(1, c, c)?)?.affine(1.0 - 2e-3, 1e-3)?;
        (x_in - a)?.div(&b)
    }

    /// The effnet latents resized to this level (bicubic, antialiased, in f32) and
    /// mapped to c_cond channels; None where the level has no injection.
    fn effnet_at(
        &self,
        mapper: Option<&Conv2d>,
        effnet: &Tensor,
        h: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(mapper) = mapper else {
            return Ok(None);
        };
        let (_, _, hh, ww) = h.dims4()?;
        Ok(Some(mapper.forward(&resize_bicubic_aa(effnet, hh, ww)?)?))
    }

    fn run_block(
        &self,
        block: &Block,
        x: &Tensor,
        skip: Option<&Tensor>,
        r_embed: &Tensor,
        clip: &Tensor,
    ) -> Result<Tensor> {
        match block {
            Block::Res(b) => b.forward(x, skip),
            Block::Timestep(b) => b.forward(x, r_embed),
            Block::Attn(b) => b.forward(x, clip),
        }
    }
}
