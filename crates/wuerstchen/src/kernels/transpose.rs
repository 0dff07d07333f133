//! The transpose of the last two dims of a (B, R, S) tensor, written contiguous: the
//! blocks' moves between NCHW and tokens (an AttnBlock's norm output into tokens, its
//! result back). candle copies such a transpose element by element on one thread
//! while the other waits; here tiles of `TILE` x `TILE` are copied on rayon's
//! threads, each reading and writing whole cache lines.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, fast_path, unsupported};

/// Rows and columns of a tile copied at once (16 x 16 f32: a cache line per row).
const TILE: usize = 16;
/// Output rows per task: whole tiles, a few hundred KB of output a task.
const TASK_ROWS: usize = 4 * TILE;

/// x (B, R, S) -> (B, S, R), contiguous.
pub fn swap_last_two(x: &Tensor) -> Result<Tensor> {
    if fast_path(&[x]) {
        x.contiguous()?.apply_op1(Transpose)
    } else {
        x.transpose(1, 2)?.contiguous()
    }
}

struct Transpose;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let (b, r, s) = layout.shape().dims3()?;
        let mut out = vec![0f32; x.len()];
        if !out.is_empty() {
            // a task: TASK_ROWS output rows (input columns) of one batch entry
            out.par_chunks_mut(s * r)
                .zip(x.par_chunks(r * s))
                .for_each(|(out, x)| {
                    out.par_chunks_mut(TASK_ROWS * r)
                        .enumerate()
                        .for_each(|(t, rows)| {
                            let j0 = t * TASK_ROWS;
                            for i0 in (0..r).step_by(TILE) {
                                let width = TILE.min(r - i0);
                                for (j, row) in (j0..).zip(rows.chunks_exact_mut(r)) {
                                    for (i, d) in row[i0..i0 + width].iter_mut().enumerate() {
                                        *d = x[(i0 + i) * s + j];
                                    }
                                }
                            }
                        })
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, s, r))))
    }

    /// The gradient of a transpose is the transpose of the gradient.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swap_last_two(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::random;
    use candle_core::{DType, Var};

    #[test]
    fn equals_candles_transpose() -> Result<()> {
        // ragged against the tiles and tasks, several batch entries, one row or column
        for dims in [
            [2, 37, 70],
            [1, 16, 64],
            [3, 1, 5],
            [2, 130, 1],
            [1, 300, 577],
        ] {
            let x = random(&dims, 1)?;
            let got = swap_last_two(&x)?;
            let want = x.transpose(1, 2)?.contiguous()?;
            assert_eq!(got.dims(), want.dims());
            let same =
                got.flatten_all()?.to_vec1::<f32>()? == want.flatten_all()?.to_vec1::<f32>()?;
            assert!(same, "{dims:?}");
        }
        // other dtypes take candle's path
        let x = random(&[2, 3, 4], 2)?.to_dtype(DType::F64)?;
        let want = x.transpose(1, 2)?.contiguous()?.to_vec3::<f64>()?;
        assert_eq!(swap_last_two(&x)?.to_vec3::<f64>()?, want);
        assert_eq!(swap_last_two(&random(&[2, 0, 3], 3)?)?.dims(), &[2, 3, 0]);
        assert!(
            swap_last_two(&random(&[6, 2], 3)?).is_err(),
            "not (B, R, S)"
        );
        Ok(())
    }

    #[test]
    fn its_gradient_is_the_transposed_gradient() -> Result<()> {
        let x = Var::from_tensor(&random(&[2, 19, 33], 4)?)?;
        let probe = random(&[2, 33, 19], 5)?;
        let grads = (swap_last_two(x.as_tensor())? * &probe)?
            .sum_all()?
            .backward()?;
        let want = probe.transpose(1, 2)?.contiguous()?;
        let got = grads.get(x.as_tensor()).unwrap();
        assert_eq!(got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        Ok(())
    }
}
