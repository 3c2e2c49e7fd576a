//! Runs thinkshort's CUDA kernels (`kernels/*.cu`, compiled as host C++ by build.rs) on the CPU.
//!
//! For the tests only: every emulated GPU thread is a fiber, warp collectives (shuffles, mma,
//! ldmatrix) and `__syncthreads` are barriers, `cp.async` lands as late as the hardware may let
//! it and poisons its destination as early (include/cuda_emulation.h says what is emulated). A
//! test calls a kernel's real source through [`launch`] on small inputs and compares the result
//! with thinkshort's CPU reference: wrong indices, masks, fragment layouts or pipeline steps show
//! on a machine without a GPU. Speed, and races the emulation does not provoke, still need one.
//!
//! The kernels' `extern "C"` entry points are in the library this crate links; a test declares
//! the ones it calls with their signatures from kernels/*.cu (bf16 as `u16`, `uint4` as 4 × `u32`,
//! pointers are host pointers) and calls them only inside [`launch`].

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

/// Runs `thread` (which calls one kernel entry point) as every thread of `cfg`, block after
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
