//! CPU fast paths for the ops where candle 0.11 is slow (measured in
//! docs/performance.md), as candle custom ops.
//!
//! Each kernel has the same contract: a function that takes and returns tensors, runs
//! the fast path for contiguous f32 on the CPU and otherwise falls back to the plain
//! candle ops it replaces (other dtypes, CUDA), keeps the backward pass where the
//! plain op had one, and has a parity test against that plain op. The hot loops are
//! compiled several times for the instruction sets a CPU may have and picked at run
//! time (`simd_dispatch`), so the shipped binary needs no `target-cpu=native`.

pub mod attention;
pub mod bf16_matmul;
pub mod conv_transpose;
pub mod depthwise;
pub mod gelu;
pub mod grn;
pub mod layer_norm;
pub mod linear_kind;
pub mod packed_linear;
pub mod pointwise;
#[cfg(target_arch = "x86_64")]
mod tile;
pub mod transpose;

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, Var};

/// The instruction sets the register-tile kernels (the packed linear layers, the
/// tiled attention) are compiled for (`tile`), best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

#[cfg(test)]
thread_local! {
    static TEST_ISA: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

impl Isa {
    /// The set the tile kernels run on here: the best this CPU has, or None where it
    /// has neither (their callers then take candle's ops).
    pub fn current() -> Option<Isa> {
        #[cfg(test)]
        if let Some(isa) = TEST_ISA.with(std::cell::Cell::get) {
            return Some(isa);
        }
        Self::detected()
    }

    fn detected() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            tile::detect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Every set this CPU runs, so that a test checks each.
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Isa> {
        match Self::detected() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    /// Runs `f` with the kernels called on this thread taking this set.
    #[cfg(test)]
    pub(crate) fn with<T>(self, f: impl FnOnce() -> T) -> T {
        let before = TEST_ISA.with(|i| i.replace(Some(self)));
        let out = f();
        TEST_ISA.with(|i| i.set(before));
        out
    }
}

/// Compiles `$body` (a closure-like block over its arguments) once per instruction
/// set and runs the best one the CPU supports: AVX-512, AVX2 + FMA, or the baseline.
/// The body is generic Rust that the compiler vectorises for each target.
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Whether a kernel's fast path applies: every input f32 and on the CPU.
fn fast_path(inputs: &[&Tensor]) -> bool {
    inputs
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The f32 elements of a contiguous CPU tensor, or None (the caller falls back).
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Some(&data[start..end]),
        _ => None,
    }
}

/// Sum of `f` over `xs`, accumulated in f64 in 16 running partial sums: the compiler
/// keeps them in vector registers (a plain `iter().sum()` is a serial chain it may not
/// reorder), and f64 keeps the mean of values far from zero exact to f32 precision.
#[inline(always)]
fn sum_by(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f64; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x) as f64).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x) as f64;
        }
    }
    (acc.iter().sum::<f64>() + tail) as f32
}

/// Dot product of two slices of equal length, in 16 running f32 partial sums (as
/// [`sum_by`], so that the compiler vectorises it).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s = x.mul_add(y, *s);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` on the f32 elements of a CPU tensor (copied first if it is strided); an
/// error for any other device or dtype, which the callers route elsewhere.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
            Ok(f(&data[start..end]))
        }
        _ => Err(unsupported("with_f32")),
    }
}

/// Largest element, vectorised as [`sum_by`] is (NaN-free input assumed).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// An output buffer shared by a kernel's tasks, each writing its own disjoint part
/// (for outputs whose parts are not contiguous, such as a pixel range of every channel,
/// so `par_chunks_mut` cannot split them).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes while the buffer is alive (see each use).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// f32 values whose first one starts a cache line: the kernel's vector loads are then
/// aligned (an unaligned one reads two lines), where a `Vec<f32>` from malloc is only
/// 16-byte aligned.
#[derive(Debug)]
pub(crate) struct Aligned {
    data: Vec<f32>,
    offset: usize,
    len: usize,
}

impl Aligned {
    pub(crate) fn zeros(len: usize) -> Self {
        let data = vec![0f32; len + 15];
        let offset = data.as_ptr().align_offset(64);
        Self { data, offset, len }
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.data[self.offset..][..self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data[self.offset..][..self.len]
    }
}

thread_local! {
    /// Each worker thread's buffer for what its task repacks (a kernel takes one at a
    /// time: the fast paths do not nest).
    static SCRATCH: RefCell<Aligned> = RefCell::new(Aligned::zeros(0));
}

/// Runs `f` on this thread's scratch buffer, at least `len` long.
pub(crate) fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len < len {
            *s = Aligned::zeros(len);
        }
        f(&mut s.as_mut_slice()[..len])
    })
}

/// Elements per task when a kernel splits work over rayon's threads: large enough
/// that scheduling costs nothing, small enough that both cores get work on the
/// smallest activations (a few hundred thousand elements).
const CHUNK: usize = 1 << 14;

/// Elements per task for a kernel that needs whole rows of `width`: about [`CHUNK`].
fn whole_rows(width: usize) -> usize {
    (CHUNK / width).max(1) * width
}

/// `dst (m, n) = scale * lhs (m, k) x rhs (k, n)` on this thread (the kernels already
/// split their work over rayon's), all row-major except that `rhs` is read with the
/// given (column, row) strides, so k^T needs no copy.
fn matmul_into(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    dims: (usize, usize, usize),
    rhs_strides: (usize, usize),
    scale: f32,
) {
    gemm_f32(
        dst,
        false,
        lhs,
        rhs,
        dims,
        rhs_strides,
        scale,
        gemm::Parallelism::None,
    );
}

/// `dst (m, n) = [dst +] scale * lhs (m, k) x rhs (k, n)`: [`matmul_into`], adding to
/// what `dst` holds where `accumulate`, split over `parallelism`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    rhs: &[f32],
    dims: (usize, usize, usize),
    rhs_strides: (usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    let lhs_strides = (1, dims.1);
    gemm_strided(
        dst,
        accumulate,
        (lhs, lhs_strides),
        (rhs, rhs_strides),
        dims,
        scale,
        parallelism,
    )
}

/// [`gemm_f32`] with both operands read through (column, row) strides, so that a
/// transposed left operand (a backward pass's P^T) needs no copy either.
fn gemm_strided(
    dst: &mut [f32],
    accumulate: bool,
    (lhs, (lhs_cs, lhs_rs)): (&[f32], (usize, usize)),
    (rhs, (rhs_cs, rhs_rs)): (&[f32], (usize, usize)),
    (m, k, n): (usize, usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (k - 1) * lhs_cs + (m - 1) * lhs_rs);
    assert!(k == 0 || n == 0 || rhs.len() > (n - 1) * rhs_cs + (k - 1) * rhs_rs);
    // SAFETY: the asserts above keep every element the strides address in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Gradients of `f` at `inputs` against the incoming gradient `grad`, by running the
/// plain (differentiable) form of a kernel on fresh variables: the backward pass of the
/// kernels whose candle counterpart has one.
fn plain_gradients<const N: usize>(
    inputs: [&Tensor; N],
    grad: &Tensor,
    f: impl FnOnce([&Tensor; N]) -> Result<Tensor>,
) -> Result<[Option<Tensor>; N]> {
    let vars = inputs.map(|t| Var::from_tensor(&t.detach()));
    let vars = vars.into_iter().collect::<Result<Vec<Var>>>()?;
    let args: [&Tensor; N] = std::array::from_fn(|i| vars[i].as_tensor());
    let grads = (f(args)? * grad.detach())?.sum_all()?.backward()?;
    Ok(std::array::from_fn(|i| grads.get(&vars[i]).cloned()))
}

/// The three inputs of a three-tensor kernel as contiguous f32 slices, or the error
/// that says the caller should have fallen back.
fn three_f32<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<[&'a [f32]; 3]> {
    match (
        contiguous_f32(s1, l1),
        contiguous_f32(s2, l2),
        contiguous_f32(s3, l3),
    ) {
        (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
        _ => Err(unsupported(op)),
    }
}

/// The output dims of a linear layer from `k` to `n` features on input `dims`: the
/// features are dimension 1 of a channels-first (B, C, H, W) input, else the last; an
/// error names the op when the input's rank or feature count does not fit.
fn linear_output_dims(
    op: &str,
    dims: &[usize],
    channels_first: bool,
    k: usize,
    n: usize,
) -> Result<Vec<usize>> {
    let feature_dim = match (channels_first, dims.len()) {
        (true, 4) => Some(1),
        (false, rank) if rank > 0 => Some(rank - 1),
        _ => None,
    };
    match feature_dim {
        Some(d) if dims[d] == k => {
            let mut out = dims.to_vec();
            out[d] = n;
            Ok(out)
        }
        _ => candle_core::bail!(
            "{op}: input {dims:?} does not have the layer's {k} features in dimension {}",
            if channels_first { "1 of 4" } else { "-1" }
        ),
    }
}

fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: the fast kernel takes contiguous f32 only (the caller should have fallen back)"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Result, Tensor};

    /// Varied values in [-0.5, 0.5) from a fixed LCG (no RNG dependency needed).
    pub fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        const A: u64 = 6364136223846793005;
        const C: u64 = 1442695040888963407;
        let mut state = seed.wrapping_mul(A).wrapping_add(C);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(A).wrapping_add(C);
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }
}
