//! A [`Device`] on the CPU, so that the whole `CudaBackend` runs in the tests: kernels run on the
//! emulator (tests/cuda_emulator), device memory is host memory, GEMMs are a plain f32 loop with
//! cuBLAS's contract, and a recording keeps its work (and the memory it touches) to run again.
//!
//! Work runs when it is queued, so every later piece sees it, as on one stream. New memory is
//! filled with 0xFF bytes (NaN in bf16 and f32), so a read before any write shows, and each
//! buffer ends at an unmapped page, so an access past its end (or after it is freed) faults. The device
//! counts its live bytes and their peak (as `bench step` reads the pool's high-water mark), so a
//! test can hold the memory estimate against the backend's real allocations. It can keep freed
//! memory as CUDA's pool does (`keeping_freed_memory`), so that a test can run out of memory
//! with room to spare once the cache is given back. What a
//! recording needs of memory is what a CUDA graph gets: memory allocated or freed while recording
//! stays at its address until the recording is dropped. As on a capturing CUDA stream, copies
//! between host and device and waiting are errors while recording.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Result};
use half::bf16;
use rayon::prelude::*;
use thinkshort::backend::{MemoryPeaks, OutOfDeviceMemory};
use thinkshort::cuda::backend::DType;
use thinkshort::cuda::device::{Device, DeviceGraph, DeviceMemory, Gemm, TimingMark};
use thinkshort::cuda::launch::{KernelLaunch, Launcher};

use super::Emulator;

/// Where a buffer ends: a multiple of 16 bytes (the widest vector access) after its start.
const ALIGN: usize = 16;

/// Device memory of [`EmulatedDevice::new`].
const MEMORY_BYTES: usize = 4 << 30;

/// Bytes allocated and not yet freed, their highest value since the last reset, the kernel
/// launches and GEMMs run (a graph's replays included), and the freed memory kept.
#[derive(Default)]
struct Usage {
    live: AtomicUsize,
    peak: AtomicUsize,
    /// The most bytes live and cached at once.
    reserved_peak: AtomicUsize,
    /// Allocations refused for want of room.
    refused: AtomicUsize,
    launches: AtomicUsize,
    gemms: AtomicUsize,
    /// With `keeping_freed_memory`, the sizes of the freed allocations the device keeps for
    /// reuse, the least a pool can do: they take room until `release_cached_memory`, and only an
    /// allocation of the same size reuses one. None: freed memory is free at once.
    cached: Mutex<Option<Vec<usize>>>,
}

impl Usage {
    fn cached(&self) -> MutexGuard<'_, Option<Vec<usize>>> {
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes that allocations cannot have: the live ones and the cached ones.
    fn taken(&self) -> usize {
        let cached: usize = self.cached().iter().flatten().sum();
        self.live.load(Ordering::Relaxed) + cached
    }
}

/// One piece of queued work.
#[derive(Clone)]
enum Work {
    Launch(KernelLaunch),
    Fill { ptr: u64, bytes: usize },
    Copy { dst: u64, src: u64, bytes: usize },
    Gemm(Gemm),
}

/// What is being recorded: the work, the memory allocated meanwhile (kept alive with the graph)
/// and the allocations freed meanwhile (released with the graph).
struct Recording {
    /// Tells this recording's allocations from the others'.
    id: u64,
    work: Vec<Work>,
    allocated: Vec<Arc<dyn DeviceMemory>>,
    freed: Vec<Allocation>,
    /// Why CUDA would refuse this capture: memory allocated outside it was freed during it.
    invalid: Option<String>,
}

/// A host mapping standing for device memory: `size` bytes at `ptr`, 16-byte aligned and
/// ending (rounded up to 16 bytes) where an unmapped page begins, so that an access past the end
/// faults, as compute-sanitizer's memcheck would report it on a GPU; unmapped when freed, so an
/// access after the free faults too (until the addresses are mapped again).
struct Allocation {
    ptr: *mut u8,
    size: usize,
    mapping: *mut libc::c_void,
    mapping_len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for Allocation {}

impl Allocation {
    fn new(size: usize) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let body = size.max(1).div_ceil(ALIGN) * ALIGN;
        let mapping_len = body.div_ceil(page) * page + page;
        // SAFETY: an anonymous private mapping of mapping_len bytes, checked below.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            bail!("the host could not map {size} bytes");
        }
        let guard = mapping as usize + mapping_len - page;
        // SAFETY: the last page of the mapping just made.
        if unsafe { libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE) } != 0 {
            // SAFETY: the mapping just made, not used.
            unsafe { libc::munmap(mapping, mapping_len) };
            bail!("mprotect failed on a guard page");
        }
        let ptr = (guard - body) as *mut u8;
        // SAFETY: `ptr` starts `body` ≥ size bytes of the writable mapping.
        unsafe { std::ptr::write_bytes(ptr, 0xFF, body) };
        Ok(Allocation {
            ptr,
            size,
            mapping,
            mapping_len,
        })
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: mapped in `Allocation::new` with this length, unmapped once.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}

type Shared = Arc<Mutex<Option<Recording>>>;

fn lock(m: &Mutex<Option<Recording>>) -> MutexGuard<'_, Option<Recording>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct HostMemory {
    allocation: Option<Allocation>,
    /// The device's recording state: memory dropped while recording goes to the recording.
    recording: Shared,
    /// The recording that allocated it, if one did (a graph allocation).
    recorded_in: Option<u64>,
    usage: Arc<Usage>,
}

impl DeviceMemory for HostMemory {
    fn ptr(&self) -> u64 {
        self.allocation.as_ref().expect("alive").ptr as u64
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        let allocation = self.allocation.take().expect("dropped once");
        self.usage
            .live
            .fetch_sub(allocation.size, Ordering::Relaxed);
        if let Some(cached) = self.usage.cached().as_mut() {
            cached.push(allocation.size);
        }
        if let Some(rec) = lock(&self.recording).as_mut() {
            // A captured free must free a graph allocation (cuGraphAddMemFreeNode's contract).
            if self.recorded_in != Some(rec.id) && rec.invalid.is_none() {
                rec.invalid = Some(format!(
                    "{} bytes allocated outside the recording were freed while recording",
                    allocation.size
                ));
            }
            rec.freed.push(allocation);
        }
    }
}

// SAFETY: the memory's address is plain data; the recording state is behind a mutex.
unsafe impl Sync for HostMemory {}

/// The CPU standing for one GPU with `multiprocessors` SMs.
pub struct EmulatedDevice {
    multiprocessors: usize,
    /// Bytes of device memory: an allocation past them fails, as on a full GPU.
    memory: usize,
    /// Bytes `memory_info` adds to the free (and total) memory it reports.
    overstated: usize,
    recording: Shared,
    /// Recordings begun so far.
    recordings: AtomicUsize,
    usage: Arc<Usage>,
}

impl EmulatedDevice {
    /// A device with 4 GiB of memory.
    pub fn new(multiprocessors: usize) -> Self {
        Self::with_memory(multiprocessors, MEMORY_BYTES)
    }

    pub fn with_memory(multiprocessors: usize, memory: usize) -> Self {
        EmulatedDevice {
            multiprocessors,
            memory,
            overstated: 0,
            recording: Arc::new(Mutex::new(None)),
            recordings: AtomicUsize::new(0),
            usage: Arc::default(),
        }
    }

    /// The device keeps the memory of freed buffers until `release_cached_memory` (as CUDA's
    /// stream-ordered pool does), reusing it only for allocations of the same size.
    pub fn keeping_freed_memory(self) -> Self {
        *self.usage.cached() = Some(Vec::new());
        self
    }

    /// The device reports `extra` bytes more free memory than it has, as fragmentation makes
    /// the free memory worth less than it says: what the memory estimate plans with is then too
    /// much.
    pub fn overstating_free_memory(mut self, extra: usize) -> Self {
        self.overstated = extra;
        self
    }

    /// Bytes of device memory allocated and not freed.
    pub fn live_bytes(&self) -> usize {
        self.usage.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`EmulatedDevice::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.usage.peak.load(Ordering::Relaxed)
    }

    /// Allocations refused so far for want of room.
    pub fn refusals(&self) -> usize {
        self.usage.refused.load(Ordering::Relaxed)
    }

    /// (kernel launches, GEMMs) run so far (each replay of a recording counts its own).
    pub fn work_run(&self) -> (usize, usize) {
        (
            self.usage.launches.load(Ordering::Relaxed),
            self.usage.gemms.load(Ordering::Relaxed),
        )
    }

    /// Starts new peaks at the bytes live (and cached) now.
    pub fn reset_peak(&self) {
        self.usage.peak.store(self.live_bytes(), Ordering::Relaxed);
        let taken = self.usage.taken();
        self.usage.reserved_peak.store(taken, Ordering::Relaxed);
    }

    /// Runs `work`, or records it while recording.
    fn queue(&self, work: Work) -> Result<()> {
        if let Some(rec) = lock(&self.recording).as_mut() {
            rec.work.push(work);
            return Ok(());
        }
        // SAFETY: the Device contract of whoever queued it.
        unsafe { run(&work, &self.usage) }
    }

    fn refuse_while_recording(&self, what: &str) -> Result<()> {
        ensure!(
            lock(&self.recording).is_none(),
            "{what} while recording (not allowed on a capturing CUDA stream)"
        );
        Ok(())
    }
}

/// Runs one piece of work now, counting it in `usage` when it is a kernel launch.
///
/// # Safety
/// Its pointers are live host memory of the sizes it touches.
unsafe fn run(work: &Work, usage: &Usage) -> Result<()> {
    match work {
        Work::Launch(_) => usage.launches.fetch_add(1, Ordering::Relaxed),
        Work::Gemm(_) => usage.gemms.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    // SAFETY: the caller's contract, for each kind of work.
    unsafe {
        match work {
            Work::Launch(l) => Emulator.launch(l),
            Work::Fill { ptr, bytes } => Emulator.fill_zero(*ptr, *bytes),
            Work::Copy { dst, src, bytes } => {
                std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, *bytes);
                Ok(())
            }
            Work::Gemm(g) => gemm(g),
        }
    }
}

/// cuBLAS GemmEx on the CPU: column-major C = op(A) · op(B) + beta · C, f32 sums of the bf16
/// operands, C read only when beta ≠ 0.
///
/// # Safety
/// A, B and C hold what the sizes and leading dimensions say.
unsafe fn gemm(g: &Gemm) -> Result<()> {
    let (m, n, k) = (g.m, g.n, g.k);
    // cuBLAS refuses leading dimensions shorter than a column (CUBLAS_STATUS_INVALID_VALUE)
    let rows = |trans: bool, if_trans: usize, if_not: usize| if trans { if_trans } else { if_not };
    ensure!(
        g.lda >= rows(g.trans_a, k, m).max(1)
            && g.ldb >= rows(g.trans_b, n, k).max(1)
            && g.ldc >= m.max(1),
        "cublasGemmEx: CUBLAS_STATUS_INVALID_VALUE (a leading dimension shorter than a column: {g:?})"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    // op(A) as m rows of k, op(B) as n columns of k, widened to f32 once.
    let widen = |ptr: u64, ld: usize, rows: usize, trans: bool| -> Vec<f32> {
        let mut out = vec![0f32; rows * k];
        for r in 0..rows {
            for p in 0..k {
                let at = if trans { p + r * ld } else { r + p * ld };
                // SAFETY: the caller's contract: the operand holds what its ld and sizes say.
                out[r * k + p] = unsafe { *(ptr as *const bf16).add(at) }.to_f32();
            }
        }
        out
    };
    let a = widen(g.a, g.lda, m, g.trans_a);
    // op(B)[p, j] is B[j + p·ldb] when transposed, B[p + j·ldb] when not: the other way round
    let b = widen(g.b, g.ldb, n, !g.trans_b);
    let columns: Vec<Vec<f32>> = (0..n)
        .into_par_iter()
        .map(|j| {
            let column = &b[j * k..(j + 1) * k];
            (0..m)
                .map(|i| {
                    let row = &a[i * k..(i + 1) * k];
                    row.iter().zip(column).map(|(x, y)| x * y).sum()
                })
                .collect()
        })
        .collect();
    for (j, column) in columns.iter().enumerate() {
        for (i, &sum) in column.iter().enumerate() {
            let at = i + j * g.ldc;
            // SAFETY: the caller's contract: C holds ldc × n elements of its type.
            unsafe {
                match g.c_dtype {
                    DType::F32 => {
                        let c = (g.c as *mut f32).add(at);
                        *c = if g.beta == 0.0 {
                            sum
                        } else {
                            sum + g.beta * *c
                        };
                    }
                    DType::Bf16 => {
                        let c = (g.c as *mut bf16).add(at);
                        let old = if g.beta == 0.0 {
                            0.0
                        } else {
                            g.beta * (*c).to_f32()
                        };
                        *c = bf16::from_f32(sum + old);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The largest block (threads) and dynamic shared memory (bytes) each kernel
/// ("module/function") was launched with by any emulated device of this process.
static LAUNCH_SHAPES: Mutex<BTreeMap<String, (u32, u32)>> = Mutex::new(BTreeMap::new());

/// What [`LAUNCH_SHAPES`] holds now: a test holds the kernels' resources (ptxas's registers and
/// static shared memory) against a GPU's limits for the launches the backend really makes.
pub fn launch_shapes() -> BTreeMap<String, (u32, u32)> {
    LAUNCH_SHAPES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

impl Launcher for EmulatedDevice {
    unsafe fn launch(&self, l: &KernelLaunch) -> Result<()> {
        let (b, c) = (l.config.block_dim, &l.config);
        let threads = b.0 * b.1 * b.2;
        let mut shapes = LAUNCH_SHAPES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let shape = shapes
            .entry(format!("{}/{}", l.module, l.function))
            .or_insert((0, 0));
        *shape = (shape.0.max(threads), shape.1.max(c.shared_mem_bytes));
        drop(shapes);
        self.queue(Work::Launch(l.clone()))
    }

    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.queue(Work::Fill { ptr, bytes })
    }
}

impl Device for EmulatedDevice {
    fn alloc(&self, bytes: usize) -> Result<Arc<dyn DeviceMemory>> {
        let size = bytes.max(1);
        let reused = self.usage.cached().as_mut().is_some_and(|cached| {
            let same = cached.iter().position(|&c| c == size);
            same.map(|at| cached.swap_remove(at)).is_some()
        });
        if !reused && self.usage.taken() + size > self.memory {
            self.usage.refused.fetch_add(1, Ordering::Relaxed);
            return Err(OutOfDeviceMemory { bytes }.into());
        }
        let allocation = Allocation::new(size)?;
        let live = self.usage.live.fetch_add(size, Ordering::Relaxed) + size;
        self.usage.peak.fetch_max(live, Ordering::Relaxed);
        let taken = self.usage.taken();
        self.usage.reserved_peak.fetch_max(taken, Ordering::Relaxed);
        let mut recording = lock(&self.recording);
        let memory: Arc<dyn DeviceMemory> = Arc::new(HostMemory {
            allocation: Some(allocation),
            recording: self.recording.clone(),
            recorded_in: recording.as_ref().map(|rec| rec.id),
            usage: self.usage.clone(),
        });
        if let Some(rec) = recording.as_mut() {
            rec.allocated.push(memory.clone());
        }
        Ok(memory)
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.refuse_while_recording("a copy to the device")?;
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.refuse_while_recording("a copy to the host")?;
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.queue(Work::Copy { dst, src, bytes })
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        self.queue(Work::Gemm(*g))
    }

    fn synchronize(&self) -> Result<()> {
        self.refuse_while_recording("waiting for the device")
    }

    fn release_cached_memory(&self) -> Result<()> {
        self.synchronize()?;
        if let Some(cached) = self.usage.cached().as_mut() {
            cached.clear();
        }
        Ok(())
    }

    fn memory_peaks(&self) -> Result<MemoryPeaks> {
        Ok(MemoryPeaks {
            used: self.peak_bytes(),
            reserved: self.usage.reserved_peak.load(Ordering::Relaxed),
        })
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        let free = self.memory.saturating_sub(self.usage.taken());
        Ok((free + self.overstated, self.memory + self.overstated))
    }

    fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    fn timing_mark(&self) -> Result<TimingMark> {
        Ok(TimingMark(Box::new(Instant::now())))
    }

    fn seconds_between(&self, start: &TimingMark, end: &TimingMark) -> Result<f64> {
        fn instant(m: &TimingMark) -> Result<Instant> {
            m.0.downcast_ref::<Instant>()
                .copied()
                .ok_or_else(|| anyhow!("a timing mark of another device"))
        }
        Ok(instant(end)?
            .saturating_duration_since(instant(start)?)
            .as_secs_f64())
    }

    fn begin_recording(&self) -> Result<()> {
        let mut rec = lock(&self.recording);
        ensure!(rec.is_none(), "already recording");
        *rec = Some(Recording {
            id: self.recordings.fetch_add(1, Ordering::Relaxed) as u64,
            work: Vec::new(),
            allocated: Vec::new(),
            freed: Vec::new(),
            invalid: None,
        });
        Ok(())
    }

    fn end_recording(&self) -> Result<Option<Box<dyn DeviceGraph>>> {
        let rec = lock(&self.recording)
            .take()
            .ok_or_else(|| anyhow!("not recording"))?;
        if let Some(why) = &rec.invalid {
            bail!("the capture was invalidated: {why}");
        }
        if rec.work.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(EmulatedGraph {
            recording: rec,
            device_recording: self.recording.clone(),
            usage: self.usage.clone(),
            launches: AtomicUsize::new(0),
        })))
    }

    fn recording(&self) -> Result<bool> {
        Ok(lock(&self.recording).is_some())
    }

    fn take_deferred_error(&self) -> Option<String> {
        None
    }
}

/// Recorded work with the memory it touches.
struct EmulatedGraph {
    recording: Recording,
    device_recording: Shared,
    usage: Arc<Usage>,
    launches: AtomicUsize,
}

impl DeviceGraph for EmulatedGraph {
    fn launch(&self) -> Result<()> {
        ensure!(
            lock(&self.device_recording).is_none(),
            "launching a graph while recording"
        );
        // A graph's allocations that its own work does not free stay with whoever uses them
        // after a launch, and CUDA refuses to launch the graph again before they are freed
        // (no auto-free flag at instantiation): here, before their last user drops them.
        let outstanding = self
            .recording
            .allocated
            .iter()
            .filter(|m| Arc::strong_count(m) > 1)
            .count();
        if self.launches.fetch_add(1, Ordering::Relaxed) > 0 && outstanding > 0 {
            bail!(
                "{outstanding} allocations of the graph's last launch are still in use: a CUDA \
                 graph cannot be launched again before they are freed"
            );
        }
        for work in &self.recording.work {
            // SAFETY: the memory the work touches is alive: allocated before the recording and
            // kept by its owners (the backend keeps what a recording reads), or allocated or
            // freed while recording and kept here.
            unsafe { run(work, &self.usage) }?;
        }
        Ok(())
    }
}
