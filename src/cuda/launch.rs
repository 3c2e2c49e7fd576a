//! Loading the embedded kernel modules and launching kernels on the one compute stream.
//!
//! Every launcher in `ops/` takes a [`Launcher`] and raw device pointers (`u64`, CUdeviceptr), and
//! describes each launch as data ([`KernelLaunch`]: module, kernel, grid and arguments). The CUDA
//! backend's [`KernelCtx`] runs it with cudarc; the tests' emulator (tests/cuda_emulator) runs the
//! same description on the CPU, checking the arguments against the kernel's parameter types. The
//! backend owns its buffers and runs everything on a single stream, so ordering is the stream's
//! order and cudarc's per-buffer event tracking is not needed (it is switched off).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use cudarc::driver::result as drv;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

/// One argument of a kernel launch, typed as the kernel's parameter (`u64` device pointers for
/// every pointer type).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
}

/// One launch of `function` from `kernels/<module>.cu`, its arguments in parameter order.
#[derive(Debug, Clone)]
pub struct KernelLaunch {
    pub module: &'static str,
    pub function: &'static str,
    pub config: LaunchConfig,
    pub args: Vec<KernelArg>,
}

impl KernelLaunch {
    pub fn new(module: &'static str, function: &'static str, config: LaunchConfig) -> Self {
        KernelLaunch {
            module,
            function,
            config,
            args: Vec::new(),
        }
    }
    pub fn ptr(mut self, device_pointer: u64) -> Self {
        self.args.push(KernelArg::Ptr(device_pointer));
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.args.push(KernelArg::I32(v));
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.args.push(KernelArg::I64(v));
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.args.push(KernelArg::U64(v));
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.args.push(KernelArg::F32(v));
        self
    }
    pub fn f64(mut self, v: f64) -> Self {
        self.args.push(KernelArg::F64(v));
        self
    }
}

/// Where the launchers' kernels run: the GPU stream ([`KernelCtx`]) or the tests' emulator.
pub trait Launcher {
    /// Runs `l` (asynchronously on a GPU, in order with every earlier launch and fill).
    ///
    /// # Safety
    /// `l.args` match the kernel's parameters in order and type, and every pointer is a buffer of
    /// the device this launcher runs on, large enough for what the kernel touches with `l.config`.
    unsafe fn launch(&self, l: &KernelLaunch) -> Result<()>;

    /// Sets `bytes` bytes from `ptr` to zero, in order with the launches.
    ///
    /// # Safety
    /// `ptr` is a buffer of this launcher's device of at least `bytes` bytes.
    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> Result<()>;

    /// Looks up (and so loads) kernel `function` of `kernels/<module>.cu` ahead of its first
    /// launch: a kernel first launched while a CUDA graph is being recorded must not be loaded
    /// then (CUDA loads kernels lazily by default).
    fn prepare(&self, _module: &'static str, _function: &'static str) -> Result<()> {
        Ok(())
    }
}

/// The stream plus every embedded kernel module, loaded once; functions are looked up by name
/// and cached.
pub struct KernelCtx {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// Each function's dynamic shared-memory limit: 48 KiB less its static shared memory until
    /// raised.
    shared_mem: Mutex<HashMap<(&'static str, &'static str), u32>>,
}

impl KernelCtx {
    /// Loads every fatbin that build.rs embedded into `ctx`.
    pub fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let mut modules = HashMap::new();
        for name in super::kernel_names() {
            modules.insert(name, super::load_kernel_module(&ctx, name)?);
        }
        Ok(KernelCtx {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            shared_mem: Mutex::new(HashMap::new()),
        })
    }

    /// The kernel `function` of `kernels/<module>.cu`.
    pub fn function(&self, module: &'static str, function: &'static str) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| anyhow!("kernel cache poisoned"))?;
        if let Some(f) = cache.get(&(module, function)) {
            return Ok(f.clone());
        }
        let m = self.modules.get(module).ok_or_else(|| {
            anyhow!("no CUDA kernel module {module:?} in this binary (kernels/{module}.cu)")
        })?;
        let f = m
            .load_function(function)
            .with_context(|| format!("CUDA kernel {function} not found in kernels/{module}.cu"))?;
        cache.insert((module, function), f.clone());
        Ok(f)
    }
}

impl KernelCtx {
    /// `function`, allowed to use `bytes` of dynamic shared memory. Where static and dynamic
    /// shared memory together pass 48 KiB a kernel must opt in
    /// (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); the attribute is raised once per
    /// function to the largest size asked for so far.
    pub fn function_with_shared_mem(
        &self,
        module: &'static str,
        function: &'static str,
        bytes: u32,
    ) -> Result<CudaFunction> {
        const DEFAULT_TOTAL: u32 = 48 * 1024;
        let f = self.function(module, function)?;
        if bytes > 0 {
            let mut raised = self
                .shared_mem
                .lock()
                .map_err(|_| anyhow!("kernel cache poisoned"))?;
            let current = match raised.entry((module, function)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let static_bytes = f.shared_size_bytes().with_context(|| {
                        format!("{function}: reading its static shared memory size")
                    })?;
                    e.insert(DEFAULT_TOTAL.saturating_sub(static_bytes.max(0) as u32))
                }
            };
            if bytes > *current {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .with_context(|| {
                    format!("{function}: allowing {bytes} bytes of shared memory (device limit?)")
                })?;
                *current = bytes;
            }
        }
        Ok(f)
    }
}

impl Launcher for KernelCtx {
    unsafe fn launch(&self, l: &KernelLaunch) -> Result<()> {
        let f = self.function_with_shared_mem(l.module, l.function, l.config.shared_mem_bytes)?;
        let mut b = self.stream.launch_builder(&f);
        for a in &l.args {
            match a {
                KernelArg::Ptr(v) | KernelArg::U64(v) => b.arg(v),
                KernelArg::I32(v) => b.arg(v),
                KernelArg::I64(v) => b.arg(v),
                KernelArg::F32(v) => b.arg(v),
                KernelArg::F64(v) => b.arg(v),
            };
        }
        let c = &l.config;
        // SAFETY: the caller's contract (Launcher::launch).
        unsafe { b.launch(l.config) }.with_context(|| {
            format!(
                "launching {} (grid {:?}, block {:?}, {} bytes of shared memory)",
                l.function, c.grid_dim, c.block_dim, c.shared_mem_bytes
            )
        })?;
        Ok(())
    }

    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract (Launcher::fill_zero).
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .context("cuMemsetD8Async")
    }

    fn prepare(&self, module: &'static str, function: &'static str) -> Result<()> {
        self.function(module, function).map(drop)
    }
}

/// A 1-D launch of `n` work items, `threads` per block.
pub fn grid_1d(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).max(1) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `value` as the `int` a kernel takes, or an error naming the op and the size.
pub fn to_i32(op: &str, what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| anyhow!("{op}: {what} = {value} exceeds i32::MAX"))
}
