//! Stage B, the diffusion decoder: diffusers' `WuerstchenDiffNeXt`.
//!
//! A UNet over patches of the Stage A latent, conditioned on the noise level, on CLIP
//! text embeddings (through attention) and on Stage C's semantic latent ("effnet"),
//! which is resized to every level's resolution and joined to the ResBlocks' skips.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};

use crate::blocks::{
    channel_layer_norm, conv1x1, conv2d, depthwise, r_embedding, AttnBlock, ChannelMlp,
    Conditioning, TimestepBlock,
};
use crate::config::DiffNeXtConfig;
use crate::depthwise::DepthwiseConv2d;
use crate::flops::{self, Conv2d, ConvTranspose2d, Linear};
use crate::kernels;
use crate::kernels::linear_kind;
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

    /// The block with its level's effnet mapper folded into the first channelwise
    /// layer, for inference: the last `c_cond` of its `c_skip` inputs are the mapper's
    /// outputs `M e + m`, and a linear layer of a linear map is one linear map, so the
    /// layer takes the resized latent `e` itself (`effnet_embd` = 16 channels) with
    /// weight `W_e M` and bias `b + W_e m`. At 1024 px that is a sixth of the
    /// decoder's work (its injected levels' first layers read 1024 mapped channels
    /// beside 640 or 1280 of their own) done once, at load time, in f64.
    fn folded(
        c: usize,
        c_skip: usize,
        kernel_size: usize,
        mapper: &MapperWeights,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vbc = vb.pp("channelwise");
        let (c_in, c_hidden) = (c + c_skip, c * 4);
        let weight = vbc.pp("0").get((c_hidden, c_in), "weight")?;
        let bias = vbc.pp("0").get(c_hidden, "bias")?;
        let kept = c_in - mapper.weight.dim(0)?;
        // (c_hidden, c_cond): the columns that read the mapper's outputs
        let w_e = weight.narrow(1, kept, c_in - kept)?.to_dtype(DType::F64)?;
        let folded = w_e.matmul(&mapper.weight)?.to_dtype(weight.dtype())?;
        let bias = (bias.to_dtype(DType::F64)? + w_e.matmul(&mapper.bias)?.squeeze(1)?)?;
        let fc1 = flops::linear_from(
            Tensor::cat(&[&weight.narrow(1, 0, kept)?, &folded], 1)?,
            bias.to_dtype(weight.dtype())?,
        )?;
        Ok(Self {
            depthwise: depthwise(c, c, kernel_size, vb.pp("depthwise"))?,
            channelwise: ChannelMlp::with_fc1(fc1, c_hidden, c, vbc)?,
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
    effnet: Effnet,
}

/// How a level joins Stage C's latent to its ResBlocks' skips.
#[derive(Debug, Clone)]
enum Effnet {
    /// Not at all (`inject_effnet` false).
    Absent,
    /// Through its `effnet_mappers` conv (1x1, to `c_cond` channels).
    Mapped(Conv2d),
    /// The resized latent itself, the mapper being folded into the blocks
    /// ([`ResBlockStageB::folded`]).
    Folded,
}

/// An effnet mapper's 1x1 conv as matrices in f64, for folding: weight (c_cond,
/// effnet_embd), bias (c_cond, 1).
struct MapperWeights {
    weight: Tensor,
    bias: Tensor,
}

/// The text conditioning of a [`WuerstchenDiffNeXt`], one entry per AttnBlock.
#[derive(Debug, Clone)]
pub struct DecoderConditioning(Vec<Conditioning>);

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
        let block = |kind: char,
                     level: usize,
                     c_skip: usize,
                     mapper: Option<&MapperWeights>,
                     vb: VarBuilder|
         -> Result<Block> {
            let c = ch[level];
            Ok(match (kind, mapper) {
                ('C', Some(m)) => {
                    Block::Res(ResBlockStageB::folded(c, c_skip, cfg.kernel_size, m, vb)?)
                }
                ('C', None) => Block::Res(ResBlockStageB::new(c, c_skip, cfg.kernel_size, vb)?),
                ('T', _) => Block::Timestep(TimestepBlock::new(c, cfg.c_r, vb)?),
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
        // folded into the blocks for inference; a model being trained keeps the conv
        let fold = linear_kind::inference();
        let effnet = |slot: usize| -> Result<(Effnet, Option<MapperWeights>)> {
            let vb = vb.pp("effnet_mappers").pp(slot);
            Ok(match (inject_at(slot), fold) {
                (false, _) => (Effnet::Absent, None),
                (true, false) => (
                    Effnet::Mapped(conv1x1(cfg.effnet_embd, cfg.c_cond, vb)?),
                    None,
                ),
                (true, true) => {
                    let (c_cond, embd) = (cfg.c_cond, cfg.effnet_embd);
                    let weight = vb.get((c_cond, embd, 1, 1), "weight")?;
                    let bias = vb.get(c_cond, "bias")?;
                    let f64 = |t: Tensor| t.to_dtype(DType::F64);
                    let weights = MapperWeights {
                        weight: f64(weight.reshape((c_cond, embd))?)?,
                        bias: f64(bias.reshape((c_cond, 1))?)?,
                    };
                    (Effnet::Folded, Some(weights))
                }
            })
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
            let (effnet, mapper) = effnet(i)?;
            let mut blocks = Vec::new();
            for _ in 0..cfg.blocks[i] {
                for kind in cfg.level_config[i].chars() {
                    blocks.push(block(kind, i, c_skip, mapper.as_ref(), vbl.pp(idx))?);
                    idx += 1;
                }
            }
            down.push(Level {
                blocks,
                resample,
                effnet,
            });
        }

        let mut up = Vec::with_capacity(n);
        for (ui, i) in (0..n).rev().enumerate() {
            let vbl = vb.pp("up_blocks").pp(ui);
            let (effnet, mapper) = effnet(n + ui)?;
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
                    let vbb = vbl.pp(blocks.len());
                    blocks.push(block(kind, i, c_skip, mapper.as_ref(), vbb)?);
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
                effnet,
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
        self.forward_conditioned(x, r, effnet, &self.condition(clip)?)
    }

    /// What every step of a sampler shares: the keys and values that each AttnBlock
    /// makes of the text embeddings clip (B, L, clip_embd), in the blocks' order.
    pub fn condition(&self, clip: &Tensor) -> Result<DecoderConditioning> {
        // gen_c_embeddings: clip_mapper then a LayerNorm without affine
        let clip = kernels::layer_norm::layer_norm(&self.clip_mapper.forward(clip)?, 1e-6)?;
        let attention = self.attention_blocks().map(|b| b.condition(&clip));
        Ok(DecoderConditioning(attention.collect::<Result<_>>()?))
    }

    /// The AttnBlocks in the order the forward pass runs them.
    fn attention_blocks(&self) -> impl Iterator<Item = &AttnBlock> {
        let down = self.down.iter().flat_map(|level| &level.blocks);
        let blocks = down.chain(self.up.iter().flat_map(|level| &level.blocks));
        blocks.filter_map(|block| match block {
            Block::Attn(b) => Some(b),
            _ => None,
        })
    }

    /// [`forward`](Self::forward) with the text as [`condition`](Self::condition)
    /// made it.
    pub fn forward_conditioned(
        &self,
        x: &Tensor,
        r: &Tensor,
        effnet: &Tensor,
        cond: &DecoderConditioning,
    ) -> Result<Tensor> {
        let blocks = self.attention_blocks().count();
        if cond.0.len() != blocks {
            candle_core::bail!(
                "conditioning for {} attention blocks given to a decoder of {blocks}",
                cond.0.len()
            )
        }
        let r_embed = r_embedding(r, self.c_r)?.to_dtype(x.dtype())?;
        let clip = &mut cond.0.iter();

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
            let effnet_c = self.effnet_at(&level.effnet, effnet, &h)?;
            for block in &level.blocks {
                h = self.run_block(block, &h, effnet_c.as_ref(), &r_embed, clip)?;
            }
            levels.insert(0, h.clone());
        }

        // _up_decode
        let mut h = levels[0].clone();
        for (i, level) in self.up.iter().enumerate() {
            let effnet_c = self.effnet_at(&level.effnet, effnet, &h)?;
            for (j, block) in level.blocks.iter().enumerate() {
                let skip = match (j == 0 && i > 0, &effnet_c) {
                    (true, Some(e)) => Some(Tensor::cat(&[&levels[i], e], 1)?),
                    (true, None) => Some(levels[i].clone()),
                    (false, e) => e.clone(),
                };
                h = self.run_block(block, &h, skip.as_ref(), &r_embed, clip)?;
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
    /// mapped to c_cond channels unless the blocks fold the mapper; None where the
    /// level has no injection.
    fn effnet_at(&self, how: &Effnet, effnet: &Tensor, h: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, hh, ww) = h.dims4()?;
        let resized = || resize_bicubic_aa(effnet, hh, ww);
        Ok(match how {
            Effnet::Absent => None,
            Effnet::Mapped(mapper) => Some(mapper.forward(&resized()?)?),
            Effnet::Folded => Some(resized()?),
        })
    }

    fn run_block(
        &self,
        block: &Block,
        x: &Tensor,
        skip: Option<&Tensor>,
        r_embed: &Tensor,
        clip: &mut std::slice::Iter<Conditioning>,
    ) -> Result<Tensor> {
        match block {
            Block::Res(b) => b.forward(x, skip),
            Block::Timestep(b) => b.forward(x, r_embed),
            // as many as the blocks: checked by forward_conditioned
            Block::Attn(b) => match clip.next() {
                Some(cond) => b.forward_conditioned(x, cond),
                None => candle_core::bail!("no conditioning left for an attention block"),
            },
        }
    }
}
