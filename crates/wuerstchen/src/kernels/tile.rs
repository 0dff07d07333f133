//! The register tile of our f32 products: R rows x NV groups of 16 columns summed in
//! vector registers over a depth, the first operand broadcast one value per row and
//! the second loaded as vectors. The packed linear layers and the attention kernel
//! run on it with their operands laid out as it reads them.
//!
//! Two instruction sets run it: AVX-512 holds the whole tile in its 32 registers;
//! AVX2 + FMA (most laptops, and AMD servers before Zen 4) has 16 registers of half
//! the width, so it sums the same tile as sub-tiles ([`Avx2`]). The kernels are
//! compiled once per set ([`tile_kernel`]) over the same layouts, so the packed
//! weights serve both.

use std::arch::x86_64::*;

use super::Isa;

/// What a tile's sums start from.
#[derive(Clone, Copy)]
pub(crate) enum Start {
    /// Zero.
    Zero,
    /// The output as a previous depth block left it.
    Output,
    /// The bias of each column (token layout: a column per output).
    ColumnBias(*const f32),
    /// The bias of each row (channels-first: a row per output).
    RowBias(*const f32),
}

impl Start {
    /// The same start for the sub-tile from row `r` and column `j` of a tile.
    fn offset(self, r: usize, j: usize) -> Self {
        match self {
            Start::ColumnBias(bias) => Start::ColumnBias(bias.wrapping_add(j)),
            Start::RowBias(bias) => Start::RowBias(bias.wrapping_add(r)),
            other => other,
        }
    }
}

/// One instruction set's register tile.
pub(crate) trait Tile {
    /// Whether the operands are words of bf16 pairs ([`Bf16Pairs`]) rather than f32.
    const PAIRS: bool = false;

    /// `c[r][j] = start + sum over d < depth of a[d * a_step + r] * b[d * 16 NV + j]`
    /// for the tile's `rows` x `cols` corner of R x 16 NV (the packed operands are
    /// zero-padded to whole tiles; only the corner is read from or written to `c`,
    /// whose rows are `ldc` apart).
    ///
    /// # Safety
    /// The CPU has the set's features; the operands hold the whole tile over `depth`
    /// and `c` the corner.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const NV: usize>(
        depth: usize,
        a: *const f32,
        a_step: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        corner: (usize, usize),
        start: Start,
    );
}

/// AVX-512 F: the R x NV accumulators in registers.
pub(crate) struct Avx512;

/// AVX2 + FMA: sub-tiles of 6 x 16 where R is a multiple of 6 (the token layout's
/// 12 x 32), else 4 x 24 (the channels-first and attention 8 x 48). Both keep 12
/// accumulators: two FMA pipes of 4 cycles' latency need 8 in flight, and in a loop
/// of one tile on one core (operands in L1) 6 x 16 reached 88.5 GFLOP/s of the 89.7 a
/// loop of bare FMAs does, 4 x 24 84, 4 x 16 75, 8 x 8 41.
pub(crate) struct Avx2;

/// AVX-512 with AVX512-BF16 (AMD Zen 4 and later; Intel from Cooper Lake): the
/// AVX-512 tile on operands of bf16 pairs (see [`Step512`]), for the layers in bf16
/// arithmetic. Where `vdpbf16ps` issues as fast as an FMA (a Zen 5 EPYC: 185 against 100
/// GFLOP/s on one core, in a loop of independent instructions) a pair of products
/// costs what one f32 product does; the operands also take half the bytes.
pub(crate) struct Bf16Pairs;

/// The tile a packed product runs on: f32 on an instruction set, or bf16 pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tiles {
    F32(Isa),
    Bf16Pairs,
}

impl Tile for Avx2 {
    /// Each sub-tile runs over the whole depth, reading its part of the operands.
    #[inline(always)]
    unsafe fn tile<const R: usize, const NV: usize>(
        depth: usize,
        a: *const f32,
        a_step: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        start: Start,
    ) {
        // whole sub-tiles only: each reads all its rows of a
        const { assert!(R.is_multiple_of(6) || R.is_multiple_of(4)) };
        let (sub_rows, sub_cols) = if R.is_multiple_of(6) {
            (6, 16)
        } else {
            (4, 24)
        };
        let b_step = 16 * NV;
        for r in (0..rows).step_by(sub_rows) {
            for j in (0..cols).step_by(sub_cols) {
                let corner = ((rows - r).min(sub_rows), (cols - j).min(sub_cols));
                let (a, b, c) = (a.add(r), b.add(j), c.add(r * ldc + j));
                let start = start.offset(r, j);
                if R.is_multiple_of(6) {
                    avx2_tile::<6, 2>(depth, a, a_step, b, b_step, c, ldc, corner, start)
                } else {
                    avx2_tile::<4, 3>(depth, a, a_step, b, b_step, c, ldc, corner, start)
                }
            }
        }
    }
}

/// One depth step of an AVX-512 tile: a vector of the second operand loaded, a value
/// of the first broadcast, their products added to the sums. f32 ([`Avx512`]) or bf16
/// pairs ([`Bf16Pairs`]: each 32-bit word of both operands holds two bf16 values one
/// step of the real depth apart, the lower half first, the depth counts words, and
/// one `vdpbf16ps` adds both products of 16 pairs to their sums in f32).
pub(crate) trait Step512 {
    type A: Copy;
    type B: Copy;
    unsafe fn load(at: *const f32) -> Self::B;
    unsafe fn broadcast(at: *const f32) -> Self::A;
    unsafe fn madd(sum: __m512, a: Self::A, b: Self::B) -> __m512;
}

impl Step512 for Avx512 {
    type A = __m512;
    type B = __m512;
    #[inline(always)]
    unsafe fn load(at: *const f32) -> __m512 {
        _mm512_loadu_ps(at)
    }
    #[inline(always)]
    unsafe fn broadcast(at: *const f32) -> __m512 {
        _mm512_set1_ps(*at)
    }
    #[inline(always)]
    unsafe fn madd(sum: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, sum)
    }
}

impl Step512 for Bf16Pairs {
    type A = __m512bh;
    type B = __m512bh;
    #[inline(always)]
    unsafe fn load(at: *const f32) -> __m512bh {
        std::mem::transmute(_mm512_loadu_ps(at))
    }
    #[inline(always)]
    unsafe fn broadcast(at: *const f32) -> __m512bh {
        std::mem::transmute(_mm512_set1_ps(*at))
    }
    #[inline(always)]
    unsafe fn madd(sum: __m512, a: __m512bh, b: __m512bh) -> __m512 {
        _mm512_dpbf16_ps(sum, a, b)
    }
}

/// `impl Tile` for an AVX-512 step: [`sums_512`] compiled with the step's features.
macro_rules! tile_512 {
    ($step:ty, $features:literal, $pairs:literal) => {
        impl Tile for $step {
            const PAIRS: bool = $pairs;

            #[inline(always)]
            unsafe fn tile<const R: usize, const NV: usize>(
                depth: usize,
                a: *const f32,
                a_step: usize,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                corner: (usize, usize),
                start: Start,
            ) {
                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn sums<const R: usize, const NV: usize>(
                    depth: usize,
                    a: *const f32,
                    a_step: usize,
                    b: *const f32,
                    c: *mut f32,
                    ldc: usize,
                    corner: (usize, usize),
                    start: Start,
                ) {
                    sums_512::<$step, R, NV>(depth, a, a_step, b, c, ldc, corner, start)
                }
                sums::<R, NV>(depth, a, a_step, b, c, ldc, corner, start)
            }
        }
    };
}
tile_512!(Avx512, "avx512f", false);
tile_512!(Bf16Pairs, "avx512f,avx512bf16", true);

/// The AVX-512 tile: the R x NV sums in registers over the depth, step by step. Inlined
/// into the function [`tile_512`] compiles with the step's features, which then apply
/// to it and to the step's intrinsics (no calls are left in the loop).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_512<S: Step512, const R: usize, const NV: usize>(
    depth: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    corner: (usize, usize),
    start: Start,
) {
    let mut acc = starts_512::<R, NV>(c, ldc, corner, start);
    for d in 0..depth {
        let bd = b.add(d * NV * 16);
        let mut bv = [S::load(bd); NV];
        for (v, bv) in bv.iter_mut().enumerate().skip(1) {
            *bv = S::load(bd.add(v * 16));
        }
        let ad = a.add(d * a_step);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = S::broadcast(ad.add(r));
            for (acc, &bv) in row.iter_mut().zip(&bv) {
                *acc = S::madd(*acc, av, bv);
            }
        }
    }
    store_512(&acc, c, ldc, corner);
}

/// Which of 16 lanes of vector `v` lie inside `cols` columns.
#[inline(always)]
fn mask_512(cols: usize, v: usize) -> __mmask16 {
    let left = cols.saturating_sub(v * 16).min(16);
    ((1u32 << left) - 1) as __mmask16
}

/// The AVX-512 tiles' sums as `start` says they begin, inlined into the tiles (which
/// enable AVX-512): left a call of its own, or its closures (`array::from_fn`), it
/// returned the sums through memory, once per vector of every tile: 3% of a bf16 prior.
#[inline(always)]
unsafe fn starts_512<const R: usize, const NV: usize>(
    c: *const f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    start: Start,
) -> [[__m512; NV]; R] {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, acc) in row.iter_mut().enumerate() {
            *acc = match start {
                Start::Output if r < rows => {
                    _mm512_maskz_loadu_ps(mask_512(cols, v), c.add(r * ldc + v * 16))
                }
                Start::Output | Start::Zero => _mm512_setzero_ps(),
                Start::ColumnBias(bias) => _mm512_loadu_ps(bias.add(v * 16)),
                Start::RowBias(bias) => _mm512_set1_ps(*bias.add(r)),
            };
        }
    }
    acc
}

/// Writes the corner of an AVX-512 tile's sums to `c` (inlined as [`starts_512`]).
#[inline(always)]
unsafe fn store_512<const R: usize, const NV: usize>(
    acc: &[[__m512; NV]; R],
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
) {
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (v, &acc) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * ldc + v * 16), mask_512(cols, v), acc);
        }
    }
}

/// An R x 8 NV sub-tile whose second operand's rows are `b_step` apart; otherwise as
/// [`Tile::tile`]. Ragged columns go through masked loads and stores (AVX2's are
/// slower than plain ones, so full vectors take the plain ones).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_tile<const R: usize, const NV: usize>(
    depth: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    b_step: usize,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    start: Start,
) {
    // the sums run from zero and the start is added once at the end, so the loop is
    // the same whatever the start (and 4 x 24's can be written out in assembly)
    let acc: [[__m256; NV]; R] = if (R, NV) == (4, 3) {
        // SAFETY: the same type, R and NV being 4 and 3
        std::mem::transmute_copy(&sums_4x24(depth, a, a_step, b, b_step))
    } else {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        for d in 0..depth {
            let bd = b.add(d * b_step);
            let bv: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(bd.add(v * 8)));
            let ad = a.add(d * a_step);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ad.add(r));
                for (acc, &bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(av, bv, *acc);
                }
            }
        }
        acc
    };
    let left = |v: usize| cols.saturating_sub(v * 8).min(8);
    let mask = |v: usize| {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(left(v) as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    };
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (v, &acc) in row.iter().enumerate() {
            let at = c.add(r * ldc + v * 8);
            let full = left(v) == 8;
            let sum = match start {
                Start::Zero => acc,
                Start::Output if full => _mm256_add_ps(_mm256_loadu_ps(at), acc),
                Start::Output => _mm256_add_ps(_mm256_maskload_ps(at, mask(v)), acc),
                Start::ColumnBias(bias) => _mm256_add_ps(_mm256_loadu_ps(bias.add(v * 8)), acc),
                Start::RowBias(bias) => _mm256_add_ps(_mm256_set1_ps(*bias.add(r)), acc),
            };
            match left(v) {
                8 => _mm256_storeu_ps(at, sum),
                0 => {}
                _ => _mm256_maskstore_ps(at, mask(v), sum),
            }
        }
    }
}

/// The sums of a 4 x 24 sub-tile from zero, as [`avx2_tile`]'s loop computes them, in
/// assembly: its 12 accumulators, 3 vectors of b and a broadcast take all 16
/// registers, and the compiler, scheduling for a generic x86-64, rotated the
/// accumulators through registers every step and spilled one (73 GFLOP/s on 2 cores
/// where a 1536 -> 6144 layer runs at ~150 on 4 x 16).
#[target_feature(enable = "avx2,fma")]
unsafe fn sums_4x24(
    depth: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    b_step: usize,
) -> [[__m256; 3]; 4] {
    let z = _mm256_setzero_ps();
    let mut s = [[z; 3]; 4];
    if depth == 0 {
        return s;
    }
    std::arch::asm!(
        "2:",
        "vmovups {b0}, [{b}]",
        "vmovups {b1}, [{b} + 32]",
        "vmovups {b2}, [{b} + 64]",
        "vbroadcastss {x}, dword ptr [{a}]",
        "vfmadd231ps {s00}, {x}, {b0}",
        "vfmadd231ps {s01}, {x}, {b1}",
        "vfmadd231ps {s02}, {x}, {b2}",
        "vbroadcastss {x}, dword ptr [{a} + 4]",
        "vfmadd231ps {s10}, {x}, {b0}",
        "vfmadd231ps {s11}, {x}, {b1}",
        "vfmadd231ps {s12}, {x}, {b2}",
        "vbroadcastss {x}, dword ptr [{a} + 8]",
        "vfmadd231ps {s20}, {x}, {b0}",
        "vfmadd231ps {s21}, {x}, {b1}",
        "vfmadd231ps {s22}, {x}, {b2}",
        "vbroadcastss {x}, dword ptr [{a} + 12]",
        "vfmadd231ps {s30}, {x}, {b0}",
        "vfmadd231ps {s31}, {x}, {b1}",
        "vfmadd231ps {s32}, {x}, {b2}",
        "add {a}, {a_step}",
        "add {b}, {b_step}",
        "dec {n}",
        "jnz 2b",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        n = inout(reg) depth => _,
        a_step = in(reg) a_step * 4,
        b_step = in(reg) b_step * 4,
        b0 = out(ymm_reg) _,
        b1 = out(ymm_reg) _,
        b2 = out(ymm_reg) _,
        x = out(ymm_reg) _,
        s00 = inout(ymm_reg) s[0][0],
        s01 = inout(ymm_reg) s[0][1],
        s02 = inout(ymm_reg) s[0][2],
        s10 = inout(ymm_reg) s[1][0],
        s11 = inout(ymm_reg) s[1][1],
        s12 = inout(ymm_reg) s[1][2],
        s20 = inout(ymm_reg) s[2][0],
        s21 = inout(ymm_reg) s[2][1],
        s22 = inout(ymm_reg) s[2][2],
        s30 = inout(ymm_reg) s[3][0],
        s31 = inout(ymm_reg) s[3][1],
        s32 = inout(ymm_reg) s[3][2],
        options(nostack, readonly),
    );
    s
}

/// Defines `unsafe fn $name(isa: Isa, args..)` from a body generic over the tile
/// (`$T: Tile`), compiled once per instruction set with its features enabled, so
/// that the tile and the body's own loops (packing, softmax) use them. Prefixed with
/// `pairs`, the function takes [`Tiles`] instead and is also compiled for
/// [`Bf16Pairs`].
macro_rules! tile_kernel {
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis unsafe fn $name(isa: $crate::kernels::Isa, $($arg: $ty),*) {
            #[inline(always)]
            unsafe fn body<$T: $crate::kernels::tile::Tile>($($arg: $ty),*) $body
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) {
                body::<$crate::kernels::tile::Avx512>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                body::<$crate::kernels::tile::Avx2>($($arg),*)
            }
            match isa {
                $crate::kernels::Isa::Avx512 => avx512($($arg),*),
                $crate::kernels::Isa::Avx2 => avx2($($arg),*),
            }
        }
    };
    (pairs $(#[$meta:meta])* $vis:vis unsafe fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis unsafe fn $name(tiles: $crate::kernels::tile::Tiles, $($arg: $ty),*) {
            #[inline(always)]
            unsafe fn generic<$T: $crate::kernels::tile::Tile>($($arg: $ty),*) $body
            #[target_feature(enable = "avx512f,avx512bf16")]
            unsafe fn pairs($($arg: $ty),*) {
                generic::<$crate::kernels::tile::Bf16Pairs>($($arg),*)
            }
            $crate::kernels::tile::tile_kernel! {
                unsafe fn sets<$T>($($arg: $ty),*) { generic::<$T>($($arg),*) }
            }
            match tiles {
                $crate::kernels::tile::Tiles::F32(isa) => sets(isa, $($arg),*),
                $crate::kernels::tile::Tiles::Bf16Pairs => pairs($($arg),*),
            }
        }
    };
}
pub(crate) use tile_kernel;

/// Whether this CPU runs [`Bf16Pairs`].
pub(crate) fn pairs_supported() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// Whether layers in bf16 should run on [`Bf16Pairs`] here rather than on the f32 tile
/// with rounded operands: where `vdpbf16ps` issues about as fast as an FMA, so that a
/// pair of products costs what one f32 product does. AMD's do (a Zen 5 EPYC: 2.9 G a
/// second against 3.1 G FMAs on one core). Intel's without AMX do not: a Xeon with
/// AVX512-BF16 and AVX512-FP16 but no AMX issued 1.35 G against 3.8 G, and the pair
/// tile ran at 72-80 GFLOP/s on one thread where the f32 tile ran at 118-131
/// (performance.md, "bf16 on the CPU"); Intel's with AMX take the AMX tiles instead.
/// Checked once: every layer built and every attention call asks, and CPUID traps
/// to the hypervisor in a VM.
pub(crate) fn pairs_pay() -> bool {
    static PAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAY.get_or_init(|| {
        // CPUID leaf 0 names the vendor in EBX, EDX, ECX
        let id = __cpuid(0);
        let amd = [id.ebx, id.edx, id.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        amd && pairs_supported()
    })
}

/// The best set this CPU runs the tile on.
pub(super) fn detect() -> Option<Isa> {
    if is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Some(Isa::Avx2)
    } else {
        None
    }
}
