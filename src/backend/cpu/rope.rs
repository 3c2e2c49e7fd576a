//! Rotary position embedding, HF `rotate_half` convention: element i pairs with i + head_dim/2.

use super::matmul::add_bias_rows;
use rayon::prelude::*;

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

/// x = rope(x + bias), the bias ([n_heads * head_dim]) added to every row when given.
pub fn rope_forward_with_bias(
    x: &mut [f32],
    bias: Option<&[f32]>,
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    if let Some(bias) = bias {
        assert_eq!(
            bias.len(),
            n_heads * head_dim,
            "rope: bias is not [n_heads * head_dim]"
        );
        add_bias_rows(x, bias);
    }
    rope_forward(x, positions, inv_freq, n_heads, head_dim);
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
