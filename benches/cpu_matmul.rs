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
//! - backward/{ours,gemm}/MxK→N: dx = dout · w and dw += doutᵀ · x (twice the forward's FLOPs)

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

/// A row-major [rows, cols] matrix, or its transpose.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Operand<'a> {
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols);
        Operand {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    fn t(self) -> Self {
        Operand {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }

    /// (column stride, row stride) as the `gemm` crate takes them.
    fn strides(&self) -> (isize, isize) {
        let line = if self.transposed {
            self.rows
        } else {
            self.cols
        } as isize;
        if self.transposed {
            (line, 1)
        } else {
            (1, line)
        }
    }
}

/// dst (+)= a · b by the `gemm` crate on the pool, as the backend called it before.
fn gemm_crate(dst: &mut [f32], accumulate: bool, a: Operand, b: Operand) {
    assert!(a.cols == b.rows && dst.len() == a.rows * b.cols);
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    // SAFETY: the sizes are asserted above and in `Operand::rows`; the strides describe the
    // row-major data or its transpose.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
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
            let (x, w) = (Operand::rows(&x, m, k), Operand::rows(&w, n, k));
            b.iter(|| gemm_crate(&mut out, false, black_box(x), w.t()))
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
        group.bench_function(BenchmarkId::new("gemm", label(m, k, n)), |b| {
            let (x, w, dout) = (
                Operand::rows(&x, m, k),
                Operand::rows(&w, n, k),
                Operand::rows(&dout, m, n),
            );
            b.iter(|| {
                gemm_crate(&mut dx, false, black_box(dout), w);
                gemm_crate(&mut dw, true, dout.t(), x);
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
