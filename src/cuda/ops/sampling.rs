//! Launcher for `kernels/sampling.cu`: one drawn token per row of logits.

use anyhow::Result;
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};
use crate::sampling::SamplingParams;

const MODULE: &str = "sampling";
/// The kernel's SAMPLE_THREADS.
pub const SAMPLE_THREADS: u32 = 1024;

/// Where the kernel takes each row's uniform from.
pub enum DeviceDraws {
    /// [rows, 2] f32 on the device: u = hi + lo.
    Given { uniforms: u64 },
    /// Philox (seed, first_stream + streams[row], step); streams: [rows] u32 on the device.
    Philox {
        seed: u64,
        first_stream: u64,
        streams: u64,
        step: u64,
    },
}

/// out[r] = the token drawn from logits row r with its uniform under `params` (temperature 0 =
/// argmax), logp[r] = its log-probability at the temperature (0 when greedy). out, logp: [rows]
/// f32; logits: [rows, vocab] f32.
#[allow(clippy::too_many_arguments)]
pub fn sample_tokens(
    k: &dyn Launcher,
    out: u64,
    logp: u64,
    logits: u64,
    draws: &DeviceDraws,
    rows: usize,
    vocab: usize,
    params: &SamplingParams,
) -> Result<()> {
    let vocab_i = to_i32("sample_tokens", "vocab", vocab)?;
    // top_k >= vocab keeps every token, as 0 does.
    let top_k = to_i32("sample_tokens", "top_k", params.top_k.min(vocab))?;
    if rows == 0 {
        return Ok(());
    }
    let (uniforms, streams, seed, first_stream, step) = match *draws {
        DeviceDraws::Given { uniforms } => (uniforms, 0u64, 0u64, 0u64, 0u64),
        DeviceDraws::Philox {
            seed,
            first_stream,
            streams,
            step,
        } => (0, streams, seed, first_stream, step),
    };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, "sample_tokens", cfg)
        .ptr(out)
        .ptr(logp)
        .ptr(logits)
        .ptr(uniforms)
        .ptr(streams)
        .i32(vocab_i)
        .f32(params.temperature)
        .i32(top_k)
        .f32(params.top_p)
        .u64(seed)
        .u64(first_stream)
        .u64(step);
    // SAFETY: matches `(float* out, float* logp, const float* logits, const float* uniforms,
    // const unsigned* streams, int vocab, float temperature, int top_k, float top_p, unsigned
    // long long seed, unsigned long long first_stream, unsigned long long step)`; the caller owns
    // out and logp of rows f32 each, logits of rows × vocab f32, and either uniforms of 2 × rows
    // f32 (streams null) or streams of rows u32 (uniforms null); one block per row.
    unsafe { k.launch(&l) }
}
