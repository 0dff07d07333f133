//! Transposed convolution as matrix products, for kernels that are a multiple of the
//! stride (Stage A's k=4 s=2 p=1 up-sampler, Stage B's k=2 s=2).
//!
//! candle's CPU `conv_transpose2d` is a direct loop of dot products (no gemm): 14% of
//! Stage A's decode. Split the output by its phase (the output row's remainder mod the
//! stride): each phase is a sum of t = k/s shifted copies per axis of the input
//! multiplied by one tap of the kernel. So per phase, one gemm of the input's pixels
//! (B*H*W, C_in) by the phase's t*t taps (C_in, t*t*C_out), then t*t shifted adds;
//! interleaving the phases and cropping the padding gives the output. Only whole-tensor
//! candle ops, so it runs on every device and keeps candle's backward pass.

use candle_core::{Result, Tensor};

/// `F.conv_transpose2d(x, weight, bias, stride, padding)` with dilation 1, one group
/// and no output padding; `weight` is (C_in, C_out, k, k). Falls back to candle's op
/// when k is not a multiple of the stride.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let (_, c_out, kh, kw) = weight.dims4()?;
    if kh != kw || kh % stride != 0 || padding * 2 > kh {
        let y = x.conv_transpose2d(weight, padding, 0, stride, 1)?;
        return match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
            None => Ok(y),
        };
    }
    let (s, t) = (stride, kh / stride);
    // (B, C_in, H, W) -> (B*H*W, C_in)
    let pixels = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c_in))?;
    // (C_in, C_out, k, k) -> (k, k, C_in, C_out): tap (i, j) is a (C_in, C_out) matrix
    let taps = weight.permute((2, 3, 0, 1))?;
    let (fh, fw) = (h + t - 1, w + t - 1);
    let mut phases = Vec::with_capacity(s * s);
    for ry in 0..s {
        for rx in 0..s {
            // this phase's taps side by side: (C_in, t*t*C_out), ordered (a, b, C_out)
            let mut cols = Vec::with_capacity(t * t);
            for a in 0..t {
                for bb in 0..t {
                    cols.push(taps.get(a * s + ry)?.get(bb * s + rx)?);
                }
            }
            let wp = Tensor::cat(&cols, 1)?;
            crate::flops::add_matmul(&pixels, &wp)?;
            // (B*H*W, t*t*C_out) -> (B, H, W, t*t, C_out)
            let y = pixels.matmul(&wp)?.reshape((b, h, w, t * t, c_out))?;
            // tap (a, b) lands a rows and b columns further on: the phase image is the
            // sum of the shifted products, (B, H+t-1, W+t-1, C_out)
            let mut phase: Option<Tensor> = None;
            for a in 0..t {
                for bb in 0..t {
                    let part = y
                        .narrow(3, a * t + bb, 1)?
                        .squeeze(3)?
                        .pad_with_zeros(1, a, t - 1 - a)?
                        .pad_with_zeros(2, bb, t - 1 - bb)?;
                    phase = Some(match phase {
                        Some(p) => (p + part)?,
                        None => part,
                    });
                }
            }
            phases.push(phase.expect("t >= 1"));
        }
    }
    // full output row m*s + ry, column n*s + rx: (B, fh, s, fw, s, C_out)
    let full = Tensor::stack(&phases, 3)?
        .reshape((b, fh, fw, s, s, c_out))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, fh * s, fw * s, c_out))?;
    let (oh, ow) = (fh * s - 2 * padding, fw * s - 2 * padding);
    // crop the padding, back to (B, C_out, H_out, W_out)
    let y = full
        .narrow(1, padding, oh)?
        .narrow(2, padding, ow)?
        .permute((0, 3, 1, 2))?;
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?,
        None => y,
    };
    y.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, random};
    use candle_core::Var;

    #[test]
    fn equals_candles_conv_transpose() -> Result<()> {
        // Stage A's k4 s2 p1, Stage B's k2 s2, and a stride 3 with padding
        for (k, s, p, (h, w)) in [(4, 2, 1, (5, 7)), (2, 2, 0, (6, 3)), (6, 3, 2, (4, 4))] {
            let x = random(&[2, 5, h, w], 1)?;
            let wt = random(&[5, 3, k, k], 2)?;
            let bias = random(&[3], 3)?;
            let ours = conv_transpose2d(&x, &wt, Some(&bias), s, p)?;
            let plain = x
                .conv_transpose2d(&wt, p, 0, s, 1)?
                .broadcast_add(&bias.reshape((1, 3, 1, 1))?)?;
            assert_eq!(ours.dims(), plain.dims(), "k{k} s{s} p{p}");
            let d = max_diff(&ours, &plain)?;
            assert!(d < 1e-5, "k{k} s{s} p{p}: max difference {d}");
        }
        Ok(())
    }

    #[test]
    fn gradients_equal_candles() -> Result<()> {
        let x = Var::from_tensor(&random(&[1, 4, 3, 5], 4)?)?;
        let wt = Var::from_tensor(&random(&[4, 2, 4, 4], 5)?)?;
        let probe = random(&[1, 2, 6, 10], 6)?;
        let ours = (conv_transpose2d(&x, &wt, None, 2, 1)? * &probe)?
            .sum_all()?
            .backward()?;
        let plain = (x.conv_transpose2d(&wt, 1, 0, 2, 1)? * &probe)?
            .sum_all()?
            .backward()?;
        for v in [&x, &wt] {
            let d = max_diff(ours.get(v).unwrap(), plain.get(v).unwrap())?;
            assert!(d < 1e-5, "gradient max difference {d}");
        }
        Ok(())
    }
}
