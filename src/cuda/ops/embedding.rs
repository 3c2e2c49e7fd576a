//! Launchers for `kernels/embedding.cu`: row gathers (embedding lookup, row selection).
//! grid.x covers the columns of a row, grid.y the rows ([`rows_config`]).

use anyhow::{ensure, Context, Result};
use cudarc::driver::PushKernelArg;

use super::elementwise::{aligned16, flat_config, rows_config, BF16_VEC};
use crate::cuda::launch::{to_i32, KernelCtx};

const MODULE: &str = "embedding";

/// Launches `kernel(bf16* out, const bf16* src, const u32* index, int rows, int dim)`.
fn launch_copy_rows(
    k: &KernelCtx,
    kernel: &'static str,
    out: u64,
    src: u64,
    index: u64,
    rows: usize,
    dim: usize,
) -> Result<()> {
    ensure!(dim > 0, "{kernel}: dim must be positive");
    let rows_i = to_i32(kernel, "rows", rows)?;
    let dim_i = to_i32(kernel, "dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    let f = k.function(MODULE, kernel)?;
    let vectorised = dim.is_multiple_of(BF16_VEC) && aligned16(&[out, src]);
    let cfg = rows_config(rows, dim, vectorised);
    let mut b = k.stream.launch_builder(&f);
    b.arg(&out).arg(&src).arg(&index).arg(&rows_i).arg(&dim_i);
    // SAFETY: matches `(bf16* out, const bf16* src, const u32* index, int rows, int dim)`; the
    // caller owns out of rows * dim bf16 and index of rows u32, each index selecting a row of
    // src (validated on the host).
    unsafe { b.launch(cfg) }
        .with_context(|| format!("launching {kernel} (rows {rows}, dim {dim})"))?;
    Ok(())
}

/// out[r, :] = table[ids[r], :].  out: bf16 [m, dim]; table: bf16 [vocab, dim]; ids: u32 [m].
pub fn embedding_forward(
    k: &KernelCtx,
    out: u64,
    table: u64,
    ids: u64,
    m: usize,
    dim: usize,
) -> Result<()> {
    launch_copy_rows(k, "embedding_forward", out, table, ids, m, dim)
}

/// out[r, :] = x[rows[r], :].  out: bf16 [r, dim]; x: bf16 [*, dim]; rows: u32 [r].
pub fn gather_rows(k: &KernelCtx, out: u64, x: u64, rows: u64, r: usize, dim: usize) -> Result<()> {
    launch_copy_rows(k, "gather_rows", out, x, rows, r, dim)
}

/// Launches one of the atomic scatter kernels `(T* dst, const bf16* dout, const u32* index,
/// int m, int dim)`: dst[index[r]] += dout[r].
fn launch_scatter(
    k: &KernelCtx,
    kernel: &'static str,
    dst: u64,
    dout: u64,
    index: u64,
    m: usize,
    dim: usize,
) -> Result<()> {
    let m_i = to_i32(kernel, "m", m)?;
    let dim_i = to_i32(kernel, "dim", dim)?;
    if m == 0 || dim == 0 {
        return Ok(());
    }
    let f = k.function(MODULE, kernel)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(&dst).arg(&dout).arg(&index).arg(&m_i).arg(&dim_i);
    // SAFETY: matches the kernel's `(T* dst, const bf16* dout, const u32* index, int m,
    // int dim)`; the caller owns dout of m * dim bf16 and checked every index against dst's rows.
    unsafe { b.launch(flat_config(m * dim, false)) }
        .with_context(|| format!("launching {kernel} (m {m}, dim {dim})"))?;
    Ok(())
}

/// dtable (f32 [V, dim]) [ids[r]] += dout (bf16 [m, dim]) [r]; ids checked by the caller.
pub fn embedding_backward(
    k: &KernelCtx,
    dtable: u64,
    dout: u64,
    ids: u64,
    m: usize,
    dim: usize,
) -> Result<()> {
    launch_scatter(k, "embedding_backward", dtable, dout, ids, m, dim)
}

/// dx (bf16 [M, dim]) [rows[i]] += dout (bf16 [r, dim]) [i]; rows checked by the caller.
pub fn scatter_add_rows(
    k: &KernelCtx,
    dx: u64,
    dout: u64,
    rows: u64,
    r: usize,
    dim: usize,
) -> Result<()> {
    launch_scatter(k, "scatter_add_rows", dx, dout, rows, r, dim)
}
