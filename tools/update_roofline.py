#!/usr/bin/env python3
"""The GRPO update's time at a device's ceilings, op by op, from a `bench step --profile --json`
file: each op's work (model FLOPs and operand bytes, src/backend/op_profile.rs) over the rate
it can reach at best, the larger of its compute time and its memory time (a roofline):

    ideal = max(flops / (matmul or attention TFLOP/s), bytes / copy GB/s)

Summed over the update's ops, that is the shortest update the backend's ops allow (launch gaps
and host work aside), so Σ model FLOPs / ideal / peak is the highest MFU they can reach. Given a
profile measured on the GPU it also prints each op's measured time and its efficiency (ideal /
measured): the ops far below 100 % are where the update loses its time.

Defaults are the H200's ceilings measured on 2026-11-27 (bench/results/gpu_check_2026-11-27_h200.md):
device-to-device copy 4283 GB/s, a bf16 8192^3 matmul 793 TFLOP/s (cuBLAS at the 0.5B model's
products, m = 2048: 564-620), and for attention FlashAttention-2's forward + backward at T = 512,
d = 64 on the same card (101 TFLOP/s with the backward counted 2.5x the forward: 87 in the model
FLOPs this profile counts, backward 2x).

    python3 tools/update_roofline.py STEP.json [--phase update] [--matmul-tflops 793]
        [--attention-tflops 87] [--copy-gbps 4283] [--peak-tflops P]
(--peak-tflops: the MFU's peak; default the profile's own `peak_tflops`, else 989, the H100 and
H200 SXM's dense bf16.)

A profile at the real shape without a GPU: the CUDA backend on a device that does no work
(tests/null_device_work.rs; 8 x 8 samples of 128 + 256 tokens of the Qwen2.5-0.5B shape, and 4 x 8
of the 1.5B shape with --ignored), written to DIR/qwen2.5-0.5b.json:
    THINKSHORT_WORK_DIR=DIR cargo test --release --test null_device_work [-- --ignored]
"""

import argparse
import json

ATTENTION = ("attention_forward", "attention_backward")


def label(o):
    return o["op"] + (" m={} k={} n={}".format(*o["shape"]) if o.get("shape") else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="bench step --profile --json output")
    ap.add_argument("--phase", default="update", choices=("update", "rollout"))
    ap.add_argument("--matmul-tflops", type=float, default=793.0)
    ap.add_argument("--attention-tflops", type=float, default=87.0)
    ap.add_argument("--copy-gbps", type=float, default=4283.0)
    ap.add_argument("--peak-tflops", type=float, help="the MFU's peak (default: the profile's, else 989)")
    args = ap.parse_args()

    run = json.load(open(args.profile))
    if not run.get("profile"):
        raise SystemExit(f"{args.profile} holds no profile: run bench step with --profile")
    ops = run["profile"][f"{args.phase}_ops"]
    peak = args.peak_tflops or run.get("peak_tflops") or 989.0
    measured = str(run.get("device", "")).startswith("cuda")
    rows = []
    for o in ops:
        rate = args.attention_tflops if o["op"] in ATTENTION else args.matmul_tflops
        compute = o["flops"] / (rate * 1e12)
        memory = o["bytes"] / (args.copy_gbps * 1e9)
        rows.append((max(compute, memory), "compute" if compute >= memory else "memory", o))
    rows.sort(key=lambda r: -r[0])
    ideal = sum(r[0] for r in rows)
    flops = sum(r[2]["flops"] for r in rows)
    spent = sum(r[2]["seconds"] for r in rows)

    print(f"{args.profile} ({run.get('device')}, {run.get('model_config')}, "
          f"{run.get('prompts')} x {run.get('group')} samples of {run.get('prompt_len')} + "
          f"{run.get('new_tokens')} tokens), {args.phase}")
    print(f"ceilings: matmul {args.matmul_tflops:.0f} TFLOP/s, attention {args.attention_tflops:.0f} TFLOP/s "
          f"(model FLOPs), copy {args.copy_gbps:.0f} GB/s")
    head = f"{'op':<44} {'calls':>6} {'GFLOP':>9} {'GB':>8} {'bound':>8} {'ideal ms':>9}"
    print(head + (f" {'ms':>9} {'eff.':>6}" if measured else ""))
    for t, bound, o in rows:
        line = (f"{label(o):<44} {o['calls']:>6} {o['flops'] / 1e9:>9.1f} {o['bytes'] / 1e9:>8.2f} "
                f"{bound:>8} {1e3 * t:>9.2f}")
        if measured:
            line += f" {1e3 * o['seconds']:>9.2f} {100 * t / max(o['seconds'], 1e-12):>5.0f}%"
        print(line)
    by_bound = {b: sum(r[0] for r in rows if r[1] == b) for b in ("compute", "memory")}
    print(f"ideal {args.phase}: {1e3 * ideal:.1f} ms ({1e3 * by_bound['compute']:.1f} compute-bound, "
          f"{1e3 * by_bound['memory']:.1f} memory-bound); {flops / 1e12:.2f} TFLOP of model FLOPs: "
          f"MFU at most {100 * flops / ideal / (peak * 1e12):.1f} % of {peak:.0f}")
    if measured:
        print(f"measured: {1e3 * spent:.1f} ms in the ops ({100 * ideal / spent:.0f} % of the ideal rate), "
              f"{1e3 * run['profile'][args.phase + '_s']:.1f} ms of wall time")


if __name__ == "__main__":
    main()
