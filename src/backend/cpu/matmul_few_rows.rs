//! out = x · wᵀ for a few rows of x (a decode step: one row per sequence), with AVX2 and FMA,
//! and 16-lane AVX-512 vectors for the products where the CPU has them.
//!
//! The `gemm` crate packs its operands for every product, which costs more than the product
//! itself when x has 2 to 64 rows (on a 2-core EPYC: [4, 256] · [1024, 256]ᵀ took 60 µs with
//! it, 20 µs here; `bench/results/cpu_decode_2026-11-28.md`). Here each weight row is read once
//! for all rows of x, and the x rows (at most 64 · K floats) stay in cache. With AVX2 a block of
//! 4 weight rows against 2 rows of x keeps 8 vector accumulators in registers (a load feeds 1⅓
//! FMAs). With AVX-512 a tile keeps 16 (16 weight rows × 1 row of x, 8 × 2 or 4 × 4, by the rows
//! of x), sums them in one shuffle tree, and the first tile of each weight block prefetches the
//! next block (decode at batch 4 to 32 ran 1.3–1.7× faster: `bench/results/cpu_exp_2026-11-28.md`).

use rayon::prelude::*;
use std::arch::x86_64::{
    __m256, __m512, __mmask16, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
    _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps, _mm512_add_ps,
    _mm512_fmadd_ps, _mm512_maskz_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
    _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_storeu_ps, _mm512_unpackhi_ps,
    _mm512_unpacklo_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps, _mm_prefetch,
    _mm_shuffle_ps, _MM_HINT_T0,
};
use std::ops::Range;

/// Most rows of x this kernel takes. A decode step of the 10M bench model ran 1.7, 1.3 and
/// 1.1× faster with this kernel (still on 8-lane tiles) than with `product_into`'s AVX-512
/// GEMM at 16, 32 and 64 rows; larger products go to the GEMM.
pub const MAX_ROWS: usize = 64;

/// Weight rows per block of the 8-lane path (its register tile is `W_ROWS` × `X_ROWS`
/// accumulators); the 16-lane path's tiles are `tile16`'s.
const W_ROWS: usize = 4;
const X_ROWS: usize = 2;
/// A multiple of every block's weight rows (the tasks split the columns at whole blocks).
const BLOCK_COLS: usize = 16;
/// f32 lanes of an AVX2 register.
const LANES: usize = 8;
/// Products below this many multiply-adds, of weights below this many values, run on the
/// calling thread: waking the pool costs ~15 µs here, as much as 1M multiply-adds on one core,
/// but weights that are not in cache (a decode step streams all of them) come in faster on all
/// cores.
const SERIAL_MACS: usize = 1 << 20;
const SERIAL_WEIGHTS: usize = 1 << 16;

/// Whether this CPU has the instructions the kernel uses (detected once, then cached by std).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// out[i, j] = x[i, :] · w[j, :]. x: [M, K]; w: [N, K]; out: [M, N]; M ≤ `MAX_ROWS`. Its
/// caller, `matmul_forward`, checks the shapes; here `Rows::new` and `check` bound every access.
/// Panics unless `available()`.
pub(super) fn matmul_few_rows(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert!(
        m <= MAX_ROWS,
        "matmul_few_rows: {m} rows, at most {MAX_ROWS}"
    );
    let (x, w) = (Rows::new(x, m, k, k), Rows::new(w, n, k, k));
    let threads = rayon::current_num_threads();
    if (m * n * k < SERIAL_MACS && n * k < SERIAL_WEIGHTS) || threads == 1 {
        products_of_rows(out, x, w);
        return;
    }
    check(out, x, w);
    let out = OutPtr(out.as_mut_ptr());
    // One task per thread, each a range of output columns (whole weight blocks of any width).
    let per_task = n.div_ceil(threads).div_ceil(BLOCK_COLS) * BLOCK_COLS;
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let cols = t * per_task..((t + 1) * per_task).min(n);
        // SAFETY: the CPU has AVX2 and FMA and the operands fit (`check`); the tasks write
        // disjoint columns of out.
        unsafe { columns(out, x, w, cols) };
    });
}

/// out[i, j] = x row i · w row j for every row of x and of w, on the calling thread.
/// out: [x.rows, w.rows]. Panics unless `available()` and the operands hold their rows.
pub fn products_of_rows(out: &mut [f32], x: Rows, w: Rows) {
    check(out, x, w);
    // SAFETY: as in `check`.
    unsafe { columns(OutPtr(out.as_mut_ptr()), x, w, 0..w.rows) };
}

/// `rows` rows of `len` values in a slice, row r starting at r · stride.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    /// Panics unless data holds every row.
    pub fn new(data: &'a [f32], rows: usize, len: usize, stride: usize) -> Self {
        if rows > 0 {
            let end = (rows - 1)
                .checked_mul(stride)
                .and_then(|start| start.checked_add(len));
            assert!(
                end.is_some_and(|end| end <= data.len()),
                "matmul_few_rows: {rows} rows of {len} at stride {stride} overrun {} values",
                data.len()
            );
        }
        Rows {
            data,
            rows,
            len,
            stride,
        }
    }

    fn row_ptr(&self, r: usize) -> *const f32 {
        self.data[r * self.stride..].as_ptr()
    }
}

/// The kernel's preconditions: the CPU features, equal row lengths, out: [x.rows, w.rows].
fn check(out: &[f32], x: Rows, w: Rows) {
    assert!(available(), "matmul_few_rows: this CPU lacks AVX2 or FMA");
    assert_eq!(
        x.len, w.len,
        "matmul_few_rows: rows of x and w differ in length"
    );
    assert_eq!(
        Some(out.len()),
        x.rows.checked_mul(w.rows),
        "matmul_few_rows: out is not [x rows, w rows]"
    );
}

/// The output buffer, shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own columns, and `matmul_few_rows` holds the `&mut` for
// as long as the tasks run.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// out[:, cols] for all rows of x, with 16-lane vectors where the CPU has AVX-512F. Safety:
/// `check` passed, cols within 0..w.rows and written by no one else meanwhile.
unsafe fn columns(out: OutPtr, x: Rows, w: Rows, cols: Range<usize>) {
    if is_x86_feature_detected!("avx512f") {
        columns_avx512(out, x, w, cols)
    } else {
        columns_avx2(out, x, w, cols)
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2(out: OutPtr, x: Rows, w: Rows, cols: Range<usize>) {
    // One row of x: twice the weight rows per block, for as many independent accumulators.
    if x.rows == 1 {
        columns_in_blocks::<{ 2 * W_ROWS }>(out, x, w, cols)
    } else {
        columns_in_blocks::<W_ROWS>(out, x, w, cols)
    }
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn columns_avx512(out: OutPtr, x: Rows, w: Rows, cols: Range<usize>) {
    // Tiles of 16 accumulators: as many weight rows as the rows of x leave room for.
    match x.rows {
        1 => columns_in_tiles16::<16, 1>(out, x, w, cols),
        2 | 3 => columns_in_tiles16::<8, 2>(out, x, w, cols),
        _ => columns_in_tiles16::<4, 4>(out, x, w, cols),
    }
}

/// `columns` in blocks of R weight rows, each against C rows of x at a time (`tile16`); the
/// rows of x past the last whole C, and the weight rows past the last whole block, one by one.
#[inline(always)]
unsafe fn columns_in_tiles16<const R: usize, const C: usize>(
    out: OutPtr,
    x: Rows,
    w: Rows,
    cols: Range<usize>,
) {
    let mut j = cols.start;
    while j + R <= cols.end {
        let mut i = 0;
        // The first tile of the block fetches the next block's weights into the cache for the
        // tiles after it (they stream from memory: a decode step reads every weight once).
        let next = (j + 2 * R <= cols.end).then(|| w.row_ptr(j + R));
        while i + C <= x.rows {
            tile16::<R, C>(out, x, w, i, j, if i == 0 { next } else { None });
            i += C;
        }
        for i in i..x.rows {
            tile_avx512::<R, 1>(out, x, w, i, j);
        }
        j += R;
    }
    for j in j..cols.end {
        rows_against::<1, true>(out, x, w, j);
    }
}

/// `columns` with blocks of R weight rows, then single rows, in 8-lane tiles.
#[inline(always)]
unsafe fn columns_in_blocks<const R: usize>(out: OutPtr, x: Rows, w: Rows, cols: Range<usize>) {
    let mut j = cols.start;
    while j + R <= cols.end {
        rows_against::<R, false>(out, x, w, j);
        j += R;
    }
    for j in j..cols.end {
        rows_against::<1, false>(out, x, w, j);
    }
}

/// out[:, j..j+R] for all rows of x, X_ROWS rows at a time.
#[inline(always)]
unsafe fn rows_against<const R: usize, const WIDE: bool>(out: OutPtr, x: Rows, w: Rows, j: usize) {
    let mut i = 0;
    while i + X_ROWS <= x.rows {
        tile_of_width::<R, X_ROWS, WIDE>(out, x, w, i, j);
        i += X_ROWS;
    }
    if i < x.rows {
        tile_of_width::<R, 1, WIDE>(out, x, w, i, j);
    }
}

/// `tile_avx512` when WIDE, else `tile`.
#[inline(always)]
unsafe fn tile_of_width<const R: usize, const C: usize, const WIDE: bool>(
    out: OutPtr,
    x: Rows,
    w: Rows,
    i: usize,
    j: usize,
) {
    if WIDE {
        tile_avx512::<R, C>(out, x, w, i, j)
    } else {
        tile::<R, C>(out, x, w, i, j)
    }
}

/// `tile` with 16-lane vectors; the len % 16 tail comes in by masked loads (zeros past it).
#[inline(always)]
unsafe fn tile_avx512<const R: usize, const C: usize>(
    out: OutPtr,
    x: Rows,
    w: Rows,
    i: usize,
    j: usize,
) {
    const WIDE_LANES: usize = 16;
    let x_rows: [*const f32; C] = std::array::from_fn(|c| x.row_ptr(i + c));
    let w_rows: [*const f32; R] = std::array::from_fn(|r| w.row_ptr(j + r));
    let len = x.len;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut step = |p: usize, mask: __mmask16| {
        let xv: [__m512; C] =
            std::array::from_fn(|c| _mm512_maskz_loadu_ps(mask, x_rows[c].add(p)));
        for (acc, row) in acc.iter_mut().zip(&w_rows) {
            let wv = _mm512_maskz_loadu_ps(mask, row.add(p));
            for (acc, xv) in acc.iter_mut().zip(&xv) {
                *acc = _mm512_fmadd_ps(wv, *xv, *acc);
            }
        }
    };
    let mut p = 0;
    while p + WIDE_LANES <= len {
        step(p, u16::MAX);
        p += WIDE_LANES;
    }
    if p < len {
        step(p, (1u16 << (len - p)) - 1);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            *out.0.add((i + c) * w.rows + j + r) = _mm512_reduce_add_ps(*acc);
        }
    }
}

/// `tile_avx512` for R·C = 16 dot products, whose 16 vectors are summed together into one
/// (`sum_lanes_16`: 45 instructions) instead of one by one (about 8 each), which at a decode
/// step's row lengths (K = 256: 16 steps of 1 + (R + C)/16 loads per product) is a large part of
/// the work. `prefetch`: the first weight row of the next block, whose rows are fetched into
/// the cache a line per step.
#[inline(always)]
unsafe fn tile16<const R: usize, const C: usize>(
    out: OutPtr,
    x: Rows,
    w: Rows,
    i: usize,
    j: usize,
    prefetch: Option<*const f32>,
) {
    const WIDE_LANES: usize = 16;
    const { assert!(R * C == WIDE_LANES) };
    let x_rows: [*const f32; C] = std::array::from_fn(|c| x.row_ptr(i + c));
    let w_rows: [*const f32; R] = std::array::from_fn(|r| w.row_ptr(j + r));
    let len = x.len;
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    let mut p = 0;
    while p + WIDE_LANES <= len {
        if let Some(next) = prefetch {
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * w.stride + p) as *const i8);
            }
        }
        tile16_step(&mut acc, &x_rows, &w_rows, p, u16::MAX);
        p += WIDE_LANES;
    }
    if p < len {
        tile16_step(&mut acc, &x_rows, &w_rows, p, (1u16 << (len - p)) - 1);
    }
    // Lane c·R + r: out[i + c, j + r].
    let mut by_lane = [_mm512_setzero_ps(); WIDE_LANES];
    for (lane, v) in by_lane.iter_mut().enumerate() {
        *v = acc[lane / R][lane % R];
    }
    let sums = sum_lanes_16(by_lane);
    let mut lanes = [0.0f32; WIDE_LANES];
    _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
    for (c, row) in lanes.chunks_exact(R).enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), out.0.add((i + c) * w.rows + j), R);
    }
}

/// acc[c][r] += x row c · w row r over the 16 (masked) values from p. No closures around the
/// intrinsics here and in `sum_lanes_16`: a closure does not take its caller's target features,
/// and these were left uninlined, every intrinsic a call (a decode step took 12–17× as long).
#[inline(always)]
unsafe fn tile16_step<const R: usize, const C: usize>(
    acc: &mut [[__m512; R]; C],
    x_rows: &[*const f32; C],
    w_rows: &[*const f32; R],
    p: usize,
    mask: __mmask16,
) {
    let mut xv = [_mm512_setzero_ps(); C];
    for (xv, row) in xv.iter_mut().zip(x_rows) {
        *xv = _mm512_maskz_loadu_ps(mask, row.add(p));
    }
    for (r, row) in w_rows.iter().enumerate() {
        let wv = _mm512_maskz_loadu_ps(mask, row.add(p));
        for (acc, xv) in acc.iter_mut().zip(&xv) {
            acc[r] = _mm512_fmadd_ps(wv, *xv, acc[r]);
        }
    }
}

/// Lane p of the result: the sum of the lanes of v[p]. A tree of 15 adds (and 30 shuffles)
/// instead of 16 reductions of 4 adds each.
#[inline(always)]
unsafe fn sum_lanes_16(v: [__m512; 16]) -> __m512 {
    // The tree leaves its input m's sum in lane 4·(m % 4) + m / 4: it takes v in that order.
    let mut t = [_mm512_setzero_ps(); 16];
    for (m, t) in t.iter_mut().enumerate() {
        *t = v[4 * (m % 4) + m / 4];
    }
    // Pairs: each vector's two 256-bit halves added, the pair's results side by side (128-bit
    // blocks 0, 1: the first vector's 8 partial sums; 2, 3: the second's).
    let mut halves = [_mm512_setzero_ps(); 8];
    for (h, pair) in halves.iter_mut().zip(t.chunks_exact(2)) {
        let lo = _mm512_shuffle_f32x4::<0x44>(pair[0], pair[1]);
        *h = _mm512_add_ps(lo, _mm512_shuffle_f32x4::<0xEE>(pair[0], pair[1]));
    }
    // Fours: 128-bit block l holds 4 partial sums of input 4n + l.
    let mut quarters = [_mm512_setzero_ps(); 4];
    for (q, pair) in quarters.iter_mut().zip(halves.chunks_exact(2)) {
        let even = _mm512_shuffle_f32x4::<0x88>(pair[0], pair[1]);
        *q = _mm512_add_ps(even, _mm512_shuffle_f32x4::<0xDD>(pair[0], pair[1]));
    }
    // Within each 128-bit block l: lane k of it = the sum of quarters[k]'s 4 values there.
    let ab = _mm512_add_ps(
        _mm512_unpacklo_ps(quarters[0], quarters[1]),
        _mm512_unpackhi_ps(quarters[0], quarters[1]),
    );
    let cd = _mm512_add_ps(
        _mm512_unpacklo_ps(quarters[2], quarters[3]),
        _mm512_unpackhi_ps(quarters[2], quarters[3]),
    );
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(ab, cd),
        _mm512_shuffle_ps::<0xEE>(ab, cd),
    )
}

/// out[i..i+C, j..j+R] = x rows i..i+C · w rows j..j+Rᵀ: R·C dot products, LANES wide in
/// registers, then the len % LANES tail in scalars.
#[inline(always)]
unsafe fn tile<const R: usize, const C: usize>(out: OutPtr, x: Rows, w: Rows, i: usize, j: usize) {
    let x_rows: [*const f32; C] = std::array::from_fn(|c| x.row_ptr(i + c));
    let w_rows: [*const f32; R] = std::array::from_fn(|r| w.row_ptr(j + r));
    let len = x.len;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut p = 0;
    while p + LANES <= len {
        let mut xv = [_mm256_setzero_ps(); C];
        for (xv, row) in xv.iter_mut().zip(&x_rows) {
            *xv = _mm256_loadu_ps(row.add(p));
        }
        for (acc, row) in acc.iter_mut().zip(&w_rows) {
            let wv = _mm256_loadu_ps(row.add(p));
            for (acc, xv) in acc.iter_mut().zip(&xv) {
                *acc = _mm256_fmadd_ps(wv, *xv, *acc);
            }
        }
        p += LANES;
    }
    for (r, (acc, w_row)) in acc.iter().zip(&w_rows).enumerate() {
        for (c, (acc, x_row)) in acc.iter().zip(&x_rows).enumerate() {
            let mut sum = horizontal_sum(*acc);
            for q in p..len {
                sum += *w_row.add(q) * *x_row.add(q);
            }
            *out.0.add((i + c) * w.rows + j + r) = sum;
        }
    }
}

/// out[c, :] += Σ_j p[c, j] · v row j, for the few rows c of p (a decode step's probabilities
/// times the values): 4 vectors of each of 2 output rows stay in registers over all j.
/// p: [C, J] as rows of J; v: J rows of D; out: [C, D]. Panics unless `available()` and the
/// shapes hold.
pub fn accumulate_weighted_rows(out: &mut [f32], p: Rows, v: Rows) {
    assert!(available(), "matmul_few_rows: this CPU lacks AVX2 or FMA");
    assert_eq!(
        p.len, v.rows,
        "accumulate_weighted_rows: p's rows are not one weight per v row"
    );
    assert_eq!(
        Some(out.len()),
        p.rows.checked_mul(v.len),
        "accumulate_weighted_rows: out is not [p rows, v row length]"
    );
    // SAFETY: the CPU has AVX2 and FMA; out, p and v hold the rows asserted above.
    unsafe { weighted_rows(out, p, v) }
}

/// Vectors of each output row kept in registers by `weighted_rows` (with 2 rows: 8 of 16).
const OUT_VECTORS: usize = 4;

#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_rows(out: &mut [f32], p: Rows, v: Rows) {
    let d = v.len;
    let mut c = 0;
    while c + X_ROWS <= p.rows {
        weighted_tile::<X_ROWS>(out, p, v, c);
        c += X_ROWS;
    }
    if c < p.rows {
        weighted_tile::<1>(out, p, v, c);
    }
    // The row tail past the last whole vector, in scalars.
    let done = d / LANES * LANES;
    if done == d {
        return;
    }
    for (c, out) in out.chunks_exact_mut(d).enumerate() {
        for j in 0..v.rows {
            let weight = *p.row_ptr(c).add(j);
            let v_row = v.row_ptr(j);
            for (e, out) in out.iter_mut().enumerate().skip(done) {
                *out += weight * *v_row.add(e);
            }
        }
    }
}

/// Output rows c..c+C over the whole vectors of the row, OUT_VECTORS at a time, then one.
#[inline(always)]
unsafe fn weighted_tile<const C: usize>(out: &mut [f32], p: Rows, v: Rows, c: usize) {
    let d = v.len;
    let base = out.as_mut_ptr();
    let out_rows: [*mut f32; C] = std::array::from_fn(|r| base.add((c + r) * d));
    let p_rows: [*const f32; C] = std::array::from_fn(|r| p.row_ptr(c + r));
    let mut e = 0;
    while e + OUT_VECTORS * LANES <= d {
        weighted_block::<C, OUT_VECTORS>(out_rows, p_rows, v, e);
        e += OUT_VECTORS * LANES;
    }
    while e + LANES <= d {
        weighted_block::<C, 1>(out_rows, p_rows, v, e);
        e += LANES;
    }
}

/// out rows [.., e..e + V·LANES] += Σ_j p[row, j] · v row j [e..e + V·LANES].
#[inline(always)]
unsafe fn weighted_block<const C: usize, const V: usize>(
    out_rows: [*mut f32; C],
    p_rows: [*const f32; C],
    v: Rows,
    e: usize,
) {
    let mut acc: [[__m256; V]; C] = std::array::from_fn(|c| {
        std::array::from_fn(|k| _mm256_loadu_ps(out_rows[c].add(e + k * LANES)))
    });
    for j in 0..v.rows {
        let v_row = v.row_ptr(j).add(e);
        let vv: [__m256; V] = std::array::from_fn(|k| _mm256_loadu_ps(v_row.add(k * LANES)));
        for (acc, p_row) in acc.iter_mut().zip(&p_rows) {
            let weight = _mm256_set1_ps(*p_row.add(j));
            for (acc, vv) in acc.iter_mut().zip(&vv) {
                *acc = _mm256_fmadd_ps(weight, *vv, *acc);
            }
        }
    }
    for (acc, out_row) in acc.iter().zip(&out_rows) {
        for (k, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out_row.add(e + k * LANES), *acc);
        }
    }
}

/// The sum of the 8 lanes of v.
#[inline(always)]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x · wᵀ in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Philox::new(seed, 0);
        (0..len)
            .map(|_| rng.next_uniform() as f32 * 2.0 - 1.0)
            .collect()
    }

    /// Each width of tile this CPU can run, on all of x's rows and w's rows.
    fn products_by_each_width(out: &mut [f32], x: Rows, w: Rows) -> Vec<(&'static str, Vec<f32>)> {
        check(out, x, w);
        let mut by_width = Vec::new();
        for (name, wide) in [("AVX2", false), ("AVX-512", true)] {
            if wide && !is_x86_feature_detected!("avx512f") {
                continue;
            }
            out.fill(f32::NAN);
            let ptr = OutPtr(out.as_mut_ptr());
            // SAFETY: `check` passed and the CPU has the width's features.
            unsafe {
                if wide {
                    columns_avx512(ptr, x, w, 0..w.rows)
                } else {
                    columns_avx2(ptr, x, w, 0..w.rows)
                }
            }
            by_width.push((name, out.to_vec()));
        }
        by_width
    }

    #[test]
    fn both_tile_widths_match_a_float64_product_for_every_tile_and_tail() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        // K: below 8, 8 + a tail, 16 + a tail, whole 16-lane vectors, many + a tail
        // 16-accumulator tiles: 16 × 1 (M = 1), 8 × 2 (M = 2, 3), 4 × 4 (M ≥ 4), with row and
        // column tails.
        let cases = [
            (1, 5, 9),
            (3, 13, 10),
            (2, 19, 5),
            (1, 32, 17),
            (5, 300, 9),
            (1, 40, 50),
            (2, 16, 24),
            (6, 41, 37),
            (17, 70, 35),
        ];
        for (case, &(m, k, n)) in cases.iter().enumerate() {
            let (x, w) = (values(m * k, case as u64), values(n * k, 50 + case as u64));
            let want = reference(&x, &w, m, k, n);
            let mut out = vec![0.0; m * n];
            let (xr, wr) = (Rows::new(&x, m, k, k), Rows::new(&w, n, k, k));
            for (width, got) in products_by_each_width(&mut out, xr, wr) {
                for (idx, (got, want)) in got.iter().zip(&want).enumerate() {
                    let tol = 4.0 * f32::EPSILON as f64 * k as f64;
                    assert!(
                        (*got as f64 - want).abs() <= tol,
                        "{width} m {m} k {k} n {n}: out[{idx}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// A row's products are the same bits whatever rows of x come with it (generation is batch
    /// invariant because of it): rows that fall in a 16-accumulator tile, summed by
    /// `sum_lanes_16`, and rows left over, summed by `_mm512_reduce_add_ps`, must add the lanes
    /// in the same order.
    #[test]
    fn each_rows_products_are_the_same_bits_at_every_row_count() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        // N: two whole 16-row weight blocks and a tail; K: whole vectors and a tail.
        let (k, n, most_rows) = (70, 37, 9);
        let x = values(most_rows * k, 3);
        let w = values(n * k, 4);
        let wr = Rows::new(&w, n, k, k);
        let mut alone = vec![0.0; n];
        let by_width_alone: Vec<_> = (0..most_rows)
            .map(|i| products_by_each_width(&mut alone, Rows::new(&x[i * k..], 1, k, k), wr))
            .collect();
        for m in 2..=most_rows {
            let mut out = vec![0.0; m * n];
            let by_width = products_by_each_width(&mut out, Rows::new(&x, m, k, k), wr);
            for (width, (name, got)) in by_width.iter().enumerate() {
                for (i, row) in got.chunks_exact(n).enumerate() {
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    let want = &by_width_alone[i][width].1;
                    assert_eq!(bits(row), bits(want), "{name}: row {i} of {m}");
                }
            }
        }
    }

    #[test]
    fn sum_lanes_16_puts_each_vectors_sum_in_its_lane() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F");
            return;
        }
        // Vector p's lanes: p · 1000 + lane² (exact in f32, distinct sums).
        let lanes: Vec<[f32; 16]> = (0..16)
            .map(|p| std::array::from_fn(|l| (p * 1000 + l * l) as f32))
            .collect();
        let mut got = [0.0f32; 16];
        // SAFETY: the CPU has AVX-512F; each load reads 16 floats of a [f32; 16].
        unsafe {
            let v = std::array::from_fn(|p| std::arch::x86_64::_mm512_loadu_ps(lanes[p].as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), sum_lanes_16(v));
        }
        let want: Vec<f32> = lanes.iter().map(|v| v.iter().sum()).collect();
        assert_eq!(got.to_vec(), want);
    }

    /// Every tile shape and tail: odd M (a 1-row tile), N not a multiple of 4 (1-column
    /// tiles), K not a multiple of 8 (the scalar tail) and K < 8 (only the tail); sizes on both
    /// sides of the serial threshold, so several column ranges run in parallel.
    #[test]
    fn matches_a_float64_product_for_every_tile_and_tail() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        let cases = [
            (1, 8, 4),
            (1, 19, 21),   // one row of x: 8-row weight blocks, then single rows
            (1, 256, 300), // the same over several tasks (≥ 64K weights)
            (2, 5, 3),
            (3, 19, 13),
            (7, 64, 33),
            (64, 128, 130),
            (33, 256, 1022),
            (64, 300, 257),
        ];
        for (case, &(m, k, n)) in cases.iter().enumerate() {
            let x = values(m * k, case as u64);
            let w = values(n * k, 100 + case as u64);
            let mut out = vec![f32::NAN; m * n];
            matmul_few_rows(&mut out, &x, &w, m, k, n);
            let want = reference(&x, &w, m, k, n);
            for (idx, (got, want)) in out.iter().zip(&want).enumerate() {
                // f32 rounding of a K-term sum of products of values in [-1, 1].
                let tol = 4.0 * f32::EPSILON as f64 * k as f64;
                assert!(
                    (*got as f64 - want).abs() <= tol,
                    "m {m} k {k} n {n}: out[{idx}] = {got}, want {want}"
                );
            }
        }
    }

    /// Rows read at a stride past their length (a head's columns of the KV cache), for
    /// `products_of_rows` and `accumulate_weighted_rows`, against float64.
    #[test]
    fn strided_rows_match_float64_products() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        // (rows of x or p, rows of w or v, row length, stride of the w or v rows)
        for (case, &(c, j, d, stride)) in [
            (1, 5, 8, 16),
            (3, 9, 13, 20),
            (7, 33, 44, 45),
            (3, 9, 51, 60),
            (2, 4, 5, 5),
        ]
        .iter()
        .enumerate()
        {
            let seed = 10 * case as u64;
            let x = values(c * d, seed);
            let w = values((j - 1) * stride + d, seed + 1);
            let w_row = |r: usize, e: usize| w[r * stride + e] as f64;

            let mut scores = vec![f32::NAN; c * j];
            products_of_rows(
                &mut scores,
                Rows::new(&x, c, d, d),
                Rows::new(&w, j, d, stride),
            );
            for r in 0..c {
                for q in 0..j {
                    let want: f64 = (0..d).map(|e| x[r * d + e] as f64 * w_row(q, e)).sum();
                    let got = scores[r * j + q] as f64;
                    assert!(
                        (got - want).abs() <= 4.0 * f32::EPSILON as f64 * d as f64,
                        "products c {c} j {j} d {d}: [{r}, {q}] = {got}, want {want}"
                    );
                }
            }

            // out [c, d] starts non-zero: the weighted rows are added to it.
            let p = values(c * j, seed + 2);
            let start = values(c * d, seed + 3);
            let mut out = start.clone();
            accumulate_weighted_rows(
                &mut out,
                Rows::new(&p, c, j, j),
                Rows::new(&w, j, d, stride),
            );
            for r in 0..c {
                for e in 0..d {
                    let want = start[r * d + e] as f64
                        + (0..j)
                            .map(|q| p[r * j + q] as f64 * w_row(q, e))
                            .sum::<f64>();
                    let got = out[r * d + e] as f64;
                    assert!(
                        (got - want).abs() <= 4.0 * f32::EPSILON as f64 * (j + 1) as f64,
                        "weighted rows c {c} j {j} d {d}: [{r}, {e}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// Shapes whose sizes wrap around in usize are refused, not written past the buffer.
    #[test]
    #[should_panic(expected = "out is not [M, N]")]
    fn a_shape_whose_size_overflows_is_refused() {
        crate::backend::cpu::matmul_forward(&mut [], &[], &[], None, 2, 0, 1 << 63);
    }

    #[test]
    #[should_panic(expected = "overrun")]
    fn rows_past_the_end_of_their_slice_are_refused() {
        Rows::new(&[0.0; 20], 3, 8, 8);
    }
}
