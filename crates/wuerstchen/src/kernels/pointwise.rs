//! 1x1 convolution of NCHW tensors: a linear layer over the channels, as the ResBlocks'
//! channel MLPs and Stage A's mixing blocks use it once they stay channels-first.
//!
//! From candle's ops it is a batched matmul and then a broadcast add of the bias: a
//! second pass over the output, the widest tensor of the block (4 C channels). Here
//! the bias is written first and gemm adds the product to it: one pass.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{fast_path, gemm_f32, three_f32};

/// `w (n, k) x (k, H*W) + bias` per image: x (B, k, H, W) -> (B, n, H, W).
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fast_path(&[x, weight, bias]) && x.rank() == 4 {
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Conv1x1)
    } else {
        plain(x, weight, Some(bias))
    }
}

/// The reference form from candle's differentiable ops: the weight broadcast over the
/// images (a zero batch stride, no copy), then the bias if there is one.
pub fn plain(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, k, h, w) = x.dims4()?;
    let n = weight.dim(0)?;
    let y = weight
        .broadcast_left(b)?
        .matmul(&x.reshape((b, k, h * w))?)?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((n, 1))?)?,
        None => y,
    }
    .reshape((b, n, h, w))
}

struct Conv1x1;

impl CustomOp3 for Conv1x1 {
    fn name(&self) -> &'static str {
        "conv1x1"
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
        let (b, k, h, w) = l1.shape().dims4()?;
        let (n, k2) = l2.shape().dims2()?;
        if k2 != k || bias.len() != n {
            candle_core::bail!(
                "conv1x1: input {:?}, weight {:?}, bias of {}",
                l1.shape(),
                l2.shape(),
                bias.len()
            )
        }
        let plane = h * w;
        let mut out = vec![0f32; b * n * plane];
        let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
        for (dst, x) in out.chunks_mut(n * plane).zip(x.chunks(k * plane)) {
            for (row, &v) in dst.chunks_mut(plane).zip(bias) {
                row.fill(v);
            }
            gemm_f32(
                dst,
                true,
                weight,
                x,
                (n, k, plane),
                (1, plane),
                1.0,
                threads,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, h, w))))
    }

    /// Two matmuls and a sum over each plane, in candle's ops (its fast paths: the
    /// plain form's backward reduces the bias over leading dims, element by element).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, k, h, w) = x.dims4()?;
        let n = weight.dim(0)?;
        let g = grad.reshape((b, n, h * w))?;
        let gx = weight
            .t()?
            .broadcast_left(b)?
            .matmul(&g)?
            .reshape((b, k, h, w))?;
        // one product over all images' positions (K = B*H*W): per image and then
        // summed over dim 0, the sum would take candle's element-by-element path
        let across = |t: &Tensor, c: usize| {
            t.reshape((b, c, h * w))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((c, b * h * w))
        };
        let gw = across(grad, n)?.matmul(&across(x, k)?.t()?)?;
        let gb = g.sum(2)?.sum(0)?.reshape(bias.shape())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, random};
    use candle_core::Var;

    #[test]
    fn equals_the_plain_form_forward_and_backward() -> Result<()> {
        for (b, k, n, h, w) in [(2, 37, 45, 9, 17), (1, 64, 8, 1, 1)] {
            let x = Var::from_tensor(&random(&[b, k, h, w], 1)?)?;
            let weight = Var::from_tensor(&random(&[n, k], 2)?)?;
            let bias = Var::from_tensor(&random(&[n], 3)?)?;
            let ours = conv1x1(&x, &weight, &bias)?;
            let want = plain(&x, &weight, Some(&bias))?;
            let d = max_diff(&ours, &want)?;
            assert!(d < 1e-5, "({b}, {k}, {h}, {w}) -> {n}: {d}");
            let probe = random(&[b, n, h, w], 4)?;
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_want = (want * &probe)?.sum_all()?.backward()?;
            for v in [&x, &weight, &bias] {
                let d = max_diff(g_ours.get(v).unwrap(), g_want.get(v).unwrap())?;
                assert!(d < 1e-4, "gradient {:?}: {d}", v.dims());
            }
        }
        Ok(())
    }
}
