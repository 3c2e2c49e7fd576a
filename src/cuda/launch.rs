//! Loading the embedded kernel modules and launching kernels on the one compute stream.
//!
//! Every launcher in `ops/` takes a [`KernelCtx`] and raw device pointers (`u64`, CUdeviceptr):
//! the CUDA backend owns its buffers and runs everything on a single stream, so ordering is the
//! stream's order and cudarc's per-buffer event tracking is not needed (it is switched off).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};

/// The stream plus every embedded kernel module, loaded once; functions are looked up by name
/// and cached.
pub struct KernelCtx {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// The dynamic shared-memory limit each function has been raised to.
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
    /// `function`, allowed to use `bytes` of dynamic shared memory. Above 48 KiB a kernel must
    /// opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); the attribute is raised once
    /// per function to the largest size asked for so far.
    pub fn function_with_shared_mem(
        &self,
        module: &'static str,
        function: &'static str,
        bytes: u32,
    ) -> Result<CudaFunction> {
        const DEFAULT_LIMIT: u32 = 48 * 1024;
        let f = self.function(module, function)?;
        if bytes > DEFAULT_LIMIT {
            let mut raised = self
                .shared_mem
                .lock()
                .map_err(|_| anyhow!("kernel cache poisoned"))?;
            let current = raised.entry((module, function)).or_insert(DEFAULT_LIMIT);
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
