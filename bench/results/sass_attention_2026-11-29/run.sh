#!/usr/bin/env bash
# Static instruction mix of the attention kernels' loops (tools/sass_mix.py) at two revisions.
# usage: NVCC=... CUOBJDUMP=... bash run.sh OLD_REV NEW_REV OUT_DIR   (a REV of "worktree": the
# kernels/ folder as it is now). Compiles kernels/{flash,decode}_attention.cu with build.rs's nvcc
# flags and writes OUT_DIR/REV.{sm_90,sm_80}.txt.
set -euo pipefail
old=$1 new=$2 out=$(mkdir -p "$3" && cd "$3" && pwd)
repo=$(cd "$(dirname "$0")/../../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for rev in "$old" "$new"; do
    src=$work/$rev
    mkdir -p "$src"
    if [ "$rev" = worktree ]; then
        cp -r "$repo/kernels" "$src/"
    else
        git -C "$repo" archive "$rev" kernels | tar -x -C "$src"
    fi
    for f in flash_attention decode_attention; do
        "$NVCC" --fatbin -std=c++17 -O3 -lineinfo \
            -gencode 'arch=compute_80,code=[sm_80,compute_80]' -gencode arch=compute_90,code=sm_90 \
            -I "$src/kernels" -o "$src/$f.fatbin" "$src/kernels/$f.cu"
    done
    for arch in sm_90 sm_80; do
        for f in flash_attention decode_attention; do
            python3 "$repo/tools/sass_mix.py" --cuobjdump "$CUOBJDUMP" --arch "$arch" "$src/$f.fatbin"
        done >"$out/$rev.$arch.txt"
    done
done
