//! Launcher for `kernels/rmsnorm.cu`: one thread block per row, about one 16-byte vector per
//! thread.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use super::elementwise::{aligned16, BF16_VEC};
use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

const MODULE: &str = "rmsnorm";

/// Largest block the kernel is compiled for (`__launch_bounds__(1024)`).
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;

/// Threads per block for a one-block-per-row kernel that walks a row of `dim` elements in
/// `vec_width`-element vectors (or one element at a time when `vectorised` is false): about one
/// vector per thread, rounded up to whole warps, between 32 and 1024.
pub fn row_block_size(dim: usize, vec_width: usize, vectorised: bool) -> u32 {
    let work_items = if vectorised {
        dim.div_ceil(vec_width)
    } else {
        dim
    };
    let threads = work_items
        .next_multiple_of(32)
        .clamp(32, MAX_THREADS_PER_BLOCK as usize);
    threads as u32
}

/// out = weight · bf16(x · 1/sqrt(mean(x²) + eps)) for each of `rows` rows of `dim` bf16 values
/// (HF Qwen2/Llama RMSNorm, fp32 statistics); weight is bf16 [dim]. `out` may equal `x`.
/// grid = (rows, 1, 1), block = (row_block_size(dim, 8, vectorised), 1, 1).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    k: &dyn Launcher,
    out: u64,
    x: u64,
    weight: u64,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    launch_forward(k, "rmsnorm_forward", out, x, None, weight, rows, dim, eps)
}

/// x += residual (bf16, rounded once), then `rmsnorm_forward` of x into out; residual is bf16
/// [rows, dim].
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_forward(
    k: &dyn Launcher,
    out: u64,
    x: u64,
    residual: u64,
    weight: u64,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    launch_forward(
        k,
        "add_rmsnorm_forward",
        out,
        x,
        Some(residual),
        weight,
        rows,
        dim,
        eps,
    )
}

#[allow(clippy::too_many_arguments)]
fn launch_forward(
    k: &dyn Launcher,
    kernel: &'static str,
    out: u64,
    x: u64,
    residual: Option<u64>,
    weight: u64,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    ensure!(dim > 0, "{kernel}: dim must be positive");
    ensure!(
        eps.is_finite() && eps >= 0.0,
        "{kernel}: eps = {eps} is not a finite non-negative number"
    );
    let rows_i = to_i32(kernel, "rows", rows)?;
    let dim_i = to_i32(kernel, "dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    // the kernel's 128-bit condition (it decides itself; this only sizes the block)
    let vectorised = dim.is_multiple_of(BF16_VEC)
        && aligned16(&[out, x, weight])
        && residual.is_none_or(|r| aligned16(&[r]));
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_block_size(dim, BF16_VEC, vectorised), 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = KernelLaunch::new(MODULE, kernel, cfg).ptr(out).ptr(x);
    if let Some(r) = residual {
        l = l.ptr(r);
    }
    let l = l.ptr(weight).i32(rows_i).i32(dim_i).f32(eps);
    // SAFETY: matches `(bf16* out, [const] bf16* x, [const bf16* residual,] const bf16* weight,
    // int rows, int dim, float eps)` (the residual argument exactly for add_rmsnorm_forward); the
    // caller owns x, out (and residual) of rows * dim bf16 and weight of dim bf16, and the block
    // is a multiple of 32 threads, at most 1024, as the kernel's reduction requires.
    unsafe { k.launch(&l) }
}

/// Rows one block of `rmsnorm_backward` takes: enough blocks to fill the GPU many times over
/// (about 2048), at most 32 rows each. A function of `rows` alone, so the summation order (and the result) only depends on
/// the input.
pub fn rows_per_block(rows: usize) -> usize {
    rows.div_ceil(2048).clamp(1, 32)
}

/// The f32 scratch `rmsnorm_backward` needs: one dweight partial sum per block of rows.
pub fn rmsnorm_backward_scratch(rows: usize, dim: usize) -> usize {
    rows.div_ceil(rows_per_block(rows)) * dim
}

/// Rows up to this many 16-byte vectors go to `rmsnorm_backward_vec` (a thread per vector).
pub const VEC_KERNEL_MAX_DIM: usize = MAX_THREADS_PER_BLOCK as usize * BF16_VEC;

/// The gradient of [`rmsnorm_forward`]: dx (bf16 [rows, dim], overwritten, or added to when
/// `dx.1`) and dweight (f32 [dim], accumulated in a fixed order through `partials`, f32
/// [`rmsnorm_backward_scratch`]) from dout and x (bf16 [rows, dim]) and weight (bf16 [dim]).
/// grid = (rows / rows_per_block, 1, 1); `rmsnorm_backward_vec` (dim a multiple of 8 up to
/// 8192, 16-byte aligned) with one thread per 16-byte vector, else `rmsnorm_backward` with
/// row_block_size(dim, 1, false) threads and dim f32 of dynamic shared memory; then
/// add_column_sums over the blocks' partial sums.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    k: &dyn Launcher,
    (dx, add_to_dx): (u64, bool),
    dweight: u64,
    dout: u64,
    x: u64,
    weight: u64,
    rows: usize,
    dim: usize,
    eps: f32,
    partials: u64,
) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    /// The scalar kernel's shared dweight sums stay within the default 48 KiB.
    const MAX_DIM: usize = 12 * 1024;
    ensure!(dim > 0, "{OP}: dim must be positive");
    ensure!(dim <= MAX_DIM, "{OP}: dim = {dim} exceeds {MAX_DIM}");
    ensure!(
        eps.is_finite() && eps >= 0.0,
        "{OP}: eps = {eps} is not a finite non-negative number"
    );
    let rows_i = to_i32(OP, "rows", rows)?;
    let dim_i = to_i32(OP, "dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    let per_block = rows_per_block(rows);
    let blocks = rows.div_ceil(per_block);
    let per_block_i = per_block as i32;
    let accumulate = add_to_dx as i32;
    let vectorised = dim.is_multiple_of(BF16_VEC)
        && dim <= VEC_KERNEL_MAX_DIM
        && aligned16(&[dx, dout, x, weight, partials]);
    let (kernel, cfg) = if vectorised {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (row_block_size(dim, BF16_VEC, true), 1, 1),
            shared_mem_bytes: 0,
        };
        ("rmsnorm_backward_vec", cfg)
    } else {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (row_block_size(dim, 1, false), 1, 1),
            shared_mem_bytes: (dim * 4) as u32,
        };
        (OP, cfg)
    };
    let l = KernelLaunch::new(MODULE, kernel, cfg)
        .ptr(dx)
        .ptr(partials)
        .ptr(dout)
        .ptr(x)
        .ptr(weight)
        .i32(rows_i)
        .i32(dim_i)
        .f32(eps)
        .i32(per_block_i)
        .i32(accumulate);
    // SAFETY: both kernels take `(bf16* dx, float* partials, const bf16* dout, const bf16* x,
    // const bf16* weight, int rows, int dim, float eps, int rows_per_block, int accumulate)`;
    // the caller owns
    // buffers of those shapes and partials of blocks * dim f32; the block is whole warps, at most
    // 1024, as the reductions require: one thread per 16-byte vector of a row for the vector
    // kernel (whose conditions were checked above), dim f32 of shared memory for the other.
    unsafe { k.launch(&l) }?;
    super::elementwise::add_column_sums(k, dweight, partials, blocks, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_is_whole_warps_about_one_vector_per_thread() {
        assert_eq!(row_block_size(896, 8, true), 128); // Qwen2.5-0.5B hidden size
        assert_eq!(row_block_size(1536, 8, true), 192); // Qwen2.5-1.5B
        assert_eq!(row_block_size(4096, 8, true), 512);
        assert_eq!(row_block_size(65536, 8, true), 1024);
        assert_eq!(row_block_size(8, 8, true), 32);
        assert_eq!(row_block_size(1, 8, false), 32);
        assert_eq!(row_block_size(7, 8, false), 32);
        assert_eq!(row_block_size(897, 8, false), 928);
        assert_eq!(row_block_size(5000, 8, false), 1024);
    }

    #[test]
    fn block_size_is_a_valid_reduction_block() {
        for dim in [1, 7, 8, 31, 33, 896, 1000, 4097, 100_000] {
            for vectorised in [false, true] {
                let t = row_block_size(dim, BF16_VEC, vectorised);
                assert!(
                    t.is_multiple_of(32) && (32..=MAX_THREADS_PER_BLOCK).contains(&t),
                    "{dim}: {t}"
                );
            }
        }
    }
}
