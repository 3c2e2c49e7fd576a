//! dst (+)= α · A · B with AVX-512F, for `product_into` on CPUs that have it.
//!
//! A packed GEMM after Goto and BLIS: for each block of KC steps along the inner dimension, B's
//! columns are copied into micro-panels of NR columns laid out step by step, so the kernel reads
//! them sequentially whatever B's strides. A is read in place when its rows or its columns are
//! contiguous (every product the backend makes); otherwise, and for a last partial micro-panel
//! of MR rows, it is copied the same way. The kernel keeps an MR × NR tile of dst in 24
//! registers (12 rows × two 16-lane vectors) and per step loads 2 vectors of B and broadcasts 12
//! values of A for 24 fused multiply-adds. A task takes MC rows (in L2) against a range of B's
//! micro-panels (each in L1 while the rows pass over it). Tasks split dst by rows and columns
//! only, so every element is summed in the same order whatever the number of threads.

use super::product::{check_shapes, Strided};
use rayon::prelude::*;
use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps,
};
use std::ops::Range;

/// Rows and columns of the register tile.
const MR: usize = 12;
const NR: usize = 32;
/// f32 lanes of an AVX-512 register.
const LANES: usize = 16;
/// Steps of the inner dimension per packed block: an A micro-panel (12 KiB) and a B
/// micro-panel (32 KiB) fit the 48 KiB L1 data cache of the Zen 5 core this was tuned on.
const KC: usize = 256;
/// Rows per task: 8 A micro-panels, 96 KiB, stay in L2 while the task walks B.
const MC: usize = 8 * MR;
/// Columns packed at once, bounding the packed B to 4 MiB.
const NC: usize = 4096;
/// Columns per task: up to 8 B micro-panels, fewer when that leaves too few tasks to share.
const TASK_COLS: usize = 8 * NR;
/// Tasks per thread wanted, so that unequal tasks still even out.
const TASKS_PER_THREAD: usize = 4;
/// Panels are packed on the pool when they hold at least this many values; a smaller copy
/// costs less than waking the pool.
const POOL_PACK_VALUES: usize = 1 << 16;

/// Whether this CPU has AVX-512F (detected once, then cached by std).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// dst = α · a · b, or dst += α · a · b when `accumulate`; dst: row-major [a.rows, b.cols].
/// `pool`: spread the tasks over the rayon pool. Panics unless `available()` and the shapes
/// agree (`Strided` has checked that a and b lie inside their slices).
pub fn gemm(dst: &mut [f32], accumulate: bool, alpha: f32, a: Strided, b: Strided, pool: bool) {
    assert!(available(), "gemm_avx512: this CPU lacks AVX-512F");
    check_shapes(dst, a, b);
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let dst = Dst {
        ptr: dst.as_mut_ptr(),
        row_stride: n,
    };
    // A row-major, or the transpose of a row-major matrix (a dW product's doutᵀ): the kernel
    // reads its full micro-panels in place, and only a last partial one is packed. Copying all
    // of A took about as long as the product itself when B has few columns ([6144, 1024] ·
    // [1024, 256]: 240 GFLOP/s with the copy, 460 without).
    let a_in_place = a.col_stride == 1 || a.row_stride == 1;
    let first_packed_panel = if a_in_place { m / MR } else { 0 };
    let packed_panels = m.div_ceil(MR) - first_packed_panel;
    let mut packed_a = vec![0.0f32; packed_panels * MR * KC.min(k)];
    let mut packed_b = vec![0.0f32; n.min(NC).div_ceil(NR) * NR * KC.min(k)];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let load_dst = accumulate || k0 > 0;
        let packed_a = &mut packed_a[..packed_panels * MR * kc];
        pack_panels::<MR>(packed_a, a, first_packed_panel * MR..m, k0, kc, pool);
        for n0 in (0..n).step_by(NC) {
            let nc = NC.min(n - n0);
            let packed_b = &mut packed_b[..nc.div_ceil(NR) * NR * kc];
            pack_panels::<NR>(packed_b, b.t(), n0..n0 + nc, k0, kc, pool);
            let blocks = Blocks {
                a,
                packed_a,
                first_packed_panel,
                packed_b,
                k0,
                kc,
                n0,
                nc,
                alpha,
                load_dst,
            };
            let row_tasks = m.div_ceil(MC);
            let task_cols = if pool {
                columns_per_task(row_tasks, nc, rayon::current_num_threads())
            } else {
                TASK_COLS
            };
            let tasks = row_tasks * nc.div_ceil(task_cols);
            let run = |t: usize| {
                let (rows, cols) = (t % row_tasks, t / row_tasks);
                // SAFETY: the CPU has AVX-512F; the packed buffers hold the block's panels;
                // each task writes only its own rows × columns of dst, which `gemm` borrows
                // mutably for as long as the tasks run.
                unsafe { blocks.task(dst, rows * MC, cols * task_cols, task_cols) }
            };
            if pool {
                (0..tasks).into_par_iter().for_each(run);
            } else {
                (0..tasks).for_each(run);
            }
        }
    }
}

/// The columns per task (whole micro-panels, at most TASK_COLS) that give the threads
/// TASKS_PER_THREAD tasks each, or as many as there are micro-panels.
fn columns_per_task(row_tasks: usize, nc: usize, threads: usize) -> usize {
    let col_tasks = (TASKS_PER_THREAD * threads).div_ceil(row_tasks);
    nc.div_ceil(col_tasks).div_ceil(NR).clamp(1, TASK_COLS / NR) * NR
}

/// dst, shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    row_stride: usize,
}
// SAFETY: every task writes only its own tile, and `gemm` holds the `&mut` while they run.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// One KC block of A (all rows) and of B (columns n0..n0+nc), packed.
struct Blocks<'a> {
    a: Strided<'a>,
    /// A's micro-panels from `first_packed_panel` on: [panel][kc][MR]; those before it are
    /// read in place.
    packed_a: &'a [f32],
    first_packed_panel: usize,
    /// B's micro-panels: [panel][kc][NR].
    packed_b: &'a [f32],
    k0: usize,
    kc: usize,
    n0: usize,
    nc: usize,
    alpha: f32,
    load_dst: bool,
}

impl Blocks<'_> {
    /// dst[row0..row0+MC, n0+col0..n0+col0+cols] (clipped to the matrix). Safety: the
    /// CPU has AVX-512F, dst.ptr is a row-major [a.rows, dst.row_stride] matrix with n0 + nc
    /// ≤ dst.row_stride, and no one else touches that part of it meanwhile.
    #[target_feature(enable = "avx512f")]
    unsafe fn task(&self, dst: Dst, row0: usize, col0: usize, cols: usize) {
        let (m, kc) = (self.a.rows, self.kc);
        let rows_end = (row0 + MC).min(m);
        let cols_end = (col0 + cols).min(self.nc);
        // B micro-panel outside, so it stays in L1 while the A micro-panels (in L2) pass.
        for j in (col0..cols_end).step_by(NR) {
            let b = &self.packed_b[j * kc..(j + NR) * kc];
            for i in (row0..rows_end).step_by(MR) {
                let tile = Tile {
                    ptr: dst.ptr.add(i * dst.row_stride + self.n0 + j),
                    row_stride: dst.row_stride,
                    rows: MR.min(rows_end - i),
                    cols: NR.min(cols_end - j),
                };
                let a = if i / MR < self.first_packed_panel {
                    let (rs, cs) = (self.a.row_stride, self.a.col_stride);
                    let first = &self.a.data[i * rs + self.k0 * cs..];
                    if cs == 1 {
                        RowsOfA::RowMajor(first, rs)
                    } else {
                        RowsOfA::Interleaved(first, cs)
                    }
                } else {
                    let panel = i / MR - self.first_packed_panel;
                    RowsOfA::Interleaved(&self.packed_a[panel * MR * kc..], MR)
                };
                micro_kernel(kc, a, b, tile, self.alpha, self.load_dst);
            }
        }
    }
}

/// The part of dst a micro-kernel writes: `rows` ≤ MR rows of `cols` ≤ NR values.
struct Tile {
    ptr: *mut f32,
    row_stride: usize,
    rows: usize,
    cols: usize,
}

/// MR rows of A over a block's kc steps.
#[derive(Clone, Copy)]
enum RowsOfA<'a> {
    /// Row r's step s at [r + s · step_stride]: a packed micro-panel (step_stride MR), or the
    /// transpose of a row-major matrix.
    Interleaved(&'a [f32], usize),
    /// Row r's step s at [r · row_stride + s].
    RowMajor(&'a [f32], usize),
}

/// tile = α · a · b (+ tile when `load_dst`) for MR rows of A and b, an NR-column micro-panel
/// [kc][NR]. Safety: the CPU has AVX-512F, the tile's rows × columns lie inside dst, and no
/// one else touches them meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn micro_kernel(kc: usize, a: RowsOfA, b: &[f32], tile: Tile, alpha: f32, load_dst: bool) {
    assert!(kc > 0 && b.len() >= kc * NR);
    let acc = match a {
        RowsOfA::Interleaved(a, step_stride) => {
            let need = (kc - 1)
                .checked_mul(step_stride)
                .and_then(|n| n.checked_add(MR));
            assert!(need.is_some_and(|need| a.len() >= need));
            let a = a.as_ptr();
            product_tile(
                kc,
                std::array::from_fn(|r| a.add(r)),
                step_stride,
                b.as_ptr(),
            )
        }
        RowsOfA::RowMajor(a, row_stride) => {
            let need = (MR - 1)
                .checked_mul(row_stride)
                .and_then(|n| n.checked_add(kc));
            assert!(need.is_some_and(|need| a.len() >= need));
            let a = a.as_ptr();
            product_tile(
                kc,
                std::array::from_fn(|r| a.add(r * row_stride)),
                1,
                b.as_ptr(),
            )
        }
    };
    // Lanes past the tile's columns are neither read nor written; a half with no lanes is
    // skipped.
    let masks = [
        lane_mask(tile.cols),
        lane_mask(tile.cols.saturating_sub(LANES)),
    ];
    let alpha = _mm512_set1_ps(alpha);
    for (r, acc) in acc.iter().enumerate() {
        if r < tile.rows {
            let row = tile.ptr.add(r * tile.row_stride);
            for (half, (acc, mask)) in acc.iter().zip(masks).enumerate() {
                if mask == 0 {
                    continue;
                }
                let at = row.add(half * LANES);
                let mut value: __m512 = _mm512_mul_ps(*acc, alpha);
                if load_dst {
                    value = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), value);
                }
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }
}

/// Σ_step a[r][step · step_stride] · b[step][..NR] for the MR rows r, in registers. Inlined
/// into `micro_kernel`, whose AVX-512F target feature its intrinsics compile under.
#[inline(always)]
unsafe fn product_tile(
    kc: usize,
    a: [*const f32; MR],
    step_stride: usize,
    b: *const f32,
) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for step in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(step * NR));
        let b1 = _mm512_loadu_ps(b.add(step * NR + LANES));
        for (acc, a) in acc.iter_mut().zip(&a) {
            let ar = _mm512_set1_ps(*a.add(step * step_stride));
            acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
        }
    }
    acc
}

/// The first min(n, 16) lanes.
fn lane_mask(n: usize) -> __mmask16 {
    if n >= LANES {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// Copies lines (rows of A, or columns of B as rows of Bᵀ) of m, steps k0..k0+kc, into panels
/// of W lines laid out step by step: packed[panel][step][W] = m[lines.start + panel · W + w,
/// k0 + step], lanes past the range's end unwritten.
fn pack_panels<const W: usize>(
    packed: &mut [f32],
    m: Strided,
    lines: Range<usize>,
    k0: usize,
    kc: usize,
    pool: bool,
) {
    assert!(lines.end <= m.rows && k0 + kc <= m.cols);
    assert_eq!(packed.len(), lines.len().div_ceil(W) * W * kc);
    let pack = |(panel, out): (usize, &mut [f32])| {
        let first = lines.start + panel * W;
        let count = W.min(lines.end - first);
        // Lanes past the range's end are left as they are: they only meet dst's rows and
        // columns that the kernel does not store.
        if m.row_stride == 1 {
            // a step's lines are contiguous: copy them step by step
            for (step, out) in out.chunks_exact_mut(W).enumerate() {
                let start = first + (k0 + step) * m.col_stride;
                out[..count].copy_from_slice(&m.data[start..start + count]);
            }
        } else {
            // a line's steps are contiguous (or nothing is): read each line along its steps
            for w in 0..count {
                let line = &m.data[(first + w) * m.row_stride + k0 * m.col_stride..];
                for step in 0..kc {
                    out[step * W + w] = line[step * m.col_stride];
                }
            }
        }
    };
    if pool && packed.len() >= POOL_PACK_VALUES {
        packed.par_chunks_mut(W * kc).enumerate().for_each(pack);
    } else {
        packed.chunks_mut(W * kc).enumerate().for_each(pack);
    }
}
