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

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::packed_linear::PackedLinear;

/// Whether a square k x k kernel splits into stride x stride phases of whole taps, with
/// the padding cropped from the phases' joined image: the shapes both the gemm form
/// and the packed form take (others go to candle's op).
fn splits_into_phases(kh: usize, kw: usize, stride: usize, padding: usize) -> bool {
    kh == kw && stride > 0 && kh.is_multiple_of(stride) && padding * 2 <= kh
}

/// `F.conv_transpose2d(x, weight, bias, stride, padding)` with dilation 1, one group
/// and no output padding; `weight` is (C_in, C_out, k, k). Falls back to candle's op
/// where the kernel does not split into phases (`splits_into_phases`).
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let (_, c_out, kh, kw) = weight.dims4()?;
    if !splits_into_phases(kh, kw, stride, padding) {
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

/// [`conv_transpose2d`] for inference in f32 on the CPU, where the packed kernel runs:
/// each phase's taps are one [`PackedLinear`] (packed once, at load time) applied to
/// the input as it lies (channels first), and its t x t shifted products are summed
/// straight into the phase's output pixels. The gemm form above makes each product in
/// the token layout and then pads, adds, stacks, interleaves and crops whole tensors:
/// Stage A's 384 -> 192 up-sampler at 1024 px moved ~2 GB that way (memcpy was 8% of
/// its decode).
#[derive(Debug, Clone)]
pub struct PackedConvTranspose {
    /// Phase (ry, rx) at ry * stride + rx: outputs ordered (a, b, C_out), tap (a, b)
    /// being kernel element (a * stride + ry, b * stride + rx).
    phases: Vec<PackedLinear>,
    bias: Vec<f32>,
    c_out: usize,
    stride: usize,
    padding: usize,
    /// Taps per axis in a phase: kernel / stride.
    taps: usize,
}

impl PackedConvTranspose {
    /// From a PyTorch weight (C_in, C_out, k, k); None where [`conv_transpose2d`]
    /// would fall back to candle's op or the packed kernel does not run.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Option<Self>> {
        let (_, c_out, kh, kw) = weight.dims4()?;
        if !super::packed_linear::available() || !splits_into_phases(kh, kw, stride, padding) {
            return Ok(None);
        }
        let (s, t) = (stride, kh / stride);
        // (C_in, C_out, k, k) -> (k, k, C_out, C_in): tap (i, j) is a (C_out, C_in) weight
        let taps = weight.permute((2, 3, 1, 0))?;
        let mut phases = Vec::with_capacity(s * s);
        for ry in 0..s {
            for rx in 0..s {
                let rows = (0..t * t)
                    .map(|ab| taps.get(ab / t * s + ry)?.get(ab % t * s + rx))
                    .collect::<Result<Vec<_>>>()?;
                phases.push(PackedLinear::new(&Tensor::cat(&rows, 0)?, None)?);
            }
        }
        let bias = match bias {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; c_out],
        };
        Ok(Some(Self {
            phases,
            bias,
            c_out,
            stride,
            padding,
            taps: t,
        }))
    }

    /// x (B, C_in, H, W) f32 on the CPU -> (B, C_out, H_out, W_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let (s, t, p, c_out) = (self.stride, self.taps, self.padding, self.c_out);
        let (fh, fw) = (h + t - 1, w + t - 1);
        let (Some(oh), Some(ow)) = ((fh * s).checked_sub(2 * p), (fw * s).checked_sub(2 * p))
        else {
            candle_core::bail!("transposed conv: a {h} x {w} input is smaller than its padding")
        };
        let plane = oh * ow;
        // every output pixel lies in exactly one phase: (oy + p) mod s, (ox + p) mod s
        let mut out = vec![0f32; b * c_out * plane];
        for (phase, packed) in self.phases.iter().enumerate() {
            let (ry, rx) = (phase / s, phase % s);
            crate::flops::add(2 * b * h * w * c_in * t * t * c_out);
            let y = packed.forward_channels_first(x)?;
            let (storage, layout) = y.storage_and_layout();
            let y = match &*storage {
                Storage::Cpu(cpu) => contiguous_f32(cpu, layout),
                _ => None,
            }
            .ok_or_else(|| {
                candle_core::Error::Msg("packed transposed conv: no f32 product".into())
            })?;
            out.par_chunks_mut(plane).enumerate().for_each(|(i, out)| {
                let (image, co) = (i / c_out, i % c_out);
                // tap (a, b)'s product plane for this output channel
                let tap = |ab: usize| &y[((image * t * t + ab) * c_out + co) * h * w..][..h * w];
                // one row of the phase image: the bias plus each tap's product row
                // shifted b columns on; then its pixels go to every s-th output column
                let mut row = vec![0f32; fw];
                for m in 0..fh {
                    let Some(oy) = (m * s + ry).checked_sub(p).filter(|&oy| oy < oh) else {
                        continue;
                    };
                    row.fill(self.bias[co]);
                    for a in (0..t).filter(|&a| m >= a && m - a < h) {
                        for bb in 0..t {
                            let src = &tap(a * t + bb)[(m - a) * w..][..w];
                            for (r, &v) in row[bb..bb + w].iter_mut().zip(src) {
                                *r += v;
                            }
                        }
                    }
                    let dst = &mut out[oy * ow..][..ow];
                    for (n, &v) in row.iter().enumerate() {
                        if let Some(ox) = (n * s + rx).checked_sub(p).filter(|&ox| ox < ow) {
                            dst[ox] = v;
                        }
                    }
                }
            });
        }
        Tensor::from_vec(out, (b, c_out, oh, ow), x.device())
    }
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
    fn packed_form_equals_candles_conv_transpose() -> Result<()> {
        if !crate::kernels::packed_linear::available() {
            println!("no packed kernel on this CPU: the packed transposed conv is not built");
            return Ok(());
        }
        // as above, with and without a bias, ragged planes, a padding of a whole tap
        for (k, s, p, (h, w), bias) in [
            (4, 2, 1, (5, 7), true),
            (2, 2, 0, (6, 3), true),
            (6, 3, 2, (4, 4), false),
            (4, 2, 2, (3, 9), true),
            (3, 1, 1, (5, 2), false),
        ] {
            let x = random(&[2, 5, h, w], 1)?;
            let wt = random(&[5, 3, k, k], 2)?;
            let b = random(&[3], 3)?;
            let b = bias.then_some(&b);
            let packed = PackedConvTranspose::new(&wt, b, s, p)?.expect("a fitting shape");
            let mut plain = x.conv_transpose2d(&wt, p, 0, s, 1)?;
            if let Some(b) = b {
                plain = plain.broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
            }
            for isa in crate::kernels::Isa::supported() {
                let ours = isa.with(|| packed.forward(&x))?;
                assert_eq!(ours.dims(), plain.dims(), "k{k} s{s} p{p}");
                let d = max_diff(&ours, &plain)?;
                assert!(d < 1e-5, "{isa:?} k{k} s{s} p{p}: max difference {d}");
            }
        }
        // an empty input whose output would be smaller than nothing: an error
        let wt = random(&[5, 3, 2, 2], 2)?;
        let packed = PackedConvTranspose::new(&wt, None, 2, 1)?.expect("a fitting shape");
        let empty = Tensor::zeros(
            (1, 5, 0, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        assert!(packed.forward(&empty).is_err());
        // shapes the gemm form hands to candle are not packed either
        let wt = random(&[5, 3, 3, 3], 2)?;
        assert!(PackedConvTranspose::new(&wt, None, 2, 1)?.is_none());
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
