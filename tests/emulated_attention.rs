//! The attention kernels' real source (kernels/flash_attention.cu, kernels/decode_attention.cu),
//! run on the CPU by the emulator in tests/cuda_emulator, against the CPU reference
//! (`backend::cpu::attention_forward` / `attention_backward`) on bf16-rounded inputs: tensor-core
//! fragment layouts, causal masks, ragged tiles, GQA, key splits and the cp.async pipeline, with
//! the launch shapes of the launchers (src/cuda/ops). Tolerance as in `selfcheck` (bf16
//! operands of the products: about 3e-3 expected).

mod emulation_support;

use cuda_emulator::{launch, Launch};
use emulation_support::{assert_close, to_bits, to_f32, Rand};
use thinkshort::backend::{cpu, TokenPlacement};
use thinkshort::cuda::attention_plan::{wide_query_tiles, AttentionPlan};
use thinkshort::cuda::ops::flash_attention::{FlashBackward, FlashForward};
use thinkshort::cuda::ops::{decode_attention as decode, flash_attention as flash};

/// Entry points of kernels/flash_attention.cu and kernels/decode_attention.cu (bf16 = u16).
mod k {
    macro_rules! flash_kernels {
        ($fwd:ident, $wide:ident, $dq:ident, $dkdv:ident, $fused:ident, $fused_wide:ident) => {
            extern "C" {
                pub fn $fwd(
                    out: *mut u16,
                    lse: *mut f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $wide(
                    out: *mut u16,
                    lse: *mut f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $dq(
                    dq: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $fused(
                    dq_acc: *mut f32,
                    turns: *mut i32,
                    dcache_k: *mut u16,
                    dcache_v: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    key_tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $fused_wide(
                    dq_acc: *mut f32,
                    turns: *mut i32,
                    dcache_k: *mut u16,
                    dcache_v: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    key_tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
                pub fn $dkdv(
                    dcache_k: *mut u16,
                    dcache_v: *mut u16,
                    dout: *const u16,
                    lse: *const f32,
                    dsum: *const f32,
                    q: *const u16,
                    cache_k: *const u16,
                    cache_v: *const u16,
                    tiles: *const u32,
                    key_tiles: *const u32,
                    capacity: i32,
                    n_heads: i32,
                    n_kv_heads: i32,
                    scale: f32,
                );
            }
        };
    }
    flash_kernels!(
        flash_attention_forward_d32,
        flash_attention_forward_wide_d32,
        flash_attention_backward_dq_d32,
        flash_attention_backward_dkdv_d32,
        flash_attention_backward_fused_d32,
        flash_attention_backward_fused_wide_d32
    );
    flash_kernels!(
        flash_attention_forward_d64,
        flash_attention_forward_wide_d64,
        flash_attention_backward_dq_d64,
        flash_attention_backward_dkdv_d64,
        flash_attention_backward_fused_d64,
        flash_attention_backward_fused_wide_d64
    );
    flash_kernels!(
        flash_attention_forward_d128,
        flash_attention_forward_wide_d128,
        flash_attention_backward_dq_d128,
        flash_attention_backward_dkdv_d128,
        flash_attention_backward_fused_d128,
        flash_attention_backward_fused_wide_d128
    );

    extern "C" {
        pub fn flash_attention_backward_dot(
            dsum: *mut f32,
            dout: *const u16,
            out: *const u16,
            rows: i32,
            head_dim: i32,
        );

        pub fn decode_attention(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            head_dim: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_mma_d64(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_mma_d128(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *mut f32,
            partial_stats: *mut f32,
            q: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            slots: *const u32,
            positions: *const u32,
            m: i32,
            capacity: i32,
            n_heads: i32,
            n_kv_heads: i32,
            split_keys: i32,
            scale: f32,
        );
        pub fn decode_attention_combine(
            out: *mut u16,
            lse: *mut f32,
            partial_out: *const f32,
            partial_stats: *const f32,
            m: i32,
            n_heads: i32,
            head_dim: i32,
            splits: i32,
        );
    }
}

/// A batch and its cache: every cache row holds random values, also beyond the positions a token
/// may see, so a key the mask should hide changes the result.
struct Problem {
    heads: usize,
    kv_heads: usize,
    d: usize,
    capacity: usize,
    place: TokenPlacement,
    q: (Vec<u16>, Vec<f32>),
    cache_k: (Vec<u16>, Vec<f32>),
    cache_v: (Vec<u16>, Vec<f32>),
}

impl Problem {
    /// `runs`: (slot, first position, tokens) in batch order.
    fn new(
        seed: u64,
        (heads, kv_heads, d): (usize, usize, usize),
        capacity: usize,
        runs: &[(u32, u32, u32)],
    ) -> Self {
        let mut place = TokenPlacement::default();
        for &(slot, first, len) in runs {
            place.slots.extend(std::iter::repeat_n(slot, len as usize));
            place.positions.extend(first..first + len);
        }
        let slots = runs.iter().map(|r| r.0 as usize + 1).max().unwrap_or(1);
        let mut r = Rand(seed);
        let m = place.slots.len();
        Problem {
            heads,
            kv_heads,
            d,
            capacity,
            q: r.bf16s(m * heads * d, 1.0),
            cache_k: r.bf16s(slots * capacity * kv_heads * d, 1.0),
            cache_v: r.bf16s(slots * capacity * kv_heads * d, 1.0),
            place,
        }
    }

    fn m(&self) -> usize {
        self.place.slots.len()
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// (out, lse) of the CPU reference.
    fn forward_reference(&self) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; self.m() * self.heads * self.d];
        let mut lse = vec![0.0; self.m() * self.heads];
        cpu::attention_forward(
            &mut out,
            Some(&mut lse),
            &self.q.1,
            &self.cache_k.1,
            &self.cache_v.1,
            &self.place,
            self.capacity,
            self.heads,
            self.kv_heads,
            self.d,
        );
        (out, lse)
    }
}

type FlashForwardFn = unsafe extern "C" fn(
    *mut u16,
    *mut f32,
    *const u16,
    *const u16,
    *const u16,
    *const u32,
    i32,
    i32,
    i32,
    f32,
);
type FlashDq = unsafe extern "C" fn(
    *mut u16,
    *const u16,
    *const f32,
    *const f32,
    *const u16,
    *const u16,
    *const u16,
    *const u32,
    i32,
    i32,
    i32,
    f32,
);
type FlashDkdv = unsafe extern "C" fn(
    *mut u16,
    *mut u16,
    *const u16,
    *const f32,
    *const f32,
    *const u16,
    *const u16,
    *const u16,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    f32,
);

type FlashFused = unsafe extern "C" fn(
    *mut f32,
    *mut i32,
    *mut u16,
    *mut u16,
    *const u16,
    *const f32,
    *const f32,
    *const u16,
    *const u16,
    *const u16,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    f32,
);

/// The fused backward of head dim d: 4 warps over 64-key tiles, or (wide) 8 over 128.
fn fused_backward_kernel(d: usize, wide: bool) -> FlashFused {
    match (d, wide) {
        (32, false) => k::flash_attention_backward_fused_d32,
        (64, false) => k::flash_attention_backward_fused_d64,
        (128, false) => k::flash_attention_backward_fused_d128,
        (32, true) => k::flash_attention_backward_fused_wide_d32,
        (64, true) => k::flash_attention_backward_fused_wide_d64,
        (128, true) => k::flash_attention_backward_fused_wide_d128,
        _ => panic!("no fused kernel for head dim {d}"),
    }
}

/// (forward, wide forward, dq, dk/dv) of head dim d.
fn flash_kernels(d: usize) -> (FlashForwardFn, FlashForwardFn, FlashDq, FlashDkdv) {
    match d {
        32 => (
            k::flash_attention_forward_d32,
            k::flash_attention_forward_wide_d32,
            k::flash_attention_backward_dq_d32,
            k::flash_attention_backward_dkdv_d32,
        ),
        64 => (
            k::flash_attention_forward_d64,
            k::flash_attention_forward_wide_d64,
            k::flash_attention_backward_dq_d64,
            k::flash_attention_backward_dkdv_d64,
        ),
        128 => (
            k::flash_attention_forward_d128,
            k::flash_attention_forward_wide_d128,
            k::flash_attention_backward_dq_d128,
            k::flash_attention_backward_dkdv_d128,
        ),
        _ => panic!("no fused kernel for head dim {d}"),
    }
}

fn flash_block() -> (u32, u32, u32) {
    (flash::FLASH_THREADS, 1, 1)
}

/// (out, lse) of flash_attention_forward{,_wide}_d{D} over the variant's tiles, launched as the
/// launcher does.
fn flash_forward(p: &Problem, variant: FlashForward) -> (Vec<u16>, Vec<f32>) {
    let (narrow, wide, _, _) = flash_kernels(p.d);
    let (forward, tiles) = match variant {
        FlashForward::Narrow => (narrow, AttentionPlan::new(&p.place).query_tiles),
        FlashForward::Wide => (wide, wide_query_tiles(&p.place)),
    };
    let mut out = vec![0xffffu16; p.m() * p.heads * p.d];
    let mut lse = vec![f32::NAN; p.m() * p.heads];
    let (o, l) = (out.as_mut_ptr(), lse.as_mut_ptr());
    let cfg = Launch {
        grid: (tiles.len() as u32 / 4, p.heads as u32, 1),
        block: flash_block(),
        shared_bytes: flash::forward_shared_bytes(p.d, variant) as usize,
    };
    launch(cfg, || unsafe {
        forward(
            o,
            l,
            p.q.0.as_ptr(),
            p.cache_k.0.as_ptr(),
            p.cache_v.0.as_ptr(),
            tiles.as_ptr(),
            p.capacity as i32,
            p.heads as i32,
            p.kv_heads as i32,
            p.scale(),
        )
    })
    .unwrap_or_else(|e| panic!("{variant:?} flash forward d{}: {e}", p.d));
    (out, lse)
}

/// Both forward kernels against the CPU.
fn check_flash_forward(p: &Problem) {
    let (out_ref, lse_ref) = p.forward_reference();
    for variant in [FlashForward::Narrow, FlashForward::Wide] {
        let (out, lse) = flash_forward(p, variant);
        let what = format!("{variant:?} flash forward d{}", p.d);
        assert_close(&format!("{what} out"), &to_f32(&out), &out_ref);
        assert_close(&format!("{what} lse"), &lse, &lse_ref);
    }
}

/// Ragged prefill (1, 17 and 70 tokens from position 0: tiles of 1, 17, 64 and 6 rows, two key
/// steps) with a GQA group of 4; head dim 64.
#[test]
fn flash_forward_ragged_prefill_with_gqa_matches_the_cpu() {
    check_flash_forward(&Problem::new(
        1,
        (4, 1, 64),
        80,
        &[(0, 0, 1), (1, 0, 17), (2, 0, 70)],
    ));
}

/// A prefill chunk continuing at position 40 (tiles not aligned to the key steps, 3 steps) beside
/// one decode token at position 100; head dim 128, no GQA.
#[test]
fn flash_forward_chunk_after_a_prefix_matches_the_cpu_d128() {
    check_flash_forward(&Problem::new(
        2,
        (2, 2, 128),
        144,
        &[(0, 40, 100), (1, 100, 1)],
    ));
}

/// One sequence of 200 tokens: wide tiles of 128 and 72 rows (a warp's far-side key steps
/// skipped, the second tile's last warps idle), narrow ones of 64, 64, 64 and 8; GQA group 2.
#[test]
fn flash_forward_two_hundred_tokens_matches_the_cpu() {
    check_flash_forward(&Problem::new(11, (2, 1, 64), 208, &[(0, 0, 200)]));
}

/// Head dim 32 with a group of 7 query heads per KV head.
#[test]
fn flash_forward_group_of_seven_matches_the_cpu_d32() {
    check_flash_forward(&Problem::new(3, (7, 1, 32), 48, &[(0, 0, 33)]));
}

/// dq (bf16 bits, or the fused kernel's f32), dK, dV (bf16 bits).
type Grads<Dq> = (Vec<Dq>, Vec<u16>, Vec<u16>);

/// A backward problem: the forward's output and log-sum-exp (CPU), dout, and the gradient caches'
/// start values (the kernels add to them), with dsum from flash_attention_backward_dot.
struct Backward {
    plan: AttentionPlan,
    dout: (Vec<u16>, Vec<f32>),
    out: (Vec<u16>, Vec<f32>),
    lse: Vec<f32>,
    dsum: Vec<f32>,
    dk_start: (Vec<u16>, Vec<f32>),
    dv_start: (Vec<u16>, Vec<f32>),
}

impl Backward {
    fn new(p: &Problem, seed: u64) -> Self {
        let (m, q_len, cache_len) = (p.m(), p.m() * p.heads * p.d, p.cache_k.0.len());
        let mut r = Rand(seed);
        let dout = r.bf16s(q_len, 1.0);
        let dk_start = r.bf16s(cache_len, 0.1);
        let dv_start = r.bf16s(cache_len, 0.1);
        let (out_ref, lse) = p.forward_reference();
        let out_bits = to_bits(&out_ref);
        let out = (out_bits.clone(), to_f32(&out_bits));

        // dsum = rowsum(dout * out): one warp per row
        let rows = m * p.heads;
        let mut dsum = vec![f32::NAN; rows];
        let ds = dsum.as_mut_ptr();
        let warps_per_block = flash::FLASH_THREADS as usize / 32;
        let cfg = Launch {
            grid: (rows.div_ceil(warps_per_block) as u32, 1, 1),
            block: flash_block(),
            shared_bytes: 0,
        };
        launch(cfg, || unsafe {
            k::flash_attention_backward_dot(
                ds,
                dout.0.as_ptr(),
                out_bits.as_ptr(),
                rows as i32,
                p.d as i32,
            )
        })
        .expect("flash_attention_backward_dot");
        let dsum_ref: Vec<f32> = dout
            .1
            .chunks(p.d)
            .zip(out.1.chunks(p.d))
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
            .collect();
        assert_close("flash backward dsum", &dsum, &dsum_ref);
        Backward {
            plan: AttentionPlan::new(&p.place),
            dout,
            out,
            lse,
            dsum,
            dk_start,
            dv_start,
        }
    }

    /// (dq, dK, dV) of the dq kernel then the dk/dv kernel, launched as the launcher does.
    fn split(&self, p: &Problem) -> Grads<u16> {
        let (_, _, dq_kernel, dkdv_kernel) = flash_kernels(p.d);
        let plan = &self.plan;
        let mut dq = vec![0xffffu16; p.m() * p.heads * p.d];
        let dqp = dq.as_mut_ptr();
        let cfg = Launch {
            grid: (plan.num_query_tiles() as u32, p.heads as u32, 1),
            block: flash_block(),
            shared_bytes: flash::dq_shared_bytes(p.d) as usize,
        };
        launch(cfg, || unsafe {
            dq_kernel(
                dqp,
                self.dout.0.as_ptr(),
                self.lse.as_ptr(),
                self.dsum.as_ptr(),
                p.q.0.as_ptr(),
                p.cache_k.0.as_ptr(),
                p.cache_v.0.as_ptr(),
                plan.query_tiles.as_ptr(),
                p.capacity as i32,
                p.heads as i32,
                p.kv_heads as i32,
                p.scale(),
            )
        })
        .unwrap_or_else(|e| panic!("flash_attention_backward_dq_d{}: {e}", p.d));

        let (mut dk, mut dv) = (self.dk_start.0.clone(), self.dv_start.0.clone());
        let (dkp, dvp) = (dk.as_mut_ptr(), dv.as_mut_ptr());
        let cfg = Launch {
            grid: (plan.num_key_tiles() as u32, p.kv_heads as u32, 1),
            block: flash_block(),
            shared_bytes: flash::dkdv_shared_bytes(p.d) as usize,
        };
        launch(cfg, || unsafe {
            dkdv_kernel(
                dkp,
                dvp,
                self.dout.0.as_ptr(),
                self.lse.as_ptr(),
                self.dsum.as_ptr(),
                p.q.0.as_ptr(),
                p.cache_k.0.as_ptr(),
                p.cache_v.0.as_ptr(),
                plan.query_tiles.as_ptr(),
                plan.key_tiles.as_ptr(),
                p.capacity as i32,
                p.heads as i32,
                p.kv_heads as i32,
                p.scale(),
            )
        })
        .unwrap_or_else(|e| panic!("flash_attention_backward_dkdv_d{}: {e}", p.d));
        (dq, dk, dv)
    }

    /// (dq_acc, dK, dV) of the fused kernel `variant` over `key_tiles` (the plan's of its size,
    /// unless a test changes their order), launched as the launcher does: 1-D grid, key tile
    /// major, a warp per 16 keys, turns zeroed.
    fn fused(
        &self,
        p: &Problem,
        variant: FlashBackward,
        key_tiles: &[u32],
    ) -> Result<Grads<f32>, String> {
        let plan = &self.plan;
        let mut dq_acc = vec![f32::NAN; p.m() * p.heads * p.d];
        // the ticket counter, then a turn per (query tile, head)
        let mut turns = vec![0i32; 1 + plan.num_query_tiles() * p.heads];
        let (mut dk, mut dv) = (self.dk_start.0.clone(), self.dv_start.0.clone());
        let (accp, turnp, dkp, dvp) = (
            dq_acc.as_mut_ptr(),
            turns.as_mut_ptr(),
            dk.as_mut_ptr(),
            dv.as_mut_ptr(),
        );
        let blocks = key_tiles.len() / 4 * p.kv_heads;
        let cfg = Launch {
            grid: (blocks as u32, 1, 1),
            block: ((variant.key_tile_rows() / 16 * 32) as u32, 1, 1),
            shared_bytes: flash::fused_backward_shared_bytes(p.d, variant) as usize,
        };
        let kernel = fused_backward_kernel(p.d, variant == FlashBackward::FusedWide);
        launch(cfg, || unsafe {
            kernel(
                accp,
                turnp,
                dkp,
                dvp,
                self.dout.0.as_ptr(),
                self.lse.as_ptr(),
                self.dsum.as_ptr(),
                p.q.0.as_ptr(),
                p.cache_k.0.as_ptr(),
                p.cache_v.0.as_ptr(),
                plan.query_tiles.as_ptr(),
                key_tiles.as_ptr(),
                p.capacity as i32,
                p.heads as i32,
                p.kv_heads as i32,
                p.scale(),
            )
        })?;
        // every block took a ticket, and every key tile of a slot its turn on every (query tile,
        // head) it sees
        assert_eq!(turns[0] as usize, blocks, "tickets");
        for (i, &turn) in turns[1..].iter().enumerate() {
            let tile = &plan.query_tiles[i / p.heads * 4..][..4];
            let seen = (tile[3] + tile[1]).div_ceil(variant.key_tile_rows() as u32);
            assert_eq!(
                turn as u32,
                seen,
                "turns of query tile {} head {}",
                i / p.heads,
                i % p.heads
            );
        }
        Ok((dq_acc, dk, dv))
    }

    /// dq, dK, dV of the CPU reference.
    fn reference(&self, p: &Problem) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dq = vec![0.0; p.m() * p.heads * p.d];
        let (mut dk, mut dv) = (self.dk_start.1.clone(), self.dv_start.1.clone());
        cpu::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &self.dout.1,
            &self.out.1,
            &self.lse,
            &p.q.1,
            &p.cache_k.1,
            &p.cache_v.1,
            &p.place,
            p.capacity,
            p.heads,
            p.kv_heads,
            p.d,
        );
        (dq, dk, dv)
    }

    /// The kernels' dq, dK, dV against the CPU; rows of the gradient caches no query attends to
    /// keep their start values exactly.
    fn check(&self, p: &Problem, what: &str, dq: &[f32], dk: &[u16], dv: &[u16]) {
        let (dq_ref, dk_ref, dv_ref) = self.reference(p);
        assert_close(&format!("{what} d{} dq", p.d), dq, &dq_ref);
        assert_close(&format!("{what} d{} dk", p.d), &to_f32(dk), &dk_ref);
        assert_close(&format!("{what} d{} dv", p.d), &to_f32(dv), &dv_ref);
        let kv_dim = p.kv_heads * p.d;
        for s in 0..p.cache_k.0.len() / (p.capacity * kv_dim) {
            let seen = (p.place.slots.iter().zip(&p.place.positions))
                .filter(|(&slot, _)| slot as usize == s)
                .map(|(_, &pos)| pos as usize + 1)
                .max()
                .unwrap_or(0);
            let unseen = (s * p.capacity + seen) * kv_dim..(s + 1) * p.capacity * kv_dim;
            assert_eq!(
                dk[unseen.clone()],
                self.dk_start.0[unseen.clone()],
                "{what}: dk beyond the keys of slot {s}"
            );
            assert_eq!(
                dv[unseen.clone()],
                self.dv_start.0[unseen],
                "{what}: dv beyond the keys of slot {s}"
            );
        }
    }
}

/// Every backward variant against the CPU: the dq and dk/dv kernels, and the fused kernels over
/// 64- and 128-key tiles (their f32 dq before the launcher's conversion to bf16).
fn check_flash_backward(p: &Problem, seed: u64) {
    let b = Backward::new(p, seed);
    let (dq, dk, dv) = b.split(p);
    b.check(p, "flash backward", &to_f32(&dq), &dk, &dv);
    for (variant, key_tiles) in [
        (FlashBackward::Fused, b.plan.key_tiles.clone()),
        (FlashBackward::FusedWide, b.plan.wide_key_tiles()),
    ] {
        let what = format!("{} flash backward", variant.name());
        let (dq_acc, dk_fused, dv_fused) = b
            .fused(p, variant, &key_tiles)
            .unwrap_or_else(|e| panic!("{what} d{}: {e}", p.d));
        b.check(p, &what, &dq_acc, &dk_fused, &dv_fused);
        // the same dS products and roundings as the dk/dv kernel, key by key
        assert_eq!(dk_fused, dk, "{what}: dk is the dk/dv kernel's");
        assert_eq!(dv_fused, dv, "{what}: dv is the dk/dv kernel's");
    }
}

#[test]
fn flash_backward_ragged_prefill_with_gqa_matches_the_cpu() {
    check_flash_backward(
        &Problem::new(4, (4, 1, 64), 80, &[(0, 0, 1), (1, 0, 17), (2, 0, 70)]),
        40,
    );
}

#[test]
fn flash_backward_chunk_after_a_prefix_matches_the_cpu_d128() {
    check_flash_backward(
        &Problem::new(5, (2, 2, 128), 144, &[(0, 40, 100), (1, 100, 1)]),
        50,
    );
}

#[test]
fn flash_backward_group_of_seven_matches_the_cpu_d32() {
    check_flash_backward(&Problem::new(6, (7, 1, 32), 48, &[(0, 0, 33)]), 60);
}

#[test]
fn flash_backward_of_several_key_tiles_per_query_tile_matches_the_cpu_d64() {
    // slot 1: 230 tokens (4 query and 4 key tiles: up to 4 turns per query tile), slot 0: 70
    check_flash_backward(
        &Problem::new(7, (4, 2, 64), 240, &[(1, 0, 230), (0, 0, 70)]),
        70,
    );
}

#[test]
fn fused_backward_traps_when_a_key_tile_would_add_out_of_turn() {
    // key tile 1 (keys 64..130, or 128..130 for the wide kernel) ahead of key tile 0 in ticket
    // order: its turn never comes while it waits, and the kernel must trap rather than add first
    let p = Problem::new(8, (2, 1, 32), 130, &[(0, 0, 130)]);
    let b = Backward::new(&p, 80);
    for (variant, tiles) in [
        (FlashBackward::Fused, b.plan.key_tiles.clone()),
        (FlashBackward::FusedWide, b.plan.wide_key_tiles()),
    ] {
        let mut swapped = tiles.clone();
        swapped[..8].rotate_left(4);
        assert_ne!(swapped, tiles);
        let e = b.fused(&p, variant, &swapped).map(|_| ()).unwrap_err();
        assert!(e.contains("__trap"), "{}: {e}", variant.name());
    }
}

/// Decode attention (one token per sequence) with `split_keys` keys per split: the fp32 or the
/// tensor-core kernel as the launcher picks it, then the merge when there are several splits.
fn check_decode(p: &Problem, split_keys: usize) {
    let (m, heads, d, kv_heads) = (p.m(), p.heads, p.d, p.kv_heads);
    let max_len = p
        .place
        .positions
        .iter()
        .map(|&x| x as usize + 1)
        .max()
        .unwrap();
    let splits = max_len.div_ceil(split_keys);
    let (partial_len, stats_len) = decode::scratch_sizes(splits, m, heads, d);
    let mut partial = vec![f32::NAN; partial_len.max(1)];
    let mut stats = vec![f32::NAN; stats_len.max(1)];
    let mut out = vec![0xffffu16; m * heads * d];
    let mut lse = vec![f32::NAN; m * heads];
    let (o, l, po, ps) = (
        out.as_mut_ptr(),
        lse.as_mut_ptr(),
        partial.as_mut_ptr(),
        stats.as_mut_ptr(),
    );
    let (slots, positions) = (p.place.slots.as_ptr(), p.place.positions.as_ptr());
    let mma = decode::supports_mma(heads, kv_heads, d);
    let cfg = Launch {
        grid: (m as u32, kv_heads as u32, splits as u32),
        block: (decode::DECODE_THREADS, 1, 1),
        shared_bytes: if mma {
            decode::mma_shared_bytes(d)
        } else {
            decode::shared_bytes(heads / kv_heads, d)
        } as usize,
    };
    let (q, ck, cv) = (p.q.0.as_ptr(), p.cache_k.0.as_ptr(), p.cache_v.0.as_ptr());
    let (mi, cap, nh, nkv, sk, scale) = (
        m as i32,
        p.capacity as i32,
        heads as i32,
        kv_heads as i32,
        split_keys as i32,
        p.scale(),
    );
    let name = if mma {
        format!("decode_attention_mma_d{d}")
    } else {
        "decode_attention".into()
    };
    launch(cfg, || unsafe {
        match (mma, d) {
            (true, 64) => k::decode_attention_mma_d64(
                o, l, po, ps, q, ck, cv, slots, positions, mi, cap, nh, nkv, sk, scale,
            ),
            (true, 128) => k::decode_attention_mma_d128(
                o, l, po, ps, q, ck, cv, slots, positions, mi, cap, nh, nkv, sk, scale,
            ),
            _ => k::decode_attention(
                o, l, po, ps, q, ck, cv, slots, positions, mi, cap, nh, nkv, d as i32, sk, scale,
            ),
        }
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    if splits > 1 {
        let cfg = Launch {
            grid: (m as u32, heads as u32, 1),
            block: (decode::DECODE_THREADS, 1, 1),
            shared_bytes: 0,
        };
        launch(cfg, || unsafe {
            k::decode_attention_combine(o, l, po, ps, mi, nh, d as i32, splits as i32)
        })
        .expect("decode_attention_combine");
    }
    let (out_ref, lse_ref) = p.forward_reference();
    let what = format!("{name} ({splits} splits)");
    assert_close(&format!("{what} out"), &to_f32(&out), &out_ref);
    assert_close(&format!("{what} lse"), &lse, &lse_ref);
}

/// Four sequences at positions 0, 5, 70 and 150 (prefixes of 1 to 151 keys), one split.
fn decode_problem(seed: u64, heads: (usize, usize, usize)) -> Problem {
    Problem::new(
        seed,
        heads,
        160,
        &[(0, 5, 1), (1, 150, 1), (2, 0, 1), (3, 70, 1)],
    )
}

#[test]
fn decode_fp32_kernel_matches_the_cpu() {
    check_decode(&decode_problem(7, (6, 2, 40)), 1024);
}

#[test]
fn decode_fp32_kernel_with_key_splits_matches_the_cpu() {
    check_decode(&decode_problem(8, (8, 1, 64 + 8)), 64);
}

#[test]
fn decode_tensor_core_kernel_matches_the_cpu_d64() {
    check_decode(&decode_problem(9, (14, 2, 64)), 1024);
}

#[test]
fn decode_tensor_core_kernel_with_key_splits_matches_the_cpu_d128() {
    check_decode(&decode_problem(10, (16, 1, 128)), 64);
}
