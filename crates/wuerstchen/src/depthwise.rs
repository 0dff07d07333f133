//! Depthwise convolution (`groups = channels`), the spatial mixer of every ResBlock in
//! the three stages.
//!
//! candle runs a grouped conv as one conv per group (128 im2col + matmul calls of a
//! single channel each for 128 channels, forward and backward). On the CPU the layer
//! runs `kernels::depthwise` instead, which also differentiates; on other devices a
//! sum of shifted whole-tensor products (`forward_shifted`); layers whose kernel is
//! not depthwise (Stage C's ResBlock with a skip input) keep candle's conv.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::blocks::conv2d;
use crate::flops::{self, Conv2d};
use crate::kernels::depthwise::{depthwise_conv2d, Padding};

#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    conv: Conv2d,
    padding: Padding,
}

impl DepthwiseConv2d {
    /// `nn.Conv2d(c_in, c_out, kernel, padding, groups=c_out)` with a bias; the tensor
    /// names are the conv's (`weight`, `bias`).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            groups: c_out,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(c_in, c_out, kernel, cfg, true, vb)?,
            padding: Padding::Zeros(padding),
        })
    }

    /// `Sequential(nn.ReplicationPad2d(padding), nn.Conv2d(c, c, kernel, groups=c))`
    /// (Stage A); the conv's tensor names.
    pub fn replicate_padded(
        c: usize,
        kernel: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            padding: Padding::Replicate(padding),
            ..Self::new(c, c, kernel, 0, vb)?
        })
    }

    /// [`replicate_padded`](Self::replicate_padded) with the weight (c, 1, k, k) and
    /// bias (c) given.
    pub fn replicate_padded_from(weight: Tensor, bias: Tensor, padding: usize) -> Self {
        let cfg = Conv2dConfig {
            groups: weight.dim(0).unwrap_or(1),
            ..Default::default()
        };
        Self {
            conv: flops::conv2d_from(weight, bias, cfg),
            padding: Padding::Replicate(padding),
        }
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let depthwise =
            self.conv.weight().dim(1)? == 1 && x.dim(1)? == self.conv.weight().dim(0)?;
        if depthwise && x.device().is_cpu() {
            let (_, _, kh, kw) = self.conv.weight().dims4()?;
            let out = depthwise_conv2d(x, self.conv.weight(), self.conv.bias(), self.padding)?;
            flops::add(2 * out.elem_count() * kh * kw);
            Ok(out)
        } else if depthwise {
            self.forward_shifted(x)
        } else {
            self.conv.forward(x)
        }
    }
}

impl DepthwiseConv2d {
    /// The depthwise conv as kh * kw shifted multiply-adds over the padded input, for
    /// devices without our kernel: a few dozen whole-tensor ops, where candle's grouped
    /// conv would launch an im2col and a matmul per channel (thousands of GPU kernel
    /// launches per layer). Sums in f32 whatever the activations' dtype, as a conv
    /// kernel's accumulator would.
    fn forward_shifted(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.conv.weight().to_dtype(DType::F32)?;
        let (c, _, kh, kw) = weight.dims4()?;
        let x32 = x.to_dtype(DType::F32)?;
        let padded = match self.padding {
            Padding::Zeros(p) => x32.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?,
            Padding::Replicate(p) => x32.pad_with_same(2, p, p)?.pad_with_same(3, p, p)?,
        };
        let (_, _, h, w) = padded.dims4()?;
        let (oh, ow) = ((h + 1).saturating_sub(kh), (w + 1).saturating_sub(kw));
        let mut out = match self.conv.bias() {
            Some(b) => b.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?,
            None => Tensor::zeros((1, c, 1, 1), DType::F32, x.device())?,
        };
        for i in 0..kh {
            for j in 0..kw {
                let tap = weight
                    .narrow(2, i, 1)?
                    .narrow(3, j, 1)?
                    .reshape((1, c, 1, 1))?;
                let window = padded.narrow(2, i, oh)?.narrow(3, j, ow)?;
                out = out.broadcast_add(&window.broadcast_mul(&tap)?)?;
            }
        }
        flops::add(2 * out.elem_count() * kh * kw);
        out.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn the_layer_equals_its_grouped_conv() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dw = DepthwiseConv2d::new(4, 4, 3, 1, vb)?;
        // a nonzero bias, so it is checked too
        for (_, v) in varmap.data().lock().unwrap().iter() {
            v.set(&v.as_tensor().randn_like(0.0, 1.0)?)?;
        }
        let x = Tensor::randn(0f32, 1.0, (2, 4, 6, 7), &Device::Cpu)?;
        let diff = (dw.forward(&x)? - dw.conv.forward(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "differs by {diff}");
        Ok(())
    }

    #[test]
    fn the_shifted_form_for_other_devices_equals_the_conv_with_either_padding() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let zeros = DepthwiseConv2d::new(5, 5, 3, 1, vb.pp("z"))?;
        let replicate = DepthwiseConv2d::replicate_padded(5, 3, 1, vb.pp("r"))?;
        for (_, v) in varmap.data().lock().unwrap().iter() {
            v.set(&v.as_tensor().randn_like(0.0, 1.0)?)?;
        }
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7), &Device::Cpu)?;
        let replicated = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
        for (layer, reference) in [
            (&zeros, zeros.conv.forward(&x)?),
            (&replicate, replicate.conv.forward(&replicated)?),
        ] {
            let shifted = layer.forward_shifted(&x)?;
            assert_eq!(shifted.dims(), reference.dims());
            let diff = (shifted - reference)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "differs by {diff}");
        }
        // bf16 activations come back in bf16
        let bf = zeros.forward_shifted(&x.to_dtype(DType::BF16)?)?;
        assert_eq!(bf.dtype(), DType::BF16);
        Ok(())
    }
}
