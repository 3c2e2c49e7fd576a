#!/usr/bin/env bash
# Validates and measures thinkshort's CUDA code on a GPU machine that has no Rust toolchain
# (../shared/GPU.md): one run, full logs in OUT_DIR, a short table printed last.
#
# usage: tools/gpu_check.sh BIN_DIR OUT_DIR [BENCH_FILTER]
#   BIN_DIR  holds the release `thinkshort` binary, built on the development machine with the
#            pinned nvcc and REQUIRE_CUDA_KERNELS=1 (the kernels are embedded in it), and
#            optionally the criterion CUDA op benchmarks as `cuda_ops`:
#              NVCC=.../nvcc REQUIRE_CUDA_KERNELS=1 cargo build --release
#              NVCC=.../nvcc REQUIRE_CUDA_KERNELS=1 cargo bench --bench cuda_ops --no-run
#              mkdir -p gpu-carry && cp target/release/thinkshort gpu-carry/
#              cp target/release/deps/cuda_ops-<hash> gpu-carry/cuda_ops   # the one cargo printed
#   BENCH_FILTER  when given, a shorter run (~5 minutes): doctor, selfcheck, memcheck, the GRPO
#            step benchmarks, the demo's training run and the sft comparison, and only the
#            criterion benchmarks whose
#            names contain BENCH_FILTER; no forward, attention or end-to-end comparisons.
#   TORCH_STEP=0 (environment) skips the PyTorch GRPO step baseline (it does not change with
#            thinkshort's code).
#   OUT_DIR  receives (flat): summary.md, selfcheck.json, logs.txt, ours_0.5b.json,
#            ours_1.5b.json, torch_0.5b.json, torch_1.5b.json, torch_attention.json,
#            ours_step_{0.5b,1.5b}.json, ours_step_0.5b_eager.json (THINKSHORT_CUDA_GRAPHS=0),
#            ours_step_0.5b_{fused,fused-wide}.json (THINKSHORT_FLASH_BACKWARD),
#            ours_step_0.5b_micro16.json (--micro-batch 16), ours_step_0.5b_offload.json,
#            ours_step_0.5b_checkpointing.json (--activation-checkpointing),
#            ours_step_1.5b_paper.json (16 x 8 samples of 512 tokens, 8 update passes),
#            ours_step_qwen3-0.6b.json (the Qwen3 path: per-head q/k norms, head_dim 128),
#            torch_step_{0.5b,1.5b}.json, train_cuda_metrics.jsonl
#
# Steps (each under `timeout`; a failing step is logged and the script goes on):
#   nvidia-smi; locate libcuda / libcublas (LD_LIBRARY_PATH); thinkshort doctor --verbose;
#   thinkshort selfcheck --backend cuda (every CUDA op, a tiny model's forward, gradient and GRPO
#   update vs the CPU reference), then `selfcheck --quick` under compute-sanitizer memcheck;
#   thinkshort bench forward and tools/bench_torch_gpu.py on the Qwen2.5-0.5B and -1.5B shapes
#   (random weights, tools/model_configs/); the device ceilings (copy GB/s, bf16 matmul TFLOP/s);
#   thinkshort bench step and tools/bench_step_torch.py (one GRPO step) on both shapes; the
#   demo's training run on CUDA; `sft` of the demo model for 40 steps on CPU and CUDA, both
#   models' log-probs compared; the criterion op benchmarks and tools/bench_attention_torch.py
#   (flash SDPA on the fused attention benchmark's shapes); generate and logprobs with the demo
#   model on CPU and CUDA; the profiled 0.5B update against its roofline (tools/update_roofline.py).
#   Budget: ~8 minutes; with BENCH_FILTER ~5.
set -uo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    sed -n '2,20p' "$0"
    exit 2
fi
BIN=$(cd "$1" && pwd)/thinkshort
OUT=$2
FILTER=${3:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG=$OUT/logs.txt
: >"$LOG"
START=$(date +%s)

step() { # step NAME TIMEOUT_S CMD... : runs CMD, appends its output to logs.txt, records the status
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
    STATUS+=("$name: exit $rc")
    return $rc
}
STATUS=()

step nvidia-smi 20 nvidia-smi

# cudarc loads libcublas.so.13 with dlopen: find its folder. libcuda comes from the driver's own
# folder, already on the loader path; CUDA's compat/ libcuda must not be put first (it does not
# match the installed driver: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH).
LIBDIRS=""
for lib in libcublas.so.13 libcublasLt.so.13; do
    found=$(find /usr/local /usr/lib /usr/lib64 /opt -maxdepth 9 -name "$lib" -not -path "*/compat/*" 2>/dev/null | head -1)
    echo "library $lib: ${found:-NOT FOUND}" | tee -a "$LOG"
    if [ -n "$found" ]; then LIBDIRS="$LIBDIRS:$(dirname "$found")"; fi
done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$LOG"

step doctor 30 "$BIN" doctor --verbose
step selfcheck 150 "$BIN" selfcheck --backend cuda --json "$OUT/selfcheck.json"
# Out-of-bounds accesses and races that happen to give right answers. API errors are not
# reported: selfcheck's out_of_memory_recovery row makes an allocation fail on purpose, and the
# backend checks every API call's result itself.
if command -v compute-sanitizer >/dev/null; then
    step memcheck 120 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
        "$BIN" selfcheck --backend cuda --quick
fi

SIZES="0.5b 1.5b"
if [ -n "$FILTER" ]; then SIZES=""; fi
for size in $SIZES; do
    cfg=tools/model_configs/qwen2.5-$size.json
    step "ours $size" 150 "$BIN" bench forward --backend cuda --model-config "$cfg" \
        --batch 1,8,32 --prompt-len 256 --decode-steps 32 --json "$OUT/ours_$size.json"
    ceil=""
    if [ "$size" = 0.5b ]; then ceil=--ceilings; fi
    step "torch $size" 180 env PYTHONUNBUFFERED=1 python3 tools/bench_torch_gpu.py \
        --model-config "$cfg" --batch 1,8,32 --prompt-len 256 --decode-steps 32 $ceil \
        --json "$OUT/torch_$size.json"
done

# One whole GRPO step (rollout, rewards, advantages, update) against PyTorch on the same card:
# 8 prompts x 8 samples for 0.5B, 4 x 8 for 1.5B (so both sides fit an 80 GB H100); then one
# more step of ours with every op timed (--profile: the tables land in logs.txt and the JSON).
for size in 0.5b 1.5b; do
    cfg=tools/model_configs/qwen2.5-$size.json
    prompts=8
    if [ "$size" = 1.5b ]; then prompts=4; fi
    shape="--prompts $prompts --group 8 --prompt-len 128 --new-tokens 256"
    step "ours step $size" 100 "$BIN" bench step --backend cuda --model-config "$cfg" $shape \
        --profile --json "$OUT/ours_step_$size.json"
    # the same step with every decode step run op by op: what the CUDA graphs save (0.5B, where
    # the rollout is most of the step)
    [ "$size" = 0.5b ] && step "ours step $size eager" 100 env THINKSHORT_CUDA_GRAPHS=0 "$BIN" \
        bench step --backend cuda --model-config "$cfg" $shape --json "$OUT/ours_step_${size}_eager.json"
    # the same step with each fused attention backward (one kernel for dq, dK, dV; 0.5B, where
    # the MFU goal is not met)
    for v in fused fused-wide; do
        [ "$size" = 0.5b ] && step "ours step $size $v backward" 100 env THINKSHORT_FLASH_BACKWARD=$v "$BIN" \
            bench step --backend cuda --model-config "$cfg" $shape --json "$OUT/ours_step_${size}_$v.json"
    done
    # the same step with the update in 4 passes of 16 (gradient accumulation, `micro_batch`):
    # its cost in speed and what it saves in memory (0.5B; one timed step)
    [ "$size" = 0.5b ] && step "ours step $size micro-batch 16" 100 "$BIN" bench step --backend cuda \
        --model-config "$cfg" $shape --micro-batch 16 --steps 1 --json "$OUT/ours_step_${size}_micro16.json"
    # the same step with activation checkpointing: what recomputing each layer's forward costs
    # and what it saves in memory (0.5B; one timed step)
    [ "$size" = 0.5b ] && step "ours step $size checkpointing" 100 "$BIN" bench step --backend cuda \
        --model-config "$cfg" $shape --activation-checkpointing --steps 1 --json "$OUT/ours_step_${size}_checkpointing.json"
    # the same step with the optimizer in host memory (`optim.offload`): what a step pays for
    # moving the gradients and weights and running AdamW on the CPU (0.5B; one timed step)
    [ "$size" = 0.5b ] && step "ours step $size offload" 100 "$BIN" bench step --backend cuda \
        --model-config "$cfg" $shape --offload --steps 1 --json "$OUT/ours_step_${size}_offload.json"
    [ "${TORCH_STEP:-1}" = 1 ] && step "torch step $size" 150 env PYTHONUNBUFFERED=1 python3 tools/bench_step_torch.py \
        --model-config "$cfg" $shape --json "$OUT/torch_step_$size.json"
done

# One step of the Qwen3-0.6B shape (per-head q/k norms, head_dim 128): the Qwen3 path at scale.
step "ours step qwen3-0.6b" 100 "$BIN" bench step --backend cuda \
    --model-config tools/model_configs/qwen3-0.6b.json --prompts 8 --group 8 --prompt-len 128 \
    --new-tokens 256 --steps 1 --json "$OUT/ours_step_qwen3-0.6b.json"

# One step at the paper's scale (METHOD.md §8: 16 prompts x 8 samples, up to 512 new tokens) for
# the 1.5B shape, the update in 8 passes of 16 (what `train` does when one pass does not fit).
step "ours step 1.5b paper scale" 150 "$BIN" bench step --backend cuda \
    --model-config tools/model_configs/qwen2.5-1.5b.json --prompts 16 --group 8 --prompt-len 200 \
    --new-tokens 512 --micro-batch 16 --steps 1 --json "$OUT/ours_step_1.5b_paper.json"

# The demo's whole curriculum GRPO run on the GPU (README numbers are the CPU's).
step "train cuda" 150 "$BIN" train --backend cuda --out /tmp/train_cuda
cp /tmp/train_cuda/metrics.jsonl "$OUT/train_cuda_metrics.jsonl" 2>/dev/null

# sft on CUDA against the CPU: 40 steps building the demo model from scratch on each, then both
# models' log-probs of two worked answers, on the CPU.
sft_check() {
    printf '%s\n' '{"prompt": "compute : 3 + 4 . budget : 20 tokens .", "completion": " <think> 3 + 4 = 7 . </think> <answer> 7 </answer>"}' \
        '{"prompt": "compute : 9 - 2 + 6 . budget : 30 tokens .", "completion": " <think> 9 - 2 = 7 . 7 + 6 = 13 . </think> <answer> 13 </answer>"}' \
        >/tmp/sft_in.jsonl
    for b in cpu cuda; do
        rm -rf /tmp/sft_$b
        "$BIN" sft --demo --out /tmp/sft_$b --steps 40 --batch-size 16 --lr 3e-3 --warmup 5 \
            --seed 0 --backend $b || return 1
        "$BIN" logprobs --model /tmp/sft_$b --input /tmp/sft_in.jsonl --output /tmp/sft_lp_$b.jsonl \
            --backend cpu || return 1
    done
    python3 - <<'PY'
import json
lp = {b: [x for l in open(f"/tmp/sft_lp_{b}.jsonl") for x in json.loads(l)["logprobs"]] for b in ("cpu", "cuda")}
diff = max(abs(x - y) for x, y in zip(lp["cpu"], lp["cuda"]))
mean = {b: sum(v) / len(v) for b, v in lp.items()}
print(f"sft cpu vs cuda (demo from scratch, 40 steps): mean log p {mean['cpu']:.3f} (cpu-trained) and "
      f"{mean['cuda']:.3f} (cuda-trained) over {len(lp['cpu'])} tokens, max |difference| {diff:.3f} nats")
PY
}
export BIN
export -f sft_check
step "sft cpu vs cuda" 120 bash -c sft_check

# Criterion benchmarks of every CUDA op (GB/s, or FLOP/s as elements/s), when the bench binary
# was copied beside thinkshort as `cuda_ops`.
BENCH_BIN=$(dirname "$BIN")/cuda_ops
if [ -x "$BENCH_BIN" ]; then
    step cuda_ops 240 "$BENCH_BIN" --bench $FILTER
fi
[ -z "$FILTER" ] && step "torch attention" 120 env PYTHONUNBUFFERED=1 python3 tools/bench_attention_torch.py \
    --json "$OUT/torch_attention.json"

# End to end on the checked-in demo model (real tokenizer): the commands, CUDA against CPU.
e2e() {
    local q="compute : 12 + 7 - 5 . budget : 30 tokens ."
    printf '%s\n' '{"prompt": "compute : 3 + 4 . budget : 20 tokens .", "completion": " <think> 3 + 4 = 7 . </think> <answer> 7 </answer>"}' \
        '{"prompt": "compute : 9 - 2 + 6 . budget : 30 tokens .", "completion": " <think> 9 - 2 = 7 . 7 + 6 = 13 . </think> <answer> 13 </answer>"}' \
        >/tmp/e2e_in.jsonl
    for b in cpu cuda; do
        "$BIN" generate --model models/demo --template raw --prompt "$q" --num-samples 4 \
            --temperature 0.7 --seed 1 --json --backend $b >/tmp/e2e_gen_$b.jsonl || return 1
        "$BIN" logprobs --model models/demo --input /tmp/e2e_in.jsonl --output /tmp/e2e_lp_$b.jsonl \
            --backend $b || return 1
    done
    python3 - <<'PY'
import json
gen = {b: [json.loads(l)["text"] for l in open(f"/tmp/e2e_gen_{b}.jsonl")] for b in ("cpu", "cuda")}
same = sum(a == c for a, c in zip(gen["cpu"], gen["cuda"]))
print(f"e2e generate (demo model, 4 samples, T=0.7, seed 1): {same}/4 texts identical on cpu and cuda")
for t in gen["cuda"]:
    print(f"  cuda: {t}")
lp = {b: [json.loads(l)["logprobs"] for l in open(f"/tmp/e2e_lp_{b}.jsonl")] for b in ("cpu", "cuda")}
diff = max(abs(x - y) for a, c in zip(lp["cpu"], lp["cuda"]) for x, y in zip(a, c))
print(f"e2e logprobs (demo model, 2 completions): max |cpu - cuda| = {diff:.4f} nats")
PY
}
export BIN
export -f e2e
[ -z "$FILTER" ] && step e2e 60 bash -c e2e

python3 - "$OUT" "${STATUS[@]}" <<'EOF' | tee "$OUT/summary.md"
import json, os, re, sys
out, status = sys.argv[1], sys.argv[2:]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception:
        return None
gib_of = lambda r, k: f"{r[k] / 2**30:.1f} GiB" if r.get(k) else "–"
pool = lambda r: (f"; pool: {r['pool_peaks']['used'] / 2**30:.1f} GiB allocated at most, "
                  f"{r['pool_peaks']['reserved'] / 2**30:.1f} GiB held" if r.get("pool_peaks") else "")
peak = lambda r: f"peak {gib_of(r, 'peak_memory_bytes')} (estimate {gib_of(r, 'memory_estimate_bytes')}{pool(r)})"
mfu = lambda r: f"{100 * r['train_mfu']:.1f} %" if r.get("train_mfu") else "–"
print("# thinkshort GPU check\n")
sc = load("selfcheck.json")
if sc:
    print(f"selfcheck on {sc['device']}: {sc['passed']} PASS, {sc['failed']} FAIL")
    for r in sc["rows"]:
        if not r["pass"]:
            err = "no result" if r["error"] is None else f"{r['error']:.3e}"
            print(f"  FAIL {r['op']} {r['shape']}: {err} (tol {r['tolerance']:.1e}) {r.get('message') or ''}")
    worst = {}
    for r in sc["rows"]:
        err = r["error"] if r["error"] is not None and r["error"] == r["error"] else float("inf")
        worst[r["op"]] = max(worst.get(r["op"], 0.0), err)
    print("worst error per op: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for line in sc.get("info", []):
        print(f"info: {line}")
else:
    print("selfcheck: no result (see logs.txt)")
ceil = (load("torch_0.5b.json") or {}).get("ceilings")
if ceil:
    print(f"\nceilings: copy {ceil['copy_gb_per_s']:.0f} GB/s (read + write), bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s")
print("\n| model | batch | prefill tok/s ours | torch | ours/torch | decode tok/s ours | torch | ours/torch | decode GB/s ours | % of copy GB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for size in ("0.5b", "1.5b"):
    ours, torch = load(f"ours_{size}.json"), load(f"torch_{size}.json")
    if not ours:
        print(f"| {size} | – | no result | | | | | | | |")
        continue
    tby = {r["batch"]: r for r in (torch or {}).get("results", [])}
    for r in ours["results"]:
        t = tby.get(r["batch"])
        pf = f"{t['prefill_tokens_per_s']:.0f}" if t else "–"
        dc = f"{t['decode_tokens_per_s']:.1f}" if t else "–"
        pr = f"{r['prefill_tokens_per_s'] / t['prefill_tokens_per_s']:.2f}" if t else "–"
        dr = f"{r['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}" if t else "–"
        roof = f"{100 * r['decode_gb_per_s'] / ceil['copy_gb_per_s']:.0f} %" if ceil else "–"
        print(f"| {size} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | {pf} | {pr} | {r['decode_tokens_per_s']:.1f} | {dc} | {dr} | {r['decode_gb_per_s']:.0f} | {roof} |")
# criterion medians from the log: name -> value per second
SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
crit, name = {}, None
for line in open(os.path.join(out, "logs.txt"), errors="replace"):
    m = re.match(r"^([a-z_]+/\S+)", line)
    if m:
        name = m.group(1)
    m = re.search(r"thrpt:\s+\[\s*\S+ \S+\s+(\S+) (K|M|G|T|Ki|Mi|Gi|Ti)?(elem|B)/s", line)
    if m and name:
        crit[name] = float(m.group(1)) * SCALE[m.group(2) or ""]
ta = load("torch_attention.json")
if any(k.startswith("flash_attention/") for k in crit):
    print("\n| fused attention (causal, bf16) | T | fwd TFLOP/s ours (64 / 128 rows) | torch flash SDPA | bwd ours (split / fused / fused-wide) | torch | fwd+bwd ours (best) | torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    tby = {(r["head_dim"], r["T"]): r for r in (ta or {}).get("results", [])}
    for d in (64, 128):
        for t in (512, 1024, 2048):
            f64_ = crit.get(f"flash_attention/forward_flops_d{d}/T{t}")
            f128 = crit.get(f"flash_attention/forward_wide_flops_d{d}/T{t}")
            f = f128 or f64_  # the kernel the backend picks for these shapes: 128 rows
            bs = crit.get(f"flash_attention/backward_flops_d{d}/T{t}")
            bf = crit.get(f"flash_attention/backward_fused_flops_d{d}/T{t}")
            bw = crit.get(f"flash_attention/backward_fused_wide_flops_d{d}/T{t}")
            b = max(bs or 0, bf or 0, bw or 0) or None
            r = tby.get((d, t))
            fb = 3.5 / (1 / f + 2.5 / b) if f and b else None  # FLOPs of both over the sum of times
            cell = lambda v: f"{v / 1e12:.0f}" if v else "–"
            tcell = lambda k: f"{r[k]:.0f}" if r else "–"
            print(f"| d={d}, {16384 // t}x{2048 // d} heads | {t} | {cell(f64_)} / {cell(f128)} | {tcell('forward_tflops')} | {cell(bs)} / {cell(bf)} / {cell(bw)} | {tcell('backward_tflops')} | {cell(fb)} | {tcell('fwd_bwd_tflops')} |")
print("\n| GRPO step | P x G | rollout tok/s ours | torch | update tok/s ours | torch | MFU ours | torch | step s ours | torch | torch/ours | peak GiB ours | estimate | torch |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for size in ("0.5b", "1.5b"):
    o, t = load(f"ours_step_{size}.json"), load(f"torch_step_{size}.json")
    if not o and not t:
        continue
    ro, rt = (o or {}).get("result", {}), (t or {}).get("result", {})
    num = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "–"
    pg = f"{(o or t)['prompts']} x {(o or t)['group']}"
    speedup = f"{rt['step_s'] / ro['step_s']:.2f}" if ro and rt else "–"
    gib = lambda r, k="peak_memory_bytes": f"{r[k] / 2**30:.1f}" if r.get(k) else "–"
    print(f"| {size} | {pg} | {num(ro, 'rollout_tokens_per_s', '{:.0f}')} | {num(rt, 'rollout_tokens_per_s', '{:.0f}')} "
          f"| {num(ro, 'train_tokens_per_s', '{:.0f}')} | {num(rt, 'train_tokens_per_s', '{:.0f}')} | {mfu(ro)} | {mfu(rt)} "
          f"| {num(ro, 'step_s', '{:.2f}')} | {num(rt, 'step_s', '{:.2f}')} | {speedup} | {gib(ro)} | {gib(ro, 'memory_estimate_bytes')} | {gib(rt)} |")
for size in ("0.5b", "1.5b"):
    o = load(f"ours_step_{size}.json")
    if o:
        print(f"\nmemory, {size} step: {peak(o['result'])}")
for v in ("fused", "fused-wide"):
    o, fu = load("ours_step_0.5b.json"), load(f"ours_step_0.5b_{v}.json")
    if o and fu:
        ro, rf = o["result"], fu["result"]
        print(f"\n{v} attention backward 0.5b: update {rf['train_tokens_per_s']:.0f} tok/s, MFU {100 * rf['train_mfu']:.1f} % "
              f"(split: {ro['train_tokens_per_s']:.0f} tok/s, {100 * ro['train_mfu']:.1f} %)")
o, mb = load("ours_step_0.5b.json"), load("ours_step_0.5b_micro16.json")
if o and mb:
    ro, rm = o["result"], mb["result"]
    print(f"\nupdate in 4 passes of 16, 0.5b: {rm['train_tokens_per_s']:.0f} tok/s, MFU {mfu(rm)}, "
          f"{peak(rm)}; one pass: "
          f"{ro['train_tokens_per_s']:.0f} tok/s, {mfu(ro)}, {peak(ro)}")
ck = load("ours_step_0.5b_checkpointing.json")
if o and ck:
    ro, rc = o["result"], ck["result"]
    print(f"\nactivation checkpointing, 0.5b: update {rc['update_s']:.3f} s, MFU {mfu(rc)}, {peak(rc)}; without: update {ro['update_s']:.3f} s, "
          f"peak {gib_of(ro, 'peak_memory_bytes')}")
off = load("ours_step_0.5b_offload.json")
if o and off:
    ro, rf = o["result"], off["result"]
    print(f"\noptimizer offloaded, 0.5b: update {rf['update_s']:.3f} s, {peak(rf)}; on the device: update {ro['update_s']:.3f} s, "
          f"peak {gib_of(ro, 'peak_memory_bytes')}")
q3 = load("ours_step_qwen3-0.6b.json")
if q3:
    r = q3["result"]
    print(f"\nqwen3-0.6b, 8 x 8: step {r['step_s']:.2f} s (rollout {r['rollout_tokens_per_s']:.0f} tok/s; update "
          f"{r['train_tokens_per_s']:.0f} tok/s, MFU {mfu(r)}), {peak(r)}")
pap = load("ours_step_1.5b_paper.json")
if pap:
    r = pap["result"]
    print(f"\npaper scale, 1.5b, 16 x 8 x 512 tokens, 8 update passes: step {r['step_s']:.2f} s "
          f"(rollout {r['rollout_s']:.2f} s, {r['rollout_tokens_per_s']:.0f} tok/s; update {r['update_s']:.2f} s, "
          f"{r['train_tokens_per_s']:.0f} tok/s, MFU {mfu(r)}), {peak(r)}")
for size in ("0.5b", "1.5b"):
    o, e = load(f"ours_step_{size}.json"), load(f"ours_step_{size}_eager.json")
    if o and e:
        d = o.get("decode_graph") or {}
        print(f"\ndecode CUDA graphs {size}: rollout {o['result']['rollout_s']:.3f} s with, {e['result']['rollout_s']:.3f} s without "
              f"({d.get('captured')} steps recorded, {d.get('replayed')} replayed, {d.get('eager')} op by op; fallback: {d.get('fallback')})")
sys.path.insert(0, "tools")
from update_roofline import label  # noqa: E402  an op's name with its product's shape


def rates(o):  # TFLOP/s of the products and attention, GB/s of every op (bench step's table)
    s = max(o["seconds"], 1e-12)
    tflops = f"{o.get('flops', 0) / s / 1e12:.0f} TFLOP/s, " if o.get("flops") else ""
    return f"{tflops}{o.get('bytes', 0) / s / 1e9:.0f} GB/s"


for size in ("0.5b", "1.5b"):
    prof = (load(f"ours_step_{size}.json") or {}).get("profile")
    if not prof:
        continue
    for phase in ("rollout", "update"):
        ops = prof[f"{phase}_ops"]
        total = sum(o["seconds"] for o in ops)
        top = "; ".join(f"{label(o)} {1e3 * o['seconds']:.1f} ms ({rates(o)})" for o in ops[:8])
        print(f"\nprofile {size} {phase}: ops {1e3 * total:.0f} ms on the device in {1e3 * prof[phase + '_s']:.0f} ms wall; top: {top}")
dec = {k: v for k, v in crit.items() if k.startswith("decode_attention/")}
if dec:
    print("\ndecode attention (K+V bytes read): " + ", ".join(
        f"{k.split('/', 1)[1]} {v / 1e9:.0f} GB/s" + (f" ({100 * v / 1e9 / ceil['copy_gb_per_s']:.0f} % of copy)" if ceil else "")
        for k, v in dec.items()))
print("\nsteps: " + "; ".join(status))
EOF
grep -E "^e2e |^  cuda: |^sft cpu vs cuda" "$LOG" | tee -a "$OUT/summary.md"
# The demo run on CUDA: its before/after table.
grep -E "^\| (before|after) \||^mean length change" "$LOG" | sed '1i train --backend cuda (the demo):' |
    tee -a "$OUT/summary.md"
# One line per criterion benchmark: name and median throughput.
awk '/^[a-z_]+\/[^ ]+/ {name = $1} /thrpt:/ {sub(/\[ +/, "["); print "  " name ": " $4 " " $5}' "$LOG" |
    sed '1i cuda_ops (criterion median throughput; elem/s = FLOP/s for matmul and prefill attention):' |
    tee -a "$OUT/summary.md"
# Each op of the profiled 0.5B update against its roofline (tools/update_roofline.py): the ideal
# time at this card's copy and matmul ceilings when the full run measured them (else the H200's
# of 2026-11-27), attention at FlashAttention-2's H200 rate, the MFU at the profile's peak.
if [ -f "$OUT/ours_step_0.5b.json" ]; then
    ceilings=$(python3 -c 'import json, sys
c = json.load(open(sys.argv[1])).get("ceilings") or {}
print("--copy-gbps %s --matmul-tflops %s" % (c["copy_gb_per_s"], c["bf16_matmul_tflops"]) if c else "")' \
        "$OUT/torch_0.5b.json" 2>/dev/null)
    python3 tools/update_roofline.py "$OUT/ours_step_0.5b.json" $ceilings 2>&1 | tee -a "$OUT/summary.md"
fi
echo "total $(($(date +%s) - START)) s"
