//! Runs thinkshort's CUDA kernels (`kernels/*.cu`, compiled as host C++ by build.rs) on the CPU.
//!
//! For the tests only: every emulated GPU thread is a fiber, warp collectives (shuffles, mma,
//! ldmatrix) and `__syncthreads` are barriers, `cp.async` lands as late as the hardware may let
//! it and poisons its destination as early (include/cuda_emulation.h says what is emulated). A
//! test calls a kernel's real source through [`launch`] on small inputs and compares the result
//! with thinkshort's CPU reference: wrong indices, masks, fragment layouts or pipeline steps show
//! on a machine without a GPU. Speed, and races the emulation does not provoke, still need one.
//!
//! Two ways in: [`launch_kernel`] runs a launch described as data (module, kernel name, grid and
//! argument values: what thinkshort's launchers produce, so a test runs the launchers themselves
//! with host pointers as device pointers); the kernel is looked up among every entry point of
//! kernels/*.cu and the arguments are checked against its parameters. Or a test declares the
//! `extern "C"` entry points it calls with their signatures from kernels/*.cu (bf16 as `u16`,
//! `uint4` as 4 × `u32`, pointers are host pointers) and calls them only inside [`launch`].

use std::ffi::{c_char, c_int, c_void};

extern "C" {
    fn emu_launch_kernel(
        module: *const c_char,
        name: *const c_char,
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        block_x: u32,
        block_y: u32,
        block_z: u32,
        shared_bytes: usize,
        kinds: *const u32,
        bits: *const u64,
        n_args: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
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

/// One argument value, of the kind of the kernel's parameter (include/kernel_registry.h).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A host address standing for a device pointer.
    Pointer(u64),
    Int32(i32),
    Int64(i64),
    Float32(f32),
    Float64(f64),
}

impl Arg {
    /// (kind, bits) as emu_launch_kernel takes them.
    fn encode(self) -> (u32, u64) {
        match self {
            Arg::Pointer(p) => (0, p),
            Arg::Int32(v) => (1, v as u32 as u64),
            Arg::Int64(v) => (2, v as u64),
            Arg::Float32(v) => (3, v.to_bits() as u64),
            Arg::Float64(v) => (4, v.to_bits()),
        }
    }
}

/// Runs the kernel `name` of kernels/`module`.cu on `args` as every thread of `cfg`. Errors: no
/// such kernel, arguments that do not match its parameters in number or kind, or any error of
/// [`launch`].
///
/// # Safety
/// Every pointer argument is a host buffer large enough for what the kernel touches.
pub unsafe fn launch_kernel(
    module: &str,
    name: &str,
    cfg: Launch,
    args: &[Arg],
) -> Result<(), String> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| format!("a NUL in {s:?}"));
    let (module, name) = (c(module)?, c(name)?);
    let (kinds, bits): (Vec<u32>, Vec<u64>) = args.iter().map(|a| a.encode()).unzip();
    // SAFETY: the strings are NUL-terminated, kinds and bits hold args.len() values, the error
    // buffer's length is passed with it; the pointers' validity is the caller's contract.
    with_error_buffer(|error, error_len| unsafe {
        emu_launch_kernel(
            module.as_ptr(),
            name.as_ptr(),
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_bytes,
            kinds.as_ptr(),
            bits.as_ptr(),
            args.len(),
            error,
            error_len,
        )
    })
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
    // SAFETY: emu_launch calls trampoline::<F> with our context only while it runs; the error
    // buffer's length is passed with it.
    with_error_buffer(|error, error_len| unsafe {
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
            error,
            error_len,
        )
    })
}

/// Calls `launch` (one of the emulator's entry points) with a buffer for its error message; its
/// status 0 is Ok, anything else the message.
fn with_error_buffer(launch: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut error = vec![0u8; 1024];
    if launch(error.as_mut_ptr() as *mut c_char, error.len()) == 0 {
        return Ok(());
    }
    let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
    Err(String::from_utf8_lossy(&error[..end]).into_owned())
}
