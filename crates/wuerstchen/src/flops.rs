//! Counts the floating-point work of the models as they run: every linear layer,
//! convolution and attention product adds 2 x its multiply-adds to a per-thread
//! counter (the convention of PyTorch's `FlopCounterMode`, which
//! `scripts/bench_reference.py` uses, so GFLOP/s compare across the two). Norms,
//! activations and element-wise ops are not counted: they are a rounding error in
//! FLOPs, though not in time. The layers here wrap candle's and add only the count.

use std::cell::Cell;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};

use crate::kernels::bf16_matmul::Bf16Linear;
use crate::kernels::conv_transpose::PackedConvTranspose;
use crate::kernels::linear_kind::{self, LinearKind};
use crate::kernels::packed_linear::PackedLinear;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Adds `n` FLOPs to this thread's count.
pub fn add(n: usize) {
    COUNT.with(|c| c.set(c.get() + n as u64));
}

/// Runs `f` and returns its result with the FLOPs it did on this thread (the models
/// run their layers from the calling thread; candle's worker threads only split
/// each op).
pub fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = COUNT.with(Cell::get);
    let out = f();
    (out, COUNT.with(Cell::get) - before)
}

/// FLOPs of `a.matmul(b)` for (.., m, k) x (.., k, n).
pub fn add_matmul(a: &Tensor, b: &Tensor) -> Result<()> {
    add(2 * a.elem_count() * b.dim(candle_core::D::Minus1)?);
    Ok(())
}

/// FLOPs of attention with q (.., n, d) and k (.., l, d): the scores q k^T and
/// their product with v, 2·n·l·d each.
pub fn add_attention(q: &Tensor, k: &Tensor) -> Result<()> {
    add(2 * 2 * q.elem_count() * k.dim(candle_core::D::Minus2)?);
    Ok(())
}

/// A linear layer of the kind the model is being built with ([`linear_kind`]):
/// candle's, packed (f32 or f16 weights), or bf16.
#[derive(Debug, Clone)]
pub enum Linear {
    F32(candle_nn::Linear),
    Packed(PackedLinear),
    Bf16(Bf16Linear),
}

pub fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    match linear_kind::building() {
        // with candle's initialisation where a model is trained from scratch
        LinearKind::Candle => Ok(Linear::F32(candle_nn::linear(c_in, c_out, vb)?)),
        _ => linear_from(vb.get((c_out, c_in), "weight")?, vb.get(c_out, "bias")?),
    }
}

/// The layer of the kind being built from its weight (out, in) and bias (out).
pub fn linear_from(weight: Tensor, bias: Tensor) -> Result<Linear> {
    Ok(match linear_kind::building() {
        LinearKind::Candle => Linear::F32(candle_nn::Linear::new(weight, Some(bias))),
        LinearKind::PackedF32 => Linear::Packed(PackedLinear::new(&weight, Some(&bias))?),
        LinearKind::Bf16 => Linear::Bf16(Bf16Linear::new(&weight, Some(bias))?),
        LinearKind::F16 if crate::kernels::packed_linear::available() => {
            Linear::Packed(PackedLinear::with_f16_weights(&weight, Some(&bias))?)
        }
        // no kernel for the widened f16 weights: candle's layer on them rounded
        LinearKind::F16 => {
            let rounded = weight.to_dtype(DType::F16)?.to_dtype(weight.dtype())?;
            Linear::F32(candle_nn::Linear::new(rounded, Some(bias)))
        }
    })
}

impl Linear {
    fn out_features(&self) -> Result<usize> {
        match self {
            Self::F32(layer) => layer.weight().dim(0),
            Self::Packed(layer) => Ok(layer.out_features()),
            Self::Bf16(layer) => Ok(layer.out_features()),
        }
    }

    /// The layer as a 1x1 convolution on channels-first x (B, in, H, W) -> (B, out, H,
    /// W): `w (out, in) x (in, H*W)` per image, so a block that stays in NCHW needs no
    /// transposes (which cost as much as the product in Stage A).
    pub fn forward_channels_first(&self, x: &Tensor) -> Result<Tensor> {
        add(2 * x.elem_count() * self.out_features()?);
        match self {
            Self::F32(layer) => match layer.bias() {
                Some(bias) => crate::kernels::pointwise::conv1x1(x, layer.weight(), bias),
                None => crate::kernels::pointwise::plain(x, layer.weight(), None),
            },
            Self::Packed(layer) => layer.forward_channels_first(x),
            Self::Bf16(layer) => layer.forward_channels_first(x),
        }
    }

    /// `gelu(forward_channels_first(x))`: the channel MLPs' first layer and its
    /// activation, fused where the layer is packed or bf16.
    pub fn forward_channels_first_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.with_gelu(x, true)
    }

    /// `gelu(forward(x))` in the token layout (CLIP's MLPs), fused likewise.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.with_gelu(x, false)
    }

    fn with_gelu(&self, x: &Tensor, channels_first: bool) -> Result<Tensor> {
        use crate::kernels::gelu::gelu;
        // the fused forms count their products here; candle's layer in its forward
        let products = 2 * x.elem_count() * self.out_features()?;
        match (self, channels_first) {
            (Self::F32(_), true) => gelu(&self.forward_channels_first(x)?),
            (Self::F32(_), false) => gelu(&self.forward(x)?),
            (Self::Packed(layer), true) => {
                add_then(products, || layer.forward_channels_first_gelu(x))
            }
            (Self::Packed(layer), false) => add_then(products, || layer.forward_gelu(x)),
            (Self::Bf16(layer), true) => {
                add_then(products, || layer.forward_channels_first_gelu(x))
            }
            (Self::Bf16(layer), false) => add_then(products, || layer.forward_gelu(x)),
        }
    }
}

/// Counts `flops`, then runs `f`.
fn add_then(flops: usize, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    add(flops);
    f()
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c_out = self.out_features()?;
        add(2 * x.elem_count() * c_out);
        let layer = match self {
            Self::F32(layer) => layer,
            Self::Packed(layer) => return layer.forward(x),
            Self::Bf16(layer) => return layer.forward(x),
        };
        if let Some(bias) = layer.bias().filter(|b| b.track_op()) {
            return rows_with_bias_product(x, layer.weight(), bias);
        }
        // candle multiplies a (B, N, C) input batch by batch against the broadcast
        // weight: one small gemm per batch element (N = 77 tokens for CLIP). As one
        // (B*N, C) matrix it is a single gemm with B times the rows.
        match *x.dims() {
            [b, n, c] if b > 1 => layer
                .forward(&x.reshape((b * n, c))?)?
                .reshape((b, n, c_out)),
            _ => layer.forward(x),
        }
    }
}

/// The linear layer while it trains: the bias added as the product of a column of
/// ones with it, so that its gradient is the product of that column with the
/// output's gradient (one gemm). Added by broadcasting, its gradient would be a sum
/// over the leading dims, which candle reduces one element at a time (a tenth of a
/// training step).
fn rows_with_bias_product(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let dims = x.dims();
    let rows = x.elem_count() / k.max(1);
    let x = x.reshape((rows, k))?;
    let ones = Tensor::ones((rows, 1), x.dtype(), x.device())?;
    let y = (x.matmul(&weight.t()?)? + ones.matmul(&bias.reshape((1, n))?)?)?;
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    y.reshape(out)
}

#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    if bias {
        candle_nn::conv2d(c_in, c_out, kernel, cfg, vb).map(Conv2d)
    } else {
        candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb).map(Conv2d)
    }
}

/// A conv of the given weight and bias (weights computed at load time).
pub fn conv2d_from(weight: Tensor, bias: Tensor, cfg: Conv2dConfig) -> Conv2d {
    Conv2d(candle_nn::Conv2d::new(weight, Some(bias), cfg))
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.0.forward(x)?;
        // each output value: (c_in / groups) * kh * kw multiply-adds
        let (_, per_group, kh, kw) = self.0.weight().dims4()?;
        add(2 * out.elem_count() * per_group * kh * kw);
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    conv: candle_nn::ConvTranspose2d,
    /// Its taps packed for our kernel, in a model built with packed f32 linear layers
    /// (inference on the CPU).
    packed: Option<PackedConvTranspose>,
}

pub fn conv_transpose2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: ConvTranspose2dConfig,
    vb: VarBuilder,
) -> Result<ConvTranspose2d> {
    let conv = candle_nn::conv_transpose2d(c_in, c_out, kernel, cfg, vb)?;
    // every kind but candle's is a model built for inference on the CPU in f32
    // activations (bf16 and f16 ones give their transposed convs f32 weights), so
    // these take our f32 kernel (`new` declines where it cannot run)
    let packed = if linear_kind::building() != LinearKind::Candle
        && cfg.dilation == 1
        && cfg.output_padding == 0
    {
        PackedConvTranspose::new(conv.weight(), conv.bias(), cfg.stride, cfg.padding)?
    } else {
        None
    };
    Ok(ConvTranspose2d { conv, packed })
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(packed) = &self.packed {
            if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
                return packed.forward(x);
            }
        }
        // each input value is spread over (c_out / groups) * kh * kw outputs
        let cfg = self.conv.config();
        if cfg.dilation != 1 || cfg.output_padding != 0 || !x.device().is_cpu() {
            let (_, per_group, kh, kw) = self.conv.weight().dims4()?;
            add(2 * x.elem_count() * per_group * kh * kw);
            return self.conv.forward(x);
        }
        // the gemm form counts its own products
        crate::kernels::conv_transpose::conv_transpose2d(
            x,
            self.conv.weight(),
            self.conv.bias(),
            cfg.stride,
            cfg.padding,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn a_training_linear_layer_equals_candles_forward_and_backward() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let ours = linear(6, 4, vb.pp("l"))?;
        let Linear::F32(candles) = &ours else {
            panic!("a VarMap builds candle's layer")
        };
        let bias = vm.data().lock().unwrap()["l.bias"].clone();
        bias.set(&Tensor::arange(0f32, 4., &Device::Cpu)?)?;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5, 6), &Device::Cpu)?)?;
        let probe = Tensor::randn(0f32, 1., (3, 5, 4), &Device::Cpu)?;
        let y = ours.forward(&x)?;
        let want = candles.forward(&x)?;
        assert!(y.sub(&want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let g = (y * &probe)?.sum_all()?.backward()?;
        let g_want = (want * &probe)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), candles.weight(), bias.as_tensor()] {
            let d = g.get(t).unwrap().sub(g_want.get(t).unwrap())?;
            assert!(
                d.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4,
                "{:?}",
                t.dims()
            );
        }
        Ok(())
    }

    #[test]
    fn layers_count_their_multiply_adds() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let x = Tensor::zeros((2, 5, 8), DType::F32, &Device::Cpu)?;
        let l = linear(8, 3, vb.pp("l"))?;
        assert_eq!(counted(|| l.forward(&x)).1, 2 * 2 * 5 * 8 * 3);
        let img = Tensor::zeros((1, 4, 6, 6), DType::F32, &Device::Cpu)?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let c = conv2d(4, 2, 3, cfg, true, vb.pp("c"))?;
        assert_eq!(counted(|| c.forward(&img)).1, 2 * (2 * 6 * 6) * (4 * 9));
        let t = conv_transpose2d(
            4,
            2,
            2,
            ConvTranspose2dConfig {
                stride: 2,
                ..Default::default()
            },
            vb.pp("t"),
        )?;
        let (out, n) = counted(|| t.forward(&img));
        assert_eq!(out?.dims(), &[1, 2, 12, 12]);
        // the same work as the conv it inverts: every output gets 4 * 1 taps
        assert_eq!(n, 2 * (2 * 12 * 12) * 4);
        let (a, b) = (
            Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu)?,
            Tensor::zeros((3, 5, 7), DType::F32, &Device::Cpu)?,
        );
        assert_eq!(counted(|| add_matmul(&a, &b)).1, 2 * 3 * 4 * 5 * 7);
        // 2 heads, 4 queries over 6 keys of width 5
        let q = Tensor::zeros((1, 2, 4, 5), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((1, 2, 6, 5), DType::F32, &Device::Cpu)?;
        assert_eq!(counted(|| add_attention(&q, &k)).1, 2 * 2 * (2 * 4 * 6 * 5));
        Ok(())
    }
}
