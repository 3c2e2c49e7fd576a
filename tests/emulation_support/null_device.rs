//! A [`Device`] that does no work: its memory is address space only (no bytes behind an
//! address), launches, fills, GEMMs and copies on the device are dropped, and a copy to the host
//! gives zeros. `CudaBackend` runs on it at any model size in moments, so a test can count what
//! the backend asks of a GPU at the real shapes (its ops and their work, `bench step --profile`)
//! on a machine without one, and count the device memory it holds (`live_bytes`, `peak_bytes`).
//! Timing marks are host instants: the times it reports mean nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use thinkshort::backend::MemoryPeaks;
use thinkshort::cuda::device::{Device, DeviceGraph, DeviceMemory, Gemm, TimingMark};
use thinkshort::cuda::launch::{KernelLaunch, Launcher};

/// Address space of [`NullDevice::new`] (nothing is behind it).
const MEMORY_BYTES: usize = 1 << 40;

pub struct NullDevice {
    /// The next address handed out (256-byte aligned, as cuMemAllocAsync's; never reused).
    next: AtomicU64,
    usage: Arc<Usage>,
    recording: AtomicBool,
    multiprocessors: usize,
}

/// Bytes allocated and not yet freed, and their highest value since the last reset.
#[derive(Default)]
struct Usage {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl NullDevice {
    pub fn new(multiprocessors: usize) -> Self {
        NullDevice {
            next: AtomicU64::new(1 << 20),
            usage: Arc::default(),
            recording: AtomicBool::new(false),
            multiprocessors,
        }
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes(&self) -> usize {
        self.usage.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the device was made or `reset_peak`.
    pub fn peak_bytes(&self) -> usize {
        self.usage.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak at the bytes live now.
    pub fn reset_peak(&self) {
        self.usage.peak.store(self.live_bytes(), Ordering::Relaxed);
    }
}

/// An allocation: its address and size, counted as live until dropped.
struct NullMemory {
    ptr: u64,
    size: usize,
    usage: Arc<Usage>,
}

impl DeviceMemory for NullMemory {
    fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for NullMemory {
    fn drop(&mut self) {
        self.usage.live.fetch_sub(self.size, Ordering::Relaxed);
    }
}

struct NullGraph;

impl DeviceGraph for NullGraph {
    fn launch(&self) -> Result<()> {
        Ok(())
    }
}

impl Launcher for NullDevice {
    unsafe fn launch(&self, _l: &KernelLaunch) -> Result<()> {
        Ok(())
    }

    unsafe fn fill_zero(&self, _ptr: u64, _bytes: usize) -> Result<()> {
        Ok(())
    }
}

impl Device for NullDevice {
    fn alloc(&self, bytes: usize) -> Result<Arc<dyn DeviceMemory>> {
        let size = bytes.max(1);
        let ptr = self
            .next
            .fetch_add(size.next_multiple_of(256) as u64, Ordering::Relaxed);
        ensure!(
            ptr + size as u64 <= MEMORY_BYTES as u64,
            "the null device's address space is used up"
        );
        let live = self.usage.live.fetch_add(size, Ordering::Relaxed) + size;
        self.usage.peak.fetch_max(live, Ordering::Relaxed);
        Ok(Arc::new(NullMemory {
            ptr,
            size,
            usage: self.usage.clone(),
        }))
    }

    unsafe fn copy_to_device(&self, _dst: u64, _src: &[u8]) -> Result<()> {
        Ok(())
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], _src: u64) -> Result<()> {
        dst.fill(0);
        Ok(())
    }

    unsafe fn copy_on_device(&self, _dst: u64, _src: u64, _bytes: usize) -> Result<()> {
        Ok(())
    }

    unsafe fn gemm(&self, _g: &Gemm) -> Result<()> {
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn release_cached_memory(&self) -> Result<()> {
        Ok(()) // nothing is kept
    }

    fn memory_peaks(&self) -> Result<MemoryPeaks> {
        let peak = self.peak_bytes();
        Ok(MemoryPeaks {
            used: peak,
            reserved: peak,
        })
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        Ok((MEMORY_BYTES.saturating_sub(self.live_bytes()), MEMORY_BYTES))
    }

    fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    fn timing_mark(&self) -> Result<TimingMark> {
        Ok(TimingMark(Box::new(Instant::now())))
    }

    fn seconds_between(&self, start: &TimingMark, end: &TimingMark) -> Result<f64> {
        let instant =
            |m: &TimingMark| *m.0.downcast_ref::<Instant>().expect("a null device's mark");
        Ok(instant(end).duration_since(instant(start)).as_secs_f64())
    }

    fn begin_recording(&self) -> Result<()> {
        self.recording.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn end_recording(&self) -> Result<Option<Box<dyn DeviceGraph>>> {
        self.recording.store(false, Ordering::Relaxed);
        Ok(Some(Box::new(NullGraph)))
    }

    fn recording(&self) -> Result<bool> {
        Ok(self.recording.load(Ordering::Relaxed))
    }

    fn take_deferred_error(&self) -> Option<String> {
        None
    }
}
