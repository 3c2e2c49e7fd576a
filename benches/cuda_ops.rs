//! Throughput of every CUDA op at the shapes of Qwen2.5-0.5B (hidden 896, intermediate 4864,
//! 14 query / 2 KV heads of 64, vocab 151936), for one token (decode) and 2048 tokens (prefill),
//! of fused attention forward and backward at the FlashAttention benchmark's shapes, of the
//! other backward ops, and of AdamW, the gradient norm and token sampling.
//! Memory-bound ops report bytes/s (each input read once, each output written once); matmul and
//! attention (not decode) report elements/s where one element is one FLOP.
//! On a machine without a usable GPU it prints "no GPU: skipping CUDA benchmarks" and exits 0.
//!
//!     cargo bench --bench cuda_ops
//!     target/release/deps/cuda_ops-<hash> --bench        # the built binary, e.g. on a GPU machine
//!
//! Each timed batch queues `iters` launches and waits once at the end (`iter_custom`), so the
//! numbers are device time plus launch gaps, not host synchronisation per call.

use criterion::{BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use thinkshort::backend::{
    Backend, GradWrite, PolicyTokens, TokenPlacement, TrainBackend, POLICY_STATS,
};
use thinkshort::cuda::ops::flash_attention::{FlashBackward, FlashForward};
use thinkshort::cuda::CudaBackend;
use thinkshort::grpo::LossOptions;
use thinkshort::rng::Philox;
use thinkshort::sampling::{SamplingParams, TokenDraws};

const HIDDEN: usize = 896;
const INTERMEDIATE: usize = 4864;
const HEADS: usize = 14;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 151936;
const BF16: u64 = 2;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Philox::new(seed, 3);
    (0..n).map(|_| rng.next_normal()).collect()
}

/// Times `op` with criterion: `iters` calls queued, one synchronize.
fn time(dev: &CudaBackend, iters: u64, mut op: impl FnMut()) -> Duration {
    dev.synchronize().expect("device error before timing");
    let start = Instant::now();
    for _ in 0..iters {
        op();
    }
    dev.synchronize().expect("device error while timing");
    start.elapsed()
}

fn elementwise(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("elementwise");
    let table = dev.upload(&random(VOCAB * HIDDEN, 6)).unwrap();
    for m in [1usize, 2048] {
        let x = dev.upload(&random(m * HIDDEN, 1)).unwrap();
        let w = dev.upload(&random(HIDDEN, 2)).unwrap();
        let mut out = dev.zeros(m * HIDDEN).unwrap();
        g.throughput(Throughput::Bytes(BF16 * (2 * m * HIDDEN + HIDDEN) as u64));
        g.bench_function(BenchmarkId::new("rmsnorm", format!("{m}x{HIDDEN}")), |b| {
            b.iter_custom(|n| {
                time(dev, n, || {
                    dev.rmsnorm_forward(
                        dev.full_mut(&mut out),
                        dev.full(&x),
                        dev.full(&w),
                        HIDDEN,
                        1e-6,
                    )
                })
            })
        });
        g.throughput(Throughput::Bytes(BF16 * (3 * m * HIDDEN) as u64));
        g.bench_function(
            BenchmarkId::new("residual_add", format!("{m}x{HIDDEN}")),
            |b| {
                b.iter_custom(|n| {
                    time(dev, n, || {
                        dev.residual_add(dev.full_mut(&mut out), dev.full(&x))
                    })
                })
            },
        );

        let gate_up = dev.upload(&random(m * 2 * INTERMEDIATE, 3)).unwrap();
        let mut act = dev.zeros(m * INTERMEDIATE).unwrap();
        g.throughput(Throughput::Bytes(BF16 * (3 * m * INTERMEDIATE) as u64));
        g.bench_function(
            BenchmarkId::new("swiglu", format!("{m}x{INTERMEDIATE}")),
            |b| {
                b.iter_custom(|n| {
                    time(dev, n, || {
                        dev.swiglu_forward(dev.full_mut(&mut act), dev.full(&gate_up), INTERMEDIATE)
                    })
                })
            },
        );

        let positions: Vec<u32> = (0..m as u32).collect();
        let inv_freq = dev
            .upload_f32(
                &(0..HEAD_DIM / 2)
                    .map(|i| 1e6f32.powf(-2.0 * i as f32 / HEAD_DIM as f32))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let mut q = dev.upload(&random(m * HEADS * HEAD_DIM, 5)).unwrap();
        let mut k = dev.upload(&random(m * KV_HEADS * HEAD_DIM, 6)).unwrap();
        let mut v = dev.upload(&random(m * KV_HEADS * HEAD_DIM, 7)).unwrap();
        let qkv = dev
            .upload(&random(m * (HEADS + 2 * KV_HEADS) * HEAD_DIM, 11))
            .unwrap();
        let q_bias = dev.upload(&random(HEADS * HEAD_DIM, 8)).unwrap();
        let k_bias = dev.upload(&random(KV_HEADS * HEAD_DIM, 9)).unwrap();
        let v_bias = dev.upload(&random(KV_HEADS * HEAD_DIM, 10)).unwrap();
        let touched = m * (HEADS + 2 * KV_HEADS) * HEAD_DIM;
        g.throughput(Throughput::Bytes(BF16 * (2 * touched) as u64));
        g.bench_function(
            BenchmarkId::new("qkv_rope", format!("{m}x{HEADS}+2x{KV_HEADS}x{HEAD_DIM}")),
            |b| {
                b.iter_custom(|n| {
                    time(dev, n, || {
                        dev.qkv_rope_forward(
                            [
                                dev.full_mut(&mut q),
                                dev.full_mut(&mut k),
                                dev.full_mut(&mut v),
                            ],
                            dev.full(&qkv),
                            [&q_bias, &k_bias, &v_bias].map(|b| Some(dev.full(b))),
                            None,
                            &positions,
                            dev.full(&inv_freq),
                            HEADS,
                            KV_HEADS,
                            HEAD_DIM,
                        )
                    })
                })
            },
        );

        let ids: Vec<u32> = (0..m as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
        g.throughput(Throughput::Bytes(BF16 * (2 * m * HIDDEN) as u64));
        g.bench_function(
            BenchmarkId::new("embedding", format!("{m}x{HIDDEN}")),
            |b| {
                b.iter_custom(|n| {
                    time(dev, n, || {
                        dev.embedding_forward(
                            dev.full_mut(&mut out),
                            dev.full(&table),
                            &ids,
                            HIDDEN,
                        )
                    })
                })
            },
        );
    }
    g.finish();
}

fn matmul(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("matmul_flops");
    // (k, n): the MLP up/gate projection, the down projection, the tied LM head.
    for (k, n) in [
        (HIDDEN, INTERMEDIATE),
        (INTERMEDIATE, HIDDEN),
        (HIDDEN, VOCAB),
    ] {
        let w = dev.upload(&random(n * k, 8)).unwrap();
        for m in [1usize, 2048] {
            let x = dev.upload(&random(m * k, 7)).unwrap();
            let mut out = if n == VOCAB {
                dev.zeros_f32(m * n)
            } else {
                dev.zeros(m * n)
            }
            .unwrap();
            g.throughput(Throughput::Elements((2 * m * k * n) as u64));
            g.bench_function(
                BenchmarkId::new(format!("k{k}_n{n}"), format!("m{m}")),
                |b| {
                    b.iter_custom(|iters| {
                        time(dev, iters, || {
                            dev.matmul_forward(
                                dev.full_mut(&mut out),
                                dev.full(&x),
                                dev.full(&w),
                                None,
                                m,
                                k,
                                n,
                            )
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

/// Fused causal attention at the FlashAttention benchmark's shapes: 16384 tokens in sequences of
/// T, 2048 / d heads (multi-head). FLOPs: forward 4·B·H·T²·d / 2 (causal), backward 2.5× that;
/// tools/bench_attention_torch.py times PyTorch's flash SDPA on the same shapes. The forward is
/// timed with each fused kernel (64 and 128 query rows per block), the backward with each
/// variant (the dq and dk/dv kernels; the fused kernel over 64- and 128-key tiles).
fn flash_attention(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("flash_attention");
    for head_dim in [64usize, 128] {
        let heads = 2048 / head_dim;
        let dim = heads * head_dim;
        for t in [512usize, 1024, 2048] {
            let seqs = 16384 / t;
            let m = seqs * t;
            let place = TokenPlacement::contiguous(seqs, 0, t);
            let q = dev.upload(&random(m * dim, 9)).unwrap();
            let ck = dev.upload(&random(m * dim, 10)).unwrap();
            let cv = dev.upload(&random(m * dim, 11)).unwrap();
            let dout = dev.upload(&random(m * dim, 16)).unwrap();
            let mut out = dev.zeros(m * dim).unwrap();
            let mut lse = dev.zeros_f32(m * heads).unwrap();
            let (mut dq, mut dck, mut dcv) = (
                dev.zeros(m * dim).unwrap(),
                dev.zeros(m * dim).unwrap(),
                dev.zeros(m * dim).unwrap(),
            );
            let forward_flops = (4 * seqs * heads * t * t * head_dim / 2) as u64;
            let id = |what: &str| BenchmarkId::new(format!("{what}_d{head_dim}"), format!("T{t}"));
            let forward = |out: &mut _, lse: &mut _| {
                dev.attention_forward(
                    dev.full_mut(out),
                    Some(dev.full_mut(lse)),
                    dev.full(&q),
                    dev.full(&ck),
                    dev.full(&cv),
                    &place,
                    t,
                    heads,
                    heads,
                    head_dim,
                )
            };
            g.throughput(Throughput::Elements(forward_flops));
            // the 64-row kernel, then the 128-row one (the default for these shapes)
            for (what, variant) in [
                ("forward_flops", FlashForward::Narrow),
                ("forward_wide_flops", FlashForward::Wide),
            ] {
                dev.set_flash_forward(Some(variant));
                g.bench_function(id(what), |b| {
                    b.iter_custom(|n| time(dev, n, || forward(&mut out, &mut lse)))
                });
            }
            dev.set_flash_forward(None);
            forward(&mut out, &mut lse);
            let backward = |dq: &mut _, dck: &mut _, dcv: &mut _| {
                dev.attention_backward(
                    dev.full_mut(dq),
                    dev.full_mut(dck),
                    dev.full_mut(dcv),
                    dev.full(&dout),
                    dev.full(&out),
                    dev.full(&lse),
                    dev.full(&q),
                    dev.full(&ck),
                    dev.full(&cv),
                    &place,
                    t,
                    heads,
                    heads,
                    head_dim,
                )
            };
            g.throughput(Throughput::Elements(forward_flops * 5 / 2));
            for (what, variant) in [
                ("backward_flops", FlashBackward::Split),
                ("backward_fused_flops", FlashBackward::Fused),
                ("backward_fused_wide_flops", FlashBackward::FusedWide),
            ] {
                let previous = dev.set_flash_backward(variant);
                g.bench_function(id(what), |b| {
                    b.iter_custom(|n| time(dev, n, || backward(&mut dq, &mut dck, &mut dcv)))
                });
                dev.set_flash_backward(previous);
            }
        }
    }
    g.finish();
}

/// Attention of one new token per sequence over its cache (Qwen2.5-0.5B heads: 14 / 2 of 64, and
/// a 7 / 1 group of 128): bytes = the K and V rows read. 32 × 2048 is a realistic rollout step
/// (34 MB: a few microseconds, so launch and host costs show); 32 × 16384 and 4 × 65536 move
/// 134–268 MB, where the kernel's own bandwidth shows, the latter only with the key splits.
fn decode_attention(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("decode_attention");
    for (heads, kv_heads, head_dim) in [(HEADS, KV_HEADS, HEAD_DIM), (7, 1, 128)] {
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        for (seqs, ctx) in [(32usize, 2048usize), (32, 16384), (4, 65536)] {
            let place = TokenPlacement {
                slots: (0..seqs as u32).collect(),
                positions: vec![ctx as u32 - 1; seqs],
            };
            let q = dev.upload(&random(seqs * q_dim, 12)).unwrap();
            let ck = dev.upload(&random(seqs * ctx * kv_dim, 13)).unwrap();
            let cv = dev.upload(&random(seqs * ctx * kv_dim, 14)).unwrap();
            let mut out = dev.zeros(seqs * q_dim).unwrap();
            g.throughput(Throughput::Bytes(BF16 * (2 * seqs * ctx * kv_dim) as u64));
            g.bench_function(
                BenchmarkId::new(
                    format!("bytes_h{heads}_kv{kv_heads}_d{head_dim}"),
                    format!("{seqs}x{ctx}"),
                ),
                |b| {
                    b.iter_custom(|n| {
                        time(dev, n, || {
                            dev.attention_forward(
                                dev.full_mut(&mut out),
                                None,
                                dev.full(&q),
                                dev.full(&ck),
                                dev.full(&cv),
                                &place,
                                ctx,
                                heads,
                                kv_heads,
                                head_dim,
                            )
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn logprob(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("logprob");
    let r = 512;
    let targets: Vec<u32> = (0..r as u32).map(|i| (i * 104729) % VOCAB as u32).collect();
    let mut logp = dev.zeros_f32(r).unwrap();
    let mut entropy = dev.zeros_f32(r).unwrap();
    for f32_logits in [false, true] {
        let host = random(r * VOCAB, 15);
        let logits = if f32_logits {
            dev.upload_f32(&host)
        } else {
            dev.upload(&host)
        }
        .unwrap();
        let bytes = if f32_logits { 4 } else { BF16 };
        g.throughput(Throughput::Bytes(bytes * (r * VOCAB) as u64));
        let name = if f32_logits {
            "f32_logits"
        } else {
            "bf16_logits"
        };
        g.bench_function(BenchmarkId::new(name, format!("{r}x{VOCAB}")), |b| {
            b.iter_custom(|n| {
                time(dev, n, || {
                    dev.logprob_forward(
                        dev.full_mut(&mut logp),
                        dev.full_mut(&mut entropy),
                        dev.full(&logits),
                        &targets,
                        VOCAB,
                        1.0,
                    )
                })
            })
        });
    }
    g.finish();
}

/// The backward ops at 2048 tokens of the same shapes: matmul_backward (dx and dW, FLOPs
/// 4·M·K·N), the row-wise ops in bytes (inputs read once, outputs written once; the f32
/// parameter gradients' atomics are not counted), logprob_backward over the vocabulary.
fn backward(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("backward");
    let m = 2048usize;
    for (k, n) in [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)] {
        let dout = dev.upload(&random(m * n, 20)).unwrap();
        let x = dev.upload(&random(m * k, 21)).unwrap();
        let w = dev.upload(&random(n * k, 22)).unwrap();
        let mut dx = dev.zeros(m * k).unwrap();
        let mut dw = dev.zeros_f32(n * k).unwrap();
        g.throughput(Throughput::Elements((4 * m * k * n) as u64));
        g.bench_function(
            BenchmarkId::new(format!("matmul_flops_k{k}_n{n}"), format!("m{m}")),
            |b| {
                b.iter_custom(|iters| {
                    time(dev, iters, || {
                        dev.matmul_backward(
                            Some(dev.full_mut(&mut dx)),
                            GradWrite::Overwrite,
                            dev.full_mut(&mut dw),
                            dev.full(&dout),
                            dev.full(&x),
                            dev.full(&w),
                            m,
                            k,
                            n,
                        )
                    })
                })
            },
        );
    }

    // 24576 rows: the 0.5B GRPO step's update batch (64 sequences of 384 tokens)
    for rows in [m, 24_576] {
        let dout = dev.upload(&random(rows * HIDDEN, 23)).unwrap();
        let x = dev.upload(&random(rows * HIDDEN, 24)).unwrap();
        let weight = dev.upload(&random(HIDDEN, 25)).unwrap();
        let mut dx = dev.zeros(rows * HIDDEN).unwrap();
        let mut dweight = dev.zeros_f32(HIDDEN).unwrap();
        g.throughput(Throughput::Bytes(BF16 * (3 * rows * HIDDEN) as u64));
        g.bench_function(
            BenchmarkId::new("rmsnorm_bytes", format!("{rows}x{HIDDEN}")),
            |b| {
                b.iter_custom(|iters| {
                    time(dev, iters, || {
                        dev.rmsnorm_backward(
                            dev.full_mut(&mut dx),
                            GradWrite::Add,
                            dev.full_mut(&mut dweight),
                            dev.full(&dout),
                            dev.full(&x),
                            dev.full(&weight),
                            HIDDEN,
                            1e-6,
                        )
                    })
                })
            },
        );
    }

    let n = m * INTERMEDIATE;
    let dout = dev.upload(&random(n, 26)).unwrap();
    let gate_up = dev.upload(&random(2 * n, 27)).unwrap();
    let mut d_gate_up = dev.zeros(2 * n).unwrap();
    g.throughput(Throughput::Bytes(BF16 * (5 * n) as u64));
    g.bench_function(
        BenchmarkId::new("swiglu_bytes", format!("{m}x{INTERMEDIATE}")),
        |b| {
            b.iter_custom(|iters| {
                time(dev, iters, || {
                    dev.swiglu_backward(
                        dev.full_mut(&mut d_gate_up),
                        dev.full(&dout),
                        dev.full(&gate_up),
                        INTERMEDIATE,
                    )
                })
            })
        },
    );

    let r = 512;
    let targets: Vec<u32> = (0..r as u32).map(|i| (i * 104729) % VOCAB as u32).collect();
    let logits = dev.upload_f32(&random(r * VOCAB, 29)).unwrap();
    let dlogp = dev.upload_f32(&random(r, 30)).unwrap();
    let mut dlogits = dev.zeros(r * VOCAB).unwrap();
    // f32 logits read twice, bf16 gradient written once
    g.throughput(Throughput::Bytes((2 * 4 + 2) * (r * VOCAB) as u64));
    g.bench_function(
        BenchmarkId::new("logprob_bytes", format!("{r}x{VOCAB}")),
        |b| {
            b.iter_custom(|iters| {
                time(dev, iters, || {
                    dev.logprob_backward(
                        dev.full_mut(&mut dlogits),
                        dev.full(&dlogp),
                        dev.full(&logits),
                        &targets,
                        VOCAB,
                        1.0,
                    )
                })
            })
        },
    );

    // The same rows with the GRPO loss fused in (64 completions of 8 rows, old and reference
    // log-probs given): the same bytes, plus a few per row.
    let seqs: Vec<u32> = (0..r as u32).map(|i| i / 8).collect();
    let advantages = dev.upload_f32(&random(r / 8, 31)).unwrap();
    let weights = dev.upload_f32(&vec![1.0 / r as f32; r / 8]).unwrap();
    let old = dev.upload_f32(&vec![-12.0; r]).unwrap();
    let reference = dev.upload_f32(&vec![-12.1; r]).unwrap();
    let mut logp = dev.zeros_f32(r).unwrap();
    let mut stats = dev.zeros_f32(r * POLICY_STATS).unwrap();
    let loss = LossOptions::default();
    g.bench_function(
        BenchmarkId::new("policy_loss_bytes", format!("{r}x{VOCAB}")),
        |b| {
            b.iter_custom(|iters| {
                time(dev, iters, || {
                    let tokens = PolicyTokens::<CudaBackend> {
                        seqs: &seqs,
                        advantages: dev.full(&advantages),
                        weights: dev.full(&weights),
                        old_logp: Some(dev.full(&old)),
                        ref_logp: Some(dev.full(&reference)),
                    };
                    dev.policy_loss_backward(
                        dev.full_mut(&mut dlogits),
                        dev.full_mut(&mut logp),
                        dev.full_mut(&mut stats),
                        dev.full(&logits),
                        &targets,
                        &tokens,
                        VOCAB,
                        1.0,
                        &loss,
                    )
                })
            })
        },
    );
    g.finish();
}

/// The GRPO step's other ops: AdamW over 494M parameters (the Qwen2.5-0.5B count; bytes: f32
/// master, m, v and grads read, master, m, v written, bf16 weights written), the gradient's sum
/// of squares (f32 read), and drawing 64 tokens from 64 rows of f32 logits (read twice).
fn optimizer_and_sampling(c: &mut Criterion, dev: &CudaBackend) {
    let mut g = c.benchmark_group("grpo_step");
    let n = 494_032_768usize;
    let mut params = dev.zeros(n).unwrap();
    let mut master = dev.zeros_f32(n).unwrap();
    let mut m = dev.zeros_f32(n).unwrap();
    let mut v = dev.zeros_f32(n).unwrap();
    let grads = dev.zeros_f32(n).unwrap();
    let step = thinkshort::optim::AdamW::new(0, 0.9, 0.999, 1e-8, 0.0).next_step(1e-6, 1.0);
    g.throughput(Throughput::Bytes(((4 * 4 + 3 * 4 + 2) * n) as u64));
    g.bench_function(BenchmarkId::new("adamw_bytes", format!("{n}")), |b| {
        b.iter_custom(|iters| {
            time(dev, iters, || {
                dev.adamw_step(
                    dev.full_mut(&mut params),
                    dev.full_mut(&mut master),
                    dev.full_mut(&mut m),
                    dev.full_mut(&mut v),
                    dev.full(&grads),
                    &step,
                )
            })
        })
    });
    let mut out = dev.zeros_f32(2).unwrap();
    g.throughput(Throughput::Bytes((4 * n) as u64));
    g.bench_function(BenchmarkId::new("sum_squares_bytes", format!("{n}")), |b| {
        b.iter_custom(|iters| {
            time(dev, iters, || {
                dev.sum_squares(dev.full_mut(&mut out), dev.full(&grads))
            })
        })
    });
    drop((params, master, m, v, grads));

    let rows = 64;
    let logits = dev.upload_f32(&random(rows * VOCAB, 31)).unwrap();
    let streams: Vec<u32> = (0..rows as u32).collect();
    let draws = TokenDraws::Philox {
        seed: 1,
        first_stream: 0,
        streams: &streams,
        step: 0,
    };
    let mut ids = dev.zeros_f32(rows).unwrap();
    let mut logp = dev.zeros_f32(rows).unwrap();
    g.throughput(Throughput::Bytes((2 * 4 * rows * VOCAB) as u64));
    // Plain sampling, then top-k 50 + top-p 0.95 (the radix searches read the row some 35 more times).
    for (name, top_k, top_p) in [
        ("sample_tokens_bytes", 0, 1.0),
        ("sample_tokens_top_p_bytes", 50, 0.95),
    ] {
        let params = SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
        };
        g.bench_function(BenchmarkId::new(name, format!("{rows}x{VOCAB}")), |b| {
            b.iter_custom(|iters| {
                time(dev, iters, || {
                    dev.sample_tokens(
                        dev.full_mut(&mut ids),
                        dev.full_mut(&mut logp),
                        dev.full(&logits),
                        &draws,
                        VOCAB,
                        &params,
                    )
                })
            })
        });
    }
    g.finish();
}

fn main() {
    let dev = match CudaBackend::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("no GPU: skipping CUDA benchmarks ({e:#})");
            return;
        }
    };
    println!("CUDA op benchmarks on {}", dev.device_name());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .sample_size(10)
        .configure_from_args();
    elementwise(&mut c, &dev);
    matmul(&mut c, &dev);
    flash_attention(&mut c, &dev);
    decode_attention(&mut c, &dev);
    logprob(&mut c, &dev);
    backward(&mut c, &dev);
    optimizer_and_sampling(&mut c, &dev);
    c.final_summary();
}
