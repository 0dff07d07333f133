//! The register tile of our f32 products: R rows x NV vectors of 16 columns summed in
//! AVX-512 registers over a depth, the first operand broadcast one value per row and
//! the second loaded as vectors. The packed linear layers and the attention kernel
//! run on it with their operands laid out as it reads them.

use std::arch::x86_64::*;

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

/// `c[r][j] = start + sum over d < depth of a[d * a_step + r] * b[d * 16 NV + j]`
/// for the tile's `rows` x `cols` corner of R x 16 NV (the packed operands are
/// zero-padded to whole tiles; only the corner is read from or written to `c`,
/// whose rows are `ldc` apart). The R x NV accumulators live in registers.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile<const R: usize, const NV: usize>(
    depth: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    start: Start,
) {
    let mask = |v: usize| -> __mmask16 {
        let left = cols.saturating_sub(v * 16).min(16);
        ((1u32 << left) - 1) as __mmask16
    };
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, acc) in row.iter_mut().enumerate() {
            *acc = match start {
                Start::Output if r < rows => {
                    _mm512_maskz_loadu_ps(mask(v), c.add(r * ldc + v * 16))
                }
                Start::Output | Start::Zero => _mm512_setzero_ps(),
                Start::ColumnBias(bias) => _mm512_loadu_ps(bias.add(v * 16)),
                Start::RowBias(bias) => _mm512_set1_ps(*bias.add(r)),
            };
        }
    }
    for d in 0..depth {
        let bd = b.add(d * NV * 16);
        let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(bd.add(v * 16)));
        let ad = a.add(d * a_step);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ad.add(r));
            for (acc, &bv) in row.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(av, bv, *acc);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        if r < rows {
            for (v, &acc) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + v * 16), mask(v), acc);
            }
        }
    }
}
