//! Launchers for kernels/flash_attention.cu: fused causal attention over query tiles (forward
//! with log-sum-exp, and backward). The CPU reference is `backend::cpu::attention`; the tiles
//! come from [`AttentionPlan`](crate::cuda::attention_plan::AttentionPlan).

use anyhow::{ensure, Context, Result};
use cudarc::driver::LaunchConfig;

use super::attention::check_attention_dims;
use crate::cuda::attention_plan::{
    KEY_TILE_ROWS, QUERY_TILE_ROWS, WIDE_KEY_TILE_ROWS, WIDE_QUERY_TILE_ROWS,
};
use crate::cuda::launch::{grid_1d, to_i32, KernelLaunch, Launcher};

/// Threads per block of every kernel here (`FLASH_THREADS`).
pub const FLASH_THREADS: u32 = 128;
/// Head dims with a fused kernel; others use kernels/attention.cu.
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Keys per step: `FWD_KEYS` and `DQ_KEYS` in the kernel file.
const FORWARD_KEYS: usize = 64;
const DQ_KEYS: usize = 32;
/// bf16 padding per shared-memory row (`TILE_PAD` in kernels/mma.cuh).
const TILE_PAD: usize = 8;
/// Largest gridDim.y, which holds the head.
const MAX_GRID_Y: usize = 65_535;

pub fn supports_head_dim(head_dim: usize) -> bool {
    FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Which fused forward kernel: query tiles of 64 rows (16 per warp) or 128 (32 per warp, each
/// K/V fragment feeding two products; attention_plan::wide_query_tiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashForward {
    Narrow,
    Wide,
}

impl FlashForward {
    /// Wide when its 128-row tiles are at least half full on average (long prefill runs,
    /// training sequences); a batch of short chunks would leave most of its rows idle.
    pub fn choose(wide_tiles: usize, tokens: usize) -> Self {
        if tokens >= wide_tiles.max(1) * WIDE_QUERY_TILE_ROWS / 2 {
            FlashForward::Wide
        } else {
            FlashForward::Narrow
        }
    }

    /// m16 row slabs per warp: `SLABS` of the kernel's flash_forward.
    fn slabs(self) -> usize {
        match self {
            FlashForward::Narrow => 1,
            FlashForward::Wide => 2,
        }
    }
}

/// Which fused backward: the dq kernel then the dk/dv kernel (7 products: each recomputes S and
/// dP), or one kernel for all three (5 products; dq summed over key tiles in turns, in f32) over
/// key tiles of 64 (4 warps) or 128 keys (8 warps: AttentionPlan::wide_key_tiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashBackward {
    Split,
    Fused,
    FusedWide,
}

impl FlashBackward {
    pub const ALL: [FlashBackward; 3] = [
        FlashBackward::Split,
        FlashBackward::Fused,
        FlashBackward::FusedWide,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlashBackward::Split => "split",
            FlashBackward::Fused => "fused",
            FlashBackward::FusedWide => "fused-wide",
        }
    }

    /// Keys per key tile (the tiles `FlashGrads::key_tiles` must hold).
    pub fn key_tile_rows(self) -> usize {
        match self {
            FlashBackward::Split | FlashBackward::Fused => KEY_TILE_ROWS,
            FlashBackward::FusedWide => WIDE_KEY_TILE_ROWS,
        }
    }

    /// Query tiles in shared memory at once (`STAGES` of the dk/dv kernels): the wide kernel
    /// copies the next while it works on one.
    fn query_stages(self) -> usize {
        match self {
            FlashBackward::Split | FlashBackward::Fused => 1,
            FlashBackward::FusedWide => 2,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// The kernels of one head dim.
struct Kernels {
    forward: &'static str,
    forward_wide: &'static str,
    dq: &'static str,
    dkdv: &'static str,
    fused_backward: &'static str,
    fused_backward_wide: &'static str,
}

macro_rules! kernels_of {
    ($d:literal) => {
        Kernels {
            forward: concat!("flash_attention_forward_d", $d),
            forward_wide: concat!("flash_attention_forward_wide_d", $d),
            dq: concat!("flash_attention_backward_dq_d", $d),
            dkdv: concat!("flash_attention_backward_dkdv_d", $d),
            fused_backward: concat!("flash_attention_backward_fused_d", $d),
            fused_backward_wide: concat!("flash_attention_backward_fused_wide_d", $d),
        }
    };
}

fn kernels(head_dim: usize) -> Result<Kernels> {
    Ok(match head_dim {
        32 => kernels_of!(32),
        64 => kernels_of!(64),
        128 => kernels_of!(128),
        _ => anyhow::bail!("fused attention supports head_dim {FLASH_HEAD_DIMS:?}, not {head_dim}"),
    })
}

/// Dynamic shared memory of each kernel in bytes: bf16 tiles of rows of head_dim + TILE_PAD.
/// The forward stages two steps of K and V; its keys per step and whether the query tile waits
/// in shared memory follow forward_keys() and forward_q_in_registers() of the kernel file.
pub fn forward_shared_bytes(head_dim: usize, variant: FlashForward) -> u32 {
    let slabs = variant.slabs();
    let q_in_registers = slabs * head_dim <= 128;
    let keys = if q_in_registers {
        FORWARD_KEYS
    } else {
        FORWARD_KEYS / 2
    };
    let q_rows = if q_in_registers {
        0
    } else {
        slabs * QUERY_TILE_ROWS
    };
    ((2 * 2 * keys + q_rows) * (head_dim + TILE_PAD) * 2) as u32
}
pub fn dq_shared_bytes(head_dim: usize) -> u32 {
    (2 * 2 * DQ_KEYS * (head_dim + TILE_PAD) * 2) as u32 // two stages of K, V
}
pub fn dkdv_shared_bytes(head_dim: usize) -> u32 {
    key_tile_kernel_bytes(head_dim, KEY_TILE_ROWS, 1, false)
}
pub fn fused_backward_shared_bytes(head_dim: usize, variant: FlashBackward) -> u32 {
    key_tile_kernel_bytes(
        head_dim,
        variant.key_tile_rows(),
        variant.query_stages(),
        true,
    )
}
/// The dK/dV kernels' carve-up: K and V of `keys` keys; `stages` query tiles of Q and dO, each
/// with its lse and dsum (f32); with `ds`, the fused kernels' dS^T [keys, FLASH_ROWS + TILE_PAD].
fn key_tile_kernel_bytes(head_dim: usize, keys: usize, stages: usize, ds: bool) -> u32 {
    let ds_bytes = if ds {
        keys * (QUERY_TILE_ROWS + TILE_PAD) * 2
    } else {
        0
    };
    ((2 * keys + stages * 2 * QUERY_TILE_ROWS) * (head_dim + TILE_PAD) * 2
        + stages * 2 * QUERY_TILE_ROWS * 4
        + ds_bytes) as u32
}

/// The problem every kernel here shares: the batch, the cache and the tiles on the device.
#[derive(Debug, Clone, Copy)]
pub struct FlashProblem {
    pub q: u64,       // bf16 [m, n_heads * head_dim]
    pub cache_k: u64, // bf16 [slots, capacity, n_kv_heads * head_dim], rows 16-byte aligned
    pub cache_v: u64,
    pub tiles: u64, // u32 [query tiles, 4] (AttentionPlan::query_tiles)
    pub num_tiles: usize,
    pub m: usize,
    pub capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl FlashProblem {
    fn check(&self, op: &str) -> Result<(i32, i32, i32)> {
        let dims = check_attention_dims(
            op,
            self.m,
            self.capacity,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
        )?;
        ensure!(
            self.n_heads <= MAX_GRID_Y,
            "{op}: n_heads {} exceeds the grid limit",
            self.n_heads
        );
        to_i32(op, "query tiles", self.num_tiles)?;
        Ok((dims.capacity, dims.n_heads, dims.n_kv_heads))
    }

    /// One block per (query tile, head), as the forward and the dq kernel take them.
    fn query_tile_grid(&self, shared_mem_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.num_tiles as u32, self.n_heads as u32, 1),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes,
        }
    }

    fn scale(&self) -> f32 {
        // the same f32 value as the CPU reference
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// out, lse (0 for none) of the causal attention of `p` (see kernels/flash_attention.cu), whose
/// tiles are those of `variant` (AttentionPlan::query_tiles or attention_plan::wide_query_tiles).
/// `out`: bf16 [m, n_heads * head_dim]; `lse`: f32 [m, n_heads].
pub fn flash_attention_forward(
    k: &dyn Launcher,
    p: &FlashProblem,
    variant: FlashForward,
    out: u64,
    lse: u64,
) -> Result<()> {
    const OP: &str = "flash_attention_forward";
    let (capacity, n_heads, n_kv_heads) = p.check(OP)?;
    let names = kernels(p.head_dim)?;
    let forward = match variant {
        FlashForward::Narrow => names.forward,
        FlashForward::Wide => names.forward_wide,
    };
    if p.num_tiles == 0 {
        return Ok(());
    }
    let shared = forward_shared_bytes(p.head_dim, variant);
    let scale = p.scale();
    let l = KernelLaunch::new("flash_attention", forward, p.query_tile_grid(shared))
        .ptr(out)
        .ptr(lse)
        .ptr(p.q)
        .ptr(p.cache_k)
        .ptr(p.cache_v)
        .ptr(p.tiles)
        .i32(capacity)
        .i32(n_heads)
        .i32(n_kv_heads)
        .f32(scale);
    // SAFETY: the arguments match flash_attention_forward{,_wide}_d{D}(bf16* out, float* lse (may be
    // null), const bf16* q, const bf16* cache_k, const bf16* cache_v, const uint4* tiles,
    // int capacity, int n_heads, int n_kv_heads, float scale); the caller owns buffers of the
    // documented shapes and built the tiles from a placement checked against the cache; one block
    // per (tile, head) with the shared memory the kernel carves up.
    unsafe { k.launch(&l) }
}

/// The gradient buffers of one backward call.
#[derive(Debug, Clone, Copy)]
pub struct FlashGrads {
    pub dq: u64,       // bf16 [m, n_heads * head_dim], overwritten
    pub dcache_k: u64, // bf16, the cache's shape, accumulated
    pub dcache_v: u64,
    pub dout: u64,      // bf16 [m, n_heads * head_dim]
    pub out: u64,       // bf16 [m, n_heads * head_dim], the forward's output
    pub lse: u64,       // f32 [m, n_heads], the forward's
    pub dsum: u64,      // f32 [m, n_heads] scratch
    pub key_tiles: u64, // u32 [key tiles, 4] (AttentionPlan::key_tiles)
    pub num_key_tiles: usize,
    /// Scratch of the fused variants (0 for Split): f32 [m, n_heads * head_dim], 8-byte aligned,
    /// and i32 [1 + query tiles * n_heads] (zeroed here: a ticket counter, then the turns).
    pub dq_acc: u64,
    pub turns: u64,
}

/// The backward's scratch, one f32 buffer of `floats` values: dsum [m, n_heads], then for the
/// fused variants dq_acc [m, n_heads * head_dim] (from an even float: 8-byte aligned when the
/// buffer is) and the turns, i32 [1 + query tiles * n_heads].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardScratch {
    pub floats: usize,
    /// (dq_acc, turns) offsets in floats; None for Split, which uses neither.
    fused: Option<(usize, usize)>,
}

impl BackwardScratch {
    pub fn new(p: &FlashProblem, variant: FlashBackward) -> Self {
        let dsum = (p.m * p.n_heads).next_multiple_of(2);
        if variant == FlashBackward::Split {
            return BackwardScratch {
                floats: dsum,
                fused: None,
            };
        }
        let dq_acc = p.m * p.n_heads * p.head_dim;
        BackwardScratch {
            floats: dsum + dq_acc + 1 + p.num_tiles * p.n_heads,
            fused: Some((dsum, dsum + dq_acc)),
        }
    }

    /// (dsum, dq_acc, turns) in the scratch buffer at `base` (dq_acc and turns 0 for Split).
    pub fn pointers(&self, base: u64) -> (u64, u64, u64) {
        match self.fused {
            None => (base, 0, 0),
            Some((dq_acc, turns)) => (base, base + 4 * dq_acc as u64, base + 4 * turns as u64),
        }
    }
}

/// The backward of [`flash_attention_forward`] by `variant`: dsum = rowsum(dout ∘ out), then dq
/// and dK/dV (Split: two kernels; Fused: one, then dq_acc converted to dq).
pub fn flash_attention_backward(
    k: &dyn Launcher,
    p: &FlashProblem,
    g: &FlashGrads,
    variant: FlashBackward,
) -> Result<()> {
    const OP: &str = "flash_attention_backward";
    let (capacity, n_heads, n_kv_heads) = p.check(OP)?;
    let names = kernels(p.head_dim)?;
    ensure!(
        p.n_kv_heads <= MAX_GRID_Y,
        "{OP}: n_kv_heads {} exceeds the grid limit",
        p.n_kv_heads
    );
    to_i32(OP, "key tiles", g.num_key_tiles)?;
    to_i32(OP, "key tiles * n_kv_heads", g.num_key_tiles * p.n_kv_heads)?;
    if variant != FlashBackward::Split {
        ensure!(
            g.dq_acc != 0 && g.dq_acc.is_multiple_of(8) && g.turns != 0,
            "{OP}: the fused backward needs an 8-byte aligned dq_acc and turns"
        );
    }
    if p.num_tiles == 0 {
        return Ok(());
    }
    let scale = p.scale();

    let rows = p.m * p.n_heads;
    let rows_i32 = to_i32(OP, "m * n_heads", rows)?;
    let head_dim = p.head_dim as i32;
    let l = KernelLaunch::new(
        "flash_attention",
        "flash_attention_backward_dot",
        grid_1d(rows * 32, FLASH_THREADS),
    )
    .ptr(g.dsum)
    .ptr(g.dout)
    .ptr(g.out)
    .i32(rows_i32)
    .i32(head_dim);
    // SAFETY: flash_attention_backward_dot(float* dsum, const bf16* dout, const bf16* out,
    // int rows, int head_dim): rows = m * n_heads rows of head_dim values; one warp per row.
    unsafe { k.launch(&l) }?;

    match variant {
        FlashBackward::Split => {
            launch_dq(k, p, g, names.dq, (capacity, n_heads, n_kv_heads), scale)?;
            launch_dkdv(
                k,
                p,
                g,
                variant,
                names.dkdv,
                (capacity, n_heads, n_kv_heads),
                scale,
            )
        }
        FlashBackward::Fused | FlashBackward::FusedWide => {
            let turns = 1 + p.num_tiles * p.n_heads;
            // SAFETY: turns holds 1 + num_tiles * n_heads i32 (FlashGrads).
            unsafe { k.fill_zero(g.turns, turns * 4) }.context("zeroing the turns")?;
            let name = match variant {
                FlashBackward::FusedWide => names.fused_backward_wide,
                _ => names.fused_backward,
            };
            launch_dkdv(
                k,
                p,
                g,
                variant,
                name,
                (capacity, n_heads, n_kv_heads),
                scale,
            )?;
            super::elementwise::convert_f32_to_bf16(k, g.dq, g.dq_acc, p.m * p.n_heads * p.head_dim)
        }
    }
}

fn launch_dq(
    k: &dyn Launcher,
    p: &FlashProblem,
    g: &FlashGrads,
    name: &'static str,
    (capacity, n_heads, n_kv_heads): (i32, i32, i32),
    scale: f32,
) -> Result<()> {
    let shared = dq_shared_bytes(p.head_dim);
    let l = KernelLaunch::new("flash_attention", name, p.query_tile_grid(shared))
        .ptr(g.dq)
        .ptr(g.dout)
        .ptr(g.lse)
        .ptr(g.dsum)
        .ptr(p.q)
        .ptr(p.cache_k)
        .ptr(p.cache_v)
        .ptr(p.tiles)
        .i32(capacity)
        .i32(n_heads)
        .i32(n_kv_heads)
        .f32(scale);
    // SAFETY: flash_attention_backward_dq_d{D}(bf16* dq, const bf16* dout, const float* lse,
    // const float* dsum, const bf16* q, const bf16* cache_k, const bf16* cache_v,
    // const uint4* tiles, int capacity, int n_heads, int n_kv_heads, float scale); shapes as
    // documented on FlashProblem and FlashGrads.
    unsafe { k.launch(&l) }
}

/// The dK/dV kernel (Split), or a fused kernel that also sums dq: the same arguments after the
/// fused kernels' dq_acc and turns.
fn launch_dkdv(
    k: &dyn Launcher,
    p: &FlashProblem,
    g: &FlashGrads,
    variant: FlashBackward,
    name: &'static str,
    (capacity, n_heads, n_kv_heads): (i32, i32, i32),
    scale: f32,
) -> Result<()> {
    if g.num_key_tiles == 0 {
        return Ok(());
    }
    let cfg = match variant {
        FlashBackward::Split => LaunchConfig {
            grid_dim: (g.num_key_tiles as u32, p.n_kv_heads as u32, 1),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: dkdv_shared_bytes(p.head_dim),
        },
        // 1-D (blocks take their key tile and KV head by ticket, key tile major); one warp per 16
        // keys of the tile
        FlashBackward::Fused | FlashBackward::FusedWide => LaunchConfig {
            grid_dim: ((g.num_key_tiles * p.n_kv_heads) as u32, 1, 1),
            block_dim: ((variant.key_tile_rows() / 16 * 32) as u32, 1, 1),
            shared_mem_bytes: fused_backward_shared_bytes(p.head_dim, variant),
        },
    };
    let mut l = KernelLaunch::new("flash_attention", name, cfg);
    if variant != FlashBackward::Split {
        l = l.ptr(g.dq_acc).ptr(g.turns);
    }
    let l = l
        .ptr(g.dcache_k)
        .ptr(g.dcache_v)
        .ptr(g.dout)
        .ptr(g.lse)
        .ptr(g.dsum)
        .ptr(p.q)
        .ptr(p.cache_k)
        .ptr(p.cache_v)
        .ptr(p.tiles)
        .ptr(g.key_tiles)
        .i32(capacity)
        .i32(n_heads)
        .i32(n_kv_heads)
        .f32(scale);
    // SAFETY: the arguments match flash_attention_backward_dkdv_d{D}(bf16* dcache_k,
    // bf16* dcache_v, const bf16* dout, const float* lse, const float* dsum, const bf16* q,
    // const bf16* cache_k, const bf16* cache_v, const uint4* tiles, const uint4* key_tiles,
    // int capacity, int n_heads, int n_kv_heads, float scale), and the fused kernels' the same
    // after (float* dq_acc, int* turns): dq_acc [m, q_dim] f32 and the zeroed turns [1 + query
    // tiles * n_heads] as documented on FlashGrads. Each key tile (of the variant's size, in key
    // order: AttentionPlan) names a slot's range of query tiles, every slot's key 0 is in a tile
    // (so every dq row is stored before it is added to), each block owns its keys' rows of the
    // gradient caches, and has the threads and shared memory its kernel carves up.
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_the_devices() {
        // sm_80 allows 163 KiB per block after opting in (launch.rs), sm_90 227 KiB
        for d in FLASH_HEAD_DIMS {
            for bytes in [
                forward_shared_bytes(d, FlashForward::Narrow),
                forward_shared_bytes(d, FlashForward::Wide),
                dq_shared_bytes(d),
                dkdv_shared_bytes(d),
                fused_backward_shared_bytes(d, FlashBackward::Fused),
                fused_backward_shared_bytes(d, FlashBackward::FusedWide),
            ] {
                assert!(bytes <= 163 * 1024, "d {d}: {bytes}");
            }
        }
        assert_eq!(forward_shared_bytes(128, FlashForward::Narrow), 69_632);
        // 32 keys per step in two stages of K and V, and the 128-row query tile
        assert_eq!(forward_shared_bytes(128, FlashForward::Wide), 69_632);
        assert_eq!(forward_shared_bytes(64, FlashForward::Wide), 36_864);
        assert_eq!(dq_shared_bytes(128), 34_816);
        assert_eq!(dkdv_shared_bytes(128), 70_144);
        assert_eq!(
            fused_backward_shared_bytes(128, FlashBackward::Fused),
            70_144 + 64 * 72 * 2
        );
        // 128 keys of K and V, two stages of query tiles and statistics, dS^T [128, 72]
        assert_eq!(
            fused_backward_shared_bytes(128, FlashBackward::FusedWide),
            (2 * 128 + 2 * 2 * 64) * 136 * 2 + 2 * 512 + 128 * 72 * 2
        );
    }

    #[test]
    fn every_supported_head_dim_has_kernels_and_others_are_refused() {
        for d in FLASH_HEAD_DIMS {
            let k = kernels(d).unwrap();
            for name in [
                k.forward,
                k.forward_wide,
                k.dq,
                k.dkdv,
                k.fused_backward,
                k.fused_backward_wide,
            ] {
                assert!(name.ends_with(&format!("_d{d}")), "{name}");
            }
            assert_eq!(k.forward_wide, format!("flash_attention_forward_wide_d{d}"));
        }
        assert!(!supports_head_dim(96));
        let e = kernels(96).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("not 96"), "{e}");
    }

    #[test]
    fn the_wide_forward_takes_tiles_at_least_half_full() {
        // 2 × 100 tokens: tiles of 100 rows
        assert_eq!(FlashForward::choose(2, 200), FlashForward::Wide);
        // chunks of 17 tokens: one tile each
        assert_eq!(FlashForward::choose(3, 51), FlashForward::Narrow);
        assert_eq!(FlashForward::choose(0, 0), FlashForward::Narrow);
    }

    #[test]
    fn backward_scratch_holds_dsum_then_the_fused_variants_dq_acc_and_turns() {
        let p = FlashProblem {
            q: 0,
            cache_k: 0,
            cache_v: 0,
            tiles: 0,
            num_tiles: 3,
            m: 131,
            capacity: 256,
            n_heads: 7,
            n_kv_heads: 1,
            head_dim: 64,
        };
        let split = BackwardScratch::new(&p, FlashBackward::Split);
        assert_eq!(split.floats, 131 * 7 + 1); // dsum, rounded up to an even count
        assert_eq!(split.pointers(1024), (1024, 0, 0));
        for v in [FlashBackward::Fused, FlashBackward::FusedWide] {
            let s = BackwardScratch::new(&p, v);
            assert_eq!(s.floats, 918 + 131 * 7 * 64 + 1 + 3 * 7);
            let (dsum, dq_acc, turns) = s.pointers(1024);
            assert_eq!((dsum, dq_acc), (1024, 1024 + 4 * 918));
            assert!(dq_acc.is_multiple_of(8));
            assert_eq!(turns, dq_acc + 4 * 131 * 7 * 64);
            // an empty batch still has its (empty) dq_acc and its ticket counter
            let empty = FlashProblem {
                m: 0,
                num_tiles: 0,
                ..p
            };
            let s = BackwardScratch::new(&empty, v);
            assert_eq!((s.floats, s.pointers(1024)), (1, (1024, 1024, 1024)));
        }
    }

    #[test]
    fn backward_variants_round_trip_their_names() {
        for v in FlashBackward::ALL {
            assert_eq!(FlashBackward::from_name(v.name()), Some(v));
        }
        assert_eq!(FlashBackward::from_name("fast"), None);
    }
}
