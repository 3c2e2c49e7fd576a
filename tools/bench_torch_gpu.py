#!/usr/bin/env python3
"""PyTorch baseline for `thinkshort bench forward` on a GPU: the same shapes, the same timing.

A random-weight Qwen2ForCausalLM (transformers) built from a config.json, bf16 on the GPU, SDPA
attention, eager mode (no torch.compile), KV cache = transformers' default DynamicCache.
  prefill: `batch` prompts of `prompt_len` tokens in one forward (use_cache=True), logits of each
           sequence's last token only (logits_to_keep=1); median of 3 after 1 warm-up.
  decode:  from that cache, one warm-up step, then `decode_steps` steps of one token per sequence
           (logits of every row), each waited for (as sampling would); mean ms per step.
Both sides call synchronize before reading the clock (thinkshort: `backend.synchronize()`).

With --ceilings it also measures the two device ceilings once: device-to-device copy bandwidth
(bytes read + written, 4 GiB buffers, far larger than L2) and an 8192^3 bf16 matmul (random data).

    python3 tools/bench_torch_gpu.py --model-config tools/model_configs/qwen2.5-0.5b.json \\
        --batch 1,8 --prompt-len 256 --decode-steps 32 [--ceilings] [--json OUT.json]
"""

import argparse
import json
import statistics
import time

import torch


def build_model(config_path, device="cuda", dtype=torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with open(config_path) as f:
        d = json.load(f)
    for key in ("torch_dtype", "dtype", "architectures", "transformers_version"):
        d.pop(key, None)
    cfg = Qwen2Config(**d)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, cfg, n_params


def sync_time(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.no_grad()
def bench_batch(model, cfg, batch, prompt_len, steps):
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda", generator=gen)
    times = []
    for run in range(4):
        t, out = sync_time(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1))
        if run > 0:
            times.append(t)
    prefill_s = statistics.median(times)
    cache = out.past_key_values
    step_tokens = torch.randint(0, cfg.vocab_size, (steps + 1, batch, 1), device="cuda", generator=gen)
    model(input_ids=step_tokens[0], past_key_values=cache, use_cache=True)  # warm-up step
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        model(input_ids=step_tokens[i], past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
    decode_s = (time.perf_counter() - start) / steps
    return {
        "batch": batch,
        "prefill_tokens": batch * prompt_len,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_ms_per_step": decode_s * 1e3,
        "decode_tokens_per_s": batch / decode_s,
    }


@torch.no_grad()
def ceilings():
    n = 1 << 31  # 2^31 bf16 values = 4 GiB per buffer
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    copy_ms = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        copy_ms.append(s.elapsed_time(e))
    copy_gbs = 2 * x.numel() * 2 / (statistics.median(copy_ms) / 1e3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    mm_ms = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        mm_ms.append(s.elapsed_time(e))
    tflops = 2 * 8192**3 / (statistics.median(mm_ms) / 1e3) / 1e12
    return {"copy_gb_per_s": copy_gbs, "bf16_matmul_tflops": tflops}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--ceilings", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers

    model, cfg, n_params = build_model(args.model_config)
    dev = torch.cuda.get_device_name(0)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {dev}; "
        f"{args.model_config}: {n_params / 1e6:.1f}M parameters, bf16, sdpa, DynamicCache; "
        f"prompt {args.prompt_len}, {args.decode_steps} decode steps"
    )
    print(f"{'batch':>5} {'prefill ms':>11} {'prefill tok/s':>13} {'decode ms/st':>13} {'decode tok/s':>12}")
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        r = bench_batch(model, cfg, batch, args.prompt_len, args.decode_steps)
        results.append(r)
        print(
            f"{r['batch']:>5} {r['prefill_ms']:>11.2f} {r['prefill_tokens_per_s']:>13.1f} "
            f"{r['decode_ms_per_step']:>13.3f} {r['decode_tokens_per_s']:>12.1f}"
        )
    del model
    torch.cuda.empty_cache()
    report = {
        "device": dev,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_config": args.model_config,
        "num_params": n_params,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "results": results,
    }
    if args.ceilings:
        report["ceilings"] = ceilings()
        c = report["ceilings"]
        print(f"ceilings: copy {c['copy_gb_per_s']:.0f} GB/s (read + write), bf16 matmul 8192^3 {c['bf16_matmul_tflops']:.0f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
