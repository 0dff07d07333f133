//! f32 linear layers whose weights are packed once, at build time, for our own
//! AVX-512 / AVX2 kernel: inference in f32 on the CPU.
//!
//! candle's matmul (the `gemm` crate) copies the weight into its panel layout on every
//! call. For the text encoders (154 tokens against weights of 1280 x 5120) that copy
//! took 60% as long as the products themselves (perf: 24% of the time packing, 38% in
//! the kernel), and it streams every weight through memory twice in the prior too.
//! Here the weight is stored in the kernel's layout from the start, in one form that
//! serves both layouts of the activations:
//!
//! - tokens (.., k) -> (.., n): `y = x w^T`, the weight's panels are the vectors of the
//!   product (32 outputs), the rows of x are broadcast (`ROWS` at a time, repacked
//!   once per call: a small copy next to the products);
//! - channels-first (B, k, H, W) -> (B, n, H, W): `y = w x` per image, the weight is
//!   broadcast (8 outputs of a panel at a time) and 48 pixels of x are the vectors.
//!
//! Both run the same register tile (`tile`: AVX-512, or AVX2 + FMA), summing
//! over the depth in blocks of `DEPTH` so the operand a run of tiles shares stays in
//! L1; the packed operands start on cache lines (`Aligned`). A CPU with neither gets
//! candle's layer (the caller builds [`LinearKind::Candle`](super::linear_kind) there).
//! Layers in bf16 arithmetic run on the same kernels, their operands rounded to bf16:
//! on AMD's AVX512-BF16 as pairs of bf16 on the pair tile (see `Panels`), else on
//! the f32 tile. Layers with f16 weights (f16 models on the CPU) keep them as f16 and
//! widen them on the way to the f32 tile: f32 arithmetic on half the weight memory.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    contiguous_f32, linear_output_dims, simd_dispatch, unsupported, with_scratch, Aligned, Isa,
    SendPtr,
};

/// Outputs per weight panel: two AVX-512 vectors (four of AVX2).
const PANEL: usize = 32;
/// Token rows broadcast by one register tile (12 x 2 vectors: 24 accumulators).
const ROWS: usize = 12;
/// Outputs broadcast by one channels-first tile: a quarter panel.
const OUTPUTS: usize = 8;
/// Pixels per channels-first tile: three vectors (8 x 3: 24 accumulators).
const PIXELS: usize = 48;
/// Depth summed per pass: the operand a tile shares with its neighbours stays in L1
/// while the other streams past it from L2: a panel slice of 128 x 32 f32 (16 KiB) in
/// the token layout, a pixel tile of 128 x 48 (24 KiB) channels-first. (256 measured
/// the same or slower.)
const DEPTH: usize = 128;
/// Token rows per task at most (16 tiles): their packed rows (192 x k f32) are read
/// once per panel, from L2. The rows are split evenly (in whole tiles): every task
/// reads its outputs' weights once, so a small remainder task costs as much as a full
/// one.
const TASK_ROWS: usize = 192;
/// Outputs per token-layout task.
const TASK_OUTPUTS: usize = 128;
/// Pixels per channels-first task at most: the task's weights (its outputs x k) are
/// read from memory once and from L2 for each further block of pixels.
const TASK_PIXELS: usize = 4096;
/// Largest input (of all images) packed once per call as pixel tiles for all tasks:
/// the prior's and the decoder's (up to 28 MB); Stage A's at 1024 px, up to 400 MB,
/// is packed by each task as it goes instead, to keep the peak memory down.
const SHARED_PIXELS_BYTES: usize = 64 << 20;
/// Pixels packed at a time in a channels-first task (5 tiles, 120 KiB at depth 128).
const BLOCK_PIXELS: usize = 240;
/// Outputs per channels-first task: eight panels. Every task reads all of its image's
/// pixels (up to [`TASK_PIXELS`]) from L3 once, so the more outputs a task has, the
/// fewer times the input is read: with 64 outputs a task (when a task held all the
/// depth of its weights in L2), the prior's 6144 -> 1536 layer read its 14 MB input 24
/// times per image and ran at ~220 GFLOP/s against ~260 for 1536 -> 6144.
const TASK_OUTPUTS_CF: usize = 8 * PANEL;
/// Bytes of weights a channels-first task keeps in L2 (1.5 of 2 MiB a core here): its
/// outputs' weights over a chunk of the depth, reused for every block of pixels before
/// the next chunk is read (the outputs' partial sums meanwhile wait in L2/L3).
const TASK_WEIGHT_BYTES: usize = 3 << 19;

/// Depth per chunk of a channels-first task with `outputs` outputs: whole depth blocks,
/// as many as [`TASK_WEIGHT_BYTES`] hold (at least one), at most all k.
fn depth_chunk(k: usize, outputs: usize) -> usize {
    ((TASK_WEIGHT_BYTES / (outputs * 4) / DEPTH).max(1) * DEPTH).min(k)
}

/// How many tasks split each image's pixels when `others` tasks (images x groups of
/// outputs) share the threads: at most [`TASK_PIXELS`] a task, and more while the
/// tasks would leave a thread idle in their last round (the decoder's 5120 -> 1280
/// layer has 5 groups of outputs for 2 threads), down to [`BLOCK_PIXELS`] a task.
fn pixel_tasks(plane: usize, others: usize, threads: usize) -> usize {
    let mut tasks = plane.div_ceil(TASK_PIXELS);
    while !(others * tasks).is_multiple_of(threads)
        && others * tasks < 4 * threads
        && plane / (tasks + 1) >= BLOCK_PIXELS
    {
        tasks += 1;
    }
    tasks
}

/// Whether this CPU runs the kernel (AVX-512 F, or AVX2 + FMA: [`Isa`]).
pub fn available() -> bool {
    Isa::current().is_some()
}

/// A linear layer `x w^T + b` with its weight in the kernel's panels.
#[derive(Debug, Clone)]
pub struct PackedLinear(Arc<Packed>);

/// Panel p holds outputs 32 p .. 32 p + 32 as k rows of 32 values (input c of output
/// 32 p + j at `p * k * 32 + c * 32 + j`), zero-padded past n; the bias likewise.
#[derive(Debug)]
struct Packed {
    panels: Panels,
    bias: Vec<f32>,
    n: usize,
    k: usize,
}

/// The panels' values: f32, or their f16 bits for a layer with f16 weights (`F16`), or
/// for a layer in bf16 arithmetic their bf16 bits (exact: the weight is rounded to
/// bf16 anyway); the 16-bit forms take half the memory, and are either
/// - `Bf16`, `F16`: in the f32 layout, widened to f32 a task's share at a time into
///   scratch that the tiles read as they read f32 panels, or
/// - `Pairs`: where the CPU multiplies bf16 pairs ([`Bf16Pairs`](super::tile)), as
///   words of two inputs' values of an output (input 2 w in the lower half, 2 w + 1,
///   or zero past k, in the upper), laid out as f32 panels of `k.div_ceil(2)` rows
///   and read by the pair tile in place. The inputs are packed into such words too.
#[derive(Debug)]
enum Panels {
    F32(Aligned),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
    Pairs(Aligned),
}

/// Which arithmetic and panels [`PackedLinear::build`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    F32,
    /// bf16 on the f32 tile: `Panels::Bf16`.
    Bf16Widened,
    /// bf16 on the pair tile: `Panels::Pairs`.
    Bf16Pairs,
    /// f16 weights, f32 inputs and arithmetic: `Panels::F16`.
    F16Widened,
}

/// Whether this CPU multiplies bf16 pairs on the tile (AVX512-BF16): `pay`, where
/// that is faster than the f32 tile, else wherever it can.
pub(super) fn pairs_available(pay: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if pay {
            super::tile::pairs_pay()
        } else {
            super::tile::pairs_supported()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = pay;
        false
    }
}

/// Two values as the bits of a word of bf16 pairs (see [`Panels`]), held as an f32.
#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> f32 {
    use super::bf16_matmul::bf16_bits;
    f32::from_bits(bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16)
}

/// The values of a row as words of pairs of neighbours, the last word's upper half
/// zero for an odd count.
#[inline(always)]
pub(super) fn paired(row: &[f32]) -> impl Iterator<Item = f32> + '_ {
    row.chunks(2)
        .map(|two| pair(two[0], two.get(1).copied().unwrap_or(0.0)))
}

/// Words of pairs from two rows side by side, `dst[i] = pair(lo[i], hi[i])`, the upper
/// halves zero where there is no `hi` row (past an odd count of rows).
#[inline(always)]
pub(super) fn pair_rows(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]) {
    match hi {
        Some(hi) => {
            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(l, h);
            }
        }
        None => {
            for (d, &l) in dst.iter_mut().zip(lo) {
                *d = pair(l, 0.0);
            }
        }
    }
}

/// Writes w (n, k) into `panels` (see [`Packed`]) as `from` converts each value; the
/// padding past n keeps what `panels` held (zeros).
fn fill_panels<T: Send>(panels: &mut [T], w: &[f32], k: usize, from: impl Fn(f32) -> T + Sync) {
    // panel by panel on rayon's threads (loading a model packs GBs), each written in
    // order while its 32 rows of w are read side by side
    panels
        .par_chunks_mut(k * PANEL)
        .zip(w.par_chunks(k * PANEL))
        .for_each(|(panel, rows)| {
            let count = rows.len() / k;
            for (c, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (j, d) in dst[..count].iter_mut().enumerate() {
                    *d = from(rows[j * k + c]);
                }
            }
        });
}

impl Packed {
    /// bf16 arithmetic: the weight was rounded to bf16 when packed, and each input is
    /// rounded as it is packed.
    fn bf16(&self) -> bool {
        matches!(self.panels, Panels::Bf16(_) | Panels::Pairs(_))
    }

    /// Rows of the panels and of the packed inputs: k values, or k / 2 words of bf16
    /// pairs (rounded up). The kernels count the depth in these.
    fn words(&self) -> usize {
        match self.panels {
            Panels::Pairs(_) => self.k.div_ceil(2),
            _ => self.k,
        }
    }

    /// The tile the products run on where the CPU's f32 set is `isa`.
    #[cfg(target_arch = "x86_64")]
    fn tiles(&self, isa: Isa) -> super::tile::Tiles {
        match self.panels {
            Panels::Pairs(_) => super::tile::Tiles::Bf16Pairs,
            _ => super::tile::Tiles::F32(isa),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn tiles(&self, isa: Isa) -> Isa {
        isa
    }

    /// Rows `rows` of panel `panel` (`rows.len()` x 32 values) as f32: in place for
    /// f32 panels, else widened into `scratch`, which the pointer then points into.
    fn panel_rows(
        &self,
        panel: usize,
        rows: std::ops::Range<usize>,
        scratch: &mut [f32],
    ) -> *const f32 {
        let (at, len) = self.span(panel, rows);
        match &self.panels {
            Panels::F32(p) | Panels::Pairs(p) => p.as_slice()[at..][..len].as_ptr(),
            Panels::Bf16(p) => {
                super::bf16_matmul::widen_bf16(&p[at..][..len], &mut scratch[..len]);
                scratch.as_ptr()
            }
            Panels::F16(p) => {
                widen_f16(&p[at..][..len], &mut scratch[..len]);
                scratch.as_ptr()
            }
        }
    }

    /// Where the panels' value of `panel_rows`' first row starts in memory, for
    /// prefetching, and how many cache lines that many rows take.
    fn panel_lines(&self, panel: usize, rows: std::ops::Range<usize>) -> (*const i8, usize) {
        let (at, len) = self.span(panel, rows);
        match &self.panels {
            Panels::F32(p) | Panels::Pairs(p) => {
                (p.as_slice()[at..].as_ptr() as *const i8, len * 4 / 64)
            }
            Panels::Bf16(p) | Panels::F16(p) => (p[at..].as_ptr() as *const i8, len * 2 / 64),
        }
    }

    /// Where rows `rows` of panel `panel` start among the panels' values, and how many
    /// values they are.
    fn span(&self, panel: usize, rows: std::ops::Range<usize>) -> (usize, usize) {
        (
            panel * PANEL * self.words() + rows.start * PANEL,
            rows.len() * PANEL,
        )
    }

    /// Scratch a task needs to widen `values` panel values (none for f32 panels).
    fn widened(&self, values: usize) -> usize {
        match self.panels {
            Panels::F32(_) | Panels::Pairs(_) => 0,
            Panels::Bf16(_) | Panels::F16(_) => values,
        }
    }

    /// Up to [`ROWS`] rows of the input (k values each) as a row tile of `words()`
    /// rows: word w of row i at `w * ROWS + i`, rounded to bf16 for a layer in bf16.
    fn pack_rows(&self, rows: &[f32], tile: &mut [f32]) {
        for (i, row) in rows.chunks_exact(self.k).enumerate() {
            if let Panels::Pairs(_) = self.panels {
                for (w, word) in paired(row).enumerate() {
                    tile[w * ROWS + i] = word;
                }
            } else {
                for (c, &v) in row.iter().enumerate() {
                    tile[c * ROWS + i] = rounded(v, self.bf16());
                }
            }
        }
    }

    /// Pixels `first..first + PIXELS` of one image x (k, plane) as a pixel tile of the
    /// rows `words` (see [`Self::words`]): `words.len()` x PIXELS, zero past the plane.
    fn pack_pixels(
        &self,
        x: &[f32],
        plane: usize,
        first: usize,
        words: std::ops::Range<usize>,
        tile: &mut [f32],
    ) {
        if let Panels::Pairs(_) = self.panels {
            let channels = &x[2 * words.start * plane..(2 * words.end).min(self.k) * plane];
            pack_pixel_pairs(channels, plane, first, tile);
        } else {
            let channels = &x[words.start * plane..words.end * plane];
            pack_pixel_tile(channels, plane, first, tile, self.bf16());
        }
    }
}

impl PackedLinear {
    /// From a PyTorch-layout weight (out, in) and a bias (out), of any float dtype.
    /// Only where [`available`] says yes.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::build(weight, bias, Form::F32)
    }

    /// The layer in bf16 arithmetic, as [`Bf16Linear`](super::bf16_matmul) computes
    /// it: both operands of every product rounded to bf16, the sums in f32. For CPUs
    /// without AMX: on the pair tile where the CPU's AVX512-BF16 is faster than f32
    /// (AMD's), else on the f32 tile (no bf16 products, or slow ones), where rounding
    /// the inputs costs nothing extra: they are rounded while they are packed anyway.
    pub fn rounded_to_bf16(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let form = if pairs_available(true) {
            Form::Bf16Pairs
        } else {
            Form::Bf16Widened
        };
        Self::build(weight, bias, form)
    }

    /// The layer with its weight rounded to f16 and kept so (f16 models on the CPU):
    /// products and sums in f32, the inputs as they are.
    pub fn with_f16_weights(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::build(weight, bias, Form::F16Widened)
    }

    fn build(weight: &Tensor, bias: Option<&Tensor>, form: Form) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if k == 0 || n == 0 {
            candle_core::bail!(
                "linear layer of shape {:?}: no inputs or outputs",
                weight.dims()
            )
        }
        let np = n.div_ceil(PANEL) * PANEL;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let panels = match form {
            Form::Bf16Widened => {
                let mut panels = vec![0u16; np * k];
                fill_panels(&mut panels, &w, k, super::bf16_matmul::bf16_bits);
                Panels::Bf16(panels)
            }
            Form::F16Widened => {
                let mut panels = vec![0u16; np * k];
                fill_panels(&mut panels, &w, k, |v| half::f16::from_f32(v).to_bits());
                Panels::F16(panels)
            }
            Form::F32 => {
                let mut panels = Aligned::zeros(np * k);
                fill_panels(panels.as_mut_slice(), &w, k, |v| v);
                Panels::F32(panels)
            }
            Form::Bf16Pairs => {
                // the rows of w as words of pairs (zero past k), then as f32 panels
                let words = k.div_ceil(2);
                let rows: Vec<f32> = w.par_chunks(k).flat_map_iter(paired).collect();
                let mut panels = Aligned::zeros(np * words);
                fill_panels(panels.as_mut_slice(), &rows, words, |v| v);
                Panels::Pairs(panels)
            }
        };
        let mut padded = vec![0f32; np];
        if let Some(b) = bias {
            let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if b.len() != n {
                candle_core::bail!("linear bias of {} for {n} outputs", b.len())
            }
            padded[..n].copy_from_slice(&b);
        }
        Ok(Self(Arc::new(Packed {
            panels,
            bias: padded,
            n,
            k,
        })))
    }

    pub fn out_features(&self) -> usize {
        self.0.n
    }

    fn product(&self, x: &Tensor, channels_first: bool, gelu: bool) -> Result<Tensor> {
        self.product_sharing(x, channels_first, gelu, SHARED_PIXELS_BYTES)
    }

    /// With the limit of [`SHARED_PIXELS_BYTES`] as given (tests take both paths).
    fn product_sharing(
        &self,
        x: &Tensor,
        channels_first: bool,
        gelu: bool,
        shared: usize,
    ) -> Result<Tensor> {
        x.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&PanelMatmul {
                packed: &self.0,
                channels_first,
                gelu,
                shared_pixels_bytes: shared,
            })
    }

    /// The layer as a 1x1 convolution: x (B, in, H, W) -> (B, out, H, W).
    pub fn forward_channels_first(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, true, false)
    }

    /// `gelu(forward(x))`, the same numbers, with GELU applied to each task's block
    /// of outputs as it is finished (in L2): CLIP's MLPs.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, false, true)
    }

    /// `gelu(forward_channels_first(x))`, the same numbers, with GELU applied to each
    /// output tile as it is finished (in L1) rather than in a pass over the whole
    /// output: the MLPs' widest tensors (400 MB in Stage A at 1024 px) are written
    /// once, and never held twice.
    pub fn forward_channels_first_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, true, true)
    }
}

impl Module for PackedLinear {
    /// x (.., in) -> (.., out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, false, false)
    }
}

struct PanelMatmul<'a> {
    packed: &'a Packed,
    channels_first: bool,
    /// GELU on the outputs.
    gelu: bool,
    /// Channels-first inputs up to this size are packed once for all tasks.
    shared_pixels_bytes: usize,
}

impl CustomOp1 for PanelMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout).ok_or_else(|| unsupported(self.name()))?;
        let isa = Isa::current().ok_or_else(|| unsupported(self.name()))?;
        let p = self.packed;
        let dims = linear_output_dims(self.name(), layout.dims(), self.channels_first, p.k, p.n)?;
        let len = x.len() / p.k * p.n;
        // every element is written by exactly one task (through `dst`) before
        // `set_len` below: the zeroing pass of `vec![0.0; len]` would be a wasted sweep
        // over up to 100 MB per call
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if len == 0 {
            // no rows or pixels: nothing to multiply
        } else if self.channels_first {
            let plane = dims[2] * dims[3];
            let outputs = TASK_OUTPUTS_CF;
            let images = x.len() / (p.k * plane);
            let n_tasks = p.n.div_ceil(outputs);
            let p_tasks = pixel_tasks(plane, images * n_tasks, rayon::current_num_threads());
            // whole tiles per task, so that tasks start on the shared tiles below
            let task_pixels = plane.div_ceil(p_tasks).next_multiple_of(PIXELS);
            let per_image = n_tasks * p_tasks;
            let tiles = plane.div_ceil(PIXELS);
            // one image's input as pixel tiles (padded to whole tiles)
            let image_tiles = tiles * p.words() * PIXELS;
            let shared = (images * image_tiles * 4 <= self.shared_pixels_bytes).then(|| {
                // each image's pixels as tiles of PIXELS columns for every task:
                // tile t, input d, pixel q at t * k * PIXELS + d * PIXELS + q
                let mut packed = Aligned::zeros(images * image_tiles);
                packed
                    .as_mut_slice()
                    .par_chunks_mut(p.words() * PIXELS)
                    .enumerate()
                    .for_each(|(i, tile)| {
                        let (image, first) = (i / tiles, i % tiles * PIXELS);
                        let x = &x[image * p.k * plane..][..p.k * plane];
                        p.pack_pixels(x, plane, first, 0..p.words(), tile);
                    });
                packed
            });
            let dst = SendPtr(out.as_mut_ptr());
            (0..images * per_image).into_par_iter().for_each(|t| {
                let (image, t) = (t / per_image, t % per_image);
                let j0 = t / p_tasks * outputs;
                let q0 = (t % p_tasks * task_pixels).min(plane);
                let task = PixelTask {
                    x: &x[image * p.k * plane..][..p.k * plane],
                    packed: shared
                        .as_ref()
                        .map(|s| &s.as_slice()[image * image_tiles..][..image_tiles]),
                    plane,
                    outputs: j0..(j0 + outputs).min(p.n),
                    pixels: q0..(q0 + task_pixels).min(plane),
                    gelu: self.gelu,
                };
                // SAFETY: PackedLinear exists only where available() said yes; each
                // task writes only its outputs x pixels of its image, inside `out`.
                unsafe {
                    kernel::pixels(p.tiles(isa), p, &task, dst.get().add(image * p.n * plane))
                }
            });
        } else {
            let m = x.len() / p.k;
            // the rows as tiles of ROWS, packed once for every task that reads them:
            // row r, word w (an input, or a pair) at (r / ROWS) * words * ROWS + w * ROWS
            // + r % ROWS, zero past m
            let mut a = Aligned::zeros(m.div_ceil(ROWS) * ROWS * p.words());
            a.as_mut_slice()
                .par_chunks_mut(ROWS * p.words())
                .zip(x.par_chunks(ROWS * p.k))
                .for_each(|(tile, rows)| p.pack_rows(rows, tile));
            let m_tasks = m.div_ceil(TASK_ROWS);
            let task_rows = m.div_ceil(m_tasks).div_ceil(ROWS) * ROWS;
            let n_tasks = p.n.div_ceil(TASK_OUTPUTS);
            let dst = SendPtr(out.as_mut_ptr());
            (0..m_tasks * n_tasks).into_par_iter().for_each(|t| {
                let r0 = (t / n_tasks * task_rows).min(m);
                let j0 = t % n_tasks * TASK_OUTPUTS;
                let rows = r0..(r0 + task_rows).min(m);
                let outputs = j0..(j0 + TASK_OUTPUTS).min(p.n);
                // SAFETY: as above; each task writes only its rows x outputs of `out`.
                unsafe {
                    kernel::rows(
                        p.tiles(isa),
                        p,
                        a.as_slice(),
                        rows.clone(),
                        outputs.clone(),
                        dst.get(),
                    )
                }
                if self.gelu {
                    // SAFETY: this task's rows x outputs, written just above
                    unsafe { gelu_block(dst.get(), rows, p.n, outputs.start, outputs.len()) }
                }
            });
        }
        // SAFETY: the tasks cover all rows (or images and pixels) x all outputs, and
        // each tile stores its whole corner in its first depth block.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// f16 bits to the f32 values they are (exact): `half`'s slice conversion, on F16C
/// where the CPU has it (every CPU the tiles run on), 8 values an instruction.
fn widen_f16(src: &[u16], dst: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    src.reinterpret_cast::<half::f16>()
        .convert_to_f32_slice(&mut dst[..src.len()]);
}

/// `x`, or `x` rounded to the nearest bf16 (as f32) for a layer in bf16.
#[inline(always)]
fn rounded(x: f32, bf16: bool) -> f32 {
    if bf16 {
        super::bf16_matmul::round_to_bf16_f32(x)
    } else {
        x
    }
}

/// Copies pixels `first..first + PIXELS` of every input of `x` (inputs x plane) into
/// `tile` (inputs x PIXELS), zero past the plane's end; rounded to bf16 if `bf16`.
fn pack_pixel_tile(x: &[f32], plane: usize, first: usize, tile: &mut [f32], bf16: bool) {
    let count = PIXELS.min(plane - first);
    for (src, dst) in x.chunks_exact(plane).zip(tile.chunks_exact_mut(PIXELS)) {
        let src = &src[first..][..count];
        if let (Ok(dst), Ok(src)) = (
            <&mut [f32; PIXELS]>::try_from(&mut *dst),
            <&[f32; PIXELS]>::try_from(src),
        ) {
            if bf16 {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = rounded(s, true);
                }
            } else {
                // a fixed-size copy: three vector moves, where a slice copy calls
                // memmove (12% of the prior's time)
                *dst = *src;
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = rounded(s, bf16);
            }
            dst[count..].fill(0.0);
        }
    }
}

simd_dispatch! {
    // pixels `first..first + PIXELS` of the channels of `x` (channels x plane) as
    // words of bf16 pairs of consecutive channels (zero past the last one): a pixel
    // tile of channels.div_ceil(2) x PIXELS words, zero past the plane's end
    fn pack_pixel_pairs(x: &[f32], plane: usize, first: usize, tile: &mut [f32]) {
        let count = PIXELS.min(plane - first);
        for (two, dst) in x.chunks(2 * plane).zip(tile.chunks_exact_mut(PIXELS)) {
            let lo = &two[first..][..count];
            let hi = (two.len() > plane).then(|| &two[plane + first..][..count]);
            pair_rows(lo, hi, dst);
            dst[count..].fill(0.0);
        }
    }
}

/// GELU in place on `rows` of a row-major output whose rows are `stride` long, on
/// `cols` values from column `first` of each: a task's block, as it finishes it.
///
/// # Safety
/// The block lies inside the output, and no other thread touches it meanwhile.
unsafe fn gelu_block(
    out: *mut f32,
    rows: std::ops::Range<usize>,
    stride: usize,
    first: usize,
    cols: usize,
) {
    for r in rows {
        let row = std::slice::from_raw_parts_mut(out.add(r * stride + first), cols);
        super::gelu::gelu_in_place(row);
    }
}

/// One channels-first task: some outputs of some pixels of one image (k, plane).
struct PixelTask<'a> {
    x: &'a [f32],
    /// x packed as pixel tiles, when the call packed it for all tasks.
    packed: Option<&'a [f32]>,
    plane: usize,
    outputs: std::ops::Range<usize>,
    pixels: std::ops::Range<usize>,
    /// GELU on each output tile after its last depth block.
    gelu: bool,
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::super::tile::{tile_kernel, Start};
    use super::*;

    tile_kernel! { pairs
    /// Token layout: `out[rows, outputs] = x[rows] w[outputs]^T + b`, with `a` all
    /// rows packed as tiles and `out` the whole (m, n) output.
    pub(super) unsafe fn rows<T>(
        p: &Packed,
        a: &[f32],
        rows: std::ops::Range<usize>,
        outputs: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        // the depth in rows of the packed operands (inputs, or pairs of them)
        let k = p.words();
        // the (depth block, panel) slices in the order they are read; while the tiles
        // run over one, the next is fetched into L2 a share per tile, so the first tile
        // of a slice does not wait on memory (the weights are read once per call: 2.6
        // GB for CLIP bigG)
        let slices: Vec<(usize, usize)> = (0..k)
            .step_by(DEPTH)
            .flat_map(|d0| outputs.clone().step_by(PANEL).map(move |j| (d0, j)))
            .collect();
        let depths = |d0: usize| d0..(d0 + DEPTH).min(k);
        let tiles = rows.len().div_ceil(ROWS);
        with_scratch(p.widened(DEPTH * PANEL), |wide| {
            for (s, &(d0, j)) in slices.iter().enumerate() {
                let depth = DEPTH.min(k - d0);
                let panel = p.panel_rows(j / PANEL, depths(d0), wide);
                let start = if d0 == 0 {
                    Start::ColumnBias(p.bias.as_ptr().add(j))
                } else {
                    Start::Output
                };
                let cols = PANEL.min(outputs.end - j);
                let next = slices.get(s + 1).map(|&(d1, j1)| p.panel_lines(j1 / PANEL, depths(d1)));
                for (t, r) in rows.clone().step_by(ROWS).enumerate() {
                    if let Some((next, lines)) = next {
                        let share = lines.div_ceil(tiles);
                        for line in (t * share..((t + 1) * share).min(lines)).map(|l| l * 64) {
                            _mm_prefetch::<_MM_HINT_T1>(next.add(line));
                        }
                    }
                    T::tile::<ROWS, 2>(
                        depth,
                        a.as_ptr().add(r * k + d0 * ROWS),
                        ROWS,
                        panel,
                        out.add(r * p.n + j),
                        p.n,
                        (ROWS.min(rows.end - r), cols),
                        start,
                    );
                }
            }
        })
    }
    }

    tile_kernel! { pairs
    /// Channels-first: `out[outputs, pixels] = w[outputs] x[:, pixels] + b` for one
    /// image, `out` its (n, plane) output.
    pub(super) unsafe fn pixels<T>(p: &Packed, task: &PixelTask, out: *mut f32) {
        // the depth in rows of the packed operands (inputs, or pairs of them)
        let (k, plane) = (p.words(), task.plane);
        let chunk = depth_chunk(k, task.outputs.len());
        let pixel_len = BLOCK_PIXELS.div_ceil(PIXELS) * PIXELS * DEPTH;
        let first_panel = task.outputs.start / PANEL;
        let panels = task.outputs.len().div_ceil(PANEL);
        with_scratch(pixel_len + p.widened(panels * chunk * PANEL), |s| {
            let (b, wide) = s.split_at_mut(pixel_len);
            for c0 in (0..k).step_by(chunk) {
                // the task's weights over this chunk of the depth, read for every block of
                // pixels (widened once here where the panels are bf16)
                let depths = c0..(c0 + chunk).min(k);
                let bases: Vec<*const f32> = (0..panels)
                    .map(|i| {
                        let scratch = wide.get_mut(i * depths.len() * PANEL..).unwrap_or_default();
                        p.panel_rows(first_panel + i, depths.clone(), scratch)
                    })
                    .collect();
                for q0 in task.pixels.clone().step_by(BLOCK_PIXELS) {
                    let len = BLOCK_PIXELS.min(task.pixels.end - q0);
                    let tiles = len.div_ceil(PIXELS);
                    for d0 in (c0..k.min(c0 + chunk)).step_by(DEPTH) {
                        let depth = DEPTH.min(k - d0);
                        if task.packed.is_none() {
                            let tiles_of_b = b.chunks_exact_mut(depth * PIXELS).take(tiles);
                            for (t, tile) in tiles_of_b.enumerate() {
                                let first = q0 + t * PIXELS;
                                p.pack_pixels(task.x, plane, first, d0..d0 + depth, tile);
                            }
                        }
                        // the block's channels d0.. as tiles of PIXELS columns (or the
                        // call's packed tiles, read in place)
                        let tile_at = |t: usize| match task.packed {
                            Some(packed) => packed
                                .as_ptr()
                                .add(((q0 + t * PIXELS) / PIXELS * k + d0) * PIXELS),
                            None => b.as_ptr().add(t * depth * PIXELS),
                        };
                        // each pixel tile (48 x depth, 24 KiB) stays in L1 while the
                        // task's weights stream past it from L2
                        let lines = depth * PIXELS / 16;
                        let share = lines.div_ceil(task.outputs.len().div_ceil(OUTPUTS));
                        for t in 0..tiles {
                            let first = t * PIXELS;
                            // the shared tiles come from L3: the next one is fetched into
                            // L1 a share per tile while this one runs (as the task's own
                            // packing would have brought it)
                            let next =
                                (task.packed.is_some() && t + 1 < tiles).then(|| tile_at(t + 1));
                            for (g, j) in task.outputs.clone().step_by(OUTPUTS).enumerate() {
                                if let Some(next) = next {
                                    for line in
                                        (g * share..((g + 1) * share).min(lines)).map(|l| l * 16)
                                    {
                                        _mm_prefetch::<_MM_HINT_T0>(next.add(line) as *const i8);
                                    }
                                }
                                // a quarter of panel j / 32, read 32 apart
                                let weights = bases[j / PANEL - first_panel]
                                    .add((d0 - c0) * PANEL + j % PANEL);
                                let start = if d0 == 0 {
                                    Start::RowBias(p.bias.as_ptr().add(j))
                                } else {
                                    Start::Output
                                };
                                T::tile::<OUTPUTS, 3>(
                                    depth,
                                    weights,
                                    PANEL,
                                    tile_at(t),
                                    out.add(j * plane + q0 + first),
                                    plane,
                                    (OUTPUTS.min(task.outputs.end - j), PIXELS.min(len - first)),
                                    start,
                                );
                                if task.gelu && d0 + depth == k {
                                    // this task's own outputs, just written
                                    gelu_block(
                                        out,
                                        j..(j + OUTPUTS).min(task.outputs.end),
                                        plane,
                                        q0 + first,
                                        PIXELS.min(len - first),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        })
    }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::*;

    pub(super) unsafe fn rows(
        _: Isa,
        _: &Packed,
        _: &[f32],
        _: std::ops::Range<usize>,
        _: std::ops::Range<usize>,
        _: *mut f32,
    ) {
        unreachable!("PackedLinear is only built where available() says yes")
    }

    pub(super) unsafe fn pixels(_: Isa, _: &Packed, _: &PixelTask, _: *mut f32) {
        unreachable!("PackedLinear is only built where available() says yes")
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{max_diff, random};
    use super::*;

    fn skip() -> bool {
        if !available() {
            println!("neither AVX-512 nor AVX2 on this CPU: the packed layer is not tested here");
        }
        !available()
    }

    /// candle's f32 layer in the same layout.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, channels_first: bool) -> Result<Tensor> {
        if channels_first {
            super::super::pointwise::plain(x, w, Some(b))
        } else {
            candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(x)
        }
    }

    /// Only the order of the f32 sums differs from candle's: a rounding error that
    /// grows with the depth k (sums of k products of values in [-0.5, 0.5)).
    fn tolerance(k: usize) -> f32 {
        1e-6 * (k as f32).sqrt()
    }

    /// Each form of the layer this CPU runs, with candle's output for it: in f32, and
    /// in bf16 (the f32 product of the rounded operands) on the f32 tile and, where
    /// the CPU has AVX512-BF16, on the pair tile.
    fn forms(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        channels_first: bool,
    ) -> Result<Vec<(Form, PackedLinear, Tensor)>> {
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let rounded = reference(&round(x)?, &round(w)?, b, channels_first)?;
        let w_f16 = w.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        let mut forms = vec![
            (Form::F32, reference(x, w, b, channels_first)?),
            (Form::Bf16Widened, rounded.clone()),
            (Form::F16Widened, reference(x, &w_f16, b, channels_first)?),
        ];
        if pairs_available(false) {
            forms.push((Form::Bf16Pairs, rounded));
        } else {
            println!("no AVX512-BF16 on this CPU: the pair tile is not tested here");
        }
        forms
            .into_iter()
            .map(|(form, want)| Ok((form, PackedLinear::build(w, Some(b), form)?, want)))
            .collect()
    }

    #[test]
    fn f16_widens_to_the_value_of_every_bit_pattern() {
        // all 65536 f16 values (subnormals, infinities and NaNs too), against their
        // definition: sign, 5 exponent bits biased by 15, 10 fraction bits
        let src: Vec<u16> = (0..=u16::MAX).collect();
        let mut dst = vec![0f32; src.len()];
        widen_f16(&src, &mut dst);
        for (&h, &got) in src.iter().zip(&dst) {
            let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
            let (exponent, fraction) = ((h >> 10) & 0x1f, (h & 0x3ff) as f64);
            let want = sign
                * match exponent {
                    0 => fraction / 1024.0 * 2f64.powi(-14),
                    31 if fraction == 0.0 => f64::INFINITY,
                    31 => f64::NAN,
                    e => (1.0 + fraction / 1024.0) * 2f64.powi(e as i32 - 15),
                };
            assert!(
                got as f64 == want || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} against {want}"
            );
        }
    }

    #[test]
    fn packed_layer_equals_candles_in_both_layouts() -> Result<()> {
        if skip() {
            return Ok(());
        }
        // ragged everywhere: rows not a multiple of a tile or task, n not of a panel
        // or an 8-output tile, k deeper than one depth block and not a multiple of it
        for &(dims, n) in &[
            (&[2usize, 37, 70][..], 45usize),
            (&[1, 300, 600][..], 130),
            (&[5, 16][..], 8),
            (&[1, 1][..], 1),
        ] {
            let k = *dims.last().unwrap();
            let (x, w, b) = (random(dims, 1)?, random(&[n, k], 2)?, random(&[n], 3)?);
            for (form, layer, want) in forms(&x, &w, &b, false)? {
                for isa in Isa::supported() {
                    let got = isa.with(|| layer.forward(&x))?;
                    let d = max_diff(&got, &want)?;
                    assert!(d < tolerance(k), "{isa:?}, {form:?}, {dims:?} x {n}: {d}");
                    // GELU on each task's outputs: the GELU of the product, to the bit
                    let fused = isa.with(|| layer.forward_gelu(&x))?;
                    let separate = super::super::gelu::gelu(&got)?;
                    assert_eq!(max_diff(&fused, &separate)?, 0.0, "{isa:?} {form:?} GELU");
                }
            }
        }
        for &(images, k, n, h, w_) in &[
            (2usize, 37usize, 45usize, 9usize, 17usize),
            (1, 300, 140, 20, 25),
            (1, 8, 3, 1, 1),
            // several output tasks, and depth chunks (deep inputs: a task's weights
            // over all of k would not fit L2); several pixel tasks of an image, the
            // second starting inside a pixel block
            (2, 2100, 300, 3, 5),
            (1, 16, 20, 70, 70),
            (1, 40, 600, 17, 31),
        ] {
            let x = random(&[images, k, h, w_], 5)?;
            let (w, b) = (random(&[n, k], 6)?, random(&[n], 7)?);
            // the input packed once for all tasks, and by each task as it goes
            let cases = Isa::supported()
                .into_iter()
                .flat_map(|isa| [(isa, SHARED_PIXELS_BYTES), (isa, 0)]);
            let forms = forms(&x, &w, &b, true)?;
            for ((isa, shared), (form, layer, want)) in
                cases.flat_map(|c| forms.iter().map(move |f| (c, f)))
            {
                let got = isa.with(|| layer.product_sharing(&x, true, false, shared))?;
                let d = max_diff(&got, want)?;
                assert!(
                    d < tolerance(k),
                    "{isa:?}, ({images}, {k}, {h}, {w_}) -> {n}, {shared}, {form:?}: {d}"
                );
                // GELU on each finished tile: the GELU of the product, to the bit
                let fused = isa.with(|| layer.product_sharing(&x, true, true, shared))?;
                let separate = super::super::gelu::gelu(&got)?;
                assert_eq!(max_diff(&fused, &separate)?, 0.0, "{isa:?} {form:?} GELU");
            }
        }
        Ok(())
    }

    #[test]
    fn channels_first_tasks_keep_every_thread_busy() {
        // deep layers with few groups of outputs split their pixels so that 2 threads
        // both work to the end: the decoder's 5120 -> 1280 at 64 x 64 (5 groups)
        assert_eq!(pixel_tasks(4096, 5, 2), 2);
        // already even, or enough tasks: one task per TASK_PIXELS
        assert_eq!(pixel_tasks(576, 12, 2), 1);
        assert_eq!(pixel_tasks(65536, 2, 2), 16);
        // never below a block of pixels a task, even if a thread then idles
        assert_eq!(pixel_tasks(576, 3, 4), 2);
        assert_eq!(pixel_tasks(300, 1, 2), 1);
        // depth chunks: a 6144-deep layer's 256 outputs hold 1536 of it in L2
        assert_eq!(depth_chunk(6144, 256), 1536);
        assert_eq!(depth_chunk(1280, 256), 1280);
        assert_eq!(depth_chunk(100_000, 8192), DEPTH);
    }

    #[test]
    fn wrong_shapes_are_errors_and_empty_inputs_give_empty_outputs() -> Result<()> {
        if skip() {
            return Ok(());
        }
        let layer = PackedLinear::new(&random(&[8, 6], 1)?, Some(&random(&[8], 2)?))?;
        assert!(layer.forward(&random(&[3, 5], 3)?).is_err());
        assert!(layer
            .forward_channels_first(&random(&[1, 5, 2, 2], 3)?)
            .is_err());
        assert!(layer.forward_channels_first(&random(&[6, 2], 3)?).is_err());
        let empty = Tensor::zeros((0, 6), DType::F32, &candle_core::Device::Cpu)?;
        assert_eq!(layer.forward(&empty)?.dims(), &[0, 8]);
        let empty = Tensor::zeros((1, 6, 0, 3), DType::F32, &candle_core::Device::Cpu)?;
        assert_eq!(layer.forward_channels_first(&empty)?.dims(), &[1, 8, 0, 3]);
        assert!(PackedLinear::new(&random(&[8, 6], 1)?, Some(&random(&[7], 2)?)).is_err());
        Ok(())
    }
}
