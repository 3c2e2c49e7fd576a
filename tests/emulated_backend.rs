//! The whole CUDA backend on the CPU: `selfcheck` (every op, the tiny models' log-probs and
//! gradients, recorded decode steps, one GRPO update) runs `CudaBackend` over the emulated device
//! of tests/emulation_support, so the backend's own code (shape checks, views, kernel choice,
//! scratch and index caches, decode-step recordings) is checked without a GPU, not only the
//! kernels and their launchers.

mod emulation_support;

use std::sync::Arc;

use emulation_support::emulated_device::EmulatedDevice;
use thinkshort::cuda::CudaBackend;
use thinkshort::selfcheck::{self, CheckRow, Coverage};

/// SMs of the emulated device: few, so that decode attention splits its keys.
const MULTIPROCESSORS: usize = 4;

fn emulated_backend() -> anyhow::Result<CudaBackend> {
    let device = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    CudaBackend::with_device(device, "CPU emulator".to_string())
}

#[test]
fn selfcheck_passes_on_the_cuda_backend_over_the_emulator() {
    let started = std::time::Instant::now();
    let mut failed: Vec<CheckRow> = Vec::new();
    let report = selfcheck::run(&emulated_backend, 0, Coverage::Quick, &mut |row| {
        if !row.pass {
            failed.push(row.clone());
        }
    })
    .unwrap_or_else(|e| panic!("selfcheck stopped: {e:#}"));
    let lines: Vec<String> = failed
        .iter()
        .map(|r| {
            format!(
                "{} {}: error {:.3e}, tolerance {:.1e}{}",
                r.op,
                r.shape,
                r.error,
                r.tolerance,
                r.message
                    .as_ref()
                    .map_or(String::new(), |m| format!(" ({m})"))
            )
        })
        .collect();
    eprintln!(
        "{} rows in {:.1} s; info: {:?}",
        report.rows.len(),
        started.elapsed().as_secs_f64(),
        report.info
    );
    assert!(
        lines.is_empty(),
        "{} of {} rows failed:\n{}",
        lines.len(),
        report.rows.len(),
        lines.join("\n")
    );
}
