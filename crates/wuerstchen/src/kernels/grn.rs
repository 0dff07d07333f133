//! Global response normalisation (ConvNeXt-V2's GRN) on tokens (B, N, C), inside the
//! channel MLP of every Stage B and Stage C ResBlock, on its widest tensor (4 C).
//!
//! From candle's ops it is nine whole-tensor passes (square, sum, ..., three
//! broadcasts, add); here two reads and one write: the per-channel sums of squares
//! over the positions (partial sums per block of rows, in f64), then
//! x (1 + gamma s) + beta with s the channel's norm over the mean norm.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{fast_path, plain_gradients, simd_dispatch, sum_by, three_f32, whole_rows};

/// GRN of x (B, N, C) with gamma and beta of C elements (any shape).
pub fn grn(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let fast = fast_path(&[x, gamma, beta]);
    if fast {
        x.contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Grn)
    } else {
        plain(x, gamma, beta)
    }
}

/// The reference form from candle's differentiable ops (statistics in f32: a sum of
/// squares over all positions overflows f16).
pub fn plain(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    use crate::blocks::upcast;
    use candle_core::D;
    let c = x.dim(D::Minus1)?;
    // (B, 1, C). The 1e-12 keeps sqrt's gradient finite for a channel that GELU
    // zeroed at every position (seen in training); it moves no f32 result.
    let agg = (upcast(x)?.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    let stand = agg
        .broadcast_div(&(agg.mean_keepdim(D::Minus1)? + 1e-6)?)?
        .to_dtype(x.dtype())?;
    let gamma = gamma.reshape((1, 1, c))?;
    let beta = beta.reshape((1, 1, c))?;
    x.broadcast_mul(&stand)?
        .broadcast_mul(&gamma)?
        .broadcast_add(&beta)?
        .add(x)
}

struct Grn;

/// Each channel's factor from its sum of squares over the positions:
/// x * s * gamma + beta + x = x * (1 + gamma s) + beta, s = norm / mean norm.
fn scales(sums: &[f64], gamma: &[f32]) -> Vec<f32> {
    let norms: Vec<f32> = sums.iter().map(|&s| (s as f32 + 1e-12).sqrt()).collect();
    let mean = norms.iter().map(|&v| v as f64).sum::<f64>() as f32 / norms.len() as f32;
    norms
        .iter()
        .zip(gamma)
        .map(|(&v, &g)| 1.0 + v / (mean + 1e-6) * g)
        .collect()
}

/// GRN of channels-first x (B, C, H, W): the same function as [`grn`] on its tokens,
/// where each channel's positions are one contiguous plane.
pub fn grn_channels_first(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    if fast_path(&[x, gamma, beta]) && x.rank() == 4 {
        x.contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, GrnChannelsFirst)
    } else {
        plain_channels_first(x, gamma, beta)
    }
}

/// The reference form of [`grn_channels_first`]: [`plain`] on the tokens.
pub fn plain_channels_first(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    crate::blocks::from_tokens(&plain(&crate::blocks::to_tokens(x)?, gamma, beta)?, h, w)
}

struct GrnChannelsFirst;

simd_dispatch! {
    fn scale_plane(src: &[f32], dst: &mut [f32], scale: f32, beta: f32) {
        for (o, &x) in dst.iter_mut().zip(src) {
            *o = x.mul_add(scale, beta);
        }
    }
}

simd_dispatch! {
    fn sum_squares(src: &[f32], out: &mut f64) {
        *out = sum_by(src, |x| x * x) as f64;
    }
}

impl CustomOp3 for GrnChannelsFirst {
    fn name(&self) -> &'static str {
        "grn-channels-first"
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
        let [x, gamma, beta] = three_f32(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (_, c, h, w) = l1.shape().dims4()?;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "grn: input {:?} but gamma/beta of {}",
                l1.shape(),
                gamma.len()
            )
        }
        let plane = h * w;
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks(c * plane).zip(out.chunks_mut(c * plane)) {
            let sums: Vec<f64> = src
                .par_chunks(plane)
                .map(|p| {
                    let mut s = 0.0;
                    sum_squares(p, &mut s);
                    s
                })
                .collect();
            let scale = scales(&sums, gamma);
            dst.par_chunks_mut(plane)
                .zip(src.par_chunks(plane))
                .enumerate()
                .for_each(|(ch, (d, s))| scale_plane(s, d, scale[ch], beta[ch]));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if x.dtype() != DType::F32 {
            let [gx, gg, gb] = plain_gradients([x, gamma, beta], grad, |[x, g, b]| {
                plain_channels_first(x, g, b)
            })?;
            return Ok((gx, gg, gb));
        }
        let (gx, gg, gb) = channels_first_gradients(x, gamma, grad)?;
        Ok((
            Some(gx),
            Some(gg.reshape(gamma.shape())?),
            Some(gb.reshape(beta.shape())?),
        ))
    }
}

/// The gradients of [`grn_channels_first`] in closed form, from candle's ops on
/// (B, C, H*W) with every reduction over the trailing positions (its fast path; the
/// plain form's backward reduces over leading dims, element by element).
///
/// Per image, with S_c the sum of squares of channel c, N_c = sqrt(S_c + 1e-12),
/// d = mean_c N_c + 1e-6, s_c = N_c / d and A_c = sum_p g x:
/// dx = g (1 + gamma s) + x / N_c * (gamma_c A_c / d - sum_j gamma_j A_j N_j / (C d^2)),
/// dgamma = sum_b s A, dbeta = sum_{b, p} g.
fn channels_first_gradients(
    x: &Tensor,
    gamma: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.reshape((b, c, h * w))?;
    let g = grad.reshape((b, c, h * w))?;
    let gamma = gamma.reshape((1, c, 1))?;
    let norms = (x.sqr()?.sum_keepdim(2)? + 1e-12)?.sqrt()?; // (B, C, 1)
    let d = (norms.mean_keepdim(1)? + 1e-6)?; // (B, 1, 1)
    let s = norms.broadcast_div(&d)?;
    let a = (&g * &x)?.sum_keepdim(2)?;
    let ga = a.broadcast_mul(&gamma)?;
    let shared =
        (ga.broadcast_mul(&norms)?.sum_keepdim(1)? / c as f64)?.broadcast_div(&d.sqr()?)?;
    let d_norms = ga.broadcast_div(&d)?.broadcast_sub(&shared)?;
    let gx = (g.broadcast_mul(&(s.broadcast_mul(&gamma)? + 1.0)?)?
        + x.broadcast_mul(&(d_norms / norms)?)?)?
    .reshape((b, c, h, w))?;
    let gg = (s * a)?.sum(0)?;
    let gb = g.sum(2)?.sum(0)?;
    Ok((gx, gg, gb))
}

simd_dispatch! {
    fn add_squares(rows: &[f32], acc: &mut [f64]) {
        for row in rows.chunks(acc.len()) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += (x * x) as f64;
            }
        }
    }
}

simd_dispatch! {
    fn scale_rows(src: &[f32], dst: &mut [f32], scale: &[f32], beta: &[f32]) {
        for (s, d) in src.chunks(scale.len()).zip(dst.chunks_mut(scale.len())) {
            for (((o, &x), &m), &b) in d.iter_mut().zip(s).zip(scale).zip(beta) {
                *o = x.mul_add(m, b);
            }
        }
    }
}

impl CustomOp3 for Grn {
    fn name(&self) -> &'static str {
        "grn-fused"
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
        let [x, gamma, beta] = three_f32(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (_, n, c) = l1.shape().dims3()?;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "grn: input {:?} but gamma/beta of {}",
                l1.shape(),
                gamma.len()
            )
        }
        let rows = whole_rows(c);
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks(n * c).zip(out.chunks_mut(n * c)) {
            // sums of squares per channel: partial sums per block of rows, then added
            let sums = src
                .par_chunks(rows)
                .map(|block| {
                    let mut acc = vec![0f64; c];
                    add_squares(block, &mut acc);
                    acc
                })
                .reduce(
                    || vec![0f64; c],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            let scale = scales(&sums, gamma);
            dst.par_chunks_mut(rows)
                .zip(src.par_chunks(rows))
                .for_each(|(d, s)| scale_rows(s, d, &scale, beta));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gg, gb] = plain_gradients([x, gamma, beta], grad, |[x, g, b]| plain(x, g, b))?;
        Ok((gx, gg, gb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, random};
    use candle_core::Device;
    use candle_core::Var;

    #[test]
    fn equals_the_plain_form_forward_and_backward() -> Result<()> {
        // many positions (several row blocks), an odd channel count, a zeroed channel
        for (b, n, c) in [(2, 3000, 24), (1, 7, 5)] {
            let x = (random(&[b, n, c], 1)? * 2.0)?;
            let mask: Vec<f32> = (0..c).map(|i| if i == 0 { 0.0 } else { 1.0 }).collect();
            let zero_first = Tensor::new(mask, &Device::Cpu)?;
            let x = Var::from_tensor(&x.broadcast_mul(&zero_first)?)?;
            let gamma = Var::from_tensor(&random(&[1, 1, 1, c], 2)?)?;
            let beta = Var::from_tensor(&random(&[1, 1, 1, c], 3)?)?;
            let ours = grn(&x, &gamma, &beta)?;
            let want = plain(&x, &gamma, &beta)?;
            let probe = random(&[b, n, c], 4)?;
            // the channels-first form on the same values as an image (B, C, 1, N)
            let image = |t: &Tensor| t.transpose(1, 2)?.unsqueeze(2);
            let x_cf = Var::from_tensor(&image(&x)?.contiguous()?)?;
            let ours_cf = grn_channels_first(&x_cf, &gamma, &beta)?;
            let d = max_diff(&image(&ours)?, &ours_cf)?;
            assert!(d < 1e-5, "({b}, {n}, {c}): channels-first differs by {d}");
            let g_cf = (ours_cf * image(&probe)?)?.sum_all()?.backward()?;
            let d = max_diff(&ours, &want)?;
            assert!(d < 1e-5, "({b}, {n}, {c}): max difference {d}");
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_want = (want * &probe)?.sum_all()?.backward()?;
            for v in [&x, &gamma, &beta] {
                let d = max_diff(g_ours.get(v).unwrap(), g_want.get(v).unwrap())?;
                assert!(d < 1e-4, "gradient {:?}: {d}", v.dims());
            }
            let d = max_diff(&image(g_want.get(&x).unwrap())?, g_cf.get(&x_cf).unwrap())?;
            assert!(d < 1e-4, "channels-first gradient: {d}");
            for v in [&gamma, &beta] {
                let d = max_diff(g_cf.get(v).unwrap(), g_want.get(v).unwrap())?;
                assert!(d < 1e-4, "channels-first gradient {:?}: {d}", v.dims());
            }
        }
        Ok(())
    }
}
