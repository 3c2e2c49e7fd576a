//! Launchers for kernels/decode_attention.cu: attention of a few tokens per sequence over the KV
//! cache, split along the keys when few (token, KV head) pairs are active (flash-decoding). Head
//! dims 64 and 128 with up to 16 query heads per KV head run the tensor-core kernel
//! (decode_attention_mma_d{64,128}); other supported shapes the fp32 one (decode_attention).

use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;

use super::attention::check_attention_dims;
use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

/// `DECODE_THREADS`, `DECODE_KEYS`, `DECODE_MAX_GROUP`, `DECODE_MAX_HEAD_DIM` in the kernel file.
pub const DECODE_THREADS: u32 = 128;
const DECODE_KEYS: usize = 64;
pub const DECODE_MAX_GROUP: usize = 8;
pub const DECODE_MAX_HEAD_DIM: usize = 256;
/// bf16 padding per shared-memory row (`TILE_PAD` in kernels/mma.cuh).
const TILE_PAD: usize = 8;
/// A split covers at least this many keys (two pipelined steps): fewer would spend more on
/// merging than they save.
const MIN_SPLIT_KEYS: usize = 128;
/// Prefixes shorter than this are not split: the merge kernel's launch would cost more than the
/// few microseconds the whole call takes.
const SPLIT_FROM_KEYS: usize = 1024;
/// Blocks per multiprocessor the splits aim for (a block is 4 warps: 16 warps per SM in flight).
const BLOCKS_PER_SM: usize = 4;
/// Largest gridDim.y / gridDim.z.
const MAX_GRID_YZ: usize = 65_535;

/// `DECODE_MMA_MAX_GROUP`: the query heads of a group are the rows of one m16 tile.
const DECODE_MMA_MAX_GROUP: usize = 16;

/// The shapes some decode kernel takes: `supports_fp32` or `supports_mma`.
pub fn supports(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> bool {
    supports_fp32(n_heads, n_kv_heads, head_dim) || supports_mma(n_heads, n_kv_heads, head_dim)
}

/// The fp32 kernel: head dims in 16-byte vectors up to 256 and GQA groups up to 8 (the group's
/// query heads share one block).
fn supports_fp32(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> bool {
    n_kv_heads > 0
        && n_heads.is_multiple_of(n_kv_heads)
        && n_heads / n_kv_heads <= DECODE_MAX_GROUP
        && head_dim.is_multiple_of(8)
        && head_dim > 0
        && head_dim <= DECODE_MAX_HEAD_DIM
}

/// The tensor-core kernel: head dims 64 and 128, GQA groups up to 16.
pub fn supports_mma(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> bool {
    n_kv_heads > 0
        && n_heads.is_multiple_of(n_kv_heads)
        && n_heads / n_kv_heads <= DECODE_MMA_MAX_GROUP
        && matches!(head_dim, 64 | 128)
}

/// (splits, keys per split) for `m` tokens whose longest prefix has `max_len` keys: enough blocks
/// for BLOCKS_PER_SM per multiprocessor, each split at least MIN_SPLIT_KEYS keys, a multiple of
/// DECODE_KEYS; no split below SPLIT_FROM_KEYS.
pub fn plan_splits(m: usize, n_kv_heads: usize, max_len: usize, sm_count: usize) -> (usize, usize) {
    let blocks = (m * n_kv_heads).max(1);
    let max_splits = if max_len < SPLIT_FROM_KEYS {
        1
    } else {
        max_len.div_ceil(MIN_SPLIT_KEYS)
    };
    let splits = (BLOCKS_PER_SM * sm_count)
        .div_ceil(blocks)
        .clamp(1, max_splits);
    let split_keys = max_len
        .max(1)
        .div_ceil(splits)
        .next_multiple_of(DECODE_KEYS);
    (max_len.max(1).div_ceil(split_keys), split_keys)
}

/// Elements of the f32 scratch buffers for `splits` > 1: (partial outputs, (max, sum) pairs).
pub fn scratch_sizes(splits: usize, m: usize, n_heads: usize, head_dim: usize) -> (usize, usize) {
    (splits * m * n_heads * head_dim, splits * m * n_heads * 2)
}

/// The tensor-core kernel's two stages of K, V in bf16 (its merge reuses them).
pub fn mma_shared_bytes(head_dim: usize) -> u32 {
    (2 * 2 * DECODE_KEYS * (head_dim + TILE_PAD) * 2) as u32
}

pub fn shared_bytes(group: usize, head_dim: usize) -> u32 {
    // q [group, head_dim] f32, scores [group, DECODE_KEYS] f32, two stages of K, V in bf16
    let stages = 2 * 2 * DECODE_KEYS * (head_dim + TILE_PAD) * 2;
    (group * head_dim * 4 + group * DECODE_KEYS * 4 + stages) as u32
}

/// The batch and cache, as in `attention::attention_forward`.
#[derive(Debug, Clone, Copy)]
pub struct DecodeProblem {
    pub q: u64,       // bf16 [m, n_heads * head_dim]
    pub cache_k: u64, // bf16 [slots, capacity, n_kv_heads * head_dim], 16-byte aligned
    pub cache_v: u64,
    pub slots: u64,     // u32 [m], checked against the cache
    pub positions: u64, // u32 [m]
    pub m: usize,
    pub capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// out (bf16 [m, n_heads * head_dim]) and lse (f32 [m, n_heads], or 0). With `splits` > 1,
/// `partial_out` and `partial_stats` are f32 scratch of [`scratch_sizes`] and a second kernel
/// merges the splits; with 1 they are unused (0).
pub fn decode_attention(
    k: &dyn Launcher,
    p: &DecodeProblem,
    out: u64,
    lse: u64,
    (splits, split_keys): (usize, usize),
    (partial_out, partial_stats): (u64, u64),
) -> Result<()> {
    const OP: &str = "decode_attention";
    let dims = check_attention_dims(OP, p.m, p.capacity, p.n_heads, p.n_kv_heads, p.head_dim)?;
    ensure!(
        supports(p.n_heads, p.n_kv_heads, p.head_dim),
        "{OP}: needs head_dim a multiple of 8 up to {DECODE_MAX_HEAD_DIM} and at most \
         {DECODE_MAX_GROUP} query heads per KV head, or head_dim 64 or 128 and at most \
         {DECODE_MMA_MAX_GROUP} (got head_dim {}, {} / {} heads)",
        p.head_dim,
        p.n_heads,
        p.n_kv_heads
    );
    ensure!(
        (1..=MAX_GRID_YZ).contains(&splits) && p.n_kv_heads <= MAX_GRID_YZ,
        "{OP}: {splits} splits or {} KV heads exceed the grid",
        p.n_kv_heads
    );
    ensure!(
        splits == 1 || (partial_out != 0 && partial_stats != 0),
        "{OP}: {splits} splits need scratch buffers"
    );
    if p.m == 0 {
        return Ok(());
    }
    let split_keys_i32 = to_i32(OP, "split_keys", split_keys)?;
    let scale = 1.0 / (p.head_dim as f32).sqrt();
    let group = p.n_heads / p.n_kv_heads;
    let mma = supports_mma(p.n_heads, p.n_kv_heads, p.head_dim);
    let (name, shared) = match (mma, p.head_dim) {
        (true, 64) => ("decode_attention_mma_d64", mma_shared_bytes(64)),
        (true, 128) => ("decode_attention_mma_d128", mma_shared_bytes(128)),
        (true, d) => bail!("{OP}: no tensor-core kernel for head_dim {d}"),
        (false, _) => ("decode_attention", shared_bytes(group, p.head_dim)),
    };
    let cfg = LaunchConfig {
        grid_dim: (p.m as u32, p.n_kv_heads as u32, splits as u32),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut l = KernelLaunch::new("decode_attention", name, cfg)
        .ptr(out)
        .ptr(lse)
        .ptr(partial_out)
        .ptr(partial_stats)
        .ptr(p.q)
        .ptr(p.cache_k)
        .ptr(p.cache_v)
        .ptr(p.slots)
        .ptr(p.positions)
        .i32(dims.m)
        .i32(dims.capacity)
        .i32(dims.n_heads)
        .i32(dims.n_kv_heads);
    if !mma {
        l = l.i32(dims.head_dim); // the mma kernels have it as their template parameter
    }
    let l = l.i32(split_keys_i32).f32(scale);
    // SAFETY: the arguments match decode_attention(bf16* out, float* lse, float* partial_out,
    // float* partial_stats, const bf16* q, const bf16* cache_k, const bf16* cache_v,
    // const u32* slots, const u32* positions, int m, int capacity, int n_heads, int n_kv_heads,
    // int head_dim, int split_keys, float scale), and decode_attention_mma_d{D} the same without
    // head_dim (= D); `supports` holds for the kernel chosen, the caller checked slots and
    // positions against the cache and sized the scratch with scratch_sizes(splits, ..).
    unsafe { k.launch(&l) }?;
    if splits == 1 {
        return Ok(());
    }
    let splits_i32 = splits as i32;
    let cfg = LaunchConfig {
        grid_dim: (p.m as u32, p.n_heads as u32, 1),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new("decode_attention", "decode_attention_combine", cfg)
        .ptr(out)
        .ptr(lse)
        .ptr(partial_out)
        .ptr(partial_stats)
        .i32(dims.m)
        .i32(dims.n_heads)
        .i32(dims.head_dim)
        .i32(splits_i32);
    // SAFETY: decode_attention_combine(bf16* out, float* lse, const float* partial_out,
    // const float* partial_stats, int m, int n_heads, int head_dim, int splits), reading what the
    // launch above wrote (same stream).
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_device_only_when_few_blocks_and_long_prefixes() {
        // one sequence, 2 KV heads, 4096 keys on 132 SMs: 32 splits of 128 keys
        assert_eq!(plan_splits(1, 2, 4096, 132), (32, 128));
        // at most len / 128 splits (rounded up), none below 1024 keys
        assert_eq!(plan_splits(1, 2, 1100, 132), (9, 128));
        assert_eq!(plan_splits(1, 2, 1023, 132), (1, 1024));
        assert_eq!(plan_splits(1, 2, 100, 132), (1, 128));
        // 32 sequences: 64 blocks, 8 splits of 256 keys; a big batch fills the device by itself
        assert_eq!(plan_splits(32, 2, 2048, 132), (8, 256));
        assert_eq!(plan_splits(512, 2, 4096, 132), (1, 4096));
        // splits cover max_len with whole DECODE_KEYS steps
        for (m, len) in [(3, 1000), (1, 1), (7, 65_537), (64, 513)] {
            let (splits, keys) = plan_splits(m, 4, len, 132);
            assert_eq!(keys % DECODE_KEYS, 0);
            assert!(
                splits * keys >= len && (splits - 1) * keys < len,
                "{m} {len}"
            );
        }
    }

    #[test]
    fn supported_shapes_and_shared_memory() {
        assert!(supports(14, 2, 64) && supports(8, 1, 128) && supports(32, 32, 256));
        // group 16: only the tensor-core kernel, at head dims 64 and 128
        assert!(!supports_fp32(16, 1, 64) && supports_mma(16, 1, 64) && supports(16, 1, 128));
        assert!(!supports(16, 1, 96) && !supports(17, 1, 64));
        assert!(supports_mma(14, 2, 64) && supports_mma(7, 1, 128) && !supports_mma(4, 2, 32));
        assert!(!supports(4, 2, 36)); // not a multiple of 8
        assert!(!supports(4, 2, 264));
        // the tensor-core kernel's stages, which its merge (16 rows × 4 warps of f32 O and
        // stats) reuses; 128 needs the opt-in above 48 KiB
        assert_eq!(mma_shared_bytes(64), 2 * 2 * 64 * 72 * 2);
        assert_eq!(mma_shared_bytes(128), 2 * 2 * 64 * 136 * 2);
        for d in [64, 128] {
            assert!(mma_shared_bytes(d) as usize >= 4 * 16 * (d + 2) * 4);
        }
        // the largest case needs the opt-in above 48 KiB and fits sm_80's 163 KiB
        assert!(shared_bytes(DECODE_MAX_GROUP, DECODE_MAX_HEAD_DIM) <= 163 * 1024);
        assert!(shared_bytes(7, 64) <= 48 * 1024);
        assert_eq!(
            shared_bytes(7, 128),
            7 * 128 * 4 + 7 * 64 * 4 + 4 * 64 * 136 * 2
        );
    }
}
