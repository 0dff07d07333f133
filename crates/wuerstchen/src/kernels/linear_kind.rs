//! Which linear layers a model is built with: candle's (training, and every device or
//! dtype without a faster form), f32 weights packed for our AVX-512 / AVX2 kernel
//! ([`packed_linear`](super::packed_linear), inference in f32 on the CPU), or bf16
//! weights on AMX tiles ([`bf16_matmul`](super::bf16_matmul), `--dtype bf16` on the
//! CPU), or f16 weights widened for our f32 kernel (`--dtype f16` on the CPU). The
//! packed forms drop the weight's tensor, so they have no gradient: only
//! models loaded for inference get them.

use std::cell::Cell;

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// `candle_nn::Linear`: differentiable, any device and dtype.
    Candle,
    /// f32 weights packed once into panels for our kernel.
    PackedF32,
    /// bf16 weights on f32 activations.
    Bf16,
    /// f16 weights on f32 activations, f32 arithmetic.
    F16,
}

thread_local! {
    static KIND: Cell<LinearKind> = const { Cell::new(LinearKind::Candle) };
    static INFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` (a model constructor) so that the linear layers it creates are of
/// `kind`. A thread-local scope rather than a global switch: a model built afterwards,
/// or on another thread (the server, a training run), is unaffected.
pub fn with_linears<T>(kind: LinearKind, build: impl FnOnce() -> T) -> T {
    let before = KIND.with(|k| k.replace(kind));
    let out = build();
    KIND.with(|k| k.set(before));
    out
}

/// The kind of linear layer to build now.
pub fn building() -> LinearKind {
    KIND.with(Cell::get)
}

/// Whether the model being built is for inference only ([`build_model`]): then a
/// layer may fold constant work into its weights (a product of two weights computed
/// once), which a model being trained must not: its weights change every step, and
/// the gradients must reach each of them.
pub fn inference() -> bool {
    INFERENCE.with(Cell::get)
}

/// Builds a model (`build`) for inference over the weights of `backend`, asked for in
/// `dtype`: bf16 or f16 on the CPU reads them as f32 and gives the linear layers bf16
/// or f16 weights; f32 on a CPU with AVX-512 or AVX2 packs them; anything else is
/// built as it is. Loading
/// (`WeightFiles::build`) and the benchmark's random weights both build through here.
pub fn build_model<'a, T>(
    backend: Box<dyn SimpleBackend + 'a>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'a>) -> T,
) -> T {
    let kind = if half_on_cpu(dtype, device) {
        match dtype {
            DType::BF16 => LinearKind::Bf16,
            _ => LinearKind::F16,
        }
    } else if device.is_cpu() && dtype == DType::F32 && super::packed_linear::available() {
        LinearKind::PackedF32
    } else {
        LinearKind::Candle
    };
    let vb = VarBuilder::from_backend(backend, activation_dtype(dtype, device), device.clone());
    let before = INFERENCE.with(|f| f.replace(true));
    let out = with_linears(kind, || build(vb));
    INFERENCE.with(|f| f.set(before));
    out
}

/// Whether models asked for in `dtype` on `device` are built as bf16 or f16 linear
/// layers on f32 activations: 16-bit dtypes on the CPU, where candle has no bf16
/// matmul, its f16 ops ran 2.5-3x slower than f32, and f32 is what our other kernels
/// are fast in. Activations then run in [`activation_dtype`].
pub fn half_on_cpu(dtype: DType, device: &Device) -> bool {
    device.is_cpu() && matches!(dtype, DType::BF16 | DType::F16)
}

/// The dtype a model's inputs and activations take when its weights are asked for
/// in `dtype`: `dtype` itself, except f32 for bf16 and f16 on the CPU.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if half_on_cpu(dtype, device) {
        DType::F32
    } else {
        dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_holds_only_inside_the_scope() {
        assert_eq!(building(), LinearKind::Candle);
        let inner = with_linears(LinearKind::Bf16, || {
            let nested = with_linears(LinearKind::PackedF32, building);
            (building(), nested)
        });
        assert_eq!(inner, (LinearKind::Bf16, LinearKind::PackedF32));
        assert_eq!(building(), LinearKind::Candle);
    }
}
