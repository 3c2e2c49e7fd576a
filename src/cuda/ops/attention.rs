//! Launchers for kernels/attention.cu: causal grouped-query attention over a slotted KV cache
//! (the CPU reference is `backend::cpu::attention::attention_forward`).

use crate::backend::check_attention_heads;
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

/// Threads per block, which is also the number of keys scored per chunk; must equal
/// `ATTN_THREADS` in kernels/attention.cu (the kernel is compiled with `__launch_bounds__` of it).
pub const ATTENTION_THREADS: u32 = 128;

/// Largest head_dim the kernel supports (`ATTN_MAX_HEAD_DIM`: the size of its shared q buffer).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// Largest gridDim.y, which holds the query head.
const MAX_GRID_Y: usize = 65_535;

/// The kernels' integer arguments, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionDims {
    pub m: i32,
    pub capacity: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
}

/// Checks the sizes every attention kernel takes (named `op` in errors).
pub(crate) fn check_attention_dims(
    op: &str,
    m: usize,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<AttentionDims> {
    check_attention_heads(op, capacity, n_heads, n_kv_heads, head_dim)?;
    ensure!(
        head_dim <= ATTENTION_MAX_HEAD_DIM,
        "{op}: head_dim {head_dim} is larger than the kernel's maximum {ATTENTION_MAX_HEAD_DIM}"
    );
    ensure!(
        n_heads <= MAX_GRID_Y,
        "{op}: n_heads {n_heads} exceeds the grid limit {MAX_GRID_Y}"
    );
    // the kernel forms n_heads * head_dim and n_kv_heads * head_dim in int
    to_i32(op, "n_heads * head_dim", n_heads * head_dim)?;
    Ok(AttentionDims {
        m: to_i32(op, "m", m)?,
        capacity: to_i32(op, "capacity", capacity)?,
        n_heads: n_heads as i32,
        n_kv_heads: n_kv_heads as i32,
        head_dim: head_dim as i32,
    })
}

/// One block per (token, query head): grid = (m, n_heads, 1), block = (ATTENTION_THREADS, 1, 1);
/// all shared memory is static (about 5.8 KB).
pub fn attention_config(m: usize, n_heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m as u32, n_heads as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out[t, h] = softmax_j(q[t, h] · K[slot_t, j, h / group] / sqrt(head_dim)) · V[slot_t, j, ..]
/// over j = 0..=positions[t], in bf16 storage with fp32 arithmetic; lse[t, h] = log Σ_j exp(score)
/// when `lse` is not 0.
///
/// `out`, `q`: bf16 [m, n_heads * head_dim]; `lse`: f32 [m, n_heads] or 0; `cache_k`, `cache_v`: bf16 [slots, capacity,
/// n_kv_heads * head_dim] (one layer); `slots`, `positions`: u32 [m], already checked by the
/// caller (slot < slots, position < capacity).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    k: &dyn Launcher,
    out: u64,
    lse: u64,
    q: u64,
    cache_k: u64,
    cache_v: u64,
    slots: u64,
    positions: u64,
    m: usize,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let dims = check_attention_dims(
        "attention_forward",
        m,
        capacity,
        n_heads,
        n_kv_heads,
        head_dim,
    )?;
    if m == 0 {
        return Ok(());
    }
    // the same f32 value as the CPU reference
    let scale = 1.0 / (head_dim as f32).sqrt();
    let l = KernelLaunch::new(
        "attention",
        "attention_forward",
        attention_config(m, n_heads),
    )
    .ptr(out)
    .ptr(lse)
    .ptr(q)
    .ptr(cache_k)
    .ptr(cache_v)
    .ptr(slots)
    .ptr(positions)
    .i32(dims.m)
    .i32(dims.capacity)
    .i32(dims.n_heads)
    .i32(dims.n_kv_heads)
    .i32(dims.head_dim)
    .f32(scale);
    // SAFETY: the arguments match the kernel's signature (bf16* out, float* lse (may be null),
    // const bf16* q,
    // const bf16* cache_k, const bf16* cache_v, const u32* slots, const u32* positions,
    // int m, int capacity, int n_heads, int n_kv_heads, int head_dim, float scale); the caller
    // owns device buffers of the documented shapes and has checked every slot and position, and
    // the grid covers exactly m x n_heads blocks of the block size the kernel was compiled for.
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_head_dim_up_to_256_and_gqa_groups() {
        for head_dim in 1..=ATTENTION_MAX_HEAD_DIM {
            let d = check_attention_dims("attention_forward", 3, 17, 14, 2, head_dim).unwrap();
            assert_eq!(d.head_dim as usize, head_dim);
        }
        let d = check_attention_dims("attention_forward", 0, 4096, 32, 8, 128).unwrap();
        assert_eq!(
            d,
            AttentionDims {
                m: 0,
                capacity: 4096,
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 128
            }
        );
        // multi-head (group 1) and multi-query (one KV head)
        assert!(check_attention_dims("attention_forward", 5, 8, 12, 12, 64).is_ok());
        assert!(check_attention_dims("attention_forward", 5, 8, 12, 1, 64).is_ok());
    }

    #[test]
    fn rejects_bad_shapes_naming_the_op() {
        let cases = [
            (1, 8, 14, 2, 257),     // head_dim too large
            (1, 8, 14, 2, 0),       // head_dim zero
            (1, 8, 14, 4, 64),      // 14 heads in groups of 4 KV heads
            (1, 8, 0, 1, 64),       // no heads
            (1, 8, 4, 0, 64),       // no KV heads
            (1, 0, 4, 2, 64),       // no capacity
            (1, 8, 70_000, 1, 1),   // too many heads for gridDim.y
            (1 << 31, 8, 4, 2, 64), // m beyond i32
            (1, 1 << 31, 4, 2, 64), // capacity beyond i32
        ];
        for (m, capacity, n_heads, n_kv_heads, head_dim) in cases {
            let e = check_attention_dims(
                "attention_forward",
                m,
                capacity,
                n_heads,
                n_kv_heads,
                head_dim,
            )
            .unwrap_err();
            assert!(
                e.to_string().starts_with("attention_forward: "),
                "({m}, {capacity}, {n_heads}, {n_kv_heads}, {head_dim}): {e}"
            );
        }
    }

    #[test]
    fn one_block_per_token_and_head() {
        let cfg = attention_config(3000, 28);
        assert_eq!(cfg.grid_dim, (3000, 28, 1));
        assert_eq!(cfg.block_dim, (ATTENTION_THREADS, 1, 1));
        assert_eq!(cfg.shared_mem_bytes, 0);
        // tokens go on x, which allows far more than gridDim.y's 65535
        assert_eq!(attention_config(200_000, 1).grid_dim.0, 200_000);
        assert_eq!(ATTENTION_THREADS % 32, 0);
        assert_eq!(ATTENTION_MAX_HEAD_DIM % ATTENTION_THREADS as usize, 0);
    }
}
