//! Stage A, the f=4 VQGAN: diffusers' `PaellaVQModel`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};

use crate::blocks::{channel_layer_norm, conv1x1, conv2d, BatchNorm};
use crate::config::PaellaVQConfig;
use crate::depthwise::DepthwiseConv2d;
use crate::flops::{self, Conv2d, ConvTranspose2d, Linear};
use crate::kernels::linear_kind;

/// `MixingResidualBlock`: depthwise conv (replication padded) and channel MLP, each
/// behind a layer norm whose scale and shift, and the branch gain, are six learned
/// scalars.
#[derive(Debug, Clone)]
pub struct MixingResidualBlock {
    depthwise: DepthwiseConv2d,
    fc1: Linear,
    fc2: Linear,
    /// The six scalars, or None where they are folded into the layers' weights (a
    /// model loaded for inference).
    gammas: Option<Tensor>,
}

impl MixingResidualBlock {
    pub fn new(c: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let gammas = vb.get(6, "gammas")?;
        if linear_kind::inference() {
            return Self::folded(c, embed_dim, &gammas, vb);
        }
        Ok(Self {
            // depthwise = Sequential(ReplicationPad2d(1), Conv2d(groups=c))
            depthwise: DepthwiseConv2d::replicate_padded(c, 3, 1, vb.pp("depthwise").pp("1"))?,
            // channelwise = Sequential(Linear, GELU, Linear)
            fc1: flops::linear(c, embed_dim, vb.pp("channelwise").pp("0"))?,
            fc2: flops::linear(embed_dim, c, vb.pp("channelwise").pp("2"))?,
            gammas: Some(gammas),
        })
    }

    /// For inference: each branch's norm scale and shift and its gain folded into its
    /// layers (computed once in f64), so a block makes six fewer passes over its
    /// activations (100 MB each at Stage A's 1024 px bottleneck). The depthwise conv
    /// and the first linear layer are linear, and replication padding repeats values:
    /// `conv(a n + b) g = (a g W) * n + g (b sum(W) + bias)`,
    /// `fc1(a n + b) = (a W) n + (bias + b W 1)`, `fc2(h) g = (g W) h + g bias`.
    fn folded(c: usize, embed_dim: usize, gammas: &Tensor, vb: VarBuilder) -> Result<Self> {
        let g: Vec<f64> = gammas.to_dtype(DType::F64)?.to_vec1()?;
        let f64_of = |vb: &VarBuilder, shape: &[usize], name: &str| {
            vb.get(shape, name)?.to_dtype(DType::F64)
        };
        let dtype = gammas.dtype();
        let vbd = vb.pp("depthwise").pp("1");
        let w = f64_of(&vbd, &[c, 1, 3, 3], "weight")?;
        let taps_sum = w.flatten_from(1)?.sum(1)?;
        let bias = ((taps_sum * g[1])? + f64_of(&vbd, &[c], "bias")?)? * g[2];
        let depthwise = DepthwiseConv2d::replicate_padded_from(
            (w * ((1.0 + g[0]) * g[2]))?.to_dtype(dtype)?,
            bias?.to_dtype(dtype)?,
            1,
        );
        let vb1 = vb.pp("channelwise").pp("0");
        let w = f64_of(&vb1, &[embed_dim, c], "weight")?;
        let bias = (f64_of(&vb1, &[embed_dim], "bias")? + (w.sum(1)? * g[4])?)?;
        let fc1 = flops::linear_from((w * (1.0 + g[3]))?.to_dtype(dtype)?, bias.to_dtype(dtype)?)?;
        let vb2 = vb.pp("channelwise").pp("2");
        let fc2 = flops::linear_from(
            (f64_of(&vb2, &[c, embed_dim], "weight")? * g[5])?.to_dtype(dtype)?,
            (f64_of(&vb2, &[c], "bias")? * g[5])?.to_dtype(dtype)?,
        )?;
        Ok(Self {
            depthwise,
            fc1,
            fc2,
            gammas: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // all in NCHW: the norms over channels and the linear layers as 1x1
        // convolutions (diffusers permutes to tokens and back around each)
        let gamma = |i: usize| -> Result<Option<Tensor>> {
            self.gammas.as_ref().map(|g| g.narrow(0, i, 1)).transpose()
        };
        let modulate = |t: &Tensor, scale: usize, shift: usize| -> Result<Tensor> {
            let t = channel_layer_norm(t)?;
            match (gamma(scale)?, gamma(shift)?) {
                (Some(a), Some(b)) => t.broadcast_mul(&(a + 1.0)?)?.broadcast_add(&b),
                _ => Ok(t),
            }
        };
        let gain = |t: Tensor, i: usize| -> Result<Tensor> {
            match gamma(i)? {
                Some(g) => t.broadcast_mul(&g),
                None => Ok(t),
            }
        };
        // x + depthwise(pad(norm1(x) * (1 + g0) + g1)) * g2
        let t = modulate(x, 0, 1)?;
        let x = (x + gain(self.depthwise.forward(&t)?, 2)?)?;
        // x + channelwise(norm2(x) * (1 + g3) + g4) * g5
        let t = modulate(&x, 3, 4)?;
        let t = self
            .fc2
            .forward_channels_first(&self.fc1.forward_channels_first_gelu(&t)?)?;
        x + gain(t, 5)?
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Mix(MixingResidualBlock),
    Down(Conv2d),
    Up(ConvTranspose2d),
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Mix(m) => m.forward(x),
            Layer::Down(c) => c.forward(x),
            Layer::Up(c) => c.forward(x),
        }
    }
}

/// Latents per tile side when the pipeline decodes: a 1024 px image (256 x 256
/// latents) decodes whole, larger ones in tiles ([`PaellaVQModel::decode_tiled`]), so
/// Stage A's memory stops growing with the image (each tile's margin costs ~25% more
/// work at this size).
pub const PIPELINE_DECODE_TILE: usize = 256;

#[derive(Debug, Clone)]
pub struct PaellaVQModel {
    in_conv: Conv2d,
    down: Vec<Layer>,
    to_latent: Conv2d,
    latent_norm: BatchNorm,
    codebook: Tensor,
    from_latent: Conv2d,
    up: Vec<Layer>,
    out_conv: Conv2d,
    scale: usize,
    pub scale_factor: f64,
}

impl crate::weights::FromFolder for PaellaVQModel {
    type Config = PaellaVQConfig;
    fn build(cfg: &PaellaVQConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

impl PaellaVQModel {
    pub fn new(cfg: &PaellaVQConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.levels;
        let c_levels: Vec<usize> = (0..levels).rev().map(|i| cfg.embed_dim >> i).collect();
        let s2 = cfg.up_down_scale_factor * cfg.up_down_scale_factor;
        let resample = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };

        let vbd = vb.pp("down_blocks");
        let mut down = Vec::new();
        for i in 0..levels {
            if i > 0 {
                let conv = conv2d(
                    c_levels[i - 1],
                    c_levels[i],
                    4,
                    resample,
                    true,
                    vbd.pp(down.len()),
                )?;
                down.push(Layer::Down(conv));
            }
            let block = MixingResidualBlock::new(c_levels[i], c_levels[i] * 4, vbd.pp(down.len()))?;
            down.push(Layer::Mix(block));
        }
        // Sequential(Conv2d(no bias), BatchNorm2d) after the blocks
        let vbl = vbd.pp(down.len());
        let to_latent = conv2d(
            c_levels[levels - 1],
            cfg.latent_channels,
            1,
            Default::default(),
            false,
            vbl.pp("0"),
        )?;
        let latent_norm = BatchNorm::new(cfg.latent_channels, true, vbl.pp("1"))?;

        let vbu = vb.pp("up_blocks");
        let from_latent = conv1x1(
            cfg.latent_channels,
            c_levels[levels - 1],
            vbu.pp("0").pp("0"),
        )?;
        let mut up = Vec::new();
        for i in 0..levels {
            let c = c_levels[levels - 1 - i];
            let repeats = if i == 0 { cfg.bottleneck_blocks } else { 1 };
            for _ in 0..repeats {
                up.push(Layer::Mix(MixingResidualBlock::new(
                    c,
                    c * 4,
                    vbu.pp(up.len() + 1),
                )?));
            }
            if i < levels - 1 {
                let t = ConvTranspose2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                let conv = flops::conv_transpose2d(
                    c,
                    c_levels[levels - 2 - i],
                    4,
                    t,
                    vbu.pp(up.len() + 1),
                )?;
                up.push(Layer::Up(conv));
            }
        }

        Ok(Self {
            // in_block = Sequential(PixelUnshuffle, Conv2d)
            in_conv: conv1x1(cfg.in_channels * s2, c_levels[0], vb.pp("in_block").pp("1"))?,
            down,
            to_latent,
            latent_norm,
            codebook: vb.get(
                (cfg.num_vq_embeddings, cfg.latent_channels),
                "vquantizer.embedding.weight",
            )?,
            from_latent,
            up,
            // out_block = Sequential(Conv2d, PixelShuffle)
            out_conv: conv1x1(
                c_levels[0],
                cfg.out_channels * s2,
                vb.pp("out_block").pp("0"),
            )?,
            scale: cfg.up_down_scale_factor,
            scale_factor: cfg.scale_factor,
        })
    }

    /// images (B, 3, H, W) -> latents (B, 4, H/4, W/4), not quantized.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let mut h = self
            .in_conv
            .forward(&candle_nn::ops::pixel_unshuffle(images, self.scale)?)?;
        for layer in &self.down {
            h = layer.forward(&h)?;
        }
        self.latent_norm.forward(&self.to_latent.forward(&h)?)
    }

    /// `encode` as in training mode: BatchNorm normalises with the batch's own
    /// statistics (differentiably). Returns the latents and the batch mean and biased
    /// variance per channel, for the caller to fold into the running statistics.
    pub fn encode_train(&self, images: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mut h = self
            .in_conv
            .forward(&candle_nn::ops::pixel_unshuffle(images, self.scale)?)?;
        for layer in &self.down {
            h = layer.forward(&h)?;
        }
        self.latent_norm.forward_train(&self.to_latent.forward(&h)?)
    }

    /// The codebook (num_vq_embeddings, latent_channels).
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// Nearest codebook entry for every latent vector: (B, C, H, W) -> indices (B*H*W)
    /// in the order diffusers flattens them (B, H, W).
    pub fn quantize_indices(&self, latents: &Tensor) -> Result<Tensor> {
        let c = latents.dim(1)?;
        let z = latents.permute((0, 2, 3, 1))?.reshape(((), c))?; // (N, C)
        let e = self.codebook.to_dtype(z.dtype())?;
        // ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 ; ||z||^2 is constant per row
        flops::add_matmul(&z, &e.t()?)?;
        let ze = z.matmul(&e.t()?)?;
        let e2 = e.sqr()?.sum(D::Minus1)?.unsqueeze(0)?;
        let dist = (ze * -2.0)?.broadcast_add(&e2)?;
        dist.argmin(D::Minus1)
    }

    /// Replaces each latent vector by its nearest codebook entry (the forward value of
    /// `vquantizer(latents)[0]`).
    pub fn quantize(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let idx = self.quantize_indices(latents)?;
        let zq = self.codebook.embedding(&idx)?.to_dtype(latents.dtype())?; // (N, C)
        zq.reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Latent positions an output pixel depends on in each direction, at most: one per
    /// up layer (a 3x3 depthwise conv at latent resolution or finer, or a stride-2
    /// transposed conv of kernel 4); the 1x1 convs, norms over channels and the pixel
    /// shuffle are local. So a tile decoded with this much context on every side equals
    /// the same part of the whole decode.
    pub fn decode_margin(&self) -> usize {
        self.up.len()
    }

    /// [`decode`](Self::decode), `tile` x `tile` latents at a time, each with
    /// [`decode_margin`](Self::decode_margin) latents of context on every side that are
    /// cropped off after: the same image, without seams, from a fraction of the
    /// activation memory (for a 2048 px image the whole decode holds tensors of 1.6 GB).
    pub fn decode_tiled(&self, latents: &Tensor, quantize: bool, tile: usize) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        if h <= tile && w <= tile {
            return self.decode(latents, quantize);
        }
        let margin = self.decode_margin();
        let mut rows = Vec::new();
        for y0 in (0..h).step_by(tile) {
            let mut row = Vec::new();
            for x0 in (0..w).step_by(tile) {
                let (ty, tx) = (tile.min(h - y0), tile.min(w - x0));
                let (ya, xa) = (y0.saturating_sub(margin), x0.saturating_sub(margin));
                let (yb, xb) = ((y0 + ty + margin).min(h), (x0 + tx + margin).min(w));
                let part = latents.narrow(2, ya, yb - ya)?.narrow(3, xa, xb - xa)?;
                let image = self.decode(&part, quantize)?;
                let f = image.dim(2)? / (yb - ya); // pixels per latent
                row.push(image.narrow(2, (y0 - ya) * f, ty * f)?.narrow(
                    3,
                    (x0 - xa) * f,
                    tx * f,
                )?);
            }
            rows.push(Tensor::cat(&row, 3)?);
        }
        Tensor::cat(&rows, 2)
    }

    /// latents (B, 4, h, w) -> images (B, 3, 4h, 4w), unscaled and unclamped; set
    /// `quantize` for `force_not_quantize=False`.
    pub fn decode(&self, latents: &Tensor, quantize: bool) -> Result<Tensor> {
        let q;
        let latents = if quantize {
            q = self.quantize(latents)?;
            &q
        } else {
            latents
        };
        let mut h = self.from_latent.forward(latents)?;
        for layer in &self.up {
            h = layer.forward(&h)?;
        }
        candle_nn::ops::pixel_shuffle(&self.out_conv.forward(&h)?, self.scale)
    }
}
