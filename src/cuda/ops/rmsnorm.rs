//! Launchers for the kernels in `kernels/*.cu`. Each takes the stream, the loaded module (see
//! [`super::load_kernel_module`]) and device buffers (`CudaSlice`, `CudaView` or `CudaViewMut`),
//! checks sizes on the host, and launches with a grid/block configuration that matches the
//! kernel's own comment. Launches are asynchronous; errors of the launch itself are returned.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{
    CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;

/// Module (kernel file stem) holding the RMSNorm kernels.
pub const RMSNORM_MODULE: &str = "rmsnorm";

/// Largest block the kernels are compiled for (`__launch_bounds__(1024)`).
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

/// Mirrors the kernel's test for its 128-bit path: dim a multiple of the vector width and every
/// pointer 16-byte aligned.
fn vector_path(dim: usize, vec_width: usize, ptrs: &[u64]) -> bool {
    dim.is_multiple_of(vec_width) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

fn check_rmsnorm_shapes(
    out_len: usize,
    x_len: usize,
    weight_len: usize,
    rows: usize,
    dim: usize,
) -> Result<(i32, i32)> {
    ensure!(dim > 0, "rmsnorm_forward: dim must be positive");
    let n = rows
        .checked_mul(dim)
        .context("rmsnorm_forward: rows * dim overflows")?;
    ensure!(
        x_len >= n,
        "rmsnorm_forward: x has {x_len} elements, rows * dim = {rows} * {dim} = {n}"
    );
    ensure!(
        out_len >= n,
        "rmsnorm_forward: out has {out_len} elements, rows * dim = {rows} * {dim} = {n}"
    );
    ensure!(
        weight_len >= dim,
        "rmsnorm_forward: weight has {weight_len} elements, dim = {dim}"
    );
    let (Ok(rows), Ok(dim)) = (i32::try_from(rows), i32::try_from(dim)) else {
        bail!("rmsnorm_forward: rows ({rows}) or dim ({dim}) exceeds i32::MAX");
    };
    Ok((rows, dim))
}

/// Shared launch path of the bf16 and f32 RMSNorm kernels (`kernels/rmsnorm.cu`):
/// grid = (rows, 1, 1), block = (row_block_size(dim, 16 / size_of::<T>()), 1, 1), no dynamic
/// shared memory.
#[allow(clippy::too_many_arguments)]
fn launch_rmsnorm<T>(
    kernel: &str,
    stream: &Arc<CudaStream>,
    module: &Arc<CudaModule>,
    out: &mut impl DevicePtrMut<T>,
    x: &impl DevicePtr<T>,
    weight: &impl DevicePtr<T>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let (rows_i, dim_i) = check_rmsnorm_shapes(out.len(), x.len(), weight.len(), rows, dim)?;
    if rows == 0 {
        return Ok(());
    }
    let func = module
        .load_function(kernel)
        .with_context(|| format!("CUDA kernel {kernel} not found in module"))?;
    // The guards returned with the raw pointers record the reads/writes on `stream` when dropped,
    // which must happen after the launch is queued: keep them alive until the end of the function.
    let (x_ptr, _x_guard) = x.device_ptr(stream);
    let (w_ptr, _w_guard) = weight.device_ptr(stream);
    let (out_ptr, _out_guard) = out.device_ptr_mut(stream);

    let vec_width = 16 / std::mem::size_of::<T>();
    let threads = row_block_size(
        dim,
        vec_width,
        vector_path(dim, vec_width, &[out_ptr, x_ptr, w_ptr]),
    );
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };

    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&out_ptr)
        .arg(&x_ptr)
        .arg(&w_ptr)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&eps);
    // SAFETY: the argument list matches the kernel signature
    // (T* out, const T* x, const T* weight, int rows, int dim, float eps), and the buffer sizes
    // were checked above against rows * dim and dim.
    unsafe { launch.launch(cfg) }
        .with_context(|| format!("launching {kernel} (rows {rows}, dim {dim})"))?;
    Ok(())
}

/// out = weight * bf16(x * rsqrt(mean(x^2) + eps)) for each of `rows` rows of `dim` bf16 values
/// (HF Qwen2/Llama RMSNorm, fp32 statistics). `out` may be the same buffer as `x` only through
/// raw pointers; with cudarc's borrow rules pass distinct buffers.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    stream: &Arc<CudaStream>,
    module: &Arc<CudaModule>,
    out: &mut impl DevicePtrMut<bf16>,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    launch_rmsnorm(
        "rmsnorm_forward",
        stream,
        module,
        out,
        x,
        weight,
        rows,
        dim,
        eps,
    )
}

/// The f32 variant of [`rmsnorm_forward`] (same semantics as the CPU reference): for self-checks.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_f32(
    stream: &Arc<CudaStream>,
    module: &Arc<CudaModule>,
    out: &mut impl DevicePtrMut<f32>,
    x: &impl DevicePtr<f32>,
    weight: &impl DevicePtr<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    launch_rmsnorm(
        "rmsnorm_forward_f32",
        stream,
        module,
        out,
        x,
        weight,
        rows,
        dim,
        eps,
    )
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
        assert_eq!(row_block_size(897, 8, false), 928);
        assert_eq!(row_block_size(5000, 8, false), 1024);
        assert_eq!(row_block_size(100, 4, false), 128);
    }

    #[test]
    fn vector_path_matches_the_kernel_condition() {
        assert!(vector_path(896, 8, &[0x1000, 0x2000, 0x3010]));
        assert!(!vector_path(897, 8, &[0x1000, 0x2000, 0x3000]));
        assert!(!vector_path(896, 8, &[0x1000, 0x2008, 0x3000]));
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(check_rmsnorm_shapes(8, 8, 4, 2, 4).unwrap(), (2, 4));
        assert!(check_rmsnorm_shapes(8, 7, 4, 2, 4).is_err());
        assert!(check_rmsnorm_shapes(7, 8, 4, 2, 4).is_err());
        assert!(check_rmsnorm_shapes(8, 8, 3, 2, 4).is_err());
        assert!(check_rmsnorm_shapes(8, 8, 4, 2, 0).is_err());
        assert!(check_rmsnorm_shapes(usize::MAX, usize::MAX, 4, usize::MAX, 4).is_err());
        assert!(check_rmsnorm_shapes(0, 0, 4, 0, 4).is_ok());
    }
}
