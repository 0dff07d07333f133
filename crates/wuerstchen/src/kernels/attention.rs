//! Scaled dot-product attention that never holds the whole score matrix.
//!
//! The plain form materialises softmax(q k^T) for every head at once: at 1024 px
//! Stage B's 64 x 64 level has 4096 queries over 4096 + 77 keys in 20 heads, 1.3 GB of
//! scores (plus as much again for the softmax), written, read and freed on every call,
//! and candle's softmax runs libm's scalar `expf`. Here each task takes one head and a
//! block of queries: scores for that block (one gemm), a softmax in place with a
//! vectorised exp, and the product with v (a second gemm) — a few MB per task, in
//! cache, spread over rayon's threads. The normaliser is applied to the output rows
//! instead of the scores. On AVX-512 or AVX2 both products run on our register tile instead
//! of gemm (`tiled`). Backward (training) is in closed form from the recomputed
//! probabilities (the score matrix, once).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    dot, fast_path, gemm_strided, matmul_into, max, plain_gradients, simd_dispatch, sum_by,
    three_f32, Isa,
};
use crate::blocks::{softmax_last_dim, upcast};

/// Queries per task: the score block (QUERIES x keys) stays in L2 for a few thousand
/// keys, and 4096 queries still make 32 tasks per head.
const QUERIES: usize = 128;

/// softmax(q k^T * scale) v for q (B, H, N, d), k and v (B, H, L, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let fast = fast_path(&[q, k, v]);
    if fast {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, Sdpa { scale })
    } else {
        plain(q, k, v, scale)
    }
}

/// The same per head for q (B, N, H d), k and v (B, L, H d) in the layout the
/// projections write (head h in columns h d .. (h + 1) d) -> (B, N, H d): what
/// splitting out the heads, [`attention`] and merging them give, without the four
/// copies. Those ran on one thread while the other idled: in the prior (32 blocks, 24
/// heads), with the zeroing of new buffers, a tenth of a call (perf).
///
/// `bf16`: a model in bf16 arithmetic (its linear layers' operands rounded to bf16)
/// may run both products in bf16 too, where the CPU's bf16 products pay (the pair
/// tile: q, k, v and the probabilities rounded to bf16, sums, softmax and its
/// normaliser in f32, as PyTorch's bf16 attention); elsewhere this changes nothing.
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    bf16: bool,
) -> Result<Tensor> {
    let c = q.dim(2)?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("attention: {c} channels do not split into {heads} heads")
    }
    if let Some(isa) = tiled::available(c / heads).filter(|_| fast_path(&[q, k, v])) {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            SdpaTokens {
                scale,
                heads,
                isa,
                bf16,
            },
        );
    }
    let out = attention(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        scale,
    )?;
    merge_heads(&out)
}

/// (B, len, H d) -> (B, H, len, d), contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, len, c) = x.dims3()?;
    x.reshape((b, len, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// (B, H, len, d) -> (B, len, H d).
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, len, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, len, h * d))
}

/// The errors for q, k and v of `l1`, `l2`, `l3`: k not `fitting` q (as the layout
/// needs), v not shaped as k, or no keys (a softmax over nothing: the plain form fails
/// in its max as well).
fn check_shapes(fitting: bool, keys: usize, [l1, l2, l3]: [&Layout; 3]) -> Result<()> {
    if !fitting || l3.shape().dims() != l2.shape().dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            l1.shape(),
            l2.shape(),
            l3.shape()
        )
    }
    if keys == 0 {
        candle_core::bail!("attention: no keys to attend to (k {:?})", l2.shape())
    }
    Ok(())
}

struct SdpaTokens {
    scale: f64,
    heads: usize,
    /// The set [`tiled::available`] gave for these heads.
    isa: Isa,
    /// Both products in bf16 where that pays.
    bf16: bool,
}

impl CustomOp3 for SdpaTokens {
    fn name(&self) -> &'static str {
        "attention-tokens"
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
        let [q, k, v] = three_f32(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (b, n, c) = l1.shape().dims3()?;
        let (bk, l, ck) = l2.shape().dims3()?;
        check_shapes((bk, ck) == (b, c), l, [l1, l2, l3])?;
        let mut out = vec![0f32; b * n * c];
        if !out.is_empty() {
            let dims = (b * self.heads, n, l, c / self.heads);
            let scale = self.scale as f32;
            let isa = (self.isa, self.bf16);
            tiled::attention(isa, q, k, v, dims, Some(self.heads), scale, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }

    /// The heads split out and [`Sdpa`]'s backward pass (training: the copies cost
    /// little next to the gradients' products).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [q, k, v, res, grad] = [q, k, v, res, grad].map(|t| split_heads(t, self.heads));
        let (gq, gk, gv) = Sdpa { scale: self.scale }.bwd(&q?, &k?, &v?, &res?, &grad?)?;
        let merge = |g: Option<Tensor>| g.map(|g| merge_heads(&g)).transpose();
        Ok((merge(gq)?, merge(gk)?, merge(gv)?))
    }
}

/// The reference form, from candle's differentiable ops (softmax statistics in f32).
pub fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = softmax_last_dim(&upcast(&scores)?)?.to_dtype(q.dtype())?;
    probs.matmul(v)
}

struct Sdpa {
    scale: f64,
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "attention-blocked"
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
        let [q, k, v] = three_f32(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (b, h, n, d) = l1.shape().dims4()?;
        let (bk, hk, l, dk) = l2.shape().dims4()?;
        check_shapes((bk, hk, dk) == (b, h, d), l, [l1, l2, l3])?;
        let mut out = vec![0f32; b * h * n * d];
        if out.is_empty() {
            // no queries (and no zero-sized chunks below)
            return Ok((CpuStorage::F32(out), Shape::from((b, h, n, d))));
        }
        let scale = self.scale as f32;
        if let Some(isa) = tiled::available(d) {
            tiled::attention(
                (isa, false),
                q,
                k,
                v,
                (b * h, n, l, d),
                None,
                scale,
                &mut out,
            );
            return Ok((CpuStorage::F32(out), Shape::from((b, h, n, d))));
        }
        // one task per (head, block of queries); its output rows are its own
        let tasks: Vec<(usize, usize, &mut [f32])> = out
            .chunks_mut(n * d)
            .enumerate()
            .flat_map(|(bh, head)| {
                head.chunks_mut(QUERIES * d)
                    .enumerate()
                    .map(move |(block, rows)| (bh, block, rows))
            })
            .collect();
        tasks.into_par_iter().for_each(|(bh, block, rows)| {
            let m = rows.len() / d;
            let q = &q[bh * n * d + block * QUERIES * d..][..m * d];
            let (k, v) = (&k[bh * l * d..][..l * d], &v[bh * l * d..][..l * d]);
            let mut scores = vec![0f32; m * l];
            let norms = exp_scores(&mut scores, q, k, (m, l, d), scale);
            // rows (m, d) = probabilities (m, l) v (l, d), then the softmax's normaliser
            matmul_into(rows, &scores, v, (m, l, d), (1, d), 1.0);
            for (row, norm) in rows.chunks_mut(d).zip(&norms) {
                row.iter_mut().for_each(|x| *x *= norm);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, n, d))))
    }

    /// In closed form from the recomputed probabilities P: dv = P^T g,
    /// dS = P (g v^T - rowsum(P g v^T)), dq = scale dS k, dk = scale dS^T q; fused on
    /// the CPU ([`gradients`]), from differentiable ops elsewhere.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = self.scale;
        if !fast_path(&[q, k, v, grad]) {
            let [gq, gk, gv] = plain_gradients([q, k, v], grad, |[q, k, v]| plain(q, k, v, scale))?;
            return Ok((gq, gk, gv));
        }
        let (b, h, n, d) = q.dims4()?;
        let l = k.dim(2)?;
        // copies of the inputs (n x d each) cost nothing next to the n x l products
        let [q, k, v, g] = [q, k, v, grad].map(|t| t.flatten_all()?.to_vec1::<f32>());
        let (gq, gk, gv) = gradients([&q?, &k?, &v?, &g?], (b * h, n, l, d), scale as f32);
        let dev = grad.device();
        Ok((
            Some(Tensor::from_vec(gq, (b, h, n, d), dev)?),
            Some(Tensor::from_vec(gk, (b, h, l, d), dev)?),
            Some(Tensor::from_vec(gv, (b, h, l, d), dev)?),
        ))
    }
}

/// `scores` (m, l) = exp(scale q k^T - each row's max) for q (m, d) and k (l, d) (read
/// transposed through its strides), and each row's softmax normaliser 1 / sum: the
/// forward pass applies it to its output rows, the backward pass to the scores.
fn exp_scores(
    scores: &mut [f32],
    q: &[f32],
    k: &[f32],
    (m, l, d): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    matmul_into(scores, q, k, (m, d, l), (d, 1), scale);
    scores
        .chunks_mut(l)
        .map(|row| 1.0 / exp_normalised(row))
        .collect()
}

/// The backward pass for `heads` heads of q and g (n, d), k and v (l, d): one task
/// per head, walking its queries in blocks of [`QUERIES`] so that P and dS for a block
/// (QUERIES x l each) stay in cache instead of the whole (n x l) matrices of the
/// plain form's ops, each of which was written and read once per op (a third of a
/// prior training step went there). dq is a block's own; dk and dv add up over blocks.
fn gradients(
    [q, k, v, g]: [&[f32]; 4],
    (heads, n, l, d): (usize, usize, usize, usize),
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut gq, mut gk, mut gv) = (
        vec![0f32; heads * n * d],
        vec![0f32; heads * l * d],
        vec![0f32; heads * l * d],
    );
    let qs = q
        .par_chunks(n * d)
        .zip(g.par_chunks(n * d))
        .zip(gq.par_chunks_mut(n * d));
    let kvs = k.par_chunks(l * d).zip(v.par_chunks(l * d));
    let dkv = gk.par_chunks_mut(l * d).zip(gv.par_chunks_mut(l * d));
    qs.zip(kvs)
        .zip(dkv)
        .for_each(|((((q, g), gq), (k, v)), (gk, gv))| {
            let mut probs = vec![0f32; QUERIES.min(n) * l];
            let mut dscores = vec![0f32; QUERIES.min(n) * l];
            let blocks = q
                .chunks(QUERIES * d)
                .zip(g.chunks(QUERIES * d))
                .zip(gq.chunks_mut(QUERIES * d));
            for ((q, g), gq) in blocks {
                let m = q.len() / d;
                let (p, ds) = (&mut probs[..m * l], &mut dscores[..m * l]);
                // P (m, l) = softmax(scale q k^T), as the forward pass has it
                let norms = exp_scores(p, q, k, (m, l, d), scale);
                for (row, norm) in p.chunks_mut(l).zip(norms) {
                    row.iter_mut().for_each(|x| *x *= norm);
                }
                // dP = g v^T, then dS = P (dP - rowsum(P dP)) in place
                matmul_into(ds, g, v, (m, d, l), (d, 1), 1.0);
                for (ds, p) in ds.chunks_mut(l).zip(p.chunks(l)) {
                    let centre = dot(ds, p);
                    ds.iter_mut()
                        .zip(p)
                        .for_each(|(s, &p)| *s = p * (*s - centre));
                }
                matmul_into(gq, ds, k, (m, l, d), (1, d), scale);
                // dk += scale dS^T q and dv += P^T g (from zero), the left operands
                // read transposed
                let none = gemm::Parallelism::None;
                gemm_strided(gk, true, (ds, (l, 1)), (q, (1, d)), (l, m, d), scale, none);
                gemm_strided(gv, true, (p, (l, 1)), (g, (1, d)), (l, m, d), 1.0, none);
            }
        });
    (gq, gk, gv)
}

/// The same on our register tile (AVX-512 or AVX2), transposed so that the queries are the
/// vector lanes: per head and block of 48 queries, scores^T (keys x 48) = k q^T, the
/// softmax down each column (max, exp and sum are then plain vector ops over rows of
/// 48), and out^T (d x 48) = v^T P^T. Neither k (transposed once per head) nor v is
/// repacked per block, where the gemm path packed both for every block of queries.
#[cfg(target_arch = "x86_64")]
mod tiled {
    use super::super::packed_linear::{pair, pair_rows, paired};
    use super::super::tile::{tile_kernel, Start, Tiles};
    use super::super::{with_scratch, SendPtr};
    use super::*;

    /// Queries per task: the tile's 48 vector lanes.
    const LANES: usize = 48;
    /// Keys summed per pass of the second product: a block of P^T (128 x 48 f32, 24
    /// KiB) stays in L1 while v's columns stream past it.
    const KEYS: usize = 128;

    /// The tile [`Isa`] heads of width d run on here, if any: d must be a multiple of
    /// 8 (one tile's rows).
    pub(super) fn available(d: usize) -> Option<Isa> {
        Isa::current().filter(|_| d.is_multiple_of(8))
    }

    /// Where each head's rows lie in a tensor of `len` rows per head: its first
    /// element and the distance between rows. Heads layout (heads, len, d): head after
    /// head; token layout (B, len, H d), `Some(H)`: head h in columns h d of each row.
    fn rows(head: usize, len: usize, d: usize, tokens: Option<usize>) -> (usize, usize) {
        match tokens {
            None => (head * len * d, d),
            Some(h) => ((head / h) * len * h * d + head % h * d, h * d),
        }
    }

    /// `out` from q (n rows a head), k and v (l rows a head), all in the heads layout
    /// (`tokens` None) or all in the token layout of H heads (`Some(H)`); `heads`
    /// counts the heads of all batch entries; d as [`available`] says. On the set
    /// `isa.0`, or with `isa.1` (bf16) on the pair tile where it pays.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        (isa, bf16): (Isa, bool),
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (heads, n, l, d): (usize, usize, usize, usize),
        tokens: Option<usize>,
        scale: f32,
        out: &mut [f32],
    ) {
        let pairs = bf16 && super::super::tile::pairs_pay();
        let tiles = if pairs {
            Tiles::Bf16Pairs
        } else {
            Tiles::F32(isa)
        };
        // k^T per head, keys padded to whole tiles of 8: dim c, key j at c * lp + j;
        // with pairs, word c of key j (dims 2 c, 2 c + 1) at c * lp + j
        let lp = l.div_ceil(8) * 8;
        let dw = if pairs { d / 2 } else { d };
        let mut kt = vec![0f32; heads * dw * lp];
        kt.par_chunks_mut(dw * lp).enumerate().for_each(|(h, kt)| {
            let (first, step) = rows(h, l, d, tokens);
            for j in 0..l {
                let key = &k[first + j * step..][..d];
                if pairs {
                    for (c, word) in paired(key).enumerate() {
                        kt[c * lp + j] = word;
                    }
                } else {
                    for (c, &x) in key.iter().enumerate() {
                        kt[c * lp + j] = x;
                    }
                }
            }
        });
        // with pairs, v per head as words of two keys: keys 2 j, 2 j + 1 (zero past
        // l), dim c at j * d + c; else v is read in place
        let vp: Vec<f32> = if pairs {
            let lw = lp / 2;
            let mut vp = vec![0f32; heads * lw * d];
            vp.par_chunks_mut(lw * d).enumerate().for_each(|(h, vp)| {
                let (first, step) = rows(h, l, d, tokens);
                for (j, words) in vp.chunks_exact_mut(d).take(l.div_ceil(2)).enumerate() {
                    let lo = &v[first + 2 * j * step..][..d];
                    let hi = (2 * j + 1 < l).then(|| &v[first + (2 * j + 1) * step..][..d]);
                    pair_rows(lo, hi, words);
                }
            });
            vp
        } else {
            Vec::new()
        };
        let blocks = n.div_ceil(LANES);
        let dst = SendPtr(out.as_mut_ptr());
        (0..heads * blocks).into_par_iter().for_each(|t| {
            let (h, i0) = (t / blocks, t % blocks * LANES);
            let (q0, q_step) = rows(h, n, d, tokens);
            let (v0, v_step) = rows(h, l, d, tokens);
            let kt = &kt[h * dw * lp..][..dw * lp];
            let v = if pairs {
                (vp[h * (lp / 2) * d..].as_ptr(), d)
            } else {
                (v[v0..].as_ptr(), v_step)
            };
            let at = q0 + i0 * q_step;
            // SAFETY: available() checked the CPU and d; the block's m rows of q and
            // out (m - 1 steps and d past `at`) and v's l rows lie inside the buffers
            // of these dims; the tiles read kt within its padded rows; each task
            // writes only its own rows x d of out.
            unsafe {
                queries(
                    tiles,
                    (q.as_ptr().add(at), q_step),
                    kt,
                    v,
                    (LANES.min(n - i0), l, lp, d),
                    scale,
                    (dst.get().add(at), q_step),
                )
            }
        });
    }

    tile_kernel! { pairs
    /// One head's block of m <= 48 queries (rows of q `q.1` apart) -> out (rows
    /// `out.1` apart), over l keys (v's rows `v.1` apart: rows of keys, or on the
    /// pair tile of words of two keys).
    unsafe fn queries<T>(
        q: (*const f32, usize),
        kt: &[f32],
        v: (*const f32, usize),
        dims: (usize, usize, usize, usize),
        scale: f32,
        out: (*mut f32, usize),
    ) {
        let (m, l, lp, d) = dims;
        // the depth of each product in words of the tile: values, or pairs of them
        let words = |depth: usize| if T::PAIRS { depth.div_ceil(2) } else { depth };
        let paired_len = if T::PAIRS { lp / 2 * LANES } else { 0 };
        with_scratch(d * LANES * 2 + lp * LANES + paired_len, |buf| {
            let (qt, rest) = buf.split_at_mut(d * LANES);
            let (ot, rest) = rest.split_at_mut(d * LANES);
            let (scores, pp) = rest.split_at_mut(lp * LANES);
            // q^T, scaled: dim c, query i at c * 48 + i, zero past the block's queries
            // (with pairs, word c of query i, dims 2 c and 2 c + 1)
            qt.fill(0.0);
            for i in 0..m {
                let row = std::slice::from_raw_parts(q.0.add(i * q.1), d);
                if T::PAIRS {
                    for (c, two) in row.chunks_exact(2).enumerate() {
                        qt[c * LANES + i] = pair(two[0] * scale, two[1] * scale);
                    }
                } else {
                    for (c, &x) in row.iter().enumerate() {
                        qt[c * LANES + i] = x * scale;
                    }
                }
            }
            // scores^T (keys, 48) = k q^T, 8 keys per tile
            for j in (0..l).step_by(8) {
                T::tile::<8, 3>(
                    words(d),
                    kt.as_ptr().add(j),
                    lp,
                    qt.as_ptr(),
                    scores.as_mut_ptr().add(j * LANES),
                    LANES,
                    (8.min(l - j), LANES),
                    Start::Zero,
                );
            }
            // softmax down each column: e^(s - max), and the column sums
            let scores = &mut scores[..l * LANES];
            let mut top = [f32::NEG_INFINITY; LANES];
            for row in scores.chunks_exact(LANES) {
                for (t, &x) in top.iter_mut().zip(row) {
                    *t = t.max(x);
                }
            }
            let mut sums = [0f32; LANES];
            for row in scores.chunks_exact_mut(LANES) {
                for ((x, &t), sum) in row.iter_mut().zip(&top).zip(&mut sums) {
                    *x = exp(*x - t);
                    *sum += *x;
                }
            }
            // with pairs, P^T as words of two keys: keys 2 j, 2 j + 1 (zero past l),
            // query i at j * 48 + i; rounded to bf16 while the sums stay as they were
            if T::PAIRS {
                for (j, words) in pp.chunks_exact_mut(LANES).take(l.div_ceil(2)).enumerate() {
                    let lo = &scores[2 * j * LANES..][..LANES];
                    let hi = (2 * j + 1 < l).then(|| &scores[(2 * j + 1) * LANES..][..LANES]);
                    pair_rows(lo, hi, words);
                }
            }
            let probs = if T::PAIRS { &*pp } else { &*scores };
            // out^T (d, 48) = v^T P^T: 8 dims per tile, keys in blocks
            for k0 in (0..l).step_by(KEYS) {
                let start = if k0 == 0 { Start::Zero } else { Start::Output };
                let at = words(k0);
                for c in (0..d).step_by(8) {
                    T::tile::<8, 3>(
                        words(KEYS.min(l - k0)),
                        v.0.add(at * v.1 + c),
                        v.1,
                        probs.as_ptr().add(at * LANES),
                        ot.as_mut_ptr().add(c * LANES),
                        LANES,
                        (8, LANES),
                        start,
                    );
                }
            }
            for (i, sum) in sums.iter().enumerate().take(m) {
                let norm = 1.0 / sum;
                let row = std::slice::from_raw_parts_mut(out.0.add(i * out.1), d);
                for (c, o) in row.iter_mut().enumerate() {
                    *o = ot[c * LANES + i] * norm;
                }
            }
        })
    }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod tiled {
    use super::Isa;

    pub(super) fn available(_: usize) -> Option<Isa> {
        None
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        _: (Isa, bool),
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: (usize, usize, usize, usize),
        _: Option<usize>,
        _: f32,
        _: &mut [f32],
    ) {
        unreachable!("the tiled attention runs only where available() says yes")
    }
}

/// exp(x - max) in place over a row of scores; returns the sum.
fn exp_normalised(row: &mut [f32]) -> f32 {
    let max = max(row);
    exp_shifted(row, max);
    sum_by(row, |x| x)
}

simd_dispatch! {
    fn exp_shifted(row: &mut [f32], max: f32) {
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
    }
}

/// e^x for x <= 0 (a softmax's shifted scores), vectorisable: x = n ln2 + r with
/// |r| <= ln2 / 2, e^r by its Taylor series to r^6 (relative error < 3e-8, below
/// f32's), and 2^n put straight into the exponent bits. Below -87 (where e^x is
/// subnormal) it returns e^-87 ~ 1.6e-38, nothing next to the row's largest term, 1.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // adding 1.5 * 2^23 rounds to the nearest integer, which then sits in the low
    // mantissa bits: subtracting the constant's bits yields n as an integer with no
    // float-to-int cast (Rust's saturating `as i32` does not vectorise)
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    let two_n = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    f32::from_bits(two_n) * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::packed_linear::pairs_available;
    use crate::kernels::tests::{max_diff, random};
    use crate::kernels::Isa;
    use candle_core::DType;
    use candle_core::Var;

    #[test]
    fn exp_is_accurate_over_a_softmax_range() {
        for i in 0..=100_000 {
            let x = -(i as f32) * 0.00087;
            let (a, b) = (exp(x), (x as f64).exp());
            assert!(((a as f64 - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
        }
        assert!(exp(-200.0) < 2e-38 && exp(-200.0) > 0.0);
    }

    #[test]
    fn equals_the_plain_form() -> Result<()> {
        // several query blocks with a ragged last one, and a key count like Stage B's
        // (image tokens + 77 text tokens); a head width that is not a whole number of
        // tiles (the gemm path), several key blocks of the tiled path
        for (n, l, d) in [
            (300, 377, 16),
            (5, 3, 16),
            (128, 128, 16),
            (50, 70, 12),
            (49, 300, 64),
        ] {
            let q = random(&[2, 3, n, d], 1)?;
            let k = (random(&[2, 3, l, d], 2)? * 4.0)?;
            let v = random(&[2, 3, l, d], 3)?;
            let want = plain(&q, &k, &v, 0.25)?;
            for isa in Isa::supported() {
                let ours = isa.with(|| attention(&q, &k, &v, 0.25))?;
                assert_eq!(ours.dims(), want.dims());
                let diff = max_diff(&ours, &want)?;
                assert!(
                    diff < 2e-6,
                    "{isa:?}, n {n}, l {l}, d {d}: max difference {diff}"
                );
            }
        }
        // no queries: an empty output; no keys: an error, not a panic
        let (q, k) = (random(&[1, 2, 0, 8], 1)?, random(&[1, 2, 5, 8], 2)?);
        assert_eq!(attention(&q, &k, &k, 0.5)?.dims(), &[1, 2, 0, 8]);
        let (q, k) = (random(&[1, 2, 4, 8], 1)?, random(&[1, 2, 0, 8], 2)?);
        assert!(attention(&q, &k, &k, 0.5).is_err());
        Ok(())
    }

    /// The plain form on the heads split out of the token layout, merged back.
    fn plain_tokens(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, s: f64) -> Result<Tensor> {
        let [q, k, v] = [q, k, v].map(|t| split_heads(t, heads));
        merge_heads(&plain(&q?, &k?, &v?, s)?)
    }

    #[test]
    fn the_token_layout_equals_the_heads_split_out() -> Result<()> {
        // the prior's shape in small (image tokens attend over themselves and 77 more),
        // a ragged query block, a head width without a whole tile (the split path)
        for (b, n, l, heads, d) in [(2, 100, 177, 3, 16), (1, 5, 3, 2, 8), (2, 49, 30, 4, 12)] {
            let q = random(&[b, n, heads * d], 1)?;
            let k = (random(&[b, l, heads * d], 2)? * 4.0)?;
            let v = random(&[b, l, heads * d], 3)?;
            let want = plain_tokens(&q, &k, &v, heads, 0.25)?;
            for isa in Isa::supported() {
                let ours = isa.with(|| attention_tokens(&q, &k, &v, heads, 0.25, false))?;
                assert_eq!(ours.dims(), &[b, n, heads * d]);
                let diff = max_diff(&ours, &want)?;
                assert!(
                    diff < 2e-6,
                    "{isa:?}, ({b}, {n}, {l}, {heads}, {d}): max difference {diff}"
                );
            }
            // in bf16, where the pair tile pays: the attention of the rounded q, k, v
            // but for the probabilities' rounding in the second product (at most 2^-8
            // of each, so of the output at most 2^-8 max |v| = 0.002); elsewhere f32's
            let ours = attention_tokens(&q, &k, &v, heads, 0.25, true)?;
            let (want, tolerance) = if pairs_available(true) {
                let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
                let rounded = plain_tokens(&round(&q)?, &round(&k)?, &round(&v)?, heads, 0.25)?;
                (rounded, 2e-3)
            } else {
                (want, 2e-6)
            };
            let diff = max_diff(&ours, &want)?;
            assert!(
                diff < tolerance,
                "bf16, ({b}, {n}, {l}, {heads}, {d}): {diff}"
            );
        }
        let (q, k) = (random(&[1, 4, 12], 1)?, random(&[1, 6, 12], 2)?);
        assert!(
            attention_tokens(&q, &k, &k, 5, 0.5, false).is_err(),
            "12 channels in 5 heads"
        );
        let k0 = random(&[1, 0, 16], 2)?;
        assert!(attention_tokens(&random(&[1, 4, 16], 1)?, &k0, &k0, 2, 0.5, false).is_err());
        assert!(attention_tokens(&q, &random(&[1, 6, 8], 2)?, &k, 2, 0.5, false).is_err());
        Ok(())
    }

    #[test]
    fn token_layout_gradients_equal_the_plain_form() -> Result<()> {
        let (b, n, l, heads, d) = (2, 60, 53, 3, 8);
        let vars: Vec<Var> = [n, l, l]
            .iter()
            .enumerate()
            .map(|(i, &len)| Var::from_tensor(&random(&[b, len, heads * d], 30 + i as u64)?))
            .collect::<Result<_>>()?;
        let probe = random(&[b, n, heads * d], 40)?;
        let [q, k, v] = [&vars[0], &vars[1], &vars[2]].map(|v| v.as_tensor());
        let ours = (attention_tokens(q, k, v, heads, 0.35, false)? * &probe)?
            .sum_all()?
            .backward()?;
        let want = (plain_tokens(q, k, v, heads, 0.35)? * &probe)?
            .sum_all()?
            .backward()?;
        for var in &vars {
            let d = max_diff(ours.get(var).unwrap(), want.get(var).unwrap())?;
            assert!(d < 1e-5, "gradient max difference {d}");
        }
        Ok(())
    }

    #[test]
    fn gradients_equal_the_plain_form() -> Result<()> {
        // self-attention, queries attending to a longer sequence (a caption), and
        // several query blocks (the last one ragged) whose dk and dv add up
        for (queries, keys, d) in [(7, 7, 8), (5, 11, 8), (300, 290, 16), (130, 77, 12)] {
            let vars: Vec<Var> = [queries, keys, keys]
                .iter()
                .enumerate()
                .map(|(i, &n)| Var::from_tensor(&random(&[2, 3, n, d], 10 + i as u64)?))
                .collect::<Result<_>>()?;
            let probe = random(&[2, 3, queries, d], 20)?;
            let [q, k, v] = [&vars[0], &vars[1], &vars[2]].map(|v| v.as_tensor());
            let ours = (attention(q, k, v, 0.35)? * &probe)?
                .sum_all()?
                .backward()?;
            let want = (plain(q, k, v, 0.35)? * &probe)?.sum_all()?.backward()?;
            for var in &vars {
                let d = max_diff(ours.get(var).unwrap(), want.get(var).unwrap())?;
                assert!(d < 1e-5, "({queries}, {keys}): gradient max difference {d}");
            }
        }
        Ok(())
    }
}
