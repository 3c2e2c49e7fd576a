//! The CPU backend: f32 everywhere, rayon for parallelism, the `gemm` crate for matrix products.
//! Each op lives in its own file as a plain function; this file only wires them to the trait.

mod attention;
mod embedding;
mod matmul;
mod rmsnorm;
mod rope;
mod swiglu;

pub use attention::{attention_forward, kv_cache_write};
pub use embedding::{embedding_forward, gather_rows, residual_add};
pub use matmul::matmul_forward;
pub use rmsnorm::rmsnorm_forward;
pub use rope::rope_forward;
pub use swiglu::swiglu_forward;

use super::{Backend, TokenPlacement};
use anyhow::Result;
use std::ops::Range;

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, buf: &[f32]) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }

    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
        embedding_forward(out, table, ids, dim)
    }
    fn rmsnorm_forward(&self, out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
        rmsnorm_forward(out, x, weight, dim, eps)
    }
    fn matmul_forward(
        &self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        matmul_forward(out, x, w, bias, m, k, n)
    }
    fn rope_forward(
        &self,
        x: &mut [f32],
        positions: &[u32],
        inv_freq: &[f32],
        n_heads: usize,
        head_dim: usize,
    ) {
        rope_forward(x, positions, inv_freq, n_heads, head_dim)
    }
    fn kv_cache_write(
        &self,
        cache_k: &mut [f32],
        cache_v: &mut [f32],
        k: &[f32],
        v: &[f32],
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        kv_cache_write(cache_k, k, place, capacity, kv_dim);
        kv_cache_write(cache_v, v, place, capacity, kv_dim);
    }
    fn attention_forward(
        &self,
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
        attention_forward(
            out, q, cache_k, cache_v, place, capacity, n_heads, n_kv_heads, head_dim,
        )
    }
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) {
        swiglu_forward(out, gate, up)
    }
    fn residual_add(&self, x: &mut [f32], y: &[f32]) {
        residual_add(x, y)
    }
    fn gather_rows(&self, out: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
        gather_rows(out, x, rows, dim)
    }
}
