//! Depthwise convolution (`groups = channels`), the spatial mixer of every ResBlock in
//! the three stages.
//!
//! candle runs a grouped conv as one conv per group (128 im2col + matmul calls of a
//! single channel each for 128 channels, forward and backward). On the CPU the layer
//! runs `kernels::depthwise` instead, which also differentiates; layers whose kernel
//! is not depthwise (Stage C's ResBlock with a skip input) keep candle's conv.

use candle_core::{Module, Result, Tensor};
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
        } else if let Padding::Replicate(p) = self.padding {
            self.conv
                .forward(&x.pad_with_same(2, p, p)?.pad_with_same(3, p, p)?)
        } else {
            self.conv.forward(x)
        }
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
}
