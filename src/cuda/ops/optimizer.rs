//! Launchers for `kernels/optimizer.cu`: the fixed-order sum of squares (global gradient norm),
//! the fixed-order column sums (loss statistics) and the fused AdamW step.

use anyhow::Result;
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};
use crate::optim::AdamWStep;

const MODULE: &str = "optimizer";

/// The kernels' SUM_SQUARES_BLOCKS: the fixed grid of the first pass, and the number of f64
/// partial sums the caller's scratch must hold.
pub const SUM_SQUARES_BLOCKS: usize = 1024;
pub const SUM_SQUARES_THREADS: u32 = 256;

/// out[0..2] = [hi, lo] of Σ x² over n f32 values, via `partials` (SUM_SQUARES_BLOCKS f64 of
/// scratch, 8-byte aligned).
pub fn sum_squares(k: &dyn Launcher, out: u64, x: u64, n: usize, partials: u64) -> Result<()> {
    let n_i = n as i64;
    let cfg = LaunchConfig {
        grid_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
        block_dim: (SUM_SQUARES_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "sum_squares_partial", cfg)
        .ptr(partials)
        .ptr(x)
        .i64(n_i);
    // SAFETY: matches `(double* partials, const float* x, long long n)`; the caller owns x of n
    // f32 and partials of SUM_SQUARES_BLOCKS f64, one per block of this grid.
    unsafe { k.launch(&l) }?;

    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "sum_squares_final", cfg)
        .ptr(out)
        .ptr(partials);
    // SAFETY: matches `(float* out, const double* partials)`: out holds 2 f32, partials the
    // SUM_SQUARES_BLOCKS values written above; one thread per partial.
    unsafe { k.launch(&l) }
}

/// out (f32 [cols, 2]) = [hi, lo] of each column's f64 sum over x (f32 [rows, cols]).
pub fn column_sums(k: &dyn Launcher, out: u64, x: u64, rows: usize, cols: usize) -> Result<()> {
    let rows_i = to_i32("column_sums", "rows", rows)?;
    let cols_i = to_i32("column_sums", "cols", cols)?;
    if cols == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (cols as u32, 1, 1),
        block_dim: (SUM_SQUARES_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "column_sums", cfg)
        .ptr(out)
        .ptr(x)
        .i32(rows_i)
        .i32(cols_i);
    // SAFETY: matches `(float* out, const float* x, int rows, int cols)`; the caller owns x of
    // rows × cols f32 and out of 2 × cols f32; one block per column.
    unsafe { k.launch(&l) }
}

/// One AdamW step over n parameters: master, m, v updated (f32), params = bf16(master).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    k: &dyn Launcher,
    params: u64,
    master: u64,
    m: u64,
    v: u64,
    grads: u64,
    n: usize,
    s: &AdamWStep,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
    let blocks = n.div_ceil(256).min(65_536) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "adamw_step", cfg)
        .ptr(params)
        .ptr(master)
        .ptr(m)
        .ptr(v)
        .ptr(grads)
        .i64(n_i)
        .f32(s.lr)
        .f32(s.beta1)
        .f32(s.beta2)
        .f32(s.eps)
        .f32(s.weight_decay)
        .f32(s.c1)
        .f32(s.c2)
        .f32(s.grad_scale);
    // SAFETY: matches `(bf16* params, float* master, float* m, float* v, const float* grads,
    // long long n, float ×8)`; the caller owns params (n bf16) and the other four (n f32).
    unsafe { k.launch(&l) }
}
