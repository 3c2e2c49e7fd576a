#!/usr/bin/env python3
"""PyTorch baseline for `thinkshort bench step`: one GRPO step, the same shapes.

A random-weight Qwen2ForCausalLM (transformers) built from a config.json, bf16 parameters on the
GPU (or f32 on the CPU with `--device cpu`, as thinkshort's CPU backend), SDPA attention, eager
mode (no torch.compile). One step:
  rollout: P prompts of L random tokens, each repeated G times, `model.generate` with sampling at
           temperature 1 (no top-k / top-p) and min_new_tokens = max_new_tokens = T, so every
           sample has exactly T tokens (thinkshort never stops at an EOS in this benchmark);
  rewards: a seeded coin flip per sample (a random model answers nothing), group-normalised;
  update:  one forward over the P·G prompt + completion sequences (logits of the completion rows
           only), per-token log-probs (TRL's per-row log_softmax in f32), the clipped policy loss
           (ε = 0.2, sequence mean of token means, β = 0), backward, clip_grad_norm_(1.0), fused
           AdamW on the bf16 parameters (thinkshort keeps f32 master weights: more work; on the CPU both
           sides update f32 weights).
Timed after one warm-up step; the median of `--steps` steps is reported. Training FLOPs use the
same count as thinkshort (3 × forward: 2 per matmul weight per token, the LM head on the scored
rows, 4·q_dim per attended position); MFU over the dense bf16 peak of the card (on the CPU only
with --peak-tflops).

    python3 tools/bench_step_torch.py --model-config tools/model_configs/qwen2.5-0.5b.json \\
        --prompts 8 --group 8 --prompt-len 128 --new-tokens 256 [--json OUT.json]
    python3 tools/bench_step_torch.py --device cpu --threads 2 --model-config tools/bench_model_10m.json \\
        --prompts 2 --group 4 --prompt-len 64 --new-tokens 64
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_gpu import build_model  # noqa: E402

PEAK_BF16_TFLOPS = [("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]


def peak_tflops(name):
    n = name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if all(part in n for part in key.split()):
            return peak
    return None


def train_flops(cfg, seqs, length, scored):
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    layer_weights = h * q + 2 * h * kv + q * h + 3 * h * i
    tokens = seqs * length
    attended = seqs * (length * (length + 1) // 2)
    forward = cfg.num_hidden_layers * (2 * layer_weights * tokens + 4 * q * attended) + 2 * h * cfg.vocab_size * scored
    return 3 * forward


def token_logprobs(logits, targets):
    # TRL's selective_log_softmax for bf16 (also run on the CPU's f32): one sequence at a time, in f32.
    out = []
    for row_logits, row_targets in zip(logits, targets):
        row = torch.log_softmax(row_logits.float(), dim=-1)
        out.append(row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def one_step(model, cfg, opt, args, step):
    from transformers import GenerationConfig

    p, g, length, t, dev = args.prompts, args.group, args.prompt_len, args.new_tokens, args.device
    gen = torch.Generator(device=dev).manual_seed(1000 + step)
    prompts = torch.randint(0, cfg.vocab_size, (p, length), device=dev, generator=gen)
    prompts = prompts.repeat_interleave(g, dim=0)
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=t,
                          min_new_tokens=t, eos_token_id=cfg.eos_token_id, pad_token_id=0)
    synchronize(dev)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        seqs = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gc)
    synchronize(dev)
    rollout_s = time.perf_counter() - t0
    assert seqs.shape == (p * g, length + t), seqs.shape

    rewards = (torch.rand(p * g, device=dev, generator=gen) < 0.5).float().view(p, g)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1, 1)

    synchronize(dev)
    t1 = time.perf_counter()
    model.train()
    logits = model(input_ids=seqs, logits_to_keep=t + 1).logits[:, :-1]  # [P·G, T, V]
    logp = token_logprobs(logits, seqs[:, length:])
    ratio = torch.exp(logp - logp.detach())
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    loss = -surrogate.mean(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits, logp, ratio, surrogate, loss
    synchronize(dev)
    update_s = time.perf_counter() - t1
    step_s = time.perf_counter() - t0
    flops = train_flops(cfg, p * g, length + t, p * g * t)
    tflops = flops / update_s / 1e12
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(0)) if dev == "cuda" else None)
    return {
        "rollout_s": rollout_s,
        "rollout_tokens_per_s": p * g * t / rollout_s,
        "update_s": update_s,
        "train_tokens_per_s": p * g * (length + t) / update_s,
        "train_tflops": tflops,
        "train_mfu": tflops / peak if peak else None,
        "step_s": step_s,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: bf16 parameters (default); cpu: f32 parameters")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device == "cuda"
    model, cfg, n_params = build_model(args.model_config, args.device, torch.bfloat16 if on_gpu else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    device_name = torch.cuda.get_device_name(0) if on_gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}; {args.model_config}: "
          f"{n_params / 1e6:.1f}M parameters; {args.prompts} prompts x {args.group} samples, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for s in range(args.steps + 1):
        r = one_step(model, cfg, opt, args, s)
        mfu = f", MFU {100 * r['train_mfu']:.1f} %" if r["train_mfu"] else ""
        print(f"{'warm-up' if s == 0 else f'step {s}'}: rollout {r['rollout_s']:.2f} s ({r['rollout_tokens_per_s']:.0f} tok/s), "
              f"update {r['update_s']:.2f} s ({r['train_tokens_per_s']:.0f} tok/s, {r['train_tflops']:.1f} TFLOP/s{mfu}), "
              f"step {r['step_s']:.2f} s", flush=True)
        if s > 0:
            steps.append(r)
    steps.sort(key=lambda r: r["step_s"])
    median = steps[len(steps) // 2]
    median["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if on_gpu else None
    memory = f"; peak memory {median['peak_memory_bytes'] / 2**30:.2f} GiB" if on_gpu else ""
    print(f"median step: {median['step_s']:.2f} s; rollout {median['rollout_tokens_per_s']:.0f} tok/s; "
          f"training {median['train_tokens_per_s']:.0f} tok/s{memory}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                       "model_config": args.model_config, "num_params": n_params, "prompts": args.prompts,
                       "group": args.group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                       "result": median}, f, indent=2)


if __name__ == "__main__":
    main()
