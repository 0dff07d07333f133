//! Depthwise k x k convolution (`groups = channels`, stride 1, zero or replicated
//! padding), the spatial mixer of every ResBlock.
//!
//! candle runs a grouped conv as one tiny im2col + matmul per channel. The plain form
//! here (a sum of k^2 shifted copies of the input, each scaled per channel) was 5x
//! faster, but still 2 k^2 whole-tensor passes with as many allocations: with Stage A's
//! layout copies, the larger part of its decode time. The kernel reads each input
//! row once per kernel row and accumulates in the output row, vectorised along the
//! row, one channel plane per task.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{dot, fast_path, plain_gradients, simd_dispatch, three_f32, with_f32};

/// How the border is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `padding=p` of the conv itself.
    Zeros(usize),
    /// `nn.ReplicationPad2d(p)` before a conv without padding (Stage A).
    Replicate(usize),
}

/// `F.conv2d(pad(x), weight, bias, groups=C)` for x (B, C, H, W) and weight (C, 1, k, k).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: Padding,
) -> Result<Tensor> {
    let c = weight.dim(0)?;
    let fast = fast_path(&[x, weight]);
    if !fast {
        return plain(x, weight, bias, padding);
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(c, DType::F32, x.device())?;
            &zeros
        }
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Depthwise { padding },
    )
}

/// The reference form: the sum of the k^2 shifted inputs, each times its tap, from
/// candle's differentiable ops.
pub fn plain(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: Padding,
) -> Result<Tensor> {
    let (c, _, kh, kw) = weight.dims4()?;
    let (_, _, h, w) = x.dims4()?;
    let (padded, p) = match padding {
        Padding::Zeros(p) => (x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?, p),
        Padding::Replicate(p) => (x.pad_with_same(2, p, p)?.pad_with_same(3, p, p)?, p),
    };
    let (oh, ow) = (h + 2 * p + 1 - kh, w + 2 * p + 1 - kw);
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
    match bias {
        Some(b) => sum.broadcast_add(&b.reshape((1, c, 1, 1))?),
        None => Ok(sum),
    }
}

struct Depthwise {
    padding: Padding,
}

/// The sizes one plane's convolution needs.
#[derive(Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
    k: usize,
    p: usize,
    replicate: bool,
    oh: usize,
    ow: usize,
}

simd_dispatch! {
    fn convolve_plane(src: &[f32], taps: &[f32], bias: f32, dst: &mut [f32], s: Plane) {
        for (y, out) in dst.chunks_mut(s.ow).enumerate() {
            out.fill(bias);
            for ky in 0..s.k {
                // input row y + ky - p: clamped into the image when replicating, else
                // skipped outside it (zeros)
                let iy = (y + ky) as isize - s.p as isize;
                let iy = if s.replicate {
                    iy.clamp(0, s.h as isize - 1) as usize
                } else if (0..s.h as isize).contains(&iy) {
                    iy as usize
                } else {
                    continue;
                };
                let row = &src[iy * s.w..(iy + 1) * s.w];
                for kx in 0..s.k {
                    let tap = taps[ky * s.k + kx];
                    // output columns whose input column x + kx - p is inside the row
                    let x0 = s.p.saturating_sub(kx).min(s.ow);
                    let x1 = s.ow.min((s.w + s.p).saturating_sub(kx)).max(x0);
                    let inp = &row[x0 + kx - s.p..x1 + kx - s.p];
                    for (o, i) in out[x0..x1].iter_mut().zip(inp) {
                        *o = tap.mul_add(*i, *o);
                    }
                    if s.replicate {
                        // the columns left and right of the row read its end pixels
                        for o in &mut out[..x0] {
                            *o = tap.mul_add(row[0], *o);
                        }
                        for o in &mut out[x1..] {
                            *o = tap.mul_add(row[s.w - 1], *o);
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, weight, bias] = three_f32(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (wc, one, k, kw) = l2.shape().dims4()?;
        let (p, replicate) = match self.padding {
            Padding::Zeros(p) => (p, false),
            Padding::Replicate(p) => (p, true),
        };
        if wc != c || one != 1 || kw != k || bias.len() != c || h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!(
                "depthwise conv: input {:?}, weight {:?}, bias {:?}, padding {p} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let s = Plane {
            h,
            w,
            k,
            p,
            replicate,
            oh: h + 2 * p + 1 - k,
            ow: w + 2 * p + 1 - k,
        };
        let mut out = vec![0f32; b * c * s.oh * s.ow];
        out.par_chunks_mut(s.oh * s.ow)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (dst, src))| {
                let ch = plane % c;
                convolve_plane(src, &weight[ch * k * k..][..k * k], bias[ch], dst, s);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, s.oh, s.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = match self.padding {
            Padding::Zeros(p) if fast_path(&[x, weight, grad]) && p < weight.dim(2)? => p,
            padding => {
                let [gx, gw, gb] = plain_gradients([x, weight, bias], grad, |[x, w, b]| {
                    plain(x, w, Some(b), padding)
                })?;
                return Ok((gx, gw, gb));
            }
        };
        let (b, c, h, w) = x.dims4()?;
        let k = weight.dim(2)?;
        let grad = grad.contiguous()?;
        let (_, _, oh, ow) = grad.dims4()?;
        // the input gradient is the convolution of the output gradient with the kernel
        // turned by 180 degrees, padded so that it comes out the input's size
        let turned: Vec<u32> = (0..(k * k) as u32).rev().collect();
        let turned = weight
            .reshape((c, k * k))?
            .index_select(&Tensor::new(turned, x.device())?, 1)?
            .reshape((c, 1, k, k))?;
        let gx = depthwise_conv2d(&grad, &turned, None, Padding::Zeros(k - 1 - p))?;
        let s = Plane {
            h,
            w,
            k,
            p,
            replicate: false,
            oh,
            ow,
        };
        let x = x.contiguous()?;
        let taps = with_f32(&x, |x| {
            with_f32(&grad, |g| {
                let per_plane: Vec<Vec<f32>> = x
                    .par_chunks(h * w)
                    .zip(g.par_chunks(oh * ow))
                    .map(|(src, g)| {
                        let mut taps = vec![0f32; k * k];
                        tap_gradients(src, g, s, &mut taps);
                        taps
                    })
                    .collect();
                let mut sum = vec![0f32; c * k * k];
                for (plane, taps) in per_plane.iter().enumerate() {
                    let dst = &mut sum[plane % c * k * k..][..k * k];
                    dst.iter_mut().zip(taps).for_each(|(d, t)| *d += t);
                }
                sum
            })
        })??;
        let gw = Tensor::from_vec(taps, (c, 1, k, k), x.device())?;
        let gb = grad.reshape((b, c, oh * ow))?.sum(2)?.sum(0)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

simd_dispatch! {
    // d loss / d tap (ky, kx) of one plane: the output gradient dotted with the input
    // shifted by that tap (zero padding), added to `taps`
    fn tap_gradients(src: &[f32], g: &[f32], s: Plane, taps: &mut [f32]) {
        for (y, grow) in g.chunks(s.ow).enumerate() {
            for ky in 0..s.k {
                let iy = (y + ky) as isize - s.p as isize;
                if !(0..s.h as isize).contains(&iy) {
                    continue;
                }
                let row = &src[iy as usize * s.w..][..s.w];
                for kx in 0..s.k {
                    let x0 = s.p.saturating_sub(kx).min(s.ow);
                    let x1 = s.ow.min((s.w + s.p).saturating_sub(kx)).max(x0);
                    taps[ky * s.k + kx] += dot(&grow[x0..x1], &row[x0 + kx - s.p..x1 + kx - s.p]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, random};
    use candle_core::Var;

    #[test]
    fn equals_candles_grouped_conv_forward_and_backward() -> Result<()> {
        for (c, k, p, h, w) in [
            (5, 3, 1, 7, 9),
            (3, 3, 0, 6, 5),
            (4, 5, 2, 8, 8),
            (2, 3, 1, 1, 20),
        ] {
            let x = Var::from_tensor(&random(&[2, c, h, w], 1)?)?;
            let wt = Var::from_tensor(&random(&[c, 1, k, k], 2)?)?;
            let b = Var::from_tensor(&random(&[c], 3)?)?;
            let ours = depthwise_conv2d(&x, &wt, Some(&b), Padding::Zeros(p))?;
            let conv = x
                .conv2d(&wt, p, 1, 1, c)?
                .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
            assert_eq!(ours.dims(), conv.dims());
            let d = max_diff(&ours, &conv)?;
            assert!(d < 1e-5, "c {c} k {k} p {p}: forward differs by {d}");
            let probe = random(conv.dims(), 4)?;
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_conv = (conv * &probe)?.sum_all()?.backward()?;
            for v in [&x, &wt, &b] {
                let d = max_diff(g_ours.get(v).unwrap(), g_conv.get(v).unwrap())?;
                assert!(
                    d < 1e-4,
                    "c {c} k {k}: gradient {:?} differs by {d}",
                    v.dims()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn paddings_agree_with_the_plain_form() -> Result<()> {
        let x = random(&[1, 3, 5, 6], 5)?;
        let wt = random(&[3, 1, 3, 3], 6)?;
        for pad in [
            Padding::Zeros(1),
            Padding::Replicate(1),
            Padding::Replicate(2),
        ] {
            let ours = depthwise_conv2d(&x, &wt, None, pad)?;
            let want = plain(&x, &wt, None, pad)?;
            assert_eq!(ours.dims(), want.dims());
            let d = max_diff(&ours, &want)?;
            assert!(d < 1e-6, "{pad:?}: max difference {d}");
        }
        // replication against its definition: pad, then convolve without padding
        let padded = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
        let want = padded.conv2d(&wt, 0, 1, 1, 3)?;
        let d = max_diff(
            &depthwise_conv2d(&x, &wt, None, Padding::Replicate(1))?,
            &want,
        )?;
        assert!(d < 1e-5, "replicate vs pad + conv: {d}");
        Ok(())
    }
}
