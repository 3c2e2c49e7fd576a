//! Launcher for `kernels/sampling.cu`: one drawn token per row of logits.

use anyhow::{Context, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::cuda::launch::{to_i32, KernelCtx};

const MODULE: &str = "sampling";
/// The kernel's SAMPLE_THREADS.
const SAMPLE_THREADS: u32 = 1024;

/// out[r] = the token drawn from logits row r with the uniform uniforms[2r] + uniforms[2r + 1]
/// at `temperature` (0 = argmax). out: [rows] f32; logits: [rows, vocab] f32; uniforms:
/// [rows, 2] f32.
pub fn sample_tokens(
    k: &KernelCtx,
    out: u64,
    logits: u64,
    uniforms: u64,
    rows: usize,
    vocab: usize,
    temperature: f32,
) -> Result<()> {
    let vocab_i = to_i32("sample_tokens", "vocab", vocab)?;
    if rows == 0 {
        return Ok(());
    }
    let f = k.function(MODULE, "sample_tokens")?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&f);
    b.arg(&out)
        .arg(&logits)
        .arg(&uniforms)
        .arg(&vocab_i)
        .arg(&temperature);
    // SAFETY: matches `(float* out, const float* logits, const float* uniforms, int vocab,
    // float temperature)`; the caller owns out of rows f32, logits of rows × vocab f32 and
    // uniforms of 2 × rows f32; one block per row.
    unsafe { b.launch(cfg) }
        .with_context(|| format!("launching sample_tokens (rows {rows}, vocab {vocab})"))?;
    Ok(())
}
