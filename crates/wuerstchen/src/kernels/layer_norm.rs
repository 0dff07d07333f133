//! Layer norm over the last dimension without affine parameters, as every ResBlock
//! (`WuerstchenLayerNorm`), Stage A's mixing blocks and the decoder's text mapper use it.
//!
//! Written from candle's element-wise ops it is six passes over the tensor, each
//! allocating a new one (mean, centre, square, mean, sqrt, divide); here it is one
//! read and one write per row, the row in cache between them.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{
    contiguous_f32, fast_path, plain_gradients, simd_dispatch, sum_by, unsupported, whole_rows,
    SendPtr,
};

/// `F.layer_norm(x, x.shape[-1:], eps=eps)`: statistics in f32 whatever the input.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_path(&[x]) {
        x.contiguous()?.apply_op1(LayerNorm { eps })
    } else {
        plain(x, eps)
    }
}

/// The reference form from candle's differentiable ops.
pub fn plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    crate::blocks::layer_norm(x, None, eps)
}

struct LayerNorm {
    eps: f64,
}

simd_dispatch! {
    fn normalise_rows(src: &[f32], dst: &mut [f32], width: usize, eps: f32) {
        for (s, d) in src.chunks(width).zip(dst.chunks_mut(width)) {
            // two passes over the row (mean, then the centred squares), as torch does:
            // one-pass E[x^2] - E[x]^2 loses digits when the mean is large
            let mean = sum_by(s, |x| x) / width as f32;
            for (o, x) in d.iter_mut().zip(s) {
                *o = x - mean;
            }
            let var = sum_by(d, |x| x * x) / width as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for o in d.iter_mut() {
                *o *= rstd;
            }
        }
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        let rows = whole_rows(width);
        dst.par_chunks_mut(rows)
            .zip(src.par_chunks(rows))
            .for_each(|(d, s)| normalise_rows(s, d, width, self.eps as f32));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if arg.dtype() != DType::F32 {
            let eps = self.eps;
            let [g] = plain_gradients([arg], grad, |[x]| plain(x, eps))?;
            return Ok(g);
        }
        let mean = |t: &Tensor| t.mean_keepdim(D::Minus1);
        Ok(Some(normalised_gradient(arg, res, grad, self.eps, mean)?))
    }
}

/// The gradient of a layer norm without affine, y = (x - mean) r with
/// r = 1 / sqrt(var + eps), in closed form: dx = r (g - mean(g) - y mean(g y)), where
/// `mean` averages over the normalised features, keeping that dim. Candle's ops on
/// whole tensors, so that every reduction is one of its fast paths (the plain form's
/// backward broadcasts and reduces one element at a time).
fn normalised_gradient(
    x: &Tensor,
    y: &Tensor,
    grad: &Tensor,
    eps: f64,
    mean: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let centred = x.broadcast_sub(&mean(x)?)?;
    let r = (mean(&centred.sqr()?)? + eps)?.sqrt()?.recip()?;
    let g_mean = mean(grad)?;
    let gy_mean = mean(&(grad * y)?)?;
    grad.broadcast_sub(&g_mean)?
        .sub(&y.broadcast_mul(&gy_mean)?)?
        .broadcast_mul(&r)
}

/// Layer norm over the channels of x (B, C, H, W), read and written in place of the
/// permute -> norm -> permute a token-layout norm needs (two copies of the tensor).
pub fn channel_layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_path(&[x]) && x.rank() == 4 {
        x.contiguous()?.apply_op1(ChannelLayerNorm { eps })
    } else {
        plain_channels(x, eps)
    }
}

/// The reference form of [`channel_layer_norm`]: the channels moved last and back.
pub fn plain_channels(x: &Tensor, eps: f64) -> Result<Tensor> {
    plain(&x.permute((0, 2, 3, 1))?, eps)?.permute((0, 3, 1, 2))
}

struct ChannelLayerNorm {
    eps: f64,
}

/// Pixels per task of [`channel_layer_norm`]: the statistics of this many pixels are
/// accumulated side by side, in vector registers, while the channels stream past.
const PIXELS: usize = 64;

simd_dispatch! {
    // one image's (c, plane) pixels [p0, p0 + len), len <= PIXELS, written through
    // `dst` (the same layout): two passes for mean and variance as in the row form
    fn normalise_pixels(src: &[f32], dst: SendPtr, plane: usize, p0: usize, len: usize, eps: f32) {
        let c = src.len() / plane;
        let rows = || src.chunks_exact(plane).map(|row| &row[p0..p0 + len]);
        // the sum in f64, as the row form's: inputs far from zero mean keep their digits
        let mut sum = [0f64; PIXELS];
        for row in rows() {
            sum.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
        }
        let mean = sum.map(|s| (s / c as f64) as f32);
        let mut var = [0f32; PIXELS];
        for row in rows() {
            for ((v, &x), &m) in var.iter_mut().zip(row).zip(&mean) {
                *v += (x - m) * (x - m);
            }
        }
        let rstd = var.map(|v| 1.0 / (v / c as f32 + eps).sqrt());
        for (ch, row) in rows().enumerate() {
            // SAFETY: the caller gives each task its own pixels of every channel
            let out = unsafe { std::slice::from_raw_parts_mut(dst.get().add(ch * plane + p0), len) };
            for (((o, &x), &m), &r) in out.iter_mut().zip(row).zip(&mean).zip(&rstd) {
                *o = (x - m) * r;
            }
        }
    }
}

impl CustomOp1 for ChannelLayerNorm {
    fn name(&self) -> &'static str {
        "channel-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let plane = h * w;
        let mut dst = vec![0f32; src.len()];
        let tasks = plane.div_ceil(PIXELS);
        let out = SendPtr(dst.as_mut_ptr());
        (0..b * tasks).into_par_iter().for_each(|t| {
            let (image, p0) = (t / tasks, t % tasks * PIXELS);
            let src = &src[image * c * plane..][..c * plane];
            // SAFETY: `dst` outlives the loop; tasks write disjoint pixels
            let dst = SendPtr(unsafe { out.get().add(image * c * plane) });
            let len = PIXELS.min(plane - p0);
            normalise_pixels(src, dst, plane, p0, len, self.eps as f32);
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if arg.dtype() != DType::F32 {
            let eps = self.eps;
            let [g] = plain_gradients([arg], grad, |[x]| plain_channels(x, eps))?;
            return Ok(g);
        }
        // the mean over the channels of (B, C, P) as a matmul with a row of 1/C: a
        // reduction over dim 1 would take candle's element-by-element path
        let (b, c, h, w) = arg.dims4()?;
        let row = Tensor::full(1.0 / c as f32, (1, 1, c), arg.device())?;
        let mean = |t: &Tensor| row.broadcast_as((b, 1, c))?.matmul(t);
        let flat = |t: &Tensor| t.reshape((b, c, h * w));
        let dx = normalised_gradient(&flat(arg)?, &flat(res)?, &flat(grad)?, self.eps, mean)?;
        Ok(Some(dx.reshape((b, c, h, w))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, random};
    use candle_core::DType;
    use candle_core::Var;

    #[test]
    fn equals_the_plain_form() -> Result<()> {
        // a row width like Stage C's (1536), an odd one, and rows far from zero mean
        for (shape, shift) in [
            (vec![2, 9, 1536], 0.0),
            (vec![37, 5], 0.0),
            (vec![4, 64], 1e3),
        ] {
            let x = (random(&shape, 1)? * 3.0)?.affine(1.0, shift)?;
            let exact = plain(&x.to_dtype(DType::F64)?, 1e-6)?.to_dtype(DType::F32)?;
            let ours = max_diff(&layer_norm(&x, 1e-6)?, &exact)?;
            let candle = max_diff(&plain(&x, 1e-6)?, &exact)?;
            // no worse than the plain f32 form (which rounds the mean of values near
            // 1e3 to ~1e-4)
            assert!(
                ours <= candle.max(2e-6),
                "{shape:?}: {ours} vs candle's {candle}"
            );
        }
        Ok(())
    }

    #[test]
    fn channel_form_equals_the_permuted_plain_form() -> Result<()> {
        // a ragged last task (9 x 17 pixels), Stage C's width, values off zero mean
        for (shape, shift) in [
            ([2, 37, 9, 17], 0.0),
            ([1, 1536, 4, 6], 0.0),
            ([1, 64, 8, 8], 1e2),
        ] {
            let x = Var::from_tensor(&(random(&shape, 4)? * 3.0)?.affine(1.0, shift)?)?;
            let exact = plain_channels(&x.to_dtype(DType::F64)?, 1e-6)?.to_dtype(DType::F32)?;
            let ours = channel_layer_norm(&x, 1e-6)?;
            let d = max_diff(&ours, &exact)?;
            assert!(d < 2e-5, "{shape:?}: {d}");
            let probe = random(&shape, 5)?;
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_want = (plain_channels(&x, 1e-6)? * &probe)?
                .sum_all()?
                .backward()?;
            let d = max_diff(g_ours.get(&x).unwrap(), g_want.get(&x).unwrap())?;
            assert!(d < 1e-4, "{shape:?}: gradient {d}");
        }
        Ok(())
    }

    #[test]
    fn gradient_equals_the_plain_form() -> Result<()> {
        let x = Var::from_tensor(&random(&[3, 4, 16], 2)?)?;
        let probe = random(&[3, 4, 16], 3)?;
        let ours = (layer_norm(&x, 1e-6)? * &probe)?.sum_all()?.backward()?;
        let want = (plain(&x, 1e-6)? * &probe)?.sum_all()?.backward()?;
        let d = max_diff(ours.get(&x).unwrap(), want.get(&x).unwrap())?;
        assert!(d < 1e-5, "gradient max difference {d}");
        // the channel form, its inputs off zero mean as a ResBlock's are
        let x = Var::from_tensor(&((random(&[2, 5, 3, 4], 4)? * 3.0)? + 1.5)?)?;
        let probe = random(&[2, 5, 3, 4], 5)?;
        let ours = (channel_layer_norm(&x, 1e-6)? * &probe)?
            .sum_all()?
            .backward()?;
        let want = (plain_channels(&x, 1e-6)? * &probe)?
            .sum_all()?
            .backward()?;
        let d = max_diff(ours.get(&x).unwrap(), want.get(&x).unwrap())?;
        assert!(d < 1e-5, "channel form: gradient max difference {d}");
        Ok(())
    }
}
