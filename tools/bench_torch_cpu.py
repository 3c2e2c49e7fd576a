#!/usr/bin/env python3
"""PyTorch CPU baseline for benches/cpu_forward.rs: the same model and the same cases.

A transformers Qwen2ForCausalLM built from tools/bench_model_10m.json with random weights,
float32, eval mode, torch.inference_mode(), attn_implementation="sdpa".

Cases (tokens/s = tokens fed per forward / median seconds per forward):
  prefill/b1x256, prefill/b4x64   forward of the prompts with use_cache=True into an empty
                                  DynamicCache; logits of the last position only (logits_to_keep=1).
  decode/b1_ctx128, decode/b4_ctx128
                                  one new token per sequence at position 128, with a DynamicCache
                                  already holding positions 0..127; a fresh copy of that cache is
                                  made (untimed) before every timed step, so each step does the same work.

    /work/pyenv/bin/python tools/bench_torch_cpu.py --threads 2
"""

import argparse
import copy
import inspect
import json
import os
import statistics
import time

import torch
import transformers
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE_CONTEXT = 128


def build_model(config_path, seed):
    with open(config_path) as f:
        cfg = Qwen2Config(**json.load(f))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def cache_kwarg(model):
    """transformers >= 5.2x calls the cache argument `cache`; older releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def time_runs(fn, setup, warmup, runs):
    """Median seconds of `fn(setup())`, timing only fn."""
    for _ in range(warmup):
        fn(setup())
    times = []
    for _ in range(runs):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--config", default=os.path.join(HERE, "bench_model_10m.json"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.config, args.seed)
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {n_params} parameters, "
        f"attn {model.config._attn_implementation}, mkldnn {torch.backends.mkldnn.is_available()}"
    )
    ck = cache_kwarg(model)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def rand_ids(b, t):
        return torch.randint(0, vocab, (b, t), generator=gen)

    results = []
    with torch.inference_mode():
        for b, t in [(1, 256), (4, 64)]:
            ids = rand_ids(b, t)

            def step(cache, ids=ids):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{ck: cache})
                assert out.logits.shape == (ids.shape[0], 1, vocab)
                return out

            med, _ = time_runs(step, lambda: DynamicCache(config=model.config), args.warmup, args.runs)
            results.append((f"prefill/b{b}x{t}", b * t, med))

        for b in [1, 4]:
            base = DynamicCache(config=model.config)
            model(input_ids=rand_ids(b, DECODE_CONTEXT), use_cache=True, logits_to_keep=1, **{ck: base})
            assert base.get_seq_length() == DECODE_CONTEXT
            ids = rand_ids(b, 1)
            pos = torch.full((b, 1), DECODE_CONTEXT, dtype=torch.long)

            def step(cache, ids=ids, pos=pos):
                out = model(
                    input_ids=ids,
                    position_ids=pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **{ck: cache},
                )
                assert out.logits.shape == (ids.shape[0], 1, vocab)
                assert cache.get_seq_length() == DECODE_CONTEXT + 1
                return out

            med, _ = time_runs(step, lambda base=base: copy.deepcopy(base), args.warmup, max(args.runs, 50))
            results.append((f"decode/b{b}_ctx{DECODE_CONTEXT}", b, med))

    print(f"{'case':<20} {'tokens':>6} {'median ms':>10} {'tokens/s':>10}")
    for name, toks, med in results:
        print(f"{name:<20} {toks:>6} {med * 1e3:>10.3f} {toks / med:>10.1f}")


if __name__ == "__main__":
    main()
