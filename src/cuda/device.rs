//! What the CUDA backend needs of a device: memory, copies, kernel launches (through
//! [`Launcher`]), GEMMs, waiting for the work queued so far, timing marks, and recording queued
//! work as a graph that one launch replays.
//!
//! [`CudaDevice`] is one GPU through the CUDA driver and cuBLAS, with everything in order on one
//! stream. The tests implement [`Device`] on the CPU (tests/emulation_support: kernels run by
//! tests/cuda_emulator, device memory is host memory), so the whole `CudaBackend` (shape checks,
//! views, kernel choice, scratch, index caches, decode-step recordings) runs without a GPU.

use std::any::Any;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream,
    DevicePtr,
};

use super::backend::DType;
use super::launch::{KernelCtx, KernelLaunch, Launcher};
use crate::backend::{MemoryPeaks, OutOfDeviceMemory};

/// Device memory, freed (in the order of the device's work) when dropped.
pub trait DeviceMemory: Send + Sync {
    /// Its address on the device (at least 16-byte aligned; cuMemAllocAsync gives 256).
    fn ptr(&self) -> u64;
}

/// Queued work recorded once, replayed with one launch.
pub trait DeviceGraph {
    /// Queues the recorded work again.
    fn launch(&self) -> Result<()>;
}

/// A point in the device's queued work, for timing the work between two of them.
pub struct TimingMark(pub Box<dyn Any + Send>);

/// Column-major C[m, n] = op(A)[m, k] · op(B)[k, n] + beta · C, A and B bf16 with leading
/// dimensions lda and ldb (op transposes where `trans_a` / `trans_b` say), C bf16 or f32 with
/// ldc, f32 accumulation; with beta = 0, C is only written. cuBLAS GemmEx's contract.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub beta: f32,
    pub c: u64,
    pub c_dtype: DType,
    pub ldc: usize,
}

/// A device the CUDA backend runs on. Work is queued in order: every launch, fill, copy and
/// GEMM sees the results of those queued before it.
pub trait Device: Launcher + Send + Sync {
    /// `bytes` of uninitialised memory (at least 1 byte is allocated). A device without room
    /// for them fails with [`OutOfDeviceMemory`] (and stays usable).
    fn alloc(&self, bytes: usize) -> Result<Arc<dyn DeviceMemory>>;

    /// Waits for the queued work, then gives the memory of freed buffers that the device keeps
    /// for reuse back to the system (CUDA: trims the stream-ordered pool), so that an allocation
    /// those cached pieces could not serve may succeed.
    fn release_cached_memory(&self) -> Result<()>;

    /// Copies `src` to `dst` in order with the queued work; `src` may change once this returns
    /// (CUDA stages an asynchronous copy from pageable memory before returning, by its API
    /// synchronisation rules).
    ///
    /// # Safety
    /// `dst` is this device's memory of at least `src.len()` bytes.
    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()>;

    /// Waits for the queued work, then copies `dst.len()` bytes from `src`.
    ///
    /// # Safety
    /// `src` is this device's memory of at least `dst.len()` bytes.
    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<()>;

    /// Queues a copy of `bytes` bytes from `src` to `dst` (not overlapping).
    ///
    /// # Safety
    /// Both are this device's memory of at least `bytes` bytes.
    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;

    /// Queues `g`.
    ///
    /// # Safety
    /// A, B and C are this device's memory holding what `g`'s sizes and leading dimensions say.
    unsafe fn gemm(&self, g: &Gemm) -> Result<()>;

    /// Waits for every queued piece of work; an error of any of them comes back here.
    fn synchronize(&self) -> Result<()>;

    /// (free, total) bytes of device memory.
    fn memory_info(&self) -> Result<(usize, usize)>;

    /// The most bytes allocated at once and the most the device held for allocations (cached
    /// freed memory included), since it was opened.
    fn memory_peaks(&self) -> Result<MemoryPeaks>;

    /// Streaming multiprocessors: how many blocks fill the device.
    fn multiprocessors(&self) -> usize;

    /// A mark after the work queued so far.
    fn timing_mark(&self) -> Result<TimingMark>;

    /// Seconds of device work between two marks of this device (the later one waited for).
    fn seconds_between(&self, start: &TimingMark, end: &TimingMark) -> Result<f64>;

    /// From now on, queued launches, fills, copies on the device and GEMMs are recorded instead
    /// of run, until [`Device::end_recording`].
    fn begin_recording(&self) -> Result<()>;

    /// Stops recording; the graph of what was recorded (None: nothing was).
    fn end_recording(&self) -> Result<Option<Box<dyn DeviceGraph>>>;

    /// Whether work is being recorded.
    fn recording(&self) -> Result<bool>;

    /// An error the device kept from work that could not be queued while recording (taken, so
    /// that ending the recording is not refused because of it).
    fn take_deferred_error(&self) -> Option<String>;
}

/// One GPU: its context, the stream all work goes to, the kernel modules and cuBLAS.
pub struct CudaDevice {
    k: KernelCtx,
    blas: CudaBlas,
    /// cuBLAS's workspace, given to it once (so a GEMM recorded in a CUDA graph uses the same
    /// memory, and the same algorithms, as one run op by op). Dropped after the handle.
    _blas_workspace: Option<CudaSlice<u8>>,
    sm_count: usize,
}

/// A buffer of the stream-ordered pool.
struct PoolMemory {
    _mem: CudaSlice<u8>, // freed in stream order when dropped
    ptr: u64,
}

impl DeviceMemory for PoolMemory {
    fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl DeviceGraph for CudaGraph {
    fn launch(&self) -> Result<()> {
        CudaGraph::launch(self).map_err(|e| anyhow!("cuGraphLaunch: {e:?}"))
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: its context, a stream, cuBLAS on that stream and every embedded
    /// kernel module. The caller has checked that the driver, the device, cuBLAS and the kernels
    /// are there.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        // One stream orders everything; per-buffer events would only cost time.
        // SAFETY: every piece of work of this device runs on `stream`, and buffers are freed on it.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory_cached(&ctx)?;
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        let blas = CudaBlas::new(stream.clone()).context("creating the cuBLAS handle")?;
        // Without it cuBLAS manages its own workspace (also under capture, since CUDA 12.2).
        let blas_workspace = set_blas_workspace(&blas, &stream)
            .map_err(|e| eprintln!("note: cuBLAS keeps its own workspace ({e:#})"))
            .ok();
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("reading the multiprocessor count")?
            .max(1) as usize;
        Ok(CudaDevice {
            k: KernelCtx::new(ctx, stream)?,
            blas,
            _blas_workspace: blas_workspace,
            sm_count,
        })
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.k.stream
    }
}

impl Launcher for CudaDevice {
    unsafe fn launch(&self, l: &KernelLaunch) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.k.launch(l) }
    }

    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.k.fill_zero(ptr, bytes) }
    }

    fn prepare(&self, module: &'static str, function: &'static str) -> Result<()> {
        self.k.prepare(module, function)
    }
}

impl Device for CudaDevice {
    fn alloc(&self, bytes: usize) -> Result<Arc<dyn DeviceMemory>> {
        // SAFETY: the memory is written before any read: the backend's contract for `empty`.
        let mem = match unsafe { self.stream().alloc::<u8>(bytes.max(1)) } {
            Ok(mem) => mem,
            Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                return Err(OutOfDeviceMemory { bytes }.into())
            }
            Err(e) => return Err(anyhow!("cuMemAllocAsync of {bytes} bytes: {e:?}")),
        };
        let (ptr, _) = mem.device_ptr(self.stream());
        Ok(Arc::new(PoolMemory { _mem: mem, ptr }))
    }

    fn release_cached_memory(&self) -> Result<()> {
        self.synchronize()?;
        trim_pool(&self.k.ctx)?;
        // the memory of recorded decode steps' allocations that no live graph uses
        // SAFETY: a plain driver call on this context's device.
        unsafe { drv_sys::cuDeviceGraphMemTrim(self.k.ctx.cu_device()) }
            .result()
            .context("cuDeviceGraphMemTrim")
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.k.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract. The copy is from pageable memory, so the driver has
        // staged `src` before returning.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream().cu_stream()) }
            .context("copying to the GPU")
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.k.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract; the copy is waited for below.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream().cu_stream()) }
            .context("copying from the GPU")?;
        self.stream()
            .synchronize()
            .context("waiting for the copy from the GPU")
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream().cu_stream()) }
            .context("cuMemcpyDtoDAsync")
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        let int = |what, v: usize| super::launch::to_i32("gemm", what, v);
        let (m, n, k) = (int("m", g.m)?, int("n", g.n)?, int("k", g.k)?);
        let (lda, ldb, ldc) = (
            int("lda", g.lda.max(1))?,
            int("ldb", g.ldb.max(1))?,
            int("ldc", g.ldc.max(1))?,
        );
        let trans = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let c_type = match g.c_dtype {
            DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            DType::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
        };
        let alpha = 1.0f32;
        self.k.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract for A, B and C; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires; the handle is bound to this device's stream.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                trans(g.trans_a),
                trans(g.trans_b),
                m,
                n,
                k,
                (&alpha) as *const f32 as *const _,
                g.a as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                lda,
                g.b as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ldb,
                (&g.beta) as *const f32 as *const _,
                g.c as *mut _,
                c_type,
                ldc,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx: {e:?}"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream()
            .synchronize()
            .context("CUDA stream synchronize (an earlier kernel failed)")
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        self.k.ctx.mem_get_info().context("cuMemGetInfo")
    }

    fn memory_peaks(&self) -> Result<MemoryPeaks> {
        use drv_sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as RESERVED, CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED,
        };
        let pool = default_pool(&self.k.ctx)?;
        let high = |attribute, name| {
            let mut value: u64 = 0;
            // SAFETY: a plain driver call on this context's pool; both attributes are cuuint64_t.
            unsafe {
                drv_sys::cuMemPoolGetAttribute(pool, attribute, (&mut value) as *mut u64 as *mut _)
            }
            .result()
            .with_context(|| format!("cuMemPoolGetAttribute({name})"))?;
            Ok::<_, anyhow::Error>(value as usize)
        };
        Ok(MemoryPeaks {
            used: high(USED, "USED_MEM_HIGH")?,
            reserved: high(RESERVED, "RESERVED_MEM_HIGH")?,
        })
    }

    fn multiprocessors(&self) -> usize {
        self.sm_count
    }

    fn timing_mark(&self) -> Result<TimingMark> {
        let event = self
            .stream()
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .context("recording a timing event")?;
        Ok(TimingMark(Box::new(event)))
    }

    fn seconds_between(&self, start: &TimingMark, end: &TimingMark) -> Result<f64> {
        fn event(m: &TimingMark) -> Result<&CudaEvent> {
            m.0.downcast_ref::<CudaEvent>()
                .ok_or_else(|| anyhow!("a timing mark of another device"))
        }
        let ms = event(start)?
            .elapsed_ms(event(end)?)
            .context("reading a timing event")?;
        Ok(ms as f64 / 1e3)
    }

    fn begin_recording(&self) -> Result<()> {
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("cuStreamBeginCapture: {e:?}"))
    }

    fn end_recording(&self) -> Result<Option<Box<dyn DeviceGraph>>> {
        let graph = self
            .stream()
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| anyhow!("cuStreamEndCapture / cuGraphInstantiate: {e:?}"))?;
        Ok(graph.map(|g| Box::new(g) as Box<dyn DeviceGraph>))
    }

    fn recording(&self) -> Result<bool> {
        let status = self
            .stream()
            .capture_status()
            .context("querying the stream's capture status")?;
        Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn take_deferred_error(&self) -> Option<String> {
        self.k.ctx.check_err().err().map(|e| format!("{e:?}"))
    }
}

/// cuBLAS's workspace: 32 MiB, what its documentation recommends for Hopper.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Gives the cuBLAS handle a workspace of its own for every later call on `stream`.
fn set_blas_workspace(blas: &CudaBlas, stream: &Arc<CudaStream>) -> Result<CudaSlice<u8>> {
    let workspace = stream
        .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
        .context("allocating cuBLAS's workspace")?;
    let (ptr, _) = workspace.device_ptr(stream);
    // SAFETY: the handle is valid and runs on `stream`; the workspace lives as long as the
    // device, which owns both (dropped after the handle: field order).
    let status = unsafe {
        blas_sys::cublasSetWorkspace_v2(
            *blas.handle(),
            ptr as *mut std::ffi::c_void,
            BLAS_WORKSPACE_BYTES,
        )
    };
    if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cublasSetWorkspace: {status:?}");
    }
    Ok(workspace)
}

/// Makes the device's stream-ordered memory pool keep freed blocks instead of returning them to
/// the system at every synchronisation (its default threshold is 0): buffers of a repeated step
/// then come from the pool, and a steady-state forward or training step does not call the
/// system allocator. An allocation that fails gives the kept memory back (`trim_pool`) before it
/// is tried again (`CudaBackend`).
fn keep_freed_memory_cached(ctx: &Arc<CudaContext>) -> Result<()> {
    let pool = default_pool(ctx)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: a plain driver call on this context's pool with a valid value pointer.
    unsafe {
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut _,
        )
    }
    .result()
    .context("cuMemPoolSetAttribute(RELEASE_THRESHOLD)")
}

/// The stream-ordered pool that `alloc` draws from (the device's default pool).
fn default_pool(ctx: &Arc<CudaContext>) -> Result<drv_sys::CUmemoryPool> {
    ctx.bind_to_thread()?;
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on this context's device with a valid out-pointer.
    unsafe { drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .context("cuDeviceGetDefaultMemPool")?;
    Ok(pool)
}

/// Returns every piece of the pool that no live buffer uses to the system. The pool keeps the
/// memory of freed buffers (`keep_freed_memory_cached`) in pieces shaped by earlier work, which a
/// larger allocation may not fit; released, that memory serves any shape again.
fn trim_pool(ctx: &Arc<CudaContext>) -> Result<()> {
    let pool = default_pool(ctx)?;
    // SAFETY: a plain driver call on this context's pool; the caller waited for the queued
    // work, so the buffers freed before it are free on the device too.
    unsafe { drv_sys::cuMemPoolTrimTo(pool, 0) }
        .result()
        .context("cuMemPoolTrimTo")
}
