//! Causal grouped-query attention over a slotted KV cache.
//!
//! The cache holds, per sequence slot, keys and values for positions 0..capacity. A token at
//! position p of slot s attends to positions 0..=p of that slot, so a prefill (all prompt tokens
//! written first) and a decode step (one new token per sequence) are the same computation.

use crate::backend::TokenPlacement;
use rayon::prelude::*;

/// Copies x[m] to cache[slot[m], pos[m]].  x: [M, kv_dim]; cache: [slots, capacity, kv_dim].
pub fn kv_cache_write(
    cache: &mut [f32],
    x: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    kv_dim: usize,
) {
    for ((row, &slot), &pos) in x
        .chunks_exact(kv_dim)
        .zip(&place.slots)
        .zip(&place.positions)
    {
        let at = (slot as usize * capacity + pos as usize) * kv_dim;
        cache[at..at + kv_dim].copy_from_slice(row);
    }
}

/// q, out: [M, n_heads * head_dim]; cache_k, cache_v: [slots, capacity, n_kv_heads * head_dim].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    q: &[f32],
    cache_k: &[f32],
    cache_v: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) {
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let group = n_heads / n_kv_heads; // query heads sharing one KV head
    assert_eq!(
        q.len(),
        place.slots.len() * q_dim,
        "attention_forward: q is not [M, n_heads * head_dim]"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_forward: out and q differ in size"
    );
    let scale = 1.0 / (head_dim as f32).sqrt();

    // One task per (token, head): out[m, h*hd..(h+1)*hd].
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (mh, o)| {
            let (m, h) = (mh / n_heads, mh % n_heads);
            let (slot, pos) = (place.slots[m] as usize, place.positions[m] as usize);
            let qh = &q[m * q_dim + h * head_dim..][..head_dim];
            let kv_off = (h / group) * head_dim;
            let base = slot * capacity * kv_dim;

            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..=pos {
                let k = &cache_k[base + j * kv_dim + kv_off..][..head_dim];
                let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut denom = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let v = &cache_v[base + j * kv_dim + kv_off..][..head_dim];
                let w = p / denom;
                o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
            }
        },
    );
}
