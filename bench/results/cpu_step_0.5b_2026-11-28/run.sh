#!/usr/bin/env bash
# One GRPO step on the Qwen2.5-0.5B shape on the CPU, thinkshort against PyTorch, alternated
# rounds (2 threads each). Usage: bash run.sh THINKSHORT_BINARY OUT_DIR [ROUNDS]
set -euo pipefail
bin=$1 out=$2 rounds=${3:-3}
mkdir -p "$out"
shape="--model-config tools/model_configs/qwen2.5-0.5b.json --prompts 2 --group 4 --prompt-len 64 --new-tokens 64 --steps 2"
for r in $(seq 1 "$rounds"); do
    /usr/bin/time -f "maxrss %M KB" "$bin" bench step --backend cpu $shape >"$out/ours_$r.txt" 2>&1
    /usr/bin/time -f "maxrss %M KB" python3 tools/bench_step_torch.py --device cpu --threads 2 $shape \
        >"$out/torch_$r.txt" 2>&1
done
