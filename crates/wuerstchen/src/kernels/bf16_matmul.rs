//! Linear layers with bf16 weights on f32 activations: `--dtype bf16` on the CPU.
//!
//! The matmul-heavy layers are where bf16 pays on a CPU: Intel's AMX tiles multiply
//! bf16 pairs and sum them in f32 (`tdpbf16ps`, 16 x 16 x 32 products per instruction),
//! several times the f32 FMA rate. Everything else (norms, softmax, GELU, the
//! depthwise convolutions) stays in f32 on the kernels beside this one, so bf16 rounds
//! only the two operands of each product: the idea of PyTorch's
//! `set_float32_matmul_precision("medium")`, applied per linear layer.
//!
//! Models get these layers when they are built as [`LinearKind::Bf16`](super::linear_kind)
//! (`WeightFiles::build` does so for bf16 on the CPU). The weight is converted once,
//! at build time, into the tile layout (half the bytes of f32). A CPU without AMX gets
//! the same arithmetic, bf16-rounded operands summed in f32, from our packed kernel
//! ([`PackedLinear::rounded_to_bf16`]: AVX512-BF16's `vdpbf16ps` on pairs of bf16
//! where the CPU has it, else the f32 tile) or, without AVX2 either, from candle's
//! gemm.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::packed_linear::{self, PackedLinear};
use super::{contiguous_f32, simd_dispatch, unsupported, SendPtr};

/// Whether this CPU and kernel let the process use AMX bf16 tiles (checked once).
pub fn amx_available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(amx::request)
}

/// A linear layer `x w^T + b` whose weight is stored in bf16.
#[derive(Debug, Clone)]
pub struct Bf16Linear(Arc<Weight>);

#[derive(Debug)]
enum Weight {
    /// For AMX tiles; the bias as the values each task adds.
    Tiles {
        packed: Packed,
        bias: Option<Vec<f32>>,
    },
    /// No AMX: our packed kernel, rounding both operands to bf16 as it packs them.
    Packed(PackedLinear),
    /// Neither AMX nor our f32 kernel: candle's layer on the bf16-rounded weight, fed
    /// bf16-rounded inputs.
    Rounded(candle_nn::Linear),
}

/// Which form of the layer [`Bf16Linear::build`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Tiles,
    Packed,
    Rounded,
}

impl Bf16Linear {
    /// From a PyTorch-layout weight (out, in) of any float dtype and a bias (out).
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let cpu = weight.device().is_cpu();
        let form = if cpu && amx_available() {
            Form::Tiles
        } else if cpu && packed_linear::available() {
            Form::Packed
        } else {
            Form::Rounded
        };
        Self::build(weight, bias, form)
    }

    fn build(weight: &Tensor, bias: Option<Tensor>, form: Form) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let w = match form {
            Form::Tiles => {
                let w = weight
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Weight::Tiles {
                    packed: Packed::new(&w, n, k),
                    bias: bias.map(|b| b.to_vec1::<f32>()).transpose()?,
                }
            }
            Form::Packed => Weight::Packed(PackedLinear::rounded_to_bf16(weight, bias.as_ref())?),
            Form::Rounded => Weight::Rounded(candle_nn::Linear::new(round_to_bf16(weight)?, bias)),
        };
        Ok(Self(Arc::new(w)))
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match &*self.0 {
            Weight::Tiles { packed, .. } => packed.n,
            Weight::Packed(layer) => layer.out_features(),
            Weight::Rounded(layer) => layer.weight().dims()[0],
        }
    }

    /// The product in either layout: on AMX tiles, our f32 kernel, or candle's ops;
    /// then GELU if asked, fused where the kernel is ours.
    fn product(&self, x: &Tensor, channels_first: bool, gelu: bool) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let out = match &*self.0 {
            Weight::Tiles { packed, bias } => {
                return x.contiguous()?.apply_op1_no_bwd(&TileMatmul {
                    packed,
                    bias: bias.as_deref(),
                    channels_first,
                    gelu,
                })
            }
            Weight::Packed(layer) => {
                return match (channels_first, gelu) {
                    (true, true) => layer.forward_channels_first_gelu(&x),
                    (true, false) => layer.forward_channels_first(&x),
                    (false, true) => layer.forward_gelu(&x),
                    (false, false) => layer.forward(&x),
                }
            }
            Weight::Rounded(layer) if channels_first => {
                super::pointwise::plain(&round_to_bf16(&x)?, layer.weight(), layer.bias())?
            }
            Weight::Rounded(layer) => layer.forward(&round_to_bf16(&x)?)?,
        };
        if gelu {
            super::gelu::gelu(&out)
        } else {
            Ok(out)
        }
    }

    /// The layer as a 1x1 convolution: x (B, in, H, W) -> (B, out, H, W), read and
    /// written channels-first, so a block that stays in NCHW needs no transposes.
    pub fn forward_channels_first(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, true, false)
    }

    /// `gelu(forward_channels_first(x))`: on AMX tiles and our f32 kernel applied to
    /// each block of outputs as it is written (still in cache), a pass of its own on
    /// candle's ops.
    pub fn forward_channels_first_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, true, true)
    }

    /// `gelu(forward(x))`, fused as [`Self::forward_channels_first_gelu`] is.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, false, true)
    }
}

impl Module for Bf16Linear {
    /// x (.., in) -> (.., out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, false, false)
    }
}

/// `t` rounded to the nearest bf16 (ties to even), as f32.
fn round_to_bf16(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// `x` rounded to the nearest bf16, ties to even, as f32.
#[inline(always)]
pub(super) fn round_to_bf16_f32(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// f32 to bf16 bits, round to nearest, ties to even (as candle's and PyTorch's casts).
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x40) as u16; // quiet, whatever the payload rounds to
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Rows per task of the token-layout product. Each task converts its rows to bf16
/// once and runs them against the whole weight, panel by panel.
const TASK: usize = 64;

/// Elements of one tile: 16 rows of 64 bytes.
const TILE: usize = 512;

/// The weight, as the tile products read it, in whole tiles of 1 KiB each stored
/// contiguously (strided tile loads over rows kilobytes apart ran at a fraction of the
/// speed: every row a different page). A tile product takes its first operand as 16
/// rows of 32 bf16 ([`rows_to_tiles`]) and its second as 16 rows of 16 bf16 *pairs*
/// (k, k + 1) ("VNNI" order). Channels-first inputs are the second operand (out = w x),
/// so the weight is the first (`rows`); token-layout inputs are the first, so the
/// weight is the second (`pairs`, built on first use: most layers are only ever used
/// one way). Tile (t, d) covers outputs 16 t.. and inputs 32 d.. and is the
/// (t * depth + d)-th; everything is padded with zeros to whole tiles and 32 outputs.
#[derive(Debug)]
struct Packed {
    rows: Vec<u16>,
    pairs: OnceLock<Vec<u16>>,
    n: usize,
    k: usize,
    /// k rounded up to 32 (one tile's depth).
    kp: usize,
}

impl Packed {
    fn new(w: &[f32], n: usize, k: usize) -> Self {
        let kp = k.div_ceil(32) * 32;
        let mut rows = vec![0u16; n.div_ceil(32) * 32 * kp];
        rows_to_tiles(w, k, &mut rows, kp / 32);
        Self {
            rows,
            pairs: OnceLock::new(),
            n,
            k,
            kp,
        }
    }

    fn pairs(&self) -> &[u16] {
        self.pairs.get_or_init(|| {
            // the same tiles, each transposed into pair order: (row i, input c) ->
            // (pair c / 2, output i, c % 2)
            let mut pairs = vec![0u16; self.rows.len()];
            for (dst, src) in pairs
                .chunks_exact_mut(TILE)
                .zip(self.rows.chunks_exact(TILE))
            {
                for (i, row) in src.chunks_exact(32).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        dst[(c / 2) * 32 + i * 2 + c % 2] = v;
                    }
                }
            }
            pairs
        })
    }

    /// Tiles in one row of tiles (the depth of the product).
    fn depth(&self) -> usize {
        self.kp / 32
    }

    /// Output rows rounded up to a pair of tiles.
    fn np(&self) -> usize {
        self.n.div_ceil(32) * 32
    }
}

struct TileMatmul<'a> {
    packed: &'a Packed,
    bias: Option<&'a [f32]>,
    /// x is (B, k, H, W) and the output (B, n, H, W); else x is (.., k) -> (.., n).
    channels_first: bool,
    /// GELU applied to each task's outputs as they are written.
    gelu: bool,
}

impl CustomOp1 for TileMatmul<'_> {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let p = self.packed;
        let dims =
            super::linear_output_dims(self.name(), layout.dims(), self.channels_first, p.k, p.n)?;
        let mut out = vec![0f32; x.len() / p.k * p.n];
        if out.is_empty() {
            // no pixels or no rows: nothing to multiply (and no zero-sized chunks)
        } else if self.channels_first {
            let plane: usize = dims[2..].iter().product();
            for (x, out) in x.chunks(p.k * plane).zip(out.chunks_mut(p.n * plane)) {
                for p0 in (0..plane).step_by(CHUNK_PIXELS) {
                    let len = CHUNK_PIXELS.min(plane - p0);
                    pixels_chunk(x, plane, p0, len, p, (self.bias, self.gelu), out);
                }
            }
        } else {
            let pairs = p.pairs();
            out.par_chunks_mut(TASK * p.n)
                .zip(x.par_chunks(TASK * p.k))
                .for_each(|(out, x)| {
                    // SAFETY: `Tiles` layers exist only where amx_available() said yes.
                    unsafe { amx::rows(x, p, pairs, self.bias, out) };
                    if self.gelu {
                        super::gelu::gelu_in_place(out);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

simd_dispatch! {
    // bf16 bits to the f32 values they are (exact)
    pub(super) fn widen_bf16(src: &[u16], dst: &mut [f32]) {
        for (d, &h) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((h as u32) << 16);
        }
    }
}

simd_dispatch! {
    // rows of k values as first-operand tiles: row r, input c at tile
    // (r / 16, c / 32), element (r % 16) * 32 + c % 32
    fn rows_to_tiles(src: &[f32], k: usize, dst: &mut [u16], depth: usize) {
        for (r, row) in src.chunks_exact(k).enumerate() {
            let tiles = &mut dst[(r / 16) * depth * TILE..];
            for (d, part) in row.chunks(32).enumerate() {
                let out = &mut tiles[d * TILE + (r % 16) * 32..][..part.len()];
                for (o, &v) in out.iter_mut().zip(part) {
                    *o = bf16_bits(v);
                }
            }
        }
    }
}

simd_dispatch! {
    // one column tile (16 pixels from `first`) of a channels-first image (k, plane)
    // as second-operand tiles: input c, pixel j at tile c / 32, element
    // ((c % 32) / 2) * 32 + j * 2 + c % 2
    fn columns_to_tiles(src: &[f32], plane: usize, first: usize, count: usize, dst: &mut [u16]) {
        for (c, channel) in src.chunks_exact(plane).enumerate() {
            let tile = &mut dst[(c / 32) * TILE + ((c % 32) / 2) * 32 + c % 2..];
            for (j, &v) in channel[first..first + count].iter().enumerate() {
                tile[j * 2] = bf16_bits(v);
            }
        }
    }
}

/// Pixels of an image converted to the tile layout at a time: bounds the converted
/// copy (4096 x k bf16: 12 MB for Stage A's widest layer).
const CHUNK_PIXELS: usize = 4096;

/// Outputs and pixels per task of the channels-first product: each task reads its
/// 128 rows of the weight once and its pixels' columns once per 32 outputs, so neither
/// operand is streamed from memory once per small task (the prior's weights are 19 MB,
/// the activations of Stage A's 65536 pixels 50-200 MB).
const TASK_OUTPUTS: usize = 128;
const TASK_PIXELS: usize = 512;

/// `out[:, p0 .. p0 + len] = w x[:, p0 .. p0 + len] + bias` for one image of a
/// channels-first x (k, plane) and out (n, plane), through GELU if `gelu`.
fn pixels_chunk(
    x: &[f32],
    plane: usize,
    p0: usize,
    len: usize,
    p: &Packed,
    (bias, gelu): (Option<&[f32]>, bool),
    out: &mut [f32],
) {
    // the chunk's columns as second-operand tiles, converted once
    let width = len.div_ceil(32) * 32;
    let mut pairs = vec![0u16; p.kp * width];
    pairs
        .par_chunks_mut(p.depth() * TILE)
        .enumerate()
        .for_each(|(t, tiles)| {
            let first = t * 16;
            if first < len {
                columns_to_tiles(x, plane, p0 + first, 16.min(len - first), tiles);
            }
        });
    let (n_tasks, p_tasks) = (p.np().div_ceil(TASK_OUTPUTS), width.div_ceil(TASK_PIXELS));
    let out = SendPtr(out.as_mut_ptr());
    (0..n_tasks * p_tasks).into_par_iter().for_each(|t| {
        let (j0, q0) = (t / p_tasks * TASK_OUTPUTS, t % p_tasks * TASK_PIXELS);
        let outputs = TASK_OUTPUTS.min(p.np() - j0);
        let cols = TASK_PIXELS.min(len - q0.min(len));
        if cols == 0 {
            return;
        }
        // SAFETY: `Tiles` layers exist only where amx_available() said yes; each
        // task writes its own outputs [j0, j0 + outputs) x pixels [p0 + q0, + cols).
        unsafe {
            amx::pixels(
                &pairs,
                (j0, outputs),
                (q0, cols),
                p,
                (bias, gelu),
                out.get(),
                plane,
                p0,
            )
        }
    });
}

/// The tile instructions, through inline assembly (Rust has no stable AMX intrinsics).
/// The eight tile registers are not known to the compiler, so it never touches them
/// between these statements: tmm0-3 hold a 32 x 32 block of the output, tmm4-5 two
/// tiles of the first operand, tmm6-7 two of the second.
mod amx {
    use std::arch::asm;

    use super::{rows_to_tiles, Packed, TILE};

    /// Asks Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`, once per process), after CPUID says the CPU has AMX-BF16.
    pub fn request() -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // leaf 7 reads as zeros on CPUs too old to have it
            let ids = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (ids.edx >> 22 & 1 == 1, ids.edx >> 24 & 1 == 1);
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            extern "C" {
                fn syscall(number: std::ffi::c_long, ...) -> std::ffi::c_long;
            }
            const SYS_ARCH_PRCTL: std::ffi::c_long = 158;
            const ARCH_REQ_XCOMP_PERM: std::ffi::c_long = 0x1023;
            const XFEATURE_XTILEDATA: std::ffi::c_long = 18;
            // SAFETY: a permission request; it changes no memory of ours.
            unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    }

    /// Tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    };

    /// One operand of [`block`]: two tiles `next` elements apart, rows `stride` bytes
    /// apart, the next 32-deep slice `step` elements on.
    #[derive(Clone, Copy)]
    struct Operand {
        ptr: *const u16,
        next: usize,
        stride: usize,
        step: usize,
    }

    /// Tiles of depth per pass over a task's outputs and pixels in [`pixels`].
    const DEPTH_BLOCK: usize = 8;

    impl Operand {
        /// The operand `tiles` slices of 32 further along the depth.
        fn skip(self, tiles: usize) -> Self {
            // wrapping: only `block` reads through it, inside the operand's depth
            Self {
                ptr: self.ptr.wrapping_add(tiles * self.step),
                ..self
            }
        }

        /// Tile rows `t` and `t + 1` of an operand packed as contiguous tiles
        /// (`depth` tiles per tile row, see [`Packed`]).
        fn tiles(packed: &[u16], t: usize, depth: usize) -> Self {
            assert!(packed.len() >= (t + 2) * depth * TILE);
            Self {
                ptr: packed[t * depth * TILE..].as_ptr(),
                next: depth * TILE,
                stride: 64,
                step: TILE,
            }
        }
    }

    /// c (32 x 32 f32, rows `c_stride` floats apart) = [c +] a (32 x 32 depth) b, the
    /// sums in f32 over `depth` slices of 32; c's own values added where `accumulate`.
    ///
    /// # Safety
    /// The tiles configured, and every address the operands and c describe valid.
    #[cfg(target_arch = "x86_64")]
    unsafe fn block(
        a: Operand,
        b: Operand,
        depth: usize,
        c: *mut f32,
        c_stride: usize,
        accumulate: bool,
    ) {
        // the four 16 x 16 output tiles of the block, rows `sc` bytes apart
        let (c0, c1) = (c, c.add(16));
        let (c2, c3) = (c.add(16 * c_stride), c.add(16 * c_stride + 16));
        let sc = c_stride * 4;
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c0} + {sc} * 1]",
                "tileloadd tmm1, [{c1} + {sc} * 1]",
                "tileloadd tmm2, [{c2} + {sc} * 1]",
                "tileloadd tmm3, [{c3} + {sc} * 1]",
                c0 = in(reg) c0,
                c1 = in(reg) c1,
                c2 = in(reg) c2,
                c3 = in(reg) c3,
                sc = in(reg) sc,
                options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for t in 0..depth {
            let (a0, b0) = (a.ptr.add(t * a.step), b.ptr.add(t * b.step));
            asm!(
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(a.next),
                sa = in(reg) a.stride,
                b0 = in(reg) b0,
                b1 = in(reg) b0.add(b.next),
                sb = in(reg) b.stride,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c0} + {sc} * 1], tmm0",
            "tilestored [{c1} + {sc} * 1], tmm1",
            "tilestored [{c2} + {sc} * 1], tmm2",
            "tilestored [{c3} + {sc} * 1], tmm3",
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            sc = in(reg) sc,
            options(nostack)
        );
    }

    /// Runs `f` between loading the tile configuration and releasing the tiles.
    #[cfg(target_arch = "x86_64")]
    unsafe fn with_tiles(f: impl FnOnce()) {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        f();
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `out (rows, n) = x (rows, k) w^T + bias` for up to [`TASK`] rows.
    ///
    /// # Safety
    /// AMX must be available and granted ([`super::amx_available`]).
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn rows(
        x: &[f32],
        w: &Packed,
        pairs: &[u16],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (k, n, depth) = (w.k, w.n, w.depth());
        let rows = x.len() / k;
        let padded = rows.div_ceil(32) * 32;
        let mut a = vec![0u16; padded * w.kp];
        rows_to_tiles(x, k, &mut a, depth);
        // one panel's 32 outputs for every row
        let mut c = vec![0f32; padded * 32];
        with_tiles(|| {
            for p in 0..w.np() / 32 {
                for pair in 0..padded / 32 {
                    let x_tiles = Operand::tiles(&a, 2 * pair, depth);
                    let w_tiles = Operand::tiles(pairs, 2 * p, depth);
                    block(
                        x_tiles,
                        w_tiles,
                        depth,
                        c[pair * 32 * 32..].as_mut_ptr(),
                        32,
                        false,
                    );
                }
                let (j0, cols) = (p * 32, (n - p * 32).min(32));
                for (out, c) in out.chunks_exact_mut(n).zip(c.chunks_exact(32)) {
                    let out = &mut out[j0..j0 + cols];
                    out.copy_from_slice(&c[..cols]);
                    if let Some(bias) = bias {
                        out.iter_mut().zip(&bias[j0..]).for_each(|(o, b)| *o += b);
                    }
                }
            }
        });
    }

    /// One task of [`super::pixels_chunk`]: outputs [j0, j0 + outputs) (a multiple of
    /// 32, padding rows dropped) for the chunk's pixels [q0, q0 + cols), from `pairs`,
    /// the chunk's columns as second-operand tiles; written to the image's output
    /// `out` (n, plane) at pixel p0 + q0.
    ///
    /// # Safety
    /// As [`rows`]; `out` points at n * plane floats, of which this call writes only
    /// its outputs' columns [p0 + q0, p0 + q0 + cols).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pixels(
        pairs: &[u16],
        (j0, outputs): (usize, usize),
        (q0, cols): (usize, usize),
        w: &Packed,
        (bias, gelu): (Option<&[f32]>, bool),
        out: *mut f32,
        plane: usize,
        p0: usize,
    ) {
        let (n, depth) = (w.n, w.depth());
        let padded = cols.div_ceil(32) * 32;
        // the task's outputs x pixels, summed over slices of DEPTH_BLOCK tiles: the
        // slices of both operands (64 + 256 KiB) and this block (256 KiB) stay in L2
        // while every output pair meets every pixel pair
        let mut c = vec![0f32; outputs * padded];
        with_tiles(|| {
            for d0 in (0..depth).step_by(DEPTH_BLOCK) {
                let slice = DEPTH_BLOCK.min(depth - d0);
                for j in (0..outputs).step_by(32) {
                    let w_tiles = Operand::tiles(&w.rows, (j0 + j) / 16, depth).skip(d0);
                    for q in (0..padded).step_by(32) {
                        let x_tiles = Operand::tiles(pairs, (q0 + q) / 16, depth).skip(d0);
                        let at = c[j * padded + q..].as_mut_ptr();
                        block(w_tiles, x_tiles, slice, at, padded, d0 > 0);
                    }
                }
            }
        });
        for (i, c) in c
            .chunks_exact(padded)
            .enumerate()
            .take(n.saturating_sub(j0))
        {
            let row = j0 + i;
            let out = std::slice::from_raw_parts_mut(out.add(row * plane + p0 + q0), cols);
            let add = bias.map_or(0.0, |b| b[row]);
            out.iter_mut().zip(c).for_each(|(o, &v)| *o = v + add);
            if gelu {
                crate::kernels::gelu::gelu_in_place(out);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn rows(_: &[f32], _: &Packed, _: &[u16], _: Option<&[f32]>, _: &mut [f32]) {
        unreachable!("AMX is x86-64 only; amx_available() is false elsewhere")
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pixels(
        _: &[u16],
        _: (usize, usize),
        _: (usize, usize),
        _: &Packed,
        _: (Option<&[f32]>, bool),
        _: *mut f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("AMX is x86-64 only; amx_available() is false elsewhere")
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{max_diff, random};
    use super::*;

    /// The plain f32 layer on bf16-rounded operands: what the tiles compute, up to the
    /// order of the f32 sums.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (rows, k) = (x.elem_count() / w.dims()[1], w.dims()[1]);
        let y = round_to_bf16(x)?
            .reshape((rows, k))?
            .matmul(&round_to_bf16(w)?.t()?)?
            .broadcast_add(b)?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = w.dims()[0];
        y.reshape(dims)
    }

    /// Every form of the layer this CPU runs: candle's, our f32 kernel's (where it
    /// runs), AMX tiles (where the CPU has them).
    fn layers(w: &Tensor, b: &Tensor) -> Result<Vec<Bf16Linear>> {
        let mut layers = vec![Bf16Linear::build(w, Some(b.clone()), Form::Rounded)?];
        if packed_linear::available() {
            layers.push(Bf16Linear::build(w, Some(b.clone()), Form::Packed)?);
        }
        if amx_available() {
            layers.push(Bf16Linear::build(w, Some(b.clone()), Form::Tiles)?);
        } else {
            println!("no AMX on this CPU: the tile path is not tested here");
        }
        Ok(layers)
    }

    #[test]
    fn bf16_linear_equals_the_f32_product_of_rounded_operands() -> Result<()> {
        // ragged sizes: rows not a multiple of 16 or of a task, k and n not of 32
        for &(dims, n) in &[
            (&[2usize, 37, 70][..], 45usize),
            (&[130, 64][..], 96),
            (&[1, 5, 320][..], 33),
        ] {
            let k = *dims.last().unwrap();
            let x = random(dims, 1)?;
            let w = random(&[n, k], 2)?;
            let b = random(&[n], 3)?;
            let want = reference(&x, &w, &b)?;
            // and bf16 is near the f32 layer: relative error ~2^-8 per operand
            let f32 = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
            let scale = f32.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            for layer in layers(&w, &b)? {
                let got = layer.forward(&x)?;
                assert_eq!(got.dims(), want.dims());
                let fused = layer.forward_gelu(&x)?;
                let apart = crate::kernels::gelu::gelu(&got)?;
                assert_eq!(max_diff(&fused, &apart)?, 0.0, "{:?}", layer.0);
                // only the summation order differs: f32 rounding of sums of ~k terms
                let d = max_diff(&got, &want)?;
                assert!(d < 1e-5, "{dims:?} x {n}: {d} ({:?})", layer.0);
                let rel = max_diff(&got, &f32)? / scale;
                assert!(rel < 2e-2, "{dims:?} x {n}: bf16 vs f32 {rel}");
            }
        }
        Ok(())
    }

    #[test]
    fn channels_first_form_is_the_same_layer_as_a_1x1_convolution() -> Result<()> {
        // odd channel and pixel counts, two images; then two pixel chunks, several
        // pixel tasks and two output tasks; then inputs deeper than one depth block
        for &(b_, k, n, h, w_) in &[
            (2usize, 37usize, 45usize, 9usize, 17usize),
            (1, 64, 96, 4, 4),
            (1, 40, 200, 70, 70),
            (2, 300, 40, 5, 7),
        ] {
            let x = random(&[b_, k, h, w_], 5)?;
            let w = random(&[n, k], 6)?;
            let b = random(&[n], 7)?;
            let tokens = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
            let want = reference(&tokens, &w, &b)?
                .transpose(1, 2)?
                .reshape((b_, n, h, w_))?;
            for layer in layers(&w, &b)? {
                let got = layer.forward_channels_first(&x)?;
                let d = max_diff(&got, &want)?;
                assert!(d < 1e-5, "({b_}, {k}, {h}, {w_}) -> {n}: {d}");
                // the fused activation changes no bit of the product's GELU
                let fused = layer.forward_channels_first_gelu(&x)?;
                let apart = crate::kernels::gelu::gelu(&got)?;
                assert_eq!(max_diff(&fused, &apart)?, 0.0, "{:?}", layer.0);
            }
        }
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors_and_empty_inputs_give_empty_outputs() -> Result<()> {
        let (w, b) = (random(&[8, 6], 1)?, random(&[8], 2)?);
        for layer in layers(&w, &b)? {
            assert!(layer.forward(&random(&[3, 5], 3)?).is_err());
            assert!(layer
                .forward_channels_first(&random(&[1, 5, 2, 2], 3)?)
                .is_err());
            let empty = Tensor::zeros((0, 6), DType::F32, &candle_core::Device::Cpu)?;
            assert_eq!(layer.forward(&empty)?.dims(), &[0, 8]);
            let empty = Tensor::zeros((1, 6, 0, 3), DType::F32, &candle_core::Device::Cpu)?;
            assert_eq!(layer.forward_channels_first(&empty)?.dims(), &[1, 8, 0, 3]);
        }
        Ok(())
    }

    #[test]
    fn rounding_is_to_nearest_even_as_candle_casts() -> Result<()> {
        // two exact ties (1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up), an ordinary
        // value, a subnormal, large ones
        let tie = 2f32.powi(-8);
        let xs = [
            1.0f32,
            1.0 + tie,
            1.0 + 3.0 * tie,
            -3.3,
            1e-40,
            65504.0,
            1e30,
        ];
        let ours: Vec<f32> = xs.iter().map(|&x| round_to_bf16_f32(x)).collect();
        let t = Tensor::new(&xs[..], &candle_core::Device::Cpu)?;
        assert_eq!(ours, round_to_bf16(&t)?.to_vec1::<f32>()?);
        assert!(round_to_bf16_f32(f32::NAN).is_nan());
        Ok(())
    }
}
