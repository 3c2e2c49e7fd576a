//! Launchers for `kernels/optimizer.cu`: the fixed-order sum of squares (global gradient norm),
//! the fixed-order column sums (loss statistics) and the fused AdamW step.

use anyhow::{Context, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::cuda::launch::{to_i32, KernelCtx};
use crate::optim::AdamWStep;

const MODULE: &str = "optimizer";

/// The kernels' SUM_SQUARES_BLOCKS: the fixed grid of the first pass, and the number of f64
/// partial sums the caller's scratch must hold.
pub const SUM_SQUARES_BLOCKS: usize = 1024;
pub const SUM_SQUARES_THREADS: u32 = 256;

/// out[0..2] = [hi, lo] of Σ x² over n f32 values, via `partials` (SUM_SQUARES_BLOCKS f64 of
/// scratch, 8-byte aligned).
pub fn sum_squares(k: &KernelCtx, out: u64, x: u64, n: usize, partials: u64) -> Result<()> {
    let n_i = n as i64;
    let partial = k.function(MODULE, "sum_squares_partial")?;
    let cfg = LaunchConfig {
        grid_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
        block_dim: (SUM_SQUARES_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&partial);
    b.arg(&partials).arg(&x).arg(&n_i);
    // SAFETY: matches `(double* partials, const float* x, long long n)`; the caller owns x of n
    // f32 and partials of SUM_SQUARES_BLOCKS f64, one per block of this grid.
    unsafe { b.launch(cfg) }.with_context(|| format!("launching sum_squares_partial (n {n})"))?;

    let last = k.function(MODULE, "sum_squares_final")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&last);
    b.arg(&out).arg(&partials);
    // SAFETY: matches `(float* out, const double* partials)`: out holds 2 f32, partials the
    // SUM_SQUARES_BLOCKS values written above; one thread per partial.
    unsafe { b.launch(cfg) }.context("launching sum_squares_final")?;
    Ok(())
}

/// out (f32 [cols, 2]) = [hi, lo] of each column's f64 sum over x (f32 [rows, cols]).
pub fn column_sums(k: &KernelCtx, out: u64, x: u64, rows: usize, cols: usize) -> Result<()> {
    let rows_i = to_i32("column_sums", "rows", rows)?;
    let cols_i = to_i32("column_sums", "cols", cols)?;
    if cols == 0 {
        return Ok(());
    }
    let f = k.function(MODULE, "column_sums")?;
    let cfg = LaunchConfig {
        grid_dim: (cols as u32, 1, 1),
        block_dim: (SUM_SQUARES_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&f);
    b.arg(&out).arg(&x).arg(&rows_i).arg(&cols_i);
    // SAFETY: matches `(float* out, const float* x, int rows, int cols)`; the caller owns x of
    // rows × cols f32 and out of 2 × cols f32; one block per column.
    unsafe { b.launch(cfg) }.with_context(|| format!("launching column_sums ({rows} × {cols})"))?;
    Ok(())
}

/// One AdamW step over n parameters: master, m, v updated (f32), params = bf16(master).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    k: &KernelCtx,
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
    let f = k.function(MODULE, "adamw_step")?;
    let n_i = n as i64;
    // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
    let blocks = n.div_ceil(256).min(65_536) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&f);
    b.arg(&params)
        .arg(&master)
        .arg(&m)
        .arg(&v)
        .arg(&grads)
        .arg(&n_i);
    b.arg(&s.lr)
        .arg(&s.beta1)
        .arg(&s.beta2)
        .arg(&s.eps)
        .arg(&s.weight_decay);
    b.arg(&s.c1).arg(&s.c2).arg(&s.grad_scale);
    // SAFETY: matches `(bf16* params, float* master, float* m, float* v, const float* grads,
    // long long n, float ×8)`; the caller owns params (n bf16) and the other four (n f32).
    unsafe { b.launch(cfg) }.with_context(|| format!("launching adamw_step (n {n})"))?;
    Ok(())
}
