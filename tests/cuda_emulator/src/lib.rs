//! Runs thinkshort's CUDA kernels (`kernels/*.cu`, compiled as host C++ by build.rs) on the CPU.
//!
//! For the tests only: every emulated GPU thread is a fiber, warp collectives (shuffles, mma,
//! ldmatrix) and `__syncthreads` are barriers, `cp.async` lands as late as the hardware may let
//! it and poisons its destination as early (include/cuda_emulation.h says what is emulated). A
//! test calls a kernel's real source through [`launch`] on small inputs and compares the result
//! with thinkshort's CPU reference: wrong indices, masks, fragment layouts or pipeline steps show
//! on a machine without a GPU. Speed, and races the emulation does not provoke, still need one.
//!
//! Device pointers are host pointers here: bf16 tensors are `u16` slices, `uint4` arrays `u32`
//! slices of 4 × n.

use std::ffi::{c_char, c_int, c_void};

extern "C" {
    fn emu_launch(
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        block_x: u32,
        block_y: u32,
        block_z: u32,
        shared_bytes: usize,
        kernel: extern "C" fn(*mut c_void),
        context: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// Grid, block and dynamic shared memory of one launch, as `cudaLaunchKernel` takes them.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: usize,
}

/// Runs `thread` (which calls one kernel from [`kernels`]) as every thread of `cfg`, block after
/// block. Errors: a deadlock, lanes of a warp at different collectives, a misaligned or
/// out-of-shared-memory ldmatrix or cp.async address, or a bad block size.
pub fn launch<F: Fn()>(cfg: Launch, thread: F) -> Result<(), String> {
    extern "C" fn trampoline<F: Fn()>(context: *mut c_void) {
        // SAFETY: `context` is the `&F` passed below, alive for the whole launch.
        let thread = unsafe { &*(context as *const F) };
        thread();
    }
    let mut error = vec![0u8; 1024];
    // SAFETY: emu_launch calls trampoline::<F> with our context only while it runs; the error
    // buffer's length is passed with it.
    let rc = unsafe {
        emu_launch(
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_bytes,
            trampoline::<F>,
            &thread as *const F as *mut c_void,
            error.as_mut_ptr() as *mut c_char,
            error.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
    Err(String::from_utf8_lossy(&error[..end]).into_owned())
}

/// The kernels' entry points (the `extern "C"` signatures of kernels/*.cu; bf16 = u16).
/// Calling one outside [`launch`] is undefined behaviour.
pub mod kernels {
    macro_rules! flash_kernels {
        ($fwd:ident, $dq:ident, $dkdv:ident) => {
            extern "C" {
                pub fn $fwd(
                    out: *mut u16,
                    lse: *mut f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $dq(
                    dq: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $dkdv(
                    dcache_k: *mut u16,
                    dcache_v: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    key_tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
            }
        };
    }
    flash_kernels!(
        flash_attention_forward_d32,
        flash_attention_backward_dq_d32,
        flash_attention_backward_dkdv_d32
    );
    flash_kernels!(
        flash_attention_forward_d64,
        flash_attention_backward_dq_d64,
        flash_attention_backward_dkdv_d64
    );
    flash_kernels!(
        flash_attention_forward_d128,
        flash_attention_backward_dq_d128,
        flash_attention_backward_dkdv_d128
    );

    extern "C" {
        pub fn flash_attention_backward_dot(
            dsum: *mut f32,
            dout: *const u16,
            out: *const u16,
            rows: i32,
            head_dim: i32,
        );

        pub fn decode_attention(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            head_dim: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_mma_d64(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_mma_d128(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_combine(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *const f32,
            partial_stats: *const f32,
            m: i32,
            n_heads: i32,
            head_dim: i32,
            splits: i32,
        );
    }
}
