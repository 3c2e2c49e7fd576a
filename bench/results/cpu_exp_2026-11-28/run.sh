# base: 239ad6e (the session's first commit: kernels as at 308dc30, plus the CPU op profile)
# new: 5d999bb (16-accumulator decode tiles with prefetch, parallel sampling, polynomial exp
# in f32 and f64). Binaries built with `cargo build --release` and
# `cargo bench --bench cpu_forward --no-run` at each commit, copied to /tmp/gm2/*-{base,new}.
cd /work/main
O=/tmp/gm2/out; mkdir -p $O
S="--model-config tools/bench_model_10m.json --prompts 4 --group 8 --prompt-len 64 --new-tokens 128 --steps 3"
for r in 1 2 3; do
  for v in base new; do
    echo "== step round $r $v $(date +%H:%M:%S)"
    /tmp/gm2/thinkshort-$v bench step --backend cpu $S 2>&1 | tail -5
  done
  echo "== step round $r torch $(date +%H:%M:%S)"
  /work/pyenv/bin/python tools/bench_step_torch.py --device cpu --threads 2 $S 2>&1 | tail -6
done > $O/bench_step.txt 2>&1
for r in 1 2 3; do
  for v in base new; do
    echo "== forward round $r $v $(date +%H:%M:%S)"
    /tmp/gm2/thinkshort-$v bench forward --backend cpu --model-config tools/bench_model_10m.json --batch 1,4,16,32,64 --prompt-len 128 --decode-steps 64 2>&1 | tail -6
  done
done > $O/bench_forward.txt 2>&1
for r in 1 2 3; do
  for v in base new torch; do
    echo "== criterion round $r $v $(date +%H:%M:%S)"
    if [ $v = torch ]; then /work/pyenv/bin/python tools/bench_torch_cpu.py --threads 2 2>&1 | tail -6; else /tmp/gm2/cpu_forward-$v --bench --noplot 2>&1 | grep -E "^(prefill|decode)/|time:"; fi
  done
done > $O/criterion_and_torch.txt 2>&1
for r in 1 2 3 4; do
  for v in base new; do
    rm -rf /tmp/gm2/demo-$v
    echo "== demo100 round $r $v $(date +%H:%M:%S)"
    /usr/bin/time -f "%e s wall %U user %S sys %M KB" /tmp/gm2/thinkshort-$v train --out /tmp/gm2/demo-$v --set steps=100 --set eval_every=0 2>&1 | tail -1
  done
done > $O/demo100.txt 2>&1
/tmp/gm2/thinkshort-new bench step --backend cpu $S --profile > $O/profile_new.txt 2>&1
/tmp/gm2/thinkshort-base bench step --backend cpu $S --profile > $O/profile_base.txt 2>&1
echo finished > $O/done
