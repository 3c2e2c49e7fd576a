# base: 200e05a (the gemm crate for every product with more than 64 rows; AVX2 decode tiles)
# new: the AVX-512 GEMM and decode tiles. Binaries built with `cargo build --release` and
# `cargo bench --no-run` at each commit, copied to /tmp/gm/*-{base,new}.
cd /work/main
O=/tmp/gm/out; mkdir -p $O
S="--model-config tools/bench_model_10m.json --prompts 4 --group 8 --prompt-len 64 --new-tokens 128 --steps 3"
for r in 1 2 3; do
  for v in base new torch; do
    echo "== criterion round $r $v $(date +%H:%M:%S)"
    if [ $v = torch ]; then /work/pyenv/bin/python tools/bench_torch_cpu.py --threads 2 2>&1 | tail -6; else /tmp/gm/cpu_forward-$v --bench --noplot 2>&1 | grep -E "^(prefill|decode)/|time:"; fi
  done
done > $O/criterion_and_torch.txt 2>&1
for r in 1 2 3; do
  echo "== cpu_matmul round $r $(date +%H:%M:%S)"
  /tmp/gm/cpu_matmul-new --bench --noplot 2>&1 | grep -E "^(forward|backward)/|thrpt:"
done > $O/cpu_matmul.txt 2>&1
for r in 1 2 3; do
  for v in base new; do
    echo "== forward round $r $v $(date +%H:%M:%S)"
    /tmp/gm/thinkshort-$v bench forward --backend cpu --model-config tools/bench_model_10m.json --batch 1,4,16,32,64 --prompt-len 128 --decode-steps 64 2>&1 | tail -6
  done
done > $O/bench_forward.txt 2>&1
for r in 1 2 3; do
  for v in base new; do
    echo "== step round $r $v $(date +%H:%M:%S)"
    /tmp/gm/thinkshort-$v bench step --backend cpu $S 2>&1 | tail -6
  done
  echo "== step round $r torch $(date +%H:%M:%S)"
  /work/pyenv/bin/python tools/bench_step_torch.py --device cpu --threads 2 $S 2>&1 | tail -6
done > $O/bench_step.txt 2>&1
for r in 1 2 3 4; do
  for v in base new; do
    rm -rf /tmp/gm/demo-$v
    echo "== demo100 round $r $v $(date +%H:%M:%S)"
    /usr/bin/time -f "%e s wall %U user %S sys %M KB" /tmp/gm/thinkshort-$v train --out /tmp/gm/demo-$v --set steps=100 --set eval_every=0 2>&1 | tail -1
  done
done > $O/demo100.txt 2>&1
