//! Launchers for `kernels/rope.cu`: rotary position embedding (HF `rotate_half`): the forward
//! from the q, k and v projections' one product, the backward in place.
//!
//! A work item is (token, chunk of 8 — or 1 on the scalar path — of the head_dim / 2 rotation
//! frequencies); grid.x covers the items, grid.y splits the heads so that each thread computes
//! its sines and cosines once for several heads (see [`heads_grid_y`]). Qwen3's
//! `qkv_norm_rope_forward` instead runs one warp per (token, head), which normalises the head
//! before rotating it.

use anyhow::{ensure, Context, Result};
use cudarc::driver::LaunchConfig;

use super::elementwise::{aligned16, BF16_VEC, BLOCK_THREADS, MAX_GRID_Y};
use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

const MODULE: &str = "rope";

/// Heads one thread rotates with the same sines and cosines when the grid is large enough.
pub const HEADS_PER_THREAD: usize = 4;

/// Below this many (token, chunk) items (a decode step, a short prefill) the GPU is far from
/// full, so every head gets its own grid.y slice for parallelism instead of sharing sincosf.
pub const SMALL_GRID_ITEMS: usize = 16_384;

/// grid.y: how many slices the heads are split into.
pub fn heads_grid_y(items: usize, n_heads: usize) -> u32 {
    let slices = if items < SMALL_GRID_ITEMS {
        n_heads
    } else {
        n_heads.div_ceil(HEADS_PER_THREAD)
    };
    slices.clamp(1, MAX_GRID_Y) as u32
}

/// Checks the shapes; returns (m, n_heads, head_dim) as the kernel's ints.
fn check_shapes(op: &str, m: usize, n_heads: usize, head_dim: usize) -> Result<(i32, i32, i32)> {
    ensure!(n_heads > 0, "{op}: n_heads must be positive");
    ensure!(
        head_dim > 0 && head_dim.is_multiple_of(2),
        "{op}: head_dim = {head_dim} must be positive and even"
    );
    // the kernel indexes (token, frequency) items with 32-bit ints
    let items = m
        .checked_mul(head_dim / 2)
        .context(format!("{op}: m * head_dim / 2 overflows"))?;
    to_i32(op, "m * head_dim / 2", items)?;
    m.checked_mul(n_heads)
        .and_then(|v| v.checked_mul(head_dim))
        .context(format!("{op}: m * n_heads * head_dim overflows"))?;
    // a row's width and offsets in it are ints in the kernel
    let width = n_heads
        .checked_mul(head_dim)
        .context(format!("{op}: n_heads * head_dim overflows"))?;
    to_i32(op, "n_heads * head_dim", width)?;
    Ok((
        to_i32(op, "m", m)?,
        to_i32(op, "n_heads", n_heads)?,
        to_i32(op, "head_dim", head_dim)?,
    ))
}

/// Checks a q/k/v launch's shapes; returns (m, n_heads, n_kv_heads, head_dim) as the kernel's
/// ints. The product's rows hold n_heads + 2 n_kv_heads heads.
fn qkv_shapes(
    op: &str,
    m: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) -> Result<[i32; 4]> {
    let (m_i, n_heads_i, head_dim_i) = check_shapes(op, m, n_heads, head_dim)?;
    let (_, n_kv_i, _) = check_shapes(op, m, n_kv_heads, head_dim)?;
    let row_heads = n_kv_heads
        .checked_mul(2)
        .and_then(|kv| kv.checked_add(n_heads))
        .context(format!("{op}: n_heads + 2 n_kv_heads overflows"))?;
    check_shapes(op, m, row_heads, head_dim)?;
    Ok([m_i, n_heads_i, n_kv_i, head_dim_i])
}

/// The kernels' 128-bit condition for q, k and v and their product's rows (the forward's
/// sources, the backward's destinations): every part 16-byte aligned, its rows too.
fn qkv_vectorised(
    qkv: u64,
    parts: [u64; 3],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) -> bool {
    let row = (n_heads + 2 * n_kv_heads) * head_dim;
    let in_qkv =
        [0, n_heads, n_heads + n_kv_heads].map(|heads| qkv + 2 * (heads * head_dim) as u64);
    (head_dim / 2).is_multiple_of(BF16_VEC)
        && row.is_multiple_of(BF16_VEC)
        && aligned16(&parts)
        && aligned16(&in_qkv)
}

/// The launch geometry for `m` tokens; `vectorised` mirrors the kernel's 128-bit condition.
pub fn rope_config(m: usize, n_heads: usize, head_dim: usize, vectorised: bool) -> LaunchConfig {
    let half = head_dim / 2;
    let items = m * if vectorised { half / BF16_VEC } else { half };
    let threads = items.next_multiple_of(32).clamp(32, BLOCK_THREADS as usize);
    LaunchConfig {
        grid_dim: (
            items.div_ceil(threads).max(1) as u32,
            heads_grid_y(items, n_heads),
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The attention inputs from their projections' one product qkv: bf16 [m, (n_heads + 2
/// n_kv_heads) * head_dim] (each row q', k', v'): q: bf16 [m, n_heads * head_dim] and k: bf16 [m,
/// n_kv_heads * head_dim] = q' + q_bias and k' + k_bias rotated by position[r] · inv_freq[i] for
/// each pair (i, i + head_dim/2) of every head, and v: bf16 [m, n_kv_heads * head_dim] = v' +
/// v_bias (biases bf16 [heads * head_dim], 0 = none); positions: u32 [m]; inv_freq: f32
/// [head_dim / 2].
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_forward(
    k: &dyn Launcher,
    (q, kk, v): (u64, u64, u64),
    qkv: u64,
    (q_bias, k_bias, v_bias): (u64, u64, u64),
    positions: u64,
    inv_freq: u64,
    m: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    // the kernel's pointer arguments: q, k, v, qkv, q_bias, k_bias, v_bias
    let ptrs = [q, kk, v, qkv, q_bias, k_bias, v_bias];
    let shape = (n_heads, n_kv_heads, head_dim);
    launch_qkv_rope(
        k,
        "qkv_rope_forward",
        &ptrs,
        (qkv, [q, kk, v]),
        (positions, inv_freq),
        m,
        shape,
    )
}

/// Launches `qkv_rope_forward` or `qkv_rope_backward`: `(ptrs..., const u32* positions, const
/// float* inv_freq, int m, int n_heads, int n_kv_heads, int head_dim)`, one item per (token, 8 or
/// 1 frequencies) over every head of the product's rows; `product` is the product's pointer and
/// q's, k's and v's (or their gradients'), for the 128-bit condition.
fn launch_qkv_rope(
    k: &dyn Launcher,
    kernel: &'static str,
    ptrs: &[u64],
    (qkv, parts): (u64, [u64; 3]),
    (positions, inv_freq): (u64, u64),
    m: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) -> Result<()> {
    let ints = qkv_shapes(kernel, m, (n_heads, n_kv_heads, head_dim))?;
    if m == 0 {
        return Ok(());
    }
    let vectorised = qkv_vectorised(qkv, parts, (n_heads, n_kv_heads, head_dim));
    let cfg = rope_config(m, n_heads + 2 * n_kv_heads, head_dim, vectorised);
    let mut l = KernelLaunch::new(MODULE, kernel, cfg);
    for &p in ptrs.iter().chain(&[positions, inv_freq]) {
        l = l.ptr(p);
    }
    for i in ints {
        l = l.i32(i);
    }
    // SAFETY: both kernels take their bf16 pointers in the order of `ptrs`, then positions,
    // inv_freq, m, n_heads, n_kv_heads and head_dim; their callers own q (or dq) of m * n_heads
    // * head_dim bf16, k and v (or dk, dv) of m * n_kv_heads * head_dim bf16, the product (or its
    // gradient) of m * (n_heads + 2 n_kv_heads) * head_dim bf16, the biases (when not 0) of their
    // heads * head_dim bf16, positions of m u32 and inv_freq of head_dim / 2 f32; qkv_shapes
    // bounds the kernel's int sizes.
    unsafe { k.launch(&l) }
}

/// The launch geometry of `qkv_norm_rope_forward`: one warp per (token, head) item.
pub fn norm_rope_config(items: usize) -> LaunchConfig {
    let warps_per_block = BLOCK_THREADS as usize / 32;
    // a grid-stride loop covers the rest: this many blocks fill any GPU
    const MAX_BLOCKS: usize = 1 << 16;
    LaunchConfig {
        grid_dim: (
            items.div_ceil(warps_per_block).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Qwen3's attention inputs from their projections' one product qkv (as in `qkv_rope_forward`):
/// q: bf16 [m, n_heads * head_dim] = the rotation of q' + q_bias's heads each RMS-normalised and
/// scaled by q_norm (bf16 [head_dim]), k: bf16 [m, n_kv_heads * head_dim] likewise from k' +
/// k_bias and k_norm, and v = v' + v_bias; q_raw and k_raw (0 = not kept) receive q' + q_bias and
/// k' + k_bias. Biases bf16 [heads * head_dim], 0 = none; positions: u32 [m]; inv_freq: f32
/// [head_dim / 2].
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope_forward(
    k: &dyn Launcher,
    (q, kk, v): (u64, u64, u64),
    (q_raw, k_raw): (u64, u64),
    qkv: u64,
    (q_bias, k_bias, v_bias): (u64, u64, u64),
    (q_norm, k_norm): (u64, u64),
    positions: u64,
    inv_freq: u64,
    m: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    eps: f32,
) -> Result<()> {
    const KERNEL: &str = "qkv_norm_rope_forward";
    let [m_i, n_heads_i, n_kv_i, head_dim_i] =
        qkv_shapes(KERNEL, m, (n_heads, n_kv_heads, head_dim))?;
    if m == 0 {
        return Ok(());
    }
    let items = m * (n_heads + 2 * n_kv_heads);
    let l = KernelLaunch::new(MODULE, KERNEL, norm_rope_config(items))
        .ptr(q)
        .ptr(kk)
        .ptr(v)
        .ptr(q_raw)
        .ptr(k_raw)
        .ptr(qkv)
        .ptr(q_bias)
        .ptr(k_bias)
        .ptr(v_bias)
        .ptr(q_norm)
        .ptr(k_norm)
        .ptr(positions)
        .ptr(inv_freq)
        .i32(m_i)
        .i32(n_heads_i)
        .i32(n_kv_i)
        .i32(head_dim_i)
        .f32(eps);
    // SAFETY: matches `(bf16* q, bf16* k, bf16* v, bf16* q_raw, bf16* k_raw, const bf16* qkv,
    // const bf16* q_bias, const bf16* k_bias, const bf16* v_bias, const bf16* q_norm, const bf16*
    // k_norm, const u32* positions, const float* inv_freq, int m, int n_heads, int n_kv_heads, int
    // head_dim, float eps)`; the caller owns q and q_raw (when not 0) of m * n_heads * head_dim
    // bf16, k, k_raw (when not 0) and v of m * n_kv_heads * head_dim bf16, qkv of m * (n_heads +
    // 2 n_kv_heads) * head_dim bf16, the biases (when not 0) of their heads * head_dim bf16, the
    // norms of head_dim bf16, positions of m u32 and inv_freq of head_dim / 2 f32; qkv_shapes
    // bounds the sizes.
    unsafe { k.launch(&l) }
}

/// The gradient of the rotation: dx: bf16 [m, n_heads * head_dim] rotated back (by −position ·
/// inv_freq) in place.
pub fn rope_backward(
    k: &dyn Launcher,
    dx: u64,
    positions: u64,
    inv_freq: u64,
    m: usize,
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    const KERNEL: &str = "rope_backward";
    let (m_i, n_heads_i, head_dim_i) = check_shapes(KERNEL, m, n_heads, head_dim)?;
    if m == 0 {
        return Ok(());
    }
    let vectorised = (head_dim / 2).is_multiple_of(BF16_VEC) && aligned16(&[dx]);
    let cfg = rope_config(m, n_heads, head_dim, vectorised);
    let l = KernelLaunch::new(MODULE, KERNEL, cfg)
        .ptr(dx)
        .ptr(positions)
        .ptr(inv_freq)
        .i32(m_i)
        .i32(n_heads_i)
        .i32(head_dim_i);
    // SAFETY: matches `(bf16* dx, const u32* positions, const float* inv_freq, int m,
    // int n_heads, int head_dim)`; the caller owns dx of m * n_heads * head_dim bf16, positions of
    // m u32 and inv_freq of head_dim / 2 f32, and m * head_dim / 2 fits the kernel's int index.
    unsafe { k.launch(&l) }
}

/// The gradient of `qkv_rope_forward` without head norms: dqkv: bf16 [m, (n_heads + 2
/// n_kv_heads) * head_dim], each row dq's (bf16 [m, n_heads * head_dim]) and dk's (bf16 [m,
/// n_kv_heads * head_dim]) rotated back (by −position · inv_freq) and dv's (as dk) side by side.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_backward(
    k: &dyn Launcher,
    dqkv: u64,
    (dq, dk, dv): (u64, u64, u64),
    positions: u64,
    inv_freq: u64,
    m: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let ptrs = [dqkv, dq, dk, dv];
    let shape = (n_heads, n_kv_heads, head_dim);
    launch_qkv_rope(
        k,
        "qkv_rope_backward",
        &ptrs,
        (dqkv, [dq, dk, dv]),
        (positions, inv_freq),
        m,
        shape,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert_eq!(check_shapes("rope", 3, 14, 64).unwrap(), (3, 14, 64));
        assert!(check_shapes("rope", 0, 14, 64).is_ok());
        assert!(check_shapes("rope", 3, 14, 63).is_err()); // odd head_dim
        assert!(check_shapes("rope", 3, 14, 0).is_err());
        assert!(check_shapes("rope", 3, 0, 64).is_err());
        assert!(check_shapes("rope", 1 << 26, 1, 128).is_err()); // m * half > i32::MAX
        assert!(check_shapes("rope", usize::MAX, 2, 2).is_err());
    }

    #[test]
    fn decode_splits_every_head_prefill_shares_sincos() {
        // decode: 8 tokens of Qwen2.5-0.5B queries (14 heads of 64): 8 * 4 vector items
        let c = rope_config(8, 14, 64, true);
        assert_eq!((c.grid_dim, c.block_dim), ((1, 14, 1), (32, 1, 1)));
        // prefill of 4096 tokens: 4096 * 4 items, heads in slices of 4
        let c = rope_config(4096, 14, 64, true);
        assert_eq!((c.grid_dim, c.block_dim), ((64, 4, 1), (256, 1, 1)));
        // scalar path (head_dim 6: half 3): every frequency is an item
        let c = rope_config(5, 2, 6, false);
        assert_eq!((c.grid_dim, c.block_dim), ((1, 2, 1), (32, 1, 1)));
    }

    #[test]
    fn grid_y_stays_within_the_driver_limit() {
        assert_eq!(heads_grid_y(10, 100_000), MAX_GRID_Y as u32);
        assert_eq!(heads_grid_y(1 << 20, 1), 1);
        assert_eq!(heads_grid_y(1 << 20, 14), 4);
    }
}
