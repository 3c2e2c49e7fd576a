//! Launcher for kernels/advantage.cu: group-normalised advantages (the reference is
//! `grpo::advantages`).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};
use crate::grpo::{AdvantageOptions, Scale, StdKind};

/// Threads of the one block of `group_advantages` (its ADVANTAGE_THREADS).
pub const ADVANTAGE_THREADS: u32 = 256;

/// out (f32 [n]) = the group-normalised advantages of rewards (f64 [n] on the device).
pub fn group_advantages(
    k: &dyn Launcher,
    out: u64,
    rewards: u64,
    n: usize,
    group_size: usize,
    opts: &AdvantageOptions,
) -> Result<()> {
    ensure!(
        group_size > 0 && n.is_multiple_of(group_size),
        "group_advantages: {n} rewards do not split into groups of {group_size}"
    );
    let n_i = to_i32("group_advantages", "n", n)?;
    let group_i = to_i32("group_advantages", "group_size", group_size)?;
    if n == 0 {
        return Ok(());
    }
    let std_kind: i32 = match opts.std {
        StdKind::Population => 0,
        StdKind::Unbiased => 1,
    };
    let scale: i32 = match opts.scale {
        Scale::Group => 0,
        Scale::Batch => 1,
        Scale::None => 2,
    };
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (ADVANTAGE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new("advantage", "group_advantages", cfg)
        .ptr(out)
        .ptr(rewards)
        .i32(n_i)
        .i32(group_i)
        .i32(std_kind)
        .i32(scale)
        .f64(opts.eps);
    // SAFETY: matches `(float* out, const double* rewards, int n, int group_size, int std_kind,
    // int scale, double eps)`; out holds n f32 and rewards n f64; group_size > 0 divides n.
    unsafe { k.launch(&l) }
}
