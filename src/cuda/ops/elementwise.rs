//! Launchers for `kernels/elementwise.cu`: residual add, SwiGLU, bias add and bf16 <-> f32
//! conversions; plus the launch geometry shared by the flat and row-wise kernels of
//! `elementwise.cu`, `embedding.cu`, `kv_cache.cu` and `rope.cu`.
//!
//! The kernels choose their 128-bit path themselves (16-byte aligned pointers, and for row-wise
//! kernels a row length that is a multiple of 8) and use grid-stride loops, so any grid is
//! correct; the host mirrors the kernel's condition only to size the grid.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{grid_1d, to_i32, KernelLaunch, Launcher};

const MODULE: &str = "elementwise";

/// Block size of the flat kernels, and the largest block of every kernel launched with the
/// helpers below (they are compiled with `__launch_bounds__(256)`).
pub const BLOCK_THREADS: u32 = 256;

/// bf16 elements per 16-byte vector (the kernels' `x128`).
pub const BF16_VEC: usize = 8;

/// The largest grid.y the driver accepts; the kernels loop over rows beyond it.
pub const MAX_GRID_Y: usize = 65_535;

/// Whether every pointer is 16-byte aligned (the kernels' `is_aligned16`).
pub fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Grid for a flat kernel over `n` elements: one thread per 8-element vector when `vectorised`,
/// per element otherwise, [`BLOCK_THREADS`] per block.
pub fn flat_config(n: usize, vectorised: bool) -> LaunchConfig {
    let items = if vectorised { n.div_ceil(BF16_VEC) } else { n };
    grid_1d(items, BLOCK_THREADS)
}

/// Grid for a row-wise kernel: `rows` rows of `cols` elements; grid.x covers the columns of one
/// row (one thread per 8-element vector when `vectorised`, per element otherwise) with whole
/// warps, at most [`BLOCK_THREADS`] per block; grid.y covers the rows, up to [`MAX_GRID_Y`]
/// (the kernels loop over the rest).
pub fn rows_config(rows: usize, cols: usize, vectorised: bool) -> LaunchConfig {
    let items = if vectorised {
        cols.div_ceil(BF16_VEC)
    } else {
        cols
    };
    let threads = items.next_multiple_of(32).clamp(32, BLOCK_THREADS as usize);
    LaunchConfig {
        grid_dim: (
            items.div_ceil(threads).max(1) as u32,
            rows.clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches one of the flat kernels `(T* a, const U* b, [const V* c,] int n)`.
fn launch_flat(k: &dyn Launcher, kernel: &'static str, ptrs: &[u64], n: usize) -> Result<()> {
    let n_i = to_i32(kernel, "n", n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = flat_config(n, aligned16(ptrs));
    let mut l = KernelLaunch::new(MODULE, kernel, cfg);
    for &p in ptrs {
        l = l.ptr(p);
    }
    let l = l.i32(n_i);
    // SAFETY: every kernel launched here takes its device pointers in the order of `ptrs`
    // followed by `int n`; the caller (the backend) owns buffers of at least n elements of the
    // kernel's types, and the kernel touches no element at or past n.
    unsafe { k.launch(&l) }
}

/// x[i] += y[i] for n bf16 values (the sum is taken in f32 and rounded once).
pub fn residual_add(k: &dyn Launcher, x: u64, y: u64, n: usize) -> Result<()> {
    launch_flat(k, "residual_add", &[x, y], n)
}

/// out = silu(gate) · up = gate / (1 + exp(−gate)) · up, f32 math: out bf16 [n / width, width]
/// from gate_up bf16 [n / width, 2 width], each row gate's then up's (the two projections' one
/// product).
pub fn swiglu_forward(
    k: &dyn Launcher,
    out: u64,
    gate_up: u64,
    n: usize,
    width: usize,
) -> Result<()> {
    const KERNEL: &str = "swiglu_forward";
    let (n_i, width_i) = swiglu_shapes(KERNEL, n, width)?;
    if n == 0 {
        return Ok(());
    }
    let vectorised = width.is_multiple_of(BF16_VEC) && aligned16(&[out, gate_up]);
    let l = KernelLaunch::new(MODULE, KERNEL, flat_config(n, vectorised))
        .ptr(out)
        .ptr(gate_up)
        .i32(n_i)
        .i32(width_i);
    // SAFETY: matches `(bf16* out, const bf16* gate_up, int n, int width)`; the caller owns out of
    // n bf16 and gate_up of 2 n bf16, and width divides n (a grid-stride loop covers any n).
    unsafe { k.launch(&l) }
}

/// SwiGLU's sizes as the kernels' ints: n values in rows of `width` (which must divide n), their
/// gate_up operand 2 n.
fn swiglu_shapes(kernel: &str, n: usize, width: usize) -> Result<(i32, i32)> {
    ensure!(
        width > 0 && n.is_multiple_of(width),
        "{kernel}: {n} values are not rows of {width}"
    );
    to_i32(kernel, "2 n", 2 * n)?;
    Ok((to_i32(kernel, "n", n)?, to_i32(kernel, "width", width)?))
}

/// out[r, c] += bias[c]: out is [m, n] bf16 (rounded once) or f32 when `out_is_f32`; bias is
/// bf16 [n].
pub fn bias_add(
    k: &dyn Launcher,
    out: u64,
    bias: u64,
    m: usize,
    n: usize,
    out_is_f32: bool,
) -> Result<()> {
    ensure!(n > 0, "bias_add: n (the bias length) must be positive");
    let m_i = to_i32("bias_add", "m", m)?;
    let n_i = to_i32("bias_add", "n", n)?;
    if m == 0 {
        return Ok(());
    }
    let kernel = if out_is_f32 {
        "bias_add_f32"
    } else {
        "bias_add_bf16"
    };
    let vectorised = n.is_multiple_of(BF16_VEC) && aligned16(&[out, bias]);
    let cfg = rows_config(m, n, vectorised);
    let l = KernelLaunch::new(MODULE, kernel, cfg)
        .ptr(out)
        .ptr(bias)
        .i32(m_i)
        .i32(n_i);
    // SAFETY: matches `(T* out, const bf16* bias, int m, int n)` with T = f32 or bf16 as chosen
    // above; the caller owns out of m * n elements of that type and bias of n bf16.
    unsafe { k.launch(&l) }
}

/// dst (bf16) = src (f32) rounded to nearest even, n values.
pub fn convert_f32_to_bf16(k: &dyn Launcher, dst: u64, src: u64, n: usize) -> Result<()> {
    launch_flat(k, "convert_f32_to_bf16", &[dst, src], n)
}

/// dst (f32) = src (bf16), exact, n values.
pub fn convert_bf16_to_f32(k: &dyn Launcher, dst: u64, src: u64, n: usize) -> Result<()> {
    launch_flat(k, "convert_bf16_to_f32", &[dst, src], n)
}

/// The gradient of [`swiglu_forward`]: d_gate_up bf16 [n / width, 2 width] (overwritten, laid
/// out as gate_up) from dout bf16 [n / width, width] and gate_up.
pub fn swiglu_backward(
    k: &dyn Launcher,
    d_gate_up: u64,
    dout: u64,
    gate_up: u64,
    n: usize,
    width: usize,
) -> Result<()> {
    const KERNEL: &str = "swiglu_backward";
    let (n_i, width_i) = swiglu_shapes(KERNEL, n, width)?;
    if n == 0 {
        return Ok(());
    }
    let vectorised = width.is_multiple_of(BF16_VEC) && aligned16(&[d_gate_up, dout, gate_up]);
    let l = KernelLaunch::new(MODULE, KERNEL, flat_config(n, vectorised))
        .ptr(d_gate_up)
        .ptr(dout)
        .ptr(gate_up)
        .i32(n_i)
        .i32(width_i);
    // SAFETY: matches `(bf16* d_gate_up, const bf16* dout, const bf16* gate_up, int n, int
    // width)`; the caller owns dout of n bf16 and d_gate_up and gate_up of 2 n bf16, and width
    // divides n (a grid-stride loop covers any n).
    unsafe { k.launch(&l) }
}

/// Rows of dout one thread of `bias_backward_partial` sums (`BIAS_ROWS_PER_THREAD`).
pub const BIAS_ROWS_PER_THREAD: usize = 256;

/// The f32 scratch `bias_backward` needs for m rows of n columns: one partial sum per
/// (chunk of BIAS_ROWS_PER_THREAD rows, column).
pub fn bias_backward_scratch(m: usize, n: usize) -> usize {
    m.div_ceil(BIAS_ROWS_PER_THREAD) * n
}

/// dbias (f32 [n]) += column sums of dout (bf16 [m, n]), in a fixed order: partial sums per
/// chunk of rows into `partials` (f32, [`bias_backward_scratch`] values), then
/// [`add_column_sums`].
pub fn bias_backward(
    k: &dyn Launcher,
    dbias: u64,
    dout: u64,
    m: usize,
    n: usize,
    partials: u64,
) -> Result<()> {
    ensure!(n > 0, "bias_backward: n (the bias length) must be positive");
    let m_i = to_i32("bias_backward", "m", m)?;
    let n_i = to_i32("bias_backward", "n", n)?;
    if m == 0 {
        return Ok(());
    }
    let chunks = m.div_ceil(BIAS_ROWS_PER_THREAD);
    ensure!(
        chunks <= MAX_GRID_Y,
        "bias_backward: m = {m} rows exceed the grid"
    );
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK_THREADS as usize) as u32, chunks as u32, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "bias_backward_partial", cfg)
        .ptr(partials)
        .ptr(dout)
        .i32(m_i)
        .i32(n_i);
    // SAFETY: matches `(float* partials, const bf16* dout, int m, int n)`; one thread per
    // (column, chunk of BIAS_ROWS_PER_THREAD rows), the caller owns dout of m * n bf16 and
    // partials of chunks * n f32.
    unsafe { k.launch(&l) }?;
    add_column_sums(k, dbias, partials, chunks, n)
}

/// `COLUMN_SUM_LANES` in kernels/elementwise.cu: threads that share a column's chunks.
pub const COLUMN_SUM_LANES: u32 = 32;

/// out (f32 [n]) += Σ over chunks of partials (f32 [chunks, n]), in an order that depends on
/// chunks and n only (so a gradient repeats bit for bit).
pub fn add_column_sums(
    k: &dyn Launcher,
    out: u64,
    partials: u64,
    chunks: usize,
    n: usize,
) -> Result<()> {
    let chunks_i = to_i32("add_column_sums", "chunks", chunks)?;
    let n_i = to_i32("add_column_sums", "n", n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(32) as u32, 1, 1),
        block_dim: (32, COLUMN_SUM_LANES, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "add_column_sums", cfg)
        .ptr(out)
        .ptr(partials)
        .i32(chunks_i)
        .i32(n_i);
    // SAFETY: matches `(float* out, const float* partials, int chunks, int n)`; the caller owns
    // out of n f32 and partials of chunks * n f32; a block of (32, COLUMN_SUM_LANES) threads per
    // 32 columns, as the kernel expects.
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_mirrors_the_kernels() {
        assert!(aligned16(&[0x1000, 0x2010]));
        assert!(!aligned16(&[0x1000, 0x2008]));
        assert!(aligned16(&[]));
    }

    #[test]
    fn flat_grid_covers_every_vector_or_element() {
        let c = flat_config(896 * 4, true);
        assert_eq!((c.grid_dim, c.block_dim), ((2, 1, 1), (256, 1, 1)));
        // 9 elements: two vector steps (8 + the tail handled by the scalar loop)
        assert_eq!(flat_config(9, true).grid_dim.0, 1);
        assert_eq!(flat_config(257, false).grid_dim.0, 2);
        assert_eq!(flat_config(0, true).grid_dim.0, 1);
        // the largest n the kernels take still fits a 1-D grid
        let c = flat_config(i32::MAX as usize, false);
        assert_eq!(
            c.grid_dim.0 as usize * 256,
            (i32::MAX as usize).next_multiple_of(256)
        );
    }

    #[test]
    fn row_grid_uses_whole_warps_and_caps_grid_y() {
        let c = rows_config(4, 896, true); // 112 vectors -> 128 threads
        assert_eq!((c.grid_dim, c.block_dim), ((1, 4, 1), (128, 1, 1)));
        let c = rows_config(3, 7, false); // odd row length: scalar, one warp
        assert_eq!((c.grid_dim, c.block_dim), ((1, 3, 1), (32, 1, 1)));
        let c = rows_config(100_000, 151_936, true); // vocab-wide rows
        assert_eq!((c.grid_dim, c.block_dim), ((75, 65_535, 1), (256, 1, 1)));
        assert!(c.grid_dim.0 as usize * 256 * 8 >= 151_936);
        let c = rows_config(1, 5000, false);
        assert_eq!((c.grid_dim, c.block_dim), ((20, 1, 1), (256, 1, 1)));
    }
}
