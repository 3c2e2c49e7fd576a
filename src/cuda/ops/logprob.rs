//! Launchers for kernels/logprob.cu: the log-probability of the target token at temperature τ and
//! the entropy of the tempered softmax (the CPU reference is
//! `backend::cpu::logprob::logprob_forward`).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

/// Largest block the kernels are compiled for (`__launch_bounds__(1024)`).
const MAX_THREADS: usize = 1024;

/// Threads per row: about one 16-byte vector (`vec_width` logits) per thread, in whole warps,
/// between 32 and 1024. Every row takes the vector path (the kernel peels a scalar head and
/// tail), so this holds for any vocab and alignment.
fn logprob_block_size(vocab: usize, vec_width: usize) -> u32 {
    vocab
        .div_ceil(vec_width)
        .next_multiple_of(32)
        .clamp(32, MAX_THREADS) as u32
}

/// One block per row: grid = (r, 1, 1), block = (logprob_block_size(..), 1, 1); all shared
/// memory is static (384 bytes).
pub fn logprob_config(r: usize, vocab: usize, logits_f32: bool) -> LaunchConfig {
    let vec_width = if logits_f32 { 4 } else { 8 };
    LaunchConfig {
        grid_dim: (r as u32, 1, 1),
        block_dim: (logprob_block_size(vocab, vec_width), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks the sizes and the temperature; returns (r, vocab, 1/τ) as the kernel takes them.
pub fn check_logprob_args(
    op: &str,
    r: usize,
    vocab: usize,
    temperature: f32,
) -> Result<(i32, i32, f32)> {
    ensure!(vocab > 0, "{op}: vocab must be positive");
    ensure!(
        temperature.is_finite() && temperature > 0.0,
        "{op}: temperature must be finite and > 0, got {temperature}"
    );
    // 1/τ rounded once from f64, as the CPU reference's inv_t
    let inv_temperature = (1.0 / temperature as f64) as f32;
    ensure!(
        inv_temperature.is_finite(),
        "{op}: temperature {temperature} is too small (1/τ overflows f32)"
    );
    Ok((
        to_i32(op, "r", r)?,
        to_i32(op, "vocab", vocab)?,
        inv_temperature,
    ))
}

/// logp[i] = log softmax(logits[i] / τ)[targets[i]] and entropy[i] = −Σ p log p of that softmax,
/// for each of the `r` rows of `vocab` logits, in fp32.
///
/// `logp`, `entropy`: f32 [r]; `logits`: [r, vocab], f32 when `logits_f32` else bf16;
/// `targets`: u32 [r], each < vocab (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub fn logprob_forward(
    k: &dyn Launcher,
    logp: u64,
    entropy: u64,
    logits: u64,
    logits_f32: bool,
    targets: u64,
    r: usize,
    vocab: usize,
    temperature: f32,
) -> Result<()> {
    let (r_i, vocab_i, inv_temperature) =
        check_logprob_args("logprob_forward", r, vocab, temperature)?;
    if r == 0 {
        return Ok(());
    }
    let name = if logits_f32 {
        "logprob_forward_f32"
    } else {
        "logprob_forward"
    };
    let l = KernelLaunch::new("logprob", name, logprob_config(r, vocab, logits_f32))
        .ptr(logp)
        .ptr(entropy)
        .ptr(logits)
        .ptr(targets)
        .i32(r_i)
        .i32(vocab_i)
        .f32(inv_temperature);
    // SAFETY: the arguments match the kernel's signature (float* logp, float* entropy,
    // const T* logits, const u32* targets, int r, int vocab, float inv_temperature) with T = f32
    // for logprob_forward_f32 and bf16 for logprob_forward; the caller owns device buffers of the
    // documented shapes and has checked every target, and the block size is a multiple of 32 no
    // larger than the kernels' launch bounds.
    unsafe { k.launch(&l) }
}

/// dlogits (bf16 [r, vocab], overwritten) = dlogp[i] / τ · (onehot(targets[i]) − softmax(logits /
/// τ)); dlogp f32 [r]; logits f32 when `logits_f32` else bf16; targets checked by the caller.
#[allow(clippy::too_many_arguments)]
pub fn logprob_backward(
    k: &dyn Launcher,
    dlogits: u64,
    dlogp: u64,
    logits: u64,
    targets: u64,
    r: usize,
    vocab: usize,
    temperature: f32,
    logits_f32: bool,
) -> Result<()> {
    let (r_i, vocab_i, inv_temperature) =
        check_logprob_args("logprob_backward", r, vocab, temperature)?;
    if r == 0 {
        return Ok(());
    }
    let kernel = if logits_f32 {
        "logprob_backward_f32"
    } else {
        "logprob_backward"
    };
    let l = KernelLaunch::new("logprob", kernel, logprob_config(r, vocab, logits_f32))
        .ptr(dlogits)
        .ptr(dlogp)
        .ptr(logits)
        .ptr(targets)
        .i32(r_i)
        .i32(vocab_i)
        .f32(inv_temperature);
    // SAFETY: matches `(bf16* dlogits, const float* dlogp, const T* logits, const u32* targets,
    // int r, int vocab, float inv_temperature)` with T as chosen above; one block per row, whole
    // warps up to 1024 threads as the block reduction requires.
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_is_about_one_vector_per_thread_in_whole_warps() {
        assert_eq!(logprob_block_size(1, 8), 32);
        assert_eq!(logprob_block_size(1001, 4), 256); // 251 vectors
        assert_eq!(logprob_block_size(1001, 8), 128); // 126 vectors
        assert_eq!(logprob_block_size(151_936, 8), 1024);
        assert_eq!(logprob_block_size(usize::MAX / 2, 4), 1024);
        for vocab in 1..5000 {
            let t = logprob_block_size(vocab, 8);
            assert!(
                t.is_multiple_of(32) && (32..=1024).contains(&t),
                "{vocab}: {t}"
            );
        }
    }

    #[test]
    fn one_block_per_row_with_the_dtype_vector_width() {
        let bf16 = logprob_config(4096, 1001, false);
        assert_eq!(bf16.grid_dim, (4096, 1, 1));
        assert_eq!(bf16.block_dim, (128, 1, 1));
        assert_eq!(bf16.shared_mem_bytes, 0);
        let f32 = logprob_config(7, 1001, true);
        assert_eq!(f32.grid_dim, (7, 1, 1));
        assert_eq!(f32.block_dim, (256, 1, 1));
    }

    #[test]
    fn checks_sizes_and_temperature() {
        let (r, v, inv_t) = check_logprob_args("logprob_forward", 3, 1001, 0.7).unwrap();
        assert_eq!((r, v), (3, 1001));
        assert_eq!(inv_t, (1.0 / 0.7f32 as f64) as f32);
        assert_eq!(
            check_logprob_args("logprob_forward", 0, 10, 1.0).unwrap().0,
            0
        );
        for (r, vocab, t) in [
            (1, 0, 1.0),
            (1, 10, 0.0),
            (1, 10, -1.0),
            (1, 10, f32::NAN),
            (1, 10, f32::INFINITY),
            (1, 10, 1e-45),
            (1 << 31, 10, 1.0),
            (1, 1 << 31, 1.0),
        ] {
            let e = check_logprob_args("logprob_forward", r, vocab, t).unwrap_err();
            assert!(
                e.to_string().starts_with("logprob_forward: "),
                "({r}, {vocab}, {t}): {e}"
            );
        }
    }
}
