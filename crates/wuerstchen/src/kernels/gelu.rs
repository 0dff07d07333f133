//! GELU with the exact (erf) form, `nn.GELU()` / `F.gelu(approximate="none")`.
//!
//! candle computes it one element at a time through libm's `erff` (a branchy scalar
//! routine): a fifth of Stage A's decode time and several percent of the other
//! stages'. Here erf is a rational function that the compiler vectorises:
//! erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (outside it erf is +-1 to f32 precision),
//! with P and Q of degree 5, fitted for this project by weighted least squares
//! (Lawson's iteration towards the minimax error; the fit is in
//! scripts/fit_erf.py). Error against the exact erf: 2e-8 in f64 arithmetic,
//! 4e-7 evaluated in f32, so GELU(x) is within 2e-7 |x| of candle's.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::exp;
use super::{contiguous_f32, fast_path, simd_dispatch, unsupported, with_f32, CHUNK};

const P: [f32; 6] = [
    // erf'(0): the fit lands within one f32 ulp of it
    std::f32::consts::FRAC_2_SQRT_PI,
    0.196_247_01,
    0.053_467_22,
    0.004_003_564_4,
    0.000_288_04,
    1.974_848_6e-6,
];
const Q: [f32; 6] = [
    1.0,
    0.507_250_55,
    0.116_475_62,
    0.015_444_255,
    0.001_216_340_9,
    3.748_098_2e-5,
];

#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    let mut p = P[5];
    let mut q = Q[5];
    for i in (0..5).rev() {
        p = p.mul_add(t, P[i]);
        q = q.mul_add(t, Q[i]);
    }
    // rounding can put |erf| a hair above 1 near the clamp
    (x * p / q).clamp(-1.0, 1.0)
}

simd_dispatch! {
    fn gelu_slice(src: &[f32], dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// GELU of `xs` in place (up to one tile's row of pixels), as [`gelu`] computes it:
/// the packed layer applies it to each output tile as the tile is finished, while it
/// is in L1, instead of in a pass over the whole output.
pub(super) fn gelu_in_place(xs: &mut [f32]) {
    let mut src = [0f32; 64];
    for chunk in xs.chunks_mut(64) {
        let src = &mut src[..chunk.len()];
        src.copy_from_slice(chunk);
        gelu_slice(src, chunk);
    }
}

simd_dispatch! {
    fn gelu_grad_slice(x: &[f32], g: &[f32], dst: &mut [f32]) {
        // 1 / sqrt(2 pi)
        const PDF: f32 = 0.398_942_3;
        for ((d, &x), &g) in dst.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            *d = g * x.mul_add(PDF * exp(-0.5 * x * x), cdf);
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| gelu_slice(s, d));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    /// d/dx x Phi(x) = Phi(x) + x phi(x): one pass on the CPU, else from candle's own
    /// (differentiable) ops.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if fast_path(&[arg, grad]) {
            let dx = with_f32(arg, |x| {
                with_f32(grad, |g| {
                    let mut dx = vec![0f32; x.len()];
                    dx.par_chunks_mut(CHUNK)
                        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                        .for_each(|(d, (x, g))| gelu_grad_slice(x, g, d));
                    dx
                })
            })??;
            return Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?));
        }
        let cdf = ((arg * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = (arg.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        let d = (cdf? + (arg * pdf?)?)?;
        Ok(Some(grad.mul(&d)?))
    }
}

/// Exact GELU: the fast kernel for f32 on the CPU, candle's `gelu_erf` otherwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fast_path(&[x]) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn equals_candles_gelu_erf() -> Result<()> {
        // every regime: 0, tiny, the bulk, the clamp at |x/sqrt2| = 4, far out
        let mut v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0025).collect();
        v.extend([
            0.0, 1e-30, -1e-30, 5.65, 5.66, -5.66, 30.0, -30.0, 1e4, -1e4,
        ]);
        let x = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        let fast = gelu(&x)?.to_vec1::<f32>()?;
        let plain = x.gelu_erf()?.to_vec1::<f32>()?;
        for ((a, b), x) in fast.iter().zip(&plain).zip(&v) {
            let tol = 1e-7 + 2.5e-7 * x.abs();
            assert!((a - b).abs() <= tol, "gelu({x}): fast {a}, candle {b}");
        }
        Ok(())
    }

    #[test]
    fn gradient_equals_candles() -> Result<()> {
        let v: Vec<f32> = (-300..300).map(|i| i as f32 * 0.02).collect();
        let x = candle_core::Var::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        let fast = gelu(x.as_tensor())?.sum_all()?.backward()?;
        let plain = x.as_tensor().gelu_erf()?.sum_all()?.backward()?;
        let (a, b) = (fast.get(&x).unwrap(), plain.get(&x).unwrap());
        let diff = (a - b)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max gradient difference {diff}");
        Ok(())
    }

    #[test]
    fn non_contiguous_and_other_dtypes_match() -> Result<()> {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)?
            .affine(0.5, -6.0)?
            .reshape((4, 6))?
            .t()?;
        let fast = gelu(&x)?;
        let plain = x.gelu_erf()?;
        assert_eq!(fast.dims(), plain.dims());
        let diff = (fast - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "transposed input: max difference {diff}");
        let h = x.to_dtype(DType::F16)?;
        let diff = (gelu(&h)?.to_dtype(DType::F32)? - h.gelu_erf()?.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "f16 falls back to candle's op");
        Ok(())
    }
}
