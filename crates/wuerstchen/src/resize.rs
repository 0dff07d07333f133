//! Bicubic resizing with antialiasing and `align_corners=True`, the exact arithmetic of
//! `torch.nn.functional.interpolate(x, size, mode="bicubic", antialias=True,
//! align_corners=True)`, which Stage B applies to the effnet latents at every level.
//!
//! PyTorch's antialiased path is a separable filter: for each output index it takes a
//! window of input samples, weighs them with Keys' cubic kernel (a = -0.5, as PIL)
//! stretched by the scale when downsampling, and normalises the weights to sum to one.

use candle_core::{DType, Result, Tensor};

/// Keys' cubic convolution kernel with a = -0.5.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For one axis: per output index, the first input index and the normalised weights.
fn axis_weights(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    // align_corners: the corner samples map onto each other.
    let scale = if out_size > 1 {
        (in_size as f64 - 1.0) / (out_size as f64 - 1.0)
    } else {
        0.0
    };
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let inv_scale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // truncation toward zero, as PyTorch's int64 cast
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|j| cubic((j as f64 - center + 0.5) * inv_scale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Dense (out, in) interpolation matrix for one axis.
fn axis_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    for (i, (start, w)) in axis_weights(in_size, out_size).into_iter().enumerate() {
        m[i * in_size + start..i * in_size + start + w.len()].copy_from_slice(&w);
    }
    m
}

/// Resizes (B, C, H, W) to (B, C, out_h, out_w). Computed in f32, returned in the
/// input dtype (diffusers casts to float and back around the interpolation).
pub fn resize_bicubic_aa(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let x32 = x.to_dtype(DType::F32)?;
    // The separable filter as two small matmuls: width first, then height, as PyTorch.
    let mw = Tensor::from_vec(axis_matrix(w, out_w), (out_w, w), dev)?;
    let mh = Tensor::from_vec(axis_matrix(h, out_h), (out_h, h), dev)?;
    // (B*C*H, W) x (W, out_w) -> (B, C, H, out_w)
    let y = x32
        .reshape((b * c * h, w))?
        .matmul(&mw.t()?)?
        .reshape((b * c, h, out_w))?;
    // (out_h, H) x (B*C, H, out_w) -> (B*C, out_h, out_w)
    let y = mh.broadcast_left(b * c)?.matmul(&y)?;
    y.reshape((b, c, out_h, out_w))?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_corners_align() {
        for (i, o) in [(24, 64), (24, 16), (24, 32), (7, 3), (5, 5), (3, 11)] {
            let ws = axis_weights(i, o);
            for (_, w) in &ws {
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o}: weights sum to {s}");
            }
        }
        // a constant image stays constant at any size
        let x = Tensor::full(3.5f32, (1, 2, 5, 6), &candle_core::Device::Cpu).unwrap();
        for (oh, ow) in [(2, 3), (11, 13), (5, 17)] {
            let y = resize_bicubic_aa(&x, oh, ow).unwrap();
            let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|a| (a - 3.5).abs() < 1e-5), "{oh}x{ow}: {v:?}");
        }
    }
}
