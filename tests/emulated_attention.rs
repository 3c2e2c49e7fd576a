//! The attention kernels' real source (kernels/flash_attention.cu, kernels/decode_attention.cu),
//! run on the CPU by the emulator in tests/cuda_emulator through thinkshort's own launchers
//! (src/cuda/ops: grids, shared memory, argument order, scratch zeroing, the fused backward's dq
//! conversion), against the CPU reference (`backend::cpu::attention_forward` /
//! `attention_backward`) on bf16-rounded inputs: tensor-core fragment layouts, causal masks,
//! ragged tiles, GQA, key splits and the cp.async pipeline. Tolerance as in `selfcheck` (bf16
//! operands of the products: about 3e-3 expected).

mod emulation_support;

use emulation_support::{assert_close, assert_same, ptr, ptr_mut, to_bits, to_f32, Emulator, Rand};
use thinkshort::backend::{cpu, TokenPlacement};
use thinkshort::cuda::attention_plan::{wide_query_tiles, AttentionPlan};
use thinkshort::cuda::ops::decode_attention::{self as decode, DecodeProblem};
use thinkshort::cuda::ops::flash_attention::{
    self as flash, BackwardScratch, FlashBackward, FlashForward, FlashGrads, FlashProblem,
};

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

    /// The launchers' view of this batch over the query tiles `tiles`.
    fn flash(&self, tiles: &[u32]) -> FlashProblem {
        FlashProblem {
            q: ptr(&self.q.0),
            cache_k: ptr(&self.cache_k.0),
            cache_v: ptr(&self.cache_v.0),
            tiles: ptr(tiles),
            num_tiles: tiles.len() / 4,
            m: self.m(),
            capacity: self.capacity,
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.d,
        }
    }
}

/// (out, lse) of flash_attention_forward with `variant`'s kernel and query tiles.
fn flash_forward(p: &Problem, variant: FlashForward) -> (Vec<u16>, Vec<f32>) {
    let tiles = match variant {
        FlashForward::Narrow => AttentionPlan::new(&p.place).query_tiles,
        FlashForward::Wide => wide_query_tiles(&p.place),
    };
    let mut out = vec![0xffffu16; p.m() * p.heads * p.d];
    let mut lse = vec![f32::NAN; p.m() * p.heads];
    flash::flash_attention_forward(
        &Emulator,
        &p.flash(&tiles),
        variant,
        ptr_mut(&mut out),
        ptr_mut(&mut lse),
    )
    .unwrap_or_else(|e| panic!("{variant:?} flash forward d{}: {e:#}", p.d));
    (out, lse)
}

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
/// The gradients of one backward call: dq (bf16), the fused variants' f32 dq_acc (empty for
/// Split), dK, dV, and the dsum scratch the launcher filled.
struct Grads {
    dq: Vec<u16>,
    dq_acc: Vec<f32>,
    dk: Vec<u16>,
    dv: Vec<u16>,
    dsum: Vec<f32>,
}

/// A backward problem: the forward's output and log-sum-exp (CPU), dout, and the gradient caches'
/// start values (the kernels add to them).
struct Backward {
    plan: AttentionPlan,
    dout: (Vec<u16>, Vec<f32>),
    out: (Vec<u16>, Vec<f32>),
    lse: Vec<f32>,
    dk_start: (Vec<u16>, Vec<f32>),
    dv_start: (Vec<u16>, Vec<f32>),
}

impl Backward {
    fn new(p: &Problem, seed: u64) -> Self {
        let (q_len, cache_len) = (p.m() * p.heads * p.d, p.cache_k.0.len());
        let mut r = Rand(seed);
        let dout = r.bf16s(q_len, 1.0);
        let dk_start = r.bf16s(cache_len, 0.1);
        let dv_start = r.bf16s(cache_len, 0.1);
        let (out_ref, lse) = p.forward_reference();
        let out_bits = to_bits(&out_ref);
        Backward {
            plan: AttentionPlan::new(&p.place),
            dout,
            out: (out_bits.clone(), to_f32(&out_bits)),
            lse,
            dk_start,
            dv_start,
        }
    }

    /// flash_attention_backward by `variant` over `key_tiles` (the plan's tiles of the
    /// variant's size, unless a test changes their order), with its scratch laid out by
    /// BackwardScratch as the backend does. For the fused variants, checks that every block
    /// took a ticket and every key tile of a slot its turn on every (query tile, head) it sees.
    fn run(&self, p: &Problem, variant: FlashBackward, key_tiles: &[u32]) -> anyhow::Result<Grads> {
        let plan = &self.plan;
        let (q_len, rows) = (p.m() * p.heads * p.d, p.m() * p.heads);
        let problem = p.flash(&plan.query_tiles);
        let mut dq = vec![0xffffu16; q_len];
        // dsum | dq_acc | turns as the backend lays them out, poisoned (the launcher zeroes
        // the turns); f64 storage so that dq_acc is 8-byte aligned as the fused kernels need
        let layout = BackwardScratch::new(&problem, variant);
        let mut storage = vec![f64::from_bits(0x7fc0_0000_7fc0_0000); layout.floats.div_ceil(2)];
        let base = ptr_mut(&mut storage);
        let (dsum, dq_acc, turns) = layout.pointers(base);
        let (mut dk, mut dv) = (self.dk_start.0.clone(), self.dv_start.0.clone());
        let g = FlashGrads {
            dq: ptr_mut(&mut dq),
            dcache_k: ptr_mut(&mut dk),
            dcache_v: ptr_mut(&mut dv),
            dout: ptr(&self.dout.0),
            out: ptr(&self.out.0),
            lse: ptr(&self.lse),
            dsum,
            key_tiles: ptr(key_tiles),
            num_key_tiles: key_tiles.len() / 4,
            dq_acc,
            turns,
        };
        flash::flash_attention_backward(&Emulator, &problem, &g, variant)?;
        // SAFETY: the layout's floats lie in `storage` (f64 values: twice as many f32)
        let scratch = unsafe { std::slice::from_raw_parts(base as *const f32, layout.floats) };
        let at = |p: u64| (p - base) as usize / 4;
        let mut grads = Grads {
            dq,
            dq_acc: Vec::new(),
            dk,
            dv,
            dsum: scratch[..rows].to_vec(),
        };
        if variant != FlashBackward::Split {
            grads.dq_acc = scratch[at(dq_acc)..][..q_len].to_vec();
            // the ticket counter, then a turn per (query tile, head)
            let turns: Vec<i32> = scratch[at(turns)..]
                .iter()
                .map(|x| x.to_bits() as i32)
                .collect();
            let blocks = key_tiles.len() / 4 * p.kv_heads;
            assert_eq!(turns[0] as usize, blocks, "tickets");
            assert_eq!(turns.len(), 1 + plan.num_query_tiles() * p.heads);
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
        }
        Ok(grads)
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
            assert_same(
                &format!("{what}: dk beyond the keys of slot {s}"),
                &dk[unseen.clone()],
                &self.dk_start.0[unseen.clone()],
            );
            assert_same(
                &format!("{what}: dv beyond the keys of slot {s}"),
                &dv[unseen.clone()],
                &self.dv_start.0[unseen],
            );
        }
    }
}

/// Every backward variant against the CPU through the launcher: dsum, dq (the fused variants'
/// f32 sums too, and their rounding to bf16), dK and dV; the fused kernels' dK/dV must be the
/// dk/dv kernel's bit for bit (the same dS products and roundings, key by key).
fn check_flash_backward(p: &Problem, seed: u64) {
    let b = Backward::new(p, seed);
    let dsum_ref: Vec<f32> = (b.dout.1.chunks(p.d).zip(b.out.1.chunks(p.d)))
        .map(|(a, o)| a.iter().zip(o).map(|(x, y)| x * y).sum())
        .collect();
    let split = b
        .run(p, FlashBackward::Split, &b.plan.key_tiles)
        .unwrap_or_else(|e| panic!("split flash backward d{}: {e:#}", p.d));
    assert_close("flash backward dsum", &split.dsum, &dsum_ref);
    b.check(
        p,
        "split flash backward",
        &to_f32(&split.dq),
        &split.dk,
        &split.dv,
    );
    for variant in [FlashBackward::Fused, FlashBackward::FusedWide] {
        let what = format!("{} flash backward", variant.name());
        let key_tiles = match variant {
            FlashBackward::FusedWide => b.plan.wide_key_tiles(),
            _ => b.plan.key_tiles.clone(),
        };
        let g = b
            .run(p, variant, &key_tiles)
            .unwrap_or_else(|e| panic!("{what} d{}: {e:#}", p.d));
        assert_same(&format!("{what}: dsum"), &g.dsum, &split.dsum);
        b.check(p, &what, &g.dq_acc, &g.dk, &g.dv);
        assert_eq!(
            g.dq,
            to_bits(&g.dq_acc),
            "{what}: dq is dq_acc rounded to bf16"
        );
        assert_eq!(g.dk, split.dk, "{what}: dk is the dk/dv kernel's");
        assert_eq!(g.dv, split.dv, "{what}: dv is the dk/dv kernel's");
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
        let e = b.run(&p, variant, &swapped).map(|_| ()).unwrap_err();
        assert!(
            format!("{e:#}").contains("__trap"),
            "{}: {e:#}",
            variant.name()
        );
    }
}

/// Decode attention (one token per sequence) with `split_keys` keys per split through the
/// launcher: the fp32 or the tensor-core kernel as it picks, then the merge when there are
/// several splits.
fn check_decode(p: &Problem, split_keys: usize) {
    let (m, heads, d) = (p.m(), p.heads, p.d);
    let max_len = p
        .place
        .positions
        .iter()
        .map(|&x| x as usize + 1)
        .max()
        .unwrap();
    let splits = max_len.div_ceil(split_keys);
    let (partial_len, stats_len) = decode::scratch_sizes(splits, m, heads, d);
    let mut partial = vec![f32::NAN; partial_len];
    let mut stats = vec![f32::NAN; stats_len];
    let mut out = vec![0xffffu16; m * heads * d];
    let mut lse = vec![f32::NAN; m * heads];
    let problem = DecodeProblem {
        q: ptr(&p.q.0),
        cache_k: ptr(&p.cache_k.0),
        cache_v: ptr(&p.cache_v.0),
        slots: ptr(&p.place.slots),
        positions: ptr(&p.place.positions),
        m,
        capacity: p.capacity,
        n_heads: heads,
        n_kv_heads: p.kv_heads,
        head_dim: d,
    };
    let scratch = if splits > 1 {
        (ptr_mut(&mut partial), ptr_mut(&mut stats))
    } else {
        (0, 0)
    };
    let kernel = if decode::supports_mma(heads, p.kv_heads, d) {
        format!("decode_attention_mma_d{d}")
    } else {
        "decode_attention".into()
    };
    let what = format!("{kernel} ({splits} splits)");
    decode::decode_attention(
        &Emulator,
        &problem,
        ptr_mut(&mut out),
        ptr_mut(&mut lse),
        (splits, split_keys),
        scratch,
    )
    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let (out_ref, lse_ref) = p.forward_reference();
    assert_close(&format!("{what} out"), &to_f32(&out), &out_ref);
    assert_close(&format!("{what} lse"), &lse, &lse_ref);
}

/// Five sequences at positions 0, 5, 8, 70 and 150 (prefixes of 1 to 151 keys), one split. The
/// 9 keys at position 8 end in the second half of the first 16-key warp slab: the tensor-core
/// kernel must mask keys 9..16 there, beyond the slab's first 8.
fn decode_problem(seed: u64, heads: (usize, usize, usize)) -> Problem {
    Problem::new(
        seed,
        heads,
        160,
        &[(0, 5, 1), (1, 150, 1), (2, 0, 1), (3, 70, 1), (4, 8, 1)],
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

/// Warps whose first row sits one or two positions before the end of a key step (positions 62
/// and 63 against 64-key steps, 14 and 30 against 16-key slabs and 32-key dq steps): the steps
/// where the diagonal-only causal mask must still run. A "does this step reach the diagonal"
/// bound off by one in the forward, the dq kernel or the dK/dV kernel leaves a key unmasked here.
#[test]
fn flash_masks_the_steps_that_reach_the_diagonal_by_one_key() {
    let runs_62 = [(0, 62, 40), (1, 30, 3)];
    let runs_63 = [(0, 63, 40), (1, 14, 3)];
    check_flash_forward(&Problem::new(21, (2, 1, 64), 112, &runs_62));
    check_flash_forward(&Problem::new(22, (2, 2, 128), 112, &runs_62));
    check_flash_forward(&Problem::new(23, (2, 1, 32), 112, &runs_63));
    check_flash_backward(&Problem::new(24, (2, 1, 64), 112, &runs_62), 31);
    let runs_62_14 = [(0, 62, 40), (1, 14, 3)];
    check_flash_backward(&Problem::new(25, (2, 2, 128), 112, &runs_62_14), 32);
}

/// Sequences of 15, 31 and 79 keys: the last warp slab holds one key past the end, which the
/// tensor-core decode kernel must mask (one split and 64-key splits).
#[test]
fn decode_masks_a_warp_slab_that_ends_one_key_early() {
    for (seed, heads) in [(26, (8, 1, 64)), (27, (16, 1, 128))] {
        let p = Problem::new(seed, heads, 100, &[(0, 14, 1), (1, 30, 1), (2, 78, 1)]);
        check_decode(&p, 1024);
        check_decode(&p, 64);
    }
}
