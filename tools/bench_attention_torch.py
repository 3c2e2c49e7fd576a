#!/usr/bin/env python3
"""PyTorch baseline for the fused attention benchmarks of benches/cuda_ops.rs (group
`flash_attention`): scaled_dot_product_attention restricted to the flash backend, bf16, causal,
on the same shapes: 16384 tokens as 16384 / T sequences of T tokens, 2048 / d heads (multi-head),
head dims 64 and 128, T = 512, 1024, 2048.

FLOPs as in the Rust bench: forward 4 * B * H * T^2 * d / 2 (causal); backward 2.5x forward.
Times: CUDA events around `iters` back-to-back calls after warm-up, median of 5 such batches.
The backward is timed alone (out.backward(dout, retain_graph=True)), as the Rust bench times
attention_backward alone.

    python3 tools/bench_attention_torch.py [--json OUT.json]
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, iters=10, batches=5, warmup=3):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def bench(head_dim, t):
    heads, seqs = 2048 // head_dim, 16384 // t
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (seqs, heads, t, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops = 4 * seqs * heads * t * t * head_dim / 2
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        bwd = time_ms(lambda: out.backward(dout, retain_graph=True))
    return {
        "head_dim": head_dim,
        "T": t,
        "batch": seqs,
        "heads": heads,
        "forward_ms": fwd,
        "backward_ms": bwd,
        "forward_tflops": flops / fwd / 1e9,
        "backward_tflops": 2.5 * flops / bwd / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / (fwd + bwd) / 1e9,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    print(f"PyTorch {torch.__version__} flash SDPA on {device}")
    print("| d | T | batch x heads | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    results = []
    for head_dim in (64, 128):
        for t in (512, 1024, 2048):
            r = bench(head_dim, t)
            results.append(r)
            print(f"| {head_dim} | {t} | {r['batch']} x {r['heads']} | {r['forward_ms']:.3f} | "
                  f"{r['forward_tflops']:.0f} | {r['backward_ms']:.3f} | {r['backward_tflops']:.0f} | "
                  f"{r['fwd_bwd_tflops']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
