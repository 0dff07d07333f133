//! The semantic compressor: Würstchen's Stage B is conditioned on EfficientNetV2
//! features mapped to 16 channels and normalised by a BatchNorm without affine. A
//! pretrained EfficientNet cannot be downloaded here, so our small models train this
//! stand-in with the same interface: images in [0, 1] -> (B, 16, s H/f, s W/f) (s:
//! `input_scale`, usually 1), unit variance per channel. It is needed for training
//! only; generation never runs it.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::blocks::{conv2d, BatchNorm};
use crate::config::Validate;
use crate::flops::Conv2d;
use crate::kernels::gelu::gelu;
use crate::resize::resize_bicubic_aa;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompressorConfig {
    pub c_in: usize,
    pub c_hidden: usize,
    /// Spatial reduction, a power of two (16: 128 px -> 8 x 8).
    pub downscale: usize,
    /// Output channels; Stage C's `c_in` and Stage B's `effnet_embd`.
    pub c_out: usize,
    /// The images are first resized (bicubic, antialiased) by this factor, so that
    /// the map can be a size the downscale alone cannot make: 0.75 with downscale 8
    /// makes 128 px a 12 x 12 map. Würstchen's Stage B training likewise feeds its
    /// EfficientNet downscaled images. 1: no resize.
    pub input_scale: f64,
}

impl Default for CompressorConfig {
    fn default() -> Self {
        Self {
            c_in: 3,
            c_hidden: 32,
            downscale: 16,
            c_out: 16,
            input_scale: 1.0,
        }
    }
}

impl Validate for CompressorConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.downscale.is_power_of_two() || self.downscale < 2 {
            return Err(format!(
                "downscale {} is not a power of two >= 2",
                self.downscale
            ));
        }
        if !(self.input_scale > 0.0 && self.input_scale <= 1.0) {
            return Err(format!("input_scale {} is not in (0, 1]", self.input_scale));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct SemanticCompressor {
    /// stride-2 3x3 convs, GELU between them
    convs: Vec<Conv2d>,
    mapper: Conv2d,
    norm: BatchNorm,
    input_scale: f64,
}

impl crate::weights::FromFolder for SemanticCompressor {
    type Config = CompressorConfig;
    fn build(cfg: &CompressorConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

impl SemanticCompressor {
    pub fn new(cfg: &CompressorConfig, vb: VarBuilder) -> Result<Self> {
        let stride2 = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let n = cfg.downscale.trailing_zeros() as usize;
        let mut convs = Vec::with_capacity(n);
        let mut c = cfg.c_in;
        for i in 0..n {
            let out = cfg.c_hidden << i.min(2);
            convs.push(conv2d(c, out, 3, stride2, true, vb.pp("convs").pp(i))?);
            c = out;
        }
        Ok(Self {
            convs,
            // as Würstchen's EfficientNetEncoder: 1x1 conv without bias, BatchNorm without affine
            mapper: conv2d(
                c,
                cfg.c_out,
                1,
                Default::default(),
                false,
                vb.pp("mapper").pp("0"),
            )?,
            norm: BatchNorm::new(cfg.c_out, false, vb.pp("mapper").pp("1"))?,
            input_scale: cfg.input_scale,
        })
    }

    fn features(&self, images: &Tensor) -> Result<Tensor> {
        let mut h = if self.input_scale == 1.0 {
            images.clone()
        } else {
            let (_, _, height, width) = images.dims4()?;
            let side = |v: usize| ((v as f64 * self.input_scale).round() as usize).max(1);
            resize_bicubic_aa(images, side(height), side(width))?
        };
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i + 1 < self.convs.len() {
                h = gelu(&h)?;
            }
        }
        self.mapper.forward(&h)
    }

    /// images (B, 3, H, W) in [0, 1] -> (B, 16, s H/f, s W/f)
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.features(images)?)
    }

    /// Training mode (batch statistics); also returns them, as `BatchNorm::forward_train`.
    pub fn forward_train(&self, images: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.norm.forward_train(&self.features(images)?)
    }
}
