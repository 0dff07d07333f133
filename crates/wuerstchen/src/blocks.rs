//! Building blocks shared by the stages (diffusers' `modeling_wuerstchen_common.py`)
//! and the few tensor helpers they all need.
//!
//! Everything here is written with differentiable candle ops (no fused softmax or
//! layer norm, which have no backward in candle 0.11) so training reuses it unchanged.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::depthwise::DepthwiseConv2d;
use crate::flops::{self, Conv2d, Linear};
use crate::kernels;

/// `x` in the precision statistics are computed in: f32 for half types, f64 stays.
pub fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 | DType::F32 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// Layer norm over the last dimension, statistics in f32 whatever the input dtype.
pub fn layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    match affine {
        Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
        None => Ok(y),
    }
}

/// `WuerstchenLayerNorm(elementwise_affine=False, eps=1e-6)`: layer norm over the
/// channels of an NCHW tensor.
pub fn channel_layer_norm(x: &Tensor) -> Result<Tensor> {
    kernels::layer_norm::channel_layer_norm(x, 1e-6)
}

/// (B, C, H, W) -> (B, H*W, C), contiguous.
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    crate::kernels::transpose::swap_last_two(&x.flatten_from(2)?)
}

/// (B, H*W, C) -> (B, C, H, W).
pub fn from_tokens(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    crate::kernels::transpose::swap_last_two(x)?.reshape((b, c, h, w))
}

/// Numerically stable softmax over the last dimension from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `nn.Conv2d` with padding and stride; `groups = channels` gives a depthwise conv.
pub use crate::flops::conv2d;

pub fn conv1x1(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(c_in, c_out, 1, Default::default(), true, vb)
}

/// A depthwise conv with `same` zero padding, as the ResBlocks use.
pub fn depthwise(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    vb: VarBuilder,
) -> Result<DepthwiseConv2d> {
    DepthwiseConv2d::new(c_in, c_out, kernel, kernel / 2, vb)
}

/// The sinusoidal embedding of the noise level `r` in [0, 1], `gen_r_embedding`.
///
/// Computed in f32 in the same order as diffusers: at r = 1 the first arguments are
/// about 1e4, where one f32 ulp already moves sin by 5e-4, so both the order and the
/// rounding of each product matter for parity.
pub fn r_embedding(r: &Tensor, c_r: usize) -> Result<Tensor> {
    let max_positions = 10000f64;
    let half = c_r / 2;
    let step = (max_positions.ln() / (half as f64 - 1.0)) as f32;
    // exp in f64 then rounded: the correctly rounded f32, which is what torch returns.
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((i as f32 * -step) as f64).exp() as f32)
        .collect();
    let r32 = r.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = r32.len();
    let mut out = vec![0f32; b * c_r];
    for (bi, &rv) in r32.iter().enumerate() {
        let scaled = rv * max_positions as f32;
        let row = &mut out[bi * c_r..(bi + 1) * c_r];
        for (i, &f) in freqs.iter().enumerate() {
            let arg = scaled * f;
            row[i] = (arg as f64).sin() as f32;
            row[half + i] = (arg as f64).cos() as f32;
        }
        // odd c_r: the last column stays zero, as diffusers pads it
    }
    Tensor::from_vec(out, (b, c_r), r.device())?.to_dtype(r.dtype())
}

/// `TimestepBlock`: FiLM modulation by the r embedding.
#[derive(Debug, Clone)]
pub struct TimestepBlock {
    mapper: Linear,
}

impl TimestepBlock {
    pub fn new(c: usize, c_r: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            mapper: flops::linear(c_r, c * 2, vb.pp("mapper"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, r_embed: &Tensor) -> Result<Tensor> {
        // (B, 2C) -> two (B, C, 1, 1)
        let ab = self.mapper.forward(r_embed)?.unsqueeze(2)?.unsqueeze(3)?;
        let c = ab.dim(1)? / 2;
        let a = ab.narrow(1, 0, c)?;
        let b = ab.narrow(1, c, c)?;
        x.broadcast_mul(&(a + 1.0)?)?.broadcast_add(&b)
    }
}

/// `GlobalResponseNorm` (ConvNeXt-V2), here on NCHW: the L2 norm over the
/// spatial positions, divided by its mean over channels.
#[derive(Debug, Clone)]
pub struct GlobalResponseNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl GlobalResponseNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gamma: vb.get((1, 1, 1, dim), "gamma")?,
            beta: vb.get((1, 1, 1, dim), "beta")?,
        })
    }

    /// x (B, C, H, W): the norm over each channel's plane.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::grn::grn_channels_first(x, &self.gamma, &self.beta)
    }
}

/// The `channelwise` MLP of both ResBlock flavours: Linear, GELU, GRN, Dropout, Linear
/// (so its checkpoint indices are 0, 2 and 4).
#[derive(Debug, Clone)]
pub struct ChannelMlp {
    fc1: Linear,
    grn: GlobalResponseNorm,
    fc2: Linear,
}

impl ChannelMlp {
    pub fn new(c_in: usize, c_hidden: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_fc1(
            flops::linear(c_in, c_hidden, vb.pp("0"))?,
            c_hidden,
            c_out,
            vb,
        )
    }

    /// With the first layer built by the caller (from its weights at `vb.pp("0")`).
    pub fn with_fc1(fc1: Linear, c_hidden: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1,
            grn: GlobalResponseNorm::new(c_hidden, vb.pp("2"))?,
            fc2: flops::linear(c_hidden, c_out, vb.pp("4"))?,
        })
    }

    /// (B, C_in, H, W) -> (B, C_out, H, W): the linear layers as 1x1 convolutions,
    /// so the block never leaves NCHW (diffusers permutes to tokens and back).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.fc1.forward_channels_first_gelu(x)?;
        self.fc2.forward_channels_first(&self.grn.forward(&x)?)
    }
}

/// `ResBlock` (Stage C): the skip joins before the depthwise conv.
#[derive(Debug, Clone)]
pub struct ResBlock {
    depthwise: DepthwiseConv2d,
    channelwise: ChannelMlp,
}

impl ResBlock {
    pub fn new(c: usize, c_skip: usize, kernel_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            depthwise: depthwise(c + c_skip, c, kernel_size, vb.pp("depthwise"))?,
            channelwise: ChannelMlp::new(c, c * 4, c, vb.pp("channelwise"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, x_skip: Option<&Tensor>) -> Result<Tensor> {
        let joined = match x_skip {
            Some(s) => Tensor::cat(&[x, s], 1)?,
            None => x.clone(),
        };
        let t = channel_layer_norm(&self.depthwise.forward(&joined)?)?;
        self.channelwise.forward(&t)? + x
    }
}

/// diffusers' `Attention` with bias, as the AttnBlocks configure it: multi-head
/// attention of query tokens over key/value tokens, without a mask.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(c: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let inner = c / heads * heads;
        Ok(Self {
            to_q: flops::linear(c, inner, vb.pp("to_q"))?,
            to_k: flops::linear(c, inner, vb.pp("to_k"))?,
            to_v: flops::linear(c, inner, vb.pp("to_v"))?,
            to_out: flops::linear(inner, c, vb.pp("to_out").pp("0"))?,
            heads,
        })
    }

    /// q (B, N, C), kv (B, L, C) -> (B, N, C)
    pub fn forward(&self, q: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let (k, v) = self.keys_values(kv)?;
        self.attend(q, &k, &v)
    }

    /// The keys and values of tokens kv (B, L, C): two (B, L, C).
    fn keys_values(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.to_k.forward(kv)?, self.to_v.forward(kv)?))
    }

    /// Query tokens q (B, N, C) over keys and values already projected -> (B, N, C).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.attend_projected(&self.to_q.forward(q)?, k, v)
    }

    /// [`attend`](Self::attend) with the queries projected too.
    fn attend_projected(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / ((q.dim(2)? / self.heads) as f64).sqrt();
        flops::add_attention(q, k)?;
        // the heads stay in the projections' columns (no (B, H, N, d) copies); a model
        // in bf16 arithmetic takes both products in bf16 where that pays
        let bf16 = matches!(self.to_q, Linear::Bf16(_));
        let out = crate::kernels::attention::attention_tokens(q, k, v, self.heads, scale, bf16)?;
        self.to_out.forward(&out)
    }
}

/// `AttnBlock`: the image tokens attend over themselves and the mapped conditioning
/// in one softmax (`self_attn=True` concatenates them as keys/values).
#[derive(Debug, Clone)]
pub struct AttnBlock {
    attention: Attention,
    kv_mapper: Linear,
    self_attn: bool,
}

impl AttnBlock {
    pub fn new(
        c: usize,
        c_cond: usize,
        nhead: usize,
        self_attn: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            attention: Attention::new(c, nhead, vb.pp("attention"))?,
            // nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c)): the Linear is index 1
            kv_mapper: flops::linear(c_cond, c, vb.pp("kv_mapper").pp("1"))?,
            self_attn,
        })
    }

    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        self.forward_conditioned(x, &self.condition(cond)?)
    }

    /// The keys and values of the conditioning tokens cond (B, L, c_cond).
    pub fn condition(&self, cond: &Tensor) -> Result<Conditioning> {
        let kv = self.kv_mapper.forward(&cond.silu()?)?;
        let (k, v) = self.attention.keys_values(&kv)?;
        Ok(Conditioning { k, v })
    }

    /// As [`forward`](Self::forward), with the conditioning's keys and values from
    /// [`condition`](Self::condition). Projecting the tokens one by one, keys of the
    /// image tokens joined to the conditioning's equal the keys of the joined tokens.
    ///
    /// x's batch may also divide the conditioning's, its images repeating in order
    /// under the conditionings, as classifier-free guidance batches one latent under
    /// the text and under no text (`[x; x]`): the image tokens are then normalised and
    /// projected once, and the output has the conditioning's batch.
    pub fn forward_conditioned(&self, x: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (images, _, h, w) = x.dims4()?;
        let batch = cond.k.dim(0)?;
        if images == 0 || !batch.is_multiple_of(images) {
            candle_core::bail!(
                "attention block: {images} images under a conditioning of batch {batch}"
            )
        }
        let repeat = |t: Tensor| match batch / images {
            1 => Ok(t),
            n => t.repeat((n, 1, 1)),
        };
        // (B, C, H, W) -> (B, H*W, C)
        let tokens = to_tokens(&channel_layer_norm(x)?)?;
        let (k, v) = if self.self_attn {
            let (k, v) = self.attention.keys_values(&tokens)?;
            (
                Tensor::cat(&[&repeat(k)?, &cond.k], 1)?,
                Tensor::cat(&[&repeat(v)?, &cond.v], 1)?,
            )
        } else {
            (cond.k.clone(), cond.v.clone())
        };
        let q = repeat(self.attention.to_q.forward(&tokens)?)?;
        let attended = from_tokens(&self.attention.attend_projected(&q, &k, &v)?, h, w)?;
        if images == batch {
            x + attended
        } else {
            x.repeat((batch / images, 1, 1, 1))? + attended
        }
    }
}

/// An [`AttnBlock`]'s keys and values of its conditioning tokens (the text): each
/// (B, L, C). They do not change between the steps of a sampler, so a pipeline
/// computes them once instead of at every step (3% of each prior call's work).
#[derive(Debug, Clone)]
pub struct Conditioning {
    k: Tensor,
    v: Tensor,
}

/// `nn.BatchNorm2d` (eps 1e-5), optionally without affine parameters.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    affine: Option<(Tensor, Tensor)>,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    pub fn new(c: usize, affine: bool, vb: VarBuilder) -> Result<Self> {
        let affine = if affine {
            Some((vb.get(c, "weight")?, vb.get(c, "bias")?))
        } else {
            None
        };
        Ok(Self {
            affine,
            running_mean: vb.get(c, "running_mean")?,
            running_var: vb.get(c, "running_var")?,
        })
    }

    fn normalize(&self, x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
        let shape = (1, x.dim(1)?, 1, 1);
        let y = x
            .broadcast_sub(&mean.reshape(shape)?)?
            .broadcast_div(&(var.reshape(shape)? + 1e-5)?.sqrt()?)?;
        match &self.affine {
            Some((w, b)) => y
                .broadcast_mul(&w.reshape(shape)?)?
                .broadcast_add(&b.reshape(shape)?),
            None => Ok(y),
        }
    }

    /// Eval mode: the running statistics.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.normalize(x, &self.running_mean, &self.running_var)
    }

    /// Training mode: the batch's own statistics (differentiably). Returns the output
    /// and the detached batch mean and biased variance per channel, for the trainer to
    /// fold into the running statistics.
    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        // (B, C, H, W) -> (C, B*H*W)
        let flat = x.transpose(0, 1)?.flatten_from(1)?;
        let mean = flat.mean_keepdim(1)?.flatten_all()?;
        let var = flat
            .broadcast_sub(&mean.unsqueeze(1)?)?
            .sqr()?
            .mean_keepdim(1)?
            .flatten_all()?;
        let y = self.normalize(x, &mean, &var)?;
        Ok((y, mean.detach(), var.detach()))
    }
}
