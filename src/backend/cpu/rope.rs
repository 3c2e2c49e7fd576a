//! Rotary position embedding, HF `rotate_half` convention: element i pairs with i + head_dim/2.

use rayon::prelude::*;

/// The rows of one product's output qkv: [M, q_dim + 2 kv_dim] (q, then k, then v) into
/// q: [M, q_dim], k and v: [M, kv_dim].
pub fn split_qkv([q, k, v]: [&mut [f32]; 3], qkv: &[f32], m: usize) {
    let widths = [q.len(), k.len(), v.len()].map(|len| len / m.max(1));
    let pitch: usize = widths.iter().sum();
    assert!(
        qkv.len() == m * pitch && [q.len(), k.len(), v.len()] == widths.map(|w| w * m),
        "qkv_rope_forward: qkv is not [M, q_dim + 2 kv_dim] for q: [M, q_dim], k and v: [M, kv_dim]"
    );
    let mut start = 0;
    for (out, width) in [q, k, v].into_iter().zip(widths) {
        for (row, src) in out.chunks_exact_mut(width).zip(qkv.chunks_exact(pitch)) {
            row.copy_from_slice(&src[start..start + width]);
        }
        start += width;
    }
}

/// x: [M, n_heads * head_dim], rotated in place; positions: [M]; inv_freq: [head_dim / 2].
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    rotate(x, positions, inv_freq, n_heads, head_dim, 1.0);
}

/// Backward of `rope_forward`: the rotation is orthogonal, so the gradient is rotated back by
/// the negative angle, in place. dx: [M, n_heads * head_dim].
pub fn rope_backward(
    dx: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    rotate(dx, positions, inv_freq, n_heads, head_dim, -1.0);
}

/// Rotates each (i, i + half) pair by `direction` × position × inv_freq[i].
fn rotate(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    direction: f32,
) {
    let half = head_dim / 2;
    assert_eq!(inv_freq.len(), half, "rope: inv_freq is not [head_dim / 2]");
    assert_eq!(
        x.len(),
        positions.len() * n_heads * head_dim,
        "rope: x is not [M, n_heads * head_dim]"
    );
    x.par_chunks_mut(n_heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            // The angle is computed in f32 exactly as HF does (position · inv_freq in float32).
            let cos_sin: Vec<(f32, f32)> = inv_freq
                .iter()
                .map(|f| {
                    let a = pos as f32 * f;
                    (a.cos(), direction * a.sin())
                })
                .collect();
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for ((x1, x2), (c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cos_sin) {
                    let (a, b) = (*x1, *x2);
                    *x1 = a * c - b * s;
                    *x2 = b * c + a * s;
                }
            }
        });
}
