//! CPU matrix products of a linear layer at the shapes of a GRPO update on the 10M-parameter
//! bench model (tools/bench_model_10m.json: 32 sequences × 192 tokens, hidden 256, MLP 1024,
//! vocabulary 8192), by the backend (`matmul_forward`, `matmul_backward`) and, for comparison,
//! by the `gemm` crate called directly on the same operands (what the backend ran before its
//! AVX-512 kernel, and still runs on CPUs without AVX-512F).
//!
//!     cargo bench --bench cpu_matmul
//!
//! Throughput is in multiply-adds × 2 (FLOP) per second: criterion prints it as elem/s.
//! Cases, [rows of x, in features → out features]:
//! - forward/{ours,gemm}/MxK→N: out[M, N] = x[M, K] · w[N, K]ᵀ
//! - backward/ours/MxK→N: dx = dout · w and dw += doutᵀ · x (twice the forward's FLOPs)

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use thinkshort::backend::cpu::{matmul_backward, matmul_forward};
use thinkshort::backend::GradWrite;
use thinkshort::rng::Philox;

/// (rows of x, in features, out features)
const SHAPES: [(usize, usize, usize); 4] = [
    (6144, 256, 1024), // MLP up / gate
    (6144, 1024, 256), // MLP down
    (6144, 256, 256),  // attention output
    (6144, 256, 8192), // LM head
];

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Philox::new(seed, 0);
    (0..len)
        .map(|_| rng.next_uniform() as f32 * 2.0 - 1.0)
        .collect()
}

fn label(m: usize, k: usize, n: usize) -> String {
    format!("{m}x{k}→{n}")
}

/// out = x · wᵀ by the `gemm` crate with the pool, as the backend called it before.
fn gemm_crate_forward(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    // SAFETY: the sizes are asserted above; strides describe row-major x and out and the
    // transpose of row-major w.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    for (m, k, n) in SHAPES {
        let (x, w) = (random(m * k, 1), random(n * k, 2));
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("ours", label(m, k, n)), |b| {
            b.iter(|| matmul_forward(&mut out, black_box(&x), &w, None, m, k, n))
        });
        group.bench_function(BenchmarkId::new("gemm", label(m, k, n)), |b| {
            b.iter(|| gemm_crate_forward(&mut out, black_box(&x), &w, m, k, n))
        });
    }
    group.finish();
}

fn backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("backward");
    for (m, k, n) in SHAPES {
        let (x, w, dout) = (random(m * k, 1), random(n * k, 2), random(m * n, 3));
        let (mut dx, mut dw) = (vec![0.0f32; m * k], vec![0.0f32; n * k]);
        group.throughput(Throughput::Elements((4 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("ours", label(m, k, n)), |b| {
            b.iter(|| {
                matmul_backward(
                    Some(&mut dx),
                    GradWrite::Overwrite,
                    &mut dw,
                    black_box(&dout),
                    &x,
                    &w,
                    m,
                    k,
                    n,
                )
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = forward, backward
}

fn main() {
    eprintln!(
        "cpu_matmul: {} rayon threads (RAYON_NUM_THREADS={})",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
    );
    // On one of rayon's worker threads, as the binary runs its commands (src/main.rs).
    rayon::ThreadPoolBuilder::new()
        .build()
        .expect("rayon thread pool")
        .install(|| {
            benches();
            Criterion::default().configure_from_args().final_summary();
        });
}
