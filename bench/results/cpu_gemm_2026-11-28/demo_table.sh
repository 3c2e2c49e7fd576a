cd /work/main
for c in "default|" "fixed|--preset fixed-budget" "seed1|--set seed=1" "seed2|--set seed=2"; do
  name=${c%%|*}; args=${c#*|}
  rm -rf /tmp/gm/table-$name
  echo "== $name $(date +%H:%M:%S)"
  /usr/bin/time -f "%e s wall %M KB" /tmp/gm/thinkshort-new train --out /tmp/gm/table-$name $args > /tmp/gm/table-$name.log 2>&1
  tail -n 12 /tmp/gm/table-$name.log
done > /tmp/gm/table.txt 2>&1
echo done >> /tmp/gm/table.txt
