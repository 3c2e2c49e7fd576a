# The README's demo table with the new binary (see run.sh).
cd /work/main
for c in "default|" "fixed|--preset fixed-budget" "seed1|--set seed=1" "seed2|--set seed=2"; do
  name=${c%%|*}; args=${c#*|}
  rm -rf /tmp/gm2/table-$name
  echo "== $name $(date +%H:%M:%S)"
  /usr/bin/time -f "%e s wall %M KB" /tmp/gm2/thinkshort-new train --out /tmp/gm2/table-$name $args > /tmp/gm2/table-$name.log 2>&1
  tail -n 12 /tmp/gm2/table-$name.log
done > /tmp/gm2/out/demo_table.txt 2>&1
echo done >> /tmp/gm2/out/demo_table.txt
