//! Depthwise convolution (`groups = channels`), the spatial mixer of every ResBlock in
//! the three stages.
//!
//! candle runs a grouped conv as one conv per group: for 128 channels that is 128
//! im2col + matmul calls of a single channel each, forward and again backward, which
//! made it the dominant cost of a training step. A depthwise k x k conv is a sum of
//! k^2 shifted copies of the input, each scaled per channel, and written that way it
//! is a handful of whole-tensor ops that candle also differentiates. Layers whose
//! kernel is not depthwise (Stage C's ResBlock with a skip input) keep candle's conv.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::blocks::conv2d;
use crate::flops::{self, Conv2d};

#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    conv: Conv2d,
    padding: usize,
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
            padding,
        })
    }

    fn shifted_sum(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.conv.weight();
        let (c, _, kh, kw) = weight.dims4()?;
        let (_, _, h, w) = x.dims4()?;
        let p = self.padding;
        let (oh, ow) = (h + 2 * p + 1 - kh, w + 2 * p + 1 - kw);
        let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let taps = weight.reshape((c, kh * kw))?;
        let mut sum: Option<Tensor> = None;
        for ky in 0..kh {
            // one contiguous copy per kernel row keeps the column shifts cheap views
            let rows = padded.narrow(2, ky, oh)?.contiguous()?;
            for kx in 0..kw {
                let tap = taps.narrow(1, ky * kw + kx, 1)?.reshape((1, c, 1, 1))?;
                let term = rows.narrow(3, kx, ow)?.broadcast_mul(&tap)?;
                sum = Some(match sum {
                    None => term,
                    Some(s) => (s + term)?,
                });
            }
        }
        let sum = sum.expect("a kernel has at least one tap");
        flops::add(2 * sum.elem_count() * kh * kw);
        match self.conv.bias() {
            Some(b) => sum.broadcast_add(&b.reshape((1, c, 1, 1))?),
            None => Ok(sum),
        }
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let depthwise =
            self.conv.weight().dim(1)? == 1 && x.dim(1)? == self.conv.weight().dim(0)?;
        if depthwise && x.device().is_cpu() {
            self.shifted_sum(x)
        } else {
            self.conv.forward(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn layer(c: usize, k: usize, padding: usize) -> Result<(VarMap, DepthwiseConv2d)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dw = DepthwiseConv2d::new(c, c, k, padding, vb)?;
        // a nonzero bias, so its broadcast is checked too
        for (_, v) in varmap.data().lock().unwrap().iter() {
            v.set(&v.as_tensor().randn_like(0.0, 1.0)?)?;
        }
        Ok((varmap, dw))
    }

    #[test]
    fn equals_the_grouped_conv_forward_and_backward() -> Result<()> {
        for (c, k, padding, h, w) in [(5, 3, 1, 7, 9), (3, 3, 0, 6, 5), (4, 5, 2, 8, 8)] {
            let (varmap, dw) = layer(c, k, padding)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &Device::Cpu)?)?;
            let fast = dw.forward(x.as_tensor())?;
            let plain = dw.conv.forward(x.as_tensor())?;
            assert_eq!(fast.dims(), plain.dims());
            let diff = (&fast - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "c {c} k {k}: forward differs by {diff}");
            // gradients of the same scalar through both paths
            let probe = fast.randn_like(0.0, 1.0)?;
            let g_fast = (fast * &probe)?.sum_all()?.backward()?;
            let g_plain = (plain * &probe)?.sum_all()?.backward()?;
            let mut vars: Vec<Var> = varmap.all_vars();
            vars.push(x);
            for v in &vars {
                let (a, b) = (g_fast.get(v).unwrap(), g_plain.get(v).unwrap());
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "c {c} k {k}: gradient {:?} differs by {diff}",
                    v.dims()
                );
            }
        }
        Ok(())
    }
}
