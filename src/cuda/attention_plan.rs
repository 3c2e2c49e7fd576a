//! How a ragged batch is cut into work for the fused attention kernels (kernels/flash_attention.cu).
//!
//! A query tile is up to `QUERY_TILE_ROWS` tokens of one slot that sit at consecutive batch rows
//! and consecutive positions: a prefill chunk, or a whole training sequence in pieces. A key tile
//! is up to `KEY_TILE_ROWS` cache positions of one slot, for the dK/dV kernels, which also need
//! the range of query tiles of that slot (the tiles are sorted by slot for that). Key tiles come
//! in key order: every slot's first tile (keys 0..64, the most queries), then every slot's second,
//! and so on, which the fused backward's turns rely on (kernels/flash_attention.cu). The wide
//! forward kernel takes tiles of up to `WIDE_QUERY_TILE_ROWS` instead ([`wide_query_tiles`]).

use crate::backend::TokenPlacement;

/// Query rows per tile: `FLASH_ROWS` in kernels/flash_attention.cu.
pub const QUERY_TILE_ROWS: usize = 64;
/// Query rows per tile of the wide forward kernel (`2 * FLASH_ROWS`).
pub const WIDE_QUERY_TILE_ROWS: usize = 128;
/// Keys per dK/dV block: `KV_KEYS` in kernels/flash_attention.cu.
pub const KEY_TILE_ROWS: usize = 64;
/// Keys per block of the wide fused backward (`2 * KV_KEYS`; [`AttentionPlan::wide_key_tiles`]).
pub const WIDE_KEY_TILE_ROWS: usize = 128;

/// The tiles of one batch, as the kernels read them (u32 quadruples, uploaded as uint4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    /// [tiles, 4]: first batch row, row count, slot, first position; sorted by slot.
    pub query_tiles: Vec<u32>,
    /// [key tiles, 4]: first key, key count, first and end index of the slot's query tiles;
    /// sorted by first key, then slot.
    pub key_tiles: Vec<u32>,
}

/// Runs of consecutive batch rows with the same slot and consecutive positions, cut at
/// `max_rows`, as (first row, count, slot, first position), sorted by slot (stable: batch order
/// within a slot).
fn runs(place: &TokenPlacement, max_rows: usize) -> Vec<[u32; 4]> {
    let mut tiles: Vec<[u32; 4]> = Vec::new();
    for (m, (&slot, &pos)) in place.slots.iter().zip(&place.positions).enumerate() {
        match tiles.last_mut() {
            Some(t)
                if t[2] == slot
                    && t[3] + t[1] == pos
                    && t[0] + t[1] == m as u32
                    && (t[1] as usize) < max_rows =>
            {
                t[1] += 1
            }
            _ => tiles.push([m as u32, 1, slot, pos]),
        }
    }
    tiles.sort_by_key(|t| t[2]);
    tiles
}

/// The wide forward kernel's query tiles: as [`AttentionPlan::query_tiles`], cut at
/// `WIDE_QUERY_TILE_ROWS` rows.
pub fn wide_query_tiles(place: &TokenPlacement) -> Vec<u32> {
    runs(place, WIDE_QUERY_TILE_ROWS).concat()
}

/// Key tiles of up to `rows` keys over query tiles sorted by slot (see `AttentionPlan::key_tiles`).
fn key_tiles(tiles: &[[u32; 4]], rows: usize) -> Vec<u32> {
    let mut key_tiles: Vec<[u32; 4]> = Vec::new();
    let mut begin = 0;
    while begin < tiles.len() {
        let slot = tiles[begin][2];
        let end = begin + tiles[begin..].iter().take_while(|t| t[2] == slot).count();
        // keys 0..key_end: every position some query of the slot attends to
        let key_end = tiles[begin..end]
            .iter()
            .map(|t| t[3] + t[1])
            .max()
            .unwrap_or(0);
        for first in (0..key_end).step_by(rows) {
            let count = (key_end - first).min(rows as u32);
            key_tiles.push([first, count, begin as u32, end as u32]);
        }
        begin = end;
    }
    key_tiles.sort_by_key(|t| t[0]); // stable: slot order within the same keys
    key_tiles.concat()
}

impl AttentionPlan {
    pub fn new(place: &TokenPlacement) -> Self {
        let tiles = runs(place, QUERY_TILE_ROWS);
        AttentionPlan {
            key_tiles: key_tiles(&tiles, KEY_TILE_ROWS),
            query_tiles: tiles.concat(),
        }
    }

    /// Key tiles of up to `WIDE_KEY_TILE_ROWS` keys over the same query tiles, in the same
    /// order as `key_tiles`: the wide fused backward's.
    pub fn wide_key_tiles(&self) -> Vec<u32> {
        let tiles: Vec<[u32; 4]> = self
            .query_tiles
            .chunks(4)
            .map(|t| [t[0], t[1], t[2], t[3]])
            .collect();
        key_tiles(&tiles, WIDE_KEY_TILE_ROWS)
    }

    pub fn num_query_tiles(&self) -> usize {
        self.query_tiles.len() / 4
    }

    pub fn num_key_tiles(&self) -> usize {
        self.key_tiles.len() / 4
    }

    /// Mean rows per query tile: 1 for a decode step, up to 64 for a prefill.
    pub fn mean_tile_rows(&self, tokens: usize) -> f64 {
        tokens as f64 / self.num_query_tiles().max(1) as f64
    }
}

/// Which kernel computes `attention_forward` on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// kernels/flash_attention.cu: tiles of a prefill or training batch (head dims 32, 64, 128).
    Flash,
    /// kernels/decode_attention.cu: a few tokens per sequence.
    Decode,
    /// kernels/attention.cu: any other shape.
    Simple,
}

/// Query tiles at least this full, on average, go to the fused kernel; sparser batches (a decode
/// step: one row per tile) would leave most of its 64 rows empty.
const FLASH_MIN_MEAN_ROWS: f64 = 8.0;

impl AttentionKernel {
    /// `aligned`: q, out and the caches are 16-byte aligned (the fused kernels' vector loads
    /// and stores).
    pub fn choose(
        plan: &AttentionPlan,
        tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        aligned: bool,
    ) -> Self {
        use crate::cuda::ops::{decode_attention, flash_attention};
        if aligned
            && flash_attention::supports_head_dim(head_dim)
            && plan.mean_tile_rows(tokens) >= FLASH_MIN_MEAN_ROWS
        {
            AttentionKernel::Flash
        } else if aligned && decode_attention::supports(n_heads, n_kv_heads, head_dim) {
            AttentionKernel::Decode
        } else {
            AttentionKernel::Simple
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_runs_are_cut_into_tiles_of_64_and_sorted_by_slot() {
        // slot 3: 130 tokens from position 0; slot 1: 5 tokens from position 10
        let mut place = TokenPlacement::contiguous(1, 0, 130);
        place.slots.iter_mut().for_each(|s| *s = 3);
        place.slots.extend([1; 5]);
        place.positions.extend(10..15);
        let plan = AttentionPlan::new(&place);
        assert_eq!(
            plan.query_tiles,
            vec![
                130, 5, 1, 10, //
                0, 64, 3, 0, //
                64, 64, 3, 64, //
                128, 2, 3, 128,
            ]
        );
        // slot 1 (tile 0) sees keys 0..15; slot 3 (tiles 1..4) keys 0..130; the first key
        // tile of each slot, then the second...
        assert_eq!(
            plan.key_tiles,
            vec![
                0, 15, 0, 1, //
                0, 64, 1, 4, //
                64, 64, 1, 4, //
                128, 2, 1, 4,
            ]
        );
        assert_eq!(plan.mean_tile_rows(135), 135.0 / 4.0);
    }

    #[test]
    fn decode_steps_and_breaks_in_a_run_start_new_tiles() {
        // one token per slot: a tile each
        let decode = TokenPlacement {
            slots: vec![0, 1, 2],
            positions: vec![7, 300, 0],
        };
        let plan = AttentionPlan::new(&decode);
        assert_eq!(plan.num_query_tiles(), 3);
        assert_eq!(plan.mean_tile_rows(3), 1.0);
        assert_eq!(&plan.query_tiles[4..8], &[1, 1, 1, 300]);
        assert_eq!(plan.num_key_tiles(), 1 + 5 + 1); // 8, 301 and 1 keys
                                                     // a gap in positions, a repeated slot later in the batch
        let gaps = TokenPlacement {
            slots: vec![0, 0, 0, 1, 0],
            positions: vec![0, 1, 5, 0, 6],
        };
        let plan = AttentionPlan::new(&gaps);
        assert_eq!(
            plan.query_tiles,
            vec![
                0, 2, 0, 0, //
                2, 1, 0, 5, //
                4, 1, 0, 6, //
                3, 1, 1, 0,
            ]
        );
        assert_eq!(plan.key_tiles, vec![0, 7, 0, 3, 0, 1, 3, 4]);
    }

    #[test]
    fn key_tiles_come_in_key_order_across_slots() {
        // slot 0: 200 tokens, slot 2: 70, slot 1: 10 (batch order 0, 2, 1)
        let mut place = TokenPlacement::contiguous(1, 0, 200);
        place.slots.extend([2; 70]);
        place.positions.extend(0..70);
        place.slots.extend([1; 10]);
        place.positions.extend(0..10);
        let plan = AttentionPlan::new(&place);
        // query tiles by slot: slot 0 (0..4), slot 1 (4..5), slot 2 (5..7)
        let firsts: Vec<[u32; 2]> = plan.key_tiles.chunks(4).map(|t| [t[0], t[2]]).collect();
        assert_eq!(
            firsts,
            vec![[0, 0], [0, 4], [0, 5], [64, 0], [64, 5], [128, 0], [192, 0]]
        );
        // 128-key tiles: slot 0 keys 0..128, 128..200; slot 1 0..10; slot 2 0..70
        assert_eq!(
            plan.wide_key_tiles(),
            vec![
                0, 128, 0, 4, //
                0, 10, 4, 5, //
                0, 70, 5, 7, //
                128, 72, 0, 4,
            ]
        );
    }

    #[test]
    fn prefill_goes_to_the_fused_kernel_decode_to_the_decode_kernel() {
        let prefill = TokenPlacement::contiguous(2, 0, 100);
        let plan = AttentionPlan::new(&prefill);
        let choose = |plan: &AttentionPlan, m, heads, kv, d, aligned| {
            AttentionKernel::choose(plan, m, heads, kv, d, aligned)
        };
        assert_eq!(choose(&plan, 200, 14, 2, 64, true), AttentionKernel::Flash);
        assert_eq!(choose(&plan, 200, 14, 2, 96, true), AttentionKernel::Decode);
        assert_eq!(
            choose(&plan, 200, 14, 2, 64, false),
            AttentionKernel::Simple
        );
        assert_eq!(choose(&plan, 200, 16, 1, 96, true), AttentionKernel::Simple);
        let decode = TokenPlacement {
            slots: vec![0, 1, 2, 3],
            positions: vec![10, 500, 3, 9],
        };
        let plan = AttentionPlan::new(&decode);
        assert_eq!(choose(&plan, 4, 14, 2, 64, true), AttentionKernel::Decode);
        assert_eq!(choose(&plan, 4, 14, 2, 36, true), AttentionKernel::Simple);
        // a group of 16 query heads: the tensor-core decode kernel at head dims 64 and 128 only
        assert_eq!(choose(&plan, 4, 16, 1, 64, true), AttentionKernel::Decode);
        assert_eq!(choose(&plan, 4, 16, 1, 96, true), AttentionKernel::Simple);
    }

    #[test]
    fn empty_batch_has_no_tiles() {
        let plan = AttentionPlan::new(&TokenPlacement::default());
        assert_eq!(plan.num_query_tiles(), 0);
        assert_eq!(plan.num_key_tiles(), 0);
    }
}
