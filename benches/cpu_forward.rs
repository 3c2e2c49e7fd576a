//! CPU forward-pass throughput on a ~10M-parameter Qwen2 model with random weights
//! (tools/bench_model_10m.json): prefill of whole prompts and single decode steps over a KV cache.
//! `tools/bench_torch_cpu.py` measures the same cases in PyTorch for comparison.
//!
//!     cargo bench --bench cpu_forward                       # all cores
//!     RAYON_NUM_THREADS=2 cargo bench --bench cpu_forward   # a fixed thread count
//!
//! Cases (throughput in tokens/s):
//! - prefill/b1x256, prefill/b4x64: prompts written into an empty cache; logits of the last
//!   token of each sequence only.
//! - decode/b1_ctx128, decode/b4_ctx128: one new token per sequence at position 128 (positions
//!   0..128 already in the cache); logits of every row. Each iteration rewrites the same cache
//!   position, so every timed step does identical work.
//!
//! The cases run on a rayon worker thread, as the binary's commands do.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::backend::TokenPlacement;
use thinkshort::config::ModelConfig;
use thinkshort::model::{KvCache, Model};
use thinkshort::rng::Philox;

const CONFIG: &str = include_str!("../tools/bench_model_10m.json");
const DECODE_CONTEXT: usize = 128;

fn model() -> Model<CpuBackend> {
    let cfg = ModelConfig::from_json_str(CONFIG).expect("tools/bench_model_10m.json");
    Model::random(cfg, 0, CpuBackend).expect("random model")
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Philox::new(seed, 7);
    (0..n)
        .map(|_| ((rng.next_uniform() * vocab as f64) as usize).min(vocab - 1) as u32)
        .collect()
}

fn prefill(c: &mut Criterion) {
    let model = model();
    let vocab = model.cfg.vocab_size;
    let mut group = c.benchmark_group("prefill");
    for (batch, len) in [(1usize, 256usize), (4, 64)] {
        let tokens = random_tokens(batch * len, vocab, 1);
        let place = TokenPlacement::contiguous(batch, 0, len);
        let last_rows: Vec<usize> = (0..batch).map(|s| s * len + len - 1).collect();
        let mut cache = KvCache::new(&CpuBackend, &model.cfg, batch, len).unwrap();
        group.throughput(Throughput::Elements((batch * len) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("b{batch}x{len}")),
            |b| {
                b.iter(|| {
                    let logits = model
                        .forward(black_box(&tokens), &place, &mut cache, &last_rows)
                        .unwrap();
                    black_box(logits)
                })
            },
        );
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let model = model();
    let vocab = model.cfg.vocab_size;
    let mut group = c.benchmark_group("decode");
    for batch in [1usize, 4] {
        // Fill positions 0..DECODE_CONTEXT of every slot, then time one step at DECODE_CONTEXT.
        let mut cache = KvCache::new(&CpuBackend, &model.cfg, batch, DECODE_CONTEXT + 1).unwrap();
        let prompt = random_tokens(batch * DECODE_CONTEXT, vocab, 2);
        model
            .forward(
                &prompt,
                &TokenPlacement::contiguous(batch, 0, DECODE_CONTEXT),
                &mut cache,
                &[0],
            )
            .unwrap();
        let tokens = random_tokens(batch, vocab, 3);
        let place = TokenPlacement::contiguous(batch, DECODE_CONTEXT, 1);
        let rows: Vec<usize> = (0..batch).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("b{batch}_ctx{DECODE_CONTEXT}")),
            |b| {
                b.iter(|| {
                    let logits = model
                        .forward(black_box(&tokens), &place, &mut cache, &rows)
                        .unwrap();
                    black_box(logits)
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = prefill, decode
}

fn main() {
    let cfg = ModelConfig::from_json_str(CONFIG).expect("tools/bench_model_10m.json");
    eprintln!(
        "cpu_forward: {} parameters, {} rayon threads (RAYON_NUM_THREADS={})",
        cfg.num_params(),
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
    );
    // On one of rayon's worker threads, as the binary runs its commands (src/main.rs): the ops'
    // parallel parts then start where they are needed instead of being handed over from the
    // main thread every time.
    rayon::ThreadPoolBuilder::new()
        .build()
        .expect("rayon thread pool")
        .install(|| {
            benches();
            Criterion::default().configure_from_args().final_summary();
        });
}
